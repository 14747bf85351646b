"""The control plane's worker registry, against an in-memory table (no sockets)."""

from __future__ import annotations

import pytest

from smg.control.registry import Registry, unsupported_reason
from smg.control.worker_state import Event, HealthThresholds, WorkerStatus
from smg.dataplane.breaker import CLOSED, OPEN
from smg.httpwire import HttpError
from smg.policies.base import BackendLoad
from smg.shm.health import FLAG_OVERLOADED, FLAG_STALLED
from smg.shm.layout import FLAG_DRAINING, FLAG_IN_USE, FLAG_LOAD_VALID
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec, validate_worker_spec


def _table(capacity: int = 4) -> WorkerTable:
    return WorkerTable.create(capacity, 2, supervisor_pid=1, anonymous=False)


def _registry(table: WorkerTable, *, disabled: bool = False) -> Registry:
    return Registry(table, HealthThresholds(), health_check_disabled=disabled)


def _spec(url: str, **fields: object) -> WorkerSpec:
    return validate_worker_spec(WorkerSpec(url=url, **fields))  # type: ignore[arg-type]


def test_add_publishes_row_and_directory() -> None:
    table = _table()
    registry = _registry(table)
    record = registry.add(_spec("http://127.0.0.1:9001", model_id="m", api_key="sk-secret"))
    row = table.read_row(record.row)
    assert row.generation == record.generation == 1
    assert row.status == WorkerStatus.PENDING
    assert row.flags & FLAG_IN_USE
    _generation, directory = table.read_directory()
    (entry,) = directory.entries
    assert (entry.url, entry.models, entry.api_key) == (
        "http://127.0.0.1:9001",
        ("m",),
        "sk-secret",
    )
    assert "api_key" not in registry.info(record)  # keys never leave through the admin API


def test_duplicate_url_is_409_and_full_table_is_a_clear_error() -> None:
    registry = _registry(_table(capacity=2))
    first = registry.add(_spec("http://127.0.0.1:9001"))
    with pytest.raises(HttpError) as duplicate:
        registry.add(_spec("http://127.0.0.1:9001"))
    assert duplicate.value.status == 409
    assert first.worker_id in duplicate.value.message
    registry.add(_spec("http://127.0.0.1:9002"))
    with pytest.raises(HttpError) as full:
        registry.add(_spec("http://127.0.0.1:9003"))
    assert full.value.status == 503
    assert full.value.code == "WORKER_TABLE_FULL"
    assert "--worker-table-capacity" in full.value.message


def test_reused_row_gets_a_new_generation() -> None:
    table = _table(capacity=1)
    registry = _registry(table)
    old = registry.add(_spec("http://127.0.0.1:9001"))
    registry.remove(old.worker_id)
    assert not table.read_row(old.row).flags & FLAG_IN_USE
    new = registry.add(_spec("http://127.0.0.1:9002"))
    assert new.row == old.row
    assert new.generation == old.generation + 1
    assert table.read_row(new.row).generation == new.generation


def test_health_events_move_status_and_routing_generation() -> None:
    table = _table()
    registry = _registry(table)
    record = registry.add(_spec("http://127.0.0.1:9001"))
    before = table.routing_generation()
    assert registry.apply(record, Event.CONNECTED)
    assert table.read_row(record.row).status == WorkerStatus.READY
    assert table.routing_generation() > before
    for _ in range(2):
        assert not registry.apply(record, Event.PROBE_FAILED)
    assert registry.apply(record, Event.PROBE_FAILED)  # third consecutive failure
    assert table.read_row(record.row).status == WorkerStatus.NOT_READY
    registry.set_status(record, WorkerStatus.DRAINING)
    assert table.read_row(record.row).flags & FLAG_DRAINING


def test_disabled_health_checks_start_ready() -> None:
    table = _table()
    record = _registry(table, disabled=True).add(_spec("http://127.0.0.1:9001"))
    assert table.read_row(record.row).status == WorkerStatus.READY


def test_load_is_written_with_its_valid_flag() -> None:
    table = _table()
    registry = _registry(table)
    record = registry.add(_spec("http://127.0.0.1:9001"))
    registry.set_load(record, BackendLoad(running=3, waiting=5, token_usage=0.5, valid=True))
    row = table.read_row(record.row)
    assert (row.running, row.waiting, row.token_usage) == (3, 5, 0.5)
    assert row.flags & FLAG_LOAD_VALID
    registry.set_load(record, None)
    assert not table.read_row(record.row).flags & FLAG_LOAD_VALID


