"""The `bucket` prefill policy (PD mode), the Rust SMG 1.13's algorithm, for N processes.

Rust source: model_gateway/src/policies/bucket.rs. Per model, each prefill worker owns a
range of request lengths (characters of the request text). A request goes to the worker
whose range holds its length, unless the window's per-worker character loads are
imbalanced (max - min > --balance-abs-threshold AND max > min * --balance-rel-threshold),
then to the least-loaded worker. The window is the last --bucket-adjust-interval-secs of
requests; every interval the ranges are recomputed so each worker gets an equal share of
the window's characters (`Bucket.adjust_boundary`).

Across processes (one writer, many readers): every data-plane process appends what it
routed (time, length, worker row) to its own ring in shared memory (`BucketShare`: one
writer per ring, its process). The control plane alone feeds those records, in time order,
into one `Bucket` per model, adjusts the boundaries every interval and publishes them with
the window's loads in one seqlock'd slot (`BucketShare.publish`, its only writer). Every
data plane decodes the slot when its sequence moves, so every process routes with the
same boundaries; between publishes (every PUBLISH_SECS) a process adds its own routed
characters to the published loads (Rust's single process sees every request at once).

`Bucket` and `choose` are pure and tested directly; the ring and slot are plain buffers.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from smg.policies.base import LoadView, Policy, RouteRequest

log = logging.getLogger("smg.policies.bucket")

# Rust's usize::MAX: the last range's upper end, and the span the ranges cover after the
# first initialisation (1.13 sets l_max to usize::MAX once it has split 4096).
MAX = 2**64 - 1
INITIAL_L_MAX = 4096
PUBLISH_SECS = 0.5


@dataclass
class Boundary:
    url: str
    lo: int
    hi: int


@dataclass
class _Sequenced:
    chars: int
    at: float
    url: str


@dataclass
class Bucket:
    """One model's buckets: Rust's `Bucket` (the same fields, the same arithmetic)."""

    period: float  # seconds a request stays in the window (= the adjust interval)
    l_max: int = INITIAL_L_MAX
    urls: list[str] = field(default_factory=list)
    boundary: list[Boundary] = field(default_factory=list)
    chars_per_url: dict[str, int] = field(default_factory=dict)
    load_total: int = 0
    bucket_load: int = 0
    window: deque[_Sequenced] = field(default_factory=deque)

    def init_workers(self, urls: Sequence[str]) -> None:
        """Rust `init_prefill_worker_urls`: equal ranges over l_max, loads reset to 0.
        The first call splits 4096; l_max is then usize::MAX for every later call (a
        worker added or removed), as in 1.13."""
        self.urls = list(urls)
        self.chars_per_url = dict.fromkeys(self.urls, 0)
        count = len(self.urls)
        if not count:
            self.boundary = []
            return
        gap = self.l_max // count
        self.l_max = MAX
        self.boundary = [
            Boundary(url, i * gap, MAX if i == count - 1 else (i + 1) * gap - 1)
            for i, url in enumerate(self.urls)
        ]

    def add_worker(self, url: str) -> None:
        """Rust `add_prefill_url`: append and re-initialise (loads reset)."""
        if url not in self.urls:
            self.init_workers([*self.urls, url])

    def remove_worker(self, url: str) -> None:
        """Rust `remove_prefill_url`: drop and re-initialise (loads reset)."""
        self.init_workers([u for u in self.urls if u != url])

    def post_process(self, chars: int, url: str, now: float) -> None:
        """Rust `post_process_request`: count the request on `url`, expire the window."""
        self.chars_per_url[url] = self.chars_per_url.get(url, 0) + chars
        removed = 0
        window = self.window
        while window and now - window[0].at > self.period:
            old = window.popleft()
            removed += old.chars
            if old.url in self.chars_per_url:
                self.chars_per_url[old.url] = max(0, self.chars_per_url[old.url] - old.chars)
        self.load_total = max(0, self.load_total - removed)
        window.append(_Sequenced(chars, now, url))
        self.load_total += chars

    def find_boundary(self, chars: int) -> str | None:
        for b in self.boundary:  # ranges are few (one per worker) and sorted
            if b.lo <= chars <= b.hi:
                return b.url
        return None

    def _update_workers_cnt(self) -> None:
        for url in self.urls:
            self.chars_per_url.setdefault(url, 0)
        for url in [u for u in self.chars_per_url if u not in self.urls]:
            if self.chars_per_url[url] == 0:
                del self.chars_per_url[url]

    def adjust_boundary(self) -> bool:
        """Rust `adjust_boundary`: ranges carrying an equal share of the window's
        characters; unchanged while the share stayed within a factor 2. True if adjusted."""
        if not self.window:
            return False
        self._update_workers_cnt()
        count = len(self.urls)
        if not count:
            return False
        new = self.load_total // count
        old = self.bucket_load
        if new <= 2 * old and old <= 2 * new and old != 0:
            return False
        self.bucket_load = new
        hist = sorted(r.chars for r in self.window)
        out: list[Boundary] = []
        upper = 0
        last = 0
        for i, url in enumerate(self.urls):
            is_last = i == count - 1
            if last >= len(hist) and is_last:
                out.append(Boundary(url, upper, MAX))
                break
            accumulated = 0
            placed = False
            for load in hist[last:]:
                accumulated += load
                last += 1
                if accumulated >= new:
                    if is_last:
                        out.append(Boundary(url, upper, MAX))
                    elif load <= upper:
                        out.append(Boundary(url, upper, upper + new))
                        upper = upper + new + 1
                    else:
                        out.append(Boundary(url, upper, load))
                        upper = load + 1
                    placed = True
                    break
            if not placed:
                if is_last:
                    out.append(Boundary(url, upper, MAX))
                    break
                out.append(Boundary(url, upper, upper + new))
                upper = upper + new + 1
        self.boundary = out
        return True


def imbalanced(loads: Iterable[int], abs_threshold: int, rel_threshold: float) -> bool:
    """Rust's test: max - min > abs AND max > min * rel (f32 in Rust)."""
    values = list(loads)
    if not values:
        return False
    high, low = max(values), min(values)
    return high - low > abs_threshold and high > rel_threshold * low


