"""smg.dataplane.pd.PrefillLeg's two ways of ending unanswered, with a real WorkerPool and
fakes around it: an abort (the decode leg ended first) may find the leg still queued for a
pool connection and takes it out of that queue; a failure (from the connect or the
connection) drops the connection and tells the decode leg, which an abort does not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from smg.dataplane.pd import PrefillLeg
from smg.dataplane.upstream import WorkerPool

URL = "http://127.0.0.1:9"


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Conn:
    """An upstream connection as the leg sees it."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.closed = False
        self.bound: object = None
        self.aborted = False
        self.released: list[bool] = []

    def bind(self, exchange: object) -> None:
        self.bound = exchange

    def abort(self) -> None:
        self.aborted = True

    def release(self, reusable: bool) -> None:
        self.released.append(reusable)


class _Pd:
    def __init__(self) -> None:
        self.legs_done: list[tuple[int, int, int]] = []

    def leg_done(self, row: int, generation: int, outcome: int, dispatched: bool) -> None:
        assert dispatched
        self.legs_done.append((row, generation, outcome))


class _Decode:
    def __init__(self) -> None:
        self.prefill: PrefillLeg | None = None
        self.failed: list[str] = []

    def prefill_failed(self, url: str) -> None:
        self.failed.append(url)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _leg(pool: WorkerPool) -> tuple[PrefillLeg, _Decode, _Pd]:
    pd = _Pd()
    decode = _Decode()
    app: Any = SimpleNamespace(pd=pd)
    head = b"POST /generate HTTP/1.1\r\n\r\n"
    leg = PrefillLeg(app, decode, 3, 7, pool, head, b"{}", URL, False)  # type: ignore[arg-type]
    decode.prefill = leg
    return leg, decode, pd


def _pool(loop: asyncio.AbstractEventLoop) -> WorkerPool:
    return WorkerPool(
        loop, "127.0.0.1", 9, max_connections=1, idle_timeout=5.0, connect_timeout=1.0
    )


def test_abort_while_waiting_for_a_pool_connection_cancels_that_wait(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = _pool(loop)
    pool.connecting = 1  # the one slot is taken: the leg queues
    leg, decode, pd = _leg(pool)
    leg.start()
    assert list(pool.waiters) == [leg]
    leg.abort()
    # Out of the queue: a slot freed later goes to no one (it would reach a dead leg).
    assert list(pool.waiters) == []
    assert leg.done and pd.legs_done == [(3, 7, 0)]
    assert decode.failed == []  # the decode leg ended it: nothing to tell it
    leg.abort()  # once only
    assert pd.legs_done == [(3, 7, 0)]


@pytest.mark.parametrize("end", ["upstream_failed", "upstream_lost", "abort"])
def test_ending_after_connecting_drops_the_connection(
    loop: asyncio.AbstractEventLoop, end: str
) -> None:
    pool = _pool(loop)
    waiting, _, _ = _leg(pool)
    pool.waiters.append(waiting)  # another request queued on the same pool: left alone
    leg, decode, pd = _leg(pool)
    conn = _Conn()
    leg.got_connection(conn)  # type: ignore[arg-type]
    assert conn.bound is leg and conn.transport.written
    if end == "upstream_failed":
        leg.upstream_failed("reset")
    elif end == "upstream_lost":
        leg.upstream_lost(conn)  # type: ignore[arg-type]
    else:
        leg.abort()
    # Mid-request: aborted (unless it closed itself), never given back for reuse.
    assert conn.aborted == (end != "upstream_lost") and conn.released == []
    assert leg.upstream is None and leg.done and pd.legs_done == [(3, 7, 0)]
    assert list(pool.waiters) == [waiting]
    # A failure is the decode's to answer (1.13's error); an abort came from the decode.
    assert decode.failed == ([] if end == "abort" else [URL])
    leg.upstream_failed("again")  # once only
    assert pd.legs_done == [(3, 7, 0)] and len(decode.failed) <= 1


def test_a_failure_of_an_attempt_that_was_replaced_is_not_reported(
    loop: asyncio.AbstractEventLoop,
) -> None:
    leg, decode, pd = _leg(_pool(loop))
    conn = _Conn()
    leg.got_connection(conn)  # type: ignore[arg-type]
    decode.prefill = None  # the pair was retried: a new leg is the decode's now
    leg.upstream_failed("reset")
    assert conn.aborted and pd.legs_done == [(3, 7, 0)] and decode.failed == []
