"""smg.grpc.h2client against real peers: a grpc.aio server (the reference implementation,
with a small in-test servicer), C1's mock (`smg mock-worker --grpc`, both backends), and a
scripted raw HTTP/2 server for what grpc servers do not do on demand (GOAWAY below an
open stream)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import grpcmockutil
import hpack
import pytest
from h2peerutil import generate_answer, take_frames
from hypothesis import given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import vllm_engine_pb2 as vll
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vll_grpc

from smg.grpc.client import EngineClient
from smg.grpc.h2client import H2EngineClient, grpc_timeout
from smg.grpc.h2wire import (
    END_STREAM,
    GOAWAY,
    HEADERS,
    SETTINGS,
    frame,
)
from smg.grpc.types import EngineError, EngineOutput, GenerateInput, SamplingParams

# A message that needs percent-encoding on the wire (non-ASCII, %, newline).
ODD_MESSAGE = "bad 100% input: ü\nsecond line"
BIG_TOKENS = 700_000  # ids around 100000 take 3 bytes: one ~2.1 MB message


class Servicer(vll_grpc.VllmEngineServicer):
    """Generate's behaviour is named by the request id."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.aborted: list[str] = []
        self.metadata: dict[str, str] = {}
        self.prompt_lengths: list[int] = []
        self.time_remaining: float | None = None

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        rid = request.request_id
        self.metadata = dict(context.invocation_metadata())
        self.time_remaining = context.time_remaining()
        self.prompt_lengths.append(len(request.tokenized.input_ids))
        if rid == "trailers-only":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, ODD_MESSAGE)
        chunk = vll.GenerateStreamChunk
        if rid == "slow":
            yield vll.GenerateResponse(chunk=chunk(token_ids=[7], prompt_tokens=3))
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return
        if rid == "big":
            ids = [100_000 + i % 1000 for i in range(BIG_TOKENS)]
            yield vll.GenerateResponse(chunk=chunk(token_ids=ids, prompt_tokens=3))
            yield vll.GenerateResponse(chunk=chunk(token_ids=[5], prompt_tokens=3))
            yield vll.GenerateResponse(
                complete=vll.GenerateComplete(output_ids=[5], finish_reason="length")
            )
            return
        count = int(rid.split("-")[1]) if rid.startswith("stream-") else 5
        for i in range(count):
            yield vll.GenerateResponse(
                chunk=chunk(token_ids=[i + 1], prompt_tokens=len(request.tokenized.input_ids))
            )
            if rid.startswith("stream-") and i % 8 == 7:
                await asyncio.sleep(0.001)  # interleave with the other streams
        if rid == "after":
            await context.abort(grpc.StatusCode.INTERNAL, "boom after two")
        yield vll.GenerateResponse(
            complete=vll.GenerateComplete(
                output_ids=[count], finish_reason="stop", matched_token_id=128009
            )
        )

    async def HealthCheck(self, request: Any, context: Any) -> Any:
        self.metadata = dict(context.invocation_metadata())
        return vll.HealthCheckResponse(healthy=True, message="ok")

    async def Embed(self, request: Any, context: Any) -> Any:
        ids = list(request.tokenized.input_ids)
        return vll.EmbedResponse(embedding=[float(len(ids)), 0.5], prompt_tokens=len(ids))

    async def Abort(self, request: Any, context: Any) -> Any:
        self.aborted.extend(request.request_ids)
        return vll.AbortResponse()


@contextlib.asynccontextmanager
async def aio_server(
    servicer: Servicer, options: list[tuple[str, Any]] | None = None
) -> AsyncIterator[grpc.aio.Server]:
    server = grpc.aio.server(options=options)
    vll_grpc.add_VllmEngineServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    server.port = port  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        await server.stop(0)


def _input(rid: str, ids: list[int] | None = None, **sampling: Any) -> GenerateInput:
    return GenerateInput(
        request_id=rid,
        input_ids=ids or [1, 2, 3],
        sampling=SamplingParams(**sampling),
        stream=True,
        text="",
    )


async def _collect(client: Any, req: GenerateInput, timeout: float = 10.0) -> list[EngineOutput]:
    return [out async for out in client.generate(req, timeout=timeout)]


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60.0))


