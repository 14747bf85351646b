"""Byte layout of the shared worker table, and the seqlock codec over it.

Pure code: every function takes a writable buffer (an ``mmap`` in production, a
``bytearray`` in unit tests) and offsets into it; nothing here opens or maps anything.

Regions, in order::

    header        HEADER_SIZE bytes       magic, sizes, generations, gateway state
    globals       GLOBALS_SIZE bytes      gateway-wide atomic words, one cache line each
    processes     slots * PROC_SIZE       per data-plane process: pid, state, failure reason,
                                          then atomic words (heartbeat, permits held, ...)
    rows          capacity * ROW_SIZE     per worker: seqlock, generation, status, backend load
    health        capacity * HEALTH_SIZE  per worker: atomic words (breaker, last contact)
    in-flight     capacity * slots * 8    per worker, one int64 per process (row-major)
    directory     2 * dir_capacity        double-buffered encoded directory (urls, models, keys)

Words in the globals, process and health regions are touched only through atomic
operations (``atomicshm``: compare-and-swap, fetch-add, load and store on the mapping);
they are the places where several processes must agree on one number (admission, breaker
transitions) and a seqlock with one writer would not do.

Seqlock protocol (one writer per row: the control plane): the writer makes ``seq`` odd,
writes the body, then makes it even again. A reader reads ``seq``, the body, ``seq``
again and retries while the two differ or are odd. This relies on the machine keeping
stores in order and loads in order (x86-64's TSO does); each read or write below is a
separate C call, so the compiler cannot reorder them either.

Sequence words are read and written through a ``memoryview`` cast to unsigned 64-bit
words, which is one aligned 8-byte load or store. ``struct.pack_into`` must not touch
them: it zeroes its target before writing, and a reader that sees that transient zero
twice would accept a torn row (a multi-process test caught exactly that).
"""

from __future__ import annotations

import os
import struct
import time
from typing import NamedTuple

from smg.shm.directory import directory_capacity

MAGIC = 0x31304C4254474D53  # b"SMGTBL01" little-endian
LAYOUT_VERSION = 2

# --- header ---------------------------------------------------------------------------
#   magic u64, version u32, capacity u32, slots u32, dir_capacity u32,
#   dir_seq u64, dir_generation u64, dir_active u32, dir_length u32,
#   routing_generation u64, gateway_state u32, pad u32, supervisor_pid u64
HEADER = struct.Struct("<QIIIIQQIIQIIQ")
HEADER_SIZE = 256
OFF_DIR_SEQ = 24
DIR_POINTER = struct.Struct("<QQII")  # dir_seq, dir_generation, dir_active, dir_length
DIR_FIELDS = struct.Struct("<QII")  # the pointer without its sequence word
OFF_ROUTING_GENERATION = 48
OFF_GATEWAY_STATE = 56
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")

GATEWAY_RUNNING = 0
GATEWAY_DRAINING = 1

# --- gateway-wide atomic words (offsets within the globals region) ----------------------
# Each on its own 64-byte cache line: they are written by every process, and a line shared
# by two busy words would bounce between cores for both.
GLOBALS_SIZE = 512
G_ADMIT_IN_FLIGHT = 0  # admission permits held, all processes together
G_ADMIT_QUEUED = 64  # requests waiting for a permit, all processes together
G_RATE_TAT_NS = 128  # rate limiter: theoretical arrival time (GCRA), monotonic ns
G_HEALTH_EPOCH = 192  # bumped on every breaker/stall/overload change: re-filter routing
# Set to 1 by the control plane once every start-up worker has had its first probe (passed
# or failed) or its onboarding ended; never cleared (a replacement control plane leaves it).
# The supervisor sends systemd READY=1 only after it (smg.systemd).
G_FIRST_HEALTH_ROUND = 256
# Written only by the root supervisor (no loop, so it counts in the table and the
# control plane's exporter reads them): data-plane restarts by reason, and config reloads
# by result, one 64-bit word each within the line.
G_DP_RESTARTS = 320  # + RESTART_WORDS[reason]
G_CONFIG_RELOADS = 384  # + RELOAD_WORDS[result]
# PD prefill admission (smg.dataplane.pd): requests waiting for a prefill slot, all
# processes together (--prefill-queue-size bounds it gateway-wide).
G_PD_QUEUED = 448
RESTART_WORDS = {"crash": 0, "heartbeat": 8, "reload": 16}
RELOAD_WORDS = {"success": 0, "failure": 8}

