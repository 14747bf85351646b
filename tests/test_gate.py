"""WorkerGate over a bytearray-backed table: two gates on one table stand for two
data-plane processes; `HealthBlocks` alone stands for the control plane."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from smg.config import GatewayConfig
from smg.dataplane.breaker import CLOSED, HALF_OPEN, OPEN
from smg.dataplane.gate import WorkerGate
from smg.shm.health import FLAG_STALLED, blocks_for
from smg.shm.layout import FLAG_IN_USE, Row
from smg.shm.table import WorkerTable

ROWS = [0, 1, 2]


def make(**overrides: object) -> tuple[WorkerTable, WorkerGate, WorkerGate]:
    cfg = GatewayConfig(**overrides)
    table = WorkerTable.create(8, 2, supervisor_pid=1, anonymous=False)
    blocks = blocks_for(table, cfg)
    for row in ROWS:
        table.write_row(row, Row(1, 1, FLAG_IN_USE, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
        blocks.reset_block(row, time.monotonic_ns())
    return table, WorkerGate(cfg, table, 0), WorkerGate(cfg, table, 1)


def transitions(*gates: WorkerGate) -> dict[tuple[int, int, int], int]:
    total: dict[tuple[int, int, int], int] = {}
    for gate in gates:
        for key, value in gate.transitions.items():
            total[key] = total.get(key, 0) + value
    return total


def test_nothing_left_out_returns_the_same_list() -> None:
    _table, a, _b = make()
    rows = list(ROWS)
    assert a.filter(rows) is rows
    assert a.claim(1) is True
    a.record(1, 1, 200)
    assert a.filter(rows) is rows
    assert (a.successes[1], a.failures[1]) == (1, 0)


def test_failures_from_two_processes_open_one_breaker_for_both() -> None:
    _table, a, b = make(cb_failure_threshold=10)
    rows = list(ROWS)
    for _ in range(5):
        a.record(1, 1, 500)
        b.record(1, 1, 0)
    assert a.blocks.state(1) == OPEN
    assert a.filter(rows) == [0, 2]
    assert b.filter(rows) == [0, 2]
    # Exactly one process won the transition.
    assert transitions(a, b) == {(1, CLOSED, OPEN): 1}


def test_a_success_restarts_the_consecutive_count_and_4xx_is_a_success() -> None:
    _table, a, b = make(cb_failure_threshold=10)
    for _ in range(9):
        a.record(2, 1, 503)
    b.record(2, 1, 404)
    for _ in range(9):
        b.record(2, 1, 429)
    assert a.blocks.state(2) == CLOSED
    assert a.blocks.counts(2)[0] == 9
    a.record(2, 1, 408)
    assert a.blocks.state(2) == OPEN


def test_a_client_that_left_says_nothing_of_the_worker() -> None:
    """499 (the client went away before any answer) is neither a success that would reset
    the failure count nor contact that would end a stall."""
    _table, a, _b = make(cb_failure_threshold=10, worker_stall_secs=0)
    for _ in range(9):
        a.record(2, 1, 503)
    a.record(2, 1, 499)
    assert a.blocks.counts(2)[0] == 9
    a.record(2, 1, 503)
    assert a.blocks.state(2) == OPEN
    a.record(1, 1, 0)  # a transport failure stalls row 1 ...
    assert a.blocks.flags(1) & FLAG_STALLED
    a.record(1, 1, 499)  # ... and a client leaving does not count as the worker's answer
    assert a.blocks.flags(1) & FLAG_STALLED
    assert a.successes[1] == 0


def test_outcomes_of_a_previous_worker_on_the_row_do_not_count() -> None:
    _table, a, _b = make(cb_failure_threshold=2)
    for _ in range(5):
        a.record(0, 7, 500)  # generation 7 is not the row's (1)
    assert a.blocks.state(0) == CLOSED


def test_half_open_admits_at_most_the_success_threshold_across_processes() -> None:
    _table, a, b = make(cb_failure_threshold=2, cb_success_threshold=3, cb_timeout_duration_secs=1)
    rows = list(ROWS)
    a.blocks.timeout_ms = b.blocks.timeout_ms = 50  # the flag takes whole seconds
    a.record(0, 1, 500)
    a.record(0, 1, 500)
    assert a.filter(rows) == [1, 2]
    time.sleep(0.06)
    assert a.filter(rows) == rows  # the timeout passed: half-open, row 0 is back
    assert a.blocks.state(0) == HALF_OPEN
    assert b.filter(rows) == rows
    granted = [gate.claim(0) for gate in (a, b, a, b, a, b)]
    assert granted.count(True) == 3
    # Both processes leave the row out once its trials are all out.
    assert a.filter(rows) == [1, 2]
    assert b.filter(rows) == [1, 2]
    for gate in (a, b):
        while gate.trials:
            gate.record(0, 1, 200)
    assert a.blocks.state(0) == CLOSED
    assert a.filter(rows) == rows
    assert b.filter(rows) == rows
    assert transitions(a, b) == {
        (0, CLOSED, OPEN): 1,
        (0, OPEN, HALF_OPEN): 1,
        (0, HALF_OPEN, CLOSED): 1,
    }


def test_a_failed_trial_reopens() -> None:
    _table, a, b = make(cb_failure_threshold=1, cb_success_threshold=2)
    a.blocks.timeout_ms = b.blocks.timeout_ms = 30
    a.record(1, 1, 502)
    time.sleep(0.04)
    assert b.filter(list(ROWS)) == ROWS
    assert b.claim(1)
    b.record(1, 1, 0)
    assert a.blocks.state(1) == OPEN
    assert a.filter(list(ROWS)) == [0, 2]


def test_every_breaker_open_leaves_nothing() -> None:
    _table, a, _b = make(cb_failure_threshold=1)
    for row in ROWS:
        a.record(row, 1, 500)
    assert a.filter(list(ROWS)) == []


def test_disabled_breaker_never_opens() -> None:
    _table, a, _b = make(cb_failure_threshold=1, disable_circuit_breaker=True)
    for _ in range(5):
        a.record(0, 1, 500)
    rows = list(ROWS)
    assert a.filter(rows) is rows


def test_transport_failure_after_silence_stalls_until_contact() -> None:
    _table, a, b = make(worker_stall_secs=0)  # any transport failure is past the stall time
    blocks = a.blocks
    rows = list(ROWS)
    a.record(2, 1, 0)
    assert blocks.flags(2) & FLAG_STALLED
    assert b.filter(rows) == [0, 1]
    # A load poll or passed probe (the control plane) ends it.
    blocks.contact(2, time.monotonic_ns())
    assert not blocks.flags(2) & FLAG_STALLED
    assert a.filter(rows) == rows
    assert b.filter(rows) == rows


def test_failure_right_after_contact_stalls_at_the_sweep() -> None:
    _table, a, _b = make(worker_stall_secs=2)
    blocks = a.blocks
    now = time.monotonic_ns()
    blocks.note_contact(0, now)
    a.record(0, 1, 0)
    assert not blocks.flags(0) & FLAG_STALLED
    assert not blocks.sweep(0, now + 1_000_000_000)
    assert blocks.sweep(0, now + 2_100_000_000)
    assert a.filter(list(ROWS)) == [1, 2]


def test_contact_after_a_stall_resets_an_open_breaker() -> None:
    _table, a, _b = make(cb_failure_threshold=3, worker_stall_secs=0)
    for _ in range(3):
        a.record(1, 1, 0)
    assert a.blocks.state(1) == OPEN
    assert a.blocks.flags(1) & FLAG_STALLED
    assert a.blocks.contact(1, time.monotonic_ns()) == (OPEN, CLOSED)
    assert a.filter(list(ROWS)) == ROWS


def test_overloaded_rows_are_left_out_while_another_is_free() -> None:
    table, a, b = make()
    a.blocks.set_overloaded(0, True)
    assert b.filter(list(ROWS)) == [1, 2]
    a.blocks.set_overloaded(1, True)
    a.blocks.set_overloaded(2, True)
    # All overloaded: the least-loaded (in flight, all processes) one gets the request.
    table.set_in_flight(0, 0, 5)
    table.set_in_flight(1, 1, 2)
    table.set_in_flight(0, 2, 1)
    table.set_in_flight(1, 2, 3)
    assert b.filter(list(ROWS)) == [1]
    assert b.fallbacks["overload"] == 1


def test_all_overloaded_with_shedding_is_refused() -> None:
    _table, a, _b = make(worker_overload_shed=True)
    for row in ROWS:
        a.blocks.set_overloaded(row, True)
    assert a.filter(list(ROWS)) is None
    assert a.shed_count == 1
    a.blocks.set_overloaded(1, False)
    assert a.filter(list(ROWS)) == [1]


def test_all_stalled_still_routes_to_one_with_shedding_on() -> None:
    _table, a, _b = make(worker_stall_secs=0, worker_overload_shed=True)
    for row in ROWS:
        a.record(row, 1, 0)
    picked = a.filter(list(ROWS))
    assert picked is not None and len(picked) == 1
    assert a.fallbacks["liveness"] == 1


@pytest.mark.parametrize("status", [200, 404])
def test_success_clears_failures_without_a_transition(status: int) -> None:
    _table, a, b = make()
    a.record(0, 1, 500)
    assert a.blocks.counts(0)[0] == 1
    b.record(0, 1, status)
    assert a.blocks.counts(0)[0] == 0
    assert transitions(a, b) == {}


def test_two_real_processes_agree_on_one_transition_and_the_trial_bound() -> None:
    """Forked processes on one shared mapping, racing: the opening transition is won once,
    and a half-open grants exactly --cb-success-threshold trials in all."""
    cfg = GatewayConfig(cb_failure_threshold=50, cb_success_threshold=3)
    table = WorkerTable.create(4, 4, supervisor_pid=1)  # anonymous shared mapping
    blocks = blocks_for(table, cfg)
    table.write_row(0, Row(1, 1, FLAG_IN_USE, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
    blocks.reset_block(0, time.monotonic_ns())
    ctx = multiprocessing.get_context("fork")
    won = ctx.Value("i", 0)
    granted = ctx.Value("i", 0)
    start = ctx.Event()

    def fail_then_claim(half_open_epoch: int) -> None:
        start.wait(5)
        mine = 0
        for _ in range(200):
            if blocks.failure(0, 1) is not None:
                mine += 1
        with won.get_lock():
            won.value += mine
        if half_open_epoch >= 0:
            taken = sum(blocks.take_trial(0, half_open_epoch) for _ in range(200))
            with granted.get_lock():
                granted.value += taken

    procs = [ctx.Process(target=fail_then_claim, args=(-1,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert won.value == 1
    assert blocks.state(0) == OPEN

    assert blocks.tick(0, 2**37) == (OPEN, HALF_OPEN)  # far past the timeout
    epoch = (blocks.word(0) >> 2) & 0xFFFFFF
    start.clear()
    procs = [ctx.Process(target=fail_then_claim, args=(epoch,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert granted.value == 3