def _run_uvloop(coro: Any) -> Any:
    """The data plane's loop (the peer is another process here)."""
    import uvloop

    return uvloop.run(asyncio.wait_for(coro, 60.0))


# --- against grpc.aio ---------------------------------------------------------------------------


def test_stream_unary_and_metadata_against_grpc_aio() -> None:
    async def main() -> None:
        servicer = Servicer()
        async with aio_server(servicer) as server:
            client = H2EngineClient(f"127.0.0.1:{server.port}", "vllm", api_key="k1")
            try:
                outs = await _collect(client, _input("plain"))
                assert [o.token_ids for o in outs] == [[1], [2], [3], [4], [5], []]
                assert outs[-1].finished and outs[-1].finish_reason == "stop"
                assert outs[-1].matched_stop == 128009
                assert outs[-1].completion_tokens == 5
                assert servicer.metadata["authorization"] == "Bearer k1"
                # grpc.aio read our grpc-timeout (10 s).
                assert servicer.time_remaining is not None
                assert 5.0 < servicer.time_remaining <= 10.0
                assert await client.health(5.0) is True
                assert await client.embed("e", [4, 5, 6, 7], 5.0) == ([4.0, 0.5], 4)
                await client.abort(["r1", "r2"])
                assert servicer.aborted == ["r1", "r2"]
                assert len(client.channel.conns) == 1  # every call on one connection
            finally:
                await client.close()

    _run(main())


def test_errors_trailers_only_and_after_messages() -> None:
    async def main() -> None:
        async with aio_server(Servicer()) as server:
            client = H2EngineClient(f"127.0.0.1:{server.port}", "vllm")
            try:
                with pytest.raises(EngineError) as info:
                    await _collect(client, _input("trailers-only"))
                assert info.value.code == "INVALID_ARGUMENT"
                assert info.value.message == ODD_MESSAGE
                assert info.value.before_first_token is True

                seen: list[EngineOutput] = []
                with pytest.raises(EngineError) as info:
                    async for out in client.generate(_input("after"), timeout=10.0):
                        seen.append(out)
                assert info.value.code == "INTERNAL"
                assert info.value.message == "boom after two"
                assert info.value.before_first_token is False
                assert [o.token_ids for o in seen] == [[1], [2], [3], [4], [5]]
                # The connection still serves.
                assert len(await _collect(client, _input("plain"))) == 6
            finally:
                await client.close()

    _run(main())


def test_deadline_and_cancel_reach_the_server() -> None:
    async def main() -> None:
        servicer = Servicer()
        async with aio_server(servicer) as server:
            client = H2EngineClient(f"127.0.0.1:{server.port}", "vllm")
            try:
                started = time.monotonic()
                seen = []
                with pytest.raises(EngineError) as info:
                    async for out in client.generate(_input("slow"), timeout=0.5):
                        seen.append(out.token_ids)
                assert info.value.code == "DEADLINE_EXCEEDED"
                assert info.value.before_first_token is False
                assert seen == [[7]]
                assert time.monotonic() - started < 5.0
                await asyncio.wait_for(servicer.cancelled.wait(), 10.0)

                # The consumer stops after the first output: RST_STREAM reaches the server.
                servicer.cancelled.clear()
                outputs = client.generate(_input("slow"), timeout=30.0)
                first = await outputs.__anext__()
                assert first.token_ids == [7]
                await outputs.aclose()  # type: ignore[attr-defined]
                await asyncio.wait_for(servicer.cancelled.wait(), 10.0)
                assert len(await _collect(client, _input("plain"))) == 6
            finally:
                await client.close()

    _run(main())


def test_flow_control_both_ways() -> None:
    """A ~210 KB request (over the 65,535-byte initial windows: sending waits for the
    server's WINDOW_UPDATEs) and a ~2.1 MB answer (over our 1 MiB stream window)."""

    async def main() -> None:
        servicer = Servicer()
        async with aio_server(servicer) as server:
            client = H2EngineClient(f"127.0.0.1:{server.port}", "vllm")
            try:
                prompt = [100_000 + i % 5000 for i in range(70_000)]
                outs = await _collect(client, _input("plain", prompt))
                assert servicer.prompt_lengths == [70_000]
                assert outs[0].prompt_tokens == 70_000
                outs = await _collect(client, _input("big"))
                assert len(outs[0].token_ids) == BIG_TOKENS
                assert outs[0].token_ids[:3] == [100_000, 100_001, 100_002]
                assert [o.token_ids for o in outs[1:]] == [[5], []]
                # Twice: the windows were given back.
                outs = await _collect(client, _input("big"))
                assert len(outs[0].token_ids) == BIG_TOKENS
            finally:
                await client.close()

    _run(main())


