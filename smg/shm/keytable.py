"""The shared sticky-key table: routing-key hash -> pinned worker, seen by every process.

Single-writer rule: the table has one region per data-plane slot; a process writes only
its own region and reads all of them. A key pinned by one process is found by the others
(they probe every region) and adopted: they copy the pin into their own region, so each
process keeps its own last-used stamp and the pin lives as long as any process uses it.

Each region is an open-addressed table (linear probing over a bounded window) of
fixed-size entries of five u64 words:

    key     xxh3-64 of the routing key, never 0 (0 marks an empty slot)
    worker  row << 32 | (row generation & 0xffffffff): the pinned worker
    epoch   how many times the key was re-pinned (failover)
    pinned  CLOCK_MONOTONIC ns when this pin was made (same clock in every process)
    used    CLOCK_MONOTONIC ns of the owner's last use

Which pin wins when regions disagree (two processes pinned a new key at once, or one
failed it over): the highest epoch, then the earliest `pinned` stamp, then the lowest
region. Every process applies the same rule to the same words, so all converge on one
worker. Entries idle for longer than max_idle are ignored by readers and reused by
their writer (that is the eviction: no sweeper, no cross-process deletes).

Writes are plain aligned 8-byte stores. An insert writes the key word last, so a reader
never sees a key with another key's pin; a reader racing an in-place re-pin may read
one torn entry (new worker, old epoch), which misroutes at most one request.

Pure code over a buffer (an anonymous shared mmap in production, a bytearray in tests).
"""

from __future__ import annotations

import mmap
from typing import NamedTuple

import xxhash

WORDS = 5  # per entry
ENTRY_SIZE = WORDS * 8
PROBE = 16  # longest probe window; a full window evicts its least recently used entry
DEFAULT_CAPACITY = 16384  # entries per region (640 KiB)

_KEY, _WORKER, _EPOCH, _PINNED, _USED = range(WORDS)


class Pin(NamedTuple):
    row: int
    generation: int  # the low 32 bits of the row's generation
    epoch: int
    pinned: int  # ns
    region: int


def key_hash(key: str) -> int:
    """The table's key for a routing key: stable across processes and restarts."""
    return xxhash.xxh3_64_intdigest(key.encode("utf-8", "surrogatepass")) or 1


def pack_worker(row: int, generation: int) -> int:
    return (row << 32) | (generation & 0xFFFFFFFF)


def wins(a: Pin, b: Pin) -> bool:
    """Whether pin `a` beats pin `b` (the rule every process applies)."""
    if a.epoch != b.epoch:
        return a.epoch > b.epoch
    if a.pinned != b.pinned:
        return a.pinned < b.pinned
    return a.region < b.region


class KeyTable:
    def __init__(self, buf: mmap.mmap | bytearray, regions: int) -> None:
        if regions < 1:
            raise ValueError("a key table needs at least one region")
        self.buf = buf
        self.regions = regions
        capacity = len(buf) // (ENTRY_SIZE * regions)
        if capacity < PROBE or capacity & (capacity - 1):
            raise ValueError(f"capacity per region must be a power of two >= {PROBE}")
        self.capacity = capacity
        self.mask = capacity - 1
        self.words = memoryview(buf).cast("Q")
        self.region_words = capacity * WORDS
        self.bases = tuple(region * self.region_words for region in range(regions))

    @staticmethod
    def size(regions: int, capacity: int = DEFAULT_CAPACITY) -> int:
        return regions * capacity * ENTRY_SIZE

    @classmethod
    def create(cls, regions: int, capacity: int = DEFAULT_CAPACITY) -> KeyTable:
        # MAP_SHARED | MAP_ANONYMOUS: inherited by every child forked after this.
        return cls(mmap.mmap(-1, cls.size(regions, capacity)), regions)

    @classmethod
    def local(cls, regions: int = 1, capacity: int = 1024) -> KeyTable:
        """A private table (tests, or a policy built without shared memory)."""
        return cls(bytearray(cls.size(regions, capacity)), regions)

    def _base(self, region: int) -> int:
        return region * self.region_words

    def lookup(self, key: int, now: int, max_idle: int) -> Pin | None:
        """The winning live pin of `key` over all regions, or None."""
        words = self.words
        mask = self.mask
        start = key & mask
        best_at = -1
        best_region = 0
        best_epoch = best_pinned = 0
        # Written for speed: this runs on every request that carries a routing key.
        for region, base in enumerate(self.bases):
            slot = start
            for _ in range(PROBE):
                at = base + slot * WORDS
                found = words[at]
                if found == key:
                    if now - words[at + _USED] <= max_idle:
                        epoch = words[at + _EPOCH]
                        pinned = words[at + _PINNED]
                        if (
                            best_at < 0
                            or epoch > best_epoch
                            or (epoch == best_epoch and pinned < best_pinned)
                        ):
                            best_at, best_region = at, region
                            best_epoch, best_pinned = epoch, pinned
                    break
                if found == 0:
                    break  # an insert fills the first empty slot: the key is not further on
                slot = (slot + 1) & mask
        if best_at < 0:
            return None
        worker = words[best_at + _WORKER]
        return Pin(worker >> 32, worker & 0xFFFFFFFF, best_epoch, best_pinned, best_region)

    def put(
        self,
        region: int,
        key: int,
        row: int,
        generation: int,
        epoch: int,
        pinned: int,
        now: int,
        max_idle: int,
    ) -> None:
        """Store (or refresh) `key`'s pin in `region` (the caller's own)."""
        words = self.words
        base = self._base(region)
        start = key & self.mask
        free = -1
        oldest = -1
        oldest_used = 0
        for i in range(PROBE):
            at = base + ((start + i) & self.mask) * WORDS
            found = words[at]
            if found == key:
                words[at + _WORKER] = pack_worker(row, generation)
                words[at + _EPOCH] = epoch
                words[at + _PINNED] = pinned
                words[at + _USED] = now
                return
            if found == 0:
                if free < 0:
                    free = at
                break
            used = words[at + _USED]
            if free < 0 and now - used > max_idle:
                free = at  # an idle entry: evicted by reuse
            if oldest < 0 or used < oldest_used:
                oldest, oldest_used = at, used
        at = free if free >= 0 else oldest
        if words[at] != 0:
            words[at] = 0  # readers skip the slot while it is rewritten
        words[at + _WORKER] = pack_worker(row, generation)
        words[at + _EPOCH] = epoch
        words[at + _PINNED] = pinned
        words[at + _USED] = now
        words[at] = key

    def touch(self, region: int, key: int, now: int) -> bool:
        """Refresh `key`'s last use in `region`; False if the region has no such entry."""
        words = self.words
        base = self._base(region)
        start = key & self.mask
        for i in range(PROBE):
            at = base + ((start + i) & self.mask) * WORDS
            found = words[at]
            if found == key:
                words[at + _USED] = now
                return True
            if found == 0:
                return False
        return False

    def live_entries(self, region: int, now: int, max_idle: int) -> int:
        """How many live keys `region` holds (metrics, tests)."""
        words = self.words
        base = self._base(region)
        count = 0
        for slot in range(self.capacity):
            at = base + slot * WORDS
            if words[at] != 0 and now - words[at + _USED] <= max_idle:
                count += 1
        return count
