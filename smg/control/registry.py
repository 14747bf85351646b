"""The worker registry: the control plane's record of every worker, mirrored into the table.

Synchronous and free of I/O except the shared-table writes, so it is tested directly.
The control plane (``smg.control.plane``) drives it from probes, scrapes and admin calls.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from smg.control import external
from smg.control.worker_state import (
    ZERO,
    Event,
    HealthCounters,
    HealthThresholds,
    WorkerStatus,
    initial_status,
    on_event,
)
from smg.dp import dp_url
from smg.grpc.types import GrpcModelInfo
from smg.httpwire import HttpError
from smg.policies.base import BackendLoad
from smg.policies.bucket import PrefillWorker
from smg.shm import layout
from smg.shm.directory import (
    MAX_PD_WINDOW,
    Directory,
    DirectoryEntry,
    WasmModuleEntry,
    bound_grpc_info,
    bound_models,
    encode_directory,
)
from smg.shm.health import FLAG_OVERLOADED, HealthBlocks
from smg.shm.layout import FLAG_DRAINING, FLAG_IN_USE, FLAG_LOAD_VALID, Row
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec, public_worker_spec

# What a generation model serves (Rust ModelCard's default model_type for an LLM); smg
# reports it for every discovered model, as it does not tell generation from embedding.
log = logging.getLogger("smg.control")

_LLM_MODEL_TYPE = ("chat", "completions", "responses", "tools")


def unsupported_reason(spec: WorkerSpec) -> str | None:
    """What this build cannot serve yet, refused at registration rather than failing later.

    Prefill and decode workers are accepted in any mode, as 1.13 accepts them (its regular
    router routes to regular workers only, and so does smg's data plane); only PD mode
    routes to them, over HTTP (smg.dataplane.pd) or gRPC (smg.grpc.pd)."""
    if spec.worker_type == "encode":
        return "worker_type 'encode' needs EPD disaggregation, which smg does not support"
    return None


def _grpc_view(info: GrpcModelInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    names = info.__struct_fields__
    return dict(zip(names, msgspec.structs.astuple(info), strict=True))


def _dp_view(record: WorkerRecord) -> dict[str, Any]:
    """A --dp-aware rank worker's fields in /workers, as 1.13 shows them (none otherwise)."""
    if record.dp is None:
        return {}
    rank, size = record.dp
    return {
        "url": record.url,
        "dp_base_url": record.spec.url,
        "dp_rank": rank,
        "dp_size": size,
    }


def _rfc3339(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).isoformat()


def aggregate_loads(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The Rust SMG's `aggregate` over `loads` entries (totals, and means per entry)."""
    count = len(entries)

    def mean(key: str) -> float:
        return sum(e[key] for e in entries) / count if count else 0.0

    return {
        "total_running_reqs": sum(e["num_running_reqs"] for e in entries),
        "total_waiting_reqs": sum(e["num_waiting_reqs"] for e in entries),
        "total_reqs": sum(e["num_total_reqs"] for e in entries),
        "avg_token_usage": mean("token_usage"),
        "avg_throughput": mean("gen_throughput"),
    }


def pd_window(record: WorkerRecord) -> int:
    """A decode worker's running window as 1.13 reads it: its `max_num_seqs` or
    `max_running_requests` label, else the engine's /server_info `max_running_requests`;
    0 when it reports none (capped at 2**32 - 1: the data plane compares counts to it)."""
    labels = record.spec.labels
    for value in (
        labels.get("max_num_seqs"),
        labels.get("max_running_requests"),
        record.server_info.get("max_running_requests"),
    ):
        try:
            window = int(value) if value is not None else 0
        except (TypeError, ValueError):
            window = 0
        if window > 0:
            return min(window, MAX_PD_WINDOW)
    return 0


class WorkerRecord:
    def __init__(self, worker_id: str, spec: WorkerSpec, row: int, generation: int) -> None:
        self.worker_id = worker_id
        self.spec = spec
        self.row = row
        self.generation = generation
        self.status = WorkerStatus.PENDING
        self.counters: HealthCounters = ZERO
        self.engine = "unknown"
        # External workers only: the provider (smg.providers.worker_provider); set at
        # registration by the external-worker workflow. None: a self-hosted engine.
        self.provider: str | None = None
        self.models: tuple[str, ...] = ()
        self.context_length: int | None = None
        self.server_info: dict[str, Any] = {}
        self.load = BackendLoad()
        self.load_updated = 0.0
        self.registered = time.monotonic()
        self.status_changed = time.time()
        self.discovered = False
        self.load_endpoints: tuple[str, ...] | None = None
        # gRPC workers: the model facts discovery found (with the tokenizer bundle's
        # directory once fetched), published in the directory entry.
        self.grpc: GrpcModelInfo | None = None
        # --dp-aware (smg.dp): (rank, dp_size) of a rank worker of the engine at spec.url.
        self.dp: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        """The worker's key and shown URL: spec.url, or `{spec.url}@{rank}` for a rank."""
        dp = self.dp
        return self.spec.url if dp is None else dp_url(self.spec.url, dp[0])

    @property
    def served_models(self) -> tuple[str, ...]:
        if self.spec.model_id:
            return (self.spec.model_id,)
        return self.models

    def serves(self, model: str) -> bool:
        return model in self.served_models

    @property
    def external(self) -> bool:
        return self.provider is not None

    def health_checked(self, gateway_disabled: bool) -> bool:
        """Whether this worker is probed: the spec's `health.disable_health_check`
        overrides `--disable-health-check` either way (Rust's per-worker health config).
        An external worker is not probed unless its spec asks (Rust sets
        disable_health_check for them: a provider's API has no /health)."""
        health = self.spec.health
        if health is not None and health.disable_health_check is not None:
            return not health.disable_health_check
        return not gateway_disabled and not self.external

    def thresholds(self, default: HealthThresholds) -> HealthThresholds:
        """The gateway-wide thresholds with this worker's `health` overrides applied."""
        health = self.spec.health
        if health is None:
            return default
        return HealthThresholds(
            success_threshold=health.success_threshold or default.success_threshold,
            failure_threshold=health.failure_threshold or default.failure_threshold,
        )

    def entry(self) -> DirectoryEntry:
        spec = self.spec
        return DirectoryEntry(
            row=self.row,
            generation=self.generation,
            worker_id=self.worker_id,
            url=spec.url,
            model_id=spec.model_id,
            models=self.served_models,
            api_key=spec.api_key,
            engine=self.engine,
            context_length=self.context_length,
            spec=spec,
            grpc=self.grpc,
            provider=self.provider,
            dp_rank=None if self.dp is None else self.dp[0],
            dp_size=None if self.dp is None else self.dp[1],
            # The decode running window every data-plane process gates PD dispatch by
            # (smg.dataplane.pd_window); published here so no process asks for it.
            pd_window=pd_window(self) if spec.worker_type == "decode" else 0,
        )


class Registry:
    def __init__(
        self,
        table: WorkerTable,
        thresholds: HealthThresholds,
        *,
        health_check_disabled: bool,
        aliases: dict[str, str] | None = None,
        overload_limits: tuple[int, float] | None = None,
    ) -> None:
        self.table = table
        self.health = HealthBlocks(table)
        # (waiting requests, KV usage) at or above which a worker is flagged overloaded after
        # a load poll; None: worker overload protection is off.
        self.overload_limits = overload_limits
        self.thresholds = thresholds
        self.health_check_disabled = health_check_disabled
        self.aliases = dict(aliases or {})
        # False until the start-up workers are registered (then kept in the directory):
        # a replacement control plane that finds it True restores from the table only.
        self.seeded = False
        # The WASM modules every data plane runs, in order (smg.control.wasm_admin).
        self.wasm: tuple[WasmModuleEntry, ...] = ()
        self.workers: dict[str, WorkerRecord] = {}
        self.by_url: dict[str, str] = {}
        # Rows freed longest ago are reused first, so a late decrement has the longest
        # time to land on a row nobody uses; the generation guards it in any case.
        self.free_rows = list(range(table.capacity - 1, -1, -1))
        self.row_generations = [table.read_row(row).generation for row in range(table.capacity)]

    # --- membership ---------------------------------------------------------------------------

    def add(
        self, spec: WorkerSpec, worker_id: str | None = None, dp: tuple[int, int] | None = None
    ) -> WorkerRecord:
        """Register a worker; `dp` = (rank, dp_size) makes it a --dp-aware rank worker."""
        key = spec.url if dp is None else dp_url(spec.url, dp[0])
        existing = self.by_url.get(key)
        if existing is not None:
            raise HttpError(
                409,
                "WORKER_ALREADY_EXISTS",
                f"Worker already exists at URL '{key}' with ID {existing}. "
                f"Use PATCH /workers/{existing} to update.",
            )
        if not self.free_rows:
            raise HttpError(
                503,
                "WORKER_TABLE_FULL",
                f"the worker table is full ({self.table.capacity} workers); "
                "restart with a larger --worker-table-capacity",
            )
        row = self.free_rows[-1]
        generation = self.row_generations[row] + 1
        record = WorkerRecord(worker_id or str(uuid.uuid4()), spec, row, generation)
        record.dp = dp
        waits = spec.connection_mode == "grpc"
        if external.is_external(spec):
            record.engine = external.ENGINE
            record.provider = external.record_provider(spec)
            # Routable once its models are known; at once when there is nothing to ask.
            waits = external.needs_discovery(spec, record.provider, os.environ)
            record.discovered = not waits
        # A gRPC worker is not routable before its model facts (and tokenizer) are in,
        # even unprobed: the control plane moves it on once they are.
        unprobed = not record.health_checked(self.health_check_disabled)
        record.status = initial_status(unprobed and not waits)
        # Encode first: a worker that does not fit is refused before anything changes.
        blob = self._encode([*self.workers.values(), record])
        self.free_rows.pop()
        self.row_generations[row] = generation
        self.workers[record.worker_id] = record
        self.by_url[key] = record.worker_id
        # The row's breaker, stall and overload state start afresh before any process can
        # route to the new worker (it becomes routable with the row and directory below).
        self.health.reset_block(row, time.monotonic_ns())
        self._write_row(record)
        self._write_directory(blob)
        return record

    def restore(self) -> int:
        """Take over the workers a previous control-plane process published (it crashed and
        the supervisor replaced it): same ids, rows, generations, statuses and specs."""
        _generation, directory = self.table.read_directory()
        self.aliases = dict(directory.aliases) or self.aliases
        self.seeded = directory.seeded
        self.wasm = directory.wasm
        for entry in directory.entries:
            value = self.table.read_row(entry.row)
            if value.generation != entry.generation:
                continue
            record = WorkerRecord(entry.worker_id, entry.spec, entry.row, entry.generation)
            record.status = WorkerStatus(value.status)
            record.status_changed = value.status_changed
            record.engine = entry.engine
            record.provider = entry.provider
            record.models = () if entry.spec.model_id else entry.models
            record.context_length = entry.context_length
            record.discovered = entry.engine != "unknown"
            if entry.provider is not None and record.status == WorkerStatus.PENDING:
                # An external worker still Pending may not have its models yet.
                record.discovered = not external.needs_discovery(
                    entry.spec, entry.provider, os.environ
                )
            record.grpc = entry.grpc
            if entry.dp_rank is not None and entry.dp_size is not None:
                record.dp = (entry.dp_rank, entry.dp_size)
            self.workers[record.worker_id] = record
            self.by_url[record.url] = record.worker_id
            if entry.row in self.free_rows:
                self.free_rows.remove(entry.row)
        return len(self.workers)

    def mark_seeded(self) -> None:
        """The start-up workers are registered: say so in the directory."""
        self.seeded = True
        self.publish()

    def remove(self, worker_id: str) -> WorkerRecord | None:
        record = self.workers.pop(worker_id, None)
        if record is None:
            return None
        self.by_url.pop(record.url, None)
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

    def prefill_workers(self) -> list[PrefillWorker]:
        """Every prefill worker whose model is known (given or discovered: 1.13 adds a
        worker to its policy once registration found it), in registration order, with its
        model key (the bucket policy's membership; 1.13 keeps unhealthy ones too)."""
        return [
            PrefillWorker(r.row, r.generation, r.spec.url, (r.served_models or ("unknown",))[0])
            for r in self.workers.values()
            if r.spec.worker_type == "prefill" and (r.served_models or r.discovered)
        ]

    # --- state changes ------------------------------------------------------------------------

    def apply(self, record: WorkerRecord, event: Event) -> bool:
        """Apply a health event; returns True when the status changed."""
        thresholds = record.thresholds(self.thresholds)
        status, counters = on_event(record.status, record.counters, event, thresholds)
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
        now = time.time()
        # The row's load_updated and the record's load carry the same time: policies
        # and /workers both see when this poll landed.
        record.load = msgspec.structs.replace(load or BackendLoad(), updated=now)
        record.load_updated = now
        self._write_row(record)
        self.health.set_overloaded(record.row, self.is_overloaded(record))

    def is_overloaded(self, record: WorkerRecord) -> bool:
        """Over `--worker-overload-waiting-requests` or `--worker-overload-token-usage` by its
        last poll (both inclusive, as SMG compares); a worker without a usable load is not."""
        limits = self.overload_limits
        load = record.load
        if limits is None or not load.valid:
            return False
        return load.waiting >= limits[0] or load.token_usage >= limits[1]

    def overloaded(self, record: WorkerRecord) -> bool:
        """Whether the worker is flagged overloaded in the table now."""
        return bool(self.health.flags(record.row) & FLAG_OVERLOADED)

    def set_discovery(
        self,
        record: WorkerRecord,
        engine: str,
        models: list[str],
        server_info: dict[str, Any],
        context_length: int | None = None,
        grpc: GrpcModelInfo | None = None,
    ) -> None:
        """Store what discovery found. The model list is cut to what a directory entry
        has room for (`bound_models`), and a gRPC worker's facts likewise
        (`bound_grpc_info`), so the publish cannot fail for want of space."""
        bounded = bound_models(models)
        if len(bounded) < len(models):
            log.warning(
                "worker %s lists %d models; keeping the first %d that fit the directory",
                record.spec.url,
                len(models),
                len(bounded),
            )
        record.engine = engine
        record.models = bounded
        record.context_length = context_length
        record.server_info = server_info
        if grpc is not None:
            record.grpc = bound_grpc_info(grpc)
        record.discovered = True
        self.publish()

    def set_tokenizer_dir(self, record: WorkerRecord, tokenizer_dir: str) -> None:
        """A gRPC worker's tokenizer bundle is unpacked at `tokenizer_dir`: publish it."""
        info = record.grpc or GrpcModelInfo()
        record.grpc = bound_grpc_info(msgspec.structs.replace(info, tokenizer_dir=tokenizer_dir))
        self.publish()

    def update_spec(self, record: WorkerRecord, spec: WorkerSpec) -> None:
        """Replace a worker's spec, all or nothing: HttpError 400 (and no change) when the
        directory has no room for it."""
        old = record.spec
        record.spec = spec
        try:
            blob = self._encode(self.workers.values())
        except HttpError:
            record.spec = old
            raise
        self._write_directory(blob)

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

    def publish_wasm(self, modules: tuple[WasmModuleEntry, ...]) -> None:
        """Publish a new WASM module list (all or nothing: HttpError when it has no room)."""
        old = self.wasm
        self.wasm = modules
        try:
            blob = self._encode(self.workers.values())
        except HttpError:
            self.wasm = old
            raise
        self._write_directory(blob)

    def publish(self) -> None:
        self._write_directory(self._encode(self.workers.values()))

    def _encode(self, records: Iterable[WorkerRecord]) -> bytes:
        """The directory of `records`, encoded; HttpError 400 when it is over the buffer
        (which the buffer's sizing from the spec limits makes a should-not-happen)."""
        directory = Directory(
            entries=[record.entry() for record in records],
            aliases=self.aliases,
            seeded=self.seeded,
            wasm=self.wasm,
        )
        blob = encode_directory(directory)
        room = self.table.geo.dir_capacity
        if len(blob) > room:
            raise HttpError(
                400,
                "WORKER_DIRECTORY_FULL",
                f"the worker directory has no room for this change ({len(blob)} bytes "
                f"needed, {room} available); nothing was changed",
            )
        return blob

    def _write_directory(self, blob: bytes) -> None:
        layout.write_directory(self.table.buf, self.table.geo, blob)
        self.table.bump_routing_generation()

    # --- views ----------------------------------------------------------------------------------

    def info(self, record: WorkerRecord) -> dict[str, Any]:
        """One worker as `GET /workers/{id}` shows it: the Rust SMG 1.13 fields (models as
        objects, runtime_type, labels, ...) and smg's own (engine, backend_load, ...)."""
        spec = public_worker_spec(record.spec)
        served = record.served_models
        if record.external:
            # Rust 1.13's model cards: date-suffixed ids as aliases, the provider per card.
            models = external.card_views(served)
        else:
            models = [
                {
                    "id": model,
                    "model_type": list(_LLM_MODEL_TYPE),
                    "context_length": record.context_length,
                }
                for model in served
            ]
        return {
            "id": record.worker_id,
            **spec,
            "model_id": record.spec.model_id or (models[0]["id"] if models else None),
            "models": models,
            "runtime_type": record.engine,
            # smg's own: an external worker's resolved provider (None: self-hosted).
            "provider": record.provider,
            "http2": False,  # smg speaks HTTP/1.1 to workers
            "engine": record.engine,
            "is_healthy": record.status == WorkerStatus.READY,
            "status": record.status.label,
            "load": self.table.in_flight(record.row),
            "engine_load": self.engine_load(record),
            "backend_load": msgspec.to_builtins(record.load),
            "job_status": None,
            # smg's own: a gRPC worker's model facts (GetModelInfo) and tokenizer bundle.
            "grpc": _grpc_view(record.grpc),
            **_dp_view(record),
        }

    def load_entry(self, record: WorkerRecord) -> dict[str, Any]:
        """A worker's engine load as one entry of the Rust SMG's `loads` lists. smg reads
        the load summed over DP ranks, so a worker is one entry, `dp_rank` 0."""
        load = record.load
        return {
            "dp_rank": 0,
            "num_running_reqs": load.running,
            "num_waiting_reqs": load.waiting,
            "num_waiting_uncached_tokens": load.waiting_tokens,
            "num_total_reqs": load.running + load.waiting,
            "token_usage": load.token_usage,
            "gen_throughput": load.throughput,
        }

    def engine_load(self, record: WorkerRecord) -> dict[str, Any] | None:
        """`engine_load` of `GET /workers` (Rust 1.13): the last polled load, None before
        a poll succeeded."""
        if not record.load.valid:
            return None
        entry = self.load_entry(record)
        return {
            "timestamp": _rfc3339(record.load.updated),
            "version": str(record.server_info.get("version") or ""),
            "dp_rank_count": 1,
            "loads": [entry],
            "aggregate": aggregate_loads([entry]),
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
