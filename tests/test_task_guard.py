"""An unexpected raise inside a task that owns a request is answered at once (500
`internal_error`, 1.13's words for an internal failure) instead of leaving the client to
--request-timeout-secs (1800 s by default), and gives back what the request held.

The HTTP proxy's connect task (`Exchange._connect`): the raise is forced where this
morning's CI hang had it, after the connect (`UpstreamConnection.bind`, just before the
request is written). The gRPC exchange task (`GrpcExchange.run`) already had its own catch
(500 `internal_error`, or the SSE error event once the stream is out).
A PD prefill leg's connect task (`PoolLeg._connect`) gets the same guard; its failure goes
the leg's way (the decode leg is told, which answers the client as for a lost prefill).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvloop

from smg.dataplane.pd import PrefillLeg
from smg.dataplane.testhooks import RAISE_AFTER_CONNECT_ENV
from smg.dataplane.upstream import UpstreamConnection, WorkerPool
from tests import test_grpc_frontend
from tests.gatewayutil import in_flight_total, running_gateway
from tests.test_grpc_front_late_worker import _chat_request, _finish, _plane, http_worker
from tests.test_grpc_frontend import (
    FakeConn,
    Rig,
    Script,
    out,
    split_chunks,
)
from tests.test_pd_prefill_leg import _Decode, _Pd

# The gRPC front's in-process rig (fake engine clients and stages): its `rig` fixture,
# as `grpc_rig` here.
grpc_rig = test_grpc_frontend.rig

_ANSWER = b'{"id":"c1","object":"chat.completion","choices":[]}'


class _Worker(asyncio.Protocol):
    """A worker that answers every request with one small 200."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER)
            )


def _bind_raises(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """UpstreamConnection.bind raises once per item in the returned list (armed with one):
    where the request is about to be written, as the closed handle's RuntimeError of the
    CI hang was."""
    bind = UpstreamConnection.bind
    armed = [1]

    def bind_raises(self: UpstreamConnection, exchange: Any) -> None:
        if armed:
            armed.pop()
            raise RuntimeError("injected: the handle is closed")
        bind(self, exchange)

    monkeypatch.setattr(UpstreamConnection, "bind", bind_raises)
    return armed


def _wait(loop: asyncio.AbstractEventLoop, conn: FakeConn, limit: float) -> float:
    started = time.monotonic()
    while not conn.done and not conn.closed and time.monotonic() - started < limit:
        loop.run_until_complete(asyncio.sleep(0.01))
    return time.monotonic() - started


def test_a_raise_in_the_http_connect_task_answers_500_and_frees_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = uvloop.new_event_loop()
    server, worker = http_worker(loop, _Worker)
    # A 30 s request timeout: an unguarded raise reads as no answer within the 2 s below.
    app = _plane([worker], loop, request_timeout_secs=30)
    armed = _bind_raises(monkeypatch)
    try:
        conn = FakeConn()
        app.proxy(conn, _chat_request())  # type: ignore[arg-type]
        took = _wait(loop, conn, 5.0)
        assert not armed, "the injection point was not reached"
        assert conn.done, f"no answer after {took:.1f} s: left to the request timeout"
        assert took < 2.0
        head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
        assert head.split(b"\r\n", 1)[0] == b"HTTP/1.1 500 Internal Server Error", head
        error = json.loads(body)["error"]
        assert error["code"] == "internal_error", error
        assert set(error) >= {"message", "type", "code"}
        assert b"x-smg-error-code: internal_error" in head.lower()
        # Nothing held: the exchange ended, the row's in-flight count and the pool's
        # connection slots are back.
        loop.run_until_complete(asyncio.sleep(0.05))
        assert not app.active
        assert app.table.in_flight(0) == 0
        for pool in app.pools.values():
            assert pool.connecting == 0 and not pool.open and not pool.waiters
        # The process keeps serving: the next request goes through.
        conn2 = FakeConn()
        app.proxy(conn2, _chat_request())  # type: ignore[arg-type]
        _wait(loop, conn2, 5.0)
        assert bytes(conn2.out).startswith(b"HTTP/1.1 200 OK"), bytes(conn2.out)
        assert bytes(conn2.out).endswith(_ANSWER)
        assert not app.active and app.table.in_flight(0) == 0
        # Its connection is pooled now: the next request gets it inside `handle`, and the
        # raise comes there, not in a task; answered and freed the same way.
        (pool,) = app.pools.values()
        assert len(pool.idle) == 1
        armed.append(1)
        conn3 = FakeConn()
        app.handle(conn3, _chat_request())  # type: ignore[arg-type]
        _wait(loop, conn3, 5.0)
        assert not armed, "the pooled connection was not used"
        assert bytes(conn3.out).startswith(b"HTTP/1.1 500 Internal Server Error"), conn3.out
        assert b'"code":"internal_error"' in bytes(conn3.out)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert not app.active and app.table.in_flight(0) == 0
        assert pool.connecting == 0 and not pool.open and not pool.idle
    finally:
        server.close()
        _finish(app, loop)


def test_a_raise_in_a_prefill_legs_connect_task_fails_the_leg(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = uvloop.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Worker, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    pool = WorkerPool(
        loop, "127.0.0.1", port, max_connections=1, idle_timeout=5.0, connect_timeout=1.0
    )
    errors: list[str] = []
    pd, decode = _Pd(), _Decode()
    app: Any = SimpleNamespace(
        pd=pd, spawn=loop.create_task, log_error=lambda message, exc: errors.append(message)
    )
    armed = _bind_raises(monkeypatch)
    head = b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n"
    leg = PrefillLeg(app, decode, 3, 7, pool, head, b"{}", url, False)  # type: ignore[arg-type]
    decode.prefill = leg
    try:
        leg.start()
        deadline = time.monotonic() + 5.0
        while not leg.done and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.01))
        assert not armed, "the injection point was not reached"
        assert leg.done, "the leg was left to the request timeout"
        # Told as a lost prefill (the decode answers the client), logged once, and its
        # connection dropped: the pool's one slot is free for the next leg.
        assert decode.failed == [url] and pd.legs_done == [(3, 7, 0)]
        assert errors == ["upstream leg failed"]
        loop.run_until_complete(asyncio.sleep(0.05))
        assert pool.connecting == 0 and not pool.open and not pool.waiters
        # The next leg on the same pool goes through.
        decode2 = _Decode()
        leg2 = PrefillLeg(app, decode2, 3, 7, pool, head, b"{}", url, False)  # type: ignore[arg-type]
        decode2.prefill = leg2
        leg2.start()
        deadline = time.monotonic() + 5.0
        while not leg2.complete and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.01))
        assert leg2.complete and leg2.status == 200 and decode2.failed == []
        leg2.abort()
    finally:
        server.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()


