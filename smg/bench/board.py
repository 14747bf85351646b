"""Shared live counters for `smg bench`'s display: one slot per client process.

The board is an array of u64 words in an anonymous shared mmap, made by the parent
before it forks the client processes, so every child writes its own slot and the parent
reads them all (single writer per slot: no locks, no atomics; an aligned 8-byte store is
never torn on the machines smg runs on, and a count read a moment stale is fine for a
display). In-process runs use the same board with one slot.

Each slot holds counters, failures by cause, the process's CPU clock, and four
histograms (TTFT, ITL, E2E latency, send lag) over fixed log-spaced buckets:
BUCKETS_PER_DECADE per factor of ten from LO_S to HI_S seconds, plus an underflow and an
overflow bucket. A percentile read from it is the geometric middle of the bucket that
holds the ranked sample, so it is within half a bucket (about ±3 %) of the exact value. Above SAMPLE_CAP requests
(or ITL gaps) per tick the histograms take a random sample of them, weighted; the counters
are exact.

Nothing is counted per request on the client's hot path: each process bins what
finished since its last tick in bulk, a few times a second, into a private copy of its
slot and publishes it with one slice write (see Slot).

Pure code over a buffer: a bytearray works as well as the mmap.
"""

from __future__ import annotations

import math
import mmap
import os
import random
import time
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smg.bench.runner import Outcome

# Failure causes shown live, in order; http_<status> folds into its class and anything
# not listed into "other" (the result file keeps every cause exactly).
CAUSES = (
    "timeout",
    "connect_error",
    "connection_reset",
    "connection_closed",
    "bad_http_response",
    "invalid_json",
    "stream_error",
    "no_content",
    "http_429",
    "http_4xx",
    "http_5xx",
    "other",
)
_CAUSE_INDEX = {c: i for i, c in enumerate(CAUSES)}

LO_S = 1e-6
HI_S = 1e4
BUCKETS_PER_DECADE = 40
_DECADES = round(math.log10(HI_S / LO_S))
# EDGES[i] is the lower edge of bucket i + 1; bucket 0 is < LO_S, the last is >= HI_S.
EDGES = tuple(
    LO_S * 10 ** (i / BUCKETS_PER_DECADE) for i in range(_DECADES * BUCKETS_PER_DECADE + 1)
)
NBUCKETS = len(EDGES) + 1

HISTS = ("ttft", "itl", "e2el", "lag")
SAMPLE_CAP = 512  # values binned per histogram per tick; more are sampled down to it
_rng = random.Random(0)

# Word offsets inside a slot.
PID = 0
START_NS = 1  # the run's start (perf_counter ns, one clock for every process)
CPU0_NS = 2  # process CPU time at the start
CPU_NS = 3  # process CPU time at the last tick
TICK_NS = 4  # perf_counter ns of the last tick
IN_FLIGHT = 5  # sent (or connecting): holding a concurrency slot
QUEUED = 6  # due, waiting for a concurrency slot
OK = 7
FAILED = 8
OUT_TOKENS = 9
CAUSE0 = 10
HIST0 = CAUSE0 + len(CAUSES)
SLOT_WORDS = HIST0 + len(HISTS) * NBUCKETS
_HIST_BASE = {name: HIST0 + k * NBUCKETS for k, name in enumerate(HISTS)}


def bucket_of(seconds: float) -> int:
    return bisect_right(EDGES, seconds)


def bucket_value(index: int) -> float:
    """The value a bucket stands for: its geometric middle; 0 below LO_S (gaps of tokens
    that came in one read, or a negative send lag), HI_S above the top."""
    if index <= 0:
        return 0.0
    if index >= len(EDGES):
        return EDGES[-1]
    return math.sqrt(EDGES[index - 1] * EDGES[index])


def cause_index(error: str | None) -> int:
    name = error or "other"
    idx = _CAUSE_INDEX.get(name)
    if idx is not None:
        return idx
    if name.startswith("http_4"):
        return _CAUSE_INDEX["http_4xx"]
    if name.startswith("http_5"):
        return _CAUSE_INDEX["http_5xx"]
    return _CAUSE_INDEX["other"]


class Board:
    """`slots` slots of SLOT_WORDS u64 words over `buf` (an anonymous shared mmap by default)."""

    def __init__(self, slots: int, buf: Any = None) -> None:
        size = max(1, slots) * SLOT_WORDS * 8
        if buf is None:
            buf = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: survives fork, shared
        self.buf = buf
        self.slots = max(1, slots)
        self.words = memoryview(buf).cast("B").cast("Q")

    def slot(self, k: int) -> Slot:
        return Slot(self.words, k * SLOT_WORDS)

    def read(self) -> list[list[int]]:
        """Each slot's words, copied."""
        w = self.words
        return [w[k * SLOT_WORDS : (k + 1) * SLOT_WORDS].tolist() for k in range(self.slots)]