def choose(
    boundary: Sequence[Boundary],
    loads: Mapping[str, int],
    chars: int,
    abs_threshold: int,
    rel_threshold: float,
) -> str | None:
    """The worker URL for a request of `chars` characters: the least-loaded one when the
    loads are imbalanced (the first of equals, in `loads` order), else the one whose range
    holds `chars`. None: no range holds it (the caller picks at random, as 1.13)."""
    if imbalanced(loads.values(), abs_threshold, rel_threshold):
        return min(loads, key=loads.__getitem__)
    for b in boundary:
        if b.lo <= chars <= b.hi:
            return b.url
    return None


# ---------------------------------------------------------------------------------------
# Shared memory: one record ring per data-plane slot, one published snapshot.

_RECORD = struct.Struct("<dQII")  # time, characters, row, generation
_COUNT = struct.Struct("<Q")
_SLOT_HEAD = struct.Struct("<QQ")  # sequence (odd while written), length
RING_RECORDS = 8192
_RING_BYTES = 64 + RING_RECORDS * _RECORD.size
SNAPSHOT_BYTES = 1 << 20


class Snapshot(msgspec.Struct, array_like=True):
    """What the control plane publishes: per model, [row, generation, lo, hi] ranges in
    worker order and [row, generation, chars] window loads; `models` maps a prefill row
    to its model key."""

    ranges: dict[str, list[tuple[int, int, int, int]]] = {}
    loads: dict[str, list[tuple[int, int, int]]] = {}
    models: dict[int, str] = {}


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Snapshot).decode


