"""HTTP/2 keepalive on the data plane's gRPC connections (smg.grpc.h2client), as the Rust
SMG's channels: a PING every interval per connection, idle or not; no ACK within the
timeout closes the connection (its streams fail with UNAVAILABLE, the next call opens a
new one); TCP keepalive on every socket.

Three levels: the PING schedule on a fake clock (no socket); H2EngineClient against a
loopback HTTP/2 peer that ACKs or does not; `smg launch` in front of the gRPC mock with
SMG__GRPC_KEEPALIVE set short (the mock counts the PINGs it ACKs; SIGSTOP makes it a peer
that vanished without a FIN)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpcmockutil
import hpack
import httpx
import pytest
from h2peerutil import generate_answer, take_frames

from smg.grpc import h2client
from smg.grpc.h2client import H2Connection, H2EngineClient, keepalive_settings
from smg.grpc.h2wire import (
    ACK,
    END_STREAM,
    HEADERS,
    PING,
    PREFACE,
    SETTINGS,
    frame,
)
from smg.grpc.types import EngineError, GenerateInput, SamplingParams
from tests.gatewayutil import Gateway, wait_until


def _input(rid: str) -> GenerateInput:
    return GenerateInput(
        request_id=rid, input_ids=[1, 2, 3], sampling=SamplingParams(), stream=True, text=""
    )


# --- the schedule on a fake clock ---------------------------------------------------------------


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float, callback: Any) -> None:
        self.loop, self.when, self.callback = loop, when, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """call_later/call_at recorded, fired by hand; futures from a real (unrun) loop."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[FakeHandle] = []
        self.real = asyncio.new_event_loop()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> FakeHandle:
        return self.call_at(self.now + delay, callback)

    def call_at(self, when: float, callback: Any) -> FakeHandle:
        handle = FakeHandle(self, when, callback)
        self.handles.append(handle)
        return handle

    def create_future(self) -> asyncio.Future[Any]:
        return self.real.create_future()

    def live(self) -> list[FakeHandle]:
        return [h for h in self.handles if not h.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the clock, firing what falls due in order."""
        end = self.now + seconds
        while True:
            due = sorted((h for h in self.live() if h.when <= end), key=lambda h: h.when)
            if not due:
                break
            handle = due[0]
            handle.cancelled = True  # fired: no longer pending
            self.now = handle.when
            handle.callback()
        self.now = end


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return None


def _pings(transport: FakeTransport) -> list[bytes]:
    """The payloads of the PINGs (not ACKs) the connection wrote."""
    out = []
    for data in transport.written:
        pos = 0
        if data.startswith(PREFACE):
            pos = len(PREFACE)
        while pos + 9 <= len(data):
            length = int.from_bytes(data[pos : pos + 3], "big")
            if data[pos + 3] == PING and not data[pos + 4] & ACK:
                out.append(data[pos + 9 : pos + 9 + length])
            pos += 9 + length
    return out


def _fake_connection(interval: float = 30.0, timeout: float = 10.0) -> Any:
    loop = FakeLoop()
    gone: list[H2Connection] = []
    conn = H2Connection(loop, gone.append, (interval, timeout), "w:1")  # type: ignore[arg-type]
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(frame(SETTINGS, 0, 0))
    return loop, conn, transport, gone


def test_defaults_are_the_rust_smgs() -> None:
    assert (h2client.KEEPALIVE_INTERVAL, h2client.KEEPALIVE_TIMEOUT) == (30.0, 10.0)
    assert h2client.TCP_KEEPIDLE == 60
    assert keepalive_settings("") == (30.0, 10.0)
    assert keepalive_settings("0.5,0.25") == (0.5, 0.25)
    for bad in ("1", "a,b", "0,1", "1,-1", "1,2,3"):
        assert keepalive_settings(bad) == (30.0, 10.0)


def test_ping_acked_keeps_the_connection_one_timer_per_connection() -> None:
    loop, conn, transport, gone = _fake_connection()
    assert len(loop.live()) == 1 and loop.live()[0].when == 30.0
    # Calls cost the keepalive nothing: no timer per stream (no deadline here).
    streams = [conn.open(b"", b"x", None) for _ in range(5)]
    assert len(loop.live()) == 1
    for cycle in range(1, 4):
        loop.advance(30.0)
        pings = _pings(transport)
        assert len(pings) == cycle
        assert [h.when for h in loop.live()] == [pytest.approx(loop.now + 10.0)]
        loop.advance(3.0)  # the ACK comes 3 s later
        conn.data_received(frame(PING, ACK, 0, pings[-1]))
        assert [h.when for h in loop.live()] == [pytest.approx(loop.now + 30.0)]
    assert not transport.aborted and gone == [] and conn.usable
    assert not any(st.ended for st in streams)
    conn.close()
    assert loop.live() == []  # stopped with the connection


def test_timer_stops_when_the_peer_closes_the_connection() -> None:
    loop, conn, transport, gone = _fake_connection()
    loop.advance(30.0)  # a PING in flight
    assert len(loop.live()) == 1
    conn.connection_lost(ConnectionResetError("reset"))
    assert loop.live() == [] and conn.ping_timer is None and gone == [conn]
    loop.advance(100.0)
    assert len(_pings(transport)) == 1 and not transport.aborted


def test_no_ack_closes_the_connection_and_fails_its_streams() -> None:
    loop, conn, transport, gone = _fake_connection()
    st = conn.open(b"", b"x", None)
    loop.advance(30.0)
    ping = _pings(transport)[0]
    conn.data_received(frame(PING, ACK, 0, b"\x00" * 7 + b"\x63"))  # not ours: ignored
    conn.data_received(frame(PING, 0, 0, b"peerping"))  # the peer's own PING: ACKed
    assert transport.written[-1] == frame(PING, ACK, 0, b"peerping")
    loop.advance(9.9)
    assert not transport.aborted
    loop.advance(0.1)
    assert transport.aborted and gone == [conn]
    assert not conn.usable and conn.closed and conn.streams == {}
    assert st.ended
    with pytest.raises(EngineError) as info:
        st.result()
    assert info.value.code == "UNAVAILABLE" and info.value.before_first_token
    assert "PING" in info.value.message
    assert loop.live() == []
    conn.data_received(frame(PING, ACK, 0, ping))  # a late ACK changes nothing
    assert loop.live() == []
    conn.connection_lost(None)  # the transport's own report afterwards
    assert loop.live() == [] and gone == [conn, conn]


# --- a loopback HTTP/2 peer ---------------------------------------------------------------------


class Peer(asyncio.Protocol):
    """Counts connections and PINGs; ACKs them while `ack`; answers each Generate with
    one complete message while `answer`."""

    ack = True
    answer = True
    connections = 0
    pings = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""
        self.decoder = hpack.Decoder()
        Peer.connections += 1
        transport.write(frame(SETTINGS, 0, 0))

    def data_received(self, data: bytes) -> None:
        frames, self.buf = take_frames(self.buf + data)
        for ftype, flags, sid, payload in frames:
            if ftype == HEADERS:
                self.decoder.decode(payload)
            elif ftype == PING and not flags & ACK:
                Peer.pings += 1
                if Peer.ack:
                    self.transport.write(frame(PING, ACK, 0, payload))
            if ftype in (HEADERS, 0) and flags & END_STREAM and Peer.answer:
                self.transport.write(generate_answer(sid, [9]))


@contextlib.asynccontextmanager
async def peer(ack: bool, answer: bool) -> Any:
    Peer.ack, Peer.answer, Peer.connections, Peer.pings = ack, answer, 0, 0
    server = await asyncio.get_running_loop().create_server(Peer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _run(coro: Any, loop: str = "asyncio") -> Any:
    if loop == "uvloop":  # the data plane's loop: its pseudo-socket takes the options too
        import uvloop

        return uvloop.run(asyncio.wait_for(coro, 30.0))
    return asyncio.run(asyncio.wait_for(coro, 30.0))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_loopback_acked_pings_keep_an_idle_connection_with_tcp_keepalive(loop: str) -> None:
    async def main() -> None:
        async with peer(ack=True, answer=True) as port:
            client = H2EngineClient(f"127.0.0.1:{port}", "vllm", keepalive=(0.1, 0.2))
            try:
                outs = [o async for o in client.generate(_input("a"), timeout=5)]
                assert outs[-1].finished
                (conn,) = client.channel.conns
                sock = conn.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                if hasattr(socket, "TCP_KEEPIDLE"):
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                await asyncio.sleep(1.0)  # idle
                assert Peer.pings >= 5  # ~9 at one per 0.1 s
                assert client.channel.conns == [conn] and not conn.closed
                assert Peer.connections == 1
            finally:
                await client.close()
            assert conn.ping_timer is None  # stopped with the connection

    _run(main(), loop)


def test_loopback_unacked_ping_fails_the_stream_and_reconnects() -> None:
    async def main() -> None:
        async with peer(ack=False, answer=False) as port:
            client = H2EngineClient(f"127.0.0.1:{port}", "vllm", keepalive=(0.2, 0.3))
            try:
                start = time.monotonic()
                with pytest.raises(EngineError) as info:
                    [o async for o in client.generate(_input("hang"), timeout=20)]
                elapsed = time.monotonic() - start
                assert info.value.code == "UNAVAILABLE"
                assert info.value.before_first_token is True  # retryable, as any drop
                assert 0.4 <= elapsed < 2.0, elapsed  # interval + timeout, not the deadline
                assert client.channel.conns == []
                Peer.ack = Peer.answer = True
                outs = [o async for o in client.generate(_input("next"), timeout=5)]
                assert outs[-1].finished
                assert Peer.connections == 2  # the next call opened a new connection
            finally:
                await client.close()

    _run(main())


# --- end to end: smg launch in front of the gRPC mock -----------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grpcmockutil.llama3_dir(tmp_path_factory.mktemp("llama3"))


@contextlib.contextmanager
def launched(model_dir: Path, keepalive: str, *mock_args: str) -> Iterator[tuple[Any, Gateway]]:
    with grpcmockutil.start_grpc_mock(model_dir, model="llama3", args=list(mock_args)) as mock:
        wait_until(mock.stats, 10.0, "the mock's control port")
        args = ["--worker-urls", mock.url, "--model-path", str(model_dir)]
        gw = Gateway(args, processes=1, env={"SMG__GRPC_KEEPALIVE": keepalive})
        gw.start(timeout=60.0)
        try:
            gw.wait_ready(60.0)
            yield mock, gw
        finally:
            gw.stop()
            gw.close_log()


def _chat(gw: Gateway, max_tokens: int = 4) -> httpx.Response:
    body = {
        "model": "llama3",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30.0)


def test_e2e_idle_connection_gets_pings_the_mock_acks(model_dir: Path) -> None:
    with launched(model_dir, "0.3,1") as (mock, gw):
        answer = _chat(gw)
        assert answer.status_code == 200, answer.text
        before = mock.stats()["h2"]
        time.sleep(2.5)  # idle: ~8 PINGs at 0.3 s
        after = mock.stats()["h2"]
        # The control plane's grpc.aio channel PINGs every 30 s: these are the data plane's.
        assert after["pings"] - before["pings"] >= 5, (before, after)
        assert after["connections"] == before["connections"]  # the same connection, kept
        assert _chat(gw).status_code == 200


def test_e2e_stopped_mock_connection_closed_then_a_new_one(model_dir: Path) -> None:
    with launched(model_dir, "0.5,0.5", "--itl-ms", "20") as (mock, gw):
        assert _chat(gw).status_code == 200
        before = mock.stats()["h2"]
        body = {
            "model": "llama3",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2000,
            "stream": True,
        }
        lines: list[str] = []
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=body, timeout=30.0
        ) as stream:
            it = stream.iter_lines()
            while not any('"content"' in line for line in lines):
                lines.append(next(it))
            os.kill(mock.proc.pid, signal.SIGSTOP)  # gone without a FIN: no ACK, no tokens
            stopped = time.monotonic()
            try:
                lines.extend(it)  # ends when the gateway gives up on the connection
                elapsed = time.monotonic() - stopped
            finally:
                os.kill(mock.proc.pid, signal.SIGCONT)
        # After the first token: an error event, then [DONE], within interval + timeout.
        print(f"stream ended {elapsed:.2f} s after SIGSTOP")
        assert elapsed < 4.0, elapsed
        assert any('"error"' in line for line in lines), lines[-3:]
        assert "data: [DONE]" in lines
        assert "no HTTP/2 PING ACK" in gw.logs()
        # The next request succeeds on a new connection (once the mock runs again).
        wait_until(lambda: _chat(gw).status_code == 200, 20.0, "a request after SIGCONT")
        after = mock.stats()["h2"]
        assert after["connections"] > before["connections"], (before, after)
