"""Admission control's pure parts: the gateway-wide words shared by several processes'
`AdmissionWords` (here two over one bytearray-backed table), the GCRA rate limiter with a
fake clock, a dead process's reclaim, the derived limit and SMG's refusal answers."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time

import orjson
import pytest

from smg.cpus import available_cores
from smg.dataplane import admission
from smg.dataplane.admission import BUSY, NS, OK, AdmissionWords
from smg.shm import layout
from smg.shm.table import WorkerTable


def _table() -> WorkerTable:
    return WorkerTable.create(4, 4, os.getpid(), anonymous=False)


def _words(
    table: WorkerTable, slot: int, limit: int = 3, queue: int = 2, rate: int | None = None
) -> AdmissionWords:
    return AdmissionWords.for_table(table, slot, limit, queue, rate)


def _global(table: WorkerTable, word: int) -> int:
    return table.atomic.load_u64(table.global_offset(word))


def _own(table: WorkerTable, slot: int, word: int) -> int:
    return table.atomic.load_u64(table.proc_word_offset(slot, word))


def test_limit_is_exact_across_two_processes_words() -> None:
    table = _table()
    a, b = _words(table, 0), _words(table, 1)
    assert [a.try_acquire(0), b.try_acquire(0), a.try_acquire(0)] == [OK, OK, OK]
    # At the limit: both refuse, and the failed adds are taken back.
    assert a.try_acquire(0) == BUSY
    assert b.try_acquire(0) == BUSY
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 3
    assert (_own(table, 0, layout.P_PERMITS), _own(table, 1, layout.P_PERMITS)) == (2, 1)
    b.release()
    assert a.try_acquire(0) == OK  # the permit b gave back is anyone's
    assert a.try_acquire(0) == BUSY
    for _ in range(3):
        a.release()
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0
    assert a.permits == 0 and _own(table, 0, layout.P_PERMITS) == 0


def test_queue_bound_is_gateway_wide() -> None:
    table = _table()
    a, b = _words(table, 0, queue=2), _words(table, 1, queue=2)
    assert a.enter_queue()
    assert b.enter_queue()
    assert not a.enter_queue()
    assert not b.enter_queue()
    assert _global(table, layout.G_ADMIT_QUEUED) == 2
    a.leave_queue()
    assert b.enter_queue()
    assert (a.queued, b.queued) == (0, 2)
    assert _own(table, 1, layout.P_QUEUED) == 2


def test_queue_size_zero_never_queues() -> None:
    table = _table()
    assert not _words(table, 0, queue=0).enter_queue()
    assert _global(table, layout.G_ADMIT_QUEUED) == 0


def test_reclaim_returns_exactly_a_dead_process_permits_and_places() -> None:
    table = _table()
    a, b = _words(table, 0, limit=10, queue=10), _words(table, 1, limit=10, queue=10)
    for _ in range(4):
        assert a.try_acquire(0) == OK
    assert b.try_acquire(0) == OK
    a.enter_queue()
    b.enter_queue()
    b.enter_queue()
    # Process 0 dies holding 4 permits and 1 place in the queue.
    assert admission.reclaim_process(table, 0) == (4, 1)
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 1
    assert _global(table, layout.G_ADMIT_QUEUED) == 2
    assert _own(table, 0, layout.P_PERMITS) == 0
    assert admission.reclaim_process(table, 0) == (0, 0)  # idempotent
    b.release()
    b.leave_queue()
    b.leave_queue()
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0
    assert _global(table, layout.G_ADMIT_QUEUED) == 0


def test_rate_limiter_bursts_to_the_limit_then_spaces_requests() -> None:
    table = _table()
    words = _words(table, 0, limit=5, rate=10)  # T = 100 ms, burst 5
    t0 = 1_000 * NS
    for _ in range(5):
        assert words.rate_take(t0) == 0
    assert words.rate_take(t0) == 100_000_000  # the 6th conforms one interval later
    assert words.rate_take(t0 + 99_999_999) == 1
    assert words.rate_take(t0 + 100_000_000) == 0
    assert words.rate_take(t0 + 100_000_000) == 100_000_000
    # An idle second refills the whole burst, never more.
    t1 = t0 + 10 * NS
    assert [words.rate_take(t1) for _ in range(6)] == [0, 0, 0, 0, 0, 100_000_000]


def test_rate_limiter_admits_the_rate_over_time() -> None:
    table = _table()
    words = _words(table, 0, limit=50, rate=100)
    now = 5 * NS
    admitted = 0
    # Offered 1000/s for 20 s (a try every ms): burst 50, then 100/s.
    for _ in range(20_000):
        if words.rate_take(now) == 0:
            admitted += 1
        now += 1_000_000
    assert admitted == 50 + 2000 - 1 or admitted == 50 + 2000


def test_rate_limit_shared_by_two_processes_words() -> None:
    table = _table()
    a, b = _words(table, 0, limit=2, rate=1), _words(table, 1, limit=2, rate=1)
    now = 10 * NS
    assert a.rate_take(now) == 0
    assert b.rate_take(now) == 0
    assert a.rate_take(now) == NS
    assert b.rate_take(now) == NS


def test_rate_limited_acquire_takes_its_concurrency_permit_back() -> None:
    table = _table()
    words = _words(table, 0, limit=2, rate=1)
    now = 10 * NS
    assert words.try_acquire(now) == OK
    words.release()
    assert words.try_acquire(now) == OK
    words.release()
    assert words.try_acquire(now) == NS  # rate-limited, not busy
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0
    assert words.permits == 0


def _hammer(buf: object, geo_args: tuple[int, int], slot: int, rounds: int, out: object) -> None:
    table = WorkerTable(buf, layout.geometry(*geo_args))  # type: ignore[arg-type]
    words = AdmissionWords.for_table(table, slot, 2, 0, None)  # 4 racers, 2 permits
    holders = table.global_offset(layout.G_PD_QUEUED)  # scratch: counts the holders themselves
    atomic = table.atomic
    peak_seen = 0
    held = 0
    deadline = time.monotonic() + 20.0
    # Until `rounds` acquisitions (a tight loop can starve a racer for a while).
    while held < rounds and time.monotonic() < deadline:
        if words.try_acquire(0) == OK:
            held += 1
            peak_seen = max(peak_seen, atomic.fetch_add_u64(holders, 1) + 1)
            atomic.fetch_sub_u64(holders, 1)
            words.release()
    out.put((held, peak_seen))  # type: ignore[attr-defined]


def test_limit_holds_with_processes_racing_on_one_mapping() -> None:
    """Real processes on one shared mapping: the holders of permits, counted by the
    holders themselves, are never more than the limit, and every permit comes back."""
    table = WorkerTable.create(4, 4, os.getpid())
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(table.buf, (4, 4), slot, 50_000, out))
        for slot in range(4)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert all(held == 50_000 for held, _ in results), results
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0
    assert 1 <= max(peak for _, peak in results) <= 2


def test_effective_limit() -> None:
    assert admission.effective_limit(-1, cores=2) == 4096
    assert admission.effective_limit(-1, cores=8) == 8192
    assert admission.effective_limit(0) == 0
    assert admission.effective_limit(50) == 50
    assert available_cores() >= 1


@pytest.mark.parametrize(
    ("kind", "status", "code", "openai_type", "anthropic_type"),
    [
        (admission.QUEUE_DISABLED, 429, "admission_queue_full", "rate_limit_error", None),
        (admission.QUEUE_FULL, 429, "admission_queue_full", "rate_limit_error", None),
        (admission.QUEUE_TIMEOUT, 503, "admission_queue_timeout", "server_error", None),
    ],
)
def test_refusals_as_smg_sends_them(
    kind: tuple[int, str, str, str],
    status: int,
    code: str,
    openai_type: str,
    anthropic_type: None,
) -> None:
    got_status, got_code, body, headers = admission.refusal(kind, b"chatcmpl-x", False)
    assert (got_status, got_code) == (status, code)
    assert orjson.loads(body) == {
        "error": {"type": openai_type, "code": code, "message": kind[3], "param": None}
    }
    assert headers == b"x-smg-error-code: %s\r\nretry-after: 2\r\n" % code.encode()
    _, _, body, _ = admission.refusal(kind, b"msg_x", True)
    expected = "rate_limit_error" if status == 429 else "overloaded_error"
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": expected, "message": kind[3]},
        "request_id": "msg_x",
    }


def test_the_oldest_waiter_in_any_live_process_goes_first() -> None:
    table = _table()
    a, b, c = _words(table, 0), _words(table, 1), _words(table, 2)
    now = 100 * NS
    assert a.first_in_line(now, now)  # nobody else waits
    a.publish_head(now - 5_000_000, now)  # a's oldest waiter: queued 5 ms ago
    assert not b.first_in_line(now - 1_000_000, now)  # b's is younger: a goes first
    assert b.first_in_line(now - 9_000_000, now)  # b's is older
    assert a.first_in_line(now - 5_000_000, now)  # its own word does not count
    b.publish_head(now - 9_000_000, now)
    assert not a.first_in_line(now - 5_000_000, now)
    assert not c.first_in_line(now, now)
    # A process that stopped trying (stalled, dying) holds no one up past FRESH_NS.
    later = now + admission.FRESH_NS + 1
    assert a.first_in_line(now - 5_000_000, later)
    a.publish_head(0, now)  # a has no waiter any more
    b.publish_head(0, now)
    assert c.first_in_line(now, now)
    # The supervisor clears a dead process's words.
    a.publish_head(now - 5_000_000, now)
    admission.reclaim_process(table, 0)
    assert c.first_in_line(now, now)
    assert not c.anyone_waiting()
    assert a.enter_queue()
    assert c.anyone_waiting()


def test_new_limits_apply_in_place_and_keep_the_count() -> None:
    table = _table()
    words = _words(table, 0, limit=2, queue=2)
    assert words.try_acquire(0) == OK
    assert words.try_acquire(0) == OK
    words.set_limits(1, 2, None)  # lowered below what is held: no one new gets in
    words.release()
    assert words.try_acquire(0) == BUSY
    words.set_limits(3, 2, 1)
    assert words.try_acquire(10 * NS) == OK
    assert (words.interval, words.tolerance) == (NS, 2 * NS)
    words.release()
    words.release()
    assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0


class _App:
    """What Admission needs of the data plane: the admitted and the refused, recorded."""

    def __init__(self) -> None:
        self.admitted: list[str] = []
        self.refused: list[tuple[str, int, str]] = []

    def proxy_admitted(self, conn: _Conn, request: _Request) -> None:
        self.admitted.append(request.name)

    def _send(self, conn: _Conn, request: _Request, status: int, body: bytes, **kw: object) -> None:
        self.refused.append((request.name, status, str(kw["error_code"])))

    def log_error(self, message: str, exc: BaseException | None) -> None:
        raise AssertionError(message) from exc


class _Conn:
    def __init__(self) -> None:
        self.closed = False
        self.exchange: object = None


class _Request:
    def __init__(self, name: str) -> None:
        self.name = name
        self.request_id = name.encode()
        self.path = "/v1/chat/completions"


def test_waiters_fifo_handoff_cancel_and_timeout() -> None:
    table = _table()
    loop = asyncio.new_event_loop()
    try:
        app = _App()
        words = _words(table, 0, limit=1, queue=2)
        adm = admission.Admission(words, app, loop, 0.3)  # type: ignore[arg-type]
        conns = {name: _Conn() for name in "abcdef"}

        def enter(name: str) -> bool:
            return adm.enter(conns[name], _Request(name))  # type: ignore[arg-type]

        def run(seconds: float) -> None:
            loop.run_until_complete(asyncio.sleep(seconds))

        assert enter("a")  # holds the only permit
        assert not enter("b")
        assert not enter("c")
        assert isinstance(conns["b"].exchange, admission.Waiter)
        assert not enter("d")  # the queue (2) is full
        assert app.refused == [("d", 429, "admission_queue_full")]
        run(0.01)
        assert app.admitted == []  # the limit binds
        adm.release()  # a finishes: its permit goes straight to b
        run(0.01)
        assert app.admitted == ["b"]
        assert conns["b"].exchange is None
        assert words.permits == 1 and _global(table, layout.G_ADMIT_IN_FLIGHT) == 1
        conns["c"].exchange.client_gone()  # type: ignore[attr-defined]
        assert words.queued == 0 and _global(table, layout.G_ADMIT_QUEUED) == 0
        assert not enter("e")
        run(0.5)  # e waits past the queue timeout
        assert app.refused[-1] == ("e", 503, "admission_queue_timeout")
        adm.release()  # b finishes: nobody waits, the permit goes back
        assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0
        assert enter("f")
        adm.release()
        assert (adm.allowed, adm.rejected, adm.rejected_full, adm.rejected_timeout) == (3, 2, 1, 1)
        assert (adm.queued_total, adm.cancelled) == (3, 1)
        assert _global(table, layout.G_ADMIT_IN_FLIGHT) == 0
        assert _global(table, layout.G_ADMIT_QUEUED) == 0
    finally:
        loop.close()


def test_a_permit_released_elsewhere_reaches_a_waiter_within_milliseconds() -> None:
    table = _table()
    loop = asyncio.new_event_loop()
    try:
        app = _App()
        other = _words(table, 1, limit=1, queue=2)
        adm = admission.Admission(_words(table, 0, limit=1, queue=2), app, loop, 5.0)  # type: ignore[arg-type]
        assert other.try_acquire(0) == OK  # another process holds the permit
        assert not adm.enter(_Conn(), _Request("w"))  # type: ignore[arg-type]
        loop.run_until_complete(asyncio.sleep(0.02))
        assert app.admitted == []
        other.release()
        started = time.monotonic()
        while not app.admitted and time.monotonic() - started < 2.0:
            loop.run_until_complete(asyncio.sleep(0.001))
        assert app.admitted == ["w"]
        assert time.monotonic() - started < 0.5
    finally:
        loop.close()
