"""The shared prefix index of `cache_aware`: which worker each prompt prefix was sent to.

Every data-plane process routes, so what one process learns about a prefix must steer
the others. Shape (single-writer rule of smg.shm): one anonymous shared mapping, created
by the supervisor before any fork, cut into one *region* per process slot. A process
writes only its own region; a lookup probes every region. Nothing is locked.

Keys are chained block hashes of the prompt: the UTF-8 prompt is cut into blocks
(``boundaries``: 64-byte blocks, growing to a quarter of the prefix, at most 512 bytes
from 2 KB on; the last block ends at the prompt's end) and
``h_k = xxh3_64(block_k, seed=h_{k-1})``, ``h_0 = xxh3_64(model)``. So ``h_k`` names the whole prefix up to block
k of that model (stable across processes and restarts: xxhash, never ``hash()``). A
request's longest known prefix is found by binary search over its chain: every routed
request inserts its whole chain, so a hit at block k implies the prefix up to k was seen
(eviction can break that implication for a moment; the result is then a shorter match,
never a wrong owner). Token ids (gRPC) plug in by hashing blocks of their bytes instead.

A region is an array of buckets; a bucket holds ``WAYS`` entries: ``WAYS`` key words, then
``WAYS`` value words. A value packs the worker row, the low bits of the row's generation
(a replaced or removed worker never matches) and the last-used time (coarse monotonic
ticks, shared by every process on the host). An entry is found by scanning its bucket,
so clearing one never breaks a probe chain; inserting into a full bucket replaces the
bucket's least recently used entry (that is what happens when the index is full: the
oldest prefixes are forgotten first, insertion never fails). A periodic sweep
(``evict_step``) clears entries unused for longer than ``ttl`` and entries of stale rows.

Torn reads: a writer stores the value before the key of a new entry (x86-64 keeps stores
in order), and a reader re-reads the key after the value; a slot recycled under a reader
is then seen as a miss. Each word is one aligned 8-byte load or store.
"""

from __future__ import annotations

import mmap
import time
from bisect import bisect_left
from collections.abc import Callable

import xxhash

FIRST_BLOCK = 64  # bytes of the first block, and the smallest block
BLOCK = 512  # the largest block (from 2 KB on)
WAYS = 8  # entries per bucket
BUCKET_WORDS = 2 * WAYS
MIN_ENTRIES = 1024
MAX_ENTRIES = 1 << 20  # per region: 16 MiB of address space, touched as used
TICKS_PER_SEC = 16  # last-used resolution

ROW_BITS = 20
GEN_BITS = 12
ROW_MASK = (1 << ROW_BITS) - 1
GEN_MASK = (1 << GEN_BITS) - 1
TIME_SHIFT = ROW_BITS + GEN_BITS

_hash = xxhash.xxh3_64_intdigest


