"""Entry point of the control-plane process (forked from the root supervisor)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

import uvloop

from smg.control.plane import ControlPlane

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.policies.shared import SharedRouting
    from smg.shm.stash import Stash
    from smg.shm.table import WorkerTable
    from smg.workers_spec import WorkerSpec

log = logging.getLogger("smg.control")


def run(
    cfg: GatewayConfig,
    table: WorkerTable,
    root_pid: int,
    processes: int,
    specs: list[WorkerSpec],
    stash: Stash | None = None,
    shared: SharedRouting | None = None,
) -> int:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    plane = ControlPlane(cfg, table, root_pid, processes, specs, stash, shared)
    try:
        loop.run_until_complete(plane.start())
    except Exception as exc:
        log.error("control plane failed to start: %s", exc)
        return 3
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stopped.done() or stopped.set_result(None))
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.run_until_complete(stopped)
    loop.run_until_complete(plane.stop())
    return 0
