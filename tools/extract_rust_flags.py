#!/usr/bin/env python3
"""Extract the Rust SMG's `smg launch` flag facts from its `--help` text into a table.

The table (tests/data/rust_smg_launch_flags.json) holds, for every option of the help
text, its option strings (name and aliases), argparse's default as printed and its
choices, plus the source version; not the help text itself. tests/test_flag_compat.py
reads the table, so the compatibility check runs in a plain clone.

    python tools/extract_rust_flags.py                # regenerate from the 1.13 help text
    python tools/extract_rust_flags.py HELP --version 1.14 -o tests/data/...json
    python tools/extract_rust_flags.py --check        # exit 1 if the table is stale

Source of the committed table: `smg launch --help` of the Rust SMG 1.13 (the wheel
installed by native_bench), saved as shared/reference/smg-1.13-launch-help.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HELP = REPO.parent / "shared" / "reference" / "smg-1.13-launch-help.txt"
DEFAULT_TABLE = REPO / "tests" / "data" / "rust_smg_launch_flags.json"

_OPT_START = re.compile(r"^  (-{1,2}\w[\w-]*)")
_DEFAULT_RE = re.compile(r"\(default:\s*([^()]*?)\)")
_VERSION_RE = re.compile(r"smg-(\d+(?:\.\d+)+)-launch-help")


def _join_wrapped(lines: list[str]) -> str:
    """Undo argparse's wrapping: textwrap breaks after a hyphen without adding a space."""
    text = ""
    for line in (s.strip() for s in lines):
        if not line:
            continue
        if text.endswith("-") and len(text) > 1 and text[-2].isalnum():
            text += line
        else:
            text += (" " if text else "") + line
    return text


def parse_rust_help(text: str) -> list[dict[str, Any]]:
    """Every option entry after the `options:` line: names, last `(default: X)`, choices.

    Quirks handled: group headings (column 0) and group descriptions (2 spaces, not a
    dash) end an entry; the option column and its help may share a line (split on 2+
    spaces) or the help starts on the next line; help wraps across lines, hyphenated
    words wrap without a space; ArgumentDefaultsHelpFormatter appends `(default: X)`
    after help that often already states it, so the last one is argparse's real default.
    """
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "options:") + 1
    except StopIteration:
        raise ValueError("help text has no 'options:' section") from None
    entries: list[tuple[str, list[str]]] = []
    for line in lines[start:]:
        if _OPT_START.match(line):
            spec, _, rest = line[2:].partition("  ")
            entries.append((spec.strip(), [rest]))
        elif line.startswith("    ") and entries:
            entries[-1][1].append(line)
        elif line.strip():
            # a group heading or a group description ends the entry before it
            entries.append(("", []))
    options: list[dict[str, Any]] = []
    for spec, help_lines in entries:
        if not spec:
            continue
        names: list[str] = []
        choices: list[str] | None = None
        for part in spec.split(", "):
            tokens = part.split()
            names.append(tokens[0])
            for tok in tokens[1:]:
                if tok.startswith("{") and tok.endswith("}"):
                    choices = tok[1:-1].split(",")
        defaults = _DEFAULT_RE.findall(_join_wrapped(help_lines))
        options.append(
            {
                "names": names,
                "default": defaults[-1].strip() if defaults else None,
                "choices": choices,
            }
        )
    return options


def build_table(help_path: Path, version: str) -> dict[str, Any]:
    raw = help_path.read_bytes()
    return {
        "source": {
            "program": "smg launch --help (Rust SMG)",
            "version": version,
            "file": help_path.name,
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
        "options": parse_rust_help(raw.decode("utf-8")),
    }


def dump(table: dict[str, Any]) -> str:
    # One option per line: a new Rust version's diff shows flag by flag.
    head = json.dumps(table["source"], indent=None, sort_keys=True)
    rows = ",\n".join("    " + json.dumps(o, sort_keys=True) for o in table["options"])
    return f'{{\n  "source": {head},\n  "options": [\n{rows}\n  ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("help_file", nargs="?", type=Path, default=DEFAULT_HELP)
    parser.add_argument("--version", help="Rust SMG version (default: from the file name)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    version = args.version
    if version is None:
        m = _VERSION_RE.search(args.help_file.name)
        if not m:
            parser.error("cannot tell the version from the file name; pass --version")
        version = m.group(1)
    text = dump(build_table(args.help_file, version))
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(json.loads(text)['options'])} options, SMG {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
