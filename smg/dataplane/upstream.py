"""Upstream HTTP/1.1 connections to workers, and the per-worker keep-alive pool.

A connection parses responses with httptools and turns them into the exchange's events; it
does no I/O scheduling of its own. It relays exactly one final response per request: 1xx
interim responses are dropped (see `on_headers_complete`), and bytes after the final
response are never relayed; they make the connection unusable. The pool is per worker, per
process.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from smg.dataplane.metrics import PoolStats

if TYPE_CHECKING:
    from smg.dataplane.exchange import Exchange

_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # Linux: the peer shut its side down
# A connection idle at least this long is polled for the peer's close before reuse. Under
# load connections come back within milliseconds and skip the syscall; engines close idle
# connections only after seconds (uvicorn 5 s). Skipping it never re-sends anything: a
# close it would have caught becomes a 502 after the write, not a second execution.
REUSE_CHECK_AFTER = 0.1


class _StrayResponse(Exception):
    """A second response began after the final one: stop the parser there."""


class _UnexpectedUpgrade(Exception):
    def __str__(self) -> str:
        return "worker answered 101 Switching Protocols, which was never asked for"


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers",
        "closed",
        "exchange",
        "fd",
        "final_done",
        "idle_since",
        "interim",
        "parser",
        "poller",
        "pool",
        "stray",
        "transport",
    )

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self.final_done = False  # the final response to the bound request is complete
        self.interim = False  # the message being parsed is a 1xx
        self.stray = False  # the worker sent more than one response: never reuse
        self.fd = -1
        self.poller: select.poll | None = None  # made on first reuse: most connections live long
        self._headers: list[tuple[bytes, bytes]] = []

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        # Counted open from here: the slot it was reserved under is released by `connect`.
        self.pool.open.add(self)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the worker broke protocol; do not reuse it.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.final_done:
                # The answer is complete; whatever followed it is not relayed.
                self.stray = True
            else:
                cause = exc.__context__
                if cause is not None and not isinstance(cause, _UnexpectedUpgrade):
                    exchange.app.log_error("upstream response handling failed", cause)
                exchange.upstream_failed(f"invalid response from worker: {cause or exc}")
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

    def pause_writing(self) -> None:  # the transport buffers the request; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.final_done:
            self.stray = True
            raise _StrayResponse
        self._headers = []

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # Interim responses are not relayed. 100 Continue: we never forward Expect, so it
            # answers nothing the client asked. 103 Early Hints (and 102, 104): only hints,
            # which the Rust SMG (hyper) drops too, and which http.client-based clients
            # (requests, urllib3) would take for the final answer. 101: never asked for.
            if status == 101:
                raise _UnexpectedUpgrade
            self.interim = True
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.response_head(status, self._headers)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.final_done = True
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self.parser.should_keep_alive())

    # --- pool plumbing ----------------------------------------------------------------------

    def bind(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.final_done = False

    def peer_gone(self) -> bool:
        """Whether the worker has already closed (or reset) this idle connection.

        One non-blocking poll: it sees the close that reached the kernel after the loop last
        looked (a close the loop saw already shows as `transport.is_closing()`), the race in
        which a reused connection would otherwise take a request the worker never reads.
        """
        poller = self.poller
        if poller is None:
            if self.fd < 0:
                return False
            poller = self.poller = select.poll()
            poller.register(self.fd, _POLLRDHUP)  # POLLHUP and POLLERR are always reported
        return bool(poller.poll(0))

    def release(self, reusable: bool) -> None:
        """The exchange is done with this connection: keep it for the next one or close it."""
        self.exchange = None
        if reusable and not self.closed and not self.stray:
            self.pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()
        if not self.closed:
            self.closed = True
            self.pool.forget(self)


class WorkerPool:
    """Keep-alive connections to one worker from one process, with a cap and waiters.

    The cap counts open connections plus reserved slots: a slot is reserved (`reserve`)
    in the same call that decides to open a connection, before the connect task runs, so
    a burst in one loop turn cannot overshoot it.
    """

    __slots__ = (
        "connect_timeout",
        "connecting",
        "host",
        "host_header",
        "idle",
        "idle_timeout",
        "loop",
        "max_connections",
        "open",
        "path_prefix",
        "port",
        "ssl",
        "stats",
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
        host_header: bytes = b"",
        path_prefix: bytes = b"",
        stats: PoolStats | None = None,
    ) -> None:
        self.loop = loop
        # Reuse and connect time, counted into the process's metrics (plain adds).
        self.stats = PoolStats() if stats is None else stats
        self.ssl = ssl_context
        self.host = host
        self.port = port
        # What requests to this worker carry: its Host value and the path of its URL,
        # which prefixes every target (as the Rust SMG joins URL and route).
        self.host_header = host_header
        self.path_prefix = path_prefix
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.open: set[UpstreamConnection] = set()
        self.connecting = 0  # reserved slots whose connect has not finished
        self.waiters: deque[Exchange] = deque()

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection that is provably still open, or None."""
        idle = self.idle
        if not idle:
            return None
        now = time.monotonic()
        limit = self.idle_timeout
        while idle:
            conn = idle.pop()  # most recently used first: the likeliest to be alive
            if conn.closed:
                continue
            idle_for = now - conn.idle_since
            if (
                (limit > 0 and idle_for >= limit)
                or conn.transport.is_closing()  # type: ignore[union-attr]
                or (idle_for >= REUSE_CHECK_AFTER and conn.peer_gone())
            ):
                # Nothing was written on it: trying the next one is the safe, transparent
                # retry (the worker cannot have read a request that was never sent).
                conn.close()
                continue
            self.stats.hits += 1
            return conn
        return None

    def reserve(self) -> bool:
        """Count one more connection as opening if the cap allows it."""
        if len(self.open) + self.connecting < self.max_connections:
            self.connecting += 1
            return True
        return False

    async def connect(self) -> UpstreamConnection:
        """Open a connection under a slot the caller reserved; the slot is given back here."""
        stats = self.stats
        stats.misses += 1
        started = time.perf_counter()
        try:
            _transport, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl
                ),
                self.connect_timeout,
            )
        except BaseException:
            self.release_slot()
            raise
        stats.connect.observe(time.perf_counter() - started)
        # Counted in `open` since connection_made: the reserved slot is no longer needed, and
        # a slot that `forget` could not grant while both counted may be free now.
        self.connecting -= 1
        self._grant_slot()
        return conn

    def put_idle(self, conn: UpstreamConnection) -> None:
        if self.waiters:
            self.stats.hits += 1  # handed on at once: reused all the same
            self.waiters.popleft().got_connection(conn)
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def release_slot(self) -> None:
        """Give back a reserved slot that no connection took."""
        self.connecting -= 1
        self._grant_slot()

    def forget(self, conn: UpstreamConnection) -> None:
        self.open.discard(conn)
        self._grant_slot()

    def _grant_slot(self) -> None:
        # A slot freed up: let the oldest waiter open a fresh connection under it.
        if self.waiters and self.reserve():
            self.waiters.popleft().slot_granted()

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
