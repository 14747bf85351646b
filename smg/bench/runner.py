"""The load generator: sends prepared requests on schedule and records what happened.

Callback driven: the dispatcher coroutine wakes at each arrival time and writes the
prebuilt request on a pooled connection; responses are timed and parsed inside the
connection's `data_received` (see http.py and stream.py); a finished request frees its
concurrency slot and starts the oldest queued one directly. Nothing per request is
awaited, so the client's own cost per request stays small and measurable.

Send lag = actual send time - the time the request became eligible (its scheduled
arrival, or the moment a concurrency slot freed for it, whichever is later). Queue
time = eligible - scheduled (waiting for a slot under --max-concurrency; intended).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from smg.bench.board import Board, Slot
from smg.bench.http import Connection, Pool, Target, perf
from smg.bench.stream import StreamAccumulator


@dataclass
class Prepared:
    index: int
    target: int  # index into the run's targets
    data: bytes  # the whole HTTP request
    kind: str
    stream: bool


@dataclass
class Outcome:
    index: int
    target: int
    success: bool
    error: str | None
    status: int
    t_sched: float
    t_eligible: float
    t_send: float
    t_first: float | None
    t_done: float
    itl: list[float]
    first_tokens: int
    tokens_seen: int
    usage_in: int | None
    usage_out: int | None
    text: str
    error_detail: str = ""

    @property
    def ttft(self) -> float:
        return (self.t_first - self.t_send) if self.t_first is not None else 0.0

    @property
    def latency(self) -> float:
        return self.t_done - self.t_send

    @property
    def lag(self) -> float:
        return self.t_send - self.t_eligible

    @property
    def queue(self) -> float:
        return self.t_eligible - self.t_sched


@dataclass
class ProcStats:
    cpu_s: float = 0.0
    wall_s: float = 0.0
    peak_in_flight: int = 0
    connections_opened: int = 0
    warmup_failed: int = 0
    pid: int = 0


class Record(StreamAccumulator):
    """One request in flight: the response accumulator plus its timestamps."""

    __slots__ = ("conn", "engine", "prep", "t_done", "t_eligible", "t_sched", "timed_out")

    def __init__(self, engine: Engine, prep: Prepared) -> None:
        super().__init__(prep.kind, 0.0, prep.stream)
        self.engine = engine
        self.prep = prep
        self.t_sched = 0.0
        self.t_eligible = 0.0
        self.t_done = 0.0
        self.conn: Connection | None = None
        self.timed_out = False

    def on_done(self, ts: float, error: str | None) -> None:
        if self.t_done:
            return
        self.t_done = ts
        if error is None:
            self.finish(ts)
        self.engine.done(self, error)

    def outcome(self, transport_error: str | None) -> Outcome:
        error = transport_error
        if self.timed_out:
            error = "timeout"
        elif error is None and self.status != 200:
            error = f"http_{self.status}"
        elif error is None and self.error is not None:
            error = self.error
        elif error is None and self.first_ts is None:
            error = "no_content"
        detail = self.error_body() if self.status not in (0, 200) else ""
        return Outcome(
            index=self.prep.index,
            target=self.prep.target,
            success=error is None,
            error=error,
            status=self.status,
            t_sched=self.t_sched,
            t_eligible=self.t_eligible,
            t_send=self.t_send,
            t_first=self.first_ts,
            t_done=self.t_done,
            itl=self.itl,
            first_tokens=self.first_tokens,
            tokens_seen=self.tokens_seen,
            usage_in=self.usage_in,
            usage_out=self.usage_out,
            text=self.text,
            error_detail=detail,
        )


class Engine:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        targets: list[Target],
        max_concurrency: int | None,
        timeout: float | None,
        insecure: bool = False,
    ) -> None:
        self.loop = loop
        self.pools = [Pool(loop, t, insecure) for t in targets]
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.in_flight = 0
        self.peak_in_flight = 0
        self.waiting: deque[Record] = deque()
        self.active: set[Record] = set()
        self.outcomes: list[Outcome] = []
        self.expected = 0
        self.finished: asyncio.Future[None] | None = None

    # -- scheduling ----------------------------------------------------------------

    def submit(self, rec: Record, due: float) -> None:
        rec.t_sched = due
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            self.waiting.append(rec)
        else:
            self._start(rec, due)

    def _start(self, rec: Record, eligible: float) -> None:
        rec.t_eligible = eligible
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        conn = self.pools[rec.prep.target].acquire()
        if conn is None:
            self.loop.create_task(self._connect_and_send(rec))
        else:
            self._send(conn, rec)

    def _send(self, conn: Connection, rec: Record) -> None:
        rec.conn = conn
        self.active.add(rec)
        rec.t_send = perf()
        conn.send(rec.prep.data, rec)

    async def _connect_and_send(self, rec: Record) -> None:
        try:
            conn = await asyncio.wait_for(self.pools[rec.prep.target].connect(), self.timeout)
        except (TimeoutError, OSError) as exc:
            rec.t_send = perf()
            rec.body.append(str(exc).encode())
            rec.on_done(perf(), "connect_error")
            return
        self._send(conn, rec)

    def done(self, rec: Record, error: str | None) -> None:
        self.active.discard(rec)
        self.in_flight -= 1
        self.outcomes.append(rec.outcome(error))
        if self.waiting:
            self._start(self.waiting.popleft(), rec.t_done)
        if len(self.outcomes) >= self.expected and self.finished and not self.finished.done():
            self.finished.set_result(None)

    async def _sweep_timeouts(self) -> None:
        assert self.timeout is not None
        interval = min(max(self.timeout / 4, 0.01), 0.5)
        while True:
            await asyncio.sleep(interval)
            now = perf()
            for rec in [r for r in self.active if now - r.t_send > self.timeout]:
                rec.timed_out = True
                if rec.conn is not None:
                    rec.conn.abort()

    # -- running -------------------------------------------------------------------

    async def run(self, preps: list[Prepared], offsets: list[float], start: float) -> None:
        """Send preps[i] at start + offsets[i]; returns when every one has an outcome."""
        self.expected = len(self.outcomes) + len(preps)
        self.finished = self.loop.create_future()
        sweeper = self.loop.create_task(self._sweep_timeouts()) if self.timeout else None
        try:
            for prep, off in zip(preps, offsets):
                due = start + off
                delay = due - perf()
                # Sub-millisecond sleeps only cost a loop turn; the timer is ms-grained.
                if delay > 0.0005:
                    await asyncio.sleep(delay)
                self.submit(Record(self, prep), due)
            if preps:
                await self.finished
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    async def prewarm(self, per_target: list[int]) -> None:
        await asyncio.gather(*(p.prewarm(n) for p, n in zip(self.pools, per_target) if n > 0))

    def close(self) -> None:
        for p in self.pools:
            p.close()


# -- process-level setup -----------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft open-files limit to the hard one; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


def run_interruptibly(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    """`loop.run_until_complete(coro)`, ended by Ctrl-C as KeyboardInterrupt.

    uvloop catches a KeyboardInterrupt raised inside a protocol callback (a SIGINT that
    lands while `data_received` runs), logs it and closes that one transport: the run
    went on as if nothing had happened. So SIGINT is taken as the loop's signal handler
    instead, as asyncio.Runner does: the first cancels the run, which then ends here as
    KeyboardInterrupt; a second stops the loop at once. Left alone where SIGINT is not at
    Python's default (ignored by a non-interactive shell) or off the main thread."""
    task = loop.create_task(coro)
    hooked = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            task.cancel()
        else:
            loop.stop()

    if hooked:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        result = loop.run_until_complete(task)
    except (asyncio.CancelledError, RuntimeError):
        if interrupts:
            raise KeyboardInterrupt from None
        raise
    finally:
        if hooked:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupts:  # the run swallowed its cancellation
        raise KeyboardInterrupt
    return result


