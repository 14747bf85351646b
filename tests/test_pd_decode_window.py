"""The PD decode running-window gate's pure parts and its slot accounting
(smg.dataplane.pd_window), on a real shared table: the hold state machine, the window's
publication in the directory entry, the gateway-wide bound across processes (forked
racers), pick/hold/shed. End to end: tests/test_pd_decode_window_e2e.py."""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing
import os
from types import SimpleNamespace
from typing import Any

import atomicshm
import pytest

from smg.control.registry import WorkerRecord, pd_window
from smg.dataplane.app import DataPlane
from smg.dataplane.pd_admission import claim_within
from smg.dataplane.pd_window import (
    SHED_CODE,
    DecodeWindow,
    HoldAction,
    HoldEvent,
    HoldState,
    has_room,
    hold_step,
    shed_message,
)
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec

# --- pure parts ----------------------------------------------------------------------------------


def test_hold_transitions() -> None:
    W, A, S, R = HoldState
    assert hold_step(W, HoldEvent.SLOT) == (A, HoldAction.ADMIT)
    assert hold_step(W, HoldEvent.EXPIRED) == (S, HoldAction.SHED)
    assert hold_step(W, HoldEvent.RELEASE) == (R, HoldAction.NONE)
    for final in (A, S, R):  # once decided, nothing moves it
        for event in HoldEvent:
            assert hold_step(final, event) == (final, HoldAction.NONE)


def test_has_room() -> None:
    assert has_room(0, 10**6)  # no window: never gated
    assert has_room(2, 1)
    assert not has_room(2, 2)
    assert not has_room(1, 5)


def test_shed_message_names_the_worker_model_window_and_wait() -> None:
    assert shed_message("http://d:1", None, 4, 2.5) == (
        "Decode worker 'http://d:1' for model 'unknown' could not admit 1 request(s) "
        "within its running window of 4 in 2.5 s"
    )


def _record(kind: str, labels: dict[str, str], server_info: dict[str, Any]) -> WorkerRecord:
    record = WorkerRecord("w", WorkerSpec(url="http://w:1", worker_type=kind, labels=labels), 0, 1)
    record.server_info = server_info
    return record


def test_window_precedence_and_publication() -> None:
    # 1.13's order: max_num_seqs label, max_running_requests label, /server_info.
    both = {"max_num_seqs": "3", "max_running_requests": "5"}
    assert pd_window(_record("decode", both, {"max_running_requests": 9})) == 3
    assert pd_window(_record("decode", {"max_running_requests": "5"}, {})) == 5
    assert pd_window(_record("decode", {"max_num_seqs": "x"}, {"max_running_requests": 9})) == 9
    assert pd_window(_record("decode", {}, {"max_running_requests": 0})) == 0
    assert pd_window(_record("decode", {}, {})) == 0
    assert pd_window(_record("decode", {"max_num_seqs": str(2**40)}, {})) == 2**32 - 1
    # Published in the directory entry for decode workers only.
    assert _record("decode", {}, {"max_running_requests": 7}).entry().pd_window == 7
    assert _record("prefill", {}, {"max_running_requests": 7}).entry().pd_window == 0


# --- the slot accounting on a shared table ---------------------------------------------------------


