"""Upstream HTTP/1.1 connections to workers, and the per-worker keep-alive pool.

A connection parses responses with httptools and hands events to whichever exchange it is
bound to; it does no I/O scheduling of its own. The pool is per worker, per process.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from smg.dataplane.exchange import Exchange


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers",
        "closed",
        "exchange",
        "idle_since",
        "parser",
        "pool",
        "received_any",
        "transport",
    )

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received_any = False
        self._headers: list[tuple[bytes, bytes]] = []

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the worker broke protocol; do not reuse it.
            self.close()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            exchange.upstream_failed(f"invalid response from worker: {exc}")
            self.close()
            return
        exchange.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self)

    def pause_writing(self) -> None:  # request bodies are small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_head(self.parser.get_status_code(), self._headers)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self.parser.should_keep_alive())

    # --- pool plumbing ----------------------------------------------------------------------

    def bind(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.received_any = False

    def release(self, reusable: bool) -> None:
        """The exchange is done with this connection: keep it for the next one or close it."""
        self.exchange = None
        if reusable and not self.closed:
            self.pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        self.pool.forget(self)


class WorkerPool:
    """Keep-alive connections to one worker from one process, with a cap and waiters."""

    __slots__ = (
        "connect_timeout",
        "connecting",
        "host",
        "idle",
        "idle_timeout",
        "loop",
        "max_connections",
        "open",
        "port",
        "ssl",
        "waiters",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        *,
        max_connections: int,
        idle_timeout: float,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = loop
        self.ssl = ssl_context
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.open: set[UpstreamConnection] = set()
        self.connecting = 0
        self.waiters: deque[Exchange] = deque()

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        if not idle:
            return None
        now = time.monotonic()
        limit = self.idle_timeout
        while idle:
            conn = idle.pop()  # most recently used first: the likeliest to be alive
            if conn.closed:
                continue
            if limit > 0 and now - conn.idle_since >= limit:
                conn.close()
                continue
            return conn
        return None

    def can_open(self) -> bool:
        return len(self.open) + self.connecting < self.max_connections

    async def connect(self) -> UpstreamConnection:
        self.connecting += 1
        try:
            _transport, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl
                ),
                self.connect_timeout,
            )
        finally:
            self.connecting -= 1
        self.open.add(conn)
        return conn

    def put_idle(self, conn: UpstreamConnection) -> None:
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.got_connection(conn, reused=True)
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.open.discard(conn)
        if self.waiters and self.can_open():
            # A slot freed up: let the oldest waiter open a fresh connection.
            self.waiters.popleft().open_connection()

    def wait(self, exchange: Exchange) -> None:
        self.waiters.append(exchange)

    def cancel_wait(self, exchange: Exchange) -> None:
        if exchange in self.waiters:
            self.waiters.remove(exchange)

    def sweep(self, now: float) -> None:
        """Close idle connections past the idle timeout (engines close theirs at about 5 s)."""
        if self.idle_timeout <= 0:
            return
        keep: deque[UpstreamConnection] = deque()
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()
        self.idle.clear()
