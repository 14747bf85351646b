"""smg.dataplane.loopback alone: requests fed into a real DataPlane (built in this process, as
tests/test_grpc_frontend.py builds one) with no client socket, routed to a real HTTP worker
(aiohttp, 127.0.0.1, a checked free port) in the same event loop: the answer's status,
headers and body come back whole and streamed; the worker sees the caller's headers; a
client that leaves mid-stream (close) stops the worker's request; the deadline holds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from smg.config import GatewayConfig
from smg.control.worker_state import WorkerStatus
from smg.dataplane import loopback
from smg.dataplane.app import DataPlane
from smg.policies.registry import make_policy
from smg.shm.directory import Directory, DirectoryEntry
from smg.shm.layout import FLAG_IN_USE, Row
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec
from tests.gatewayutil import free_port

MODEL = "m"


class Worker:
    """A tiny /v1/chat/completions worker: JSON, a slow event stream, and what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.stream_cancelled = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({"headers": dict(request.headers), "body": body})
        if body.get("hang"):
            await asyncio.sleep(30)
        if not body.get("stream"):
            return web.json_response({"echo": body["messages"][0]["content"]})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            for n in range(body.get("events", 3)):
                await response.write(b"data: %d\n\n" % n)
                await asyncio.sleep(body.get("gap", 0))
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionError):
            self.stream_cancelled.set()  # the gateway closed its worker connection
            raise
        return response


def make_app(port: int, loop: asyncio.AbstractEventLoop) -> DataPlane:
    cfg = GatewayConfig(policy="round_robin", api_key="k1", disable_retries=True)
    table = WorkerTable.create(4, 2, supervisor_pid=os.getpid(), anonymous=False)
    table.write_row(0, Row(1, int(WorkerStatus.READY), FLAG_IN_USE, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
    url = f"http://127.0.0.1:{port}"
    table.publish_directory(
        Directory(
            entries=[
                DirectoryEntry(
                    row=0,
                    generation=1,
                    worker_id="w0",
                    url=url,
                    model_id=None,
                    models=(MODEL,),
                    api_key=None,
                    engine="vllm",
                    context_length=100,
                    spec=WorkerSpec(url=url),
                    grpc=None,
                )
            ]
        )
    )
    table.bump_routing_generation()
    app = DataPlane(cfg, table, 0, os.getpid(), make_policy("round_robin", cfg), loop)
    app.refresh()
    return app


async def rig() -> AsyncIterator[tuple[DataPlane, Worker]]:
    worker = Worker()
    await worker.start()
    app = make_app(worker.port, asyncio.get_running_loop())
    try:
        yield app, worker
    finally:
        for task in list(app.tasks):
            task.cancel()
        for pool in app.pools.values():
            pool.close_all()
        await worker.stop()


AUTH = [(b"authorization", b"Bearer k1"), (b"x-tenant", b"t1"), (b"accept-encoding", b"gzip")]


def chat(content: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_whole_answer_and_headers_carried() -> None:
    async def go() -> None:
        async for app, worker in rig():
            answer = await loopback.request(
                app, b"POST", b"/v1/chat/completions", AUTH, chat("hi"), 5
            )
            try:
                assert answer.status == 200
                assert answer.header(b"content-type") == b"application/json; charset=utf-8"
                assert answer.header(b"x-smg-process") == b"0"
                assert orjson.loads(await answer.body()) == {"echo": "hi"}
            finally:
                answer.close()
            (seen,) = worker.seen
            assert seen["headers"]["Authorization"] == "Bearer k1"
            assert seen["headers"]["x-tenant"] == "t1"
            assert "gzip" not in seen["headers"].get("Accept-Encoding", "")
            await asyncio.sleep(0)
            assert app.connections == set()  # closed with its one answer

    run(go())


def test_auth_applies() -> None:
    async def go() -> None:
        async for app, worker in rig():
            answer = await loopback.request(app, b"POST", b"/v1/chat/completions", [], chat("x"), 5)
            try:
                assert answer.status == 401
                assert orjson.loads(await answer.body())["error"]["code"] == "invalid_api_key"
            finally:
                answer.close()
            assert worker.seen == []

    run(go())


def test_stream_chunks_arrive_live() -> None:
    async def go() -> None:
        async for app, _worker in rig():
            body = chat("s", stream=True, events=3, gap=0.05)
            answer = await loopback.request(app, b"POST", b"/v1/chat/completions", AUTH, body, 5)
            got = b""
            firsts = []
            try:
                async for chunk in answer.chunks():
                    if not got:
                        firsts.append(chunk)
                    got += chunk
            finally:
                answer.close()
            assert got == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
            assert firsts[0].startswith(b"data: 0\n\n") and b"[DONE]" not in firsts[0]

    run(go())


def test_close_mid_stream_stops_the_worker_request() -> None:
    async def go() -> None:
        async for app, worker in rig():
            body = chat("s", stream=True, events=100, gap=0.05)
            answer = await loopback.request(app, b"POST", b"/v1/chat/completions", AUTH, body, 5)
            async for _chunk in answer.chunks():
                break  # the caller's client left
            answer.close()
            await asyncio.wait_for(worker.stream_cancelled.wait(), 5)
            await asyncio.sleep(0.05)
            assert app.active == set() and app.connections == set()

    run(go())


def test_deadline() -> None:
    async def go() -> None:
        async for app, _worker in rig():
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(loopback.LoopbackError, match="timed out"):
                await loopback.request(
                    app, b"POST", b"/v1/chat/completions", AUTH, chat("h", hang=True), 0.5
                )
            assert loop.time() - started < 3
            await asyncio.sleep(0.05)
            assert app.active == set()

    run(go())


def test_build_request() -> None:
    raw = loopback.build_request(
        b"POST",
        b"/v1/responses",
        [(b"Host", b"x"), (b"x-a", b"1"), (b"Content-Length", b"9"), (b"connection", b"keep")],
        b"{}",
    )
    assert raw == (
        b"POST /v1/responses HTTP/1.1\r\nhost: loopback\r\nx-a: 1\r\n"
        b"content-length: 2\r\nconnection: close\r\n\r\n{}"
    )
