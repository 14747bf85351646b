"""One proxied request: client request in, upstream response relayed out, chunk by chunk.

Callback-driven (no task per request on the fast path): the upstream connection feeds
response events in, the exchange frames them for the client and flushes once per read.
Every way an exchange ends goes through `_finish`, which releases the in-flight count
exactly once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from smg.httpwire import HOP_BY_HOP, error_response, status_line

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection
    from smg.dataplane.upstream import UpstreamConnection, WorkerPool

_SKIP_RESPONSE_HEADERS = HOP_BY_HOP | {b"content-length", b"x-request-id", b"x-smg-process"}
_CHUNK_END = b"0\r\n\r\n"


class Exchange:
    __slots__ = (
        "app",
        "client",
        "close_delimited",
        "complete",
        "deadline",
        "done",
        "endpoint",
        "generation",
        "head_sent",
        "keep_alive",
        "method",
        "model",
        "out",
        "pool",
        "request_bytes",
        "request_id",
        "retried",
        "reused",
        "row",
        "started",
        "status",
        "stream",
        "to_client_chunked",
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
        request_bytes: bytes,
        request_id: bytes,
        endpoint: str,
        model: str,
        stream: bool,
        keep_alive: bool,
    ) -> None:
        self.app = app
        self.client = client
        self.row = row
        self.generation = generation
        self.pool = pool
        self.request_bytes = request_bytes
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.stream = stream
        self.keep_alive = keep_alive
        self.method = "POST"
        self.upstream: UpstreamConnection | None = None
        self.out: list[bytes] = []
        self.head_sent = False
        self.complete = False
        self.done = False
        self.retried = False
        self.reused = False
        self.to_client_chunked = False
        self.close_delimited = False
        self.upstream_reusable = False
        self.status = 0
        self.started = time.monotonic()
        self.deadline = self.started + app.request_timeout

    # --- getting a connection -------------------------------------------------------------

    def start(self) -> None:
        pool = self.pool
        conn = pool.take_idle()
        if conn is not None:
            self.got_connection(conn, reused=True)
        elif pool.can_open():
            self.open_connection()
        else:
            pool.wait(self)

    def open_connection(self) -> None:
        self.app.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.pool.connect()
        except (OSError, TimeoutError) as exc:
            if not self.done:
                reason = (
                    "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                )
                self.fail(502, "upstream_connect_failed", f"could not connect to worker: {reason}")
            return
        if self.done:
            conn.release(reusable=True)
            return
        self.got_connection(conn, reused=False)

    def got_connection(self, conn: UpstreamConnection, *, reused: bool) -> None:
        if self.done:
            conn.release(reusable=True)
            return
        self.upstream = conn
        self.reused = reused
        conn.bind(self)
        conn.transport.write(self.request_bytes)  # type: ignore[union-attr]
        if self.client.write_paused:
            conn.transport.pause_reading()  # type: ignore[union-attr]

    # --- upstream response events -----------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
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
        elif status in (204, 304) or 100 <= status < 200:
            pass
        else:
            self.to_client_chunked = True
            append(b"transfer-encoding: chunked\r\n")
            self.close_delimited = not chunked
        append(b"x-request-id: ")
        append(self.request_id)
        append(b"\r\n")
        append(self.app.process_header)
        if not self.keep_alive or self.app.draining:
            self.keep_alive = False
            append(b"connection: close\r\n")
        append(b"\r\n")
        self.out.append(b"".join(parts))
        self.head_sent = True

    def response_body(self, chunk: bytes) -> None:
        if self.to_client_chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.out.append(chunk)

    def response_complete(self, upstream_keep_alive: bool) -> None:
        if self.to_client_chunked:
            self.out.append(_CHUNK_END)
        self.complete = True
        self.upstream_reusable = upstream_keep_alive

    def flush(self) -> None:
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.complete and not self.done:
            conn = self.upstream
            self.upstream = None
            if conn is not None:
                conn.release(self.upstream_reusable)
            self._finish(self.status, "")
            self.client.response_done(self.keep_alive)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        if self.done or conn is not self.upstream:
            return
        self.upstream = None
        if not self.head_sent and not conn.received_any and self.reused and not self.retried:
            # A pooled connection the worker had already closed: retry once, on a fresh one.
            self.retried = True
            self.open_connection()
            return
        if not self.head_sent:
            self.fail(502, "upstream_connection_closed", "worker closed the connection")
            return
        if self.close_delimited and not self.complete:
            self.response_complete(False)
            self.flush()
            return
        self._abort_client("upstream_connection_closed")

    def upstream_failed(self, message: str) -> None:
        if self.done:
            return
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        if not self.head_sent:
            self.fail(502, "upstream_invalid_response", message)
        else:
            self._abort_client("upstream_invalid_response")

    # --- endings started from our side -------------------------------------------------------

    def client_gone(self) -> None:
        if self.done:
            return
        self._drop_upstream()
        self._finish(499, "client_disconnected")

    def timed_out(self) -> None:
        if self.done:
            return
        self._drop_upstream()
        if not self.head_sent:
            self.fail(
                504,
                "upstream_timeout",
                f"worker did not answer within {self.app.request_timeout:g} s",
            )
        else:
            self._abort_client("upstream_timeout", status=504)

    def fail(self, status: int, code: str, message: str) -> None:
        if self.done:
            return
        self._drop_upstream()
        keep_alive = self.keep_alive and not self.app.draining
        self.out.clear()
        self.client.write(
            error_response(
                status,
                code,
                message,
                extra_headers=b"x-request-id: " + self.request_id + self.app.process_header,
                keep_alive=keep_alive,
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
        self.done = True
        self.app.exchange_finished(self, status, error_code)
