"""Entry point of one data-plane process (runs in a child forked from the root supervisor)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import uvloop

from smg import ipc, mcp
from smg.dataplane.app import DataPlane
from smg.dataplane.server import ClientConnection
from smg.policies.registry import make_policy
from smg.policies.shared import SharedRouting
from smg.shm import layout
from smg.supervisor import BACKLOG, DUMP_SIGNAL, REPLACE_SIGNAL, heartbeat_interval

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.shm.table import WorkerTable
    from smg.tlsconf import ServerTls

log = logging.getLogger("smg.dataplane")

# Connections that arrive after readiness turned 503 are still served for this long, so a
# load balancer that has not yet seen the 503 does not get refused connections.
LISTENER_LINGER_SECS = 1.0
# A replaced process (live reload) leaves an idle keep-alive connection open this long,
# so a client that sends on it meanwhile is answered (with `Connection: close`) rather
# than finding it closed under its request; the replacement accepts everything new.
REPLACED_IDLE_CLOSE_SECS = 2.0
# A TLS handshake must finish within --header-read-timeout-secs (this when that is 0): a
# client that connects and never completes it does not hold a connection for long.
TLS_HANDSHAKE_TIMEOUT_SECS = 60.0
TEST_HOOKS_ENV = "SMG__TEST_HOOKS"
# The event-loop lag probe's period: a timer this often, its lateness observed.
LOOP_LAG_INTERVAL_SECS = 0.5


def run(
    cfg: GatewayConfig,
    table: WorkerTable,
    index: int,
    root_pid: int,
    sock: socket.socket,
    slot: int | None = None,
    tls: ServerTls | None = None,
    shared: SharedRouting | None = None,
) -> int:
    """Serve ``sock`` (bound and listening, opened by the supervisor) until SIGTERM has
    drained this process (or the supervisor's replacement signal, on a live reload).
    ``index`` is the listener number; ``slot`` this process's slot in the table (``index``
    unless given). ``tls``: the listener's certificate and key (read by the supervisor):
    the listener then serves TLS only. Returns the exit code."""
    slot = index if slot is None else slot
    started = time.time()
    pid = os.getpid()
    heartbeat_word = table.proc_word_offset(slot, layout.P_HEARTBEAT_NS)
    table.atomic.store_u64(heartbeat_word, 0)
    table.atomic.store_u64(table.proc_word_offset(slot, layout.P_INDEX), index)
    table.write_proc(slot, pid, layout.PROC_STARTING, started)
    # The supervisor sends DUMP_SIGNAL before it kills a process whose loop stopped
    # beating: the C-level handler writes every thread's Python stack to stderr (the
    # gateway's log) even while the loop is stuck in a blocking call. With --log-dir the
    # log is a file: the dump goes there, next to the line saying why the process died.
    faulthandler.register(DUMP_SIGNAL, file=_dump_target(), all_threads=True)
    try:
        sock.setblocking(False)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        if shared is not None:
            shared.slot = slot  # this child's copy: the region it writes in shared tables
        policy = make_policy(cfg.policy, cfg, index=index, shared=shared)
        app = DataPlane(cfg, table, index, root_pid, policy, loop, slot=slot, shared=shared)
        _start_tracing(app, cfg, index)
        if os.environ.get(TEST_HOOKS_ENV) == "1":
            from smg.dataplane.testhooks import fail_start_if_asked, install

            fail_start_if_asked()
            install(app)
        # Held in a local for the life of the process: an unreferenced server is collected.
        # The address is per slot: during a live reload the old and the new process of one
        # listener both serve (and are scraped) at once.
        ipc_server = loop.run_until_complete(
            ipc.serve(ipc.dataplane_address(root_pid, slot), app.on_ipc)
        )
        # Accepting comes last: a process that fails to start must leave the connections
        # queued on its listener (which the supervisor keeps) for the next one.
        if tls is None:
            server = loop.run_until_complete(
                loop.create_server(lambda: ClientConnection(app), sock=sock, backlog=BACKLOG)
            )
        else:
            from smg.tlsconf import server_context

            # Built here, after the fork: no OpenSSL state (session-ticket keys, RNG) is
            # shared between processes.
            server = loop.run_until_complete(
                loop.create_server(
                    lambda: ClientConnection(app),
                    sock=sock,
                    backlog=BACKLOG,
                    ssl=server_context(tls),
                    ssl_handshake_timeout=float(cfg.header_read_timeout_secs)
                    or TLS_HANDSHAKE_TIMEOUT_SECS,
                )
            )
    except Exception as exc:
        table.write_proc(slot, pid, layout.PROC_FAILED, started, f"{exc}")
        log.error("data-plane process %d failed to start: %s", index, exc)
        return 3
    app.start()
    stopped: asyncio.Future[bool] = loop.create_future()

    def on_stop(replaced: bool) -> None:
        if not stopped.done():
            stopped.set_result(replaced)

    loop.add_signal_handler(signal.SIGTERM, on_stop, False)
    loop.add_signal_handler(REPLACE_SIGNAL, on_stop, True)
    # Ctrl-C reaches the whole process group; the root supervisor turns it into SIGTERM.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    interval = heartbeat_interval(cfg)
    store = table.atomic.store_u64

    def beat() -> None:
        # From inside the loop: a loop that stops turning stops beating.
        store(heartbeat_word, time.monotonic_ns())
        loop.call_later(interval, beat)

    beat()
    _start_loop_lag_probe(app, loop)
    # What start-up made (modules, config, the app) lives as long as the process: out of
    # the collector's sight. Measured with gc.callbacks over 1,024 streamed requests (two
    # processes): a full collection under load took 35-57 ms before, 10-19 ms after.
    gc.freeze()
    table.write_proc(slot, pid, layout.PROC_READY, started)
    try:
        replaced = loop.run_until_complete(stopped)
        table.write_proc(slot, pid, layout.PROC_DRAINING, started)
        grace = float(cfg.shutdown_grace_period_secs)
        if replaced:
            loop.run_until_complete(_drain_replaced(app, server, grace))
        else:
            loop.run_until_complete(_drain(app, server, grace))
        loop.run_until_complete(_push_final_metrics(app, root_pid, slot, pid))
    finally:
        _stop_tracing(app)
        ipc_server.close()
        table.write_proc(slot, 0, layout.PROC_EMPTY, 0.0)
    return 0


async def _drain(app: DataPlane, server: asyncio.AbstractServer, grace: float) -> None:
    """SIGTERM: readiness is 503 already (the root set the gateway state); keep accepting
    briefly, then stop accepting, let in-flight requests and streams finish, close."""
    deadline = time.monotonic() + grace
    app.not_ready = True
    await asyncio.sleep(min(LISTENER_LINGER_SECS, grace))
    server.close()
    app.begin_drain()
    await _finish(app, deadline)


async def _drain_replaced(app: DataPlane, server: asyncio.AbstractServer, grace: float) -> None:
    """Replaced on a live reload: the new process already accepts on the same listener,
    so this one stops accepting at once (what the kernel queued goes to the new one) and
    stays ready. Every keep-alive connection gets `Connection: close` on its next response;
    one that stays idle is closed after REPLACED_IDLE_CLOSE_SECS."""
    deadline = time.monotonic() + grace
    server.close()
    app.draining = True
    while time.monotonic() < deadline and app.connections:
        now = time.monotonic()
        for conn in list(app.connections):
            if not conn.busy and now - conn.since >= REPLACED_IDLE_CLOSE_SECS:
                conn.close()
        await asyncio.sleep(0.05)
    await _finish(app, deadline)


async def _finish(app: DataPlane, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not app.active and not any(conn.busy for conn in app.connections):
            break
        await asyncio.sleep(0.05)
    for conn in list(app.connections):
        conn.close()
    for pool in app.pools.values():
        pool.close_all()
    if app.grpc is not None:
        await app.grpc.close()  # the gRPC workers' channels (smg.grpc.frontend)
    await mcp.close_managers()  # MCP sessions; the stdio servers this process started stop
    await asyncio.sleep(0)


def _start_tracing(app: DataPlane, cfg: GatewayConfig, index: int) -> None:
    """--enable-trace: the span recorder and its export thread, in this process only
    (after the fork; the OTLP and gRPC modules are not even imported otherwise)."""
    if cfg.enable_trace:
        from smg.dataplane import tracing

        app.tracer = tracing.start(cfg, index)


def _stop_tracing(app: DataPlane) -> None:
    """Export the spans still queued (bounded) before the process exits."""
    tracer = app.tracer
    if tracer is not None:
        app.tracer = None
        tracer.shutdown()


def _start_loop_lag_probe(app: DataPlane, loop: asyncio.AbstractEventLoop) -> None:
    """A timer every LOOP_LAG_INTERVAL_SECS; how late it runs is the loop's lag (a turn
    blocked by a long callback, GC, or CPU starvation), observed into
    smg_event_loop_lag_seconds."""
    interval = LOOP_LAG_INTERVAL_SECS
    observe = app.metrics.loop_lag.observe
    clock = time.monotonic

    def probe(due: float) -> None:
        now = clock()
        observe(max(0.0, now - due))
        loop.call_later(interval, probe, now + interval)

    loop.call_later(interval, probe, clock() + interval)


def _dump_target() -> Any:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            return handler.stream
    return sys.stderr


async def _push_final_metrics(app: DataPlane, root_pid: int, slot: int, pid: int) -> None:
    """Hand the control plane this process's final counters, so they are folded into the
    gateway's totals (its last periodic scrape may be seconds old)."""
    app.metrics.connections_active = 0
    message = {
        "kind": "final_metrics",
        "slot": slot,
        "pid": pid,
        "families": app.metric_families(),
    }
    with contextlib.suppress(Exception):  # the control plane may be gone (shutdown)
        await ipc.call(ipc.control_plane_address(root_pid), message, 2.0)
