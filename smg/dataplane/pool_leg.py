"""A request the data plane sends a worker on its own account (the PD prefill leg, the PD
health probe): the pool side of the exchange protocol (an idle connection, a slot, or a
place in the pool's queue; then the request is written). Its answer is the subclass's."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.upstream import UpstreamConnection, WorkerPool


class PoolLeg:
    __slots__ = ("app", "body", "done", "head", "pool", "upstream")

    def __init__(self, app: DataPlane, pool: WorkerPool, head: bytes, body: bytes) -> None:
        self.app = app
        self.pool = pool
        self.head: bytes | None = head
        self.body: bytes | None = body
        self.upstream: UpstreamConnection | None = None
        self.done = False

    def start(self) -> None:
        pool = self.pool
        conn = pool.take_idle()
        if conn is not None:
            self.got_connection(conn)
        elif pool.reserve():
            self.slot_granted()
        else:
            pool.wait(self)  # type: ignore[arg-type]

    def slot_granted(self) -> None:
        if self.done:
            self.pool.release_slot()
            return
        self.app.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.pool.connect()
        except (OSError, TimeoutError):
            self._failed()
            return
        self.got_connection(conn)

    def got_connection(self, conn: UpstreamConnection) -> None:
        if self.done:
            conn.release(True)
            return
        self.upstream = conn
        conn.bind(self)  # type: ignore[arg-type]
        transport = conn.transport
        assert transport is not None and self.head is not None
        transport.write(self.head + (self.body or b""))
        self.head = self.body = None
        if conn.closed:
            self.upstream_lost(conn)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def _failed(self) -> None:
        """No answer: the connection failed or was lost before the answer was whole."""
        raise NotImplementedError

    def _drop(self) -> None:
        """Give up the request: its connection aborted, or its place in the queue left."""
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        else:
            self.pool.cancel_wait(self)  # type: ignore[arg-type]
