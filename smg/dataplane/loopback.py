"""A request to this gateway made from inside it, with no socket: the MCP tool loop calls the
model this way, so routing, auth, admission, gRPC workers, external providers and
translations all apply to it exactly as to a client's request.

The built HTTP/1.1 request is fed into a `ClientConnection` whose transport is a
`Collector`: what the data plane writes is parsed back (httptools.HttpResponseParser) into
the status, the headers and the body chunks. The request carries `connection: close`, so
the connection ends with its one answer. Closing the answer early (the caller's client is
gone, or its deadline passed) closes the connection as a client disconnect would, which
stops the exchange and its worker request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import httptools

from smg.dataplane.server import ClientConnection

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane

PEER = ("127.0.0.1", 0)  # what the data plane sees as the client's address
# Request headers not carried over from the caller: this request's own framing and
# connection, and compression (the loop reads the answer).
_DROPPED = frozenset(
    (
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"expect",
        b"upgrade",
        b"te",
        b"trailer",
        b"accept-encoding",
        b"proxy-connection",
    )
)


class LoopbackError(Exception):
    """The answer broke off (the connection closed mid-answer) or the deadline passed."""


def build_request(
    method: bytes, path: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """The request's bytes: the caller's headers (less framing, connection and compression),
    a content-length, `connection: close`."""
    lines = [b"%b %b HTTP/1.1\r\nhost: loopback\r\n" % (method, path)]
    for name, value in headers:
        if name.lower() not in _DROPPED:
            lines.append(b"%b: %b\r\n" % (name, value))
    lines.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


class Collector(asyncio.Transport):
    """The connection's transport: it parses what is written into `head` (resolved with
    the status and headers) and `chunks` (body bytes, then None at the end, or an exception
    when the answer broke off)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] = loop.create_future()
        self.chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.conn: ClientConnection | None = None
        self.closing = False
        self.complete = False

    # --- asyncio.Transport ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.complete:
            return
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserError as exc:
            self._broken(LoopbackError(f"malformed answer: {exc}"))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self.complete:
            self._broken(LoopbackError("the answer ended early"))
        conn = self.conn
        if conn is not None:
            self.loop.call_soon(conn.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return PEER if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass  # the request is already in; nothing is read

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    # --- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real head follows
            self.headers = []
            return
        self.status = status
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.put_nowait(bytes(body))

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.complete = True
            self.chunks.put_nowait(None)

    def _broken(self, exc: BaseException) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: nobody may be waiting yet
        self.chunks.put_nowait(exc)


class Answer:
    """One loopback answer: `status`, `headers`, then `chunks()` or `body()`; `close()`
    (always, in a finally) ends the connection if the answer is not complete."""

    def __init__(self, collector: Collector, deadline: float) -> None:
        self.collector = collector
        self.deadline = deadline
        self.status = collector.status
        self.headers = collector.headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        queue = self.collector.chunks
        while True:
            # asyncio.timeout, not wait_for: on 3.11, wait_for drops a cancellation that
            # lands as the chunk arrives (the caller's client gone would go unnoticed).
            try:
                async with asyncio.timeout_at(self._loop_deadline()):
                    item = await queue.get()
            except TimeoutError:
                raise LoopbackError("the request timed out") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _loop_deadline(self) -> float:
        return self.collector.loop.time() + (self.deadline - time.monotonic())

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        self.collector.close()


async def request(
    app: DataPlane,
    method: bytes,
    path: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    timeout: float,
) -> Answer:
    """Send the request into `app` and wait for the answer's head (within `timeout`, which
    bounds the whole answer)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    collector = Collector(loop)
    conn = ClientConnection(app)
    collector.conn = conn
    conn.connection_made(collector)
    try:
        conn.data_received(build_request(method, path, headers, body))
        async with asyncio.timeout(timeout):
            await asyncio.shield(collector.head)
    except TimeoutError:
        collector.close()
        raise LoopbackError("the request timed out") from None
    except BaseException:
        collector.close()
        raise
    return Answer(collector, deadline)
