"""A minimal gRPC-over-HTTP/2 server for the mock engine (h2c with prior knowledge).

Why: grpc.aio spends ~50 us of CPU per streamed message in Python; a mock that must
out-stream the gateways it feeds needs a few. Here every Generate stream is advanced by
one ticker per process (no task per stream), each token's message is encoded by hand
(GenRun with raw=True), and each connection's frames of a tick go out in one write.

What it speaks (RFC 9113, as gRPC clients use it): the client preface; SETTINGS (peer
INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE honoured, ACKed); HEADERS + CONTINUATION decoded
with `hpack` (every block, to keep the dynamic table in step); DATA (request messages,
length-prefixed, uncompressed; WINDOW_UPDATE sent back for what was read); PING (ACKed);
RST_STREAM (the client's cancel); WINDOW_UPDATE (send windows per stream and connection:
DATA waits when they are spent); GOAWAY. Responses: HEADERS `:status 200`,
`content-type: application/grpc`, the messages, trailers `grpc-status` (+ `grpc-message`),
all header blocks literal without indexing (no encoder state). Unary and streaming
handlers other than Generate run as tasks on the protobuf servicer methods.
"""

from __future__ import annotations

import asyncio
import struct
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import hpack

from smg.grpc.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    _literal,
    apply_settings,
    frame,
    header_fragment,
    window_increment,
)

RECV_WINDOW = 1 << 30  # what we let clients send before a WINDOW_UPDATE
MAX_WRITE_BUFFER = 4 << 20  # a connection above this is skipped by the ticker until it drains

# This process's HTTP/2 counts, in the control port's /stats as "h2" (keepalive tests):
# connections accepted, connections open, PINGs received (each ACKed).
COUNTS = {"connections": 0, "open": 0, "pings": 0}


RESPONSE_HEADERS = b"\x88" + _literal("content-type", "application/grpc")  # 0x88: :status 200


def trailers_block(code: grpc.StatusCode, message: str = "") -> bytes:
    block = _literal("grpc-status", str(code.value[0]))
    if message:
        block += _literal(
            "grpc-message", urllib.parse.quote(message, safe=" !#$&'()*+,-./:;=?@[]^_`{|}~")
        )
    return block


class Stream:
    __slots__ = ("body", "closed", "headers_sent", "path", "run", "send_window", "sid", "task")

    def __init__(self, sid: int, window: int) -> None:
        self.sid = sid
        self.path = ""
        self.body = bytearray()
        self.send_window = window
        self.headers_sent = False
        self.closed = False
        self.run: Any = None  # a GenRun while Generate streams
        self.task: asyncio.Task[None] | None = None