# --- per-process slot -----------------------------------------------------------------
#   pid u32, state u32, started (unix time) f64, reason: 240 bytes utf-8, NUL padded,
#   then PROC_WORDS_OFFSET: atomic 64-bit words written by the process itself (the
#   supervisor reads them, and clears them once the process is gone)
PROC = struct.Struct("<IId240s")
PROC_SIZE = 512
PROC_WORDS_OFFSET = 256
P_HEARTBEAT_NS = 0  # monotonic ns of the last beat from inside the event loop
P_PERMITS = 8  # admission permits this process holds (the supervisor returns a dead one's)
P_QUEUED = 16  # requests this process has waiting for a permit
P_HEAD_SINCE = 24  # admission: monotonic ns its oldest waiter was queued (0: none waits)
P_TRIED_NS = 32  # admission: monotonic ns it last tried for a permit (liveness)
P_INDEX = 40  # the process's listener number (the `process` label; slot differs on reload)
P_PD_QUEUED = 48  # PD prefill admission: requests this process has waiting
P_SPARE_7 = 56
PROC_EMPTY = 0
PROC_STARTING = 1
PROC_READY = 2
PROC_FAILED = 3
PROC_DRAINING = 4

# --- worker row -----------------------------------------------------------------------
#   seq u64 | generation u64, status u8, flags u8, pad u16, running u32, waiting u32,
#   waiting_tokens u32, token_usage f64, throughput f64, load_updated f64, status_changed f64
ROW_SEQ = U64
ROW_BODY = struct.Struct("<QBBHIIIdddd")
ROW_SIZE = 128
FLAG_IN_USE = 1
FLAG_LOAD_VALID = 2
FLAG_DRAINING = 4

# --- per-worker health block (atomic words, offsets within the block) -------------------
HEALTH_SIZE = 64
H_CB_STATE = 0  # breaker state word (see smg.dataplane.breaker), changed by compare-and-swap
H_CB_FAILURES = 8  # failures counted toward opening
H_CB_SUCCESSES = 16  # successes counted in half-open
H_CB_TRIALS = 24  # half-open trial requests admitted
H_CB_CHANGED_NS = 32  # monotonic ns of the last breaker transition
H_LAST_CONTACT_NS = 40  # monotonic ns of the last answer from the worker (any source)
H_TRANSPORT_FAILURE_NS = 48  # monotonic ns of the last transport failure
H_FLAGS = 56  # bit 0 stalled (smg.shm.health), bit 1 overloaded (set by the control plane)

INFLIGHT = struct.Struct("<q")


class Row(NamedTuple):
    generation: int
    status: int
    flags: int
    running: int
    waiting: int
    waiting_tokens: int
    token_usage: float
    throughput: float
    load_updated: float
    status_changed: float


EMPTY_ROW = Row(0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)


class Geometry(NamedTuple):
    capacity: int
    slots: int
    dir_capacity: int
    globals_offset: int
    procs_offset: int
    rows_offset: int
    health_offset: int
    inflight_offset: int
    dir_offset: int
    total_size: int


def geometry(capacity: int, slots: int, dir_capacity: int | None = None) -> Geometry:
    if capacity < 1 or slots < 1:
        raise ValueError("capacity and slots must be at least 1")
    if dir_capacity is None:
        # Room for a full table of the largest entries the spec validator allows, so a
        # publish never fails for want of space (untouched pages of the mapping cost no
        # memory: a buffer holds only what the last publish wrote).
        dir_capacity = directory_capacity(capacity)
    globals_ = HEADER_SIZE
    procs = globals_ + GLOBALS_SIZE
    rows = procs + _round_up(slots * PROC_SIZE, 64)
    health = rows + capacity * ROW_SIZE
    inflight = health + capacity * HEALTH_SIZE
    directory = _round_up(inflight + capacity * slots * INFLIGHT.size, 4096)
    total = _round_up(directory + 2 * dir_capacity, 4096)
    return Geometry(
        capacity, slots, dir_capacity, globals_, procs, rows, health, inflight, directory, total
    )


