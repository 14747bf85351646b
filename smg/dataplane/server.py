"""The client-facing HTTP/1.1 connection: httptools parsing, limits, keep-alive, pipelining.

A lean asyncio protocol instead of an ASGI stack: every request on the hot path is parsed
here and handed to the data plane as a `Request`; responses are written as bytes.

The decisions are pure code, tested alone: which answer a parser failure gets
(`parse_failure`), what a connection's timers do (`timeout_verdict`), the order answers
leave in (`AnswerOrder`). `ClientConnection` only feeds them socket events.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from smg.httpwire import HttpError, error_response, origin_form

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.exchange import Exchange

MAX_URL_BYTES = 8 * 1024
MAX_HEAD_BYTES = 64 * 1024  # the whole request head, counted as its raw bytes arrive
MAX_HEADER_COUNT = 200

_TOO_LARGE = (
    431,
    "request_header_fields_too_large",
    f"request head exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADER_COUNT} header fields",
)


class Request:
    __slots__ = (
        "body",
        "client_id",
        "headers",
        "history",  # /v1/responses with history: its smg.dataplane.responses.Observer
        "keep_alive",
        "method",
        "path",
        "query",
        "request_id",
        "trace",  # set (and read) only with --enable-trace: smg.dataplane.tracing
        "url",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytearray | bytes,
        keep_alive: bool,
        version: str,
    ) -> None:
        self.method = method
        if url[:1] != b"/":
            url = origin_form(url)
        self.url = url
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.version = version
        path, _, query = url.partition(b"?")
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.request_id = b""  # set by the data plane when it takes the request
        self.client_id = False  # whether the client sent an x-request-id header
        self.history: Any = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


# --- pure decisions ---------------------------------------------------------------------------


# Where a connection's reader stands (plain ints: compared several times per request).
FIRST = 0  # accepted, no byte of a request yet
HEAD = 1  # a request head is arriving
BODY = 2  # a request body is arriving
BETWEEN = 3  # keep-alive: the last request was read in full
PHASES = (FIRST, HEAD, BODY, BETWEEN)


class Verdict(enum.IntEnum):
    NONE = 0
    CLOSE = 1  # close without an answer (no request to answer yet)
    ANSWER_408 = 2  # answer 408 and close (a request is half read)


def timeout_verdict(
    phase: int,
    since: float,
    now: float,
    busy: bool,
    head_limit: float,
    body_limit: float,
    idle_limit: float,
) -> Verdict:
    """What a connection's timers decide, as the Rust SMG's flags define them.

    `since` is when the phase's clock started: the accept for the first head (a connection
    that never sends a request is bounded by the head timeout alone), the first byte of a
    later head, the last body bytes, the end of the last answer. A limit of 0 disables. No
    timer runs while an answer is owed: the request timeout bounds that.
    """
    if busy:
        return Verdict.NONE
    elapsed = now - since
    if phase in (FIRST, HEAD):
        return Verdict.CLOSE if head_limit and elapsed > head_limit else Verdict.NONE
    if phase == BODY:
        return Verdict.ANSWER_408 if body_limit and elapsed > body_limit else Verdict.NONE
    return Verdict.CLOSE if idle_limit and elapsed > idle_limit else Verdict.NONE


def parse_failure(exc: Exception) -> HttpError:
    """The answer to a request httptools refused, or to a refusal raised in a callback."""
    cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
    if isinstance(cause, HttpError):
        return cause
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return HttpError(400, "invalid_request", "malformed HTTP request: invalid method")
    if isinstance(exc, httptools.HttpParserError):
        return HttpError(400, "invalid_request", f"malformed HTTP request: {exc}")
    return HttpError(500, "internal_error", "internal error while reading the request")


def looks_like_http09(data: bytes) -> bool:
    """A request line without an HTTP version (HTTP/0.9: `GET /`), which httptools would
    wait on forever; `data` starts where a request starts."""
    end = data.find(b"\n", 0, MAX_URL_BYTES + 64)
    return end >= 0 and data.rfind(b" HTTP/", 0, end) < 0 and data[:end].strip() != b""


class AnswerOrder:
    """The requests of one connection, answered strictly in the order they arrived.

    Items are requests to run or final refusals (a parse failure after valid pipelined
    requests waits for their answers, then is sent and the connection closes). `arrive`
    says whether an item starts now; `finished` hands over the next one, if any.
    """

    __slots__ = ("busy", "pending")

    def __init__(self) -> None:
        self.busy = False
        self.pending: deque[Request | HttpError] = deque()

    def arrive(self, item: Request | HttpError) -> bool:
        if self.busy:
            self.pending.append(item)
            return False
        self.busy = True
        return True

    def finished(self) -> Request | HttpError | None:
        if self.pending:
            return self.pending.popleft()
        self.busy = False
        return None


# --- the protocol ---------------------------------------------------------------------------


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_headers",
        "_url",
        "accepted",
        "app",
        "closed",
        "exchange",
        "head_bytes",
        "order",
        "parser",
        "phase",
        "since",
        "transport",
        "write_paused",
    )

    def __init__(self, app: DataPlane) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.write_paused = False
        self.exchange: Exchange | None = None
        self.order = AnswerOrder()
        self.phase = FIRST
        self.since = app.now
        self.head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: bytes | bytearray = b""
        self._body_size = 0
        self.accepted = 0.0  # perf_counter at accept, until the first request head

    @property
    def busy(self) -> bool:
        """An answer is owed on this connection."""
        return self.order.busy

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.connections.add(self)
        self.accepted = time.perf_counter()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        self._drop_request()
        self.order.pending.clear()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        phase = self.phase
        fresh = False
        if phase == HEAD:
            self.head_bytes += len(data)
        elif phase == BODY:
            self.since = self.app.now
        else:
            # A head starts at the start of this read (llhttp skips stray CRLFs).
            if phase == BETWEEN:
                self.since = self.app.now
            self.phase = HEAD
            self.head_bytes = len(data)
            fresh = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Never upgraded: the request was answered as plain HTTP/1.1 (as the Rust SMG
            # does); what follows it is parsed as the next request.
            self.parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0] :] if exc.args else b""
            if rest and not self.closed:
                self.data_received(rest)
            return
        except httptools.HttpParserError as exc:
            error = parse_failure(exc)
            if error.status == 500:
                self.app.log_error("request handling failed", exc.__context__ or exc)
            self._refuse(error)
            return
        if self.phase == HEAD:  # the head is still incomplete after this read
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(HttpError(*_TOO_LARGE))
            elif fresh and looks_like_http09(data):
                self._refuse(
                    HttpError(400, "invalid_request", "request line without an HTTP version")
                )

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            transport = exchange.upstream.transport
            if transport is not None:
                transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            transport = exchange.upstream.transport
            if transport is not None:
                transport.resume_reading()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.phase != HEAD:
            # A pipelined head starting inside a read: its bytes in that read are not
            # counted (bounded by the read size), later reads are.
            self.phase = HEAD
            self.head_bytes = 0
            self.since = self.app.now
        self._url = b""
        self._headers = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            raise HttpError(414, "uri_too_long", f"request URL longer than {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= MAX_HEADER_COUNT:
            raise HttpError(*_TOO_LARGE)
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.get_http_version() == "0.9":
            raise HttpError(400, "invalid_request", "HTTP/0.9 is not supported")
        limit = self.app.max_payload_size
        expect_continue = False
        has_body = False
        size = len(self._url)
        for name, value in self._headers:
            size += len(name) + len(value) + 4
            if name == b"expect":
                expect_continue = value.lower() == b"100-continue"
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HttpError(400, "invalid_request", "invalid Content-Length") from None
                if declared > limit:
                    raise HttpError(
                        413,
                        "payload_too_large",
                        f"request body of {declared} bytes exceeds the {limit}-byte limit",
                    )
                has_body = declared > 0
            elif name == b"transfer-encoding":
                has_body = True
        if size > MAX_HEAD_BYTES:
            # A head that came in one read is bounded here (the raw count starts per read).
            raise HttpError(*_TOO_LARGE)
        if has_body and parser.should_upgrade():
            # httptools stops at the head of an upgrade request and would take its body
            # for the next request: refuse it whole (one answer) instead.
            raise HttpError(
                400, "invalid_request", "a protocol upgrade request with a body is not supported"
            )
        self.phase = BODY
        self.since = self.app.now
        accepted = self.accepted
        if accepted:  # the connection's first request: accept to handler
            self.accepted = 0.0
            self.app.metrics.accept_to_head.observe(time.perf_counter() - accepted)
        # Only once the request is accepted, and never into the middle of an earlier
        # pipelined response (a client that gets no 100 sends its body after a pause).
        if expect_continue and not self.order.busy:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.app.max_payload_size:
            raise HttpError(
                413,
                "payload_too_large",
                f"request body exceeds the {self.app.max_payload_size}-byte limit",
            )
        current = self._body
        if not current:
            self._body = body  # the usual one-read body: kept as it came, no copy
        elif type(current) is bytes:
            buffer = bytearray(current)  # one growing buffer: the body is held once
            buffer += body
            self._body = buffer
        else:
            current += body

    def on_message_complete(self) -> None:
        parser = self.parser
        body = self._body
        self._body = b""  # the request owns it now; released with the request
        request = Request(
            parser.get_method(),
            self._url,
            self._headers,
            body,
            parser.should_keep_alive(),
            parser.get_http_version(),
        )
        self._headers = []
        self._url = b""
        self.phase = BETWEEN  # its clock starts when the answer is done
        if self.order.arrive(request):
            self.app.handle(self, request)
        elif self.transport is not None:
            # Pipelined: answered in order; stop reading until the queue drains.
            self.transport.pause_reading()

    # --- responses -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def response_done(self, keep_alive: bool) -> None:
        """The current answer is fully written (or handed to the transport)."""
        self.exchange = None
        self.since = self.app.now
        if not keep_alive or self.app.draining:
            self.order.pending.clear()
            self.order.busy = False
            self.close()
            return
        item = self.order.finished()
        if item is None:
            return
        if not self.order.pending and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        if isinstance(item, HttpError):
            self._send_refusal(item)
        else:
            self.app.handle(self, item)

    def send(self, data: bytes, keep_alive: bool) -> None:
        self.write(data)
        self.response_done(keep_alive)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_request()
            if self.transport is not None:
                self.transport.close()

    def timed_out_body(self) -> None:
        """The request body stalled past --stream-body-stall-timeout-secs."""
        self._refuse(
            HttpError(
                408,
                "request_body_timeout",
                "the request body stalled longer than --stream-body-stall-timeout-secs",
            )
        )

    def _drop_request(self) -> None:
        self._body = b""
        self._headers = []

    def _refuse(self, error: HttpError) -> None:
        """The request stream cannot go on: answer after every earlier answer, then close."""
        self._drop_request()
        if self.transport is not None:
            self.transport.pause_reading()
        self.phase = BETWEEN
        if self.order.arrive(error):
            self._send_refusal(error)

    def _send_refusal(self, error: HttpError) -> None:
        app = self.app
        request_id = app.new_request_id("")
        self.write(
            error_response(
                error.status,
                error.code,
                error.message,
                extra_headers=app.process_header,
                keep_alive=False,
                request_id=request_id,
            )
        )
        app.metrics.response("", error.status, error.code)
        self.order.pending.clear()
        self.order.busy = False
        self.close()
