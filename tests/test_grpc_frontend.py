"""The gRPC front end's orchestration (smg.grpc.frontend.GrpcExchange), driven in-process.

A real DataPlane (its routing, gate, in-flight counts, metrics and exchange_finished) over
an in-memory worker table with two gRPC workers; the stages (prepare, render, tokenize,
respond), the engine clients and the client connection are in-memory fakes. What is
checked: SSE framing, the accounting of every attempt, retries before the first token,
errors after it, client disconnect -> Abort, the deadline, back-pressure, the HTTP path
left alone, and token ids handed to routing."""

from __future__ import annotations

import asyncio
import os
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from smg.config import GatewayConfig
from smg.control.worker_state import WorkerStatus
from smg.dataplane.app import DataPlane
from smg.grpc import respond
from smg.grpc.frontend import GrpcExchange, GrpcFront, stream_error_event
from smg.grpc.offload import Offload
from smg.grpc.types import EngineError, EngineOutput, GrpcModelInfo, SamplingParams
from smg.policies.registry import make_policy
from smg.shm.directory import Directory, DirectoryEntry
from smg.shm.layout import FLAG_IN_USE, Row
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec

MODEL = "m"


# --- fakes ------------------------------------------------------------------------------------


class FakeRequestError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FakeDelta:
    index: int
    text: str
    finish_reason: str | None


class FakeChoice:
    def __init__(self, index: int, stop_after: int | None) -> None:
        self.index = index
        self.stop_after = stop_after  # a "gateway-side stop" after this many tokens
        self.seen = 0
        self.ended = False

    def on_output(self, out: EngineOutput) -> FakeDelta:
        self.seen += len(out.token_ids)
        text = "".join(f"<{t}>" for t in out.token_ids)
        if self.stop_after is not None and self.seen >= self.stop_after:
            self.ended = True
            return FakeDelta(self.index, text, "stop")
        if out.finished:
            self.ended = True
        return FakeDelta(self.index, text, out.finish_reason)

    def done(self) -> bool:
        return self.ended


class FakeWriter:
    index_offset = 0  # a batched completion's prompt: where its choices' numbers start

    def start(self) -> bytes:
        return b"data: start\n\n"

    def delta(self, d: FakeDelta) -> bytes:
        index = d.index + self.index_offset
        return b"data: %d %b %b\n\n" % (index, d.text.encode(), (d.finish_reason or "-").encode())

    def end(self, usage: tuple[int, int, int]) -> bytes:
        return b"data: usage %d %d %d\n\ndata: [DONE]\n\n" % usage


def _batch_body(parts, request_id, model, created, tokenizer, choices, usage) -> bytes:  # type: ignore[no-untyped-def]
    texts = ["".join(d.text for d in deltas) for per_prompt in choices for deltas in per_prompt]
    return orjson.dumps({"id": request_id, "model": model, "texts": texts, "usage": usage})


class FakeStages:
    request_error = FakeRequestError
    # a batched completion's helpers (the real index arithmetic)
    prepare_mod = SimpleNamespace(
        batch_part=lambda p, prompt: SimpleNamespace(
            **{**vars(p), "prompt": prompt, "prompts": None}
        )
    )
    respond = SimpleNamespace(
        batch_index=respond.batch_index,
        summed_usage=lambda usages: tuple(map(sum, zip(*usages, strict=True))),
        completion_batch_body=_batch_body,
    )

    def __init__(self) -> None:
        self.stop_after: int | None = None
        self.context = 100

    def defaults(self, tokenizer: Any, entry: Any) -> None:
        return None

    def prepare(self, kind: str, body: dict[str, Any], defaults: Any) -> Any:
        if "bad" in body:
            raise FakeRequestError(400, "invalid_request_error", "bad field")
        return SimpleNamespace(
            kind=kind,
            stream=body.get("stream") is True,
            sampling=SamplingParams(n=int(body.get("n", 1))),
            prompt=body.get("prompt", ""),
            prompts=body.get("prompts"),  # a batched completion's prompts
            request_id_hint=None,
        )

    def prompt_ids(self, prepared: Any, tokenizer: Any, template: Any) -> tuple[list[int], str]:
        return [ord(c) for c in prepared.prompt], prepared.prompt

    def apply_limits(self, prepared: Any, prompt_len: int, context: int | None) -> None:
        if prompt_len > self.context:
            raise FakeRequestError(400, "context_length_exceeded", "prompt too long")

    def choice(self, index: int, tokenizer: Any, sampling: Any) -> FakeChoice:
        return FakeChoice(index, self.stop_after)

    def parsers(self, *args: Any) -> None:
        return None  # no output parsing (tests/test_grpc_parsers_e2e.py covers it)

    def writer(self, *args: Any) -> FakeWriter:
        return FakeWriter()

    def usage(self, *numbers: int) -> tuple[int, ...]:
        return numbers

    def body(self, prepared, request_id, model, created, tokenizer, choices, usage) -> bytes:  # type: ignore[no-untyped-def]
        texts = ["".join(d.text for d in deltas) for deltas in choices]
        return orjson.dumps({"id": request_id, "model": model, "texts": texts, "usage": usage})

    def failure(self, error: EngineError, streaming: bool) -> tuple[int, str]:
        status, code = self.http_status(error.code)
        return status, ("internal_error" if streaming else code)

    def http_status(self, code: str) -> tuple[int, str]:
        return {
            "UNAVAILABLE": (503, "service_unavailable"),
            "INVALID_ARGUMENT": (400, "invalid_request_error"),
            "INTERNAL": (500, "internal_error"),
        }.get(code, (502, "upstream_error"))


