"""PD prefill admission for the whole gateway (issue 17): --prefill-max-inflight-requests-
per-worker, --prefill-queue-size and --prefill-queue-timeout-secs, as the Rust SMG 1.13's
(429 `pd_prefill_queue_full` / `pd_prefill_queue_timeout`, `smg_pd_prefill_admission_*`).
`smg.dataplane.pd.PDRouter` asks it for free prefill rows, takes a slot, and queues the
requests that find none."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from smg.dataplane.admission import enter_shared_queue, leave_shared_queue
from smg.dataplane.metrics import DURATION_BUCKETS, Histogram, histogram_samples
from smg.promtext import Family, Sample
from smg.shm import layout

if TYPE_CHECKING:
    import asyncio

    from smg.config import GatewayConfig
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request


# How often a waiting PD request (prefill queue, held decode leg) tries again: slots freed
# by other processes are seen only by looking.
RETRY_S = 0.001


def claim_within(app: DataPlane, row: int, generation: int, limit: int) -> bool:
    """Count one request in flight on `row` if the gateway-wide count stays within `limit`:
    store this process's count, fence (a locked add of 0 on that word: x86 orders the
    loads after it), read the sum; over the limit, take the count back (False). Any two
    processes racing for the last slot see each other's store, so the limit is never
    exceeded (at worst both step back and retry)."""
    app._in_flight_add(row, generation)
    table = app.table
    table.atomic.fetch_add_u64(table.geo.inflight_offset + (row * table.slots + app.slot) * 8, 0)
    if table.in_flight(row) > limit:
        app._in_flight_done(row, generation)
        return False
    return True


class _Waiting:
    """A request waiting for a prefill slot; sits in `conn.exchange` so that a client
    leaving takes it out (`client_gone`), as admission.Waiter does."""

    __slots__ = ("body", "conn", "deadline", "done", "queue", "queued_at", "request", "started")
    upstream = None

    def __init__(
        self,
        queue: PrefillAdmission,
        conn: ClientConnection,
        request: Request,
        started: float,
        body: dict[str, Any],
    ) -> None:
        self.queue = queue
        self.conn = conn
        self.request = request
        self.body = body  # parsed once: the queue's tries reuse it
        self.started = started
        self.queued_at = time.monotonic()
        self.deadline = self.queued_at + queue.timeout
        self.done = False

    def client_gone(self) -> None:
        # Out of the queue now, not when it reaches the head: a place held behind a
        # waiting head would refuse newcomers (429 queue full) for nobody.
        if not self.done:
            self.done = True
            self.queue.leave(self)


class PrefillAdmission:
    """--prefill-max-inflight-requests-per-worker for the whole gateway: a prefill worker
    takes a request only while its in-flight count, summed over every process's word in
    the shared table, is under the cap. The check is add-then-read: a process stores its
    own count, fences (a locked add), then reads the sum, and takes its count back when
    the sum is over; any two processes racing for the last slot see each other's store,
    so the cap is never exceeded (at worst both step back and retry). Requests that find
    every prefill worker full wait here, FIFO, re-tried every millisecond, up to
    --prefill-queue-timeout-secs, and at most --prefill-queue-size waiting in the whole
    gateway (both 429, 1.13's codes). The queue bound is a try-and-undo on the global word
    G_PD_QUEUED (as admission.AdmissionWords bounds its queue), mirrored in this process's
    P_PD_QUEUED so that the supervisor gives a dead process's places back."""

    def __init__(self, app: DataPlane, limit: int, queue_size: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.queue_size = queue_size
        self.timeout = timeout
        self.waiting: deque[_Waiting] = deque()
        self.timer: asyncio.TimerHandle | None = None
        table = app.table
        self.table = table
        self.g_queued = table.global_offset(layout.G_PD_QUEUED)
        self.p_queued = table.proc_word_offset(app.slot, layout.P_PD_QUEUED)
        self.own_queued = 0  # mirrored into P_PD_QUEUED
        self.rejected_full = 0
        self.rejected_timeout = 0
        self.queued = 0
        self.waits = Histogram(DURATION_BUCKETS)

    @classmethod
    def from_config(cls, app: DataPlane, cfg: GatewayConfig) -> PrefillAdmission | None:
        limit = getattr(cfg, "prefill_max_inflight_requests_per_worker", -1) or -1
        if limit <= 0:
            return None
        queue_size = getattr(cfg, "prefill_queue_size", None)
        timeout = getattr(cfg, "prefill_queue_timeout_secs", None)
        return cls(
            app,
            int(limit),
            100 if queue_size is None else int(queue_size),
            60.0 if timeout is None else float(timeout),
        )

    def free(self, rows: list[int]) -> list[int]:
        """The rows whose gateway-wide prefill count is under the cap now (a hint: the
        `take` makes it exact)."""
        in_flight = self.table.in_flight
        limit = self.limit
        return [row for row in rows if in_flight(row) < limit]

    def take(self, row: int, generation: int) -> bool:
        """Count a request on prefill `row` if the gateway-wide count stays within the cap
        (claim_within)."""
        return claim_within(self.app, row, generation, self.limit)

    def wait(
        self, conn: ClientConnection, request: Request, started: float, body: dict[str, Any]
    ) -> None:
        app = self.app
        if not self._enqueue():
            self.rejected_full += 1
            self._refuse(conn, request, "pd_prefill_queue_full", "Prefill admission queue is full")
            return
        self.queued += 1
        waiter = _Waiting(self, conn, request, started, body)
        self.waiting.append(waiter)
        conn.exchange = waiter  # type: ignore[assignment]
        if self.timer is None:
            self.timer = app.loop.call_later(RETRY_S, self._tick)

    def _enqueue(self) -> bool:
        """Take a place in the gateway-wide queue; False when it is full."""
        atomic = self.table.atomic
        if not enter_shared_queue(
            atomic, self.g_queued, self.p_queued, self.own_queued, self.queue_size
        ):
            return False
        self.own_queued += 1
        return True

    def _dequeue(self) -> None:
        """Give a waiter's place back (once per waiter, when it leaves the deque)."""
        self.own_queued -= 1
        leave_shared_queue(self.table.atomic, self.g_queued, self.p_queued, self.own_queued)

    def leave(self, waiter: _Waiting) -> None:
        """A waiter's client left: out of the deque, its place back."""
        try:
            self.waiting.remove(waiter)
        except ValueError:
            return  # already out of the deque (its place went with it)
        self._dequeue()

    def freed(self) -> None:
        if self.waiting and self.timer is None:
            self.timer = self.app.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.timer = None
        waiting = self.waiting
        now = time.monotonic()
        app = self.app
        pd = app.pd
        assert pd is not None
        try:
            while waiting:
                waiter = waiting[0]
                if waiter.conn.closed:  # (a client leaving took its waiter out already)
                    waiting.popleft()
                    self._dequeue()
                    waiter.done = True
                    continue
                if waiter.deadline <= now:
                    waiting.popleft()
                    self._dequeue()
                    self._expire(waiter)
                    continue
                # The PD path again: dispatched (or answered), or still no free slot (it
                # stays first in line: FIFO).
                conn = waiter.conn
                if conn.exchange is waiter:  # type: ignore[comparison-overlap]
                    conn.exchange = None
                if not pd.proxy(conn, waiter.request, waiter.started, True, waiter.body):
                    conn.exchange = waiter  # type: ignore[assignment]
                    break
                waiting.popleft()
                self._dequeue()
                waiter.done = True
                self.waits.observe(now - waiter.queued_at)
        except Exception as exc:  # the timer must keep running whatever happened
            app.log_error("prefill admission failed", exc)
        if waiting and self.timer is None:
            self.timer = app.loop.call_later(RETRY_S, self._tick)

    def _expire(self, waiter: _Waiting) -> None:
        waiter.done = True
        self.rejected_timeout += 1
        self.waits.observe(time.monotonic() - waiter.queued_at)
        conn = waiter.conn
        if conn.exchange is waiter:  # type: ignore[comparison-overlap]
            conn.exchange = None
        self._refuse(
            conn,
            waiter.request,
            "pd_prefill_queue_timeout",
            "Timed out waiting for Prefill admission",
        )

    def _refuse(self, conn: ClientConnection, request: Request, code: str, message: str) -> None:
        """429 as 1.13 answers it: type rate_limit_error, no Retry-After."""
        body = orjson.dumps(
            {"error": {"type": "rate_limit_error", "code": code, "message": message, "param": None}}
        )
        headers = b"x-smg-error-code: %b\r\n" % code.encode("latin-1")
        self.app._send(conn, request, 429, body, extra_headers=headers, error_code=code)

    def families(self, proc: list[tuple[str, str]]) -> list[Family]:
        app = self.app
        entries = app.state.entries
        pd = app.pd
        assert pd is not None
        inflight = [
            Sample("", [*proc, ("worker", entries[row].url)], count)
            for row, (generation, count) in app.local_in_flight.items()
            if pd.types.get(row) == "prefill"
            and row in entries
            and entries[row].generation == generation
        ]
        return [
            Family(
                "smg_pd_prefill_admission_inflight",
                "gauge",
                "Prefill requests admitted by SMG per worker (this process's; the sum over "
                "processes is the gateway's)",
                inflight,
            ),
            Family(
                "smg_pd_prefill_admission_wait_seconds",
                "histogram",
                "Time spent waiting in the SMG Prefill admission queue",
                histogram_samples(list(proc), self.waits),
            ),
            Family(
                "smg_pd_prefill_admission_rejections_total",
                "counter",
                "Prefill admission rejections by reason",
                [
                    Sample("", [*proc, ("reason", "queue_full")], self.rejected_full),
                    Sample("", [*proc, ("reason", "queue_timeout")], self.rejected_timeout),
                ],
            ),
            Family(
                "smg_pd_prefill_admission_queued",
                "gauge",
                "Requests waiting in the SMG Prefill admission queue",
                [Sample("", proc, sum(1 for w in self.waiting if not w.done))],
            ),
        ]
