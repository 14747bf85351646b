"""A minimal gRPC-over-HTTP/2 client for the data plane's engine calls (Generate, Abort,
Embed, HealthCheck), as an asyncio.Protocol on the process's loop (no threads).

Why: grpc.aio spends 55-100 us of CPU per streamed message (its reader and poller thread);
a gateway relaying tokens needs a few. Here one read of the socket is parsed in one go,
each stream's complete messages are collected as raw bytes, and the consumer takes all of
them at once (one wake-up per read, not one await per message).

What it speaks (RFC 9113 and gRPC's PROTOCOL-HTTP2.md): the preface and SETTINGS (ours:
no push, our receive window and frame size; the peer's: INITIAL_WINDOW_SIZE,
MAX_FRAME_SIZE, MAX_CONCURRENT_STREAMS, all ACKed); request HEADERS built once per target
from stateless HPACK literals (+ CONTINUATION past the peer's frame size), `grpc-timeout`
per call; response header blocks decoded with `hpack` (every block, in order); DATA with
5-byte length-prefixed messages split anywhere; trailers and Trailers-Only answers;
flow control both ways (receive: WINDOW_UPDATE once half of a window was consumed by the
caller; send: a request body waits for the peer's windows); PING ACK; RST_STREAM both ways
(our CANCEL when the caller stops or the deadline passes); GOAWAY (the streams above its
last id were not processed: they are sent again on a new connection; the connection takes
no new streams). A connection per client (more while the peer's stream limit is reached);
a refused or dropped connection is EngineError("UNAVAILABLE") as with grpc.aio.

Keepalive as the Rust SMG's channels (crates/grpc_client/src/channel.rs): TCP keepalive on
every socket (idle 60 s), and a PING every 30 s per connection, idle or not, from one timer
per connection (loop.call_later, rearmed when the ACK comes); no ACK within 10 s closes the
connection: its streams fail with UNAVAILABLE (retried before the first token, as any
transport failure) and the next call opens a new one. SMG__GRPC_KEEPALIVE="INTERVAL,TIMEOUT"
(seconds; tests) or H2EngineClient(keepalive=...) overrides the two times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import hpack
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import vllm_engine_pb2 as vll

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
    _hpack_int,
    _literal,
    apply_settings,
    frame,
    header_fragment,
    window_increment,
)
from smg.grpc.protos import (
    BACKENDS,
    StreamNormalizer,
    build_abort_request,
    build_generate_request,
    chunk_output,
)
from smg.grpc.protos import output_from as _output_from
from smg.grpc.types import EngineError, EngineOutput, GenerateInput

STREAM_WINDOW = 1 << 20  # what one stream may send us before we consume it
CONN_WINDOW = 16 << 20  # what all streams of a connection may send us together
MAX_FRAME = 1 << 20  # the largest frame we accept (SETTINGS_MAX_FRAME_SIZE)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the servicers' limit, as client.py's channel
CONNECT_TIMEOUT = 10.0
MAX_REDO = 2  # sends of a stream the peer refused unprocessed (GOAWAY, REFUSED_STREAM)

# Keepalive, as the Rust SMG 1.13's tonic channels: http2_keep_alive_interval 30 s,
# keep_alive_timeout 10 s, keep_alive_while_idle, tcp_keepalive 60 s (its probe interval and
# count are the OS's there; here 10 s x 3, so a silent peer is dropped after ~90 s).
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 10.0
TCP_KEEPIDLE = 60
TCP_KEEPINTVL = 10
TCP_KEEPCNT = 3
KEEPALIVE_ENV = "SMG__GRPC_KEEPALIVE"  # "INTERVAL,TIMEOUT" in seconds: for tests

log = logging.getLogger("smg.grpc.h2client")


def keepalive_settings(raw: str | None = None) -> tuple[float, float]:
    """(PING interval, ACK timeout): SMG__GRPC_KEEPALIVE's "INTERVAL,TIMEOUT" when set and
    valid (positive seconds), else the Rust SMG's 30 s and 10 s."""
    if raw is None:
        raw = os.environ.get(KEEPALIVE_ENV, "")
    if raw.strip():
        try:
            interval, timeout = (float(part) for part in raw.split(","))
            if interval > 0 and timeout > 0:
                return interval, timeout
        except ValueError:
            pass
        log.warning("%s=%r is not INTERVAL,TIMEOUT in seconds: using 30,10", KEEPALIVE_ENV, raw)
    return KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT


def set_tcp_keepalive(sock: Any) -> None:
    """SO_KEEPALIVE with the idle time, probe interval and count above, where the OS has
    them (uvloop's pseudo-socket takes setsockopt too); never fails a connection."""
    if sock is None:
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    if idle is not None:
        options.append((socket.IPPROTO_TCP, idle, TCP_KEEPIDLE))
    for name, value in (("TCP_KEEPINTVL", TCP_KEEPINTVL), ("TCP_KEEPCNT", TCP_KEEPCNT)):
        opt = getattr(socket, name, None)
        if opt is not None:
            options.append((socket.IPPROTO_TCP, opt, value))
    for level, opt, value in options:
        try:
            sock.setsockopt(level, opt, value)
        except (OSError, AttributeError, TypeError):
            return


RST_NO_ERROR, RST_PROTOCOL, RST_REFUSED, RST_CANCEL = 0x0, 0x1, 0x7, 0x8
CODE_NAMES: dict[int, str] = {c.value[0]: c.name for c in grpc.StatusCode}
# gRPC's mapping of an HTTP status without grpc-status (doc/http-grpc-status-mapping.md).
HTTP_CODES = {
    400: "INTERNAL",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "UNIMPLEMENTED",
    429: "UNAVAILABLE",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}
# RST_STREAM error codes as gRPC reports them (PROTOCOL-HTTP2.md "Errors").
RST_CODES = {0x0: "INTERNAL", 0x7: "UNAVAILABLE", 0x8: "CANCELLED", 0xB: "RESOURCE_EXHAUSTED"}
_MESSAGE_SAFE = " !#$&'()*+,-./:;=?@[]^_`{|}~"


def grpc_timeout(seconds: float) -> str:
    """The grpc-timeout header value: at most 8 digits, the finest unit that fits."""
    micros = max(1, int(seconds * 1e6))
    if micros < 100_000_000:
        return f"{micros}u"
    millis = micros // 1000
    if millis < 100_000_000:
        return f"{millis}m"
    return f"{min(99_999_999, millis // 1000)}S"


# A frame's 9-byte head: length (24 bits, as 8 + 16), type, flags, stream id.
_FRAME_HEAD = struct.Struct(">BHBBI")


class _Refused(Exception):
    """The peer did not process the stream (GOAWAY above it, REFUSED_STREAM): send again."""