@dataclass
class Script:
    """What one worker's Generate does: outputs, then maybe an error; `hold` blocks
    before the outputs until set."""

    outputs: list[EngineOutput] = field(default_factory=list)
    error: EngineError | None = None
    hold: asyncio.Event | None = None


class FakeClient:
    # Errors raised by the next Generate calls, whichever worker gets them (FIFO).
    fail_next: list[EngineError] = []

    def __init__(self, row: int) -> None:
        self.row = row
        self.scripts: list[Script] = []
        self.requests: list[Any] = []
        self.aborted: list[list[str]] = []
        self.closed = False
        self.timeouts: list[float | None] = []

    async def generate(self, req: Any, *, timeout: float | None) -> AsyncIterator[EngineOutput]:
        self.requests.append(req)
        self.timeouts.append(timeout)
        if FakeClient.fail_next:
            raise FakeClient.fail_next.pop(0)
        script = self.scripts.pop(0) if self.scripts else Script()
        if script.hold is not None:
            await script.hold.wait()
        for out in script.outputs:
            await asyncio.sleep(0)
            yield out
        if script.error is not None:
            raise script.error

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted.append(request_ids)

    async def close(self) -> None:
        self.closed = True


class FakeWorkers:
    def __init__(self) -> None:
        self.by_row: dict[int, FakeClient] = {}
        self.made: list[tuple[int, int]] = []

    def client(self, entry: DirectoryEntry) -> FakeClient:
        self.made.append((entry.row, entry.generation))
        return self.by_row.setdefault(entry.row, FakeClient(entry.row))

    def on_directory(self, entries: dict[int, DirectoryEntry]) -> None:
        pass

    def tokenizer_source(self, entry: Any) -> str:
        return "/fake"

    async def tokenizer(self, entry: Any) -> object:
        return object()

    def template(self, tokenizer: Any) -> None:
        return None


class FakeConn:
    def __init__(self) -> None:
        self.out = bytearray()
        self.writes = 0  # each is a send(2) on a real connection
        self.closed = False
        self.write_paused = False
        self.exchange: Any = None
        self.done: list[bool] = []

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data
            self.writes += 1

    def response_done(self, keep_alive: bool) -> None:
        self.exchange = None
        self.done.append(keep_alive)

    def send(self, data: bytes, keep_alive: bool) -> None:
        self.write(data)
        self.response_done(keep_alive)

    def close(self) -> None:
        self.closed = True


class FakeRequest:
    def __init__(self, path: str, body: dict[str, Any]) -> None:
        self.path = path
        self.body = orjson.dumps(body)
        self.request_id = b"rid-1"
        self.keep_alive = True
        self.version = "1.1"
        self.method = b"POST"
        self.headers: list[tuple[bytes, bytes]] = []

    def header(self, name: bytes) -> bytes | None:
        return None


