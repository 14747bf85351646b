"""One proxied request: client request in, upstream response relayed out, chunk by chunk.

Callback-driven (no task per request on the fast path). The upstream connection and the
client connection report what happened as `lifecycle.Event`s; the transition table in
`lifecycle` answers the next state and what to do, and this module only does it. Every way
an exchange ends goes through `_finish`, which releases the in-flight count exactly once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from smg.dataplane.lifecycle import EVENT_COUNT, FLAT, Action, Event, State
from smg.httpwire import ANTHROPIC_ROUTE, HOP_BY_HOP, anthropic_rewrite, error_response, status_line

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection
    from smg.dataplane.upstream import UpstreamConnection, WorkerPool

_SKIP_RESPONSE_HEADERS = HOP_BY_HOP | {b"content-length", b"x-request-id", b"x-smg-process"}
_CHUNK_END = b"0\r\n\r\n"
# Request bodies up to this size go upstream in one write with the head (a bounded copy);
# larger ones are written apart, never copied.
SMALL_BODY_BYTES = 64 * 1024
# A worker's error answer on /v1/messages is held whole to be rewritten (item 28); past
# this size the rest is dropped (an error body that large is no error message).
MAX_REWRITTEN_ERROR_BYTES = 1024 * 1024

# What happens to response body chunks.
_RAW = 0  # relayed as they arrive, as they are (Content-Length or close-delimited)
_CHUNKED = 1  # relayed as they arrive, in chunked framing for the client
_DISCARD = 2  # an answer to HEAD: headers only (RFC 9110 9.3.2)
_HOLD = 3  # an error on /v1/messages: held until complete, then rewritten

# Plain ints on the hot path (module globals, no enum attribute lookups).
_WAITING = int(State.WAITING)
_COMPLETE = int(State.COMPLETE)
_RELAYING = int(State.RELAYING)
_N = EVENT_COUNT
_SLOT = int(Event.SLOT)
_CONNECTION = int(Event.CONNECTION)
_CONNECT_FAILED = int(Event.CONNECT_FAILED)
_HEAD = int(Event.HEAD)
_MESSAGE_COMPLETE = int(Event.COMPLETE)
_FLUSHED = int(Event.FLUSHED)
_LOST = int(Event.LOST)
_INVALID = int(Event.INVALID)
_TIMEOUT = int(Event.TIMEOUT)
_CLIENT_GONE = int(Event.CLIENT_GONE)
_OPEN = int(Action.OPEN)
_WRITE = int(Action.WRITE)
_RELAY_HEAD = int(Action.RELAY_HEAD)
_END_MESSAGE = int(Action.END_MESSAGE)
_FINISH = int(Action.FINISH)
_FAIL_CONNECT = int(Action.FAIL_CONNECT)
_FAIL_CLOSED = int(Action.FAIL_CLOSED)
_FAIL_INVALID = int(Action.FAIL_INVALID)
_FAIL_TIMEOUT = int(Action.FAIL_TIMEOUT)
_ABORT = int(Action.ABORT)
_ABORT_TIMEOUT = int(Action.ABORT_TIMEOUT)
_DROP = int(Action.DROP)


class Exchange:
    __slots__ = (
        "app",
        "body",
        "body_mode",
        "client",
        "close_delimited",
        "deadline",
        "endpoint",
        "generation",
        "head",
        "head_only",
        "held",
        "held_headers",
        "http10",
        "keep_alive",
        "method",
        "model",
        "out",
        "pool",
        "request_id",
        "row",
        "started",
        "state",
        "status",
        "stream",
        "upstream",
        "upstream_reusable",
    )

    def __init__(
        self,
        app: DataPlane,
        client: ClientConnection,
        row: int,
        generation: int,
        pool: WorkerPool,
        head: bytes,
        body: bytes,
        request_id: bytes,
        endpoint: str,
        model: str,
        stream: bool,
        keep_alive: bool,
        http10: bool,
        head_only: bool = False,
    ) -> None:
        self.app = app
        self.client = client
        self.row = row
        self.generation = generation
        self.pool = pool
        # The request as it goes upstream: head and body apart (never concatenated) and
        # dropped once written, so a large body is held once, by the request, and released
        # with it. Nothing is ever re-sent after a write (see `lifecycle`).
        self.head: bytes | None = head
        self.body: bytes | None = body
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.stream = stream
        self.keep_alive = keep_alive
        self.http10 = http10  # no chunked framing for this client (RFC 9112 6.1)
        self.head_only = head_only  # the client asked HEAD (sent upstream as GET)
        self.body_mode = _RAW  # one int decides each chunk's fate: a single test per chunk
        self.held: list[bytes] | None = None
        self.held_headers: list[tuple[bytes, bytes]] | None = None
        self.method = "POST"
        self.state = _WAITING
        self.upstream: UpstreamConnection | None = None
        self.out: list[bytes] = []
        self.close_delimited = False  # the upstream response ends when its connection does
        self.upstream_reusable = False
        self.status = 0
        self.started = time.monotonic()
        self.deadline = self.started + app.request_timeout

    def _advance(self, event: int) -> int:
        self.state, action = FLAT[self.state * _N + event]
        return action

    # --- getting a connection -------------------------------------------------------------

    def start(self) -> None:
        pool = self.pool
        conn = pool.take_idle()
        if conn is not None:
            self.got_connection(conn)
        elif pool.reserve():
            self.slot_granted()
        else:
            pool.wait(self)

    def slot_granted(self) -> None:
        """A connection slot is reserved for this exchange: open it."""
        if self._advance(_SLOT) != _OPEN:
            self.pool.release_slot()
            return
        self.app.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.pool.connect()
        except (OSError, TimeoutError) as exc:
            if self._advance(_CONNECT_FAILED) == _FAIL_CONNECT:
                reason = (
                    "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                )
                self._fail(502, "upstream_connect_failed", f"could not connect to worker: {reason}")
            return
        self.got_connection(conn)

    def got_connection(self, conn: UpstreamConnection) -> None:
        self.state, action = FLAT[self.state * _N + _CONNECTION]  # _advance, inlined
        if action != _WRITE:
            conn.release(True)  # the exchange ended meanwhile: the next one may use it
            return
        self.upstream = conn
        conn.bind(self)
        transport = conn.transport
        assert transport is not None
        body = self.body
        if body and len(body) > SMALL_BODY_BYTES:
            transport.writelines((self.head, body))  # type: ignore[arg-type]
        elif body:
            # One bounded copy beats writelines for the common small request: uvloop
            # queues a writelines for the end of the loop turn (an extra wake-up and a
            # writev), while write() goes out at once.
            transport.write(self.head + body)  # type: ignore[operator]
        else:
            transport.write(self.head)  # type: ignore[arg-type]
        self.head = self.body = None
        if conn.closed:
            # Closed between connect and now (its connection_lost found nothing bound).
            self.upstream_lost(conn)
            return
        if self.client.write_paused:
            transport.pause_reading()

    # --- upstream response events -----------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.state, action = FLAT[self.state * _N + _HEAD]
        if action != _RELAY_HEAD:
            return
        self.status = status
        if status >= 400 and self.endpoint == ANTHROPIC_ROUTE:
            # The Rust SMG rewrites a worker's errors on /v1/messages into Anthropic's shape:
            # the head is written once the whole body is known (`_emit_rewritten`).
            self.body_mode = _HOLD
            self.held = []
            self.held_headers = headers
            return
        parts = [status_line(status)]
        append = parts.append
        content_length = None
        chunked = False
        for name, value in headers:
            if name in _SKIP_RESPONSE_HEADERS:
                if name == b"content-length":
                    content_length = value
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                continue
            append(name)
            append(b": ")
            append(value)
            append(b"\r\n")
        if content_length is not None and not chunked:
            append(b"content-length: ")
            append(content_length)
            append(b"\r\n")
        elif status == 204 or status == 304:
            pass
        elif self.head_only:
            if chunked:  # the headers GET would get, no body
                append(b"transfer-encoding: chunked\r\n")
        else:
            self.close_delimited = not chunked
            if self.http10:
                # HTTP/1.0 has no chunked coding: the body ends where the connection does.
                self.keep_alive = False
            else:
                self.body_mode = _CHUNKED
                append(b"transfer-encoding: chunked\r\n")
        append(b"x-request-id: ")
        append(self.request_id)
        append(b"\r\n")
        append(self.app.process_header)
        if not self.keep_alive or self.app.draining:
            self.keep_alive = False
            append(b"connection: close\r\n")
        append(b"\r\n")
        self.out.append(b"".join(parts))
        if self.head_only:
            self.body_mode = _DISCARD

    def response_body(self, chunk: bytes) -> None:
        mode = self.body_mode
        if mode == _CHUNKED:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        elif mode == _RAW:
            self.out.append(chunk)
        elif mode == _HOLD:
            held = self.held
            if held is not None and sum(map(len, held)) < MAX_REWRITTEN_ERROR_BYTES:
                held.append(chunk)

    def response_complete(self, upstream_keep_alive: bool) -> None:
        self.state, action = FLAT[self.state * _N + _MESSAGE_COMPLETE]
        if action != _END_MESSAGE:
            return
        if self.body_mode == _HOLD:
            self._emit_rewritten()
        elif self.body_mode == _CHUNKED:
            self.out.append(_CHUNK_END)
        self.upstream_reusable = upstream_keep_alive

    def _emit_rewritten(self) -> None:
        """A held error answer on /v1/messages: the worker's headers, the status, and the
        body in Anthropic's error shape with a new length."""
        body = anthropic_rewrite(self.status, b"".join(self.held or ()), self.request_id)
        parts = [status_line(self.status)]
        for name, value in self.held_headers or ():
            if name in _SKIP_RESPONSE_HEADERS or name == b"content-type":
                continue
            parts.append(b"%b: %b\r\n" % (name, value))
        parts.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        parts.append(b"x-request-id: %b\r\n%b" % (self.request_id, self.app.process_header))
        if not self.keep_alive or self.app.draining:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)  # /v1/messages takes POST only: never an answer to HEAD
        self.held = self.held_headers = None
        self.out.append(b"".join(parts))

    def flush(self) -> None:
        """End of one upstream read: hand the client what it produced, end if complete."""
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.state == _COMPLETE:
            self.state, action = FLAT[_COMPLETE * _N + _FLUSHED]
            if action != _FINISH:
                return
            conn = self.upstream
            self.upstream = None
            if conn is not None:
                if self.client.write_paused:
                    # Paused for this client's back-pressure: the next exchange must read.
                    conn.transport.resume_reading()  # type: ignore[union-attr]
                conn.release(self.upstream_reusable)
            self._finish(self.status, "")
            self.client.response_done(self.keep_alive)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        if self.state == _RELAYING and (self.close_delimited or self.body_mode == _HOLD):
            self.response_complete(False)
            self.flush()
            return
        action = self._advance(_LOST)
        if action == _FAIL_CLOSED:
            self._fail(502, "upstream_connection_closed", "worker closed the connection")
        elif action == _ABORT:
            self._abort_client("upstream_connection_closed")

    def upstream_failed(self, message: str) -> None:
        action = self._advance(_INVALID)
        if action == _FAIL_INVALID:
            self._fail(502, "upstream_invalid_response", message)
        elif action == _ABORT:
            self._abort_client("upstream_invalid_response")

    # --- endings started from our side -------------------------------------------------------

    def client_gone(self) -> None:
        if self._advance(_CLIENT_GONE) == _DROP:
            self._drop_upstream()
            self._finish(499, "client_disconnected")

    def timed_out(self) -> None:
        action = self._advance(_TIMEOUT)
        if action == _FAIL_TIMEOUT:
            self._fail(
                504,
                "upstream_timeout",
                f"worker did not answer within {self.app.request_timeout:g} s",
            )
        elif action == _ABORT_TIMEOUT:
            self._abort_client("upstream_timeout", status=504)

    def _fail(self, status: int, code: str, message: str) -> None:
        self._drop_upstream()
        keep_alive = self.keep_alive and not self.app.draining
        self.out.clear()
        self.client.write(
            error_response(
                status,
                code,
                message,
                extra_headers=self.app.process_header,
                keep_alive=keep_alive,
                request_id=self.request_id,
                anthropic=self.endpoint == ANTHROPIC_ROUTE,
                head_only=self.head_only,
            )
        )
        self._finish(status, code)
        self.client.response_done(keep_alive)

    def _abort_client(self, code: str, status: int | None = None) -> None:
        """The response head is already out: the only honest signal left is to close."""
        self._drop_upstream()
        if self.out:
            self.client.write(b"".join(self.out))
            self.out.clear()
        self._finish(status or self.status, code)
        self.client.close()

    def _drop_upstream(self) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        else:
            self.pool.cancel_wait(self)

    def _finish(self, status: int, error_code: str) -> None:
        self.head = self.body = None
        self.app.exchange_finished(self, status, error_code)