def test_the_guards_500_end_to_end_through_smg_launch(tmp_path: Path) -> None:
    """Two data-plane processes, each with the test hook armed: while the marker exists,
    every proxied chat's connect task raises; each is answered 500 `internal_error` at
    once, and once it is gone both processes serve again with nothing left in flight."""
    marker = tmp_path / "raise"
    marker.touch()
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        "SMG__TEST_HOOKS": "1",
        RAISE_AFTER_CONNECT_ENV: str(marker),
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    # A hang would read as no answer within the client's 10 s, long before the 45 s timeout.
    args = ["--mock-workers", "1", "--request-timeout-secs", "45"]
    with running_gateway(args, processes=2, env=env) as gw:
        gw.wait_ready()
        failed: set[str] = set()
        answered = 0
        with httpx.Client(base_url=gw.url, timeout=10.0) as client:
            for _ in range(40):  # new connections spread over both processes
                started = time.monotonic()
                response = client.post(
                    "/v1/chat/completions", json=chat, headers={"connection": "close"}
                )
                assert time.monotonic() - started < 2.0
                assert response.status_code == 500, response.text
                error = response.json()["error"]
                assert error["code"] == "internal_error", error
                assert set(error) >= {"message", "type", "code"}
                assert response.headers["x-smg-error-code"] == "internal_error"
                failed.add(response.headers["x-smg-process"])
                answered += 1
                if len(failed) == 2:
                    break
            assert failed == {"0", "1"}
            marker.unlink()
            served: set[str] = set()
            for _ in range(40):
                response = client.post(
                    "/v1/chat/completions", json=chat, headers={"connection": "close"}
                )
                assert response.status_code == 200, response.text
                served.add(response.headers["x-smg-process"])
                if len(served) == 2:
                    break
            assert served == {"0", "1"}
        assert in_flight_total(gw) == 0
        assert gw.process is not None and gw.process.poll() is None
        logs = gw.logs()
        # Logged once each, with the traceback.
        assert logs.count("proxied request failed") == answered, logs[-3000:]
        assert logs.count("RuntimeError: test hook:") == answered, logs[-3000:]


def test_a_raise_in_the_grpc_exchange_task_answers_500_and_frees_the_request(grpc_rig: Rig) -> None:
    """GrpcExchange.run's own catch (it predates the HTTP guard): an unexpected raise from
    the engine call before any output is 500 `internal_error`; the next request is served."""
    grpc_rig.client(0).scripts.append(Script(error=RuntimeError("injected")))  # type: ignore[arg-type]
    grpc_rig.client(1).scripts.append(Script(error=RuntimeError("injected")))  # type: ignore[arg-type]
    conn, exchange = grpc_rig.start({"prompt": "p"})
    started = time.monotonic()
    grpc_rig.run(exchange, timeout=2.0)
    assert time.monotonic() - started < 2.0
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error"), head
    assert json.loads(body)["error"]["code"] == "internal_error"
    assert conn.done and not grpc_rig.app.active and grpc_rig.in_flight() == {0: 0, 1: 0}
    for row in (0, 1):
        grpc_rig.client(row).scripts[:] = [Script([out(0, [7], finished=True, reason="stop")])]
    conn2, exchange2 = grpc_rig.start({"prompt": "p"})
    grpc_rig.run(exchange2)
    assert bytes(conn2.out).startswith(b"HTTP/1.1 200 OK")
    assert not grpc_rig.app.active and grpc_rig.in_flight() == {0: 0, 1: 0}


def test_a_raise_in_the_grpc_exchange_task_after_the_head_ends_the_stream(grpc_rig: Rig) -> None:
    """Once the stream's head is out, the raise ends the stream with 1.13's SSE error
    event (`internal_error`) and the last chunk; nothing is left counted."""
    grpc_rig.client(0).scripts.append(Script([out(0, [1])], error=RuntimeError("injected")))  # type: ignore[arg-type]
    conn, exchange = grpc_rig.start({"prompt": "p", "stream": True})
    grpc_rig.run(exchange, timeout=2.0)
    head, chunks = split_chunks(bytes(conn.out))
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"internal_error" in chunks[-1], chunks
    assert conn.done and not grpc_rig.app.active and grpc_rig.in_flight() == {0: 0, 1: 0}