class BucketShare:
    """The rings (one writer each: its data-plane slot) and the snapshot slot (one
    writer: the control plane) in one anonymous shared mapping made before the forks."""

    def __init__(self, buf: mmap.mmap | bytearray, slots: int) -> None:
        self.buf = buf
        self.slots = slots
        self.snapshot_at = slots * _RING_BYTES

    @classmethod
    def create(cls, slots: int) -> BucketShare:
        return cls(mmap.mmap(-1, slots * _RING_BYTES + SNAPSHOT_BYTES), slots)

    # --- rings ------------------------------------------------------------------------------

    def append(self, slot: int, at: float, chars: int, row: int, generation: int) -> None:
        """Record one routed request (the slot's own process only)."""
        base = slot * _RING_BYTES
        (count,) = _COUNT.unpack_from(self.buf, base)
        _RECORD.pack_into(
            self.buf, base + 64 + (count % RING_RECORDS) * _RECORD.size, at, chars, row, generation
        )
        _COUNT.pack_into(self.buf, base, count + 1)  # after the record: readers see it whole

    def read(self, slot: int, since: int) -> tuple[int, list[tuple[float, int, int, int]]]:
        """(new count, records appended since count `since`); records the writer lapped
        before they were read are lost (at most RING_RECORDS per slot per read)."""
        base = slot * _RING_BYTES
        (count,) = _COUNT.unpack_from(self.buf, base)
        if count < since:  # a new process in the slot starts its count afresh
            since = 0
        start = max(since, count - RING_RECORDS)
        records = [
            _RECORD.unpack_from(self.buf, base + 64 + (i % RING_RECORDS) * _RECORD.size)
            for i in range(start, count)
        ]
        (after,) = _COUNT.unpack_from(self.buf, base)
        lapped = after - RING_RECORDS - start  # overwritten while we copied
        if lapped > 0:
            records = records[lapped:]
        return count, records

    # --- snapshot ---------------------------------------------------------------------------

    def publish(self, snapshot: Snapshot) -> bool:
        blob = _encode(snapshot)
        if len(blob) > SNAPSHOT_BYTES - _SLOT_HEAD.size:
            return False
        at = self.snapshot_at
        seq, _ = _SLOT_HEAD.unpack_from(self.buf, at)
        _SLOT_HEAD.pack_into(self.buf, at, seq + 1, 0)  # odd: being written
        self.buf[at + 16 : at + 16 + len(blob)] = blob
        _SLOT_HEAD.pack_into(self.buf, at, seq + 2, len(blob))
        return True

    def sequence(self) -> int:
        return _SLOT_HEAD.unpack_from(self.buf, self.snapshot_at)[0]

    def snapshot(self) -> tuple[int, Snapshot] | None:
        """(sequence, snapshot), or None while it is being written or was never written."""
        at = self.snapshot_at
        seq, length = _SLOT_HEAD.unpack_from(self.buf, at)
        if seq == 0 or seq & 1:
            return None
        blob = bytes(self.buf[at + 16 : at + 16 + length])
        if _SLOT_HEAD.unpack_from(self.buf, at)[0] != seq:
            return None
        return seq, _decode(blob)


# ---------------------------------------------------------------------------------------
# The data-plane side: a Policy.


class BucketPolicy(Policy):
    name = "bucket"
    needs_text = True  # 1.13: needs_request_text

    def __init__(
        self,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.0001,
        rng: random.Random | None = None,
    ) -> None:
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold
        self.rng = rng or random.Random()
        self.share: BucketShare | None = None
        self.shared: object = None  # SharedRouting: its `slot` is this process's ring
        self.seq = -1
        self.snap = Snapshot()
        self.urls: dict[int, tuple[int, str]] = {}
        self.local: dict[int, int] = {}  # row -> characters routed since the snapshot

    def use_shared(self, shared: object) -> None:
        share = getattr(shared, "bucket", None)
        if share is not None:
            self.share = share
            self.shared = shared

    def on_directory(self, workers: dict[int, tuple[int, str]]) -> None:
        self.urls = dict(workers)

    def _refresh(self) -> None:
        share = self.share
        if share is None or share.sequence() == self.seq:
            return
        got = share.snapshot()
        if got is not None:
            self.seq, self.snap = got
            self.local = {}

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        self._refresh()
        snap = self.snap
        chars = len(request.text or "")
        model = snap.models.get(rows[0]) if rows else None
        ranges = snap.ranges.get(model) if model is not None else None
        chosen: int | None = None
        if ranges is not None:
            urls = self.urls  # a range or load of a replaced worker (old generation) is dropped
            boundary = [
                Boundary(str(row), lo, hi)
                for row, gen, lo, hi in ranges
                if urls.get(row, (None,))[0] == gen
            ]
            loads = {
                str(row): routed + self.local.get(row, 0)
                for row, gen, routed in snap.loads.get(model, ())
                if urls.get(row, (None,))[0] == gen
            }
            picked = choose(boundary, loads, chars, self.abs_threshold, self.rel_threshold)
            # 1.13 may pick a worker that is not routable now; smg picks among `rows`.
            if picked is not None and int(picked) in rows:
                chosen = int(picked)
        if chosen is None:
            chosen = rows[self.rng.randrange(len(rows))]
        self.local[chosen] = self.local.get(chosen, 0) + chars
        if self.share is not None:
            generation = self.urls.get(chosen, (0, ""))[0]
            slot = int(getattr(self.shared, "slot", 0))
            self.share.append(slot, time.time(), chars, chosen, generation)
        return chosen