def test_many_concurrent_streams_and_the_stream_limit() -> None:
    """200 streams at once on a server allowing 16 per connection: more connections are
    made, every stream gets all its messages in order."""

    async def main() -> None:
        servicer = Servicer()
        options = [("grpc.max_concurrent_streams", 16)]
        async with aio_server(servicer, options) as server:
            client = H2EngineClient(f"127.0.0.1:{server.port}", "vllm")
            try:
                results = await asyncio.gather(
                    *(_collect(client, _input("stream-40")) for _ in range(200))
                )
                for outs in results:
                    assert [o.token_ids for o in outs] == [[i] for i in range(1, 41)] + [[]]
                assert len(client.channel.conns) >= 2
            finally:
                await client.close()

    _run(main())


def test_tls_with_alpn_h2(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")

    async def main() -> None:
        import ssl

        servicer = Servicer()
        server = grpc.aio.server()
        vll_grpc.add_VllmEngineServicer_to_server(servicer, server)
        credentials = grpc.ssl_server_credentials(
            [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())]
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            client = H2EngineClient(f"grpcs://127.0.0.1:{port}", "vllm", tls=ctx)
            try:
                assert len(await _collect(client, _input("plain"))) == 6
            finally:
                await client.close()
            # Not trusted: UNAVAILABLE, as grpc.aio says.
            client = H2EngineClient(f"grpcs://127.0.0.1:{port}", "vllm")
            try:
                with pytest.raises(EngineError) as info:
                    await _collect(client, _input("plain"))
                assert info.value.code == "UNAVAILABLE"
            finally:
                await client.close()
        finally:
            await server.stop(0)

    _run(main())


def test_refused_connection_is_unavailable() -> None:
    async def main() -> None:
        from gatewayutil import free_port

        client = H2EngineClient(f"127.0.0.1:{free_port()}", "vllm")
        with pytest.raises(EngineError) as info:
            await _collect(client, _input("plain"))
        assert info.value.code == "UNAVAILABLE"
        assert info.value.before_first_token is True
        assert await client.health(2.0) is False
        await client.close()

    _run(main())


def test_grpc_timeout_header_values() -> None:
    assert grpc_timeout(0.5) == "500000u"
    assert grpc_timeout(99.0) == "99000000u"
    assert grpc_timeout(1000.0) == "1000000m"
    assert grpc_timeout(1e9) == "99999999S"


# --- a scripted HTTP/2 server: GOAWAY ---------------------------------------------------------


class ScriptedServer(asyncio.Protocol):
    """Reads two Generate streams on the first connection, then sends GOAWAY with the
    first stream as the last one processed, answers it and closes; any later connection
    answers every stream."""

    connections = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""
        self.decoder = hpack.Decoder()
        ScriptedServer.connections += 1
        self.first = ScriptedServer.connections == 1
        self.ended: list[int] = []
        transport.write(frame(SETTINGS, 0, 0))

    def data_received(self, data: bytes) -> None:
        frames, self.buf = take_frames(self.buf + data)
        for ftype, flags, sid, payload in frames:
            if ftype == HEADERS:
                self.decoder.decode(payload)
            if ftype in (HEADERS, 0) and flags & END_STREAM:
                self.ended.append(sid)
                self.on_request(sid)

    def answer(self, sid: int) -> bytes:
        return generate_answer(sid, [sid])

    def on_request(self, sid: int) -> None:
        if not self.first:
            self.transport.write(self.answer(sid))
            return
        if len(self.ended) == 2:
            first = self.ended[0]
            self.transport.write(
                frame(GOAWAY, 0, 0, struct.pack(">II", first, 0)) + self.answer(first)
            )
            self.transport.close()


def test_goaway_sends_the_unprocessed_stream_again() -> None:
    async def main() -> None:
        ScriptedServer.connections = 0
        loop = asyncio.get_running_loop()
        server = await loop.create_server(ScriptedServer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = H2EngineClient(f"127.0.0.1:{port}", "vllm")
        try:
            a, b = await asyncio.gather(
                _collect(client, _input("a")), _collect(client, _input("b"))
            )
            # Stream 1 answered on the first connection, stream 3 again on the second
            # (its first stream there: id 1).
            assert [o.token_ids for o in a] == [[1]]
            assert [o.token_ids for o in b] == [[1]]
            assert ScriptedServer.connections == 2
        finally:
            await client.close()
            server.close()

    _run(main())


# --- against the mock (C1's h2fast and grpc.aio backends) -------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grpcmockutil.llama3_dir(tmp_path_factory.mktemp("llama3"))


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
@pytest.mark.parametrize("impl", ["fast", "aio"])
def test_same_outputs_as_grpc_aio_against_the_mock(
    model_dir: Path, backend: str, impl: str
) -> None:
    """n=2 with logprobs and a seed: the h2 client's outputs equal EngineClient's (grpc.aio),
    one by one; 64 concurrent streams each get theirs."""
    # echo: the outputs depend on the request only (SGLang's mock ignores the seed).
    args = ["--output-mode", "echo", *([] if impl == "fast" else ["--grpc-impl", "aio"])]

    async def main(target: str) -> None:
        h2 = H2EngineClient(target, backend)
        aio = EngineClient(target, backend)
        try:
            req = _input("n2", [1, 2, 3, 4], max_tokens=12, n=2, seed=7, logprobs=2)
            mine = await _collect(h2, req)
            reference = await _collect(aio, req)
            assert mine == reference
            assert sorted(o.index for o in mine if o.finished) == [0, 1]
            reqs = [_input(f"c{i}", [i + 1, 2, 3], max_tokens=16, seed=i) for i in range(64)]
            results = await asyncio.gather(*(_collect(h2, r) for r in reqs))
            for outs in results:
                assert sum(len(o.token_ids) for o in outs) == 16
                assert outs[-1].finished and outs[-1].finish_reason == "length"
            assert await h2.health(5.0) is True
            vector, tokens = await h2.embed("e1", [1, 2, 3], 5.0)
            assert (vector, tokens) == await aio.embed("e1", [1, 2, 3], 5.0)
        finally:
            await h2.close()
            await aio.close()

    with grpcmockutil.start_grpc_mock(model_dir, backend=backend, args=args) as mock:
        _run_uvloop(main(mock.target))


def test_configured_failure_and_abort_reach_the_mock(model_dir: Path) -> None:
    async def main(mock: Any) -> None:
        client = H2EngineClient(mock.target, "vllm")
        try:
            mock.config(fail_next=1, fail_code="UNAVAILABLE")
            with pytest.raises(EngineError) as info:
                await _collect(client, _input("f1", max_tokens=4))
            assert info.value.code == "UNAVAILABLE"
            assert info.value.before_first_token is True
            await client.abort(["gone-1"])
            assert "gone-1" in mock.stats()["aborted"]
        finally:
            await client.close()

    with grpcmockutil.start_grpc_mock(model_dir, backend="vllm") as mock:
        _run_uvloop(main(mock))


def test_a_worker_that_dies_mid_stream(model_dir: Path) -> None:
    async def main(mock: Any) -> None:
        client = H2EngineClient(mock.target, "vllm")
        try:
            outputs = client.generate(_input("d", max_tokens=500, ignore_eos=True), timeout=30)
            first = await outputs.__anext__()
            assert len(first.token_ids) == 1
            mock.proc.kill()
            with pytest.raises(EngineError) as info:
                async for _ in outputs:
                    pass
            assert info.value.code == "UNAVAILABLE"
            assert info.value.before_first_token is False
            assert client.channel.conns == []  # the dead connection is dropped
        finally:
            await client.close()

    with grpcmockutil.start_grpc_mock(model_dir, backend="vllm", args=["--itl-ms", "20"]) as mock:
        _run_uvloop(main(mock))


# --- DATA frames read from any cut of the byte stream (in memory) --------------------------


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _message(n: int) -> bytes:
    return bytes([n % 251]) * (n % 7) + n.to_bytes(3, "big")


def _data_frames() -> tuple[bytes, dict[int, list[bytes]]]:
    """DATA frames of three streams in every shape a peer may send: one whole message a
    frame (the fast path), several in one frame, one split over frames, padded frames,
    an empty message, END_STREAM on a frame with messages; and what each stream holds."""
    from smg.grpc.h2wire import DATA, PADDED

    def wire(m: bytes) -> bytes:
        return b"\x00" + len(m).to_bytes(4, "big") + m

    frames: list[bytes] = []
    expected: dict[int, list[bytes]] = {1: [], 3: [], 5: []}
    for i in range(40):
        sid = (1, 3, 5)[i % 3]
        m = _message(i)
        shape = i % 6
        if shape == 0:  # several messages in one frame
            frames.append(frame(DATA, 0, sid, wire(m) + wire(b"") + wire(m[::-1])))
            expected[sid] += [m, b"", m[::-1]]
        elif shape == 1:  # one message over three frames
            w = wire(m + b"xyz")
            frames += [frame(DATA, 0, sid, w[:2]), frame(DATA, 0, sid, w[2:6])]
            frames.append(frame(DATA, 0, sid, w[6:]))
            expected[sid].append(m + b"xyz")
        elif shape == 2:  # padded
            frames.append(frame(DATA, PADDED, sid, b"\x03" + wire(m) + b"\x00\x00\x00"))
            expected[sid].append(m)
        else:  # the streamed case
            frames.append(frame(DATA, 0, sid, wire(m)))
            expected[sid].append(m)
    frames.append(frame(DATA, END_STREAM, 5, wire(b"last")))
    expected[5].append(b"last")
    return b"".join(frames), expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=30))