def run_on_new_loop(coro: Any) -> Any:
    """`coro` on a fresh (uvloop) loop, closed afterwards; Ctrl-C as in run_interruptibly."""
    loop = new_loop()
    try:
        return run_interruptibly(loop, coro)
    finally:
        loop.close()


@dataclass
class RunSpec:
    targets: list[Target]
    preps: list[Prepared]
    offsets: list[float]
    max_concurrency: int | None
    timeout: float | None
    warmups: list[Prepared] = field(default_factory=list)
    insecure: bool = False
    prewarm: int | None = None  # connections per target; None = sized to concurrency


def _prewarm_counts(spec: RunSpec, n_preps: int) -> list[int]:
    want = spec.prewarm
    if want is None:
        want = min(spec.max_concurrency or n_preps, n_preps, 4096)
    counts = [0] * len(spec.targets)
    used = {p.target for p in spec.preps} or {0}
    for t in used:
        counts[t] = want
    return counts


class _Ticker:
    """Feeds the live display: every INTERVAL_S, bins the outcomes finished since the
    last call into this process's board slot (in bulk, off the per-request path) with
    the engine's in-flight and queued counts and the CPU clock, and publishes it. Four
    times a second matches the display's frame rate; binning is capped per tick
    (board.SAMPLE_CAP), so each pause in the loop stays around a millisecond."""

    INTERVAL_S = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine, slot: Slot) -> None:
        self.loop = loop
        self.engine = engine
        self.slot = slot
        self.handle: asyncio.TimerHandle | None = None

    def update(self) -> None:
        e = self.engine
        self.slot.absorb(e.outcomes, e.in_flight, len(e.waiting))
        self.slot.publish()

    def __call__(self) -> None:
        self.update()
        self.handle = self.loop.call_later(self.INTERVAL_S, self)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.update()