def _round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def init_header(buf: bytearray | memoryview, geo: Geometry, supervisor_pid: int) -> None:
    HEADER.pack_into(
        buf,
        0,
        MAGIC,
        LAYOUT_VERSION,
        geo.capacity,
        geo.slots,
        geo.dir_capacity,
        0,
        0,
        0,
        0,
        0,
        GATEWAY_RUNNING,
        0,
        supervisor_pid,
    )


def read_geometry(buf: bytearray | memoryview) -> Geometry:
    magic, version, capacity, slots, dir_capacity, *_ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise ValueError("not an smg worker table (bad magic or layout version)")
    return geometry(capacity, slots, dir_capacity)


# --- rows ------------------------------------------------------------------------------


def row_offset(geo: Geometry, row: int) -> int:
    return geo.rows_offset + row * ROW_SIZE


def words_of(buf: bytearray | memoryview) -> memoryview:
    """The buffer as 64-bit words, for atomic sequence reads and writes."""
    return memoryview(buf).cast("B").cast("Q")


def write_row(
    buf: bytearray | memoryview, offset: int, row: Row, words: memoryview | None = None
) -> None:
    """Single-writer seqlock write: odd while the body is being changed."""
    if words is None:
        words = words_of(buf)
    index = offset >> 3
    seq = words[index]
    words[index] = seq + 1
    ROW_BODY.pack_into(
        buf,
        offset + 8,
        row.generation,
        row.status,
        row.flags,
        0,
        row.running,
        row.waiting,
        row.waiting_tokens,
        row.token_usage,
        row.throughput,
        row.load_updated,
        row.status_changed,
    )
    words[index] = seq + 2


def read_row(
    buf: bytearray | memoryview, offset: int, max_wait: float = 2.0, words: memoryview | None = None
) -> Row:
    """Lock-free read; retries while a write is in progress or happened meanwhile.

    The writer can be descheduled halfway through a write, so after a short spin the
    reader yields its CPU and keeps trying until `max_wait` seconds have passed."""
    if words is None:
        words = words_of(buf)
    index = offset >> 3
    unpack_body = ROW_BODY.unpack_from
    body_offset = offset + 8
    tries = 0
    deadline = 0.0
    while True:
        before = words[index]
        if not before & 1:
            generation, status, flags, _p, running, waiting, wtok, tok, thr, upd, chg = unpack_body(
                buf, body_offset
            )
            if words[index] == before:
                return Row(generation, status, flags, running, waiting, wtok, tok, thr, upd, chg)
        tries += 1
        if tries >= _SPINS:
            deadline = _backoff(deadline, max_wait, "worker table row")


_SPINS = 200


def _backoff(deadline: float, max_wait: float, what: str) -> float:
    now = time.monotonic()
    if deadline == 0.0:
        deadline = now + max_wait
    elif now > deadline:
        raise RuntimeError(f"{what} stayed busy for {max_wait} s: is its writer stuck?")
    os.sched_yield()
    return deadline


def repair_sequence_words(buf: bytearray | memoryview, geo: Geometry) -> int:
    """Make every odd sequence word (each row's, the directory pointer's) even again.

    A writer killed between its two sequence stores leaves the word odd, and every reader
    then waits on it forever. Only call this when no writer can be running (the supervisor
    calls it after reaping the control plane, the only writer). The body under a repaired
    word is what the dead writer left: the old or the new value, as each body is written
    by one ``pack_into`` copy; only a kill landing inside that copy (a window of
    nanoseconds) could leave a mix. Returns how many words were odd."""
    words = words_of(buf)
    indexes = [row_offset(geo, row) >> 3 for row in range(geo.capacity)]
    indexes.append(OFF_DIR_SEQ >> 3)
    repaired = 0
    for index in indexes:
        seq = words[index]
        if seq & 1:
            words[index] = seq + 1
            repaired += 1
    return repaired


# --- process slots ----------------------------------------------------------------------


class ProcSlot(NamedTuple):
    pid: int
    state: int
    started: float
    reason: str


def proc_offset(geo: Geometry, index: int) -> int:
    return geo.procs_offset + index * PROC_SIZE


