"""Discovered workers into the registry: the pure plan, and the control plane's Reconciler.

A provider (smg.discovery.file, smg.discovery.kubernetes) observes its source and hands the
whole desired set to `Reconciler.apply(source, {key: WorkerSpec})`; the Reconciler, in the
control plane (the only writer of the registry), adds what is new through the same path as
`POST /workers`, drains then removes what is gone, and treats a changed spec as remove +
add. Workers the admin API or `--worker-urls` registered are never touched.

Discovered workers carry the Rust SMG 1.13's labels (seen in its `GET /workers`):
`smg.ai/discovery-provider` (the source), `smg.ai/discovery-id` (the provider's stable key)
and `smg.ai/discovery-spec-hash` (sha256 of the spec as the provider gave it), so the
current set is read back from the registry itself: a replaced control plane (which
restores the registry from shared memory) reconciles from where the last one stopped.

A spec whose URL is a bare `host:port` (every Kubernetes pod's; a manifest's `url` without
a scheme) has its connection mode detected as 1.13 does (smg.discovery.detect: HTTP and gRPC
probed at once, HTTP first) when it is added, and is registered as `http://` or `grpc://`;
its spec hash is of the bare form, so later passes leave it as it is. A worker that answers
neither is not registered (counted as a failed registration) and is tried again next pass.

Metrics: 1.13's `smg_discovery_*` families (names and labels as its /metrics shows them),
plus `smg_discovery_last_sync_timestamp_seconds` (smg only).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from smg.config import DEFAULTS, ConfigError
from smg.control.registry import Registry, WorkerRecord, unsupported_reason
from smg.control.worker_state import WorkerStatus
from smg.discovery.detect import Mode, detect_connection_mode
from smg.httpwire import HttpError
from smg.promtext import Family, Sample
from smg.worker_url import worker_address
from smg.workers_spec import WorkerSpec, validate_worker_spec

__all__ = [
    "HASH_LABEL",
    "ID_LABEL",
    "SOURCE_LABEL",
    "SYNC_BUCKETS",
    "Plan",
    "Reconciler",
    "mark",
    "plan",
    "spec_hash",
]

log = logging.getLogger("smg.discovery")

SOURCE_LABEL = "smg.ai/discovery-provider"
ID_LABEL = "smg.ai/discovery-id"
HASH_LABEL = "smg.ai/discovery-spec-hash"
_OWN_LABELS = frozenset({SOURCE_LABEL, ID_LABEL, HASH_LABEL})


def reserved_label(labels: Mapping[str, str] | None) -> str | None:
    """The first discovery label in `labels`, which an admin call may not set: the
    reconciler takes a worker carrying them for its own (and would remove it)."""
    return next((key for key in labels or () if key in _OWN_LABELS), None)


# smg_discovery_sync_duration_seconds buckets: the 1.13 binary's (its /metrics).
SYNC_BUCKETS: tuple[float, ...] = (
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 45.0),
    *(60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 480.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0),
    *(5400.0, 7200.0),
)
_json = msgspec.json.Encoder(order="sorted")


# --- pure ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Keys to register (new or changed) and keys to drain and remove (gone or changed)."""

    add: tuple[str, ...]
    remove: tuple[str, ...]


def plan(current: Mapping[str, str], desired: Mapping[str, str]) -> Plan:
    """From {key: spec hash} registered and {key: spec hash} wanted: a changed hash is in
    both lists (removed, then added again). Sorted, so a plan is reproducible."""
    return Plan(
        add=tuple(sorted(k for k, h in desired.items() if current.get(k) != h)),
        remove=tuple(sorted(k for k, h in current.items() if desired.get(k) != h)),
    )


def spec_hash(spec: WorkerSpec) -> str:
    """sha256 of the spec as the provider gave it (our own labels left out, keys sorted)."""
    labels = {k: v for k, v in spec.labels.items() if k not in _OWN_LABELS}
    return hashlib.sha256(_json.encode(msgspec.structs.replace(spec, labels=labels))).hexdigest()