class Stream:
    """One call. The protocol appends complete messages (raw bytes) to `messages` and
    wakes the caller; the caller takes them all with `take()`."""

    __slots__ = (
        "conn",
        "consumed",
        "ended",
        "error",
        "fresh",
        "got_headers",
        "message",
        "messages",
        "need",
        "partial",
        "received",
        "send_window",
        "sid",
        "status",
        "timer",
        "waiter",
    )

    def __init__(self, conn: H2Connection, sid: int, send_window: int) -> None:
        self.conn = conn
        self.sid = sid
        self.send_window = send_window
        self.messages: list[bytes] = []
        self.partial = bytearray()  # an incomplete message's bytes so far
        self.need = 5  # the bytes `partial` must reach before a message can be complete
        self.received = 0  # DATA bytes received, not yet taken by the caller
        self.consumed = 0  # taken by the caller, not yet given back in a WINDOW_UPDATE
        self.got_headers = False
        self.fresh = True  # no message taken yet: its first wakes ahead of the others
        self.ended = False  # END_STREAM, RST_STREAM, GOAWAY or the connection's end
        self.status: int | None = None  # grpc-status
        self.message = ""
        self.error: BaseException | None = None  # EngineError | _Refused
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self.ended = True
            self.error = error
        self.wake()

    def take(self) -> list[bytes]:
        """The messages received so far (the window they used is given back)."""
        batch = self.messages
        if batch:
            self.messages = []
            self.fresh = False
        n = self.received
        if n:
            self.received = 0
            self.conn.consumed(self, n)
        return batch

    async def wait(self) -> None:
        if self.messages or self.ended or self.received >= STREAM_WINDOW // 2:
            return
        self.waiter = self.conn.loop.create_future()
        await self.waiter

    def result(self) -> None:
        """Raise what ended the stream, if it was not grpc-status 0."""
        if self.error is not None:
            raise self.error
        if self.status != 0:
            code = CODE_NAMES.get(self.status or 2, "UNKNOWN")
            raise EngineError(code, self.message or code)

    def cancel(self) -> None:
        """The caller stopped: RST_STREAM CANCEL if the stream is still open."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        if not self.ended:
            self.ended = True
            self.error = EngineError("CANCELLED", "cancelled by the gateway")
            conn.reset(self, RST_CANCEL)
        # Bytes not taken count against the connection's window: give them back.
        leftover = self.received
        self.received = 0
        self.messages = []
        if leftover:
            conn.consumed(self, leftover)

    def on_deadline(self) -> None:
        self.timer = None
        if not self.ended:
            self.conn.reset(self, RST_CANCEL)
            self.fail(EngineError("DEADLINE_EXCEEDED", "Deadline Exceeded"))


class H2Connection(asyncio.Protocol):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_gone: Callable[[H2Connection], None],
        keepalive: tuple[float, float] = (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT),
        where: str = "the worker",
    ):
        self.loop = loop
        self.on_gone = on_gone
        self.where = where
        # One timer per connection: the next PING (interval), then its ACK's deadline.
        self.ping_interval, self.ping_timeout = keepalive
        self.ping_timer: asyncio.TimerHandle | None = None
        self.ping_payload: bytes | None = None  # the PING in flight, until its ACK
        self.pings = 0  # PINGs sent (the payload's counter)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.decoder = hpack.Decoder()
        self.streams: dict[int, Stream] = {}
        self.next_sid = 1
        self.usable = True  # False after GOAWAY or the connection's end
        self.closed = False
        self.ready: asyncio.Future[None] = loop.create_future()  # the peer's first SETTINGS
        self.peer_window = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = 16384
        self.peer_max_streams = 1 << 31
        self.send_window = 65535  # the connection's send window
        self.conn_consumed = 0  # received bytes given back neither by a WINDOW_UPDATE
        self.pending: deque[tuple[Stream, memoryview]] = deque()  # DATA waiting for window
        self.header_block: tuple[int, int, bytearray] | None = None
        self.out: list[bytes] = []
        self.in_read = False  # inside data_received: writes are gathered in `out`

    # ------------------------------------------------------------------ transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        settings = (
            struct.pack(">HI", 0x2, 0)  # ENABLE_PUSH off
            + struct.pack(">HI", 0x4, STREAM_WINDOW)
            + struct.pack(">HI", 0x5, MAX_FRAME)
        )
        self.transport.write(  # type: ignore[union-attr]
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", CONN_WINDOW - 65535))
        )
        set_tcp_keepalive(transport.get_extra_info("socket"))
        self.ping_timer = self.loop.call_later(self.ping_interval, self._ping)

    # ------------------------------------------------------------------ keepalive
    def _ping(self) -> None:
        """Send a PING; the same timer now waits for its ACK."""
        if self.closed:
            self.ping_timer = None
            return
        self.pings += 1
        payload = self.pings.to_bytes(8, "big")
        self.ping_payload = payload
        self.write(frame(PING, 0, 0, payload))
        self.ping_timer = self.loop.call_later(self.ping_timeout, self._ping_timed_out)

    def _on_ping_ack(self, payload: bytes) -> None:
        if self.ping_payload is None or payload != self.ping_payload or self.closed:
            return  # not ours (or late): ignored
        self.ping_payload = None
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        self.ping_timer = self.loop.call_later(self.ping_interval, self._ping)

    def _ping_timed_out(self) -> None:
        """No PING ACK in time: the peer is gone without a FIN/RST (host down, a dropped
        flow, a wedged engine). Its streams fail with UNAVAILABLE; the connection is dropped
        at once (no GOAWAY: nobody reads it) and the channel opens a new one."""
        self.ping_timer = None
        if self.closed:
            return
        why = f"no HTTP/2 PING ACK from {self.where} in {self.ping_timeout:g} s"
        log.warning("%s: connection closed", why)
        self.closed = True
        self.usable = False
        for st in list(self.streams.values()):
            st.fail(EngineError("UNAVAILABLE", why))
        self.streams.clear()
        self.pending.clear()
        self.on_gone(self)
        if self.transport is not None:
            self.transport.abort()

    def _stop_keepalive(self) -> None:
        if self.ping_timer is not None:
            self.ping_timer.cancel()
            self.ping_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        self.closed = True
        self.usable = False
        why = f"connection to the worker lost: {exc}" if exc else "the worker closed the connection"
        if not self.ready.done():
            self.ready.set_exception(EngineError("UNAVAILABLE", why))
            self.ready.exception()  # retrieved: nobody may be waiting
        for st in list(self.streams.values()):
            st.fail(EngineError("UNAVAILABLE", why))
        self.streams.clear()
        self.pending.clear()
        self.on_gone(self)

    def write(self, data: bytes) -> None:
        if self.in_read:
            self.out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def has_room(self) -> bool:
        return (
            self.usable and len(self.streams) < self.peer_max_streams and self.next_sid < (1 << 31)
        )

    # ------------------------------------------------------------------ calls
    def open(self, headers: bytes, body: bytes, deadline: float | None) -> Stream:
        """Start a call: HEADERS (+ CONTINUATION), then the body as DATA with END_STREAM,
        as far as the peer's windows allow (the rest when they open)."""
        sid = self.next_sid
        self.next_sid += 2
        st = Stream(self, sid, self.peer_window)
        self.streams[sid] = st
        parts: list[bytes] = []
        limit = self.peer_max_frame
        if len(headers) <= limit:
            parts.append(frame(HEADERS, END_HEADERS, sid, headers))
        else:
            parts.append(frame(HEADERS, 0, sid, headers[:limit]))
            rest = headers[limit:]
            while rest:
                chunk, rest = rest[:limit], rest[limit:]
                parts.append(frame(CONTINUATION, 0 if rest else END_HEADERS, sid, chunk))
        message = b"\x00" + len(body).to_bytes(4, "big") + body
        n = len(message)
        if not self.pending and n <= self.send_window and n <= st.send_window and n <= limit:
            self.send_window -= n
            st.send_window -= n
            parts.append(frame(DATA, END_STREAM, sid, message))
            self.write(b"".join(parts))
        else:
            self.write(b"".join(parts))
            self.pending.append((st, memoryview(message)))
            self._drain()
        if deadline is not None:
            st.timer = self.loop.call_at(deadline, st.on_deadline)
        return st

    def _drain(self) -> None:
        """Send queued request bodies as far as the windows allow."""
        out: list[bytes] = []
        pending = self.pending
        while pending:
            st, rest = pending[0]
            if st.ended:
                pending.popleft()
                continue
            n = min(len(rest), self.send_window, st.send_window, self.peer_max_frame)
            if n <= 0:
                break
            self.send_window -= n
            st.send_window -= n
            last = n == len(rest)
            out.append(frame(DATA, END_STREAM if last else 0, st.sid, bytes(rest[:n])))
            if last:
                pending.popleft()
            else:
                pending[0] = (st, rest[n:])
        if out:
            self.write(b"".join(out))

    def reset(self, st: Stream, code: int) -> None:
        if self.streams.pop(st.sid, None) is not None:
            self.write(frame(RST_STREAM, 0, st.sid, struct.pack(">I", code)))
        self._maybe_close()

    def consumed(self, st: Stream, n: int) -> None:
        """The caller took `n` received bytes: give the windows back in halves."""
        out = b""
        if not st.ended:
            st.consumed += n
            if st.consumed >= STREAM_WINDOW // 2:
                out = frame(WINDOW_UPDATE, 0, st.sid, struct.pack(">I", st.consumed))
                st.consumed = 0
        self.conn_consumed += n
        if self.conn_consumed >= CONN_WINDOW // 2:
            out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.conn_consumed))
            self.conn_consumed = 0
        if out:
            self.write(out)

    def finished(self, st: Stream) -> None:
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        self.streams.pop(st.sid, None)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if not self.usable and not self.streams and self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.usable = False
        self._stop_keepalive()
        if self.transport is not None and not self.closed:
            self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, RST_NO_ERROR)))
            self.transport.close()

    # ------------------------------------------------------------------ receiving
    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        pos = 0
        end = len(view)
        copy = view is not data  # slices of the bytearray buffer are made bytes
        streams = self.streams
        unpack = _FRAME_HEAD.unpack_from
        # Streams past their first message, woken once the read is parsed: a read carries
        # tokens of many streams, and each woken task runs its batch's per-token work in
        # wake order; a stream waiting for its first token (its TTFT) goes ahead of them.
        later: list[Stream] = []
        self.in_read = True
        try:
            while end - pos >= 9:
                high, low, ftype, flags, sid = unpack(view, pos)
                length = high << 16 | low
                start = pos + 9
                pos = start + length
                if pos > end:
                    pos = start - 9
                    break
                sid &= 0x7FFFFFFF
                if ftype == DATA:
                    # The streamed case: one whole uncompressed message in an unpadded
                    # frame of an open stream with nothing partial, appended as it is.
                    st = streams.get(sid)
                    if (
                        st is not None
                        and not flags
                        and not st.partial
                        and length >= 5
                        and not view[start]
                        and int.from_bytes(view[start + 1 : start + 5], "big") == length - 5
                        and not st.ended
                    ):
                        st.received += length
                        message = view[start + 5 : pos]
                        messages = st.messages
                        messages.append(bytes(message) if copy else message)
                        if st.fresh:
                            st.wake()  # a new stream's first token: its task runs first
                        elif len(messages) == 1:
                            later.append(st)
                        continue
                    payload = view[start:pos]
                    self._on_data(flags, sid, bytes(payload) if copy else payload)
                else:
                    payload = view[start:pos]
                    self._on_frame(ftype, flags, sid, bytes(payload) if copy else payload)
                if self.closed:
                    return
        except (hpack.HPACKError, ValueError, struct.error, IndexError) as exc:
            self._protocol_error(f"bad HTTP/2 from the worker: {exc!r}")
            return
        finally:
            for st in later:
                st.wake()
            self.in_read = False
            if self.out:
                out = b"".join(self.out)
                self.out.clear()
                if self.transport is not None and not self.closed:
                    self.transport.write(out)
        if buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]

    def _protocol_error(self, why: str) -> None:
        self.usable = False
        self._stop_keepalive()
        for st in list(self.streams.values()):
            st.fail(EngineError("UNAVAILABLE", why))
        self.streams.clear()
        if self.transport is not None and not self.closed:
            self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, RST_PROTOCOL)))
            self.transport.close()

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        st = self.streams.get(sid)
        if st is None or st.ended:
            # A stream we reset or finished: its bytes still count on the connection.
            if payload:
                self.consumed_unknown(len(payload))
            return
        st.received += len(payload)  # padding included: it counts against the windows
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        messages = st.messages
        before = len(messages)
        part = st.partial
        if part:
            part += payload  # a large message arrives in many frames: no quadratic copy
            data: bytes = b""
            if len(part) >= st.need:
                data = bytes(part)
                st.partial = bytearray()
        else:
            data = payload
        if data:
            pos = 0
            end = len(data)
            need = 5
            while end - pos >= 5:
                n = int.from_bytes(data[pos + 1 : pos + 5], "big")
                if end - pos - 5 < n:
                    need = 5 + n
                    break
                if data[pos]:  # compressed: we never offered an encoding
                    self.reset(st, RST_PROTOCOL)
                    st.fail(EngineError("INTERNAL", "compressed message without grpc-encoding"))
                    return
                messages.append(data[pos + 5 : pos + 5 + n])
                pos += 5 + n
            if pos < end:
                if need > 5 + MAX_MESSAGE_BYTES:
                    self.reset(st, RST_CANCEL)
                    st.fail(EngineError("RESOURCE_EXHAUSTED", "message larger than the limit"))
                    return
                st.partial = bytearray(data[pos:])
                st.need = need
        if flags & END_STREAM:
            self._end(st, None)
        elif len(messages) > before or st.received >= STREAM_WINDOW // 2:
            st.wake()  # new messages, or a window to give back (a large message's part)

    def consumed_unknown(self, n: int) -> None:
        self.conn_consumed += n
        if self.conn_consumed >= CONN_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.conn_consumed)))
            self.conn_consumed = 0

    def _end(self, st: Stream, fields: list[tuple[str, str]] | None) -> None:
        """END_STREAM on `st` (with the trailers' fields when they ended it)."""
        status: int | None = None
        message = ""
        for name, value in fields or ():
            if name == "grpc-status":
                status = int(value)
            elif name == "grpc-message":
                message = urllib.parse.unquote(value, errors="replace")
        self.streams.pop(st.sid, None)
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if st.ended:
            return
        st.ended = True
        if st.partial and not status:
            st.error = EngineError("INTERNAL", "the stream ended inside a message")
        elif status is None:
            st.error = EngineError("INTERNAL", "the worker's answer has no grpc-status")
        else:
            st.status = status
            st.message = message
        st.wake()
        self._maybe_close()

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == HEADERS:
            payload = header_fragment(flags, payload)
            if flags & END_HEADERS:
                self._on_headers(sid, flags, payload)
            else:
                self.header_block = (sid, flags, bytearray(payload))
        elif ftype == CONTINUATION:
            if self.header_block is None or self.header_block[0] != sid:
                raise ValueError("CONTINUATION without its HEADERS")
            hsid, hflags, block = self.header_block
            block += payload
            if flags & END_HEADERS:
                self.header_block = None
                self._on_headers(hsid, hflags, bytes(block))
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            apply_settings(self, payload)
            self.write(frame(SETTINGS, ACK, 0))
            if not self.ready.done():
                self.ready.set_result(None)
            self._drain()
        elif ftype == WINDOW_UPDATE:
            inc = window_increment(payload)
            if sid == 0:
                self.send_window += inc
            else:
                st = self.streams.get(sid)
                if st is not None:
                    st.send_window += inc
            self._drain()
        elif ftype == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
            else:
                self._on_ping_ack(bytes(payload))
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None:
                code = struct.unpack(">I", payload[:4])[0]
                if code == RST_REFUSED and not st.got_headers:
                    st.fail(_Refused("the worker refused the stream"))
                else:
                    name = RST_CODES.get(code, "INTERNAL")
                    st.fail(EngineError(name, f"stream reset by the worker (HTTP/2 error {code})"))
                if st.timer is not None:
                    st.timer.cancel()
                    st.timer = None
        elif ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            last &= 0x7FFFFFFF
            self.usable = False
            for st_sid in [s for s in self.streams if s > last]:
                st = self.streams.pop(st_sid)
                st.fail(_Refused(f"the worker sent GOAWAY (error {code})"))
            self.on_gone(self)
            self._maybe_close()

    def _on_headers(self, sid: int, flags: int, block: bytes) -> None:
        fields = self.decoder.decode(block)  # always: the decoder's table must keep step
        st = self.streams.get(sid)
        if st is None or st.ended:
            return
        if not st.got_headers:
            st.got_headers = True
            http = 200
            for name, value in fields:
                if name == ":status":
                    http = int(value)
            if http != 200 and not any(name == "grpc-status" for name, _ in fields):
                self.reset(st, RST_CANCEL)
                code = HTTP_CODES.get(http, "UNKNOWN")
                st.fail(EngineError(code, f"the worker answered HTTP {http}"))
                return
            if flags & END_STREAM:  # Trailers-Only
                self._end(st, fields)
            return
        if flags & END_STREAM:
            self._end(st, fields)