def test_data_frames_from_any_cut_of_the_stream(cuts: list[int]) -> None:
    from smg.grpc.h2client import H2Connection, Stream

    wire, expected = _data_frames()
    loop = asyncio.new_event_loop()
    try:
        conn = H2Connection(loop, lambda c: None)
        conn.transport = _NullTransport()  # type: ignore[assignment]
        streams = {sid: Stream(conn, sid, 1 << 20) for sid in expected}
        conn.streams.update(streams)
        got: dict[int, list[bytes]] = {sid: [] for sid in expected}
        pos = 0
        for cut in [*cuts, len(wire)]:
            conn.data_received(wire[pos : pos + cut])
            pos = min(len(wire), pos + cut)
            for sid, stream in streams.items():
                taken = stream.take()
                assert all(type(m) is bytes for m in taken)  # never a view of the buffer
                got[sid] += taken
            if pos == len(wire):
                break
        assert got == expected
        assert streams[5].ended and not streams[1].ended and not streams[3].ended
    finally:
        loop.close()


def test_a_new_streams_first_message_wakes_ahead_of_running_streams() -> None:
    """One read brings tokens of streams already streaming and the first token of a new
    one: the new stream's task is woken first, so its first token (its TTFT) does not wait
    for the others' per-token work. Within each group the order of the read is kept."""
    from smg.grpc.h2client import H2Connection, Stream
    from smg.grpc.h2wire import DATA

    def wire(sid: int, m: bytes) -> bytes:
        return frame(DATA, 0, sid, b"\x00" + len(m).to_bytes(4, "big") + m)

    loop = asyncio.new_event_loop()
    try:
        conn = H2Connection(loop, lambda c: None)
        conn.transport = _NullTransport()  # type: ignore[assignment]
        streams = {sid: Stream(conn, sid, 1 << 20) for sid in (1, 3, 5, 7)}
        conn.streams.update(streams)
        for sid in (1, 5):  # streaming already: a message taken
            conn.data_received(wire(sid, b"x"))
            assert streams[sid].take() == [b"x"]
        order: list[int] = []
        for sid, stream in streams.items():
            stream.waiter = loop.create_future()
            stream.waiter.add_done_callback(lambda _f, sid=sid: order.append(sid))
        data = b""
        for sid in (1, 3, 5, 1, 7, 5):
            data += wire(sid, bytes([sid]))
        conn.data_received(data)
        loop.run_until_complete(asyncio.sleep(0))
        assert order == [3, 7, 1, 5]
        assert [streams[s].take() for s in (1, 3, 5, 7)] == [
            [b"\x01", b"\x01"],
            [b"\x03"],
            [b"\x05", b"\x05"],
            [b"\x07"],
        ]
        assert not any(s.fresh for s in streams.values())
    finally:
        loop.close()
