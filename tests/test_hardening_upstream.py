"""Upstream side of the data plane against misbehaving workers (real gateway processes,
hand-written workers on 127.0.0.1 from `upstreamfault`)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import httpx
import orjson
from gatewayutil import Gateway, free_port, in_flight_total
from upstreamfault import CHAT_BODY, FaultWorker, answer, parse_head, raw_exchange, reset

from smg.dataplane.upstream import REUSE_CHECK_AFTER, WorkerPool

BODY = orjson.dumps(CHAT_BODY)


def _gateway(worker_url: str, *extra: str) -> Gateway:
    gw = Gateway(["--worker-urls", worker_url, "--disable-health-check", *extra], processes=1)
    gw.start()
    gw.wait_ready()
    return gw


def _post(path: str = "/v1/chat/completions", version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST %b HTTP/%b\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%b\r\n%b" % (path.encode(), version, len(BODY), extra, BODY)
    )


# --- item 8: the gateway's own upstream-failure answers --------------------------------------


def _assert_error_answer(gw: Gateway, status: int, code: str, request_id: bytes) -> None:
    """The gateway's own error answer, every header line parsed (item 8: a missing CRLF
    once glued x-request-id and x-smg-process into one line)."""
    extra = b"x-request-id: " + request_id + b"\r\nconnection: close\r\n"
    got, headers, _ = parse_head(raw_exchange(gw.port, _post(extra=extra)))
    assert got == status
    assert headers["x-smg-error-code"] == code
    assert headers["x-request-id"] == request_id.decode()
    assert headers["x-smg-process"] == "0"


def test_connect_failure_answer_has_well_formed_headers() -> None:
    gw = Gateway(
        ["--worker-urls", f"http://127.0.0.1:{free_port()}", "--disable-health-check"],
        processes=1,
    )
    gw.start()
    try:
        gw.wait_ready()
        _assert_error_answer(gw, 502, "upstream_connect_failed", b"rid-502")
    finally:
        gw.stop()
        gw.close_log()


def test_timeout_answer_has_well_formed_headers() -> None:
    def never_answer(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        time.sleep(3)
        return False

    with FaultWorker(never_answer) as worker:
        gw = _gateway(worker.url, "--request-timeout-secs", "1")
        try:
            _assert_error_answer(gw, 504, "upstream_timeout", b"rid-504")
        finally:
            gw.stop()
            gw.close_log()


# --- item 9: no transparent re-send of a request the worker may have read ------------------


def test_worker_reset_after_reading_request_is_not_resent() -> None:
    def reset_second(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        if req == 1:
            sock.sendall(answer(b'{"n":1}'))
            return True
        time.sleep(0.5)  # "worked" on it, then crashed
        reset(sock)
        return False

    with FaultWorker(reset_second) as worker:
        # With retries off (issue 7 retries resets before the head: tests/test_retries.py).
        gw = _gateway(worker.url, "--disable-retries")
        try:
            with httpx.Client(base_url=gw.url, timeout=10.0) as client:
                first = client.post("/v1/chat/completions", json=CHAT_BODY)
                second = client.post("/v1/chat/completions", json=CHAT_BODY)
            assert first.status_code == 200
            assert second.status_code == 502
            assert second.headers["x-smg-error-code"] == "upstream_connection_closed"
            assert worker.posts == 2  # executed once each: the second was not sent again
            assert in_flight_total(gw) == 0
        finally:
            gw.stop()
            gw.close_log()


def test_pooled_connection_closed_by_peer_is_not_reused_even_before_the_loop_sees_it() -> None:
    """The close reached the kernel but the loop has not run since: take_idle must see it."""

    async def scenario() -> tuple[Any, Any, int]:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            pool = WorkerPool(
                loop, "127.0.0.1", port, max_connections=2, idle_timeout=0, connect_timeout=5
            )
            conns = []
            peers = []
            for _ in range(2):
                assert pool.reserve()
                conns.append(await pool.connect())
                peers.append(server.accept()[0])
            for conn in conns:
                pool.put_idle(conn)
            peers[1].close()  # the most recently pooled one: take_idle tries it first
            time.sleep(REUSE_CHECK_AFTER + 0.1)  # the FIN arrives; the loop does not run
            taken = pool.take_idle()
            closed = conns[1].closed
            open_count = len(pool.open)
            peers[0].close()
            pool.close_all()
            await asyncio.sleep(0.05)
            return taken is conns[0], closed, open_count

    took_live, closed_dead, open_count = asyncio.run(scenario())
    assert took_live
    assert closed_dead
    assert open_count == 1


# --- item 10: exactly one final response per request ----------------------------------------


def test_second_response_in_the_same_read_is_not_relayed() -> None:
    def two_answers(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        sock.sendall(answer(b'{"n":"first"}') + answer(b'{"n":"stray"}'))
        return True

    with FaultWorker(two_answers) as worker:
        gw = _gateway(worker.url)
        try:
            with httpx.Client(base_url=gw.url, timeout=10.0) as client:
                bodies = [
                    client.post("/v1/chat/completions", json=CHAT_BODY).content for _ in range(3)
                ]
            assert bodies == [b'{"n":"first"}'] * 3
            # Each upstream connection that said too much was closed, never reused.
            assert len(worker.post_connections) == 3
            deadline = time.monotonic() + 5
            while len(worker.eofs) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(worker.eofs) == sorted(worker.post_connections)
        finally:
            gw.stop()
            gw.close_log()


def test_garbage_after_response_is_not_relayed() -> None:
    def garbage(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        sock.sendall(answer(b'{"n":"first"}') + b"\x00\x01garbage")
        return True

    with FaultWorker(garbage) as worker:
        gw = _gateway(worker.url)
        try:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
                for _ in range(2):  # the client connection stays usable
                    sock.sendall(_post())
                    received = b""
                    while b"\r\n\r\n" not in received or not received.endswith(b"}"):
                        chunk = sock.recv(65536)
                        assert chunk, received
                        received += chunk
                    status, _headers, rest = parse_head(received)
                    assert status == 200
                    assert rest == b'{"n":"first"}'
            assert worker.posts == 2
            assert len(worker.post_connections) == 2  # the one that said too much was closed
        finally:
            gw.stop()
            gw.close_log()


def test_interim_responses_are_dropped_and_the_final_one_relayed() -> None:
    def interim(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
        time.sleep(0.1)
        sock.sendall(answer(b'{"n":"final"}'))
        return True

    with FaultWorker(interim) as worker:
        gw = _gateway(worker.url)
        try:
            raw = raw_exchange(gw.port, _post(extra=b"connection: close\r\n"), timeout=5)
            status, headers, rest = parse_head(raw)
            assert status == 200
            assert rest == b'{"n":"final"}'
            assert b"103" not in raw.split(b"\r\n", 1)[0]
            assert "link" not in headers
            assert worker.posts == 1
        finally:
            gw.stop()
            gw.close_log()


# --- item 11: the pool cap holds under a burst ----------------------------------------------


def test_pool_cap_holds_for_a_burst_in_one_loop_turn() -> None:
    def slow(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        time.sleep(0.05)
        sock.sendall(answer(b'{"ok":true}'))
        return True

    with FaultWorker(slow) as worker:
        gw = _gateway(worker.url, "--upstream-pool-max-per-worker", "2")
        try:
            clients = [
                socket.create_connection(("127.0.0.1", gw.port), timeout=20) for _ in range(30)
            ]
            try:
                time.sleep(0.3)  # all accepted
                request = _post(extra=b"connection: close\r\n")
                # Stopped while the burst is sent, the data plane finds all 30 requests
                # readable in one poll: they are dispatched in one loop turn.
                assert gw.process is not None
                os.killpg(gw.process.pid, signal.SIGSTOP)
                try:
                    for sock in clients:
                        sock.sendall(request)
                    time.sleep(0.2)
                finally:
                    os.killpg(gw.process.pid, signal.SIGCONT)
                statuses = []
                for sock in clients:
                    received = b""
                    while chunk := sock.recv(65536):
                        received += chunk
                    statuses.append(parse_head(received)[0])
            finally:
                for sock in clients:
                    sock.close()
            assert statuses == [200] * 30
            assert worker.posts == 30
            assert worker.max_posting == 2
            assert len(worker.post_connections) == 2
        finally:
            gw.stop()
            gw.close_log()


# --- item 4: HTTP/1.0 clients never get chunked framing -------------------------------------

_SSE = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


def _stream_chunked(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
    sock.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for event in _SSE:
        sock.sendall(b"%x\r\n%b\r\n" % (len(event), event))
        time.sleep(0.02)
    sock.sendall(b"0\r\n\r\n")
    return True


def _stream_close_delimited(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
    for event in _SSE:
        sock.sendall(event)
        time.sleep(0.02)
    return False


def test_http10_client_gets_streams_close_delimited() -> None:
    for script in (_stream_chunked, _stream_close_delimited):
        with FaultWorker(script) as worker:
            gw = _gateway(worker.url)
            try:
                # No "connection: close" from the client: the gateway must close by itself.
                raw = raw_exchange(
                    gw.port, _post(version=b"1.0", extra=b"connection: keep-alive\r\n")
                )
                status, headers, rest = parse_head(raw)
                assert status == 200
                assert "transfer-encoding" not in headers
                assert "content-length" not in headers
                assert headers["connection"] == "close"
                assert rest == b"".join(_SSE)
                # HTTP/1.1 clients still get chunked framing.
                raw11 = raw_exchange(gw.port, _post(extra=b"connection: close\r\n"))
                status11, headers11, _ = parse_head(raw11)
                assert status11 == 200
                assert headers11["transfer-encoding"] == "chunked"
            finally:
                gw.stop()
                gw.close_log()


# --- item 7 (upstream half): head and body written apart, then released ------------------------


class _Transport:
    def __init__(self) -> None:
        self.writes: list[tuple[bytes, ...]] = []

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.writes.append(tuple(parts))

    def write(self, data: bytes) -> None:
        self.writes.append((data,))

        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_exchange_writes_a_large_body_apart_and_drops_it() -> None:
    """Item 7: a large body goes upstream as the request's own buffer (never copied) and
    the exchange lets go of it once written; a small one goes in one write with the head."""
    from types import SimpleNamespace

    from smg.dataplane.exchange import SMALL_BODY_BYTES, Exchange

    head = b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 5\r\n\r\n"
    for body, expected in (
        (bytearray(b"x" * (SMALL_BODY_BYTES + 1)), "apart"),
        (b"hello", "joined"),
    ):
        app = SimpleNamespace(request_timeout=5.0)
        client = SimpleNamespace(write_paused=False)
        transport = _Transport()
        conn = SimpleNamespace(transport=transport, closed=False, bind=lambda exchange: None)
        exchange = Exchange(
            app,  # type: ignore[arg-type]
            client,  # type: ignore[arg-type]
            0,
            1,
            None,  # type: ignore[arg-type]
            head,
            body,  # type: ignore[arg-type]
            b"rid",
            "/v1/chat/completions",
            "m",
            False,
            True,
            False,
        )
        exchange.got_connection(conn)  # type: ignore[arg-type]
        if expected == "apart":
            assert transport.writes == [(head, body)]
            assert transport.writes[0][1] is body  # the request's own bytes, not a copy
        else:
            assert transport.writes == [(head + body,)]
        assert exchange.head is None and exchange.body is None


def test_connection_paused_for_a_slow_client_is_pooled_reading() -> None:
    """The response completed while the client's back-pressure paused the upstream
    reads: the connection goes back to the pool reading again, or the next request on it
    would never see its answer."""
    from types import SimpleNamespace

    from smg.dataplane.exchange import Exchange
    from smg.dataplane.metrics import DataPlaneMetrics

    released: list[bool] = []
    finished: list[int] = []
    app = SimpleNamespace(
        request_timeout=5.0,
        process_header=b"x-smg-process: 0\r\n",
        draining=False,
        cors=None,
        metrics=DataPlaneMetrics(),
        exchange_finished=lambda exchange, status, code: finished.append(status),
    )
    client = SimpleNamespace(
        write_paused=True, write=lambda data: None, response_done=lambda k: None
    )
    transport = _Transport()
    conn = SimpleNamespace(
        transport=transport,
        closed=False,
        bind=lambda exchange: None,
        release=lambda reusable: released.append(transport.paused),
    )
    exchange = Exchange(
        app,  # type: ignore[arg-type]
        client,  # type: ignore[arg-type]
        0,
        1,
        None,  # type: ignore[arg-type]
        b"GET / HTTP/1.1\r\n\r\n",
        b"",
        b"rid",
        "/v1/chat/completions",
        "m",
        False,
        True,
        False,
    )
    exchange.got_connection(conn)  # type: ignore[arg-type]
    assert transport.paused  # the client is slow: upstream reads wait for it
    exchange.response_head(200, [(b"content-length", b"2")])
    exchange.response_body(b"ok")
    exchange.response_complete(True)
    exchange.flush()
    assert finished == [200]
    assert released == [False]  # resumed before it went back to the pool


def test_unrequested_switching_protocols_is_a_502() -> None:
    def upgrade(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        )
        time.sleep(0.5)
        return False

    with FaultWorker(upgrade) as worker:
        gw = _gateway(worker.url)
        try:
            raw = raw_exchange(gw.port, _post(extra=b"connection: close\r\n"), timeout=5)
            status, headers, _ = parse_head(raw)
            assert status == 502
            assert headers["x-smg-error-code"] == "upstream_invalid_response"
            assert "upgrade" not in headers
            assert "Traceback" not in gw.logs()
        finally:
            gw.stop()
            gw.close_log()