class H2Channel:
    """The connections to one worker: streams go to the first with room; a new one is
    made when none has (the peer's MAX_CONCURRENT_STREAMS) or after GOAWAY."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        keepalive: tuple[float, float] = (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT),
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl_context
        self.keepalive = keepalive
        self.conns: list[H2Connection] = []
        self._connecting: asyncio.Future[H2Connection] | None = None
        self.closed = False

    def _gone(self, conn: H2Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    async def connection(self) -> H2Connection:
        for conn in self.conns:
            if conn.has_room():
                return conn
        if self.closed:
            raise EngineError("UNAVAILABLE", "the client is closed")
        while self._connecting is not None:
            conn = await asyncio.shield(self._connecting)
            if conn.has_room():
                return conn
        loop = asyncio.get_running_loop()
        future: asyncio.Future[H2Connection] = loop.create_future()
        self._connecting = future
        try:
            conn = await self._connect(loop)
            self.conns.append(conn)
            future.set_result(conn)
            return conn
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            self._connecting = None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> H2Connection:
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(
                    lambda: H2Connection(loop, self._gone, self.keepalive, where),
                    self.host.strip("[]"),
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host.strip("[]") if self.ssl is not None else None,
                )
                await conn.ready
        except TimeoutError:
            raise EngineError("UNAVAILABLE", f"connecting to {where} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise EngineError("UNAVAILABLE", f"cannot connect to {where}: {exc}") from None
        if self.ssl is not None:
            tls = conn.transport.get_extra_info("ssl_object") if conn.transport else None
            if tls is not None and tls.selected_alpn_protocol() != "h2":
                conn.close()
                raise EngineError("UNAVAILABLE", f"{where} did not agree to HTTP/2 (ALPN h2)")
        return conn

    def close(self) -> None:
        self.closed = True
        for conn in list(self.conns):
            conn.close()
        self.conns.clear()


def _split(target: str) -> tuple[str, int, bool]:
    secure = target.startswith("grpcs://")
    for prefix in ("grpcs://", "grpc://"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
    target = target.rstrip("/")
    host, _, port = target.rpartition(":")
    return host, int(port), secure


class H2EngineClient:
    """EngineClient's data-plane calls (generate, abort, embed, health) over H2Channel.
    `tls`: an ssl.SSLContext (its ALPN is set to h2) for grpcs:// workers."""

    def __init__(
        self,
        target: str,
        backend: str,
        *,
        tls: ssl.SSLContext | None = None,
        api_key: str | None = None,
        keepalive: tuple[float, float] | None = None,
    ) -> None:
        """`keepalive`: (PING interval, ACK timeout) in seconds; default
        SMG__GRPC_KEEPALIVE's, else 30 and 10 (the Rust SMG's)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown gRPC backend {backend!r} (expected vllm or sglang)")
        self.backend = backend
        self.target = target
        host, port, secure = _split(target)
        if secure and tls is None:
            tls = ssl.create_default_context()
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
        self.channel = H2Channel(host, port, tls, keepalive or keepalive_settings())
        self.pb: Any = vll if backend == "vllm" else sgl
        service = (
            "vllm.grpc.engine.VllmEngine"
            if backend == "vllm"
            else ("sglang.grpc.scheduler.SglangScheduler")
        )
        authority = f"{host}:{port}"
        scheme = b"\x87" if tls is not None else b"\x86"  # :scheme https / http (static)
        common = _literal("content-type", "application/grpc") + _literal("te", "trailers")
        if api_key:
            common += _literal("authorization", f"Bearer {api_key}")
        # :method POST (static 3), :path as a literal with the static name 4 (no indexing).
        self._headers = {
            method: b"\x83"
            + scheme
            + _path(f"/{service}/{method}")
            + _literal(":authority", authority)
            + common
            for method in ("Generate", "Abort", "Embed", "HealthCheck")
        }

    def _headers_for(self, method: str, timeout: float | None) -> bytes:
        block = self._headers[method]
        if timeout is not None:
            block += _literal("grpc-timeout", grpc_timeout(timeout))
        return block

    async def _open(self, method: str, body: bytes, timeout: float | None) -> Stream:
        conn = await self.channel.connection()
        deadline = None if timeout is None else conn.loop.time() + timeout
        return conn.open(self._headers_for(method, timeout), body, deadline)

    async def _batches(
        self, method: str, body: bytes, timeout: float | None
    ) -> AsyncIterator[list[bytes]]:
        """The call's raw messages, a batch per read; sent again (on a new connection)
        when the peer refused it unprocessed."""
        end = None if timeout is None else time.monotonic() + timeout
        for attempt in range(MAX_REDO + 1):
            left = None if end is None else max(0.001, end - time.monotonic())
            st = await self._open(method, body, left)
            got = False
            try:
                while True:
                    await st.wait()
                    batch = st.take()
                    if batch:
                        got = True
                        yield batch
                    elif st.ended:
                        break
                try:
                    st.result()
                except _Refused as refused:
                    if got or attempt == MAX_REDO:
                        raise EngineError("UNAVAILABLE", str(refused)) from None
                    continue
                return
            finally:
                st.cancel()
                st.conn.finished(st)

    async def _unary(self, method: str, body: bytes, timeout: float | None) -> bytes:
        answer: bytes | None = None
        batches = self._batches(method, body, timeout)
        try:
            async for batch in batches:
                answer = batch[0]
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
        if answer is None:
            raise EngineError("INTERNAL", f"{method}: the worker sent no message")
        return answer

    # --- the EngineClient methods the data plane uses -----------------------------------------

    async def generate_batches(
        self, req: GenerateInput, *, timeout: float | None
    ) -> AsyncIterator[list[EngineOutput]]:
        """`generate`'s outputs, a list per read of the socket (one wake-up per list)."""
        body = build_generate_request(self.backend, req).SerializeToString()
        parse = self.pb.GenerateResponse.FromString
        backend = self.backend
        feed = StreamNormalizer().feed
        yielded = False
        batches = self._batches("Generate", body, timeout)
        try:
            async for raw in batches:
                outs = []
                for data in raw:
                    # A plain chunk is read from its bytes (protos.chunk_output: no
                    # protobuf object, no malloc_trim per token); the rest is parsed.
                    out = chunk_output(backend, data)
                    if out is None:
                        out = _output_from(backend, parse(data))
                    out = feed(out)
                    if out is not None:
                        outs.append(out)
                if outs:
                    yielded = True
                    yield outs
        except EngineError as exc:
            if yielded and exc.before_first_token:
                exc.before_first_token = False
            raise
        finally:
            # Now, not when the generator is collected: RST_STREAM goes out at once.
            await batches.aclose()  # type: ignore[attr-defined]

    async def generate(
        self, req: GenerateInput, *, timeout: float | None
    ) -> AsyncIterator[EngineOutput]:
        """As EngineClient.generate: normalised outputs, EngineError on failure."""
        batches = self.generate_batches(req, timeout=timeout)
        try:
            async for outs in batches:
                for out in outs:
                    yield out
        finally:
            await batches.aclose()  # type: ignore[attr-defined]

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests on the engine; never raises (the request is gone either way)."""
        if not request_ids:
            return
        groups = [request_ids] if self.backend == "vllm" else [[rid] for rid in request_ids]
        for ids in groups:
            body = build_abort_request(self.backend, ids).SerializeToString()
            try:
                await self._unary("Abort", body, 5.0)
            except EngineError:
                return

    async def embed(
        self, request_id: str, input_ids: list[int], timeout: float | None
    ) -> tuple[list[float], int]:
        pb = self.pb
        body = pb.EmbedRequest(
            request_id=request_id, tokenized=pb.TokenizedInput(input_ids=input_ids)
        ).SerializeToString()
        answer = pb.EmbedResponse.FromString(await self._unary("Embed", body, timeout))
        return list(answer.embedding), answer.prompt_tokens

    async def health(self, timeout: float) -> bool:
        body = self.pb.HealthCheckRequest().SerializeToString()
        try:
            answer = self.pb.HealthCheckResponse.FromString(
                await self._unary("HealthCheck", body, timeout)
            )
        except EngineError:
            return False
        return bool(answer.healthy)

    async def close(self) -> None:
        self.channel.close()


def _path(path: str) -> bytes:
    """:path as a literal without indexing whose name is the static table's entry 4."""
    value = path.encode()
    return _hpack_int(4, 4) + _hpack_int(len(value), 7) + value
