"""The worker registry: the control plane's record of every worker, mirrored into the table.

Synchronous and free of I/O except the shared-table writes, so it is tested directly.
The control plane (``smg.control.plane``) drives it from probes, scrapes and admin calls.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from smg.control.worker_state import (
    ZERO,
    Event,
    HealthCounters,
    HealthThresholds,
    WorkerStatus,
    initial_status,
    on_event,
)
from smg.httpwire import HttpError
from smg.policies.base import BackendLoad
from smg.shm.directory import Directory, DirectoryEntry
from smg.shm.layout import FLAG_DRAINING, FLAG_IN_USE, FLAG_LOAD_VALID, Row
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec, public_worker_spec


def unsupported_reason(spec: WorkerSpec) -> str | None:
    """What this build cannot serve yet, refused at registration rather than failing later."""
    if spec.connection_mode == "grpc":
        return "gRPC workers are not supported yet (HTTP proxy mode only)"
    if spec.worker_type != "regular":
        return (
            f"worker_type {spec.worker_type!r} needs prefill/decode disaggregation, "
            "which is not supported yet"
        )
    return None


class WorkerRecord:
    def __init__(self, worker_id: str, spec: WorkerSpec, row: int, generation: int) -> None:
        self.worker_id = worker_id
        self.spec = spec
        self.row = row
        self.generation = generation
        self.status = WorkerStatus.PENDING
        self.counters: HealthCounters = ZERO
        self.engine = "unknown"
        self.models: tuple[str, ...] = ()
        self.server_info: dict[str, Any] = {}
        self.load = BackendLoad()
        self.load_updated = 0.0
        self.registered = time.monotonic()
        self.status_changed = time.time()
        self.discovered = False
        self.load_endpoints: tuple[str, ...] | None = None

    @property
    def served_models(self) -> tuple[str, ...]:
        if self.spec.model_id:
            return (self.spec.model_id,)
        return self.models

    def serves(self, model: str) -> bool:
        return model in self.served_models


class Registry:
    def __init__(
        self,
        table: WorkerTable,
        thresholds: HealthThresholds,
        *,
        health_check_disabled: bool,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.table = table
        self.thresholds = thresholds
        self.health_check_disabled = health_check_disabled
        self.aliases = dict(aliases or {})
        self.workers: dict[str, WorkerRecord] = {}
        self.by_url: dict[str, str] = {}
        # Rows freed longest ago are reused first, so a late decrement has the longest
        # time to land on a row nobody uses; the generation guards it in any case.
        self.free_rows = list(range(table.capacity - 1, -1, -1))
        self.row_generations = [table.read_row(row).generation for row in range(table.capacity)]

    # --- membership ---------------------------------------------------------------------------

    def add(self, spec: WorkerSpec, worker_id: str | None = None) -> WorkerRecord:
        existing = self.by_url.get(spec.url)
        if existing is not None:
            raise HttpError(
                409,
                "WORKER_ALREADY_EXISTS",
                f"Worker already exists at URL '{spec.url}' with ID {existing}. "
                f"Use PATCH /workers/{existing} to update.",
            )
        if not self.free_rows:
            raise HttpError(
                503,
                "WORKER_TABLE_FULL",
                f"the worker table is full ({self.table.capacity} workers); "
                "restart with a larger --worker-table-capacity",
            )
        row = self.free_rows.pop()
        generation = self.row_generations[row] + 1
        self.row_generations[row] = generation
        record = WorkerRecord(worker_id or str(uuid.uuid4()), spec, row, generation)
        record.status = initial_status(self.health_check_disabled)
        self.workers[record.worker_id] = record
        self.by_url[spec.url] = record.worker_id
        self._write_row(record)
        self.publish()
        return record

    def restore(self) -> int:
        """Take over the workers a previous control-plane process published (it crashed and
        the supervisor replaced it): same ids, rows, generations and statuses."""
        _generation, directory = self.table.read_directory()
        self.aliases = dict(directory.aliases) or self.aliases
        for entry in directory.entries:
            value = self.table.read_row(entry.row)
            if value.generation != entry.generation:
                continue
            spec = WorkerSpec(
                url=entry.url,
                model_id=entry.model_id,
                worker_type=entry.worker_type,
                connection_mode=entry.connection_mode,
                api_key=entry.api_key,
                labels=dict(entry.labels),
                priority=entry.priority,
                cost=entry.cost,
            )
            record = WorkerRecord(entry.worker_id, spec, entry.row, entry.generation)
            record.status = WorkerStatus(value.status)
            record.engine = entry.engine
            record.models = tuple(entry.models)
            record.discovered = entry.engine != "unknown"
            self.workers[record.worker_id] = record
            self.by_url[spec.url] = record.worker_id
            if entry.row in self.free_rows:
                self.free_rows.remove(entry.row)
        return len(self.workers)

    def remove(self, worker_id: str) -> WorkerRecord | None:
        record = self.workers.pop(worker_id, None)
        if record is None:
            return None
        self.by_url.pop(record.spec.url, None)
        self.table.write_row(
            record.row,
            Row(
                record.generation,
                int(WorkerStatus.DRAINING),
                0,
                0,
                0,
                0,
                0.0,
                0.0,
                0.0,
                time.time(),
            ),
        )
        self.free_rows.insert(0, record.row)
        self.publish()
        return record

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self.workers.get(worker_id)

    # --- state changes ------------------------------------------------------------------------

    def apply(self, record: WorkerRecord, event: Event) -> bool:
        """Apply a health event; returns True when the status changed."""
        status, counters = on_event(record.status, record.counters, event, self.thresholds)
        record.counters = counters
        if status == record.status:
            return False
        self.set_status(record, status)
        return True

    def set_status(self, record: WorkerRecord, status: WorkerStatus) -> None:
        record.status = status
        record.status_changed = time.time()
        self._write_row(record)
        self.table.bump_routing_generation()

    def set_load(self, record: WorkerRecord, load: BackendLoad | None) -> None:
        record.load = load if load is not None else BackendLoad()
        record.load_updated = time.time()
        self._write_row(record)

    def set_discovery(
        self, record: WorkerRecord, engine: str, models: list[str], server_info: dict[str, Any]
    ) -> None:
        record.engine = engine
        record.models = tuple(models)
        record.server_info = server_info
        record.discovered = True
        self.publish()

    def update_spec(self, record: WorkerRecord, spec: WorkerSpec) -> None:
        record.spec = spec
        self.publish()

    # --- publishing ----------------------------------------------------------------------------

    def _write_row(self, record: WorkerRecord) -> None:
        flags = FLAG_IN_USE
        if record.status == WorkerStatus.DRAINING:
            flags |= FLAG_DRAINING
        load = record.load
        if load.valid:
            flags |= FLAG_LOAD_VALID
        self.table.write_row(
            record.row,
            Row(
                record.generation,
                int(record.status),
                flags,
                max(0, min(load.running, 2**32 - 1)),
                max(0, min(load.waiting, 2**32 - 1)),
                max(0, min(load.waiting_tokens, 2**32 - 1)),
                float(load.token_usage),
                float(load.throughput),
                record.load_updated,
                record.status_changed,
            ),
        )

    def publish(self) -> None:
        entries = [
            DirectoryEntry(
                row=record.row,
                generation=record.generation,
                worker_id=record.worker_id,
                url=record.spec.url,
                model_id=record.spec.model_id,
                models=record.served_models,
                worker_type=record.spec.worker_type,
                connection_mode=record.spec.connection_mode or "http",
                api_key=record.spec.api_key,
                labels=dict(record.spec.labels),
                priority=record.spec.priority,
                cost=record.spec.cost,
                engine=record.engine,
            )
            for record in self.workers.values()
        ]
        self.table.publish_directory(Directory(entries=entries, aliases=self.aliases))
        self.table.bump_routing_generation()

    # --- views ----------------------------------------------------------------------------------

    def info(self, record: WorkerRecord) -> dict[str, Any]:
        spec = public_worker_spec(record.spec)
        status = record.status.name.lower()
        return {
            "id": record.worker_id,
            **spec,
            "model_id": record.spec.model_id or (record.models[0] if record.models else None),
            "models": list(record.served_models),
            "engine": record.engine,
            "is_healthy": record.status == WorkerStatus.READY,
            "status": status,
            "load": self.table.in_flight(record.row),
            "backend_load": msgspec.to_builtins(record.load),
            "job_status": None,
        }

    def list_infos(self, model: str | None = None) -> dict[str, Any]:
        if model is not None:
            model = self.aliases.get(model, model)
        infos = [
            self.info(record)
            for record in self.workers.values()
            if model is None or record.serves(model)
        ]
        counts = {"prefill_count": 0, "decode_count": 0, "regular_count": 0}
        for record in self.workers.values():
            if model is not None and not record.serves(model):
                continue
            key = f"{record.spec.worker_type}_count"
            if key in counts:
                counts[key] += 1
        return {"workers": infos, "total": len(infos), "stats": counts}
