"""Upstream edge cases against hand-written workers: pooled connections the worker closes
when idle, and a worker whose load endpoints answer nonsense."""

from __future__ import annotations

import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from gatewayutil import Gateway, in_flight_total

CHAT_BODY = {"model": "raw-model", "messages": [{"role": "user", "content": "hi"}]}
CHAT_ANSWER = orjson.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    }
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": "raw-model", "owned_by": "sglang"}]})


class RawWorker(socketserver.ThreadingTCPServer):
    """A minimal HTTP/1.1 worker. `close_when_idle`: every connection is closed by the
    worker 0.1 s after its answer when no next request came (as an engine's keep-alive
    timer does, only sooner). `nonsense_loads`: load endpoints answer garbage."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *, close_when_idle: bool = False, nonsense_loads: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.close_when_idle = close_when_idle
        self.nonsense_loads = nonsense_loads
        self.lock = threading.Lock()
        self.answered: dict[str, int] = {}
        self.closed_idle = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> None:
        with self.lock:
            self.answered[path] = self.answered.get(path, 0) + 1


class _Handler(socketserver.StreamRequestHandler):
    server: RawWorker

    def handle(self) -> None:
        while True:
            if self.server.close_when_idle and not select.select([self.connection], [], [], 0.1)[0]:
                with self.server.lock:
                    self.server.closed_idle += 1
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            request_line = self.rfile.readline(65536)
            if not request_line:
                return
            length = 0
            while True:
                line = self.rfile.readline(65536)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                self.rfile.read(length)
            path = request_line.split()[1].decode().partition("?")[0]
            status, body, content_type = self._answer(path)
            self.server.count(path)
            self.wfile.write(
                b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                % (status, content_type, len(body), body)
            )
            self.wfile.flush()

    def _answer(self, path: str) -> tuple[int, bytes, bytes]:
        if path == "/health":
            return 200, b"", b"text/plain"
        if path == "/v1/models":
            return 200, MODELS, b"application/json"
        if path in ("/v1/loads", "/get_load", "/metrics"):
            if self.server.nonsense_loads:
                return 200, b"<html>definitely not a load report", b"text/html"
            return 404, b"", b"text/plain"
        if path == "/v1/chat/completions":
            return 200, CHAT_ANSWER, b"application/json"
        return 404, b"{}", b"application/json"


@pytest.fixture
def raw_worker(request: pytest.FixtureRequest) -> Iterator[RawWorker]:
    server = RawWorker(**request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("raw_worker", [{"close_when_idle": True}], indirect=True)
def test_pooled_connection_closed_by_idle_worker_costs_no_request(raw_worker: RawWorker) -> None:
    """The worker closed the pooled connection before the next request: that connection is
    not used (nothing was written on it), and every request is executed exactly once. A
    connection that fails after the request was written is not retried at all:
    tests/test_hardening_upstream.py::test_worker_reset_after_reading_request_is_not_resent."""
    gw = Gateway(["--worker-urls", raw_worker.url, "--disable-health-check"], processes=1)
    gw.start()
    try:
        gw.wait_ready()
        statuses = []
        with httpx.Client(base_url=gw.url, timeout=10.0) as client:
            for _ in range(8):
                statuses.append(client.post("/v1/chat/completions", json=CHAT_BODY).status_code)
                time.sleep(0.3)  # the worker closes the idle connection meanwhile
        assert statuses == [200] * 8, gw.logs()[-2000:]
        assert raw_worker.closed_idle >= 8
        assert raw_worker.answered["/v1/chat/completions"] == 8
        assert in_flight_total(gw) == 0
    finally:
        gw.stop()
        gw.close_log()


@pytest.mark.parametrize("raw_worker", [{"nonsense_loads": True}], indirect=True)
def test_nonsense_load_reports_leave_the_worker_routable(raw_worker: RawWorker) -> None:
    args = [
        "--worker-urls",
        raw_worker.url,
        "--policy",
        "least_load",
        "--load-monitor-interval",
        "1",
        "--log-level",
        "debug",
    ]
    gw = Gateway(args, processes=1)
    gw.start()
    try:
        gw.wait_ready()
        with httpx.Client(base_url=gw.url, timeout=10.0) as client:
            for _ in range(3):
                assert client.post("/v1/chat/completions", json=CHAT_BODY).status_code == 200
            # Let the load monitor scrape the garbage at least twice more.
            deadline_scrapes = raw_worker.answered.get("/v1/loads", 0) + 2
            for _ in range(60):
                if raw_worker.answered.get("/v1/loads", 0) >= deadline_scrapes:
                    break
                threading.Event().wait(0.1)
            assert raw_worker.answered.get("/v1/loads", 0) >= deadline_scrapes
            assert client.post("/v1/chat/completions", json=CHAT_BODY).status_code == 200
            workers = client.get("/workers").json()["workers"]
        assert workers[0]["status"] == "ready"
        assert workers[0]["backend_load"]["valid"] is False
        assert gw.process is not None and gw.process.poll() is None
        assert "unusable load" in gw.logs() or "no usable answer" in gw.logs()
    finally:
        gw.stop()
        gw.close_log()