def mark(spec: WorkerSpec, source: str, key: str) -> WorkerSpec:
    """The spec with the discovery labels (source, key, spec hash) added."""
    labels = {**spec.labels, SOURCE_LABEL: source, ID_LABEL: key, HASH_LABEL: spec_hash(spec)}
    return msgspec.structs.replace(spec, labels=labels)


def _bare_target(url: str) -> str | None:
    """host:port of a validated http:// URL made from a bare one (its port made explicit:
    gRPC has no default); None when it has a path (an HTTP route prefix: http:// it is)."""
    address = worker_address(url)
    if address.path:
        return None
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


# --- the control plane's reconciler ---------------------------------------------------------


@dataclass
class _SourceStats:
    registrations: dict[str, int] = field(default_factory=dict)  # result -> count
    deregistrations: dict[str, int] = field(default_factory=dict)  # reason -> count
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count
    last_sync: float | None = None  # unix time of the last successful apply
    buckets: list[int] = field(default_factory=lambda: [0] * len(SYNC_BUCKETS))
    sync_sum: float = 0.0
    sync_count: int = 0

    def bump(self, counts: dict[str, int], label: str) -> None:
        counts[label] = counts.get(label, 0) + 1


class Reconciler:
    """Brings the registry's discovered workers of each source to what the provider says.

    `register` is the control plane's POST /workers path (registry add + onboarding),
    `remove` its drain-then-remove coroutine, `spawn` starts a task it keeps."""

    def __init__(
        self,
        registry: Registry,
        register: Callable[[WorkerSpec], WorkerRecord],
        remove: Callable[[WorkerRecord], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        *,
        drain_wait_secs: float = 180.0,
        detect: Callable[[str, float], Awaitable[Mode | None]] = detect_connection_mode,
        detect_timeout_secs: float = float(DEFAULTS["health_check_timeout_secs"]),
    ) -> None:
        self.registry = registry
        self._register = register
        self._remove = remove
        self._spawn = spawn
        self.drain_wait_secs = drain_wait_secs
        self._detect = detect
        self.detect_timeout_secs = detect_timeout_secs
        self.stats: dict[str, _SourceStats] = {}
        self._lock = asyncio.Lock()
        # (source, key) -> spec hash of an add waiting for its URL to be freed by a drain.
        self._pending: dict[tuple[str, str], str] = {}
        # (source, key, url) conflicts with a worker discovery does not own, logged once.
        self._conflicts_logged: set[tuple[str, str, str]] = set()

    def _stats(self, source: str) -> _SourceStats:
        return self.stats.setdefault(source, _SourceStats())

    def current(self, source: str) -> dict[str, WorkerRecord]:
        """The registered, not draining, workers of `source` by key."""
        out: dict[str, WorkerRecord] = {}
        for record in self.registry.workers.values():
            labels = record.spec.labels
            if labels.get(SOURCE_LABEL) == source and record.status != WorkerStatus.DRAINING:
                out[labels.get(ID_LABEL, record.spec.url)] = record
        return out

    def failed(self, source: str, reason: str, kind: str = "invalid") -> None:
        """The provider could not observe its source (`kind`: invalid or unreadable): the
        registered workers stay as they are; counted and logged."""
        self._stats(source).bump(self._stats(source).errors, kind)
        log.warning("discovery %s: %s", source, reason)

    async def apply(self, source: str, desired: Mapping[str, WorkerSpec]) -> None:
        """Make `source`'s registered workers exactly `desired` ({stable key: spec})."""
        async with self._lock:
            started = time.monotonic()
            stats = self._stats(source)
            wanted: dict[str, WorkerSpec] = {}
            bare: dict[str, str] = {}  # key -> host:port whose mode is detected on add
            for key, spec in desired.items():
                try:
                    detected = isinstance(spec.url, str) and "://" not in spec.url
                    if detected:  # checked as http://; the mode is settled when added
                        spec = msgspec.structs.replace(spec, url="http://" + spec.url)
                    checked = validate_worker_spec(spec)
                    reason = unsupported_reason(checked)
                    if reason:
                        raise ConfigError("worker_type", reason)
                    target = _bare_target(checked.url) if detected else None
                    if target is not None:
                        # Hashed with no mode: unlike an explicit http:// of the same URL.
                        checked = msgspec.structs.replace(checked, connection_mode=None)
                        bare[key] = target
                    # Again with the labels: the key must fit a label value, and the spec
                    # the worker-table budget.
                    wanted[key] = validate_worker_spec(mark(checked, source, key))
                except ConfigError as exc:
                    stats.bump(stats.registrations, "failure")
                    log.warning("discovery %s: worker %r refused: %s", source, key, exc)
            registered = self.current(source)
            current = {k: r.spec.labels.get(HASH_LABEL, "") for k, r in registered.items()}
            for (src, key), digest in self._pending.items():
                if src == source:
                    current[key] = digest
            steps = plan(current, {k: s.labels[HASH_LABEL] for k, s in wanted.items()})
            if steps.add or steps.remove:
                log.info(
                    "discovery %s: %d to add, %d to remove (%d desired)",
                    source,
                    len(steps.add),
                    len(steps.remove),
                    len(wanted),
                )
            for key in steps.remove:
                self._pending.pop((source, key), None)  # a waiting add is superseded
                record = registered.get(key)
                if record is not None:
                    self._deregister(source, record, "reconciled")
            adds = [k for k in steps.add if k not in bare] + await self._detect_modes(
                source, {k: bare[k] for k in steps.add if k in bare}, wanted
            )
            for key in sorted(adds):
                self._add(source, key, wanted[key])
            stats.last_sync = time.time()
            if not (steps.add or steps.remove):
                return  # 1.13 times only the syncs that change something
            elapsed = time.monotonic() - started
            stats.sync_sum += elapsed
            stats.sync_count += 1
            for i, bound in enumerate(SYNC_BUCKETS):
                if elapsed <= bound:
                    stats.buckets[i] += 1

    async def _detect_modes(
        self, source: str, targets: Mapping[str, str], wanted: dict[str, WorkerSpec]
    ) -> list[str]:
        """Probe the bare host:ports at once; `wanted` gets each answering one's spec
        with its scheme; the keys that answered (the rest are counted and logged)."""
        keys = sorted(targets)
        modes = await asyncio.gather(
            *(self._detect(targets[k], self.detect_timeout_secs) for k in keys)
        )
        answered: list[str] = []
        stats = self._stats(source)
        for key, mode in zip(keys, modes, strict=True):
            if mode is None:
                stats.bump(stats.registrations, "failure")
                log.warning(
                    "discovery %s: worker %r at %s answers neither HTTP (GET /health) nor "
                    "gRPC (HealthCheck); not registered, tried again next pass",
                    source,
                    key,
                    targets[key],
                )
                continue
            spec = wanted[key]
            wanted[key] = validate_worker_spec(
                msgspec.structs.replace(spec, url=f"{mode}://{targets[key]}", connection_mode=None)
            )
            answered.append(key)
        return answered

    def _deregister(self, source: str, record: WorkerRecord, reason: str) -> None:
        log.info(
            "discovery %s: removing worker %s (%s): no longer listed, or its spec changed",
            source,
            record.spec.url,
            record.spec.labels.get(ID_LABEL),
        )
        # Draining at once (not when the task first runs): the next apply must not see it.
        self.registry.set_status(record, WorkerStatus.DRAINING)
        self._spawn(self._remove(record))
        self._stats(source).bump(self._stats(source).deregistrations, reason)

    def _add(self, source: str, key: str, spec: WorkerSpec) -> None:
        holder_id = self.registry.by_url.get(spec.url)
        holder = self.registry.get(holder_id) if holder_id is not None else None
        if holder is None:
            self._register_now(source, key, spec)
        elif holder.status == WorkerStatus.DRAINING:
            # A changed spec at the same URL: register once the old one is gone.
            self._pending[(source, key)] = spec.labels[HASH_LABEL]
            self._spawn(self._add_after_drain(source, key, spec, holder))
        else:
            stats = self._stats(source)
            stats.bump(stats.registrations, "failure")
            if (source, key, spec.url) not in self._conflicts_logged:
                self._conflicts_logged.add((source, key, spec.url))
                owner = holder.spec.labels.get(SOURCE_LABEL)
                log.warning(
                    "discovery %s: worker %r not registered: %s is already registered (%s); "
                    "left as it is",
                    source,
                    key,
                    spec.url,
                    f"by discovery {owner}" if owner else "by the admin API or --worker-urls",
                )

    async def _add_after_drain(
        self, source: str, key: str, spec: WorkerSpec, holder: WorkerRecord
    ) -> None:
        digest = spec.labels[HASH_LABEL]
        deadline = time.monotonic() + self.drain_wait_secs + 5.0
        while self.registry.get(holder.worker_id) is holder and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with self._lock:
            if self._pending.get((source, key)) != digest:
                return  # superseded by a later apply
            del self._pending[(source, key)]
            if spec.url in self.registry.by_url:
                self._add(source, key, spec)  # still held: log the conflict, count it
            else:
                self._register_now(source, key, spec)

    def _register_now(self, source: str, key: str, spec: WorkerSpec) -> None:
        stats = self._stats(source)
        try:
            record = self._register(spec)
        except HttpError as exc:
            stats.bump(stats.registrations, "failure")
            log.error("discovery %s: worker %r (%s) not registered: %s", source, key, spec.url, exc)
            return
        stats.bump(stats.registrations, "success")
        log.info(
            "discovery %s: registered worker %s (%s) as %s",
            source,
            spec.url,
            key,
            record.worker_id,
        )

    # --- metrics --------------------------------------------------------------------------

    def families(self) -> list[Family]:
        """1.13's smg_discovery_* families, plus the last successful sync (smg only)."""
        if not self.stats:
            return []
        regs: list[Sample] = []
        deregs: list[Sample] = []
        errors: list[Sample] = []
        found: list[Sample] = []
        last: list[Sample] = []
        sync: list[Sample] = []
        for source, stats in sorted(self.stats.items()):
            src = [("source", source)]
            regs += [Sample("", [*src, ("result", r)], n) for r, n in stats.registrations.items()]
            deregs += [
                Sample("", [*src, ("reason", r)], n) for r, n in stats.deregistrations.items()
            ]
            errors += [Sample("", [*src, ("reason", r)], n) for r, n in stats.errors.items()]
            found.append(Sample("", src, len(self.current(source))))
            if stats.last_sync is not None:
                last.append(Sample("", src, stats.last_sync))
            # stats.buckets are cumulative already (an observation counts in every bucket
            # whose bound it is within).
            for bound, count in zip(SYNC_BUCKETS, stats.buckets, strict=True):
                sync.append(Sample("_bucket", [*src, ("le", f"{bound:g}")], count))
            sync.append(Sample("_bucket", [*src, ("le", "+Inf")], stats.sync_count))
            sync.append(Sample("_sum", src, stats.sync_sum))
            sync.append(Sample("_count", src, stats.sync_count))
        return [
            Family(
                "smg_discovery_registrations_total",
                "counter",
                "Worker registration attempts by source and result",
                regs,
            ),
            Family(
                "smg_discovery_deregistrations_total",
                "counter",
                "Worker deregistration events by source and reason",
                deregs,
            ),
            Family(
                "smg_discovery_snapshot_errors_total",
                "counter",
                "Discovery source observations rejected, by source and reason",
                errors,
            ),
            Family(
                "smg_discovery_workers_discovered",
                "gauge",
                "Workers known via discovery by source",
                found,
            ),
            Family(
                "smg_discovery_last_sync_timestamp_seconds",
                "gauge",
                "Unix time of the last successful discovery sync by source (smg only)",
                last,
            ),
            Family(
                "smg_discovery_sync_duration_seconds",
                "histogram",
                "Discovery sync duration by source",
                sync,
            ),
        ]
