"""Our `smg launch` flags against the Rust SMG 1.13 `smg launch` flags.

The Rust facts (each option's names and aliases, default and choices) come from
tests/data/rust_smg_launch_flags.json, extracted from the 1.13 `--help` text by
tools/extract_rust_flags.py, so this check runs in any clone. For every option both
parsers have: same aliases, same default, same choices, unless docs/flags.md lists the
difference (with a reason) in its machine-readable table. Every flag only we have must be
listed as smg-only, and no listed row may be stale.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from smg.config import CHOICES, DEFAULTS, build_parser

REPO = Path(__file__).resolve().parents[1]
TABLE_FILE = REPO / "tests" / "data" / "rust_smg_launch_flags.json"
EXTRACTOR = REPO / "tools" / "extract_rust_flags.py"
FLAGS_DOC = REPO / "docs" / "flags.md"


@dataclass
class RustOption:
    names: list[str]
    default: str | None
    choices: list[str] | None


def _extractor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("extract_rust_flags", EXTRACTOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(doc: str, name: str) -> list[dict[str, str]]:
    """Rows of the markdown table between `<!-- name:begin -->` and `<!-- name:end -->`."""
    m = re.search(rf"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", doc, re.S)
    assert m, f"docs/flags.md has no {name} table"
    rows = [ln.strip() for ln in m.group(1).strip().splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = []
    for row in rows[2:]:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        assert len(cells) == len(header), f"malformed row in {name}: {row}"
        out.append(dict(zip(header, cells, strict=True)))
    return out


def _same_value(rust: str, ours: str) -> bool:
    if rust == ours:
        return True
    try:
        return float(rust) == float(ours)
    except ValueError:
        return False


def _our_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            out[opt] = action
    return out


@pytest.fixture(scope="module")
def rust_options() -> list[RustOption]:
    table = json.loads(TABLE_FILE.read_text())
    assert table["source"]["version"] == "1.13"
    return [RustOption(o["names"], o["default"], o["choices"]) for o in table["options"]]


@pytest.fixture(scope="module")
def doc() -> str:
    return FLAGS_DOC.read_text()


def test_table_holds_the_help_texts_quirky_entries(rust_options: list[RustOption]) -> None:
    by_name = {n: o for o in rust_options for n in o.names}
    # duplicated "(default: 1800) (default: 1800)" and text wrapped between them
    assert by_name["--worker-startup-timeout-secs"].default == "1800"
    assert by_name["--job-queue-capacity"].default == "1000"
    # "(default:" at a line end with its value on the next line
    assert by_name["--routing-key-headers"].default == "None"
    # a value wrapped after a hyphen
    assert by_name["--kv-connector-annotation"].default == "smg.ai/kv-connector"
    # the help states one default, argparse's real one comes last
    assert by_name["--zmq-engine-count"].default == "None"
    # aliases and list defaults
    assert by_name["--model"].names == ["--model-path", "--model"]
    assert by_name["--worker-urls"].default == "[]"
    assert by_name["--remove-unhealthy-workers"].names == [
        "--remove-unhealthy-workers",
        "--no-remove-unhealthy-workers",
        "--worker-auto-recovery",
        "--no-worker-auto-recovery",
    ]
    assert "cache_aware" in (by_name["--policy"].choices or [])
    assert by_name["--host"].default == "0.0.0.0"
    assert len(rust_options) > 150


# The help text's layout quirks, in small: wrapped help, a duplicated default, a value
# wrapped after a hyphen, a "(default:" whose value is on the next line, a group heading
# and description between entries, aliases and choices.
HELP_SAMPLE = """usage: smg [-h]

options:
  -h, --help            show this help message and exit

Worker configuration:
  Settings for worker connections and URLs

  --policy {random,round_robin}
                        Routing policy (default: random)
  --worker-startup-timeout-secs WORKER_STARTUP_TIMEOUT_SECS
                        Timeout (default: 1800 / 30 minutes). Large models take
                        time. (default:
                        1800)
  --kv-connector-annotation KV_CONNECTOR_ANNOTATION
                        annotation (default: smg.ai/kv-
                        connector) (default: smg.ai/kv-connector)
  --model-path MODEL_PATH, --model MODEL_PATH
                        Model path (default: None)
  --flag-without-help