class CallAbort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Context:
    """The slice of grpc.aio.ServicerContext the servicer methods use."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise CallAbort(code, details)


# (path) -> ("unary" | "stream" | "generate", request class, handler)
Route = tuple[str, Any, Callable[..., Any]]


class Ticker:
    """Advances every Generate stream of the process when it is due."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.streams: list[tuple[Connection, Stream]] = []
        self._handle: asyncio.Handle | asyncio.TimerHandle | None = None

    def add(self, conn: Connection, st: Stream) -> None:
        self.streams.append((conn, st))
        self.wake()

    def wake(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_soon(self.tick)

    def tick(self) -> None:
        self._handle = None
        now = time.monotonic()
        keep: list[tuple[Connection, Stream]] = []
        touched: set[Connection] = set()
        next_due = float("inf")
        for conn, st in self.streams:
            run = st.run
            if st.closed or conn.closed:
                run.close(cancelled=not run.done)
                continue
            if conn.write_blocked():
                keep.append((conn, st))
                next_due = min(next_due, now + 0.001)
                continue
            due = run.due()
            if due > now:
                keep.append((conn, st))
                next_due = min(next_due, due)
                continue
            touched.add(conn)
            try:
                msgs = run.advance()
            except Exception as exc:  # Abort from the run (a configured failure)
                code = getattr(exc, "code", grpc.StatusCode.INTERNAL)
                for m in getattr(run, "pending_failure", []):
                    conn.send_message(st, m)
                conn.send_trailers(st, code, getattr(exc, "message", str(exc)))
                run.close()
                continue
            for m in msgs:
                conn.send_message(st, m)
            if run.done:
                conn.send_trailers(st, grpc.StatusCode.OK)
                run.close()
                continue
            keep.append((conn, st))
            next_due = min(next_due, run.due())
        self.streams = keep
        for conn in touched:
            conn.flush()
        if keep:
            delay = next_due - time.monotonic()
            if delay <= 0:
                self._handle = self.loop.call_soon(self.tick)
            else:
                self._handle = self.loop.call_later(delay, self.tick)


class Connection(asyncio.Protocol):
    def __init__(
        self, routes: dict[str, Route], ticker: Ticker, new_run: Callable[[Any, Any], Any]
    ) -> None:
        self.routes = routes
        self.ticker = ticker
        self.new_run = new_run  # (backend-independent) request message -> GenRun
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.streams: dict[int, Stream] = {}
        self.peer_window = 65535  # peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = 16384
        self.peer_max_streams = 1 << 31  # recorded (apply_settings); a server opens none
        self.conn_window = 65535
        self.out: list[bytes] = []
        # DATA payloads waiting for send window, and trailers queued behind them (True)
        self.pending: deque[tuple[Stream, bytes, bool]] = deque()
        self.header_block: tuple[int, int, bytearray] | None = None  # (sid, flags, fragment)
        self.closed = False

    # -------------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        COUNTS["connections"] += 1
        COUNTS["open"] += 1
        settings = struct.pack(">HI", 0x3, 1 << 20) + struct.pack(">HI", 0x4, RECV_WINDOW)
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECV_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        COUNTS["open"] -= 1
        for st in self.streams.values():
            st.closed = True
            if st.task is not None:
                st.task.cancel()
        self.ticker.wake()

    def write_blocked(self) -> bool:
        t = self.transport
        return t is None or t.get_write_buffer_size() > MAX_WRITE_BUFFER

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    # -------------------------------------------------------------- sending
    def _data(self, st: Stream, payload: bytes) -> None:
        n = len(payload)
        if (
            not self.pending
            and n <= self.conn_window
            and n <= st.send_window
            and n <= self.peer_max_frame
        ):
            self.conn_window -= n
            st.send_window -= n
            # A DATA frame (type 0, no flags) written out: the per-token hot path.
            self.out.append(
                n.to_bytes(3, "big") + b"\x00\x00" + st.sid.to_bytes(4, "big") + payload
            )
            return
        self.pending.append((st, payload, False))

    def _drain_pending(self) -> None:
        while self.pending:
            st, payload, is_trailers = self.pending[0]
            if st.closed:
                self.pending.popleft()
                continue
            if is_trailers:
                self.pending.popleft()
                self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, st.sid, payload))
                st.closed = True
                self.streams.pop(st.sid, None)
                continue
            n = min(len(payload), self.conn_window, st.send_window, self.peer_max_frame)
            if n <= 0:
                return
            self.pending.popleft()
            if n < len(payload):
                self.pending.appendleft((st, payload[n:], False))
            self.conn_window -= n
            st.send_window -= n
            self.out.append(frame(DATA, 0, st.sid, payload[:n]))

    def send_message(self, st: Stream, msg: Any) -> None:
        if st.closed:
            return
        data = msg if msg.__class__ is bytes else msg.SerializeToString()
        if not st.headers_sent:
            st.headers_sent = True
            self.out.append(frame(HEADERS, END_HEADERS, st.sid, RESPONSE_HEADERS))
        self._data(st, b"\x00" + len(data).to_bytes(4, "big") + data)

    def send_trailers(self, st: Stream, code: grpc.StatusCode, message: str = "") -> None:
        if st.closed:
            return
        block = trailers_block(code, message)
        if not st.headers_sent:  # Trailers-Only
            st.headers_sent = True
            block = RESPONSE_HEADERS + block
        if any(p[0] is st for p in self.pending):
            self.pending.append((st, block, True))
            return
        self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, st.sid, block))
        st.closed = True
        self.streams.pop(st.sid, None)

    # -------------------------------------------------------------- receiving
    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.preface_seen:
            if len(buf) < len(PREFACE):
                return
            if bytes(buf[: len(PREFACE)]) != PREFACE:
                self.transport.close()  # type: ignore[union-attr]
                return
            del buf[: len(PREFACE)]
            self.preface_seen = True
        pos = 0
        end = len(buf)
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if end - pos < 9 + length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            try:
                self.on_frame(ftype, flags, sid, payload)
            except hpack.HPACKError:
                self.out.append(
                    frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0x9))
                )  # COMPRESSION_ERROR
                self.flush()
                self.transport.close()  # type: ignore[union-attr]
                return
        del buf[:pos]
        self.flush()

    def on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == DATA:
            st = self.streams.get(sid)
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if payload:
                self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload))))
            if st is None:
                return
            st.body += payload
            if payload and not flags & END_STREAM:
                self.out.append(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", len(payload))))
            if flags & END_STREAM:
                self.dispatch(st)
        elif ftype == HEADERS:
            payload = header_fragment(flags, payload)
            if flags & END_HEADERS:
                self.on_headers(sid, flags, payload)
            else:
                self.header_block = (sid, flags, bytearray(payload))
        elif ftype == CONTINUATION:
            if self.header_block is None:
                return
            hsid, hflags, block = self.header_block
            block += payload
            if flags & END_HEADERS:
                self.header_block = None
                self.on_headers(hsid, hflags, bytes(block))
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            apply_settings(self, payload)
            self.out.append(frame(SETTINGS, ACK, 0))
            self._drain_pending()
        elif ftype == WINDOW_UPDATE:
            inc = window_increment(payload)
            if sid == 0:
                self.conn_window += inc
            else:
                st = self.streams.get(sid)
                if st is not None:
                    st.send_window += inc
            self._drain_pending()
        elif ftype == PING:
            if not flags & ACK:
                COUNTS["pings"] += 1
                self.out.append(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None:
                st.closed = True
                if st.task is not None:
                    st.task.cancel()
                self.ticker.wake()
        elif ftype == GOAWAY:
            pass  # the client closes the connection when its streams are done

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        fields = self.decoder.decode(block)
        st = self.streams.get(sid)
        if st is None:
            if sid % 2 == 0:
                return
            st = Stream(sid, self.peer_window)
            self.streams[sid] = st
            for name, value in fields:
                if name == ":path":
                    st.path = value
        if flags & END_STREAM:
            self.dispatch(st)

    def dispatch(self, st: Stream) -> None:
        route = self.routes.get(st.path)
        if route is None:
            self.send_trailers(st, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {st.path}")
            return
        kind, req_cls, handler = route
        body = bytes(st.body)
        st.body = bytearray()
        try:
            msg = req_cls.FromString(body[5:]) if len(body) >= 5 else req_cls()
        except Exception:  # a body that does not parse as the request message
            self.send_trailers(st, grpc.StatusCode.INTERNAL, "cannot parse the request")
            return
        if kind == "generate":
            try:
                st.run = self.new_run(handler, msg)
            except CallAbort as e:
                self.send_trailers(st, e.code, e.message)
                return
            except Exception as e:  # GenRun's Abort (validation)
                self.send_trailers(st, getattr(e, "code", grpc.StatusCode.INTERNAL), str(e))
                return
            self.ticker.add(self, st)
            return
        st.task = asyncio.get_running_loop().create_task(self._call(st, kind, handler, msg))

    async def _call(self, st: Stream, kind: str, handler: Callable[..., Any], msg: Any) -> None:
        ctx = Context()
        try:
            if kind == "unary":
                answer = await handler(msg, ctx)
                self.send_message(st, answer)
            else:
                async for answer in handler(msg, ctx):
                    self.send_message(st, answer)
                    self.flush()
            self.send_trailers(st, grpc.StatusCode.OK)
        except CallAbort as e:
            self.send_trailers(st, e.code, e.message)
        except asyncio.CancelledError:
            return
        except Exception as e:  # a handler bug: the call fails, the process stays
            self.send_trailers(st, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        self.flush()


async def serve_fast(
    host: str,
    port: int,
    routes: dict[str, Route],
    new_run: Callable[[Any, Any], Any],
    *,
    reuse_port: bool = True,
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    ticker = Ticker(loop)
    return await loop.create_server(
        lambda: Connection(routes, ticker, new_run),
        host,
        port,
        reuse_port=reuse_port,
        backlog=4096,
    )
