"""The client-facing HTTP/1.1 connection: httptools parsing, limits, keep-alive, pipelining.

A lean asyncio protocol instead of an ASGI stack: every request on the hot path is parsed
here and handed to the data plane as a `Request`; responses are written as bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from smg.httpwire import HttpError, error_response

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.exchange import Exchange

MAX_URL_BYTES = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 200


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "url", "version")

    def __init__(
        self,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        version: str,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.version = version
        path, _, query = url.partition(b"?")
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_header_bytes",
        "_headers",
        "_url",
        "app",
        "busy",
        "closed",
        "exchange",
        "last_activity",
        "parser",
        "queued",
        "request_started",
        "transport",
        "write_paused",
    )

    def __init__(self, app: DataPlane) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.busy = False
        self.closed = False
        self.write_paused = False
        self.exchange: Exchange | None = None
        self.queued: deque[Request] = deque()
        self.last_activity = time.monotonic()
        self.request_started = 0.0  # monotonic time of the first byte of a pending head
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()

    def data_received(self, data: bytes) -> None:
        if self.request_started == 0.0:
            self.request_started = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HttpError):
                self._reject(cause.status, cause.code, cause.message)
            else:
                self.app.log_error("request handling failed", cause or exc)
                self._reject(500, "internal_error", "internal error while reading the request")
        except httptools.HttpParserUpgrade:
            self._reject(400, "upgrade_not_supported", "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._reject(400, "invalid_request", f"malformed HTTP request: {exc}")

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
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            raise HttpError(414, "uri_too_long", f"request URL longer than {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADER_COUNT:
            raise HttpError(
                431,
                "request_header_fields_too_large",
                f"request headers exceed {MAX_HEADER_BYTES} bytes or {MAX_HEADER_COUNT} fields",
            )
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        limit = self.app.max_payload_size
        expect_continue = False
        for name, value in self._headers:
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
        # Only once the request is accepted, and never into the middle of an earlier
        # pipelined response (a client that gets no 100 sends its body after a pause).
        if expect_continue and not self.busy:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.app.max_payload_size:
            raise HttpError(
                413,
                "payload_too_large",
                f"request body exceeds the {self.app.max_payload_size}-byte limit",
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        body = self._body
        request = Request(
            parser.get_method(),
            self._url,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
            parser.should_keep_alive(),
            parser.get_http_version(),
        )
        self.request_started = 0.0
        if self.busy:
            # Pipelined: answer in order, and stop reading until the queue drains.
            self.queued.append(request)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self._dispatch(request)

    # --- responses -------------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.busy = True
        self.last_activity = time.monotonic()
        self.app.handle(self, request)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def response_done(self, keep_alive: bool) -> None:
        """The current response is fully written (or handed to the transport)."""
        self.exchange = None
        self.busy = False
        self.last_activity = time.monotonic()
        if not keep_alive or self.app.draining:
            self.close()
            return
        if self.queued:
            request = self.queued.popleft()
            if not self.queued and self.transport is not None:
                self.transport.resume_reading()
            self._dispatch(request)

    def send(self, data: bytes, keep_alive: bool) -> None:
        self.write(data)
        self.response_done(keep_alive)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _reject(self, status: int, code: str, message: str) -> None:
        self.write(
            error_response(
                status, code, message, extra_headers=self.app.process_header, keep_alive=False
            )
        )
        self.app.metrics.response("", status, code)
        self.close()