def entries_for(max_tree_size: int, block: int = BLOCK) -> int:
    """Entries of one region for --max-tree-size characters: one entry per block."""
    want = max(MIN_ENTRIES, min(MAX_ENTRIES, max_tree_size // block))
    buckets = 1
    while buckets * WAYS < want:
        buckets *= 2
    return buckets * WAYS


def now_ticks() -> int:
    return int(time.monotonic() * TICKS_PER_SEC) & 0xFFFFFFFF


def boundaries(n: int) -> list[int]:
    """Block ends for an `n`-byte prompt, then `n` itself (a short last block, so a repeated
    prompt matches whole). Each block is a quarter of the prefix before it, at least
    FIRST_BLOCK and at most BLOCK bytes: a match is then never more than ~25% (and never
    more than BLOCK bytes) shorter than the true common prefix, so the match rate stays
    close to the per-character rate Rust computes, with 26 hashes for 8 KB."""
    # The ends below _STEADY never change and from _STEADY on every block is BLOCK bytes:
    # slicing a precomputed head is ~4x cheaper than the loop (a third of chain()'s cost).
    head = _HEAD
    ends = head[: bisect_left(head, n)] if n <= _STEADY else [*head, *range(_STEADY, n, BLOCK)]
    ends.append(n)
    return ends


def _head() -> tuple[list[int], int]:
    """The block ends before blocks reach BLOCK bytes, and the first end after them."""
    ends: list[int] = []
    end = FIRST_BLOCK
    while end >> 2 < BLOCK:
        ends.append(end)
        end += max(end >> 2, FIRST_BLOCK)
    return ends, end


_HEAD, _STEADY = _head()


def chain(text: str | bytes, model: str | None) -> tuple[list[int], list[int]]:
    """(hashes, prefix lengths in bytes) of `text`'s blocks; key 0 is reserved for empty."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    seed = _hash(model.encode("utf-8", "surrogatepass")) if model else 0
    hashes: list[int] = []
    append = hashes.append
    start = 0
    ends = boundaries(len(data)) if data else []
    for end in ends:
        seed = _hash(data[start:end], seed) or 1
        append(seed)
        start = end
    return hashes, ends


class PrefixIndex:
    """Per-process regions of block-chain hash -> (worker row, generation, last used)."""

    def __init__(self, buf: mmap.mmap | bytearray, slots: int, entries: int) -> None:
        if entries % WAYS or entries & (entries - 1):
            raise ValueError("entries must be a power of two, a multiple of WAYS")
        self.buf = buf
        self.slots = slots
        self.entries = entries
        self.buckets = entries // WAYS
        self.region_words = entries * 2
        self.words = memoryview(buf).cast("B").cast("Q")
        self._mask = self.buckets - 1
        self._sweep_at = [0] * slots  # next bucket each region's sweep visits

    @classmethod
    def create(cls, slots: int, entries: int, *, anonymous: bool = True) -> PrefixIndex:
        size = slots * entries * 16
        # MAP_SHARED | MAP_ANONYMOUS: inherited by every child forked after this; pages
        # cost memory only once written.
        buf: mmap.mmap | bytearray = mmap.mmap(-1, size) if anonymous else bytearray(size)
        return cls(buf, slots, entries)

    def _bucket(self, slot: int, key: int) -> int:
        return slot * self.region_words + ((key >> 7) & self._mask) * BUCKET_WORDS

    # --- reads (any process) -------------------------------------------------------------

    def owners(self, key: int) -> list[tuple[int, int]]:
        """(row, generation low bits) of every region's entry for `key`."""
        words = self.words
        found: list[tuple[int, int]] = []
        mask = self._mask
        offset = ((key >> 7) & mask) * BUCKET_WORDS
        for slot in range(self.slots):
            base = slot * self.region_words + offset
            keys = words[base : base + WAYS].tolist()
            if key in keys:
                i = keys.index(key)
                value = words[base + WAYS + i]
                if words[base + i] == key:
                    found.append((value & ROW_MASK, (value >> ROW_BITS) & GEN_MASK))
        return found

    def contains(self, key: int) -> bool:
        words = self.words
        offset = ((key >> 7) & self._mask) * BUCKET_WORDS
        for slot in range(self.slots):
            base = slot * self.region_words + offset
            if key in words[base : base + WAYS].tolist():
                return True
        return False

    def longest(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` some region holds (binary search)."""
        lo, hi = 0, len(hashes)
        contains = self.contains
        # Fast paths: the whole prompt seen before (repeats, retries), then all but the
        # last one or two blocks (a known conversation or system prompt with a new last
        # turn: the turn's text often straddles a block end, so two blocks are new).
        for _ in range(3):
            if hi > 0 and contains(hashes[hi - 1]):
                return hi
            hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if contains(hashes[mid - 1]):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def own_value(self, slot: int, key: int) -> int:
        """The value region `slot` holds for `key` (0: none)."""
        words = self.words
        base = slot * self.region_words + ((key >> 7) & self._mask) * BUCKET_WORDS
        keys = words[base : base + WAYS].tolist()
        if key in keys:
            return int(words[base + WAYS + keys.index(key)])
        return 0

    # --- writes (only the owning process, into its own region) ---------------------------------

    def insert(self, slot: int, hashes: list[int], row: int, generation: int) -> None:
        """Record `row` as the owner of every prefix in `hashes`, in region `slot`."""
        words = self.words
        stamp = now_ticks()
        value = (stamp << TIME_SHIFT) | ((generation & GEN_MASK) << ROW_BITS) | (row & ROW_MASK)
        region = slot * self.region_words
        mask = self._mask
        for key in hashes:
            base = region + ((key >> 7) & mask) * BUCKET_WORDS
            keys = words[base : base + WAYS].tolist()
            if key in keys:
                words[base + WAYS + keys.index(key)] = value
                continue
            if 0 in keys:
                i = keys.index(0)
            else:
                # Full bucket: replace its least recently used entry. Clear the key first
                # so no reader pairs the old key with the new value.
                stamps = [
                    ((stamp - (v >> TIME_SHIFT)) & 0xFFFFFFFF)
                    for v in words[base + WAYS : base + BUCKET_WORDS].tolist()
                ]
                i = stamps.index(max(stamps))
                words[base + i] = 0
            words[base + WAYS + i] = value
            words[base + i] = key

    def evict_step(
        self,
        slot: int,
        buckets: int,
        ttl_ticks: int,
        stale: Callable[[int, int], bool] | None = None,
    ) -> bool:
        """Sweep the next `buckets` buckets of region `slot`: clear entries unused for
        more than `ttl_ticks` and those `stale(row, gen)` says belong to a gone worker.
        True when the sweep wrapped around (a full pass ended)."""
        words = self.words
        stamp = now_ticks()
        region = slot * self.region_words
        start = self._sweep_at[slot]
        end = min(self.buckets, start + buckets)
        for bucket in range(start, end):
            base = region + bucket * BUCKET_WORDS
            keys = words[base : base + WAYS].tolist()
            for i in range(WAYS):
                if not keys[i]:
                    continue
                value = words[base + WAYS + i]
                age = (stamp - (value >> TIME_SHIFT)) & 0xFFFFFFFF
                if age > ttl_ticks or (
                    stale is not None and stale(value & ROW_MASK, (value >> ROW_BITS) & GEN_MASK)
                ):
                    words[base + i] = 0
        wrapped = end >= self.buckets
        self._sweep_at[slot] = 0 if wrapped else end
        return wrapped

    def clear_region(self, slot: int) -> None:
        """Forget everything region `slot` holds (its process is gone for good)."""
        start = slot * self.region_words * 8
        self.buf[start : start + self.region_words * 8] = bytes(self.region_words * 8)

    def size(self, slot: int | None = None) -> int:
        """Entries held (one region, or all): for tests and metrics, O(entries)."""
        slots = range(self.slots) if slot is None else (slot,)
        total = 0
        for s in slots:
            base = s * self.region_words
            for bucket in range(self.buckets):
                b = base + bucket * BUCKET_WORDS
                total += WAYS - words_zero(self.words[b : b + WAYS].tolist())
        return total


def words_zero(keys: list[int]) -> int:
    return keys.count(0)


def row_generation_reader(table: object) -> Callable[[int], int]:
    """A fast `row -> generation` over a WorkerTable: one aligned 8-byte load (the
    generation word is written whole by the control plane; no seqlock needed for it)."""
    from smg.shm.layout import ROW_SIZE

    words = table._words  # type: ignore[attr-defined]
    first = (table.geo.rows_offset + 8) >> 3  # type: ignore[attr-defined]
    step = ROW_SIZE >> 3

    def generation(row: int) -> int:
        return int(words[first + row * step])

    return generation
