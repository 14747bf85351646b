"""Global admission control: one concurrency limit, one queue bound and one rate limit for
the whole gateway, shared by every data-plane process through atomic words in the table.

The mechanism (`AdmissionWords`, pure: it only needs an object with the atomic word
operations of `atomicshm.AtomicView`, so tests run it over a bytearray):

- concurrency: `fetch_add(G_ADMIT_IN_FLIGHT, 1)`; when the previous value was already at
  the limit the add is taken back (`fetch_sub`) and the request queues. The word is never
  above the limit for longer than that add-and-undo, and a request only counts as admitted
  when its own add saw room, so the bound holds exactly for any number of processes;
- queue bound: the same try-and-undo on `G_ADMIT_QUEUED` against `--queue-size`;
- rate: GCRA (virtual scheduling) on `G_RATE_TAT_NS`, the theoretical arrival time in
  monotonic ns (CLOCK_MONOTONIC is one clock for every process of the host): a request
  conforms when `max(TAT, now) - now <= (burst - 1) * T`, and moves TAT to
  `max(TAT, now) + T` by compare-and-swap (T = 1 s / rate, burst = the concurrency limit).
  A request that does not conform waits in the queue, as the Rust SMG's token bucket does.

Each process also mirrors what it holds in its own process words (`P_PERMITS`,
`P_QUEUED`): after a process dies, the supervisor takes exactly those amounts back from the
global words (`reclaim_process`). The orders of the two writes are chosen so that a kill
between them can only leave a global word one too high (one permit lost until restart),
never too low (the bound exceeded).

`Admission` is the per-process part: the FIFO of waiting requests, handing a permit
released in this process straight to its first waiter, a short retry timer while the
process has waiters (permits released by other processes are seen within ~1 ms), queue
timeouts, and SMG's answers and metrics.

Fairness across processes: each process publishes when its oldest waiter was queued
(`P_HEAD_SINCE`). A process hands a released permit to its own waiter, or tries for one
on its timer, only when no other live process has an older waiter; otherwise the permit
goes back to the gateway, where the process with the oldest waiter takes it on its next
try (within ~1 ms). A new request does not take the fast path while anyone waits
(`G_ADMIT_QUEUED` > 0). So the gateway serves waiters in about their arrival order, to
within the retry interval; without this, a process recycling its own permits starved the
others (measured: 8 s waits in two of four processes with 5 ms requests).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import atomicshm
import orjson

from smg.cpus import available_cores
from smg.dataplane.metrics import DURATION_BUCKETS, Histogram, histogram_samples
from smg.httpwire import ANTHROPIC_ROUTE, anthropic_error_type
from smg.promtext import Family, Sample
from smg.shm import layout

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from smg.config import GatewayConfig
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request
    from smg.shm.table import WorkerTable

    # What runs for a queued request once it holds a permit (a route that is not proxied).
    Admitted = Callable[[ClientConnection, Request], None]

OK = 0
BUSY = -1  # the concurrency limit is reached; a positive result is a rate-limit wait in ns

NS = 1_000_000_000
# While this process has waiters and the limit is binding, it tries again this often: a
# permit released in another process is taken within about this long.
RETRY_INTERVAL_S = 0.001
# The Rust SMG 1.13 sends `retry-after: 2` with every admission refusal (429 and 503).
RETRY_AFTER_SECS = 2
UNBOUNDED = 1 << 62  # a limit no count reaches
_CAS_ATTEMPTS = 1000  # a CAS that loses this often in a row: treat as a 1 ms rate wait
# A process's published oldest waiter counts only while the process keeps trying for it
# (its last try is this recent): a stalled or dead process holds no one up for longer.
FRESH_NS = 50_000_000
# While rate-limited, still try (and publish that this process is alive) this often.
MAX_TICK_S = 0.005

# Process words of admission's cross-process fairness (spare words of the layout; the
# names belong in smg.shm.layout once merged): the monotonic ns at which this process's
# oldest live waiter was queued (0: none), and when the process last tried for it.
P_HEAD_SINCE = layout.P_HEAD_SINCE
P_TRIED_NS = layout.P_TRIED_NS

# What the Rust SMG 1.13 answers (observed: --max-concurrent-requests 1 in front of a slow
# worker): status, error code, OpenAI error type, message.
QUEUE_DISABLED = (
    429,
    "admission_queue_full",
    "rate_limit_error",
    "concurrency limit reached and queuing is disabled",
)
QUEUE_FULL = (429, "admission_queue_full", "rate_limit_error", "admission queue is at capacity")
QUEUE_TIMEOUT = (
    503,
    "admission_queue_timeout",
    "server_error",
    "timed out waiting for an admission slot",
)


class AtomicWords(Protocol):
    """The subset of `atomicshm.AtomicView` admission uses (offsets in bytes)."""

    def load_u64(self, offset: int) -> int: ...
    def store_u64(self, offset: int, value: int) -> None: ...
    def fetch_add_u64(self, offset: int, value: int) -> int: ...
    def fetch_sub_u64(self, offset: int, value: int) -> int: ...
    def cas_u64(self, offset: int, expected: int, desired: int) -> int: ...


def enter_shared_queue(
    atomic: AtomicWords, g_queued: int, p_queued: int, own: int, size: int
) -> bool:
    """Take a place in a queue of `size` for the whole gateway: the global word first (a
    kill before the own word leaves it one too high, a place lost, never the bound
    exceeded), undone when the queue was already full; then this process's word, `own + 1`
    places (what the supervisor gives back when the process dies). False: full."""
    if atomic.fetch_add_u64(g_queued, 1) >= size:
        atomic.fetch_sub_u64(g_queued, 1)
        return False
    atomic.store_u64(p_queued, own + 1)
    return True


def leave_shared_queue(atomic: AtomicWords, g_queued: int, p_queued: int, own: int) -> None:
    """Give a place back, `own` places left to this process: own word first, global
    second, for the same reason."""
    atomic.store_u64(p_queued, own)
    atomic.fetch_sub_u64(g_queued, 1)


def effective_limit(max_concurrent_requests: int, cores: int | None = None) -> int:
    """The concurrency bound: -1 derives it from the host as SMG does (1024 per available
    core, at least 4096); 0 means no admission control at all (the Rust SMG then ignores
    the rate limit too: observed with --max-concurrent-requests 0)."""
    if max_concurrent_requests < 0:
        return max(4096, 1024 * (cores if cores is not None else available_cores()))
    return max_concurrent_requests


class AdmissionWords:
    """Acquire/release over the gateway-wide words and this process's own words."""

    __slots__ = (
        "atomic",
        "g_in_flight",
        "g_queued",
        "g_tat",
        "interval",
        "limit",
        "others",
        "p_head",
        "p_permits",
        "p_queued",
        "p_tried",
        "permits",
        "queue_size",
        "queued",
        "tolerance",
    )

    def __init__(
        self,
        atomic: AtomicWords,
        offsets: tuple[int, int, int, int, int],
        limit: int,
        queue_size: int,
        rate_per_second: int | None,
    ) -> None:
        self.atomic = atomic
        self.g_in_flight, self.g_queued, self.g_tat, self.p_permits, self.p_queued = offsets
        self.limit = self.queue_size = self.interval = self.tolerance = 0
        self.set_limits(limit, queue_size, rate_per_second)
        self.permits = 0  # what this process holds (mirrored into P_PERMITS)
        self.queued = 0  # mirrored into P_QUEUED
        # Fairness words: this process's (P_HEAD_SINCE, P_TRIED_NS), the other processes'.
        self.p_head = self.p_tried = -1
        self.others: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_table(
        cls, table: WorkerTable, slot: int, limit: int, queue_size: int, rate: int | None
    ) -> AdmissionWords:
        offsets = (
            table.global_offset(layout.G_ADMIT_IN_FLIGHT),
            table.global_offset(layout.G_ADMIT_QUEUED),
            table.global_offset(layout.G_RATE_TAT_NS),
            table.proc_word_offset(slot, layout.P_PERMITS),
            table.proc_word_offset(slot, layout.P_QUEUED),
        )
        words = cls(table.atomic, offsets, limit, queue_size, rate)
        words.p_head = table.proc_word_offset(slot, P_HEAD_SINCE)
        words.p_tried = table.proc_word_offset(slot, P_TRIED_NS)
        words.others = tuple(
            (table.proc_word_offset(other, P_HEAD_SINCE), table.proc_word_offset(other, P_TRIED_NS))
            for other in range(table.slots)
            if other != slot
        )
        return words

    def set_limits(self, limit: int, queue_size: int, rate_per_second: int | None) -> None:
        """New bounds (a configuration reload); what is held or queued stays counted."""
        self.limit = limit
        self.queue_size = queue_size
        # GCRA: one request per `interval` ns, up to `limit` back to back.
        self.interval = round(NS / rate_per_second) if rate_per_second else 0
        self.tolerance = self.interval * (limit - 1)

    def try_acquire(self, now_ns: int) -> int:
        """OK (a permit is held now), BUSY, or the ns to wait for the rate limiter;
        `now_ns` (monotonic) is only read when the rate limit is on."""
        atomic = self.atomic
        g_in_flight = self.g_in_flight
        # Global word first, own word second: a kill between them leaves the global word
        # one too high (a permit lost), never too low.
        if atomic.fetch_add_u64(g_in_flight, 1) >= self.limit:
            atomic.fetch_sub_u64(g_in_flight, 1)
            return BUSY
        interval = self.interval
        if interval:
            # The uncontended conforming case inline (one load, one CAS); `rate_take` does
            # the rest (a wait, or a lost CAS to retry).
            tat = atomic.load_u64(self.g_tat)
            base = tat if tat > now_ns else now_ns
            if (
                base - now_ns > self.tolerance
                or atomic.cas_u64(self.g_tat, tat, base + interval) != tat
            ):
                wait = self.rate_take(now_ns)
                if wait:
                    atomic.fetch_sub_u64(g_in_flight, 1)
                    return wait
        permits = self.permits + 1
        self.permits = permits
        atomic.store_u64(self.p_permits, permits)
        return OK

    def release(self) -> None:
        # Own word first, global second (the safe order, as above).
        self.permits -= 1
        atomic = self.atomic
        atomic.store_u64(self.p_permits, self.permits)
        atomic.fetch_sub_u64(self.g_in_flight, 1)

    def rate_take(self, now_ns: int) -> int:
        """Take one request's worth of the rate limit: 0, or the ns until one conforms."""
        atomic = self.atomic
        offset = self.g_tat
        interval = self.interval
        tolerance = self.tolerance
        for _ in range(_CAS_ATTEMPTS):
            tat = atomic.load_u64(offset)
            base = tat if tat > now_ns else now_ns
            if base - now_ns > tolerance:
                return base - tolerance - now_ns
            if atomic.cas_u64(offset, tat, base + interval) == tat:
                return 0
        return 1_000_000

    def anyone_waiting(self) -> bool:
        return self.atomic.load_u64(self.g_queued) != 0

    def publish_head(self, since: int, now_ns: int) -> None:
        """This process's oldest waiter was queued at `since` (0: none); it tries now."""
        if self.p_head < 0:
            return
        atomic = self.atomic
        atomic.store_u64(self.p_head, since)
        atomic.store_u64(self.p_tried, now_ns)

    def first_in_line(self, since: int, now_ns: int) -> bool:
        """Whether a waiter queued at `since` is the oldest of the gateway's live
        processes' (ties go to whoever asks: both may take a free permit)."""
        atomic = self.atomic
        load = atomic.load_u64
        fresh = now_ns - FRESH_NS
        for head, tried in self.others:
            other = load(head)
            if other and other < since and load(tried) >= fresh:
                return False
        return True

    def enter_queue(self) -> bool:
        """Take a place in the gateway-wide queue; False when it is full."""
        if not enter_shared_queue(
            self.atomic, self.g_queued, self.p_queued, self.queued, self.queue_size
        ):
            return False
        self.queued += 1
        return True

    def leave_queue(self) -> None:
        self.queued -= 1
        leave_shared_queue(self.atomic, self.g_queued, self.p_queued, self.queued)


