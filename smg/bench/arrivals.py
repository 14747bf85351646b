"""Request arrival schedules (pure): offsets in seconds from the start of the run.

Same model as `vllm bench serve`: with a finite rate the gaps between arrivals are
gamma distributed with shape = burstiness and scale = 1 / (rate * burstiness), so the
mean gap is 1/rate for any burstiness; burstiness 1 is a Poisson process (exponential
gaps), < 1 is burstier, > 1 smoother, inf is evenly spaced. Without ramp-up the
cumulative offsets are rescaled so the last arrival lands exactly at N / rate, which
removes the 1-2 % seed-to-seed spread of the total offered load.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

INF = math.inf


def gamma_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """n raw inter-arrival gaps (seconds) for a constant rate; no rescaling."""
    _check(rate, burstiness)
    if rate == INF:
        return [0.0] * n
    if burstiness == INF:
        return [1.0 / rate] * n
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(n)]


def ramp_rate(strategy: str, start_rps: float, end_rps: float, index: int, total: int) -> float:
    """Instantaneous rate for request `index` of `total` under a linear/exponential ramp."""
    progress = index / max(total - 1, 1)
    if strategy == "linear":
        return start_rps + (end_rps - start_rps) * progress
    if strategy == "exponential":
        if start_rps <= 0:
            raise ValueError("exponential ramp-up needs a start rate > 0")
        return start_rps * (end_rps / start_rps) ** progress
    raise ValueError(f"unknown ramp-up strategy {strategy!r}")


def schedule(
    n: int,
    rate: float,
    burstiness: float = 1.0,
    seed: int = 0,
    ramp: tuple[str, float, float] | None = None,
) -> tuple[list[float], list[float]]:
    """Arrival offsets and the rate in force at each arrival.

    `ramp` is (strategy, start_rps, end_rps); it replaces `rate`. The first request is
    sent after its own gap, as in vllm (so offsets[0] > 0 for finite rates).
    """
    rng = random.Random(seed)
    rates: list[float] = []
    gaps: list[float] = []
    for i in range(n):
        r = ramp_rate(ramp[0], ramp[1], ramp[2], i, n) if ramp else rate
        _check(r, burstiness)
        rates.append(r)
        if r == INF:
            gaps.append(0.0)
        elif burstiness == INF:
            gaps.append(1.0 / r)
        else:
            gaps.append(rng.gammavariate(burstiness, 1.0 / (r * burstiness)))
    offsets = _cumsum(gaps)
    if ramp is None and offsets and offsets[-1] > 0 and rate != INF:
        factor = (n / rate) / offsets[-1]
        offsets = [o * factor for o in offsets]
    return offsets, rates


def trace_offsets(timestamps: Sequence[float], multiplier: float = 1.0) -> list[float]:
    """Offsets from a trace's own timestamps, relative to its earliest one, in seconds."""
    if not timestamps:
        return []
    first = min(timestamps)
    return [(t - first) * multiplier for t in timestamps]


def _cumsum(values: Sequence[float]) -> list[float]:
    out: list[float] = []
    total = 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def _check(rate: float, burstiness: float) -> None:
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