def test_a_new_registry_restores_what_the_table_holds() -> None:
    table = _table()
    registry = _registry(table)
    kept = registry.add(_spec("http://127.0.0.1:9001", labels={"zone": "a"}))
    registry.apply(kept, Event.CONNECTED)
    registry.set_discovery(kept, "vllm", ["m1"], {})
    gone = registry.add(_spec("http://127.0.0.1:9002"))
    registry.remove(gone.worker_id)

    replacement = _registry(table)
    assert replacement.restore() == 1
    record = replacement.get(kept.worker_id)
    assert record is not None
    assert (record.row, record.generation, record.status) == (kept.row, 1, WorkerStatus.READY)
    assert (record.engine, record.served_models, record.spec.labels) == (
        "vllm",
        ("m1",),
        {"zone": "a"},
    )
    # The restored registry does not hand out a row that is still in use.
    other = replacement.add(_spec("http://127.0.0.1:9003"))
    assert other.row != kept.row


def test_prefill_and_decode_are_accepted_over_http_only() -> None:
    assert unsupported_reason(_spec("http://127.0.0.1:9001")) is None
    assert unsupported_reason(_spec("grpc://127.0.0.1:9001")) is None  # issue 10
    assert unsupported_reason(_spec("grpcs://127.0.0.1:9001")) is None
    # Issue 17: PD workers register over HTTP and gRPC (in any mode, as 1.13).
    prefill = _spec("http://127.0.0.1:9001", worker_type="prefill", bootstrap_port=9100)
    assert unsupported_reason(prefill) is None
    assert unsupported_reason(_spec("http://127.0.0.1:9001", worker_type="decode")) is None
    assert unsupported_reason(_spec("grpc://127.0.0.1:9001", worker_type="decode")) is None
    assert unsupported_reason(_spec("http://127.0.0.1:9001", worker_type="encode")) == (
        "worker_type 'encode' needs EPD disaggregation, which smg does not support"
    )


# --- health blocks: reset on assignment, overload flags after polls (issue 7) -----------------


def test_a_reused_row_starts_with_a_fresh_health_block() -> None:
    table = _table(1)
    registry = _registry(table)
    first = registry.add(_spec("http://127.0.0.1:9001"))
    health = registry.health
    health.failure_threshold = 1
    health.failure(first.row, 1)
    health.transport_failure(first.row, 2**62)  # long after the last contact: stalled
    assert health.state(first.row) == OPEN
    assert health.flags(first.row) & FLAG_STALLED
    epoch = health.health_epoch()
    registry.remove(first.worker_id)
    second = registry.add(_spec("http://127.0.0.1:9002"))
    assert second.row == first.row
    assert health.state(second.row) == CLOSED
    assert health.flags(second.row) == 0
    assert health.counts(second.row) == (0, 0, 0)
    assert health.health_epoch() > epoch  # every process re-filters


@pytest.mark.parametrize(
    ("load", "overloaded"),
    [
        (BackendLoad(waiting=8, valid=True), True),
        (BackendLoad(waiting=7, token_usage=0.79, valid=True), False),
        (BackendLoad(token_usage=0.8, valid=True), True),
        (BackendLoad(waiting=50, token_usage=1.0, valid=False), False),
        (None, False),
    ],
)
def test_load_polls_flag_overload_at_the_thresholds(
    load: BackendLoad | None, overloaded: bool
) -> None:
    table = _table()
    registry = Registry(
        table, HealthThresholds(), health_check_disabled=True, overload_limits=(8, 0.8)
    )
    record = registry.add(_spec("http://127.0.0.1:9001"))
    registry.set_load(record, load)
    assert bool(registry.health.flags(record.row) & FLAG_OVERLOADED) is overloaded
    assert registry.overloaded(record) is overloaded
    registry.set_load(record, BackendLoad(valid=True))
    assert not registry.overloaded(record)


def test_overload_protection_off_never_flags() -> None:
    table = _table()
    registry = _registry(table)  # overload_limits None: --disable-worker-overload-protection
    record = registry.add(_spec("http://127.0.0.1:9001"))
    registry.set_load(record, BackendLoad(waiting=100, token_usage=1.0, valid=True))
    assert not registry.overloaded(record)