def reclaim_process(table: WorkerTable, slot: int) -> tuple[int, int]:
    """Give a dead data-plane process's permits and queue places back to the gateway-wide
    words; only once the process no longer runs (the supervisor's reap). Returns them."""
    atomic = table.atomic
    returned = []
    for own, shared in (
        (layout.P_PERMITS, layout.G_ADMIT_IN_FLIGHT),
        (layout.P_QUEUED, layout.G_ADMIT_QUEUED),
        (layout.P_PD_QUEUED, layout.G_PD_QUEUED),
    ):
        own_offset = table.proc_word_offset(slot, own)
        count = atomic.load_u64(own_offset)
        if count:
            atomic.fetch_sub_u64(table.global_offset(shared), count)
            atomic.store_u64(own_offset, 0)
        returned.append(count)
    for word in (P_HEAD_SINCE, P_TRIED_NS):  # it waits for nothing any more
        atomic.store_u64(table.proc_word_offset(slot, word), 0)
    return returned[0], returned[1]


def gateway_families(table: WorkerTable) -> list[Family]:
    """The gateway-wide words, for the control plane's exporter (the per-process gauges
    lose a dead process's series; these do not)."""
    atomic = table.atomic
    in_flight = atomicshm.as_signed(
        atomic.load_u64(table.global_offset(layout.G_ADMIT_IN_FLIGHT)), 64
    )
    queued = atomicshm.as_signed(atomic.load_u64(table.global_offset(layout.G_ADMIT_QUEUED)), 64)
    return [
        Family(
            "smg_gateway_admission_inflight",
            "gauge",
            "Admission permits held in the whole gateway (smg only)",
            [Sample("", [], in_flight)],
        ),
        Family(
            "smg_gateway_admission_queue_depth",
            "gauge",
            "Requests waiting for an admission permit in the whole gateway (smg only)",
            [Sample("", [], queued)],
        ),
    ]


