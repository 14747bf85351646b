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
holds the ranked sample, so it is within half a bucket (about ±3 %) of the exact value.

Pure code over a buffer: a bytearray works as well as the mmap (tests use both).
"""

from __future__ import annotations

import math
import mmap
import os
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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

# Word offsets inside a slot.
PID = 0
START_NS = 1  # the run's start (perf_counter ns, one clock for every process)
CPU0_NS = 2  # process CPU time at the start
CPU_NS = 3  # process CPU time at the last tick
TICK_NS = 4  # perf_counter ns of the last tick
SUBMITTED = 5  # due (handed to the engine)
STARTED = 6  # sent (or connecting): holds a concurrency slot
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
    """The value a bucket stands for: its geometric middle (the edge for the open ends)."""
    if index <= 0:
        return EDGES[0]
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
    """One client process's writer. Called from the engine's hot path: kept to a few
    indexed increments per request, plus one per ITL gap."""

    __slots__ = ("base", "cause", "e2el", "itl", "lag", "ttft", "w")

    def __init__(self, words: memoryview, base: int) -> None:
        self.w = words
        self.base = base
        self.ttft = base + _HIST_BASE["ttft"]
        self.itl = base + _HIST_BASE["itl"]
        self.e2el = base + _HIST_BASE["e2el"]
        self.lag = base + _HIST_BASE["lag"]
        self.cause = base + CAUSE0

    def begin(self, start: float) -> None:
        w, b = self.w, self.base
        w[b + PID] = os.getpid()
        w[b + CPU0_NS] = w[b + CPU_NS] = time.process_time_ns()
        w[b + TICK_NS] = time.perf_counter_ns()
        w[b + START_NS] = int(start * 1e9)

    def tick(self) -> None:
        w, b = self.w, self.base
        w[b + CPU_NS] = time.process_time_ns()
        w[b + TICK_NS] = time.perf_counter_ns()

    def submitted(self) -> None:
        self.w[self.base + SUBMITTED] += 1

    def started(self) -> None:
        self.w[self.base + STARTED] += 1

    def record(
        self,
        success: bool,
        error: str | None,
        lag: float,
        ttft: float | None,
        e2el: float,
        itl: Sequence[float],
        tokens: int,
    ) -> None:
        w, b = self.w, self.base
        w[self.lag + bisect_right(EDGES, lag)] += 1
        if not success:
            w[b + FAILED] += 1
            w[self.cause + cause_index(error)] += 1
            return
        w[b + OK] += 1
        w[b + OUT_TOKENS] += tokens
        if ttft is not None:
            w[self.ttft + bisect_right(EDGES, ttft)] += 1
        w[self.e2el + bisect_right(EDGES, e2el)] += 1
        base = self.itl
        for gap in itl:
            w[base + bisect_right(EDGES, gap)] += 1


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
    submitted: int = 0
    started: int = 0
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
    def in_flight(self) -> int:
        return self.started - self.done

    @property
    def queued(self) -> int:
        return self.submitted - self.started

    @property
    def elapsed(self) -> float:
        return max(0.0, self.now - self.start) if self.start else 0.0


def snapshot(rows: list[list[int]], now: float) -> Snapshot:
    """Sums slot words (from Board.read) into one view."""
    starts = [r[START_NS] for r in rows if r[START_NS]]
    snap = Snapshot(now=now, start=max(starts) / 1e9 if starts else 0.0)
    for r in rows:
        snap.submitted += r[SUBMITTED]
        snap.started += r[STARTED]
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
        snap.hists[name] = [sum(col) for col in zip(*(r[lo : lo + NBUCKETS] for r in rows))] or [
            0
        ] * NBUCKETS
    return snap


def hist_percentile(counts: Sequence[int], p: float) -> float | None:
    """The p-th percentile (0..100) of a bucket histogram: the value of the bucket holding
    the sample of rank p/100 * (n - 1) rounded half up (0-based, ascending); None when empty."""
    n = sum(counts)
    if n == 0:
        return None
    rank = int(p / 100.0 * (n - 1) + 0.5)
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen > rank:
            return bucket_value(i)
    return bucket_value(len(counts) - 1)  # pragma: no cover - unreachable: seen reaches n
