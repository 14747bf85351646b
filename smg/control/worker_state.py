"""Worker lifecycle: the status state machine as a transition table (pure, no I/O).

Taken from the Rust SMG (github lightseekorg/smg):

- the statuses and their byte values: `crates/protocols/src/worker.rs`, `enum WorkerStatus`
  (`#[repr(u8)]`: Pending=0, Ready=1, NotReady=2, Failed=3, Draining=4; only Ready routable);
- the probe rules: `model_gateway/src/worker/manager.rs`, `compute_next_status` and
  `apply_probe_completion`;
- connect signal: `manager.rs`, `apply_connect_signal` (a backend handshake promotes to Ready);
- initial status: `model_gateway/src/worker/builder.rs` (Ready when health checks are
  disabled, else Pending);
- defaults: `HealthCheckConfig` (success_threshold 2, failure_threshold 3) and the 1.13
  `smg launch --help` (`--health-success-threshold`, `--health-failure-threshold`,
  `--worker-startup-timeout-secs` 1800).

The rules (ft = failure threshold, st = success threshold):

    Pending  --st consecutive probe_ok-->            Ready
    Pending  --10*ft probes in total, any outcome--> Failed   (Rust's pending cap)
    Pending  --startup_timeout-->                    Failed
    Ready    --ft consecutive probe_failed-->        NotReady
    NotReady --st consecutive probe_ok-->            Ready
    NotReady --3*ft consecutive probe_failed-->      Failed   (liveness threshold)
    Pending/NotReady --connected-->                  Ready

Failed and Draining are terminal for the health machine: probes are not scheduled for them
and any event that reaches them anyway is ignored. Draining is not a health event: the
control plane sets it when a worker is removed (DELETE, --remove-unhealthy-workers) and
frees the row once its in-flight requests ended.

`startup_timeout` is this implementation's reading of `--worker-startup-timeout-secs`: in
Rust that timeout bounds the registration workflow (a worker that never answers is never
registered); here a registered Pending worker that is still not healthy when it expires
becomes Failed. Unlike Rust's `apply_connect_signal`, `connected` never revives a Failed or
Draining worker.

Invalid transitions are **ignored**: `on_event` returns the status and counters unchanged.
Probes complete asynchronously, so a late probe result for a worker that was meanwhile
drained or failed is normal, not a bug; raising would force every caller to catch. Passing
something that is not an `Event` (or not a `WorkerStatus`) raises `ValueError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec


class WorkerStatus(enum.IntEnum):
    """Status byte values, identical to the Rust `#[repr(u8)]` discriminants.

    PENDING is 0 so that a zero-filled shared-memory row reads as "not routable".
    """

    PENDING = 0
    READY = 1
    NOT_READY = 2
    FAILED = 3
    DRAINING = 4

    @property
    def label(self) -> str:
        """The Rust serde / Display spelling ("pending", "ready", "not_ready", ...)."""
        return self.name.lower()

    def __str__(self) -> str:
        return self.label


class Event(enum.StrEnum):
    PROBE_OK = "probe_ok"  # a health probe answered 2xx
    PROBE_FAILED = "probe_failed"  # a health probe failed (non-2xx, timeout, refused)
    STARTUP_TIMEOUT = "startup_timeout"  # --worker-startup-timeout-secs expired
    CONNECTED = "connected"  # backend handshake completed (Rust: WorkerConnected)


class HealthThresholds(msgspec.Struct, frozen=True):
    success_threshold: int = 2  # --health-success-threshold
    failure_threshold: int = 3  # --health-failure-threshold

    def __post_init__(self) -> None:
        if self.success_threshold < 1 or self.failure_threshold < 1:
            raise ValueError("health thresholds must be at least 1")

    @property
    def liveness_threshold(self) -> int:
        # Rust tolerates a longer outage before NotReady becomes Failed (K8s liveness vs
        # readiness): three times the readiness threshold.
        return self.failure_threshold * 3

    @property
    def max_pending_probes(self) -> int:
        # Rust's cap on probes spent in Pending, so a wrong URL does not stay Pending forever
        # (and a flapping F,S,F,S worker that never reaches the success threshold fails too).
        return self.failure_threshold * 10


class HealthCounters(msgspec.Struct, frozen=True):
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    pending_probes: int = 0  # probes answered (either way) while Pending


ZERO = HealthCounters()

Handler = Callable[[HealthCounters, HealthThresholds], tuple[WorkerStatus, HealthCounters]]


def _count_ok(c: HealthCounters, pending: bool) -> HealthCounters:
    return HealthCounters(
        consecutive_successes=c.consecutive_successes + 1,
        consecutive_failures=0,
        pending_probes=c.pending_probes + (1 if pending else 0),
    )


def _count_failed(c: HealthCounters, pending: bool) -> HealthCounters:
    return HealthCounters(
        consecutive_successes=0,
        consecutive_failures=c.consecutive_failures + 1,
        pending_probes=c.pending_probes + (1 if pending else 0),
    )


def _pending_ok(c: HealthCounters, t: HealthThresholds) -> tuple[WorkerStatus, HealthCounters]:
    c = _count_ok(c, pending=True)
    if c.consecutive_successes >= t.success_threshold:
        return WorkerStatus.READY, ZERO
    # A success does not exempt a worker from the pending cap (Rust checks it on both paths).
    if c.pending_probes >= t.max_pending_probes:
        return WorkerStatus.FAILED, ZERO
    return WorkerStatus.PENDING, c


def _pending_failed(c: HealthCounters, t: HealthThresholds) -> tuple[WorkerStatus, HealthCounters]:
    c = _count_failed(c, pending=True)
    if c.pending_probes >= t.max_pending_probes:
        return WorkerStatus.FAILED, ZERO
    return WorkerStatus.PENDING, c


def _ready_ok(c: HealthCounters, t: HealthThresholds) -> tuple[WorkerStatus, HealthCounters]:
    # Rust keeps counting successes while Ready; saturate so the number stays bounded.
    n = min(c.consecutive_successes + 1, t.success_threshold)
    return WorkerStatus.READY, HealthCounters(consecutive_successes=n)


def _ready_failed(c: HealthCounters, t: HealthThresholds) -> tuple[WorkerStatus, HealthCounters]:
    c = _count_failed(c, pending=False)
    if c.consecutive_failures >= t.failure_threshold:
        return WorkerStatus.NOT_READY, ZERO
    return WorkerStatus.READY, c


def _not_ready_ok(c: HealthCounters, t: HealthThresholds) -> tuple[WorkerStatus, HealthCounters]:
    c = _count_ok(c, pending=False)
    if c.consecutive_successes >= t.success_threshold:
        return WorkerStatus.READY, ZERO
    return WorkerStatus.NOT_READY, c


def _not_ready_failed(
    c: HealthCounters, t: HealthThresholds
) -> tuple[WorkerStatus, HealthCounters]:
    c = _count_failed(c, pending=False)
    if c.consecutive_failures >= t.liveness_threshold:
        return WorkerStatus.FAILED, ZERO
    return WorkerStatus.NOT_READY, c


def _to(status: WorkerStatus) -> Handler:
    def handler(c: HealthCounters, t: HealthThresholds) -> tuple[WorkerStatus, HealthCounters]:
        return status, ZERO

    return handler


S = WorkerStatus
E = Event

# Every defined (status, event) pair. A pair not listed here is ignored by `on_event`.
TRANSITIONS: dict[tuple[WorkerStatus, Event], Handler] = {
    (S.PENDING, E.PROBE_OK): _pending_ok,
    (S.PENDING, E.PROBE_FAILED): _pending_failed,
    (S.PENDING, E.STARTUP_TIMEOUT): _to(S.FAILED),
    (S.PENDING, E.CONNECTED): _to(S.READY),
    (S.READY, E.PROBE_OK): _ready_ok,
    (S.READY, E.PROBE_FAILED): _ready_failed,
    (S.NOT_READY, E.PROBE_OK): _not_ready_ok,
    (S.NOT_READY, E.PROBE_FAILED): _not_ready_failed,
    (S.NOT_READY, E.CONNECTED): _to(S.READY),
}


def on_event(
    status: WorkerStatus,
    counters: HealthCounters,
    event: Event,
    thresholds: HealthThresholds,
) -> tuple[WorkerStatus, HealthCounters]:
    """Apply one event; returns the next status and counters (unchanged if not defined)."""
    if not isinstance(event, Event):
        raise ValueError(f"not a worker event: {event!r}")
    status = WorkerStatus(status)  # ValueError for a byte outside the enum
    handler = TRANSITIONS.get((status, event))
    if handler is None:
        return status, counters
    return handler(counters, thresholds)


def is_terminal(status: WorkerStatus) -> bool:
    """No further health transitions: stop probing a worker in this status."""
    return status in (WorkerStatus.FAILED, WorkerStatus.DRAINING)


def initial_status(health_check_disabled: bool) -> WorkerStatus:
    """Status of a newly registered worker (Rust `BasicWorkerBuilder::build`)."""
    return WorkerStatus.READY if health_check_disabled else WorkerStatus.PENDING