async def _run_async(
    spec: RunSpec, start_barrier: Any = None, slot: Slot | None = None
) -> tuple[list[Outcome], ProcStats]:
    loop = asyncio.get_running_loop()
    engine = Engine(loop, spec.targets, spec.max_concurrency, spec.timeout, spec.insecure)
    stats = ProcStats(pid=os.getpid())
    try:
        with contextlib.suppress(OSError):
            await engine.prewarm(_prewarm_counts(spec, len(spec.preps)))
        if spec.warmups:
            await engine.run(spec.warmups, [0.0] * len(spec.warmups), perf())
            stats.warmup_failed = sum(1 for o in engine.outcomes if not o.success)
            engine.outcomes.clear()
        gc.collect()
        gc.freeze()  # the request set is static: keep the collector off it during the run
        start = start_barrier() if start_barrier else perf()
        delay = start - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu0, wall0 = time.process_time(), perf()
        ticker = None
        if slot is not None:
            slot.begin(start)
            ticker = _Ticker(loop, engine, slot)
            ticker()
        try:
            await engine.run(spec.preps, spec.offsets, start)
        finally:
            if ticker is not None:
                ticker.stop()
        stats.cpu_s = time.process_time() - cpu0
        stats.wall_s = perf() - wall0
        stats.peak_in_flight = engine.peak_in_flight
        stats.connections_opened = sum(p.opened_total for p in engine.pools)
        return engine.outcomes, stats
    finally:
        engine.close()
        gc.unfreeze()


class Watch(Protocol):
    """A live display fed by the board (smg.bench.live.Display): begun once the client
    processes exist (so none is forked while its drawing thread runs), ended after."""

    board: Board

    def begin(self) -> None: ...

    def end(self) -> None: ...


def run_in_process(
    spec: RunSpec,
    watch: Watch | None = None,
    before_start: Callable[[], None] | None = None,
) -> tuple[list[Outcome], list[ProcStats], float]:
    """Runs the spec on a fresh event loop here; returns outcomes, stats, start time.
    `before_start` (blocking) runs after warm-ups, just before the clock starts."""
    loop = new_loop()
    started: list[float] = []

    def barrier() -> float:
        if before_start is not None:
            before_start()
        started.append(perf())
        return started[0]

    slot = watch.board.slot(0) if watch is not None else None
    try:
        if watch is not None:
            watch.begin()
        outcomes, stats = run_interruptibly(loop, _run_async(spec, barrier, slot))
    finally:
        loop.close()
        if watch is not None:
            watch.end()
    return outcomes, [stats], started[0]


def _child(spec: RunSpec, conn: Any, slot: Slot | None = None) -> None:
    loop = new_loop()

    def barrier() -> float:
        conn.send("ready")
        return float(conn.recv())

    try:
        result = run_interruptibly(loop, _run_async(spec, barrier, slot))
        conn.send(("ok", result))
    except BaseException as exc:  # report instead of dying silently
        conn.send(("error", repr(exc)))
    finally:
        loop.close()
        conn.close()


def run_multiprocess(
    spec: RunSpec,
    processes: int,
    watch: Watch | None = None,
    before_start: Callable[[], None] | None = None,
) -> tuple[list[Outcome], list[ProcStats], float]:
    """Splits requests round-robin over `processes` forked clients sharing one start time.

    The concurrency cap is split evenly between processes (their sum equals the cap).
    All processes read the same monotonic clock, so their timestamps are comparable.
    `before_start` (blocking) runs once every client has warmed up, before the clock starts.
    With a watch, child k writes slot k of watch.board (an anonymous shared mapping that
    the fork inherits) and the parent draws from it.
    """
    if processes <= 1:
        return run_in_process(spec, watch, before_start)
    forking = sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if forking else "spawn")
    # A spawned child cannot inherit the mapping: it then runs without live counters.
    board = watch.board if watch is not None and forking else None
    children = []
    for k in range(processes):
        preps = spec.preps[k::processes]
        offsets = spec.offsets[k::processes]
        cap = None
        if spec.max_concurrency is not None:
            cap = max(1, spec.max_concurrency // processes + (k < spec.max_concurrency % processes))
        sub = RunSpec(
            spec.targets,
            preps,
            offsets,
            cap,
            spec.timeout,
            spec.warmups[k::processes],
            spec.insecure,
            spec.prewarm,
        )
        parent_end, child_end = ctx.Pipe()
        slot = board.slot(k) if board is not None else None
        proc = ctx.Process(target=_child, args=(sub, child_end, slot), daemon=True)
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
    try:
        if watch is not None:
            watch.begin()
        for _, pipe in children:
            msg = pipe.recv()
            if msg != "ready":
                raise RuntimeError(f"bench client process failed: {msg[1]}")
        if before_start is not None:
            before_start()
        start = perf() + 0.05
        for _, pipe in children:
            pipe.send(start)
        outcomes: list[Outcome] = []
        stats: list[ProcStats] = []
        for _, pipe in children:
            status, payload = pipe.recv()
            if status != "ok":
                raise RuntimeError(f"bench client process failed: {payload}")
            outcomes.extend(payload[0])
            stats.append(payload[1])
        outcomes.sort(key=lambda o: o.index)
        return outcomes, stats, start
    finally:
        for proc, pipe in children:
            pipe.close()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if watch is not None:
            watch.end()