def proc_word_offset(geo: Geometry, index: int, word: int) -> int:
    """Offset of atomic word ``word`` (a ``P_*`` constant) of process slot ``index``."""
    return geo.procs_offset + index * PROC_SIZE + PROC_WORDS_OFFSET + word


def global_offset(geo: Geometry, word: int) -> int:
    """Offset of gateway-wide atomic word ``word`` (a ``G_*`` constant)."""
    return geo.globals_offset + word


def health_offset(geo: Geometry, row: int, word: int = 0) -> int:
    """Offset of atomic word ``word`` (an ``H_*`` constant) of worker row ``row``."""
    return geo.health_offset + row * HEALTH_SIZE + word


def write_proc(
    buf: bytearray | memoryview,
    geo: Geometry,
    index: int,
    pid: int,
    state: int,
    started: float,
    reason: str = "",
) -> None:
    encoded = reason.encode("utf-8", "replace")[:240]
    PROC.pack_into(buf, proc_offset(geo, index), pid, state, started, encoded)


def read_proc(buf: bytearray | memoryview, geo: Geometry, index: int) -> ProcSlot:
    pid, state, started, reason = PROC.unpack_from(buf, proc_offset(geo, index))
    return ProcSlot(pid, state, started, reason.rstrip(b"\0").decode("utf-8", "replace"))


# --- directory (double-buffered, seqlocked pointer) -------------------------------------


def write_directory(buf: bytearray | memoryview, geo: Geometry, blob: bytes) -> int:
    """Write ``blob`` into the inactive buffer, then flip the pointer. Returns the generation."""
    if len(blob) > geo.dir_capacity:
        raise ValueError(
            f"worker directory needs {len(blob)} bytes, more than its {geo.dir_capacity}"
        )
    words = words_of(buf)
    index = OFF_DIR_SEQ >> 3
    seq, generation, active, _length = DIR_POINTER.unpack_from(buf, OFF_DIR_SEQ)
    target = 1 - active
    start = geo.dir_offset + target * geo.dir_capacity
    buf[start : start + len(blob)] = blob
    words[index] = seq + 1
    DIR_FIELDS.pack_into(buf, OFF_DIR_SEQ + 8, generation + 1, target, len(blob))
    words[index] = seq + 2
    return generation + 1


def directory_generation(buf: bytearray | memoryview) -> int:
    # Not seqlocked: a stale or new generation only decides whether to re-read.
    return U64.unpack_from(buf, OFF_DIR_SEQ + 8)[0]


def read_directory(
    buf: bytearray | memoryview, geo: Geometry, max_wait: float = 2.0
) -> tuple[int, bytes]:
    """Copy out the active directory blob. The writer only ever writes the inactive buffer,
    so the buffer being copied is overwritten only after a first flip, which changes ``seq``:
    an unchanged ``seq`` after the copy proves the copy whole."""
    words = words_of(buf)
    index = OFF_DIR_SEQ >> 3
    tries = 0
    deadline = 0.0
    while True:
        seq = words[index]
        if not seq & 1:
            generation, active, length = DIR_FIELDS.unpack_from(buf, OFF_DIR_SEQ + 8)
            start = geo.dir_offset + active * geo.dir_capacity
            blob = bytes(buf[start : start + length])
            if words[index] == seq:
                return generation, blob
        tries += 1
        if tries >= _SPINS:
            deadline = _backoff(deadline, max_wait, "worker directory")


# --- small header fields ------------------------------------------------------------------


def bump_routing_generation(buf: bytearray | memoryview) -> int:
    value = U64.unpack_from(buf, OFF_ROUTING_GENERATION)[0] + 1
    U64.pack_into(buf, OFF_ROUTING_GENERATION, value)
    return value


def routing_generation(buf: bytearray | memoryview) -> int:
    return U64.unpack_from(buf, OFF_ROUTING_GENERATION)[0]


def set_gateway_state(buf: bytearray | memoryview, state: int) -> None:
    U32.pack_into(buf, OFF_GATEWAY_STATE, state)


def gateway_state(buf: bytearray | memoryview) -> int:
    return U32.unpack_from(buf, OFF_GATEWAY_STATE)[0]
