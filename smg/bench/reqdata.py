"""Per-request data for the report (pure): read from a result's `smg_requests` and the
detailed lists (smg's or vllm's), and reduced to what the charts draw: distributions,
histograms, CDFs, rates and concurrency over time, and a sampled timeline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CDF_POINTS = 200
TIME_BINS = 60
GANTT_CAP = 400  # timeline rows: beyond this it is sampled (failures kept first)


@dataclass
class Requests:
    """Parallel per-request lists, request order; times in seconds from the run start."""

    start: list[float]
    end: list[float]
    ok: list[bool]
    error: list[str | None]
    worker: list[str | None]


def requests_of(result: dict[str, Any]) -> Requests | None:
    """From `smg_requests`, else from the detailed lists (`start_times`, latencies, `errors`;
    smg's or vllm's)."""
    r = result.get("smg_requests")
    if isinstance(r, dict) and r.get("start") is not None:
        n = len(r["start"])
        return Requests(
            list(r["start"]),
            list(r["end"]),
            [bool(v) for v in r.get("ok") or [True] * n],
            list(r.get("error") or [None] * n),
            list(r.get("worker") or [None] * n),
        )
    starts, lats = result.get("start_times"), latencies(result)
    if not starts or not lats or len(starts) != len(lats):
        return None
    # vllm's start_times are raw perf_counter readings: count from the first request.
    origin = min(starts)
    errors = result.get("errors") or [""] * len(starts)
    ok = [not e for e in errors]
    return Requests(
        [s - origin for s in starts],
        [s - origin + (lat or 0.0) for s, lat in zip(starts, lats)],
        ok,
        [None if good else str(e) for good, e in zip(ok, errors)],
        [None] * len(starts),
    )


def latencies(result: dict[str, Any]) -> list[float] | None:
    """Seconds per request: smg's `latencies`, else TTFT + the ITL gaps (vllm saves no
    latencies; for a streamed request the two are the same)."""
    if result.get("latencies"):
        return list(result["latencies"])
    ttfts, itls = result.get("ttfts"), result.get("itls")
    if ttfts and itls and len(ttfts) == len(itls):
        return [(t or 0.0) + sum(g or []) for t, g in zip(ttfts, itls)]
    return None


def _ok_mask(result: dict[str, Any], n: int) -> list[bool]:
    req = result.get("smg_requests")
    if isinstance(req, dict) and req.get("ok") and len(req["ok"]) == n:
        return [bool(v) for v in req["ok"]]
    errors = result.get("errors")
    if errors and len(errors) == n:
        return [not e for e in errors]
    return [True] * n


def distributions(result: dict[str, Any]) -> dict[str, list[float]]:
    """Milliseconds per metric over successful requests (ITL: every gap) from the detailed
    lists; a metric without its list is absent."""
    out: dict[str, list[float]] = {}
    ttfts = result.get("ttfts")
    if ttfts:
        ok = _ok_mask(result, len(ttfts))
        out["ttft"] = [t * 1000 for t, good in zip(ttfts, ok) if good]
    itls = result.get("itls")
    if itls:
        ok = _ok_mask(result, len(itls))
        out["itl"] = [g * 1000 for gaps, good in zip(itls, ok) if good for g in gaps or []]
    if ttfts and itls and result.get("output_lens"):
        ok = _ok_mask(result, len(ttfts))
        tpots = []
        for gaps, n, good in zip(itls, result["output_lens"], ok):
            if good and n and n > 1:
                tpots.append(sum(gaps or []) / (n - 1) * 1000)
        out["tpot"] = tpots
    lats = latencies(result)
    if lats:
        ok = _ok_mask(result, len(lats))
        out["e2el"] = [v * 1000 for v, good in zip(lats, ok) if good]
    return {k: v for k, v in out.items() if v}


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (pos - i)


def histogram(
    values: Sequence[float], lo: float, hi: float, bins: int
) -> tuple[list[float], list[int]]:
    """Equal-width bins over [lo, hi]; values beyond either end count in the end bins."""
    if hi <= lo:
        hi = lo + 1.0
    width = (hi - lo) / bins
    edges = [lo + width * i for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    return edges, counts


def cdf_points(values: Sequence[float], max_points: int = CDF_POINTS) -> list[tuple[float, float]]:
    """(value, % of requests <= value); at most `max_points` points, evenly by rank."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        return []
    idx = (
        range(n)
        if n <= max_points
        else sorted({round(k * (n - 1) / (max_points - 1)) for k in range(max_points)})
    )
    return [(s[i], 100.0 * (i + 1) / n) for i in idx]


def rate_over_time(
    times: Sequence[float], t_end: float, bins: int = TIME_BINS
) -> list[tuple[float, float]]:
    """Events per second in equal bins over [0, t_end], as (bin midpoint, rate)."""
    if t_end <= 0:
        return []
    width = t_end / bins
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, max(0, int(t / width)))] += 1
    return [(width * (i + 0.5), c / width) for i, c in enumerate(counts)]


def concurrency_over_time(
    starts: Sequence[float], ends: Sequence[float], t_end: float, bins: int = TIME_BINS
) -> list[tuple[float, float]]:
    """The most requests in flight at any moment of each bin, as (bin midpoint, count)."""
    if t_end <= 0 or not starts:
        return []
    width = t_end / bins
    # Ends sort before starts at the same instant: back-to-back requests do not overlap.
    events = sorted([(e, -1) for e in ends] + [(s, 1) for s in starts])
    peak = [0] * bins
    level = 0
    k = 0
    for b in range(bins):
        # Events on the bin's left edge happen at its start: applied before the peak counts.
        while k < len(events) and events[k][0] <= width * b:
            level += events[k][1]
            k += 1
        top = level
        last = b == bins - 1
        while k < len(events) and (last or events[k][0] < width * (b + 1)):
            level += events[k][1]
            top = max(top, level)
            k += 1
        peak[b] = top
    return [(width * (i + 0.5), float(p)) for i, p in enumerate(peak)]


def token_times(result: dict[str, Any], req: Requests) -> list[float]:
    """When each output token arrived (s from the run start): start + TTFT + ITL gaps."""
    ttfts, itls = result.get("ttfts"), result.get("itls")
    if not ttfts or not itls or len(ttfts) != len(req.start):
        return []
    out = []
    for s, t, gaps, good in zip(req.start, ttfts, itls, req.ok):
        if not good:
            continue
        tok = s + t
        out.append(tok)
        for g in gaps or []:
            tok += g
            out.append(tok)
    return out


def sample_rows(req: Requests, cap: int = GANTT_CAP) -> list[int]:
    """Request indices to draw, by start time: all when few; else every failure (up to half
    the cap) plus an even stride over the rest."""
    n = len(req.start)
    if n <= cap:
        chosen = list(range(n))
    else:
        failed = [i for i in range(n) if not req.ok[i]][: cap // 2]
        rest = [i for i in range(n) if req.ok[i]]
        room = cap - len(failed)
        stride = (
            [rest[round(k * (len(rest) - 1) / max(room - 1, 1))] for k in range(room)]
            if rest
            else []
        )
        chosen = sorted(set(failed) | set(stride))
    return sorted(chosen, key=lambda i: (req.start[i], i))