def out(
    index: int, ids: list[int], *, finished: bool = False, reason: str | None = None
) -> EngineOutput:
    return EngineOutput(
        index=index,
        token_ids=ids,
        prompt_tokens=3,
        completion_tokens=0,
        cached_tokens=2,
        finished=finished,
        finish_reason=reason,
    )


# --- the data plane -----------------------------------------------------------------------------


@dataclass
class Rig:
    app: DataPlane
    front: GrpcFront
    workers: FakeWorkers
    stages: FakeStages
    loop: asyncio.AbstractEventLoop

    def client(self, row: int) -> FakeClient:
        return self.workers.by_row.setdefault(row, FakeClient(row))

    def start(
        self, body: dict[str, Any], path: str = "/v1/completions"
    ) -> tuple[FakeConn, GrpcExchange]:
        conn = FakeConn()
        request = FakeRequest(path, {"model": MODEL, **body})
        assert self.front.handle(conn, request) is True  # type: ignore[arg-type]
        exchange = conn.exchange
        assert isinstance(exchange, GrpcExchange)
        return conn, exchange

    def run(self, exchange: GrpcExchange, timeout: float = 5.0) -> None:
        assert exchange.task is not None
        self.loop.run_until_complete(asyncio.wait_for(exchange.task, timeout))

    def in_flight(self) -> dict[int, int]:
        return {row: self.app.table.in_flight(row) for row in (0, 1)}


def entry(row: int, grpc: bool = True) -> DirectoryEntry:
    scheme = "grpc" if grpc else "http"
    return DirectoryEntry(
        row=row,
        generation=1,
        worker_id=f"w{row}",
        url=f"{scheme}://127.0.0.1:{9000 + row}",
        model_id=None,
        models=(MODEL,),
        api_key=None,
        engine="vllm",
        context_length=100,
        spec=WorkerSpec(url=f"{scheme}://127.0.0.1:{9000 + row}", connection_mode=scheme),
        grpc=GrpcModelInfo(backend="vllm", served_model_name=MODEL) if grpc else None,
    )


