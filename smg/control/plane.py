"""The control-plane process: health checks, load monitoring, admin API, metrics export.

It is the only writer of worker rows and the directory. Data-plane processes reach it over
the local channel (`smg.ipc`) for admin calls; it reaches them for metric scrapes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import aiohttp
import msgspec
import orjson
from aiohttp import web

from smg import __version__, discovery, ipc, promtext
from smg.config import (
    ConfigError,
    GatewayConfig,
    model_aliases,
    prometheus_bind_host,
    remove_unhealthy,
    tenant_keys,
)
from smg.control import cpauth, external, probes, procmetrics, profile
from smg.control.grpc_probes import GrpcProbe, needs_bundle
from smg.control.metricfold import MetricFolder
from smg.control.pd_probe import probe_bootstrap
from smg.control.registry import (
    Registry,
    WorkerRecord,
    aggregate_loads,
    pd_window,
    unsupported_reason,
)
from smg.control.wasm_admin import WasmAdmin
from smg.control.worker_state import Event, HealthThresholds, WorkerStatus, is_terminal
from smg.dataplane import admission
from smg.dataplane.breaker import STATE_NAMES
from smg.discovery.reconcile import Reconciler, reserved_label
from smg.dp import DP_DISCOVERY_INTERVAL_S, NOT_SGLANG, dp_answer, dp_url
from smg.history import ipc as history_ipc
from smg.history.memory import MemoryStore
from smg.httpwire import HttpError, error_body, invalid_url
from smg.policies.bucket import MAX, BucketAdjuster, run_adjuster
from smg.policies.registry import needs_backend_loads
from smg.promtext import Family, Sample
from smg.shm import layout
from smg.shm.health import FLAG_STALLED, Transition, blocks_for
from smg.shm.readiness import LIVENESS_BODY, LIVENESS_CONTENT_TYPE, readiness
from smg.shm.stash import Stash
from smg.workers_spec import (
    WorkerSpec,
    apply_worker_patch,
    parse_worker_patch,
    parse_worker_spec,
    replaced_worker_spec,
    validate_worker_spec,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from smg.policies.shared import SharedRouting
    from smg.shm.table import WorkerTable

log = logging.getLogger("smg.control")

AdminAnswer = tuple[int, list[tuple[str, str]], bytes]
_JSON = [("content-type", "application/json")]
# The admin routes' methods (HEAD is answered as GET), as 1.13's router lists them in
# `allow` when another method comes.
_ADMIN_ALLOW = {
    "/workers": "POST,GET,HEAD",
    "/get_loads": "GET,HEAD",
    "/flush_cache": "POST",
    "/start_profile": "POST",
    "/stop_profile": "POST",
}
_WORKER_ALLOW = "GET,HEAD,PUT,PATCH,DELETE"  # /workers/{id}, as 1.13
# 1.13's refusals of a PUT /workers/{id} (its WorkerService::replace_worker).
_PUT_DP_AWARE = (
    "Worker '{url}' belongs to a data-parallel group. PUT is not supported for "
    "data-parallel workers. Use DELETE + POST instead."
)
_PUT_URL_MISMATCH = (
    "URL mismatch: worker has URL '{url}' but request body has '{new}'. URL changes are "
    "not supported via PUT. Use DELETE + POST instead."
)
# Every data-plane process is scraped this often (and at each /metrics request), so that
# a process that dies without pushing its final numbers loses at most this much.
DATAPLANE_SCRAPE_SECS = 2.0


def _dp_expandable(spec: WorkerSpec) -> bool:
    """Whether --dp-aware expands this worker: a self-hosted engine, HTTP (the rank goes
    into the JSON body) or gRPC (into the GenerateRequest's data_parallel_rank)."""
    return spec.connection_mode in ("http", "grpc") and not external.is_external(spec)


def _one_per_engine(records: Iterable[WorkerRecord]) -> list[WorkerRecord]:
    """The first worker of each engine (spec.url): a --dp-aware engine's rank workers
    share its cache and profiler, so /flush_cache and start/stop_profile reach it once.
    1.13 calls the engine once per rank (checked on the binary: two start_profile for a
    dp_size 2 engine), which SGLang's profiler refuses past the first (docs/flags.md)."""
    seen: set[str] = set()
    out: list[WorkerRecord] = []
    for record in records:
        if record.spec.url not in seen:
            seen.add(record.spec.url)
            out.append(record)
    return out


def _pd_window_family(records: Iterable[WorkerRecord]) -> Family:
    """1.13's `smg_pd_admission_window{worker}` (decode workers, PD mode)."""
    samples = [
        Sample("", [("worker", record.url)], pd_window(record))
        for record in records
        if record.spec.worker_type == "decode"
    ]
    return Family(
        "smg_pd_admission_window",
        "gauge",
        "Running window the PD admission gate bounds a decode worker by; 0 when the engine "
        "reports none and admission is off for that worker",
        samples,
    )


class ControlPlane:
    def __init__(
        self,
        cfg: GatewayConfig,
        table: WorkerTable,
        root_pid: int,
        processes: int,
        initial_specs: list[WorkerSpec],
        stash: Stash | None = None,
        shared: SharedRouting | None = None,
    ) -> None:
        self.cfg = cfg
        self.shared = shared  # routing state of every process (the bucket boundaries' writer)
        self.pd_probe_failures = 0  # prefill bootstrap ports that refused the probe
        self.bucket_adjuster: BucketAdjuster | None = None  # --prefill-policy bucket
        self.table = table
        self.root_pid = root_pid
        self.processes = processes
        self.initial_specs = initial_specs
        self.registry = Registry(
            table,
            HealthThresholds(
                success_threshold=cfg.health_success_threshold,
                failure_threshold=cfg.health_failure_threshold,
            ),
            health_check_disabled=cfg.disable_health_check,
            aliases=model_aliases(cfg),
            overload_limits=_overload_limits(cfg),
        )
        # Breakers, stalls and overload flags live in the table's health blocks; this
        # process times them out (open -> half-open), sweeps stalls and records contact.
        self.health = blocks_for(table, cfg)
        self.cb_transitions: dict[tuple[str, str, str], int] = {}  # (worker, from, to)
        self._cb_seen: dict[int, int] = {}  # row -> breaker state last logged
        self._stall_seen: dict[int, bool] = {}
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.health_checks: dict[tuple[str, str], int] = {}
        # gRPC workers' channels (by worker id), made in this process on first use.
        self.grpc_probes: dict[str, GrpcProbe] = {}
        self._grpc_tls: Any | None = None
        # gRPC workers whose tokenizer bundle failed, with the last reason logged (so a
        # worker that keeps failing the same way is logged once at ERROR).
        self._bundle_errors: dict[str, str] = {}
        self._stopping = False
        # Start-up workers whose first probe has not ended yet (None: the round is over, or
        # a previous control plane finished it): G_FIRST_HEALTH_ROUND is set once it empties.
        self._first_round: set[str] | None = None
        # The folded totals of gone data-plane processes survive this process in `stash`
        # (shared memory the supervisor made): a replacement control plane starts from them.
        self.stash = stash
        self.metric_folder = MetricFolder.from_state(stash.read() if stash else b"")
        self._scrape_seq = 0
        # Admin-route policy and JWKS cache, built for the config they were made from.
        self._cp_auth: (
            tuple[GatewayConfig, cpauth.ControlPlaneAuth, cpauth.JwksCache | None, Any] | None
        ) = None
        # External workers' refreshes: in flight by (provider, key digest), shared by
        # concurrent callers; and when each (worker, key digest) was last asked.
        self._refreshes: dict[tuple[str | None, bytes], asyncio.Future[int]] = {}
        self._refreshed_at: dict[tuple[str, bytes], float] = {}
        # --history-backend memory: the one store every data plane reaches over IPC (it
        # lives as long as this process; a replaced control plane starts empty).
        self.history: MemoryStore | None = (
            MemoryStore.from_config(cfg) if cfg.history_backend == "memory" else None
        )
        # POST/GET /wasm, DELETE /wasm/{id}: modules published with the directory.
        self.wasm_admin = WasmAdmin(self.registry, cfg.enable_wasm, root_pid)
        # Service discovery's only way into the registry (smg.discovery).
        self.reconciler = Reconciler(
            self.registry,
            self._register,
            self._drain_and_remove,
            self._spawn,
            drain_wait_secs=float(cfg.shutdown_grace_period_secs),
            # 1.13 probes a bare discovered host:port within the health-check timeout.
            detect_timeout_secs=float(cfg.health_check_timeout_secs),
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        # https:// workers are checked with the data plane's trust (--ca-cert-paths, else
        # the system store) and see our --client-cert-path: a worker whose certificate does
        # not verify fails its health checks and never becomes ready.
        from smg.tlsconf import worker_context_for

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=256,
                force_close=False,
                keepalive_timeout=3.0,
                ssl=worker_context_for(self.cfg),
            ),
            auto_decompress=True,
        )
        await self._start_metrics_server()
        if self.cfg.health_check_port:
            await self._start_probe_server(self.cfg.health_check_port)
        first_round_word = self.table.global_offset(layout.G_FIRST_HEALTH_ROUND)
        if not self.table.atomic.load_u64(first_round_word):
            self._first_round = set()
        restored = self.registry.restore()
        if restored:
            log.warning("control plane restarted: took over %d worker(s)", restored)
            for record in list(self.registry.workers.values()):
                if record.status == WorkerStatus.DRAINING:
                    self._spawn(self._drain_and_remove(record))
                else:
                    if self._first_round is not None:
                        self._first_round.add(record.worker_id)
                    if record.external and not record.discovered:
                        self._spawn(self._onboard_external(record))
                    else:
                        self._spawn(self._health_loop(record))
        # The start-up workers are registered once: after that the table is the truth (a
        # worker removed since must not come back when this process is replaced).
        if not self.registry.seeded:
            for spec in self.initial_specs:
                spec = external.startup_spec(spec, self.cfg.backend)
                if self.cfg.dp_aware and _dp_expandable(spec):
                    self._register_dp_later(spec)  # url@rank workers once dp_size is known
                    continue
                if spec.url in self.registry.by_url:
                    continue
                try:
                    record = self._register(spec)
                except HttpError as exc:
                    log.error("worker %s not registered: %s", spec.url, exc.message)
                    continue
                if self._first_round is not None:
                    self._first_round.add(record.worker_id)
            self.registry.mark_seeded()
        # The tasks above have not run yet (no await since): none can have ended the round.
        self._check_first_round()
        share = self.shared.bucket if self.shared is not None else None
        if share is not None and self.cfg.pd_disaggregation and self.cfg.prefill_policy == "bucket":
            # The bucket boundaries' one writer (smg.policies.bucket).
            adjuster = BucketAdjuster(share, float(self.cfg.bucket_adjust_interval_secs))
            self.bucket_adjuster = adjuster
            first_round = self.table.global_offset(layout.G_FIRST_HEALTH_ROUND)
            started = lambda: bool(self.table.atomic.load_u64(first_round))  # noqa: E731
            self._spawn(run_adjuster(adjuster, self.registry.prefill_workers, started))
        self._spawn(self._load_loop())
        self._spawn(self._dataplane_scrape_loop())
        self._spawn(self._health_tick_loop())
        provider = discovery.provider_coroutine(self.cfg, self.reconciler)
        if provider is not None:
            self._spawn(provider)
        # Served last: the supervisor counts the control plane ready (and prints SMG_READY)
        # once this socket answers, so an admin call from then on sees the start-up workers.
        # Keep references: an unreferenced server object is collected and closed.
        self.ipc_server = await ipc.serve(ipc.control_plane_address(self.root_pid), self.on_ipc)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self.tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()
        for probe in list(self.grpc_probes.values()):
            await probe.close()
        self.grpc_probes.clear()
        # SIGTERM reaches the control plane at shutdown only, after the data planes stopped.
        self.wasm_admin.cleanup()

    async def _start_metrics_server(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        runner = self.metrics_runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host = prometheus_bind_host(self.cfg)
        site = web.TCPSite(runner, host, self.cfg.prometheus_port, reuse_address=True)
        await site.start()

    async def _start_probe_server(self, port: int) -> None:
        """--health-check-port: liveness/readiness on a listener of their own, in this
        process, so probes are answered even when every data-plane process is saturated."""
        app = web.Application()
        app.router.add_get("/liveness", self._liveness)
        app.router.add_get("/health", self._liveness)
        app.router.add_get("/readiness", self._readiness)
        runner = self.probe_runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.cfg.host, port, reuse_address=True).start()

    async def _liveness(self, _request: web.Request) -> web.Response:
        return web.Response(body=LIVENESS_BODY, headers={"content-type": LIVENESS_CONTENT_TYPE})

    async def _readiness(self, _request: web.Request) -> web.Response:
        _generation, directory = self.table.read_directory()
        status, body = readiness(self.table, directory.entries, pd=self.cfg.pd_disaggregation)
        return web.Response(body=body, status=status, content_type="application/json")

    # --- worker lifecycle -----------------------------------------------------------------------

    def _register(
        self, spec: WorkerSpec, worker_id: str | None = None, dp: tuple[int, int] | None = None
    ) -> WorkerRecord:
        record = self.registry.add(spec, worker_id, dp)
        log.info("worker %s registered as %s (row %d)", record.url, record.worker_id, record.row)
        if spec.worker_type == "prefill":  # 1.13 probes in any mode
            self._spawn(self._probe_bootstrap(spec))
        self._spawn(self._onboard_external(record) if record.external else self._onboard(record))
        return record

    async def _probe_bootstrap(self, spec: WorkerSpec) -> None:
        if not await probe_bootstrap(spec):
            self.pd_probe_failures += 1

    async def _onboard_external(self, record: WorkerRecord) -> None:
        """An external worker: its models discovered (retried each interval until
        --worker-startup-timeout-secs; Rust retries the step), then Ready, or probed
        when its spec turned health checks on. No load scrapes: a provider has no loads."""
        try:
            while not record.discovered:
                if self._stopping or self.registry.get(record.worker_id) is not record:
                    return
                started = time.monotonic()
                if await self._discover_external(record, None):
                    break
                if started - record.registered > self.cfg.worker_startup_timeout_secs:
                    log.error(
                        "external worker %s: no model list within %s s",
                        record.spec.url,
                        self.cfg.worker_startup_timeout_secs,
                    )
                    self._transition(record, Event.STARTUP_TIMEOUT)
                    return
                await asyncio.sleep(
                    max(0.0, started + self.probe_interval(record) - time.monotonic())
                )
            await self._health_loop(record)
        finally:
            self._first_probe_ended(record)

    async def _discover_external(self, record: WorkerRecord, credential: str | None) -> bool:
        """GET /v1/models on an external worker with `credential` (a caller's key) else its
        discovery key; True when the list was had (stored: replacing the worker's own list,
        or added to it when found with a caller's key)."""
        assert self.session is not None and record.provider is not None
        key = credential or external.discovery_key(record.provider, record.spec.api_key, os.environ)
        try:
            found = await external.fetch_models(
                self.session,
                record.spec.url,
                record.provider,
                key,
                float(self.cfg.health_check_timeout_secs),
            )
        except external.DiscoveryError as exc:
            log.warning("external worker %s: model discovery failed: %s", record.spec.url, exc)
            return False
        if self.registry.get(record.worker_id) is not record:
            return False
        ids = [model["id"] for model in found]
        if credential is not None:
            ids = external.merge_models(record.models, ids)
        if not ids:
            log.warning("external worker %s lists no models", record.spec.url)
            return False
        if not record.discovered or tuple(ids) != record.models:
            self.registry.set_discovery(record, external.ENGINE, ids, {})
            log.info("external worker %s serves %d model id(s)", record.spec.url, len(ids))
        return True

    async def _onboard(self, record: WorkerRecord) -> None:
        """Discover the backend, then probe at once (not after a full interval) and on."""
        try:
            if not await self._discover(record, keep_unknown=True):
                return
            self._spawn(self._scrape(record))
            await self._health_loop(record)
        finally:
            self._first_probe_ended(record)

    def _first_probe_ended(self, record: WorkerRecord) -> None:
        """A start-up worker had its first probe (passed or failed), or its onboarding
        ended without one (discovery gave up, removed, stopping)."""
        if self._first_round is not None:
            self._first_round.discard(record.worker_id)
            self._check_first_round()

    def _register_dp_later(self, spec: WorkerSpec) -> None:
        """--dp-aware: register `spec` as one worker per DP rank once its engine reports
        its dp_size; the first health round waits for it (a placeholder in the round)."""
        token = f"dp:{spec.url}"
        if self._first_round is not None:
            self._first_round.add(token)
        self._spawn(self._register_dp(spec, token))

    async def _register_dp(self, spec: WorkerSpec, token: str | None) -> None:
        """Ask the engine's /server_info for dp_size (retrying while it starts, up to
        --worker-startup-timeout-secs, as 1.13 retries its DP discovery), then register
        `url@0` .. `url@{dp_size-1}`. An engine that never reports one is not registered."""
        assert self.session is not None
        deadline = time.monotonic() + float(self.cfg.worker_startup_timeout_secs)
        key = spec.api_key or self.cfg.api_key
        timeout = float(self.cfg.health_check_timeout_secs)
        size: int | None = None
        grpc = spec.connection_mode == "grpc"
        try:
            while not self._stopping:
                if grpc:
                    size = await self._grpc_dp_size(spec, timeout)
                else:
                    answer = await probes.server_info_answer(self.session, spec.url, key, timeout)
                    size = dp_answer(answer)
                if size is not None:
                    break
                if time.monotonic() >= deadline:
                    source = "GetServerInfo" if grpc else "/server_info"
                    log.error("worker %s not registered: no dp_size from %s", spec.url, source)
                    if grpc and not any(
                        r.spec.url == spec.url for r in self.registry.workers.values()
                    ):
                        await self._close_grpc_url(spec.url)
                    return
                await asyncio.sleep(DP_DISCOVERY_INTERVAL_S)
            if size == NOT_SGLANG:
                log.warning("worker %s has no /server_info: not DP-aware, one worker", spec.url)
                if spec.url not in self.registry.by_url:
                    record = self._register(spec)
                    if self._first_round is not None:
                        self._first_round.add(record.worker_id)
                return
            assert size is not None
            log.info("worker %s: dp_size %d, one worker per rank", spec.url, size)
            for rank in range(size):
                if dp_url(spec.url, rank) in self.registry.by_url:
                    continue
                try:
                    record = self._register(spec, dp=(rank, size))
                except HttpError as exc:
                    log.error("worker %s not registered: %s", dp_url(spec.url, rank), exc.message)
                    continue
                if self._first_round is not None:
                    self._first_round.add(record.worker_id)
        finally:
            if self._first_round is not None and token is not None:
                self._first_round.discard(token)
                self._check_first_round()

    def _check_first_round(self) -> None:
        if self._first_round is None or self._first_round:
            return
        self._first_round = None
        self.table.atomic.store_u64(self.table.global_offset(layout.G_FIRST_HEALTH_ROUND), 1)
        log.info("first health round done")

    def _health_setting(self, record: WorkerRecord, name: str, default: int) -> float:
        """A per-worker `health` override from the spec, else the gateway-wide flag."""
        health = record.spec.health
        value = getattr(health, name) if health is not None else None
        return float(default if value is None else value)

    def probe_interval(self, record: WorkerRecord) -> float:
        interval = self._health_setting(
            record, "check_interval_secs", self.cfg.health_check_interval_secs
        )
        if record.status == WorkerStatus.PENDING:
            interval = min(float(self.cfg.worker_startup_check_interval), interval)
        return interval

    def probe_timeout(self, record: WorkerRecord) -> float:
        return self._health_setting(record, "timeout_secs", self.cfg.health_check_timeout_secs)

    async def _health_loop(self, record: WorkerRecord) -> None:
        """One worker's probes on its own schedule, as the Rust SMG runs them: the next
        probe starts one interval after the previous one started, or as soon as it ended
        when it took longer (a hung worker is probed back to back, each bounded by the
        timeout). Other workers' loops are independent, so a slow probe delays no one.
        Interval, timeout and thresholds are read each round, so a PATCH of the worker's
        `health` applies from its next probe."""
        try:
            await self._probe_rounds(record)
        finally:
            self._first_probe_ended(record)

    async def _probe_rounds(self, record: WorkerRecord) -> None:
        while (
            not self._stopping
            and self.registry.get(record.worker_id) is record
            and not is_terminal(record.status)
        ):
            started = time.monotonic()
            if not record.health_checked(self.cfg.disable_health_check):
                # Probing turned off for this worker (a PATCH): it is taken as healthy, as a
                # worker registered without health checks is (a gRPC one once its model facts
                # and tokenizer are in).
                if _is_grpc(record) and not record.discovered:
                    await self._discover(record, keep_unknown=False)
                if await self._grpc_ready(record):
                    self._transition(record, Event.CONNECTED)
            elif (
                record.status == WorkerStatus.PENDING
                and started - record.registered > self.cfg.worker_startup_timeout_secs
            ):
                log.error(
                    "worker %s did not become healthy within %s s",
                    record.spec.url,
                    self.cfg.worker_startup_timeout_secs,
                )
                self._transition(record, Event.STARTUP_TIMEOUT)
                continue
            else:
                await self._probe(record)
            self._first_probe_ended(record)
            delay = started + self.probe_interval(record) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _probe(self, record: WorkerRecord) -> None:
        assert self.session is not None
        if _is_grpc(record):
            ok = await self._grpc_probe(record).health(self.probe_timeout(record))
        elif record.external:
            # Probed only when its spec asks; its own key in its provider's header.
            assert record.provider is not None
            answer = await probes.get_with_headers(
                self.session,
                record.spec.url.rstrip("/") + self.cfg.health_check_endpoint,
                external.key_headers(record.provider, record.spec.api_key),
                self.probe_timeout(record),
            )
            ok = answer is not None and 200 <= answer[0] < 300
        else:
            ok = await probes.probe_health(
                self.session,
                record.spec.url,
                self.cfg.health_check_endpoint,
                self._key(record),
                self.probe_timeout(record),
            )
        if self.registry.get(record.worker_id) is not record or is_terminal(record.status):
            return
        key = (record.spec.worker_type, "success" if ok else "failure")
        self.health_checks[key] = self.health_checks.get(key, 0) + 1
        if ok:
            # A passed probe is contact: it ends a stall (a failed one is left to the health
            # state machine, as in SMG: a slow probe is not unreachability).
            self._contact(record)
        if ok and not record.discovered and not record.external:
            if _is_grpc(record):
                # A gRPC worker is routable only with its model facts (and tokenizer).
                await self._discover(record, keep_unknown=False)
                if self.registry.get(record.worker_id) is not record:
                    return
            else:
                self._spawn(self._discover(record, keep_unknown=False))
        if ok and record.status == WorkerStatus.PENDING and not await self._grpc_ready(record):
            # Readiness waits for the model facts and the tokenizer, as in the Rust SMG: the
            # worker stays Pending (until --worker-startup-timeout-secs) and is asked again
            # at the next probe.
            return
        # A Pending worker that answers has completed registration (Rust's registration
        # workflow activates it at once); later probes follow the thresholds.
        if ok and record.status == WorkerStatus.PENDING:
            event = Event.CONNECTED
        else:
            event = Event.PROBE_OK if ok else Event.PROBE_FAILED
        self._transition(record, event)

    def _transition(self, record: WorkerRecord, event: Event) -> None:
        before = record.status
        if not self.registry.apply(record, event):
            return
        after = record.status
        # Routine moves (to Ready) are INFO; a worker turning unhealthy is WARNING.
        level = logging.WARNING if after in _UNHEALTHY else logging.INFO
        log.log(level, "worker %s: %s -> %s", record.url, before.name, after.name)
        self._after_status_change(record)

    async def _discover(self, record: WorkerRecord, *, keep_unknown: bool) -> bool:
        """Ask the worker what it is and serves; False if it was removed meanwhile.
        `keep_unknown=False` leaves an earlier answer alone when this one says nothing."""
        assert self.session is not None
        if _is_grpc(record):
            return await self._discover_grpc(record)
        info = await probes.discover_backend(
            self.session, record.spec.url, self._key(record), self.cfg.health_check_timeout_secs
        )
        if self.registry.get(record.worker_id) is not record:
            return False
        if keep_unknown or info.engine != "unknown":
            self.registry.set_discovery(
                record, info.engine, info.model_ids, info.server_info, info.max_model_len
            )
        return True

    # --- gRPC workers ------------------------------------------------------------------------

    def _grpc_probe(self, record: WorkerRecord) -> GrpcProbe:
        return self._grpc_probe_for(record.spec)

    def _grpc_probe_for(self, spec: WorkerSpec) -> GrpcProbe:
        """The engine's probe, keyed by its URL: a --dp-aware engine's rank workers share
        one channel (they are one engine), as do its DP discovery and its probes."""
        probe = self.grpc_probes.get(spec.url)
        if probe is None:
            secure = spec.url.startswith("grpcs://")
            probe = GrpcProbe(
                spec.url,
                tls=self._grpc_tls_for() if secure else None,
                api_key=spec.api_key,  # the worker's own key only (Rust sends none)
            )
            self.grpc_probes[spec.url] = probe
        return probe

    async def _grpc_dp_size(self, spec: WorkerSpec, timeout: float) -> int | None:
        """--dp-aware over gRPC: the dp_size the engine's GetServerInfo reports, None
        while it does not answer or reports none (1.13's discover_dp_info fails then and
        its workflow retries)."""
        found = await self._grpc_probe_for(spec).discover(timeout)
        if found is None:
            return None
        size = found[1].get("dp_size")
        return size if isinstance(size, int) and size >= 1 else None

    def _grpc_tls_for(self) -> Any | None:
        """The worker-side TLS material (--ca-cert-paths, --client-cert-path/-key-path) for
        grpcs:// workers, read once (what the HTTP session trusts and presents)."""
        if self._grpc_tls is None:
            from smg import tlsconf

            material = tlsconf._inherited_worker_tls  # the supervisor read it before the fork
            self._grpc_tls = material if material is not None else tlsconf.load_worker_tls(self.cfg)
        return self._grpc_tls

    async def _discover_grpc(self, record: WorkerRecord) -> bool:
        """detect_backend + GetModelInfo (+ GetServerInfo): engine, models (the served
        model name, else the model path), context length, the directory's GrpcModelInfo."""
        found = await self._grpc_probe(record).discover(float(self.cfg.health_check_timeout_secs))
        if self.registry.get(record.worker_id) is not record:
            return False
        if found is None:  # not up yet: the next passed probe asks again
            return True
        info, server_info = found
        if record.grpc is not None and record.grpc.tokenizer_dir:
            # A bundle fetched before (this worker answered before, or a replaced control
            # plane restored it) stays.
            info = msgspec.structs.replace(info, tokenizer_dir=record.grpc.tokenizer_dir)
        model = info.served_model_name or info.model_path
        self.registry.set_discovery(
            record,
            info.backend,
            [model] if model else [],
            server_info,
            info.max_context_length or None,
            grpc=info,
        )
        return True

    async def _grpc_ready(self, record: WorkerRecord) -> bool:
        """Whether a gRPC worker may turn Ready: its model facts are known and, when the
        gateway has no local tokenizer (and autoload is on), its tokenizer bundle is
        fetched, checked and unpacked. Any HTTP worker may."""
        if not _is_grpc(record):
            return True
        if record.grpc is None:
            return False
        if record.grpc.tokenizer_dir or not needs_bundle(self.cfg):
            return True
        url = record.spec.url
        try:
            path = await self._grpc_probe(record).fetch_tokenizer(
                None, float(self.cfg.health_check_timeout_secs)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            level = logging.ERROR if self._bundle_errors.get(url) != reason else logging.DEBUG
            self._bundle_errors[url] = reason
            log.log(
                level,
                "worker %s: tokenizer bundle not loaded (%s); the worker stays Pending until "
                "it loads (or start smg with --tokenizer-path / --model-path)",
                url,
                reason,
            )
            return False
        if self.registry.get(record.worker_id) is not record:
            return False
        self._bundle_errors.pop(url, None)
        self.registry.set_tokenizer_dir(record, str(path))
        log.info("worker %s: tokenizer bundle unpacked at %s", url, path)
        return True

    async def _close_grpc(self, record: WorkerRecord) -> None:
        url = record.spec.url
        if any(r.spec.url == url for r in self.registry.workers.values()):
            return  # another rank worker of the same engine still uses the channel
        await self._close_grpc_url(url)

    async def _close_grpc_url(self, url: str) -> None:
        probe = self.grpc_probes.pop(url, None)
        self._bundle_errors.pop(url, None)
        if probe is not None:
            await probe.close()

    def _after_status_change(self, record: WorkerRecord) -> None:
        # As in the Rust SMG, only a Failed worker is removed (a NotReady one may recover).
        if remove_unhealthy(self.cfg) and record.status == WorkerStatus.FAILED:
            log.warning("removing unhealthy worker %s", record.spec.url)
            self._spawn(self._drain_and_remove(record))

    async def _scrape(self, record: WorkerRecord) -> None:
        assert self.session is not None
        if _is_grpc(record):
            await self._scrape_grpc(record)
            return
        found = await probes.scrape_load_from(
            self.session,
            record.spec.url,
            record.engine,
            self._key(record),
            self.cfg.health_check_timeout_secs,
            record.load_endpoints,
        )
        if self.registry.get(record.worker_id) is not record:
            return
        if found is None:
            record.load_endpoints = None  # try every endpoint again next time
            if record.load.valid:
                log.warning("worker %s: load endpoint gave no usable answer", record.spec.url)
            self.registry.set_load(record, None)
            return
        load, endpoint = found
        record.load_endpoints = (endpoint,)
        self.registry.set_load(record, load)
        self._contact(record)

    async def _scrape_grpc(self, record: WorkerRecord) -> None:
        """GetLoads -> the row's backend load (what the policies and /get_loads read)."""
        load = await self._grpc_probe(record).load(float(self.cfg.health_check_timeout_secs))
        if self.registry.get(record.worker_id) is not record:
            return
        if load is None or not load.valid:
            if record.load.valid:
                log.warning("worker %s: GetLoads gave no usable answer", record.spec.url)
            self.registry.set_load(record, None)
            return
        self.registry.set_load(record, load)
        self._contact(record)

    async def _load_loop(self) -> None:
        interval = float(self.cfg.load_monitor_interval)
        if interval <= 0:
            return
        # As in SMG 1.13: overload protection and a policy that reads the loads need them,
        # so they are polled even under --disable-load-monitoring.
        always = loads_always_polled(self.cfg)
        while not self._stopping:
            await asyncio.sleep(interval)
            # A model routed by its workers' `policy` label (power_of_two, least_load)
            # needs them too, whatever --policy is.
            if not always and not any(
                _policy_needs_loads(record.spec.labels.get("policy", ""))
                for record in self.registry.workers.values()
            ):
                continue
            for record in list(self.registry.workers.values()):
                if record.external:
                    continue  # a provider's API reports no load
                if record.status in (WorkerStatus.READY, WorkerStatus.NOT_READY):
                    self._spawn(self._scrape(record))

    def _contact(self, record: WorkerRecord) -> None:
        if self.registry.get(record.worker_id) is not record:
            return
        self._count_transition(record, self.health.contact(record.row, time.monotonic_ns()))

    def _count_transition(self, record: WorkerRecord, transition: Transition | None) -> None:
        if transition is None:
            return
        key = (record.spec.url, STATE_NAMES[transition[0]], STATE_NAMES[transition[1]])
        self.cb_transitions[key] = self.cb_transitions.get(key, 0) + 1

    async def _health_tick_loop(self) -> None:
        """Every 100 ms: open breakers whose timeout passed go half-open (the data planes do
        it too when a request comes first), workers silent since a transport failure are
        flagged stalled, and changes are logged."""
        breaker_on = not self.cfg.disable_circuit_breaker
        while not self._stopping:
            await asyncio.sleep(0.1)
            try:
                self.health_tick(breaker_on)
            except Exception:  # the loop must survive whatever one round met
                log.exception("health tick failed")

    def health_tick(self, breaker_on: bool = True) -> None:
        health = self.health
        now = time.monotonic_ns()
        now_ms = now // 1_000_000
        for record in list(self.registry.workers.values()):
            row = record.row
            if breaker_on:
                self._count_transition(record, health.tick(row, now_ms))
            health.sweep(row, now)
            state = health.state(row)
            if state != self._cb_seen.get(row, 0):
                level = logging.WARNING if state else logging.INFO
                log.log(
                    level,
                    "worker %s: circuit breaker %s -> %s",
                    record.spec.url,
                    STATE_NAMES[self._cb_seen.get(row, 0)],
                    STATE_NAMES[state],
                )
                self._cb_seen[row] = state
            stalled = bool(health.flags(row) & FLAG_STALLED)
            if stalled != self._stall_seen.get(row, False):
                log.log(
                    logging.WARNING if stalled else logging.INFO,
                    "worker %s: %s",
                    record.spec.url,
                    "stalled: no contact since a transport failure, left out of routing"
                    if stalled
                    else "answered again: back in routing",
                )
                self._stall_seen[row] = stalled

    async def _drain_and_remove(self, record: WorkerRecord) -> None:
        """No new requests (status Draining), let in-flight ones finish, then free the row."""
        if record.status != WorkerStatus.DRAINING:
            self.registry.set_status(record, WorkerStatus.DRAINING)
        deadline = time.monotonic() + float(self.cfg.shutdown_grace_period_secs)
        while self.table.in_flight(record.row) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.table.in_flight(record.row)
        if left > 0:
            log.warning(
                "worker %s removed with %d request(s) still in flight", record.spec.url, left
            )
        self.registry.remove(record.worker_id)
        await self._close_grpc(record)
        log.info("worker %s removed", record.spec.url)

    def _key(self, record: WorkerRecord) -> str | None:
        # The gateway's own key is never sent to an external worker (a provider).
        if record.external:
            return record.spec.api_key
        return record.spec.api_key or self.cfg.api_key

    def _gateway_key(self, key: str) -> bool:
        return key == self.cfg.api_key or key in tenant_keys(self.cfg)

    # --- external workers: refresh on a miss, /v1/models fan-out ------------------------------

    def _external_records(self) -> list[WorkerRecord]:
        return [
            r
            for r in self.registry.workers.values()
            if r.external and r.status != WorkerStatus.DRAINING
        ]

    async def _external_refresh(self, message: dict[str, Any]) -> dict[str, Any]:
        """IPC `external_refresh`: re-discover the external workers of `provider` (all when
        None) with the caller's key where it may go, else each worker's own discovery key;
        bounded by external.OP_TIMEOUT_SECS. Concurrent calls for the same provider and key
        share one run."""
        provider = message.get("provider")
        credential = message.get("credential")
        if provider is not None and not isinstance(provider, str):
            return {"error": "provider must be a string or null"}
        if credential is not None and (not isinstance(credential, str) or not credential):
            return {"error": "credential must be a non-empty string or null"}
        if credential is not None and self._gateway_key(credential):
            credential = None  # never sent to a provider
        key = (provider, external.key_digest(credential))
        running = self._refreshes.get(key)
        if running is None:
            running = asyncio.ensure_future(self._refresh(provider, credential))
            self._refreshes[key] = running
            running.add_done_callback(lambda _f: self._refreshes.pop(key, None))
        return {"refreshed": await asyncio.shield(running)}

    async def _refresh(self, provider: str | None, credential: str | None) -> int:
        records = self._external_records()
        known = {r.provider for r in records if r.provider is not None}
        now = time.monotonic()
        if len(self._refreshed_at) > 4096:  # one entry per worker and caller key: bounded
            self._refreshed_at = {
                k: t
                for k, t in self._refreshed_at.items()
                if now - t < external.REFRESH_MIN_INTERVAL_SECS
            }
        jobs: list[tuple[WorkerRecord, str | None]] = []
        for record in records:
            assert record.provider is not None
            if (provider is not None and record.provider != provider) or record.spec.model_id:
                continue
            own = external.discovery_key(record.provider, record.spec.api_key, os.environ)
            if own is None:
                continue  # a wildcard worker serves every model already
            use = (
                credential
                if credential is not None
                and external.key_may_go(credential, record.provider, known)
                else None
            )
            throttle = (record.worker_id, external.key_digest(use))
            if now - self._refreshed_at.get(throttle, -1e9) < external.REFRESH_MIN_INTERVAL_SECS:
                continue
            self._refreshed_at[throttle] = now
            jobs.append((record, use))
        if not jobs:
            return 0
        before = {record.worker_id: record.models for record, _ in jobs}

        async def one(record: WorkerRecord, use: str | None) -> None:
            await self._discover_external(record, use)

        try:
            await asyncio.wait_for(
                asyncio.gather(*(one(r, use) for r, use in jobs)), external.OP_TIMEOUT_SECS
            )
        except TimeoutError:
            log.warning("external refresh: not all providers answered within the bound")
        return sum(1 for record, _ in jobs if record.models != before[record.worker_id])

    async def _external_models(self, message: dict[str, Any]) -> dict[str, Any]:
        """IPC `external_models`: the caller's key's view of the providers' models (the
        BYOK `/v1/models` fan-out): GET /v1/models on each distinct external URL the key
        may go to, concurrently, bounded; the union, deduplicated by id."""
        credential = message.get("credential")
        header = message.get("header")
        if not isinstance(credential, str) or not credential:
            return {"error": "credential must be a non-empty string"}
        if header not in ("authorization", "x-api-key"):
            return {"error": "header must be 'authorization' or 'x-api-key'"}
        if self._gateway_key(credential):
            return {"data": []}  # a gateway key is never sent to a provider
        assert self.session is not None
        records = self._external_records()
        known = {r.provider for r in records if r.provider is not None}
        targets: dict[str, str] = {}
        for record in records:
            assert record.provider is not None
            if external.key_may_go(credential, record.provider, known):
                targets.setdefault(record.spec.url, record.provider)
        session = self.session

        async def one(url: str, provider: str) -> list[dict[str, Any]]:
            try:
                found = await external.fetch_models(
                    session, url, provider, credential, external.OP_TIMEOUT_SECS
                )
            except external.DiscoveryError as exc:
                log.info("models fan-out: %s", exc)
                return []
            return [
                {
                    "id": m["id"],
                    "object": "model",
                    "created": m["created"] if isinstance(m.get("created"), int) else 0,
                    "owned_by": provider,
                }
                for m in found
            ]

        tasks = [asyncio.ensure_future(one(url, p)) for url, p in targets.items()]
        if tasks:
            await asyncio.wait(tasks, timeout=external.OP_TIMEOUT_SECS)
        data: dict[str, dict[str, Any]] = {}
        for task in tasks:
            if not task.done():
                task.cancel()
                continue
            for model in task.result():
                data.setdefault(model["id"], model)
        return {"data": list(data.values())}

    # --- admin -------------------------------------------------------------------------------------

    async def on_ipc(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return [400, _JSON, error_body(400, "bad_request", "malformed control message")]
        kind = message.get("kind")
        if kind == "final_metrics":
            return self._final_metrics(message)
        if kind == "reload":
            return self._reload(message)
        if kind in ("external_refresh", "external_models"):
            try:
                if kind == "external_refresh":
                    return await self._external_refresh(message)
                return await self._external_models(message)
            except Exception as exc:  # a data plane's call must not break this process
                log.exception("%s failed", kind)
                return {"error": f"{kind} failed: {exc!r}"}
        if kind == "history":
            return await history_ipc.handle(self.history, message)
        if kind == "admin":
            try:
                return await self._judged_admin(message)
            except Exception as exc:  # never let an admin call kill the control plane
                log.exception("admin call failed")
                return [500, _JSON, error_body(500, "internal_error", f"admin call failed: {exc}")]
        return [400, _JSON, error_body(400, "bad_request", "unknown control message")]

    async def _judged_admin(self, message: dict[str, Any]) -> list[Any]:
        """An admin call judged first (keys, roles, JWT, loopback: smg.control.cpauth), run
        when allowed, and written to the audit log when --control-plane-audit-enabled."""
        method, path = message["method"], message["path"]
        fields = cpauth.AuthFields.from_message(message, method)
        policy, jwks = self._admin_auth()
        decision = await cpauth.authorize(policy, jwks, fields)
        if decision.allowed:
            status, headers, body = await self.admin(
                method, path, message.get("query", ""), message["body"]
            )
        else:
            status, headers, body = _error(decision.status, decision.code, decision.message)
            headers = [*headers, *decision.headers]
        if policy.audit:
            code = next((v for k, v in headers if k == "x-smg-error-code"), None)
            details = code if decision.allowed and status >= 400 else None
            cpauth.write_audit(cpauth.audit_event(decision, fields, path, status, details))
        return [status, headers, body]

    def _admin_auth(self) -> tuple[cpauth.ControlPlaneAuth, cpauth.JwksCache | None]:
        """The admin policy of the current configuration (rebuilt after a reload; the JWKS
        cache is kept while the issuer and JWKS URI stay the same)."""
        cached = self._cp_auth
        if cached is not None and cached[0] is self.cfg:
            return cached[1], cached[2]
        policy = cpauth.ControlPlaneAuth.from_config(self.cfg)
        source = (self.cfg.jwt_issuer, self.cfg.jwt_jwks_uri)
        jwks: cpauth.JwksCache | None = None
        if policy.jwt is not None:
            if cached is not None and cached[2] is not None and cached[3] == source:
                jwks = cached[2]
            else:
                jwks = cpauth.JwksCache(_jwks_fetcher(*source))
        self._cp_auth = (self.cfg, policy, jwks, source)
        return policy, jwks

    async def admin(self, method: str, path: str, query: str, body: bytes) -> AdminAnswer:
        if path == "/workers":
            if method == "GET":
                model = parse_qs(query).get("model", [None])[0]
                return _json(200, self.registry.list_infos(model))
            if method == "POST":
                return self._create_worker(body)
            return _method_not_allowed(method, path)
        if path.startswith("/workers/"):
            return self._worker_route(method, path[len("/workers/") :], body)
        if path == "/wasm" or path.startswith("/wasm/"):
            families = None
            if method == "GET" and path == "/wasm":  # executions: the data planes' counts
                await self._scrape_dataplanes()
                families = self.metric_folder.families()
            self.wasm_admin.enabled = self.cfg.enable_wasm  # as reloaded
            return await self.wasm_admin.route(method, path, body, families)
        if path == "/get_loads" and method == "GET":
            return _json(200, self._loads())
        if path == "/flush_cache" and method == "POST":
            return await self._flush_cache()
        if path in ("/start_profile", "/stop_profile") and method == "POST":
            return await self._profile(path[1:], body)
        if path in _ADMIN_ALLOW:
            return _method_not_allowed(method, path)
        return _error(404, "not_found", f"no admin route {method} {path}")

    def _create_worker(self, body: bytes) -> AdminAnswer:
        try:
            spec = parse_worker_spec(body)
        except ConfigError as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        unsupported = unsupported_reason(spec) or _reserved(spec.labels)
        if unsupported:
            return _error(400, "BAD_REQUEST", unsupported)
        if self.cfg.dp_aware and _dp_expandable(spec):
            # The ranks are registered once the engine reports its dp_size; the id answered
            # is the addition's, no worker's (as 1.13's job id under --dp-aware).
            worker_id = str(uuid.uuid4())
            self._spawn(self._register_dp(spec, None))
        else:
            try:
                worker_id = self._register(spec).worker_id
            except HttpError as exc:
                return _error(exc.status, exc.code, exc.message)
        location = f"/workers/{worker_id}"
        return (
            202,
            [*_JSON, ("location", location)],
            orjson.dumps(
                {
                    "status": "accepted",
                    "worker_id": worker_id,
                    "url": spec.url,
                    "location": location,
                    "message": "Worker addition queued for background processing",
                }
            ),
        )

    def _worker_route(self, method: str, raw_id: str, body: bytes) -> AdminAnswer:
        try:
            uuid.UUID(raw_id)
        except ValueError:
            return _error(400, "BAD_REQUEST", f"Invalid worker_id '{raw_id}' (expected UUID)")
        record = self.registry.get(raw_id)
        if record is None:
            return _error(404, "WORKER_NOT_FOUND", f"Worker {raw_id} not found")
        if method == "GET":
            return _json(200, self.registry.info(record))
        if method == "DELETE":
            self._spawn(self._drain_and_remove(record))
            return _json(
                202,
                {
                    "status": "accepted",
                    "worker_id": record.worker_id,
                    "message": "Worker removal queued for background processing",
                },
            )
        if method in ("PATCH", "PUT"):
            try:
                if method == "PUT":
                    spec = parse_worker_spec(body)
                    url = record.spec.url
                    if self.cfg.dp_aware:  # 1.13's refusal, in its words
                        return _error(400, "BAD_REQUEST", _PUT_DP_AWARE.format(url=url))
                    if spec.url != url:
                        message = _PUT_URL_MISMATCH.format(url=url, new=spec.url)
                        return _error(400, "BAD_REQUEST", message)
                    reserved = _reserved(spec.labels)
                    if reserved:
                        return _error(400, "BAD_REQUEST", reserved)
                    # Service discovery's own labels stay: they say the worker is its.
                    own = {k: v for k, v in record.spec.labels.items() if _reserved({k: v})}
                    spec = msgspec.structs.replace(spec, labels={**own, **spec.labels})
                    changed = replaced_worker_spec(record.spec, spec)
                else:
                    patch = parse_worker_patch(body)
                    reserved = _reserved(patch.labels)
                    if reserved:
                        return _error(400, "BAD_REQUEST", reserved)
                    changed = apply_worker_patch(record.spec, patch)
                self.registry.update_spec(record, changed)
            except ConfigError as exc:
                return _error(400, "BAD_REQUEST", str(exc))
            except HttpError as exc:
                return _error(exc.status, exc.code, exc.message)
            return _json(
                202,
                {
                    "status": "accepted",
                    "worker_id": record.worker_id,
                    "message": "Worker update queued for background processing",
                },
            )
        return _method_not_allowed(method, "/workers/" + raw_id, _WORKER_ALLOW)

    def _loads(self) -> dict[str, Any]:
        """`GET /get_loads` in the Rust SMG 1.13 shape: an entry per worker whose engine
        load is known, and their aggregate; `worker_id` and `load` (this gateway's
        in-flight requests) are smg's own."""
        loads = [
            {
                "worker": record.url,
                "worker_type": record.spec.worker_type,
                **self.registry.load_entry(record),
                "worker_id": record.worker_id,
                "load": self.table.in_flight(record.row),
            }
            for record in self.registry.workers.values()
            if record.load.valid
        ]
        return {
            "timestamp": datetime.now(UTC).isoformat(),
            "version": f"smg-{__version__}",
            "dp_rank_count": len(loads),
            "loads": loads,
            "aggregate": aggregate_loads(loads),
        }

    async def _flush_cache(self) -> AdminAnswer:
        """Every engine's cache flushed (once per engine: DP ranks share one); 1.13's
        answer (smg.control.profile.flush_answer) plus smg's per-worker `workers` list."""
        assert self.session is not None
        # External workers (a provider's API) have no cache to flush.
        records = _one_per_engine(r for r in self.registry.workers.values() if not r.external)
        answers = await asyncio.gather(
            *(
                self._grpc_probe(record).flush_cache(30.0)
                if _is_grpc(record)
                else probes.flush_cache(self.session, record.spec.url, self._key(record))
                for record in records
            )
        )
        successful: list[str] = []
        failed: list[tuple[str, str]] = []
        workers = []
        for record, (status, text) in zip(records, answers):
            ok = 200 <= status < 300
            url = record.spec.url
            if ok:
                successful.append(url)
            else:
                failed.append((url, profile.failure_reason("flush_cache", url, status, text)))
            workers.append({"worker": url, "status": status, "ok": ok, "message": text})
        grpc_workers = sum(1 for record in records if _is_grpc(record))
        status, payload = profile.flush_answer(
            len(records) - grpc_workers, grpc_workers, successful, failed
        )
        payload["workers"] = workers
        return _json(status, payload)

    async def _profile(self, operation: str, body: bytes) -> AdminAnswer:
        """Every worker's profiler (or the one `url` names) started or stopped together;
        1.13's answer (smg.control.profile)."""
        try:
            url, options = profile.parse_request(body, operation)
        except profile.ProfileRequestError as exc:
            return _error(exc.status, "invalid_request", exc.message)
        assert self.session is not None
        records = _one_per_engine(
            record
            for record in self.registry.workers.values()
            if (url is None or record.spec.url == url) and not record.external
        )
        timeout = profile.PROFILE_TIMEOUT_SECS
        answers = await asyncio.gather(
            *(
                self._grpc_probe(record).profile(operation, options, timeout)
                if _is_grpc(record)
                else probes.admin_post(
                    self.session,
                    record.spec.url,
                    "/" + operation,
                    self._key(record),
                    timeout,
                    options if operation == "start_profile" else None,
                )
                for record in records
            )
        )
        successful: list[str] = []
        failed: list[tuple[str, str]] = []
        for record, (status, text) in zip(records, answers):
            if 200 <= status < 300:
                successful.append(record.spec.url)
            else:
                reason = profile.failure_reason(operation, record.spec.url, status, text)
                failed.append((record.spec.url, reason))
        log.info("%s on %d worker(s): %d failed", operation, len(records), len(failed))
        status, payload = profile.answer(operation, len(records), successful, failed, url)
        return _json(status, payload)

    # --- metrics -------------------------------------------------------------------------------

    def _health_families(self) -> list[Family]:
        """Breaker state, counters and liveness per worker, read from the shared table (the
        one truth every process routes by); transitions this process made. The data-plane
        processes add their own transitions and outcomes."""
        state: list[Sample] = []
        failures: list[Sample] = []
        successes: list[Sample] = []
        stalled: list[Sample] = []
        overloaded: dict[str, int] = {}
        health = self.health
        for record in self.registry.workers.values():
            worker = [("worker", record.url)]
            state.append(Sample("", worker, health.state(record.row)))
            consecutive_failures, half_open_successes, _trials = health.counts(record.row)
            failures.append(Sample("", worker, consecutive_failures))
            successes.append(Sample("", worker, half_open_successes))
            flags = health.flags(record.row)
            stalled.append(
                Sample("", [*worker, ("reason", "unreachable")], 1 if flags & FLAG_STALLED else 0)
            )
            for model in record.served_models or ("unknown",):
                overloaded.setdefault(model, 0)
                if self.registry.overloaded(record):
                    overloaded[model] += 1
        transitions = [
            Sample("", [("process", "control"), ("worker", w), ("from", a), ("to", b)], value)
            for (w, a, b), value in self.cb_transitions.items()
        ]
        return [
            Family(
                "smg_worker_cb_state",
                "gauge",
                "Circuit breaker state per worker (0=closed, 1=open, 2=half_open)",
                state,
            ),
            Family(
                "smg_worker_cb_consecutive_failures",
                "gauge",
                "Current consecutive failure count per worker",
                failures,
            ),
            Family(
                "smg_worker_cb_consecutive_successes",
                "gauge",
                "Current consecutive success count per worker",
                successes,
            ),
            Family(
                "smg_worker_cb_transitions_total",
                "counter",
                "Circuit breaker state transitions by worker, from, to",
                transitions,
            ),
            Family(
                "smg_worker_stalled",
                "gauge",
                "Workers left out of routing by the liveness tracker, by worker and reason",
                stalled,
            ),
            Family(
                "smg_workers_overloaded",
                "gauge",
                "Workers currently flagged overloaded and excluded from routing, by model",
                [Sample("", [("model", m)], n) for m, n in overloaded.items()],
            ),
        ]

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        await self._scrape_dataplanes()
        families = self.metric_families()
        families.extend(self.supervisor_families())
        if self.cfg.pd_disaggregation or self.pd_probe_failures:
            families.append(self._pd_families())
        if self.bucket_adjuster is not None:
            families.append(_bucket_family(self.bucket_adjuster))
        families.extend(self.metric_folder.families())
        return web.Response(
            body=promtext.render(families).encode("utf-8"),
            headers={
                "content-type": promtext.CONTENT_TYPE,
                "x-smg-metrics-processes": str(self.processes),
            },
        )

    def _pd_families(self) -> Family:
        return Family(  # 1.13's name and help; smg probes over HTTP only (phase probe)
            "smg_pd_rendezvous_failures_total",
            "counter",
            "PD rendezvous failures by leg (the worker type of the leg that failed) and phase: "
            "a bootstrap port that refused the registration probe (probe)",
            [Sample("", [("leg", "prefill"), ("phase", "probe")], self.pd_probe_failures)],
        )

    def _live_dataplanes(self) -> list[tuple[int, int]]:
        """(slot, pid) of every data-plane process serving or draining now."""
        alive = []
        for slot in range(self.table.slots):
            proc = self.table.read_proc(slot)
            if proc.pid and proc.state in (layout.PROC_READY, layout.PROC_DRAINING):
                alive.append((slot, proc.pid))
        return alive

    async def _scrape_dataplanes(self) -> None:
        """Ask every live data-plane process for its series; fold those of processes gone."""
        alive = self._live_dataplanes()
        self._scrape_seq += 1
        seq = self._scrape_seq

        async def scrape(key: tuple[int, int]) -> None:
            try:
                answer = await ipc.call(
                    ipc.dataplane_address(self.root_pid, key[0]), {"kind": "metrics"}, 2.0
                )
                families = promtext.decode_families(answer)
            except Exception as exc:  # stuck or being replaced: its last scrape stands
                log.debug("metrics of data-plane slot %d unavailable: %r", key[0], exc)
                return
            self.metric_folder.update(key, families, seq)

        await asyncio.gather(*(scrape(key) for key in alive))
        # The table again, after the scrapes: a process that exited meanwhile is retired
        # with the numbers it last gave.
        folder = self.metric_folder
        before = len(folder.live)
        folder.sync(set(self._live_dataplanes()))
        if len(folder.live) != before:
            self._save_folded()

    def _save_folded(self) -> None:
        if self.stash is not None and not self.stash.write(self.metric_folder.state()):
            log.warning("folded metric totals are larger than their stash; not saved")

    async def _dataplane_scrape_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(DATAPLANE_SCRAPE_SECS)
            try:
                await self._scrape_dataplanes()
            except Exception as exc:  # the loop must outlive any one scrape
                log.warning("data-plane scrape failed: %r", exc)

    def _final_metrics(self, message: dict[str, Any]) -> dict[str, Any]:
        """A draining data-plane process's last numbers, just before it exits."""
        try:
            key = (int(message["slot"]), int(message["pid"]))
            families = promtext.decode_families(message["families"])
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            return {"ok": False, "error": f"malformed final metrics: {exc}"}
        self.metric_folder.retire(key, families)
        self._save_folded()
        return {"ok": True}

    def supervisor_families(self) -> list[Family]:
        """Counters the root supervisor keeps in the table (it has no loop to serve them)."""
        atomic = self.table.atomic
        restarts = self.table.global_offset(layout.G_DP_RESTARTS)
        reloads = self.table.global_offset(layout.G_CONFIG_RELOADS)
        return [
            Family(
                "smg_dataplane_restarts_total",
                "counter",
                "Data-plane processes replaced, by reason (crash, heartbeat, reload) (smg only)",
                [
                    Sample("", [("reason", reason)], atomic.load_u64(restarts + word))
                    for reason, word in layout.RESTART_WORDS.items()
                ],
            ),
            Family(
                "smg_config_reloads_total",
                "counter",
                "Configuration reloads (SIGHUP) by result (success, failure) (smg only)",
                [
                    Sample("", [("result", result)], atomic.load_u64(reloads + word))
                    for result, word in layout.RELOAD_WORDS.items()
                ],
            ),
            *procmetrics.families(
                self._proc_views(),
                time.monotonic_ns(),  # read after the beats: an age is never understated
                float(self.cfg.dataplane_heartbeat_timeout_secs),
            ),
        ]

    def _proc_views(self) -> list[procmetrics.ProcView]:
        """Every occupied data-plane slot: its listener number, state and last beat."""
        table = self.table
        views = []
        for slot in range(table.slots):
            proc = table.read_proc(slot)
            if proc.pid:
                views.append(
                    procmetrics.ProcView(
                        table.atomic.load_u64(table.proc_word_offset(slot, layout.P_INDEX)),
                        proc.state,
                        table.atomic.load_u64(table.proc_word_offset(slot, layout.P_HEARTBEAT_NS)),
                    )
                )
        return views

    # --- live reload -------------------------------------------------------------------------------

    def _reload(self, message: dict[str, Any]) -> dict[str, Any]:
        """The supervisor's validated new configuration: health checks, thresholds, log
        level, load monitoring read `self.cfg` from now on; `--worker-urls` added are
        registered and removed are drained and removed (workers added through the admin
        API are not in either list and stay)."""
        from smg.logs import set_level
        from smg.reload import worker_list_changes

        try:
            cfg = msgspec.convert(message["config"], GatewayConfig)
        except (KeyError, msgspec.ValidationError) as exc:
            return {"ok": False, "error": f"malformed configuration: {exc}"}
        old = self.cfg
        self.cfg = cfg
        set_level(cfg.log_level)
        self.registry.thresholds = HealthThresholds(
            success_threshold=cfg.health_success_threshold,
            failure_threshold=cfg.health_failure_threshold,
        )
        self.registry.health_check_disabled = cfg.disable_health_check
        # Breaker timings and overload thresholds; their state lives in the table and stays.
        self.health = blocks_for(self.table, cfg)
        self.registry.overload_limits = _overload_limits(cfg)
        aliases = model_aliases(cfg)
        if aliases != model_aliases(old):
            self.registry.aliases = aliases
            self.registry.publish()  # the directory carries them to every process
        added, removed = worker_list_changes(old.worker_urls, cfg.worker_urls)
        for url in removed:
            worker_id = self.registry.by_url.get(_spec_url(url))
            record = self.registry.get(worker_id) if worker_id is not None else None
            if record is not None and record.status != WorkerStatus.DRAINING:
                log.info("reload: worker %s left --worker-urls; removing it", url)
                self._spawn(self._drain_and_remove(record))
        for url in added:
            try:
                spec = validate_worker_spec(WorkerSpec(url=url))
            except ConfigError as exc:
                log.error("reload: worker %s not registered: %s", url, exc)
                continue
            spec = external.startup_spec(spec, cfg.backend)
            if spec.url in self.registry.by_url:
                continue
            try:
                self._register(spec)
            except HttpError as exc:
                log.error("reload: worker %s not registered: %s", url, exc.message)
        log.info("configuration reloaded in the control plane")
        return {"ok": True}

    def metric_families(self) -> list[Family]:
        """The control plane's series: per worker, health-check counts, global in-flight."""
        health: list[Sample] = []
        active: list[Sample] = []
        running: list[Sample] = []
        waiting: list[Sample] = []
        usage: list[Sample] = []
        for record in self.registry.workers.values():
            worker = [("worker", record.url)]
            health.append(Sample("", worker, 1 if record.status == WorkerStatus.READY else 0))
            active.append(Sample("", worker, self.table.in_flight(record.row)))
            if record.load.valid:
                running.append(Sample("", worker, record.load.running))
                waiting.append(Sample("", worker, record.load.waiting))
                usage.append(Sample("", worker, record.load.token_usage))
        checks = [
            Sample("", [("worker_type", worker_type), ("result", result)], value)
            for (worker_type, result), value in self.health_checks.items()
        ]
        pd_families = (
            [_pd_window_family(self.registry.workers.values())]
            if self.cfg.pd_disaggregation
            else []
        )
        return [
            *pd_families,
            *self._health_families(),
            Family(
                "smg_worker_health",
                "gauge",
                "Worker health status (1=healthy, 0=unhealthy)",
                health,
            ),
            Family(
                "smg_worker_requests_active",
                "gauge",
                "Requests in flight per worker, summed over the data-plane processes",
                active,
            ),
            Family(
                "smg_engine_running_requests",
                "gauge",
                "Engine-reported running requests by worker",
                running,
            ),
            Family(
                "smg_engine_waiting_requests",
                "gauge",
                "Engine-reported waiting requests by worker",
                waiting,
            ),
            Family(
                "smg_engine_token_usage",
                "gauge",
                "Engine-reported KV token usage ratio (0.0-1.0) by worker",
                usage,
            ),
            Family(
                "smg_worker_health_checks_total",
                "counter",
                "Health check results by worker_type and result",
                checks,
            ),
            Family(
                "smg_gateway_in_flight_requests",
                "gauge",
                "Requests in flight in the whole gateway (smg only)",
                [Sample("", [], self.table.total_in_flight())],
            ),
            *admission.gateway_families(self.table),
            *self.reconciler.families(),
        ]


_UNHEALTHY = frozenset({WorkerStatus.NOT_READY, WorkerStatus.FAILED})


def _reserved(labels: dict[str, str] | None) -> str | None:
    key = reserved_label(labels)
    return None if key is None else f"label {key!r} is set by service discovery only"


def _is_grpc(record: WorkerRecord) -> bool:
    return record.spec.connection_mode == "grpc"


def _overload_limits(cfg: GatewayConfig) -> tuple[int, float] | None:
    """Worker overload protection's thresholds, or None when it is switched off."""
    if cfg.disable_worker_overload_protection:
        return None
    return int(cfg.worker_overload_waiting_requests), float(cfg.worker_overload_token_usage)


def _bucket_family(adjuster: BucketAdjuster) -> Family:
    return Family(  # smg's own: 1.13 logs the ranges at each adjustment only
        "smg_pd_bucket_range_upper",
        "gauge",
        "Upper end (characters) of each prefill worker's request-length range in the "
        "bucket policy, by model and worker; +Inf for the last range",
        [
            Sample("", [("model", model), ("worker", url)], float("inf") if hi == MAX else hi)
            for model, url, _lo, hi in adjuster.ranges()
        ],
    )


def loads_always_polled(cfg: GatewayConfig) -> bool:
    """Whether worker loads are polled whatever the workers' labels say: load monitoring on,
    or (as in SMG 1.13, even under --disable-load-monitoring) overload protection or a
    policy that reads them: --policy, or PD mode's --prefill-policy / --decode-policy."""
    return (
        not cfg.disable_load_monitoring
        or any(
            _policy_needs_loads(name or "")
            for name in (cfg.policy, cfg.prefill_policy, cfg.decode_policy)
        )
        or _overload_limits(cfg) is not None
    )


def _policy_needs_loads(policy: str) -> bool:
    """Whether policy `policy` reads backend loads (then they are polled even with
    --disable-load-monitoring, as the Rust SMG does): the policy class says so."""
    try:
        return needs_backend_loads(policy)
    except ValueError:  # a name smg does not implement: refused (--policy) or ignored (label)
        return False


def _spec_url(url: str) -> str:
    """A `--worker-urls` entry as the registry keys it (validated, normalized)."""
    try:
        return validate_worker_spec(WorkerSpec(url=url)).url
    except ConfigError:
        return url


def _json(status: int, payload: Any) -> AdminAnswer:
    return status, _JSON, orjson.dumps(payload)


def _error(status: int, code: str, message: str) -> AdminAnswer:
    return status, [*_JSON, ("x-smg-error-code", code)], error_body(status, code, message)


def _method_not_allowed(method: str, path: str, allow: str | None = None) -> AdminAnswer:
    """Another method on an admin route: 405 with its `allow`, in 1.13's words."""
    status, headers, body = _error(405, "method_not_allowed", invalid_url(method, path))
    return status, [*headers, ("allow", allow or _ADMIN_ALLOW[path])], body


# --- JWKS fetch (I/O for smg.control.cpauth.JwksCache) ------------------------------------------


def _jwks_fetcher(issuer: str | None, jwks_uri: str | None) -> Any:
    """The fetch function of a JwksCache: the key set at `jwks_uri`, else at the
    `jwks_uri` of `<issuer>/.well-known/openid-configuration` (discovered once, retried
    while it fails). Its own short-lived session: the IDP is not a worker, so the workers'
    TLS settings (client certificate, CA files) do not apply to it."""
    discovered: list[str] = [jwks_uri] if jwks_uri else []

    async def fetch() -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=10.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if not discovered:
                assert issuer is not None
                url = issuer.rstrip("/") + "/.well-known/openid-configuration"
                document = await _get_json(session, url)
                found = document.get("jwks_uri") if isinstance(document, dict) else None
                if not isinstance(found, str):
                    raise ValueError("the OIDC discovery document has no jwks_uri")
                discovered.append(found)
                log.info("JWT: discovered JWKS URI %s", cpauth.url_for_log(found))
            return await _get_json(session, discovered[0])

    return fetch


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    shown = cpauth.url_for_log(url)
    problem = cpauth.jwks_url_problem(url)
    if problem:
        raise ValueError(f"{problem}: {shown}")
    # No redirects (an IDP answer must not send the gateway elsewhere), a size limit.
    async with session.get(url, allow_redirects=False) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status} from {shown}")
        body = await response.content.read(cpauth.MAX_JWKS_BYTES + 1)
        if len(body) > cpauth.MAX_JWKS_BYTES:
            raise ValueError(f"answer from {shown} is larger than {cpauth.MAX_JWKS_BYTES} bytes")
        return orjson.loads(body)
