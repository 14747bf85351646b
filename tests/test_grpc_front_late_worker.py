"""A gRPC worker that appears between two sweeps of a data-plane process, and an upstream
connection closed before its request went out: the two halves of a rare hang of
tests/test_discovery_detect.py (a chat through a just-discovered gRPC worker that never
got an answer).

1. A data-plane process makes its gRPC front when it reads a directory listing a gRPC
   worker (the sweep, every 0.25 s). `DataPlane.proxy` checked for the front before it
   read the directory, so a request that came first took the HTTP proxy path: HTTP/1.1
   to the engine's HTTP/2 port.
2. There the engine's SETTINGS frame arrives before any request, so the upstream
   connection closes itself; when its connection_lost ran before the connect task went
   on, `Exchange.got_connection` wrote to a closed uvloop handle: RuntimeError in the
   task, and the client waited for the request timeout (1800 s by default).

Each is forced here: in-process (the request before the sweep; the connect task resumed
only after the close), and end to end through `smg launch` (the data plane's loop held by
the test hook while discovery registers the worker, the chat pipelined behind the hold).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvloop

from smg.config import GatewayConfig
from smg.control.worker_state import WorkerStatus
from smg.dataplane.app import DataPlane
from smg.dataplane.server import Request
from smg.dataplane.upstream import WorkerPool
from smg.grpc.frontend import GrpcExchange
from smg.policies.registry import make_policy
from smg.shm.directory import Directory, DirectoryEntry
from smg.shm.layout import FLAG_IN_USE, Row
from smg.shm.table import WorkerTable
from tests import grpcmockutil
from tests.gatewayutil import running_gateway
from tests.test_grpc_frontend import MODEL, FakeConn, entry


def _plane(entries: list[DirectoryEntry], loop: asyncio.AbstractEventLoop, **cfg: Any) -> DataPlane:
    config = GatewayConfig(policy="round_robin", **cfg)
    table = WorkerTable.create(4, 2, supervisor_pid=os.getpid(), anonymous=False)
    for e in entries:
        table.write_row(
            e.row, Row(1, int(WorkerStatus.READY), FLAG_IN_USE, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        )
    table.publish_directory(Directory(entries=entries))
    table.bump_routing_generation()
    app = DataPlane(config, table, 0, os.getpid(), make_policy("round_robin", config), loop)
    app.refresh()
    return app


def _chat_request() -> Request:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    request = Request(b"POST", b"/v1/chat/completions", headers, body.encode(), True, "1.1")
    request.request_id = b"rid-1"
    request.trace = None
    return request


def _finish(app: DataPlane, loop: asyncio.AbstractEventLoop) -> None:
    for task in list(app.tasks):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()


def test_a_grpc_worker_listed_since_the_last_sweep_gets_the_grpc_path() -> None:
    loop = uvloop.new_event_loop()
    app = _plane([], loop)
    assert app.grpc is None
    # The control plane registers a gRPC worker; this process has not swept since.
    app.table.write_row(
        0, Row(1, int(WorkerStatus.READY), FLAG_IN_USE, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    )
    app.table.publish_directory(Directory(entries=[entry(0)]))
    app.table.bump_routing_generation()
    conn = FakeConn()
    request = _chat_request()
    try:
        app.proxy(conn, request)  # type: ignore[arg-type]
        assert isinstance(conn.exchange, GrpcExchange), "the HTTP proxy path took it"
    finally:
        _finish(app, loop)


def http_worker(
    loop: asyncio.AbstractEventLoop, protocol: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.AbstractServer, DirectoryEntry]:
    """A loopback server on `loop` speaking `protocol`, and an HTTP worker entry for it."""
    server = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    plain = entry(0, grpc=False)
    spec = msgspec.structs.replace(plain.spec, url=url)
    return server, msgspec.structs.replace(plain, url=url, spec=spec)


class _SettingsFirst(asyncio.Protocol):
    """An HTTP/2 server's first move: SETTINGS on accept, before any request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # type: ignore[attr-defined]