class Slot:
    """One client process's writer. Nothing here runs per request: the process's ticker
    (runner._Ticker, every TICK_S) hands over the outcomes finished since its last call,
    which are binned in bulk (C-level map/bisect/Counter) into a private copy of the slot,
    then the copy is published to the shared words in one slice write."""

    __slots__ = ("base", "local", "seen", "w")

    def __init__(self, words: memoryview, base: int) -> None:
        self.w = words
        self.base = base
        self.local = [0] * SLOT_WORDS
        self.seen = 0  # outcomes already absorbed

    def begin(self, start: float) -> None:
        loc = self.local
        loc[PID] = os.getpid()
        loc[CPU0_NS] = loc[CPU_NS] = time.process_time_ns()
        loc[TICK_NS] = time.perf_counter_ns()
        loc[START_NS] = int(start * 1e9)
        self.publish()

    def absorb(self, outcomes: Sequence[Outcome], in_flight: int, queued: int) -> None:
        """Bins outcomes[self.seen:] (a list that only grows) and notes the live counts."""
        new = outcomes[self.seen :]
        self.seen = len(outcomes)
        loc = self.local
        loc[IN_FLIGHT] = in_flight
        loc[QUEUED] = queued
        loc[CPU_NS] = time.process_time_ns()
        loc[TICK_NS] = time.perf_counter_ns()
        if not new:
            return
        ok = [o for o in new if o.success]
        loc[OK] += len(ok)
        if len(ok) < len(new):
            loc[FAILED] += len(new) - len(ok)
            for o in new:
                if not o.success:
                    loc[CAUSE0 + cause_index(o.error)] += 1
        loc[OUT_TOKENS] += sum(
            [o.usage_out if o.usage_out is not None else o.tokens_seen for o in ok]
        )
        # The histograms take at most SAMPLE_CAP outcomes a tick (a uniform random
        # sample, each standing for len/cap), so their cost is bounded at any rate.
        weight = 1.0
        if len(new) > SAMPLE_CAP:
            weight = len(new) / SAMPLE_CAP
            new = _rng.sample(new, SAMPLE_CAP)
            ok = [o for o in new if o.success]
        _bin(loc, _HIST_BASE["lag"], [o.t_send - o.t_eligible for o in new], weight)
        _bin(loc, _HIST_BASE["e2el"], [o.t_done - o.t_send for o in ok], weight)
        ttft = [o.t_first - o.t_send for o in ok if o.t_first is not None]
        _bin(loc, _HIST_BASE["ttft"], ttft, weight)
        _bin(loc, _HIST_BASE["itl"], list(chain.from_iterable([o.itl for o in ok])), weight)

    def publish(self) -> None:
        self.w[self.base : self.base + SLOT_WORDS] = array("Q", self.local)


def _bin(counts: list[int], base: int, values: list[float], weight: float) -> None:
    """Adds values, each standing for `weight`, to a histogram; above SAMPLE_CAP values
    (the ITL gaps of many tokens) a random sample of SAMPLE_CAP stands for them. A bucket
    lookup costs ~0.2 us: 16-token requests at 4,000/s unsampled would take ~5 % of a core."""
    if len(values) > SAMPLE_CAP:
        weight *= len(values) / SAMPLE_CAP
        values = _rng.sample(values, SAMPLE_CAP)
    for bucket, n in Counter(map(bisect_right, repeat(EDGES), values)).items():
        counts[base + bucket] += round(n * weight)


# -- reading -----------------------------------------------------------------------


@dataclass
class ProcView:
    pid: int
    cpu_ns: int  # CPU used since the start
    wall_ns: int  # perf_counter ns from the start to the last tick


@dataclass
class Snapshot:
    """The board summed over slots at one moment (`now`, perf_counter seconds)."""

    now: float
    start: float  # 0.0 while no process has started the clock
    in_flight: int = 0
    queued: int = 0
    ok: int = 0
    failed: int = 0
    out_tokens: int = 0
    causes: dict[str, int] = field(default_factory=dict)
    hists: dict[str, list[int]] = field(default_factory=dict)
    procs: list[ProcView] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return max(0.0, self.now - self.start) if self.start else 0.0


def snapshot(rows: list[list[int]], now: float) -> Snapshot:
    """Sums slot words (from Board.read) into one view."""
    starts = [r[START_NS] for r in rows if r[START_NS]]
    snap = Snapshot(now=now, start=max(starts) / 1e9 if starts else 0.0)
    for r in rows:
        snap.in_flight += r[IN_FLIGHT]
        snap.queued += r[QUEUED]
        snap.ok += r[OK]
        snap.failed += r[FAILED]
        snap.out_tokens += r[OUT_TOKENS]
        if r[START_NS]:
            snap.procs.append(
                ProcView(r[PID], r[CPU_NS] - r[CPU0_NS], max(0, r[TICK_NS] - r[START_NS]))
            )
    for i, cause in enumerate(CAUSES):
        n = sum(r[CAUSE0 + i] for r in rows)
        if n:
            snap.causes[cause] = n
    for name in HISTS:
        lo = _HIST_BASE[name]
        parts = [r[lo : lo + NBUCKETS] for r in rows]
        snap.hists[name] = parts[0] if len(parts) == 1 else [sum(col) for col in zip(*parts)]
    return snap


def hist_percentile(counts: Sequence[int], p: float) -> float | None:
    """The p-th percentile (0..100) of a bucket histogram: the value of the bucket holding
    the sample of rank p/100 * (n - 1) rounded half up (0-based, ascending); None when
    empty."""
    cum = list(accumulate(counts))
    n = cum[-1] if cum else 0
    if n == 0:
        return None
    rank = int(p / 100.0 * (n - 1) + 0.5)
    return bucket_value(bisect_right(cum, rank))
