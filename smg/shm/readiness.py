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

# `/liveness` and `/health` (a data-plane process's and --health-check-port's): 200 and
# these bytes while the process runs, as the Rust SMG 1.13 answers them.
LIVENESS_BODY = b"OK"
LIVENESS_CONTENT_TYPE = "text/plain; charset=utf-8"


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

    The bodies are the Rust SMG 1.13's: `{"status":"ready","healthy_workers":H,
    "total_workers":T}` (H: routable workers of any type, T: every worker) and 503
    `{"status":"not ready","reason":"insufficient healthy workers"}`. In PD mode (`pd`)
    ready needs a routable prefill AND a routable decode worker, as 1.13's PrefillDecode
    readiness; the body adds the two counts and a 503 names what is missing."""
    if shutting_down or table.gateway_state() != GATEWAY_RUNNING:
        return 503, orjson.dumps({"status": "not ready", "reason": "shutting down"})
    routable_by_type: dict[str, int] = {}
    total = 0
    for entry in entries:
        total += 1
        if routable(table.read_row(entry.row), entry.generation):
            kind = entry.spec.worker_type
            routable_by_type[kind] = routable_by_type.get(kind, 0) + 1
    ready: dict[str, str | int] = {"status": "ready"}
    ready["healthy_workers"] = sum(routable_by_type.values())
    ready["total_workers"] = total
    if pd:
        prefill = routable_by_type.get("prefill", 0)
        decode = routable_by_type.get("decode", 0)
        missing = [kind for kind, count in (("prefill", prefill), ("decode", decode)) if not count]
        if missing:
            reason = f"no {' or '.join(missing)} worker is ready"
            return 503, orjson.dumps({"status": "not ready", "reason": reason})
        ready["ready_prefill_workers"] = prefill
        ready["ready_decode_workers"] = decode
        return 200, orjson.dumps(ready)
    # Outside PD mode only regular workers serve (1.13 counts every healthy worker here,
    # so a lone prefill worker would make it ready to answer 503s).
    if not routable_by_type.get("regular"):
        return 503, orjson.dumps({"status": "not ready", "reason": "insufficient healthy workers"})
    return 200, orjson.dumps(ready)