def test_a_connection_closed_before_the_request_is_answered_not_left_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = uvloop.new_event_loop()
    server, worker = http_worker(loop, _SettingsFirst)
    app = _plane([worker], loop, retry_initial_backoff_ms=1, retry_max_backoff_ms=2)
    connect = WorkerPool.connect

    async def resumed_late(self: WorkerPool) -> Any:
        # The interleaving a loaded process sees: the connect task goes on only after the
        # server's bytes came and the connection's close ran.
        conn = await connect(self)
        await asyncio.sleep(0.05)
        return conn

    monkeypatch.setattr(WorkerPool, "connect", resumed_late)
    conn = FakeConn()
    request = _chat_request()
    try:
        app.proxy(conn, request)  # type: ignore[arg-type]
        deadline = time.monotonic() + 5.0
        while not conn.done and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.02))
        assert conn.done, "no answer: the exchange was left to the request timeout"
        head = bytes(conn.out).split(b"\r\n", 1)[0]
        assert head == b"HTTP/1.1 502 Bad Gateway", bytes(conn.out)
        assert b"upstream_connection_closed" in bytes(conn.out)
    finally:
        server.close()
        _finish(app, loop)


def _pipelined(port: int, requests: list[bytes], timeout: float) -> list[tuple[int, bytes]]:
    """Send `requests` in one write on one connection; (status, body) of each answer."""
    answers: list[tuple[int, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(requests))
        data = b""
        deadline = time.monotonic() + timeout
        while len(answers) < len(requests):
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                head = data[:head_end].decode("latin-1").lower()
                length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
                end = head_end + 4 + length
                if len(data) >= end:
                    answers.append((int(head.split(" ", 2)[1]), data[head_end + 4 : end]))
                    data = data[end:]
                    continue
            assert time.monotonic() < deadline, f"answers so far: {answers}"
            chunk = sock.recv(65536)
            assert chunk, f"the gateway closed the connection; answers so far: {answers}"
            data += chunk
    return answers


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def _healthy(metrics_url: str, url: str) -> bool:
    """Whether the control plane's /metrics says `url` is Ready (its scrape of a held data
    plane waits 2 s for it, then answers without it)."""
    try:
        text = httpx.get(metrics_url, timeout=10.0).text
    except httpx.HTTPError:
        return False
    return any(
        line.startswith("smg_worker_health{") and f'"{url}"' in line and line.endswith(" 1")
        for line in text.splitlines()
    )


def test_a_chat_right_after_discovery_registers_a_grpc_worker(tmp_path: Path) -> None:
    model_dir = grpcmockutil.llama3_dir(tmp_path / "llama3")
    manifest = tmp_path / "workers.json"
    manifest.write_text(json.dumps({"version": 1, "workers": []}))
    hold = 10.0  # the data plane's loop is held this long while the worker is registered
    args = [
        *("--discovery-provider", "file", "--discovery-file", str(manifest)),
        *("--tokenizer-path", str(model_dir)),
        *("--dataplane-heartbeat-timeout-secs", "60"),
        # A hang shows as a 504 within the test's wait, not as a client timeout.
        *("--request-timeout-secs", "45"),
    ]
    with (
        grpcmockutil.start_grpc_mock(model_dir, backend="sglang", model="llama3") as mock,
        running_gateway(args, processes=1, env={"SMG__TEST_HOOKS": "1"}) as gw,
    ):
        chat = json.dumps(
            {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        ).encode()
        url = f"grpc://{mock.target}"
        result: dict[str, Any] = {}

        async def drive() -> None:
            sent = asyncio.to_thread(
                _pipelined,
                gw.port,
                [
                    _post(f"/__smg_test/block_loop?seconds={hold:g}", b""),
                    _post("/v1/chat/completions", chat),
                ],
                hold + 60.0,
            )
            task = asyncio.ensure_future(sent)
            await asyncio.sleep(0.5)  # the hold has begun: the process reads nothing now
            listed = tmp_path / "listed.json"
            listed.write_text(json.dumps({"version": 1, "workers": [{"url": mock.target}]}))
            os.replace(listed, manifest)  # whole at once: the watcher never reads half
            while not task.done():
                if await asyncio.to_thread(_healthy, gw.metrics_url, url):
                    result["ready_in_hold"] = not task.done()
                    break
                await asyncio.sleep(0.1)
            result["answers"] = await task

        asyncio.run(drive())
        assert result.get("ready_in_hold"), "the worker was not Ready while the loop was held"
        (blocked, _), (status, body) = result["answers"]
        assert blocked == 200
        assert status == 200, body
        assert json.loads(body)["object"] == "chat.completion"
        assert mock.stats()["generate"] == 1
