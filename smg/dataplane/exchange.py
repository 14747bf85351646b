"""One proxied request: client request in, upstream response relayed out, chunk by chunk.

Callback-driven (no task per request on the fast path). The upstream connection and the
client connection report what happened as `lifecycle.Event`s; the transition table in
`lifecycle` answers the next state and what to do, and this module only does it.

One `Exchange` serves a client request through all its attempts: a retryable failure
before anything reached the client ends the attempt (`_retry`), waits out the backoff and
asks the data plane for another worker (`DataPlane.next_attempt`). Each attempt is
accounted apart (in-flight counts, the policy's dispatch/complete, the gate's outcome);
every way the exchange itself ends goes through `_finish`, which ends the open attempt
and calls `DataPlane.exchange_finished` exactly once.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import orjson

from smg.dataplane.lifecycle import EVENT_COUNT, FLAT, Action, Event, State
from smg.dataplane.pool_leg import acquire
from smg.dataplane.responses import STORE_FAILED
from smg.dataplane.retry import RETRYABLE_MIN, RETRYABLE_STATUSES
from smg.httpwire import (
    ANTHROPIC_ROUTE,
    HOP_BY_HOP,
    anthropic_error_body,
    anthropic_rewrite,
    error_body,
    error_response,
    status_line,
)

if TYPE_CHECKING:
    import asyncio
    from asyncio import Handle
    from typing import Any

    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request
    from smg.dataplane.upstream import UpstreamConnection, WorkerPool
    from smg.policies.base import RouteRequest
    from smg.translate import Translation

_SKIP_RESPONSE_HEADERS = HOP_BY_HOP | {b"content-length", b"x-request-id", b"x-smg-process"}
# A translated answer gets a body of the gateway's making: the worker's type, encoding and
# length describe the other one.
_SKIP_TRANSLATED = _SKIP_RESPONSE_HEADERS | {b"content-type", b"content-encoding"}
# A worker's error on /v1/messages rewritten in Anthropic's shape: a JSON body of its own.
_SKIP_REWRITTEN = _SKIP_RESPONSE_HEADERS | {b"content-type"}
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"
# The routes whose errors take Anthropic's shape (count_tokens is an Anthropic route too).
ANTHROPIC_PATHS = frozenset({ANTHROPIC_ROUTE, COUNT_TOKENS_ROUTE})
# A translated answer that is not a stream is held whole (it is rewritten as a whole);
# past this size it is dropped and the client gets a 502 (no chat answer is that large).
MAX_TRANSLATED_BYTES = 16 * 1024 * 1024
# How smg.translate's error bodies begin (orjson, keys in the order written): a 2xx answer
# it could not translate comes back as one of them, and then the status is 502.
_TRANSLATED_ERRORS = (b'{"type":"error"', b'{"error":')
_CHUNK_END = b"0\r\n\r\n"
# Request bodies up to this size go upstream in one write with the head (a bounded copy);
# larger ones are written apart, never copied.
SMALL_BODY_BYTES = 64 * 1024
# A worker's error answer on /v1/messages is held whole to be rewritten (item 28); past
# this size the rest is dropped (an error body that large is no error message).
MAX_REWRITTEN_ERROR_BYTES = 1024 * 1024
# A retryable answer is read to its end so its connection can be reused; one whose body
# runs past this is dropped with its connection instead (an error body is small).
MAX_DISCARDED_BYTES = 64 * 1024

# A whole /v1/responses answer whose record could not be written (1.13's words begin so).

# SSE frames the gateway writes itself: the Rust SMG 1.13's bytes (tried on it).
SSE_KEEPALIVE = b": ping\n\n"
SSE_KEEPALIVE_ANTHROPIC = b'event: ping\ndata: {"type":"ping"}\n\n'
_SSE_DONE = b"data: [DONE]\n\n"
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")

# What happens to response body chunks.
_RAW = 0  # relayed as they arrive, as they are (Content-Length or close-delimited)
_CHUNKED = 1  # relayed as they arrive, in chunked framing for the client
_DISCARD = 2  # an answer to HEAD: headers only (RFC 9110 9.3.2)
_HOLD = 3  # an error on /v1/messages: held until complete, then rewritten
_SSE = 4  # an event stream in chunked framing: as _CHUNKED, and the last chunk is noted
_DROP = 5  # a retryable answer that will not be relayed: counted, then dropped
_XHOLD = 6  # a translated answer (not a stream): held until complete, then translated
_XSSE = 7  # a translated event stream, in chunked framing: each chunk through feed()
_XSSE_RAW = 8  # the same for an HTTP/1.0 client: no framing, ends with the connection
_FRAMED = (_SSE, _CHUNKED)  # the modes whose message ends with the last chunk
_WATCHED = frozenset({_SSE, _XSSE})  # the modes of a stream in `DataPlane.streams`

# Plain ints on the hot path (module globals, no enum attribute lookups).
_WAITING = int(State.WAITING)
_COMPLETE = int(State.COMPLETE)
_AWAITING_HEAD = int(State.AWAITING_HEAD)
_RELAYING = int(State.RELAYING)
_STREAMING = int(State.STREAMING)
_DRAINED = int(State.DRAINED)
_SETTLING = int(State.SETTLING)
_N = EVENT_COUNT
_SLOT = int(Event.SLOT)
_CONNECTION = int(Event.CONNECTION)
_CONNECT_FAILED = int(Event.CONNECT_FAILED)
_CONNECT_FAILED_RETRY = int(Event.CONNECT_FAILED_RETRY)
_HEAD = int(Event.HEAD)
_RETRY_HEAD = int(Event.RETRY_HEAD)
_MESSAGE_COMPLETE = int(Event.COMPLETE)
_FLUSHED = int(Event.FLUSHED)
_LOST = int(Event.LOST)
_LOST_RETRY = int(Event.LOST_RETRY)
_INVALID = int(Event.INVALID)
_INVALID_RETRY = int(Event.INVALID_RETRY)
_TIMEOUT = int(Event.TIMEOUT)
_CLIENT_GONE = int(Event.CLIENT_GONE)
_SSE_EVENT = int(Event.SSE)
_BACKOFF_OVER = int(Event.BACKOFF_OVER)
_NO_WORKER = int(Event.NO_WORKER)
_SETTLE = int(Event.SETTLE)
_SETTLED = int(Event.SETTLED)
_SETTLE_FAILED = int(Event.SETTLE_FAILED)
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
_DROP_ACTION = int(Action.DROP)
_DISCARD_ACTION = int(Action.DISCARD)
_DRAINED_ACTION = int(Action.DRAINED)
_RETRY = int(Action.RETRY)
_ATTEMPT = int(Action.ATTEMPT)
_FAIL_NO_WORKER = int(Action.FAIL_NO_WORKER)
_END_STREAM_ERROR = int(Action.END_STREAM_ERROR)


class Exchange:
    connection_mode = "http"  # smg_router_requests_total's label (a GrpcExchange: "grpc")
    __slots__ = (
        "app",
        "attempting",
        "attempts",
        "body",
        "body_mode",
        "client",
        "close_delimited",
        "cors",
        "deadline",
        "discarded",
        "endpoint",
        "failed_rows",
        "generation",
        "head",
        "head_at",
        "head_only",
        "held",
        "held_headers",
        "http10",
        "keep_alive",
        "keep_body",
        "max_attempts",
        "method",
        "model",
        "out",
        "outcome",
        "pool",
        "quiet_since",
        "request",
        "request_id",
        "route",
        "row",
        "seen_tail",
        "sent_at",
        "settling",
        "started",
        "state",
        "status",
        "stream",
        "tail",
        "timer",
        "trace",
        "translation",
        "upstream",
        "upstream_reusable",
        "worker_api",
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
        started: float | None = None,
    ) -> None:
        self.app = app
        self.client = client
        self.row = row
        self.generation = generation
        self.pool = pool
        # The request as it goes upstream: head and body apart (never concatenated). The
        # head is dropped once written; the body too, unless it is kept for a retry
        # (`allow_retries`), so a large body is held once, by the request, and released
        # with it.
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
        # The request goes to a worker of the other API (smg.translate): the answer is
        # translated back. None: the plain relay (the only cost is one check per head).
        self.translation: Translation | None = None
        self.held: list[bytes] | None = None
        self.held_headers: list[tuple[bytes, bytes]] | None = None
        self.method = "POST"
        self.state = _WAITING
        self.upstream: UpstreamConnection | None = None
        self.out: list[bytes] = []
        self.close_delimited = False  # the upstream response ends when its connection does
        self.upstream_reusable = False
        self.status = 0
        # When the data plane took the request (`started`), its first byte went upstream
        # (`sent_at`), the relayed head arrived (`head_at`, 0 once its flush is counted):
        # smg_gateway_overhead_seconds. `trace` is set only with --enable-trace.
        self.started = time.monotonic() if started is None else started
        self.sent_at = 0.0
        self.head_at = 0.0
        self.deadline = self.started + app.request_timeout
        # Attempts. The first one is open from the start: the data plane accounted it
        # (in-flight count, policy dispatch) when it chose the worker.
        self.attempting = True
        self.attempts = 1
        self.max_attempts = 1  # `allow_retries` raises it
        self.keep_body = False  # keep the body after a write, to send it again
        # Set where they start to matter, never read before (fewer stores per request):
        # request / route / failed_rows (allow_retries: what a retry rebuilds the head and
        # chooses from, the rows an attempt of this request failed on; read only once a
        # retry began, which allow_retries alone makes possible), timer (_retry: the
        # backoff before the next attempt), outcome
        # (_finish: what the gate records for the attempt it ends), discarded (bytes of a
        # retryable answer read and dropped), tail / seen_tail / quiet_since (an SSE
        # stream: the last chunk relayed, one store per chunk, and what the sweeper saw
        # last, to find upstream silence in `keepalive`).

    def allow_retries(
        self, request: Request, route: RouteRequest, max_attempts: int, keep_body: bool
    ) -> None:
        """Let this exchange try up to `max_attempts` workers. `keep_body`: the body is
        small enough to hold for a resend (--max-buffered-request-bytes); when it is not,
        only failures before the write are retried (nothing reached a worker)."""
        self.request: Request | None = request
        self.route: RouteRequest | None = route
        self.max_attempts = max_attempts
        self.keep_body = keep_body
        self.failed_rows: list[int] | None = None

    def _advance(self, event: int) -> int:
        self.state, action = FLAT[self.state * _N + event]
        return action

    def _can_retry(self) -> bool:
        """Another attempt is allowed: attempts left, and the body still held."""
        return self.attempts < self.max_attempts and self.body is not None

    # --- getting a connection -------------------------------------------------------------

    def start(self) -> None:
        acquire(self.pool, self)

    def slot_granted(self) -> None:
        """A connection slot is reserved for this exchange: open it."""
        if self._advance(_SLOT) != _OPEN:
            self.pool.release_slot()
            return
        self.app.spawn(self._connect())

    async def _connect(self) -> None:
        pool = self.pool
        # The guard (the outer try): this task owns the request from here on, so an
        # unexpected raise in it (or in got_connection) would leave the client to the
        # request timeout (1800 s by default). Free when nothing raises, and no extra
        # coroutine: the body stays in this one.
        try:
            try:
                conn = await pool.connect()
            except (OSError, TimeoutError) as exc:
                if pool is not self.pool:
                    return  # a late failure of an attempt that ended meanwhile
                can_retry = self._can_retry()
                action = self._advance(_CONNECT_FAILED_RETRY if can_retry else _CONNECT_FAILED)
                if action == _RETRY:
                    # Nothing was sent: the next worker may be tried at once.
                    self._retry(0, immediate=True)
                elif action == _FAIL_CONNECT:
                    self._count_exhausted()
                    reason = (
                        "timed out"
                        if isinstance(exc, TimeoutError)
                        else str(exc) or type(exc).__name__
                    )
                    self._fail(
                        502, "upstream_connect_failed", f"could not connect to worker: {reason}"
                    )
                return
            if pool is not self.pool:
                conn.release(True)  # opened for an attempt that ended meanwhile
                return
            self.got_connection(conn)
        except Exception as exc:
            self.app.log_error("proxied request failed", exc)
            self.internal_failure()

    def internal_failure(self) -> None:
        """An unexpected raise (logged by the caller) in code that owns this request: the
        deadline's terminal transition with 1.13's 500 `internal_error` (routers/error.rs):
        the error answer when no head went out, else the client connection closed. The
        exchange's finish path gives back the slot, the admission permit and the gate's
        attempt, as any failure does."""
        action = self._advance(_TIMEOUT)
        if action == _FAIL_TIMEOUT:
            self._cancel_backoff()
            self._fail(500, "internal_error", "internal gateway error")
        elif action == _ABORT_TIMEOUT:
            self._abort_client("internal_error", status=500, outcome=self.status)

    def got_connection(self, conn: UpstreamConnection) -> None:
        self.state, action = FLAT[self.state * _N + _CONNECTION]  # _advance, inlined
        if action != _WRITE:
            conn.release(True)  # the exchange ended meanwhile: the next one may use it
            return
        self.upstream = conn
        if conn.closed:
            # Closed between the connect and now (the worker closed it, or sent bytes before
            # any request, as an HTTP/2 server's SETTINGS): nothing was sent, so the body is
            # still held for a retry. Not written to: uvloop raises on a closed handle, and
            # that raise left the exchange unanswered until the request timeout.
            self.upstream_lost(conn)
            return
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
        self.head = None
        if not self.sent_at:
            self.sent_at = time.monotonic()
        if not self.keep_body:
            self.body = None  # written: from here on this request cannot be sent again
        if self.client.write_paused:
            transport.pause_reading()

    # --- upstream response events -----------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status >= RETRYABLE_MIN and status in RETRYABLE_STATUSES:
            if self._can_retry():
                self.state, action = FLAT[self.state * _N + _RETRY_HEAD]
                if action == _DISCARD_ACTION:
                    # Not relayed: the client sees only the final attempt's answer.
                    self.status = status
                    self.body_mode = _DROP
                    self.discarded = 0
                return
            if self.state == _AWAITING_HEAD:
                self._count_exhausted()
        self.state, action = FLAT[self.state * _N + _HEAD]
        if action != _RELAY_HEAD:
            return
        self.head_at = time.monotonic()
        self.status = status
        if self.translation is not None:
            self._translated_head(status, headers)
            return
        if status >= 400 and self.endpoint in ANTHROPIC_PATHS:
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
                # Only a body without a length can be an open-ended stream: look for
                # an event stream here, never on the Content-Length path.
                for name, value in headers:
                    if name == b"content-type":
                        if value[:17].lower() == b"text/event-stream":
                            self._watch()
                        break
        append(b"x-request-id: ")
        append(self.request_id)
        append(b"\r\n")
        append(self.app.process_header)
        if self.app.cors is not None:
            append(self.cors)  # --cors-allowed-origins: set by DataPlane.proxy
        if not self.keep_alive or self.app.draining:
            self.keep_alive = False
            append(b"connection: close\r\n")
        append(b"\r\n")
        self.out.append(b"".join(parts))
        if self.head_only:
            self.body_mode = _DISCARD

    def _translated_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The head of an answer to a translated request. A 2xx event stream goes out at
        once, re-framed, each chunk through `Translation.feed`; anything else (a whole
        answer, an error) is held and written by `_emit_translated`."""
        content_length = False
        chunked = False
        sse = False
        for name, value in headers:
            if name == b"content-length":
                content_length = True
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-type":
                sse = value[:17].lower() == b"text/event-stream"
        self.close_delimited = not chunked and not content_length
        if not (sse and 200 <= status < 300):
            self.body_mode = _XHOLD
            self.held = []
            self.held_headers = headers
            return
        parts = [status_line(status)]
        for name, value in headers:
            if name not in _SKIP_TRANSLATED:
                parts.append(b"%b: %b\r\n" % (name, value))
        parts.append(b"content-type: text/event-stream\r\n")
        if self.http10:
            self.keep_alive = False  # no chunked coding: the stream ends with the connection
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"x-request-id: %b\r\n%b" % (self.request_id, self.app.process_header))
        if self.app.cors is not None:
            parts.append(self.cors)
        if not self.keep_alive or self.app.draining:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))
        if self.http10:
            self.body_mode = _XSSE_RAW
            self.tail = None
        else:
            self._watch()
            self.body_mode = _XSSE

    def _watch(self) -> None:
        """The relayed head is an event stream in chunked framing: the gateway can end it
        with an error event, and the sweeper sends keep-alive frames when it goes quiet."""
        self.state, _action = FLAT[self.state * _N + _SSE_EVENT]  # RELAYING -> STREAMING
        self.body_mode = _SSE
        self.tail = None
        app = self.app
        if app.sse_keepalive > 0:
            self.seen_tail = None
            self.quiet_since = app.now
            app.streams.add(self)

    def response_body(self, chunk: bytes) -> None:
        mode = self.body_mode
        if mode == _SSE:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if self.tail is None:  # the stream's first chunk (_watch cleared it): its TTFT
                self.app.metrics.ttft(
                    self.model, self.endpoint, "http", time.monotonic() - self.started
                )
            self.tail = chunk
        elif mode == _RAW:
            self.out.append(chunk)
        elif mode == _CHUNKED:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        elif mode == _HOLD:
            held = self.held
            if held is not None and sum(map(len, held)) < MAX_REWRITTEN_ERROR_BYTES:
                held.append(chunk)
        elif mode == _DROP:
            self.discarded += len(chunk)
            if self.discarded > MAX_DISCARDED_BYTES and self._advance(_LOST_RETRY) == _RETRY:
                # Not worth reading to its end: drop it with its connection, retry now.
                self._retry(self.status)
        elif mode in (_XSSE, _XSSE_RAW):
            out = self.translation.feed(chunk)  # type: ignore[union-attr]
            if out:
                self.out.append(out if mode == _XSSE_RAW else b"%x\r\n%b\r\n" % (len(out), out))
                if self.tail is None:
                    self.app.metrics.ttft(
                        self.model, self.endpoint, "http", time.monotonic() - self.started
                    )
                self.tail = out
        elif mode == _XHOLD:
            held = self.held
            if held is not None:
                if sum(map(len, held)) + len(chunk) > MAX_TRANSLATED_BYTES:
                    self.held = None  # too large to translate: read on, answer 502 at the end
                else:
                    held.append(chunk)

    def response_complete(self, upstream_keep_alive: bool) -> None:
        self.state, action = FLAT[self.state * _N + _MESSAGE_COMPLETE]
        if action == _END_MESSAGE:
            mode = self.body_mode
            if mode in _FRAMED:
                self.out.append(_CHUNK_END)
            elif mode == _HOLD:
                self._emit_rewritten()
            elif mode in (_XSSE, _XSSE_RAW):
                mark = len(self.out)
                out = self.translation.finish()  # type: ignore[union-attr]
                if mode == _XSSE_RAW:
                    self.out.append(out)
                else:
                    if out:
                        self.out.append(b"%x\r\n%b\r\n" % (len(out), out))
                    self.out.append(_CHUNK_END)
                self._settle(mark)
            elif mode == _XHOLD:
                mark = len(self.out)
                self._emit_translated()
                self._settle(mark)
            self.upstream_reusable = upstream_keep_alive
        elif action == _DRAINED_ACTION:
            self.upstream_reusable = upstream_keep_alive

    def _settle(self, mark: int) -> None:
        """A translated answer is complete and its last bytes are `out[mark:]`: when the
        translation has a store write still running (`settle()`: /v1/responses with
        history), they wait for it (SETTLING), so the record exists before the client has
        the whole answer, as 1.13 writes it before answering. Translated answers only: the
        plain relay never gets here."""
        settle = getattr(self.translation, "settle", None)
        if settle is None:
            return
        write = settle()
        if write is None or write.done():
            return
        self.state, _action = FLAT[self.state * _N + _SETTLE]
        self.settling: list[bytes] | None = self.out[mark:]
        del self.out[mark:]
        write.add_done_callback(self._settled)

    def _settled(self, write: asyncio.Future[Any]) -> None:
        """The store write ended. A stream's held bytes go out either way (1.13 streams the
        answer whole and logs a failed write); a whole answer whose write failed (its future
        ends False, or raised) is answered 503 storage_unavailable instead, as 1.13 does."""
        failed = write.cancelled() or write.exception() is not None or write.result() is False
        if self.state != _SETTLING:
            return  # the client left meanwhile
        try:
            if failed and self.body_mode == _XHOLD:
                self.state, _action = FLAT[self.state * _N + _SETTLE_FAILED]
                self.settling = None
                self._store_failed()
                return
            self.state, _action = FLAT[self.state * _N + _SETTLED]
            held, self.settling = self.settling, None
            self.out.extend(held or ())
            self.flush()
        except Exception as exc:  # a request must never take the process down
            self.app.log_error("writing a settled answer failed", exc)
            self.client.close()

    def _store_failed(self) -> None:
        """503 storage_unavailable for a whole answer whose record was not written. The
        worker answered: its connection is released as after any answer, and its outcome is
        its own status (the circuit breaker holds nothing against it)."""
        self._release_upstream()
        app = self.app
        keep_alive = self.keep_alive and not app.draining
        self.client.write(
            error_response(
                503,
                "storage_unavailable",
                STORE_FAILED,
                extra_headers=app.process_header + (b"" if app.cors is None else self.cors),
                keep_alive=keep_alive,
                request_id=self.request_id,
            )
        )
        self._finish(503, "storage_unavailable", self.status)
        self.client.response_done(keep_alive)

    def _emit_rewritten(self) -> None:
        """A held error answer on /v1/messages: the worker's headers, the status, and the
        body in Anthropic's error shape with a new length."""
        body = anthropic_rewrite(self.status, b"".join(self.held or ()), self.request_id)
        self._emit_held(self.status, body, _SKIP_REWRITTEN)

    def _emit_held(self, status: int, body: bytes, skip: frozenset[bytes]) -> None:
        """A held answer written whole with its new JSON body: the worker's headers but
        those in `skip`, then the gateway's own. Held answers are to POSTs only (the
        Messages and translated routes), never to HEAD, so the body always goes."""
        parts = [status_line(status)]
        for name, value in self.held_headers or ():
            if name not in skip:
                parts.append(b"%b: %b\r\n" % (name, value))
        parts.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        parts.append(b"x-request-id: %b\r\n%b" % (self.request_id, self.app.process_header))
        if self.app.cors is not None:
            parts.append(self.cors)
        if not self.keep_alive or self.app.draining:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self.held = self.held_headers = None
        self.out.append(b"".join(parts))

    def _client_error(self, status: int, code: str, message: str) -> bytes:
        """An error body of the gateway's own in the client's shape (Anthropic's on the
        Messages routes, OpenAI's elsewhere)."""
        if self.endpoint in ANTHROPIC_PATHS:
            return anthropic_error_body(status, message, self.request_id)
        return error_body(status, code, message)

    def _emit_translated(self, cut: bool = False) -> None:
        """A held answer to a translated request (a whole answer or an error): translated
        into the client's API, written with a new length. An answer that cannot be
        translated (too large, cut short (`cut`), not what its API promises) becomes a 502."""
        translation = self.translation
        held = self.held
        status = self.status
        if cut:
            status = 502
            body = self._client_error(
                502,
                "upstream_connection_closed",
                "worker closed the connection before its answer was complete",
            )
        elif held is None:
            status = 502
            body = self._client_error(
                502,
                "upstream_response_too_large",
                f"the worker's answer is over {MAX_TRANSLATED_BYTES} bytes and was not translated",
            )
        else:
            try:
                body = translation.response(status, b"".join(held))  # type: ignore[union-attr]
                if status < 300 and body.startswith(_TRANSLATED_ERRORS):
                    status = 502  # a 2xx answer its API does not allow (no choices, ...)
            except Exception as exc:  # a worker's bad answer must not end the process
                self.app.log_error("translating a worker's answer failed", exc)
                status = 502
                body = self._client_error(
                    502,
                    "upstream_invalid_response",
                    f"the worker's answer could not be translated: {exc}",
                )
        answer = getattr(translation, "wasm_answer", None)  # OnResponse (smg.wasm.chain)
        if answer is not None:
            status, body = answer(self, status, body)
        self.status = status
        self._emit_held(status, body, _SKIP_TRANSLATED)

    def _release_upstream(self) -> None:
        """The worker connection back to its pool after a whole answer."""
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if self.client.write_paused:
                # Paused for this client's back-pressure: the next exchange must read.
                conn.transport.resume_reading()  # type: ignore[union-attr]
            conn.release(self.upstream_reusable)

    def flush(self) -> None:
        """End of one upstream read: hand the client what it produced, end if complete."""
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            if self.head_at:
                self._count_overhead()
        state = self.state
        if state == _COMPLETE:
            self.state, action = FLAT[_COMPLETE * _N + _FLUSHED]
            if action != _FINISH:
                return
            self._release_upstream()
            self._finish(self.status, "", self.status)
            self.client.response_done(self.keep_alive)
        elif state == _DRAINED and self._advance(_FLUSHED) == _RETRY:
            self._retry(self.status)

    def _count_overhead(self) -> None:
        """The relayed head (and whatever came with it) is written: count the gateway's
        own time, upstream excluded (smg_gateway_overhead_seconds)."""
        now = time.monotonic()
        self.app.metrics.overhead.observe(now - self.head_at + self.sent_at - self.started)
        self.head_at = 0.0

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        state = self.state
        if state == _RELAYING and self.body_mode == _XHOLD and not self.close_delimited:
            # A translated answer cut short: nothing reached the client yet, so it gets
            # a 502 rather than half an answer translated (or a bare close).
            self.state, _action = FLAT[self.state * _N + _MESSAGE_COMPLETE]
            self._emit_translated(cut=True)
            self.upstream_reusable = False
            self.flush()
            return
        if state in (_RELAYING, _STREAMING) and (
            self.close_delimited or self.body_mode in (_HOLD, _XHOLD)
        ):
            self.response_complete(False)
            self.flush()
            return
        action = self._advance(_LOST_RETRY if self._can_retry() else _LOST)
        if action == _RETRY:
            self._retry(self.status if self.body_mode == _DROP else 0)
        elif action == _FAIL_CLOSED:
            self._count_exhausted()
            self._fail(502, "upstream_connection_closed", "worker closed the connection")
        elif action == _ABORT:
            self._abort_client("upstream_connection_closed")
        elif action == _END_STREAM_ERROR:
            self._end_stream("upstream_connection_closed", "worker closed the connection")

    def upstream_failed(self, message: str) -> None:
        action = self._advance(_INVALID_RETRY if self._can_retry() else _INVALID)
        if action == _RETRY:
            self._retry(0)
        elif action == _FAIL_INVALID:
            self._count_exhausted()
            self._fail(502, "upstream_invalid_response", message)
        elif action == _ABORT:
            self._abort_client("upstream_invalid_response")
        elif action == _END_STREAM_ERROR:
            self._end_stream("upstream_invalid_response", message)

    # --- attempts ---------------------------------------------------------------------------

    def _end_attempt(self, outcome: int) -> None:
        """Close the open attempt's accounting (once): in-flight, policy, gate outcome."""
        if self.attempting:
            self.attempting = False
            self.app.attempt_done(self, outcome)

    def _retry(self, outcome: int, *, immediate: bool = False) -> None:
        """The attempt failed before anything reached the client and another is allowed:
        let go of its connection, account it, and start the next after the backoff."""
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if self.upstream_reusable:
                if self.client.write_paused:
                    conn.transport.resume_reading()  # type: ignore[union-attr]
                conn.release(True)  # its answer was read in full
            else:
                conn.abort()
        row = self.row
        self._end_attempt(outcome)
        failed = self.failed_rows
        if failed is None:
            self.failed_rows = [row]
        elif row not in failed:
            failed.append(row)
        # Reset what belonged to the failed attempt's answer.
        self.status = 0
        self.body_mode = _RAW
        self.upstream_reusable = False
        self.close_delimited = False
        app = self.app
        # A refused (or timed-out) connect reached no worker: go elsewhere at once, unless
        # only the workers that failed are left, which get the backoff.
        if immediate and app.has_untried_worker(self):
            delay = 0.0
        else:
            delay = app.retry_policy.delay_seconds(self.attempts - 1, random.random())
        app.metrics.retry(self.endpoint, self.attempts, delay)
        if delay > 0.0:
            self.timer: Handle | None = app.loop.call_later(delay, self._backoff_over)
        else:
            self.timer = app.loop.call_soon(self._backoff_over)

    def _backoff_over(self) -> None:
        self.timer = None
        if self._advance(_BACKOFF_OVER) != _ATTEMPT:
            return
        try:
            refusal = self.app.next_attempt(self)
        except Exception as exc:  # a request must never take the process down
            self.app.log_error("retry failed", exc)
            refusal = (502, "internal_error", "internal gateway error while retrying", b"")
        if refusal is not None:
            if self._advance(_NO_WORKER) == _FAIL_NO_WORKER:
                status, code, message, extra = refusal
                self._fail(status, code, message, extra_headers=extra)
            return
        self.attempts += 1
        self.attempting = True
        self.start()

    def _count_exhausted(self) -> None:
        """A retryable failure with no attempt left (SMG's "retries exhausted": counted
        whenever retries are on, --retry-max-retries 1 included, as SMG does)."""
        if self.attempts >= self.max_attempts and self.app.retries_on:
            self.app.metrics.retries_exhausted(self.endpoint)

    # --- SSE streams --------------------------------------------------------------------------

    def keepalive(self, now: float, quiet_for: float) -> None:
        """Called by the sweeper for a watched stream: after `quiet_for` seconds without
        an upstream chunk, write a keep-alive frame, between events only."""
        tail = self.tail
        if tail is not self.seen_tail:
            self.seen_tail = tail
            self.quiet_since = now
            return
        if now - self.quiet_since < quiet_for or self.state != _STREAMING:
            return
        if tail is not None and not tail.endswith(_EVENT_ENDS):
            return  # the worker stopped inside an event: a frame here would corrupt it
        frame = SSE_KEEPALIVE_ANTHROPIC if self.endpoint == ANTHROPIC_ROUTE else SSE_KEEPALIVE
        self.client.write(b"%x\r\n%b\r\n" % (len(frame), frame))
        self.quiet_since = now

    def _end_stream(self, code: str, message: str) -> None:
        """The worker broke a relayed event stream: end it as a stream, with an error
        event the client's SDK raises (OpenAI: `data: {"error": ...}` then `[DONE]`;
        /v1/messages: Anthropic's `event: error`), and a proper chunked end."""
        self._drop_upstream()
        tail = self.tail
        # A stream cut inside an event: end that event first (its data is lost anyway).
        frames = [b"\n\n"] if tail is not None and not tail.endswith(_EVENT_ENDS) else []
        if self.translation is not None:
            # The client's API's own error event (and, for chat, the [DONE] after it).
            frames.append(self.translation.abort(code, message))
        elif self.endpoint == ANTHROPIC_ROUTE:
            body = anthropic_error_body(502, message, self.request_id)
            frames.append(b"event: error\ndata: %b\n\n" % body)
        else:
            # SMG 1.13's event (type "stream_error"), with this gateway's error code added.
            body = orjson.dumps(
                {"error": {"message": message, "type": "stream_error", "code": code}}
            )
            frames.append(b"data: %b\n\n" % body)
            frames.append(_SSE_DONE)
        event = b"".join(frames)
        self.out.append(b"%x\r\n%b\r\n" % (len(event), event))
        self.out.append(_CHUNK_END)
        self.client.write(b"".join(self.out))
        self.out.clear()
        # SMG counts the response with its head's status and error code stream_error.
        self._finish(self.status, "stream_error", 0)
        self.client.response_done(self.keep_alive)

    # --- endings started from our side -------------------------------------------------------

    def _cancel_backoff(self) -> None:
        """The exchange ends during a backoff: its timer would only keep it alive."""
        timer = getattr(self, "timer", None)
        if timer is not None:
            self.timer = None
            timer.cancel()

    def client_gone(self) -> None:
        if self._advance(_CLIENT_GONE) == _DROP_ACTION:
            self._cancel_backoff()
            self._drop_upstream()
            self._finish(499, "client_disconnected", self.status or 499)

    def timed_out(self) -> None:
        action = self._advance(_TIMEOUT)
        if action == _FAIL_TIMEOUT:
            self._cancel_backoff()
            self._fail(
                504,
                "upstream_timeout",
                f"worker did not answer within {self.app.request_timeout:g} s",
            )
        elif action == _ABORT_TIMEOUT:
            self._abort_client("upstream_timeout", status=504, outcome=self.status)

    def _fail(self, status: int, code: str, message: str, *, extra_headers: bytes = b"") -> None:
        self._drop_upstream()
        keep_alive = self.keep_alive and not self.app.draining
        self.out.clear()
        self.client.write(
            error_response(
                status,
                code,
                message,
                extra_headers=extra_headers
                + self.app.process_header
                + (b"" if self.app.cors is None else self.cors),
                keep_alive=keep_alive,
                request_id=self.request_id,
                anthropic=self.endpoint in ANTHROPIC_PATHS,
                head_only=self.head_only,
            )
        )
        self._finish(status, code, 0)
        self.client.response_done(keep_alive)

    def _abort_client(self, code: str, status: int | None = None, outcome: int = 0) -> None:
        """The response head is already out: the only honest signal left is to close."""
        self._drop_upstream()
        if self.out:
            self.client.write(b"".join(self.out))
            self.out.clear()
        self._finish(status or self.status, code, outcome)
        self.client.close()

    def _drop_upstream(self) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        else:
            self.pool.cancel_wait(self)

    def _finish(self, status: int, error_code: str, outcome: int) -> None:
        self.head = self.body = None
        self.outcome = outcome
        if self.body_mode in _WATCHED:
            # Let go of it now, not at the next sweep: a busy process ends thousands of
            # streams between sweeps, and holding them costs the GC more than this.
            self.app.streams.discard(self)
        self.app.exchange_finished(self, status, error_code)
