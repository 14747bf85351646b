"""`smg bench compare A.json B.json`: metrics side by side with B/A ratios."""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Any

from smg.bench.results import flat_scalars, load

_FIRST = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
]
_LATENCY = re.compile(r"^(mean|median|std|p[0-9.]+)_(ttft|tpot|itl|e2el)_ms$")
_ORDER = {"ttft": 0, "tpot": 1, "itl": 2, "e2el": 3}


def _sort_key(key: str) -> tuple[int, Any, Any]:
    if key in _FIRST:
        return (0, _FIRST.index(key), "")
    m = _LATENCY.match(key)
    if m:
        stat = m.group(1)
        rank = {"mean": -3.0, "median": -2.0, "std": -1.0}.get(stat)
        return (1, _ORDER[m.group(2)], rank if rank is not None else float(stat[1:]))
    return (2, key, "")


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ratio(a: float, b: float) -> float | None:
    if a == 0:
        return None
    return b / a


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any, float | None]]:
    """(metric, A, B, B/A) for every numeric metric either result has."""
    fa, fb = flat_scalars(a), flat_scalars(b)
    keys = [
        k
        for k in set(fa) | set(fb)
        if (_numeric(fa.get(k)) or _numeric(fb.get(k)))
        and not k.startswith(("smg_run.", "smg_client.per_process"))
    ]
    rows = []
    for k in sorted(keys, key=_sort_key):
        va, vb = fa.get(k), fb.get(k)
        r = ratio(va, vb) if _numeric(va) and _numeric(vb) else None
        rows.append((k, va, vb, r))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:,.3f}"
    return str(v)


def format_table(rows: list[tuple[str, Any, Any, float | None]], name_a: str, name_b: str) -> str:
    width = max([len(r[0]) for r in rows] + [6])
    head = f"{'metric':<{width}}  {name_a:>14}  {name_b:>14}  {'B/A':>8}"
    lines = [head, "-" * len(head)]
    for k, va, vb, r in rows:
        rs = f"{r:.3f}" if r is not None else "-"
        lines.append(f"{k:<{width}}  {_fmt(va):>14}  {_fmt(vb):>14}  {rs:>8}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="smg bench compare", description="Compare two smg/vllm bench result files."
    )
    parser.add_argument("a", help="baseline result JSON (A)")
    parser.add_argument("b", help="result JSON to compare (B)")
    args = parser.parse_args(argv)
    try:
        ra, rb = load(args.a), load(args.b)
    except (OSError, ValueError) as exc:
        print(f"smg bench compare: {exc}", file=sys.stderr)
        return 2
    print(f"A = {args.a}\nB = {args.b}")
    print(format_table(compare_rows(ra, rb), "A", "B"))
    return 0
