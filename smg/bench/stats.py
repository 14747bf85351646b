"""Pure statistics for benchmark results: no I/O, no clocks, no sockets.

Conventions follow `vllm bench serve` (which uses numpy) so numbers are comparable:
the standard deviation is the population one (ddof=0) and percentiles interpolate
linearly between closest ranks (numpy's default "linear" method). An empty sample
yields 0.0 everywhere, as vllm does with `np.mean(x or 0)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# Percentile keys render like vllm: 99 -> "p99", 99.9 -> "p99.9".


def percentile_label(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    """Population standard deviation (numpy's default, ddof=0)."""
    n = len(values)
    if n == 0:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) * (v - m) for v in values) / n)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks, like numpy.percentile(..., p)."""
    if not values:
        return 0.0
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    ordered = sorted(values)
    return _percentile_sorted(ordered, p)


def _percentile_sorted(ordered: Sequence[float], p: float) -> float:
    n = len(ordered)
    if n == 1:
        return float(ordered[0])
    rank = (n - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * frac)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summarize(values: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean/median/std/min/max and the requested percentiles of a sample (same unit)."""
    ordered = sorted(values)
    out: dict[str, float] = {
        "mean": mean(ordered),
        "median": _percentile_sorted(ordered, 50.0) if ordered else 0.0,
        "std": std(ordered),
        "min": float(ordered[0]) if ordered else 0.0,
        "max": float(ordered[-1]) if ordered else 0.0,
    }
    for p in percentiles:
        out[f"p{percentile_label(p)}"] = _percentile_sorted(ordered, p) if ordered else 0.0
    return out


def tpot(e2el: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (E2E - TTFT) / (tokens - 1); None if < 2 tokens."""
    if output_tokens < 2:
        return None
    return (e2el - ttft) / (output_tokens - 1)


def split_gap(gap: float, tokens: int) -> list[float]:
    """ITL entries for one chunk carrying `tokens` tokens that arrived `gap` after the last."""
    if tokens <= 0:
        return []
    return [gap / tokens] * tokens


def peak_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals [start, end) open at once; an end at t closes before a start at t."""
    events: list[tuple[float, int]] = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort()
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def max_tokens_per_second(token_times: Iterable[float], origin: float) -> float:
    """Largest count of token arrivals in any one-second bucket counted from `origin`."""
    buckets: dict[int, int] = {}
    for t in token_times:
        b = int(t - origin)
        if b >= 0:
            buckets[b] = buckets.get(b, 0) + 1
    return float(max(buckets.values())) if buckets else 0.0


def goodput_count(
    slos_ms: dict[str, float],
    ttfts: Sequence[float],
    tpots: Sequence[float],
    e2els: Sequence[float],
) -> int:
    """Requests meeting every given SLO (values in seconds, SLOs in ms; tpot 0 if < 2 tokens)."""
    columns: list[tuple[Sequence[float], float]] = []
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("e2el", e2els)):
        if name in slos_ms:
            columns.append((values, slos_ms[name] / 1000.0))
    if not columns:
        return 0
    n = len(columns[0][0])
    return sum(1 for i in range(n) if all(vals[i] <= slo for vals, slo in columns))


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """b[i] - a[i] for the indexes present in both (None marks a missing sample)."""
    return [y - x for x, y in zip(a, b) if x is not None and y is not None]


def fairness(counts: Sequence[float]) -> dict[str, float]:
    """How evenly work spread: Jain's index (1 = perfectly even), CV and max/min ratio."""
    if not counts:
        return {"jain_index": 0.0, "cv": 0.0, "max_over_min": 0.0}
    total = math.fsum(counts)
    squares = math.fsum(c * c for c in counts)
    jain = (total * total) / (len(counts) * squares) if squares else 0.0
    m = mean(counts)
    cv = std(counts) / m if m else 0.0
    lo, hi = min(counts), max(counts)
    ratio = hi / lo if lo else math.inf
    return {"jain_index": jain, "cv": cv, "max_over_min": ratio}
