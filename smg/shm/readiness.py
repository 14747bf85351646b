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
    table: WorkerTable,
    entries: Iterable[DirectoryEntry],
    shutting_down: bool = False,
    pd: bool = False,
) -> tuple[int, bytes]:
    """(status, JSON body) of `GET /readiness`: 200 while a regular worker is routable, 503 with
    the reason otherwise or while the gateway (or this process) is shutting down.

    In PD mode (`pd`) ready needs a routable prefill AND a routable decode worker, as the
    Rust SMG 1.13's PrefillDecode readiness; its other workers do not count."""
    if shutting_down or table.gateway_state() != GATEWAY_RUNNING:
        return 503, orjson.dumps({"status": "not ready", "reason": "shutting down"})
    if pd:
        return _pd_readiness(table, entries)
    # Outside PD mode only regular workers serve (1.13 counts every healthy worker here,
    # so a lone prefill worker would make it ready to answer 503s).
    ready = sum(
        1
        for entry in entries
        if entry.spec.worker_type == "regular"
        and routable(table.read_row(entry.row), entry.generation)
    )
    if not ready:
        return 503, orjson.dumps({"status": "not ready", "reason": "no worker is ready"})
    return 200, orjson.dumps({"status": "ready", "ready_workers": ready})


def _pd_readiness(table: WorkerTable, entries: Iterable[DirectoryEntry]) -> tuple[int, bytes]:
    counts = {"prefill": 0, "decode": 0}
    for entry in entries:
        kind = entry.spec.worker_type
        if kind in counts and routable(table.read_row(entry.row), entry.generation):
            counts[kind] += 1
    missing = [kind for kind, count in counts.items() if not count]
    if missing:
        reason = f"no {' or '.join(missing)} worker is ready"
        return 503, orjson.dumps({"status": "not ready", "reason": reason})
    return 200, orjson.dumps(
        {
            "status": "ready",
            "ready_workers": counts["prefill"] + counts["decode"],
            "ready_prefill_workers": counts["prefill"],
            "ready_decode_workers": counts["decode"],
        }
    )