"""


def test_extractor_handles_help_quirks() -> None:
    options = _extractor().parse_rust_help(HELP_SAMPLE)
    assert options == [
        {"names": ["-h", "--help"], "default": None, "choices": None},
        {"names": ["--policy"], "default": "random", "choices": ["random", "round_robin"]},
        {"names": ["--worker-startup-timeout-secs"], "default": "1800", "choices": None},
        {"names": ["--kv-connector-annotation"], "default": "smg.ai/kv-connector", "choices": None},
        {"names": ["--model-path", "--model"], "default": "None", "choices": None},
        {"names": ["--flag-without-help"], "default": None, "choices": None},
    ]


def test_table_is_current_with_the_help_text() -> None:
    """Only where shared/reference/ is checked out: the committed table is what the
    extractor makes of the help text now (run tools/extract_rust_flags.py if not)."""
    extractor = _extractor()
    if not extractor.DEFAULT_HELP.exists():
        pytest.skip(f"Rust SMG help text not at {extractor.DEFAULT_HELP} (shared/ not checked out)")
    assert extractor.main(["--check"]) == 0


def _compare(rust_options: list[RustOption]) -> set[tuple[str, str, str, str]]:
    """(flag, aspect, rust, smg) for every difference between the two parsers."""
    ours = _our_options(build_parser())
    diffs: set[tuple[str, str, str, str]] = set()
    for opt in rust_options:
        shared = [n for n in opt.names if n in ours]
        if not shared or opt.names == ["-h", "--help"]:
            continue
        primary = opt.names[0]
        dests = {ours[n].dest for n in shared}
        assert len(dests) == 1, f"{opt.names} map to several settings in smg: {dests}"
        dest = dests.pop()
        missing = [n for n in opt.names if n not in ours]
        if missing:
            diffs.add((primary, "alias", ", ".join(opt.names), ", ".join(shared)))
        if opt.default is not None:
            ours_default = str(DEFAULTS[dest])
            if not _same_value(opt.default, ours_default):
                diffs.add((primary, "default", opt.default, ours_default))
        if opt.choices is not None:
            our_choices = list(CHOICES.get(dest, ()))
            if our_choices != opt.choices:
                diffs.add((primary, "choices", ",".join(opt.choices), ",".join(our_choices)))
    return diffs


def test_shared_flags_match_rust_or_are_documented(
    rust_options: list[RustOption], doc: str
) -> None:
    diffs = _compare(rust_options)
    rows = _table(doc, "flag-differences")
    documented = {}
    for row in rows:
        assert row["reason"], f"difference for {row['flag']} has no reason"
        documented[(row["flag"], row["aspect"])] = (row["rust"], row["smg"])
    undocumented = [d for d in sorted(diffs) if documented.get(d[:2]) != d[2:]]
    assert not undocumented, (
        "flags that differ from the Rust SMG without a row in docs/flags.md "
        f"(flag, aspect, rust, smg): {undocumented}"
    )
    stale = sorted(set(documented) - {d[:2] for d in diffs})
    assert not stale, f"docs/flags.md lists differences that no longer exist: {stale}"


def test_smg_only_flags_are_documented(rust_options: list[RustOption], doc: str) -> None:
    rust_names = {n for o in rust_options for n in o.names}
    ours = _our_options(build_parser())
    only_ours = {n for n in ours if n not in rust_names}
    rows = _table(doc, "smg-only-flags")
    listed = {row["flag"]: row for row in rows}
    assert not only_ours - set(listed), (
        f"smg-only flags missing from docs/flags.md: {sorted(only_ours - set(listed))}"
    )
    assert not set(listed) - only_ours, (
        "docs/flags.md lists as smg-only flags that are not ours or that Rust has: "
        f"{sorted(set(listed) - only_ours)}"
    )
    for flag, row in listed.items():
        assert row["why"], f"{flag} has no reason in docs/flags.md"
        assert _same_value(row["default"], str(DEFAULTS[ours[flag].dest])), (
            f"docs/flags.md default for {flag} is {row['default']!r}, "
            f"smg's is {DEFAULTS[ours[flag].dest]!r}"
        )


def test_required_flags_exist() -> None:
    ours = _our_options(build_parser())
    required = [
        "--host",
        "--port",
        "--worker-urls",
        "--policy",
        "--power-of-two-load-metric",
        "--least-load-kv-pressure-weight",
        "--least-load-default-throughput",
        "--least-load-mean-prefill-tokens",
        "--least-load-max-waiting-requests",
        "--max-payload-size",
        "--request-timeout-secs",
        "--shutdown-grace-period-secs",
        "--header-read-timeout-secs",
        "--idle-connection-timeout-secs",
        "--upstream-pool-idle-timeout-secs",
        "--worker-startup-timeout-secs",
        "--worker-startup-check-interval",
        "--load-monitor-interval",
        "--disable-load-monitoring",
        "--health-failure-threshold",
        "--health-success-threshold",
        "--health-check-timeout-secs",
        "--health-check-interval-secs",
        "--health-check-endpoint",
        "--disable-health-check",
        "--remove-unhealthy-workers",
        "--no-remove-unhealthy-workers",
        "--worker-auto-recovery",
        "--model-alias",
        "--log-level",
        "--log-json",
        "--log-dir",
        "--prometheus-port",
        "--prometheus-host",
        "--request-id-headers",
        "--api-key",
        "--max-concurrent-requests",
        "--queue-size",
        "--queue-timeout-secs",
        "--cors-allowed-origins",
        "--health-check-port",
        "--model-path",
        "--model",
        "--tokenizer-path",
        "--chat-template",
        "--disable-tokenizer-autoload",
        "--backend",
        "--enable-igw",
        "--config",
        "--print-config",
        "--processes",
        "--listen-mode",
        "--worker-table-capacity",
        "--upstream-connect-timeout-secs",
        "--upstream-pool-max-per-worker",
        "--mock-workers",
        "--mock-worker-engine",
        "--mock-worker-args",
    ]
    assert [f for f in required if f not in ours] == []