# ---------------------------------------------------------------------------------------
# The control-plane side: the one writer of the boundaries.


@dataclass(frozen=True)
class PrefillWorker:
    row: int
    generation: int
    url: str
    model: str


class BucketAdjuster:
    """Feeds the data planes' records into one Bucket per model, adjusts every `period`
    seconds, publishes after every tick. Run by the control plane only."""

    def __init__(self, share: BucketShare, period: float) -> None:
        self.share = share
        self.period = period
        self.buckets: dict[str, Bucket] = {}
        self.seen = [0] * share.slots
        self.next_adjust: float | None = None

    def ranges(self) -> list[tuple[str, str, int, int]]:
        """(model, worker URL, lo, hi) of every bucket now, for /metrics."""
        return [
            (model, b.url, b.lo, b.hi)
            for model, bucket in self.buckets.items()
            for b in bucket.boundary
        ]

    def _membership(self, workers: Sequence[PrefillWorker]) -> None:
        by_model: dict[str, list[str]] = {}
        for worker in workers:
            by_model.setdefault(worker.model, []).append(worker.url)
        for model in [m for m in self.buckets if m not in by_model]:
            del self.buckets[model]
        for model, urls in by_model.items():
            bucket = self.buckets.get(model)
            if bucket is None:
                bucket = self.buckets[model] = Bucket(self.period)
                bucket.init_workers(urls)
                continue
            for url in [u for u in bucket.urls if u not in urls]:
                bucket.remove_worker(url)
            for url in urls:
                bucket.add_worker(url)

    def tick(self, now: float, workers: Sequence[PrefillWorker]) -> Snapshot:
        """One round: membership, new records in time order, the interval's adjustment,
        then the snapshot (returned and published)."""
        self._membership(workers)
        by_row = {(w.row, w.generation): w for w in workers}
        records: list[tuple[float, int, int, int]] = []
        for slot in range(self.share.slots):
            self.seen[slot], got = self.share.read(slot, self.seen[slot])
            records.extend(got)
        records.sort()
        for at, chars, row, generation in records:
            worker = by_row.get((row, generation))
            if worker is not None:
                self.buckets[worker.model].post_process(chars, worker.url, at)
        if self.next_adjust is None:
            self.next_adjust = now + self.period
        elif now >= self.next_adjust:
            for bucket in self.buckets.values():
                bucket.adjust_boundary()
            self.next_adjust = now + self.period
        snapshot = self._snapshot(workers)
        self.share.publish(snapshot)
        return snapshot

    def _snapshot(self, workers: Sequence[PrefillWorker]) -> Snapshot:
        by_url = {(w.model, w.url): w for w in workers}
        ranges: dict[str, list[tuple[int, int, int, int]]] = {}
        loads: dict[str, list[tuple[int, int, int]]] = {}
        for model, bucket in self.buckets.items():
            ranges[model] = [
                (w.row, w.generation, b.lo, b.hi)
                for b in bucket.boundary
                if (w := by_url.get((model, b.url))) is not None
            ]
            loads[model] = [
                (w.row, w.generation, chars)
                for url, chars in bucket.chars_per_url.items()
                if (w := by_url.get((model, url))) is not None
            ]
        return Snapshot(ranges, loads, {w.row: w.model for w in workers})


async def run_adjuster(
    adjuster: BucketAdjuster,
    workers: Callable[[], Sequence[PrefillWorker]],
    started: Callable[[], bool] = lambda: True,
) -> None:
    """The control plane's task: a tick every PUBLISH_SECS (loads), adjustments every
    `adjuster.period` (--bucket-adjust-interval-secs). The first tick waits for `started`
    (the start-up workers' first health round): 1.13 splits the ranges over the prefill
    workers it starts with, later ones join through add (its other split)."""
    while True:
        if started():
            try:
                adjuster.tick(time.time(), workers())
            except Exception:  # a bad round must not end the task: the next one starts afresh
                log.exception("bucket policy: adjustment round failed")
        await asyncio.sleep(min(PUBLISH_SECS, adjuster.period))
