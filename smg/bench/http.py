"""A lean HTTP/1.1 client for load generation: asyncio protocols + httptools.

Why not aiohttp: its per-request object churn and 64 KiB stream-reader high-water mark
cost throughput and add latency to long streamed responses. Here a response is
parsed inside `data_received`, which timestamps each read once and hands body pieces
to a synchronous sink, so no task or future is created per chunk. Connections are
keep-alive and pooled per target; the transport reads up to 256 KiB per call.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httptools

perf = time.perf_counter


class Sink(Protocol):
    def on_status(self, status: int) -> None: ...

    def feed(self, ts: float, data: bytes) -> None: ...

    def on_done(self, ts: float, error: str | None) -> None: ...


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}"


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def build_request(
    method: str, target: Target, path: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    """Serialized request; built before the run so sending is a single write."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host_header}"]
    for k, v in headers.items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + body


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.ts = 0.0
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.ts = perf()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("bad_http_response")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        self._fail("connection_reset" if exc else "connection_closed")

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.sink is not None:
            self.sink.on_status(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.feed(self.ts, body)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
        self.pool.release(self, self.parser.should_keep_alive())
        if sink is not None:
            sink.on_done(self.ts, None)

    # client side
    def send(self, data: bytes, sink: Sink) -> None:
        self.sink = sink
        self.transport.write(data)  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: str) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_done(perf(), error)
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()


class Pool:
    """Keep-alive connections to one target; `open` is the count of live connections."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, target: Target, insecure: bool = False
    ) -> None:
        self.loop = loop
        self.target = target
        self.idle: list[Connection] = []
        self.open = 0
        self.opened_total = 0
        self.ssl: ssl.SSLContext | None = None
        if target.scheme == "https":
            self.ssl = ssl.create_default_context()
            if insecure:
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE

    async def connect(self) -> Connection:
        _, proto = await self.loop.create_connection(
            lambda: Connection(self), self.target.host, self.target.port, ssl=self.ssl
        )
        self.open += 1
        self.opened_total += 1
        return proto

    async def prewarm(self, n: int, parallel: int = 64) -> None:
        """Open connections until `n` are idle; raises the connect error if any."""
        sem = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with sem:
                self.idle.append(await self.connect())

        need = n - len(self.idle)
        if need > 0:
            await asyncio.gather(*(one() for _ in range(need)))

    def acquire(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: Connection, keep_alive: bool) -> None:
        if keep_alive and not conn.closed:
            self.idle.append(conn)
        elif not conn.closed:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()

    def lost(self, conn: Connection) -> None:
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class _Collect:
    def __init__(self, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        self.fut = fut
        self.status = 0
        self.parts: list[bytes] = []

    def on_status(self, status: int) -> None:
        self.status = status

    def feed(self, ts: float, data: bytes) -> None:
        self.parts.append(data)

    def on_done(self, ts: float, error: str | None) -> None:
        if self.fut.done():
            return
        if error:
            self.fut.set_exception(ConnectionError(error))
        else:
            self.fut.set_result((self.status, b"".join(self.parts)))


async def fetch(
    url: str,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request on a fresh connection (for model lists, worker stats, ready checks)."""
    loop = asyncio.get_running_loop()
    target = parse_url(url)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    pool = Pool(loop, target, insecure=True)
    hdrs = {"Connection": "close", "Accept": "application/json"}
    if body:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
    conn = await asyncio.wait_for(pool.connect(), timeout)
    try:
        conn.send(build_request(method, target, path, hdrs, body), _Collect(fut))
        return await asyncio.wait_for(fut, timeout)
    finally:
        conn.abort()
