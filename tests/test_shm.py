"""The shared-table codec: layout, seqlock rows, directory double-buffering, in-flight slots."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import time

import pytest

from smg.shm import layout
from smg.shm.directory import Directory, DirectoryEntry, decode_directory, encode_directory
from smg.shm.layout import Row
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec


def _entry(row: int, generation: int, url: str) -> DirectoryEntry:
    return DirectoryEntry(
        row=row,
        generation=generation,
        worker_id=f"id-{row}",
        url=url,
        model_id=None,
        models=("m",),
        api_key=None,
        engine="sglang",
        context_length=None,
        spec=WorkerSpec(url=url, connection_mode="http", labels={"zone": "a"}),
    )


def test_geometry_regions_do_not_overlap() -> None:
    geo = layout.geometry(1024, 8)
    assert geo.globals_offset >= layout.HEADER_SIZE
    assert geo.procs_offset >= geo.globals_offset + layout.GLOBALS_SIZE
    assert geo.rows_offset >= geo.procs_offset + 8 * layout.PROC_SIZE
    assert geo.health_offset >= geo.rows_offset + 1024 * layout.ROW_SIZE
    assert geo.inflight_offset >= geo.health_offset + 1024 * layout.HEALTH_SIZE
    assert geo.dir_offset >= geo.inflight_offset + 1024 * 8 * 8
    assert geo.total_size >= geo.dir_offset + 2 * geo.dir_capacity
    assert layout.ROW_SEQ.size + layout.ROW_BODY.size <= layout.ROW_SIZE
    assert layout.HEADER.size <= layout.HEADER_SIZE
    assert layout.PROC.size <= layout.PROC_WORDS_OFFSET
    assert layout.PROC_WORDS_OFFSET + layout.P_SPARE_7 + 8 <= layout.PROC_SIZE
    assert layout.H_FLAGS + 8 <= layout.HEALTH_SIZE
    assert layout.G_PD_QUEUED + 8 <= layout.GLOBALS_SIZE
    # Atomic words must be 8-byte aligned, and the busy global ones on their own lines.
    for offset in (geo.globals_offset, geo.procs_offset, geo.health_offset):
        assert offset % 64 == 0


def test_atomic_words_are_shared_between_processes() -> None:
    """Two processes adding to one global word at once lose no update."""
    table = WorkerTable.create(4, 2, os.getpid())
    offset = table.global_offset(layout.G_ADMIT_IN_FLIGHT)
    n = 20000
    pid = os.fork()
    if pid == 0:
        for _ in range(n):
            table.atomic.fetch_add_u64(offset, 1)
        os._exit(0)
    for _ in range(n):
        table.atomic.fetch_add_u64(offset, 1)
    os.waitpid(pid, 0)
    assert table.atomic.load_u64(offset) == 2 * n
    # The proc-slot words sit after the fields write_proc packs, which leave them alone.
    word = table.proc_word_offset(1, layout.P_PERMITS)
    table.atomic.store_u64(word, 7)
    table.write_proc(1, 99, layout.PROC_READY, 1.0, "x" * 300)
    assert table.atomic.load_u64(word) == 7


def test_geometry_refuses_empty_tables() -> None:
    with pytest.raises(ValueError):
        layout.geometry(0, 1)
    with pytest.raises(ValueError):
        layout.geometry(1, 0)


def test_header_round_trip_and_bad_magic() -> None:
    geo = layout.geometry(16, 2)
    buf = bytearray(geo.total_size)
    layout.init_header(buf, geo, supervisor_pid=1234)
    assert layout.read_geometry(buf) == geo
    buf[0] ^= 0xFF
    with pytest.raises(ValueError, match="not an smg worker table"):
        layout.read_geometry(buf)


def test_row_round_trip_and_sequence_moves_by_two() -> None:
    geo = layout.geometry(4, 1)
    buf = bytearray(geo.total_size)
    offset = layout.row_offset(geo, 2)
    row = Row(7, 1, 3, 10, 20, 300, 0.25, 1234.5, 99.0, 100.0)
    layout.write_row(buf, offset, row)
    assert layout.read_row(buf, offset) == row
    assert layout.ROW_SEQ.unpack_from(buf, offset)[0] == 2
    layout.write_row(buf, offset, row._replace(running=11))
    assert layout.ROW_SEQ.unpack_from(buf, offset)[0] == 4
    assert layout.read_row(buf, offset).running == 11
    # Neighbouring rows are untouched.
    assert layout.read_row(buf, layout.row_offset(geo, 1)) == layout.EMPTY_ROW
    assert layout.read_row(buf, layout.row_offset(geo, 3)) == layout.EMPTY_ROW


def test_reader_gives_up_on_a_row_left_mid_write() -> None:
    geo = layout.geometry(1, 1)
    buf = bytearray(geo.total_size)
    offset = layout.row_offset(geo, 0)
    layout.ROW_SEQ.pack_into(buf, offset, 1)  # odd: a writer that never finished
    with pytest.raises(RuntimeError, match="stayed busy"):
        layout.read_row(buf, offset, max_wait=0.05)


def test_directory_double_buffer_round_trip() -> None:
    geo = layout.geometry(4, 1, dir_capacity=4096)
    buf = bytearray(geo.total_size)
    layout.init_header(buf, geo, 1)
    first = encode_directory(Directory(entries=[_entry(0, 1, "http://a:1")]))
    second = encode_directory(Directory(entries=[_entry(1, 1, "http://b:2")], aliases={"x": "m"}))
    assert layout.write_directory(buf, geo, first) == 1
    assert layout.read_directory(buf, geo) == (1, first)
    assert layout.write_directory(buf, geo, second) == 2
    generation, blob = layout.read_directory(buf, geo)
    assert generation == 2
    decoded = decode_directory(blob)
    assert decoded.entries[0].url == "http://b:2"
    assert decoded.aliases == {"x": "m"}
    assert layout.directory_generation(buf) == 2


def test_directory_too_large_is_refused() -> None:
    geo = layout.geometry(1, 1, dir_capacity=64)
    buf = bytearray(geo.total_size)
    with pytest.raises(ValueError, match="needs"):
        layout.write_directory(buf, geo, b"x" * 65)


def test_empty_directory_blob_decodes_to_no_entries() -> None:
    assert decode_directory(b"").entries == []


def test_in_flight_is_the_sum_of_process_slots() -> None:
    table = WorkerTable.create(8, 3, os.getpid(), anonymous=False)
    table.set_in_flight(0, 5, 2)
    table.set_in_flight(1, 5, 3)
    table.set_in_flight(2, 5, -1)
    table.set_in_flight(1, 4, 7)
    assert table.in_flight(5) == 4
    assert table.in_flight(4) == 7
    assert table.total_in_flight() == 11
    table.zero_process(1)
    assert table.in_flight(5) == 1
    assert table.in_flight(4) == 0
    assert table.total_in_flight() == 1


def test_process_slot_round_trip_truncates_long_reasons() -> None:
    table = WorkerTable.create(1, 2, os.getpid(), anonymous=False)
    table.write_proc(1, 4321, layout.PROC_FAILED, 12.5, "x" * 500)
    slot = table.read_proc(1)
    assert slot.pid == 4321
    assert slot.state == layout.PROC_FAILED
    assert slot.started == 12.5
    assert slot.reason == "x" * 240
    assert table.read_proc(0).pid == 0


def test_repair_evens_out_words_a_killed_writer_left_odd() -> None:
    table = WorkerTable.create(4, 1, os.getpid(), anonymous=False)
    row = Row(3, 1, 1, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    table.write_row(2, row)
    words = layout.words_of(table.buf)
    row_word = layout.row_offset(table.geo, 2) >> 3
    dir_word = layout.OFF_DIR_SEQ >> 3
    # A writer killed between its two stores: the row's and the directory's words are odd.
    words[row_word] += 1
    words[dir_word] += 1
    with pytest.raises(RuntimeError, match="stayed busy"):
        layout.read_row(table.buf, layout.row_offset(table.geo, 2), max_wait=0.05)
    with pytest.raises(RuntimeError, match="stayed busy"):
        layout.read_directory(table.buf, table.geo, max_wait=0.05)
    assert table.repair_sequences() == 2
    assert table.read_row(2) == row
    assert table.read_directory()[1].entries == []
    assert words[row_word] % 2 == 0 and words[dir_word] % 2 == 0
    # Even words are left alone, and the next write keeps the protocol's parity.
    assert table.repair_sequences() == 0
    table.write_row(2, row._replace(status=2))
    assert table.read_row(2).status == 2


def test_generations_and_gateway_state() -> None:
    table = WorkerTable.create(2, 1, os.getpid(), anonymous=False)
    assert table.routing_generation() == 0
    assert table.bump_routing_generation() == 1
    assert table.routing_generation() == 1
    assert table.gateway_state() == layout.GATEWAY_RUNNING
    table.set_gateway_state(layout.GATEWAY_DRAINING)
    assert table.gateway_state() == layout.GATEWAY_DRAINING


# --- multi-process stress: a reader never observes a torn row or directory ----------------


def _consistent(row: Row) -> bool:
    # The writer keeps every field a function of one counter n, so a row that mixes two
    # writes is detectable.
    n = row.running
    return (
        row.generation == n
        and row.waiting == n * 3 % 2**32
        and row.waiting_tokens == n * 7 % 2**32
        and row.token_usage == (n % 1000) / 1000
        and row.throughput == n * 0.5
        and row.load_updated == float(n)
        and row.status_changed == float(-n)
    )


def _writer(buf: mmap.mmap, geo: layout.Geometry, seconds: float, done: object) -> None:
    offset = layout.row_offset(geo, 0)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        layout.write_row(
            buf,
            offset,
            Row(
                n,
                1,
                1,
                n,
                n * 3 % 2**32,
                n * 7 % 2**32,
                (n % 1000) / 1000,
                n * 0.5,
                float(n),
                float(-n),
            ),
        )
        if n % 50 == 0:
            blob = f"{n:08d}".encode() * (1 + n % 97)
            layout.write_directory(buf, geo, blob)
    done.set()  # type: ignore[attr-defined]


def test_no_torn_reads_across_processes() -> None:
    geo = layout.geometry(1, 1, dir_capacity=8192)
    buf = mmap.mmap(-1, geo.total_size)
    layout.init_header(buf, geo, os.getpid())
    context = multiprocessing.get_context("fork")
    done = context.Event()
    writer = context.Process(target=_writer, args=(buf, geo, 2.0, done))
    writer.start()
    try:
        offset = layout.row_offset(geo, 0)
        reads = torn = directory_reads = 0
        first_torn: Row | None = None
        seen_values: set[int] = set()
        deadline = time.monotonic() + 10.0
        while not done.is_set() and time.monotonic() < deadline:
            row = layout.read_row(buf, offset)
            reads += 1
            if row.generation and not _consistent(row):
                torn += 1
                first_torn = first_torn or row
            seen_values.add(row.running)
            generation, blob = layout.read_directory(buf, geo)
            if blob:
                directory_reads += 1
                # Each blob is one 8-digit number repeated: a torn copy breaks that.
                assert len(blob) % 8 == 0
                assert blob == blob[:8] * (len(blob) // 8), f"torn directory read {generation}"
    finally:
        writer.join(10)
        if writer.is_alive():
            writer.kill()
    assert writer.exitcode == 0
    assert reads > 1000
    assert len(seen_values) > 100, "the reader should have seen many different writes"
    assert directory_reads > 10
    assert torn == 0, f"{torn} torn rows, first {first_torn}"