class _App:
    """The parts of a DataPlane the gate touches: its in-flight bookkeeping (DataPlane's own
    methods), one process slot of a shared table, the directory entries."""

    _in_flight_add = DataPlane._in_flight_add
    _in_flight_done = DataPlane._in_flight_done

    def __init__(self, table: WorkerTable, slot: int, windows: dict[int, int]) -> None:
        self.table = table
        self.slot = slot
        self.local_in_flight: dict[int, tuple[int, int]] = {}
        entries = {
            row: SimpleNamespace(generation=1, pd_window=w, url=f"http://d{row}")
            for row, w in windows.items()
        }
        self.state = SimpleNamespace(entries=entries)
        self.gate = SimpleNamespace(pd_shed_count=None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.errors: list[BaseException] = []

    def log_error(self, what: str, exc: BaseException) -> None:
        self.errors.append(exc)

    def poll_retry_after(self) -> bytes:
        return b"retry-after: 10\r\n"


def _table() -> WorkerTable:
    return WorkerTable.create(4, 2, os.getpid())


def test_a_slot_is_gateway_wide() -> None:
    table = _table()
    one, two = _App(table, 0, {0: 1, 1: 0}), _App(table, 1, {0: 1, 1: 0})
    w1, w2 = DecodeWindow(one, 5.0), DecodeWindow(two, 5.0)  # type: ignore[arg-type]
    assert w1.take(0, 1)
    assert not w2.take(0, 1)  # the other process's leg fills the window
    assert table.in_flight(0) == 1  # the refused take left nothing counted
    assert w2.room([0, 1]) == [1]
    assert w2.take(1, 1) and w2.take(1, 1)  # no window: any count
    one._in_flight_done(0, 1)
    assert w2.take(0, 1)
    assert not w2.take(0, 2)  # another worker's generation: not this row's slot


def test_pick_prefers_a_decode_with_room_and_else_waits_on_the_policys_pick() -> None:
    table = _table()
    app = _App(table, 0, {0: 1, 1: 1})
    window = DecodeWindow(app, 5.0)  # type: ignore[arg-type]
    seen: list[list[int]] = []

    def first(rows: list[int]) -> int:
        seen.append(rows)
        return rows[0] if rows else -1

    assert window.pick(first, [0, 1]) == (0, True)
    assert window.pick(first, [0, 1]) == (1, True)  # row 0 is full: row 1 has room
    assert window.pick(first, [0, 1]) == (0, False)  # both full: wait on the pick
    assert seen[-1] == [0, 1]
    assert window.pick(lambda rows: -1, [0, 1]) == (-1, False)  # the gate refused all
    assert table.in_flight(0) == 1 and table.in_flight(1) == 1


def _racer(buf: Any, geo_args: tuple[int, int], slot: int, rounds: int, q: Any) -> None:
    from smg.shm import layout

    table = WorkerTable(buf, layout.geometry(*geo_args))
    app = _App(table, slot, {0: 2})
    holders = atomicshm.AtomicView(buf)
    spare = table.global_offset(layout.G_PD_QUEUED) + 8  # unused in this test table
    worst = 0
    taken = 0
    for _ in range(rounds):
        if claim_within(app, 0, 1, 2):  # type: ignore[arg-type]
            taken += 1
            now = holders.fetch_add_u64(spare, 1) + 1
            worst = max(worst, now)
            holders.fetch_sub_u64(spare, 1)
            app._in_flight_done(0, 1)
    q.put((worst, taken))


def test_claim_within_never_lets_more_than_the_window_run_across_processes() -> None:
    # Three forked processes race for a window of 2 on one row; each counts itself in a
    # shared word while it holds a slot: that count never passes 2.
    table = WorkerTable.create(2, 3, os.getpid())
    assert isinstance(table.buf, mmap.mmap)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(table.buf, (2, 3), slot, 3000, q)) for slot in range(3)
    ]
    for proc in procs:
        proc.start()
    try:
        results = [q.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    assert max(worst for worst, _ in results) <= 2
    assert all(taken > 0 for _, taken in results)
    assert table.in_flight(0) == 0


def test_a_hold_is_admitted_when_a_slot_frees_shed_after_the_wait_or_released() -> None:
    async def scenario() -> list[str]:
        table = _table()
        other = _App(table, 1, {0: 1})
        app = _App(table, 0, {0: 1})
        app.loop = asyncio.get_running_loop()
        window = DecodeWindow(app, 0.3)  # type: ignore[arg-type]
        assert DecodeWindow(other, 0.3).take(0, 1)  # type: ignore[arg-type]
        events: list[str] = []
        window.hold(0, 1, lambda: events.append("a1"), lambda: events.append("s1"))
        gone = window.hold(0, 1, lambda: events.append("a2"), lambda: events.append("s2"))
        window.hold(0, 1, lambda: events.append("a3"), lambda: events.append("s3"))
        await asyncio.sleep(0.05)
        assert events == []
        window.release(gone)
        other._in_flight_done(0, 1)  # the other process's leg ends
        await asyncio.sleep(0.05)
        assert events == ["a1"]  # the first in line took it; the third still waits
        assert table.in_flight(0) == 1
        await asyncio.sleep(0.4)
        assert window.holds == [] and window.timer is None
        assert window.waits == {"http://d0": 3} and window.sheds == {}
        status, code, message, extra = window.shed(0, "m")
        assert (status, code, extra) == (503, SHED_CODE, b"retry-after: 10\r\n")
        assert "window of 1" in message
        assert window.sheds == {"http://d0": 1} and app.gate.pd_shed_count == 1
        return events

    assert asyncio.run(scenario()) == ["a1", "s3"]


@pytest.mark.parametrize("window", [0, 3])
def test_freed_runs_the_holds_at_once(window: int) -> None:
    async def scenario() -> None:
        app = _App(_table(), 0, {0: window})
        app.loop = asyncio.get_running_loop()
        gate = DecodeWindow(app, 5.0)  # type: ignore[arg-type]
        gate.freed()  # nothing held: no timer
        assert gate.timer is None
        admitted: list[int] = []
        gate.hold(0, 1, lambda: admitted.append(1), lambda: None)
        await asyncio.sleep(0.02)
        assert admitted == [1]  # a free slot (or no window): admitted at the first try

    asyncio.run(scenario())
