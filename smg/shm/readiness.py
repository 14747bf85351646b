"""Readiness, computed from the shared table alone.

One function for both answers: a data-plane process's `GET /readiness` and the control
plane's `--health-check-port` listener, so the two can never disagree. Pure apart from
reading the table (rows are read under their seqlock).
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from smg.control.worker_state import WorkerStatus
from smg.shm.directory import DirectoryEntry
from smg.shm.layout import FLAG_DRAINING, FLAG_IN_USE, GATEWAY_RUNNING, Row
from smg.shm.table import WorkerTable


def routable(value: Row, generation: int) -> bool:
    """A row receives traffic when it still belongs to the directory entry's worker (same
    generation), is in use, Ready and not draining (Rust `WorkerStatus::is_routable`)."""
    return (
        value.generation == generation
        and bool(value.flags & FLAG_IN_USE)
        and value.status == WorkerStatus.READY
        and not value.flags & FLAG_DRAINING
    )


def readiness(
    table: WorkerTable, entries: Iterable[DirectoryEntry], shutting_down: bool = False
) -> tuple[int, bytes]:
    """(status, JSON body) of `GET /readiness`: 200 while a worker is routable, 503 with
    the reason otherwise or while the gateway (or this process) is shutting down."""
    if shutting_down or table.gateway_state() != GATEWAY_RUNNING:
        return 503, orjson.dumps({"status": "not ready", "reason": "shutting down"})
    ready = sum(1 for entry in entries if routable(table.read_row(entry.row), entry.generation))
    if not ready:
        return 503, orjson.dumps({"status": "not ready", "reason": "no worker is ready"})
    return 200, orjson.dumps({"status": "ready", "ready_workers": ready})
