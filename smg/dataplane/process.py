"""Entry point of one data-plane process (runs in a child forked from the root supervisor)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import uvloop

from smg import ipc
from smg.dataplane.app import DataPlane
from smg.dataplane.server import ClientConnection
from smg.policies.registry import make_policy
from smg.shm import layout
from smg.supervisor import BACKLOG

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.shm.table import WorkerTable

log = logging.getLogger("smg.dataplane")

# Connections that arrive after readiness turned 503 are still served for this long, so a
# load balancer that has not yet seen the 503 does not get refused connections.
LISTENER_LINGER_SECS = 1.0


def run(
    cfg: GatewayConfig,
    table: WorkerTable,
    index: int,
    root_pid: int,
    sock: socket.socket,
) -> int:
    """Serve ``sock`` (bound and listening, opened by the supervisor) until SIGTERM has
    drained this process. Returns the exit code."""
    started = time.time()
    table.write_proc(index, os.getpid(), layout.PROC_STARTING, started)
    try:
        sock.setblocking(False)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        policy = make_policy(cfg.policy, cfg, index=index)
        app = DataPlane(cfg, table, index, root_pid, policy, loop)
        # Held in a local for the life of the process: an unreferenced server is collected.
        ipc_server = loop.run_until_complete(
            ipc.serve(ipc.dataplane_address(root_pid, index), app.on_ipc)
        )
        # Accepting comes last: a process that fails to start must leave the connections
        # queued on its listener (which the supervisor keeps) for the next one.
        server = loop.run_until_complete(
            loop.create_server(lambda: ClientConnection(app), sock=sock, backlog=BACKLOG)
        )
    except Exception as exc:
        table.write_proc(index, os.getpid(), layout.PROC_FAILED, started, f"{exc}")
        log.error("data-plane process %d failed to start: %s", index, exc)
        return 3
    app.start()
    stopped = loop.create_future()

    def on_sigterm() -> None:
        if not stopped.done():
            stopped.set_result(None)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    # Ctrl-C reaches the whole process group; the root supervisor turns it into SIGTERM.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    table.write_proc(index, os.getpid(), layout.PROC_READY, started)
    try:
        loop.run_until_complete(stopped)
        table.write_proc(index, os.getpid(), layout.PROC_DRAINING, started)
        loop.run_until_complete(_drain(app, server, float(cfg.shutdown_grace_period_secs)))
    finally:
        ipc_server.close()
        table.write_proc(index, 0, layout.PROC_EMPTY, 0.0)
    return 0


async def _drain(app: DataPlane, server: asyncio.AbstractServer, grace: float) -> None:
    """SIGTERM: readiness is 503 already (the root set the gateway state); keep accepting
    briefly, then stop accepting, let in-flight requests and streams finish, close."""
    deadline = time.monotonic() + grace
    app.not_ready = True
    await asyncio.sleep(min(LISTENER_LINGER_SECS, grace))
    server.close()
    app.begin_drain()
    while time.monotonic() < deadline:
        if not app.active and not any(conn.busy for conn in app.connections):
            break
        await asyncio.sleep(0.05)
    for conn in list(app.connections):
        conn.close()
    for pool in app.pools.values():
        pool.close_all()
    await asyncio.sleep(0)