@pytest.fixture
def rig() -> Iterator[Rig]:
    cfg = GatewayConfig(
        retry_initial_backoff_ms=1,
        retry_max_backoff_ms=2,
        sse_keepalive_secs=1,
        policy="round_robin",
    )
    table = WorkerTable.create(4, 2, supervisor_pid=os.getpid(), anonymous=False)
    for row in (0, 1):
        table.write_row(
            row, Row(1, int(WorkerStatus.READY), FLAG_IN_USE, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        )
    table.publish_directory(Directory(entries=[entry(0), entry(1)]))
    table.bump_routing_generation()
    loop = asyncio.new_event_loop()
    app = DataPlane(cfg, table, 0, os.getpid(), make_policy("round_robin", cfg), loop)
    workers = FakeWorkers()
    stages = FakeStages()
    front = GrpcFront(app, workers=workers, stages=stages, offload=Offload())  # type: ignore[arg-type]
    app.grpc = front
    app.refresh()
    yield Rig(app, front, workers, stages, loop)
    loop.run_until_complete(asyncio.sleep(0.01))
    for task in list(app.tasks):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def split_chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """(head, chunk payloads) of a chunked response; asserts the framing is exact."""
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        payload, rest = rest[:size], rest[size:]
        assert rest[:2] == b"\r\n"
        rest = rest[2:]
        if size == 0:
            assert rest == b""
            break
        chunks.append(payload)
    return head, chunks


# --- tests ----------------------------------------------------------------------------------------


def test_stream_is_sse_in_chunked_framing_and_every_count_returns(rig: Rig) -> None:
    rig.client(0).scripts.append(
        Script([out(0, [1, 2]), out(0, [3], finished=True, reason="stop")])
    )
    conn, exchange = rig.start({"prompt": "abc", "stream": True})
    assert rig.app.active == {exchange}
    rig.run(exchange)
    head, chunks = split_chunks(bytes(conn.out))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-type: text/event-stream\r\n" in head
    assert b"transfer-encoding: chunked\r\n" in head
    assert b"x-request-id: rid-1\r\n" in head
    # The head goes out with the first events, the last chunk with the final ones: one
    # write per engine batch and no more.
    assert chunks == [
        b"data: start\n\ndata: 0 <1><2> -\n\n",
        b"data: 0 <3> stop\n\n",
        b"data: usage 3 3 2\n\ndata: [DONE]\n\n",
    ]
    assert conn.writes == 3
    assert conn.done == [True]
    assert rig.app.active == set() and rig.app.streams == set()
    assert rig.in_flight() == {0: 0, 1: 0}
    assert rig.app.gate.successes[0] == 1
    # The engine got the prompt's ids and the request id; the deadline is the timeout.
    request = rig.client(0).requests[0]
    assert (request.input_ids, request.request_id, request.stream) == ([97, 98, 99], "rid-1", True)
    assert 0 < rig.client(0).timeouts[0] <= rig.app.request_timeout
    assert rig.app.metrics.responses[("/v1/completions", 200, "")] == 1


def test_non_stream_n2_collects_each_choice(rig: Rig) -> None:
    rig.client(0).scripts.append(
        Script([out(1, [5], finished=True, reason="stop"), out(0, [4, 4], finished=True)])
    )
    conn, exchange = rig.start({"prompt": "x", "n": 2})
    rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: %d" % len(body) in head
    assert orjson.loads(body) == {
        "id": "rid-1",
        "model": MODEL,
        "texts": ["<4><4>", "<5>"],
        "usage": [3, 3, 2],
    }


def test_unavailable_before_the_first_token_is_retried_on_the_other_worker(rig: Rig) -> None:
    FakeClient.fail_next = [EngineError("UNAVAILABLE", "refused")]
    for row in (0, 1):
        rig.client(row).scripts.append(Script([out(0, [7], finished=True, reason="stop")]))
    conn, exchange = rig.start({"prompt": "p", "stream": True})
    rig.run(exchange)
    first = exchange.failed_rows
    assert first is not None and len(first) == 1
    other = 1 - first[0]
    # The failed worker's attempt is a transport failure for its breaker; the other served.
    assert rig.app.gate.failures[first[0]] == 1
    assert rig.app.gate.successes[other] == 1
    assert len(rig.client(other).requests) == 1 and len(rig.client(first[0]).requests) == 1
    _head, chunks = split_chunks(bytes(conn.out))
    assert chunks[0] == b"data: start\n\ndata: 0 <7> stop\n\n"  # the head's write
    assert rig.in_flight() == {0: 0, 1: 0}
    assert exchange.attempts == 2
    assert sum(rig.app.metrics.retries.values()) == 1


def test_error_after_the_first_token_ends_the_stream_with_an_error_event(rig: Rig) -> None:
    for row in (0, 1):
        rig.client(row).scripts.append(
            Script([out(0, [1])], error=EngineError("INTERNAL", "boom", before_first_token=False))
        )
    conn, exchange = rig.start({"prompt": "p", "stream": True})
    rig.run(exchange)
    head, chunks = split_chunks(bytes(conn.out))
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert chunks == [
        b"data: start\n\ndata: 0 <1> -\n\n",
        stream_error_event("internal_error", "boom"),
    ]
    assert exchange.attempts == 1  # never retried once a token went out
    assert rig.app.metrics.responses[("/v1/completions", 200, "stream_error")] == 1
    assert rig.in_flight() == {0: 0, 1: 0}


def test_engine_error_without_stream_gets_the_mapped_status(rig: Rig) -> None:
    for row in (0, 1):
        rig.client(row).scripts.append(Script(error=EngineError("INVALID_ARGUMENT", "no good")))
    conn, exchange = rig.start({"prompt": "p"})
    rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert orjson.loads(body)["error"]["code"] == "invalid_request_error"
    assert orjson.loads(body)["error"]["message"] == "no good"
    assert exchange.attempts == 1  # 400 is not retried
    assert rig.app.metrics.responses[("/v1/completions", 400, "invalid_request_error")] == 1


def test_a_bad_request_is_answered_before_any_dispatch(rig: Rig) -> None:
    conn, exchange = rig.start({"prompt": "p" * 101})  # over the fake context (100)
    rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert orjson.loads(body)["error"]["code"] == "context_length_exceeded"
    assert rig.workers.made == [] and exchange.attempts == 0
    assert rig.app.active == set()


def test_client_gone_cancels_and_sends_abort(rig: Rig) -> None:
    hold = asyncio.Event()
    rig.client(0).scripts.append(Script([out(0, [1])], hold=hold))
    rig.client(1).scripts.append(Script([out(0, [1])], hold=hold))
    conn, exchange = rig.start({"prompt": "p", "stream": True})
    rig.loop.run_until_complete(asyncio.sleep(0.01))
    assert exchange.row in (0, 1) and rig.in_flight()[exchange.row] == 1
    conn.closed = True
    exchange.client_gone()
    rig.run(exchange)
    assert rig.client(exchange.row).aborted == [["rid-1"]]
    assert rig.app.metrics.responses[("/v1/completions", 499, "client_disconnected")] == 1
    assert rig.in_flight() == {0: 0, 1: 0}
    assert conn.out == b""


def test_batch_streams_each_prompts_choices_under_its_own_numbers(rig: Rig) -> None:
    for row in (0, 1):
        rig.client(row).scripts += [
            Script([out(0, [1]), out(1, [2], finished=True), out(0, [3], finished=True)]),
            Script([out(1, [4], finished=True), out(0, [5], finished=True)]),
        ]
    conn, exchange = rig.start({"prompts": ["a", "b"], "n": 2, "stream": True})
    rig.run(exchange)
    _head, chunks = split_chunks(bytes(conn.out))
    client = rig.client(exchange.row)
    assert [r.request_id for r in client.requests] == ["rid-1-p0", "rid-1-p1"]
    # The first batch's events went out with the head ("start"): split them back.
    events = [b"data: " + e for c in chunks[:-1] for e in c.split(b"data: ")[1:]]
    assert sorted(events[1:]) == [
        b"data: 0 <1> -\n\n",
        b"data: 0 <3> -\n\n",
        b"data: 1 <2> -\n\n",
        b"data: 2 <5> -\n\n",
        b"data: 3 <4> -\n\n",
    ]
    assert chunks[-1] == b"data: usage 6 5 4\n\ndata: [DONE]\n\n"  # summed per prompt
    assert client.aborted == [] and rig.in_flight() == {0: 0, 1: 0}


def test_batch_gateway_side_stop_aborts_that_prompt_only(rig: Rig) -> None:
    rig.stages.stop_after = 2
    for row in (0, 1):
        rig.client(row).scripts += [
            Script([out(0, [1, 2]), out(0, [3]), out(0, [4], finished=True)]),
            Script([out(0, [5], finished=True)]),
        ]
    conn, exchange = rig.start({"prompts": ["a", "b"]})
    rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert orjson.loads(body)["texts"] == ["<1><2>", "<5>"]
    assert rig.client(exchange.row).aborted == [["rid-1-p0"]]


def test_batch_failure_after_the_head_ends_the_stream_and_aborts_the_rest(rig: Rig) -> None:
    hold = asyncio.Event()
    boom = EngineError("INTERNAL", "boom", before_first_token=False)
    for row in (0, 1):
        rig.client(row).scripts += [
            Script([out(0, [1])], hold=hold),
            Script([out(0, [2])], error=boom),
        ]
    conn, exchange = rig.start({"prompts": ["a", "b"], "stream": True})
    rig.run(exchange)
    _head, chunks = split_chunks(bytes(conn.out))
    assert chunks[0] == b"data: start\n\ndata: 1 <2> -\n\n"
    assert chunks[1] == stream_error_event("internal_error", "boom")
    assert rig.client(exchange.row).aborted == [["rid-1-p0"]]
    assert exchange.attempts == 1 and rig.in_flight() == {0: 0, 1: 0}


def test_batch_failure_before_any_output_is_retried_as_a_whole(rig: Rig) -> None:
    for row in (0, 1):
        rig.client(row).scripts += [
            Script([out(0, [1], finished=True)]),
            Script([out(0, [2], finished=True)]),
        ]
    FakeClient.fail_next = [EngineError("UNAVAILABLE", "down", before_first_token=True)]
    conn, exchange = rig.start({"prompts": ["a", "b"]})
    rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and exchange.attempts == 2
    assert orjson.loads(body)["texts"] == ["<1>", "<2>"]
    assert rig.in_flight() == {0: 0, 1: 0}


def test_batch_client_gone_aborts_every_prompt(rig: Rig) -> None:
    hold = asyncio.Event()
    for row in (0, 1):
        rig.client(row).scripts += [Script([out(0, [1])], hold=hold) for _ in range(3)]
    conn, exchange = rig.start({"prompts": ["a", "b", "c"], "stream": True})
    rig.loop.run_until_complete(asyncio.sleep(0.01))
    conn.closed = True
    exchange.client_gone()
    rig.run(exchange)
    assert rig.client(exchange.row).aborted == [["rid-1-p0", "rid-1-p1", "rid-1-p2"]]
    assert rig.app.metrics.responses[("/v1/completions", 499, "client_disconnected")] == 1
    assert rig.in_flight() == {0: 0, 1: 0} and conn.out == b""


def test_deadline_answers_504_and_aborts(rig: Rig) -> None:
    hold = asyncio.Event()
    for row in (0, 1):
        rig.client(row).scripts.append(Script([out(0, [1])], hold=hold))
    conn, exchange = rig.start({"prompt": "p"})
    rig.loop.run_until_complete(asyncio.sleep(0.01))
    exchange.deadline = 0.0
    rig.app._sweep()  # the sweeper finds it past its deadline
    rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504 ")
    assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
    assert rig.client(exchange.row).aborted == [["rid-1"]]
    assert rig.app.gate.failures[exchange.row] == 1


def test_gateway_side_stop_aborts_the_engine(rig: Rig) -> None:
    rig.stages.stop_after = 2
    rig.client(0).scripts.append(Script([out(0, [1, 2]), out(0, [3]), out(0, [4], finished=True)]))
    rig.client(1).scripts.append(Script([out(0, [1, 2]), out(0, [3]), out(0, [4], finished=True)]))
    conn, exchange = rig.start({"prompt": "p", "stream": True})
    rig.run(exchange)
    _head, chunks = split_chunks(bytes(conn.out))
    assert chunks[0] == b"data: start\n\ndata: 0 <1><2> stop\n\n" and len(chunks) == 2
    assert rig.client(exchange.row).aborted == [["rid-1"]]


def test_write_back_pressure_pauses_the_task(rig: Rig) -> None:
    rig.client(0).scripts.append(Script([out(0, [1]), out(0, [2], finished=True)]))
    rig.client(1).scripts.append(Script([out(0, [1]), out(0, [2], finished=True)]))
    conn, exchange = rig.start({"prompt": "p", "stream": True})
    # The connection reports a full socket buffer (ClientConnection.pause_writing).
    exchange.upstream.transport.pause_reading()
    rig.loop.run_until_complete(asyncio.sleep(0.02))
    _head, chunks = split_chunks(bytes(conn.out) + b"0\r\n\r\n")
    assert chunks == [b"data: start\n\ndata: 0 <1> -\n\n"]  # waiting for the buffer to drain
    exchange.upstream.transport.resume_reading()
    rig.run(exchange)
    _head, chunks = split_chunks(bytes(conn.out))
    assert len(chunks) == 3


def test_keepalive_frame_when_quiet(rig: Rig) -> None:
    """A started stream gets a ping after --sse-keepalive-secs without a write."""
    conn = FakeConn()
    request = FakeRequest("/v1/completions", {})
    exchange = GrpcExchange(rig.front, conn, request, "completion", {}, MODEL, [0])  # type: ignore[arg-type]
    rig.loop.run_until_complete(exchange._start_stream(b""))
    assert exchange in rig.app.streams
    before = len(conn.out)
    exchange.keepalive(exchange.last_write + 0.5, 1.0)
    assert len(conn.out) == before
    exchange.keepalive(exchange.last_write + 1.0, 1.0)
    assert bytes(conn.out[before:]) == b"8\r\n: ping\n\n\r\n"
    exchange.client_gone()  # no task: nothing to cancel, and nothing written after
    assert bytes(conn.out[before:]) == b"8\r\n: ping\n\n\r\n"


def test_http_workers_are_left_to_the_proxy_path(rig: Rig) -> None:
    table = rig.app.table
    table.publish_directory(Directory(entries=[entry(0, grpc=False), entry(1, grpc=False)]))
    table.bump_routing_generation()
    rig.app.refresh()
    conn = FakeConn()
    request = FakeRequest("/v1/completions", {"model": MODEL, "prompt": "p"})
    assert rig.front.handle(conn, request) is False  # type: ignore[arg-type]
    assert rig.front.rows == frozenset()


def test_routing_gets_the_token_ids_when_a_policy_reads_the_prompt(rig: Rig) -> None:
    rig.app.needs_text = True
    rig.client(0).scripts.append(Script([out(0, [1], finished=True)]))
    rig.client(1).scripts.append(Script([out(0, [1], finished=True)]))
    _conn, exchange = rig.start({"prompt": "hi"})
    rig.run(exchange)
    assert exchange.route is not None
    assert exchange.route.token_ids == array("I", [104, 105]).tobytes()
    assert exchange.route.prompt_tokens == 2


def test_offload_runs_large_inputs_on_the_pool() -> None:
    offload = Offload(threshold=10, workers=1)
    import threading

    async def both() -> tuple[str, str]:
        small = await offload.run(5, lambda: threading.current_thread().name)
        large = await offload.run(50, lambda: threading.current_thread().name)
        return small, large

    loop = asyncio.new_event_loop()
    try:
        small, large = loop.run_until_complete(both())
    finally:
        loop.close()
        offload.close()
    assert small == threading.main_thread().name
    assert large.startswith("smg-tokenize")
    assert (offload.inline, offload.offloaded) == (1, 1)


def test_workers_registry_per_row_generation_and_tokenizer_source(tmp_path: Any) -> None:
    """EngineClients per (row, generation), closed when the row leaves or changes hands;
    the tokenizer from --tokenizer-path over --model-path over the worker's bundle."""
    from smg.grpc.workers import GrpcWorkers, NoTokenizer

    made: list[tuple[str, str, str | None]] = []

    class Client:
        def __init__(self, target: str, backend: str, tls: Any, key: str | None) -> None:
            made.append((target, backend, key))
            self.closed = False

        async def close(self) -> None:
            self.closed = True

    loop = asyncio.new_event_loop()
    try:
        cfg = GatewayConfig()
        workers = GrpcWorkers(cfg, loop, client_factory=Client)
        a, b = entry(0), entry(1)
        first = workers.client(a)
        assert workers.client(a) is first and made == [("127.0.0.1:9000", "vllm", None)]
        workers.client(b)
        # Row 0 taken by another worker (generation 2), row 1 removed.
        moved = DirectoryEntry(
            **{**{f: getattr(a, f) for f in a.__struct_fields__}, "generation": 2}
        )
        workers.on_directory({0: moved})
        loop.run_until_complete(asyncio.sleep(0.01))
        assert first.closed and workers.clients == {}
        assert workers.client(moved) is not first
        # Tokenizer sources.
        with pytest.raises(NoTokenizer):
            workers.tokenizer_source(a)
        bundle = DirectoryEntry(
            **{
                **{f: getattr(a, f) for f in a.__struct_fields__},
                "grpc": GrpcModelInfo(tokenizer_dir="/b"),
            }
        )
        assert workers.tokenizer_source(bundle) == "/b"
        local = GrpcWorkers(GatewayConfig(model_path=str(tmp_path)), loop, client_factory=Client)
        assert local.tokenizer_source(bundle) == str(tmp_path)
        other = tmp_path / "tok"
        other.mkdir()
        both = GatewayConfig(model_path=str(tmp_path), tokenizer_path=str(other))
        assert GrpcWorkers(both, loop).tokenizer_source(bundle) == str(other)
        # A hub id (not a local directory) is never downloaded: the bundle is used.
        hub = GrpcWorkers(GatewayConfig(model_path="meta-llama/Llama-3.1-8B-Instruct"), loop)
        assert hub.tokenizer_source(bundle) == "/b"
    finally:
        loop.close()


def test_the_tokenizer_loader_builds_the_byte_table_off_the_loop(tmp_path: Any) -> None:
    """The detokenizer's byte-level table is built by the loader (on its thread), not by
    the first stream on the event loop."""
    from grpcmockutil import llama3_dir

    from smg.grpc.workers import _default_tokenizer_loader
    from smg.tokenizer import bytelevel

    tokenizer = _default_tokenizer_loader(str(llama3_dir(tmp_path / "m")), None, GatewayConfig())
    assert bytelevel._ATTR in tokenizer.__dict__
    assert bytelevel.byte_tables(tokenizer) is tokenizer.__dict__[bytelevel._ATTR]
