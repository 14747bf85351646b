"""A request the data plane sends a worker on its own account (the PD prefill leg, the PD
health probe): the pool side of the exchange protocol (an idle connection, a slot, or a
place in the pool's queue; then the request is written) and the upstream connection's
(the status, the end of the answer, a lost connection). What the answer means, and its
body, are the subclass's (`flush`, `_failed`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.upstream import UpstreamConnection, WorkerPool


def acquire(pool: WorkerPool, taker: Any) -> None:
    """A connection for `taker` (a PoolLeg or an Exchange): an idle one now
    (`got_connection`), a free slot to open one (`slot_granted`), else a place in the
    pool's queue (`slot_granted` later)."""
    conn = pool.take_idle()
    if conn is not None:
        taker.got_connection(conn)
    elif pool.reserve():
        taker.slot_granted()
    else:
        pool.wait(taker)


class PoolLeg:
    __slots__ = (
        "app",
        "body",
        "complete",
        "done",
        "head",
        "pool",
        "reusable",
        "status",
        "upstream",
    )

    def __init__(self, app: DataPlane, pool: WorkerPool, head: bytes, body: bytes) -> None:
        self.app = app
        self.pool = pool
        self.head: bytes | None = head
        self.body: bytes | None = body
        self.upstream: UpstreamConnection | None = None
        self.done = False
        self.status = 0  # the worker's, once its answer's head came
        self.complete = False
        self.reusable = False

    def start(self) -> None:
        acquire(self.pool, self)

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
        try:
            self.got_connection(conn)
        except Exception as exc:
            # As Exchange._connect's guard: this task owns the leg, and an unexpected raise
            # would leave it (and the request waiting on it) to the request timeout. The
            # leg's failure path drops the connection and tells its owner, as a lost one.
            self.app.log_error("upstream leg failed", exc)
            self._failed()

    def got_connection(self, conn: UpstreamConnection) -> None:
        if self.done:
            conn.release(True)
            return
        self.upstream = conn
        if conn.closed:  # closed before the request went out: see Exchange.got_connection
            self.upstream_lost(conn)
            return
        conn.bind(self)  # type: ignore[arg-type]
        transport = conn.transport
        assert transport is not None and self.head is not None
        transport.write(self.head + (self.body or b""))
        self.head = self.body = None

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status

    def response_body(self, chunk: bytes) -> None:
        pass  # kept by the subclasses that read it

    def response_complete(self, keep_alive: bool) -> None:
        self.complete = True
        self.reusable = keep_alive

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        if conn is self.upstream and not self.complete:
            self.upstream = None
            self._failed()

    def upstream_failed(self, message: str) -> None:
        self._failed()

    def _release(self) -> None:
        """The answer is whole: its connection back to the pool."""
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.release(self.reusable)

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