def refusal(
    kind: tuple[int, str, str, str], request_id: bytes, anthropic: bool
) -> tuple[int, str, bytes, bytes]:
    """Status, error code, body and extra headers of an admission refusal, as SMG sends it."""
    status, code, error_type, message = kind
    if anthropic:
        body = orjson.dumps(
            {
                "type": "error",
                "error": {"type": anthropic_error_type(status), "message": message},
                "request_id": request_id.decode("latin-1"),
            }
        )
    else:
        body = orjson.dumps(
            {"error": {"type": error_type, "code": code, "message": message, "param": None}}
        )
    headers = b"x-smg-error-code: %s\r\nretry-after: %d\r\n" % (
        code.encode("latin-1"),
        RETRY_AFTER_SECS,
    )
    return status, code, body, headers


class Waiter:
    """A request waiting for a permit. While queued it sits in `conn.exchange`, so that a
    client disconnect (`ClientConnection.connection_lost` calls `client_gone()`) takes it
    out of the queue at once; `upstream` is None like an exchange's that has no worker."""

    __slots__ = ("admission", "conn", "deadline", "done", "enqueued", "request", "then")
    upstream = None

    def __init__(
        self,
        admission: Admission,
        conn: ClientConnection,
        request: Request,
        now_ns: int,
        then: Admitted | None = None,
    ) -> None:
        self.admission = admission
        self.conn = conn
        self.request = request
        self.then = then  # what runs with the permit (None: app.proxy_admitted)
        self.enqueued = now_ns
        self.deadline = now_ns + admission.timeout_ns
        self.done = False

    def client_gone(self) -> None:
        self.admission.cancel(self)


class Admission:
    """This process's side of admission control (see the module docstring)."""

    def __init__(
        self,
        words: AdmissionWords,
        app: DataPlane,
        loop: asyncio.AbstractEventLoop,
        queue_timeout_secs: float,
    ) -> None:
        self.words = words
        self.app = app
        self.loop = loop
        self.timeout_ns = int(queue_timeout_secs * NS)
        self.waiters: deque[Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._clock = time.monotonic_ns
        # Metrics (SMG's names where it has them; see `families`).
        self.allowed = 0
        self.rejected = 0
        self.rejected_full = 0
        self.rejected_timeout = 0
        self.queued_total = 0
        self.cancelled = 0
        self.wait = Histogram(DURATION_BUCKETS)

    @classmethod
    def from_config(
        cls,
        cfg: GatewayConfig,
        table: WorkerTable,
        slot: int,
        app: DataPlane,
        loop: asyncio.AbstractEventLoop,
    ) -> Admission | None:
        limit = effective_limit(cfg.max_concurrent_requests)
        if limit == 0:
            return None
        words = AdmissionWords.for_table(
            table, slot, limit, cfg.queue_size, cfg.rate_limit_tokens_per_second
        )
        return cls(words, app, loop, float(cfg.queue_timeout_secs))

    def reconfigure(self, cfg: GatewayConfig) -> None:
        """Apply reloaded limits in place (permits held and places queued stay counted, so
        the words stay exact). --max-concurrent-requests 0 here lifts the bounds; the data
        plane drops this object only when it holds nothing (or is replaced)."""
        limit = effective_limit(cfg.max_concurrent_requests)
        rate = cfg.rate_limit_tokens_per_second if limit else None
        self.words.set_limits(limit or UNBOUNDED, cfg.queue_size, rate)
        self.timeout_ns = int(cfg.queue_timeout_secs * NS)

    # --- the request path ---------------------------------------------------------------

    def enter(self, conn: ClientConnection, request: Request, then: Admitted | None = None) -> bool:
        """True: a permit is held for this request now. False: it was queued or refused
        (answered here), and `app.proxy_admitted` (or `then`: a route that is not proxied,
        which releases the permit itself) runs once it holds a permit."""
        words = self.words
        # FIFO: no overtaking waiters, this process's or any other's.
        if not self.waiters and not words.anyone_waiting():
            # The clock only matters to the rate limiter.
            result = words.try_acquire(self._clock() if words.interval else 0)
            if result == OK:
                self.allowed += 1
                return True
        if self.words.queue_size == 0:
            self._refuse(conn, request, QUEUE_DISABLED)
            return False
        if not self.words.enter_queue():
            self.rejected_full += 1
            self._refuse(conn, request, QUEUE_FULL)
            return False
        self.queued_total += 1
        now = self._clock()
        waiter = Waiter(self, conn, request, now, then)
        if not self.waiters:
            words.publish_head(now, now)
        self.waiters.append(waiter)
        conn.exchange = waiter  # type: ignore[assignment]  # see Waiter
        if self._timer is None:
            self._timer = self.loop.call_soon(self._tick)
        return False

    def release(self) -> None:
        """A request holding a permit is finished: its permit goes to this process's first
        waiter when there is one (and the rate limit lets it), else back to the gateway."""
        waiters = self.waiters
        words = self.words
        while waiters:
            waiter = waiters[0]
            if waiter.done:
                waiters.popleft()
                continue
            now = self._clock()
            if not words.first_in_line(waiter.enqueued, now):
                break  # another process's waiter is older: the permit goes back for it
            if words.interval and words.rate_take(now):
                break  # rate-limited: the timer admits it when it conforms
            waiters.popleft()
            self._publish_head(now)
            # The permit stays held (no word changes); the grant runs from the loop, not
            # inside the finishing exchange's bookkeeping.
            self.loop.call_soon(self._grant, waiter)
            return
        words.release()

    def _publish_head(self, now: int) -> None:
        waiters = self.waiters
        while waiters and waiters[0].done:
            waiters.popleft()
        self.words.publish_head(waiters[0].enqueued if waiters else 0, now)

    def cancel(self, waiter: Waiter) -> None:
        """The client went away while queued: leave the queue now (it never held a permit)."""
        if waiter.done:
            return
        waiter.done = True
        self.words.leave_queue()
        self.cancelled += 1
        self.wait.observe((self._clock() - waiter.enqueued) / NS)
        if waiter.conn.exchange is waiter:  # type: ignore[comparison-overlap]
            waiter.conn.exchange = None

    # --- waiting ------------------------------------------------------------------------

    def _grant(self, waiter: Waiter) -> None:
        """`waiter` holds a permit now: run its request (or give the permit on)."""
        if not waiter.done:  # else the client left meanwhile (`cancel` did the rest)
            waiter.done = True
            self.words.leave_queue()
            self.wait.observe((self._clock() - waiter.enqueued) / NS)
        conn = waiter.conn
        if conn.exchange is waiter:  # type: ignore[comparison-overlap]
            conn.exchange = None
        if conn.closed:
            self.release()
            return
        self.allowed += 1
        try:
            (waiter.then or self.app.proxy_admitted)(conn, waiter.request)
        except Exception as exc:  # a request must never take the process down
            self.app.log_error("admitted request failed", exc)

    def _tick(self) -> None:
        self._timer = None
        try:
            delay = self._admit_waiters()
        except Exception as exc:  # the timer must keep running whatever happened
            self.app.log_error("admission timer failed", exc)
            delay = RETRY_INTERVAL_S
        # A request that queued during this tick (a pipelined one, started by an answer
        # sent here) has scheduled the next tick already: one timer chain, never two.
        if delay is not None and self._timer is None:
            self._timer = self.loop.call_later(delay, self._tick)

    def _admit_waiters(self) -> float | None:
        """Expire, then admit from the head while permits are free; the delay until the
        next try, or None when no one waits."""
        waiters = self.waiters
        words = self.words
        now = self._clock()
        try:
            while waiters:
                waiter = waiters[0]
                if waiter.done:
                    waiters.popleft()
                    continue
                if waiter.deadline <= now:
                    # One timeout for all: deadlines are in FIFO order.
                    waiters.popleft()
                    self._expire(waiter, now)
                    continue
                until_deadline = (waiter.deadline - now) / NS
                if not words.first_in_line(waiter.enqueued, now):
                    return min(RETRY_INTERVAL_S, until_deadline)
                result = words.try_acquire(now)
                if result == OK:
                    waiters.popleft()
                    self._grant(waiter)
                    now = self._clock()
                    continue
                if result == BUSY:
                    return min(RETRY_INTERVAL_S, until_deadline)
                return min(result / NS, until_deadline, MAX_TICK_S)
            return None
        finally:
            self._publish_head(now)

    def _expire(self, waiter: Waiter, now: int) -> None:
        waiter.done = True
        self.words.leave_queue()
        self.rejected_timeout += 1
        self.wait.observe((now - waiter.enqueued) / NS)
        conn = waiter.conn
        if conn.exchange is waiter:  # type: ignore[comparison-overlap]
            conn.exchange = None
        if not conn.closed:
            self._refuse(conn, waiter.request, QUEUE_TIMEOUT)

    def _refuse(
        self, conn: ClientConnection, request: Request, kind: tuple[int, str, str, str]
    ) -> None:
        self.rejected += 1
        status, code, body, headers = refusal(
            kind, request.request_id, request.path == ANTHROPIC_ROUTE
        )
        self.app._send(conn, request, status, body, extra_headers=headers, error_code=code)

    # --- metrics --------------------------------------------------------------------------

    def families(self, process: int) -> list[Family]:
        """This process's admission series (label `process`); the gauges are what this
        process holds, so their sum over processes is the gateway's value."""
        proc = ("process", str(process))
        words = self.words
        wait = histogram_samples([proc], self.wait)
        return [
            Family(
                "smg_http_rate_limit_total",
                "counter",
                "Rate limiting decisions by result (allowed/rejected)",
                [
                    Sample("", [proc, ("result", "allowed")], self.allowed),
                    Sample("", [proc, ("result", "rejected")], self.rejected),
                ],
            ),
            Family(
                "smg_admission_queue_rejected_total",
                "counter",
                "Requests rejected at admission by reason (full/timeout)",
                [
                    Sample("", [proc, ("reason", "full")], self.rejected_full),
                    Sample("", [proc, ("reason", "timeout")], self.rejected_timeout),
                ],
            ),
            Family(
                "smg_admission_queued_total",
                "counter",
                "Requests that waited in the admission queue (smg)",
                [Sample("", [proc], self.queued_total)],
            ),
            Family(
                "smg_admission_queue_cancelled_total",
                "counter",
                "Queued requests whose client went away before admission (smg)",
                [Sample("", [proc], self.cancelled)],
            ),
            Family(
                "smg_admission_queue_wait_seconds",
                "histogram",
                "Time a request spent queued before admission, timeout, or cancel (smg)",
                wait,
            ),
            Family(
                "smg_admission_inflight",
                "gauge",
                "Requests currently holding an admission token",
                [Sample("", [proc], words.permits)],
            ),
            Family(
                "smg_admission_queue_depth",
                "gauge",
                "Requests currently parked in the admission queue",
                [Sample("", [proc], words.queued)],
            ),
        ]

    def stats(self) -> dict[str, Any]:
        words = self.words
        atomic = words.atomic
        return {
            "permits": words.permits,
            "queued": words.queued,
            "global_in_flight": atomic.load_u64(words.g_in_flight),
            "global_queued": atomic.load_u64(words.g_queued),
        }
