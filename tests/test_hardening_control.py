"""Control-plane hardening (issue 6, items 15, 16, 18, 22, 27, 32, 33 and the one-source
structure items): pure parts against an in-memory table, the rest against real processes
on loopback (`smg launch` and `smg mock-worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mockutil
import msgspec
import psutil
import pytest
from gatewayutil import Gateway, running_gateway

from smg.config import GatewayConfig
from smg.control import plane as plane_module
from smg.control.plane import ControlPlane
from smg.control.registry import Registry
from smg.control.worker_state import Event, HealthThresholds, WorkerStatus
from smg.httpwire import HttpError
from smg.policies.base import BackendLoad
from smg.shm import layout
from smg.shm.directory import MAX_MODELS_BYTES, bound_models
from smg.shm.readiness import readiness
from smg.shm.table import WorkerTable
from smg.workers_spec import (
    MAX_SPEC_BYTES,
    SpecError,
    WorkerSpec,
    apply_worker_patch,
    parse_worker_patch,
    parse_worker_spec,
)

FIXTURE = Path(__file__).parent / "fixtures" / "rust_smg_1_13_admin_schemas.json"


def _table(capacity: int = 4, dir_capacity: int | None = None) -> WorkerTable:
    geo = layout.geometry(capacity, 2, dir_capacity)
    buf = bytearray(geo.total_size)
    layout.init_header(buf, geo, supervisor_pid=1)
    return WorkerTable(buf, geo)


def _registry(table: WorkerTable) -> Registry:
    return Registry(table, HealthThresholds(), health_check_disabled=False)


def _spec(url: str, **fields: Any) -> WorkerSpec:
    """A validated spec, decoded from JSON as the admin API decodes it."""
    return parse_worker_spec(json.dumps({"url": url, **fields}).encode())


def _labels(count: int, size: int) -> dict[str, str]:
    return {f"label-{i:03d}": "v" * size for i in range(count)}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- item 16: the directory never overflows; registration is all or nothing -------------------


def test_64_labels_of_1_kib_are_refused_by_the_spec_budget() -> None:
    body = json.dumps({"url": "http://127.0.0.1:9001", "labels": _labels(64, 1024)}).encode()
    with pytest.raises(SpecError) as refused:
        parse_worker_spec(body)
    assert refused.value.key == "body"
    assert str(MAX_SPEC_BYTES) in refused.value.reason
    # Per-label limits are in bytes of UTF-8, not characters.
    with pytest.raises(SpecError):
        _spec("http://127.0.0.1:9001", labels={"k": "é" * 513})
    _spec("http://127.0.0.1:9001", labels={"k": "é" * 512})


def test_a_full_table_of_the_largest_specs_fits_the_directory() -> None:
    capacity = 8
    table = WorkerTable.create(capacity, 1, supervisor_pid=1, anonymous=False)
    registry = _registry(table)
    # As large as the validator allows: labels up to the spec budget, the longest key.
    labels = _labels(13, 1024)
    for i in range(capacity):
        spec = _spec(f"http://10.0.0.{i}:8000", labels=labels, api_key="k" * 2048)
        record = registry.add(spec)
        registry.set_discovery(record, "sglang", [f"{i:0500d}-{j}" for j in range(40)], {})
    _generation, directory = table.read_directory()
    assert len(directory.entries) == capacity


def test_a_worker_that_does_not_fit_changes_nothing_and_a_retry_is_refused_the_same() -> None:
    table = _table(capacity=4, dir_capacity=3000)
    registry = _registry(table)
    small = registry.add(_spec("http://127.0.0.1:9001"))
    generation = table.directory_generation()
    big = _spec("http://127.0.0.1:9002", labels=_labels(4, 1000))
    for _attempt in range(2):  # the retry is refused the same way, not 409
        with pytest.raises(HttpError) as refused:
            registry.add(big)
        assert (refused.value.status, refused.value.code) == (400, "WORKER_DIRECTORY_FULL")
        assert list(registry.workers) == [small.worker_id]
        assert "http://127.0.0.1:9002" not in registry.by_url
        assert table.directory_generation() == generation
        assert len(registry.free_rows) == 3
    # The next worker that fits takes the row the refused one would have had.
    fits = registry.add(_spec("http://127.0.0.1:9003"))
    assert fits.row == 1 and fits.generation == 1
    _generation, directory = table.read_directory()
    assert [e.url for e in directory.entries] == ["http://127.0.0.1:9001", "http://127.0.0.1:9003"]


def test_a_patch_that_does_not_fit_changes_nothing() -> None:
    table = _table(capacity=2, dir_capacity=3000)
    registry = _registry(table)
    record = registry.add(_spec("http://127.0.0.1:9001", labels={"zone": "a"}))
    before = record.spec
    patched = apply_worker_patch(
        before, parse_worker_patch(json.dumps({"labels": _labels(3, 1000)}).encode())
    )
    for _attempt in range(2):
        with pytest.raises(HttpError) as refused:
            registry.update_spec(record, patched)
        assert refused.value.status == 400
        assert record.spec is before
        _generation, directory = table.read_directory()
        assert directory.entries[0].spec.labels == {"zone": "a"}
    # Over the spec budget, the PATCH itself is refused before reaching the registry.
    with pytest.raises(SpecError):
        apply_worker_patch(
            before, parse_worker_patch(json.dumps({"labels": _labels(64, 1024)}).encode())
        )


def test_a_huge_discovered_model_list_is_bounded() -> None:
    table = WorkerTable.create(2, 1, supervisor_pid=1, anonymous=False)
    registry = _registry(table)
    record = registry.add(_spec("http://127.0.0.1:9001"))
    models = [f"model-{i:05d}" for i in range(100_000)] + ["x" * 600]
    registry.set_discovery(record, "vllm", models, {})
    assert 0 < len(record.models) < len(models)
    assert record.models == bound_models(models)
    assert sum(len(m) + 5 for m in record.models) <= MAX_MODELS_BYTES
    _generation, directory = table.read_directory()
    assert directory.entries[0].models == record.models


def test_32nd_worker_with_64_labels_of_1_kib_is_refused_whole_and_others_still_publish() -> None:
    big = json.dumps({"url": "http://127.0.0.1:1", "labels": _labels(64, 1024)})
    with running_gateway(["--processes", "1"], processes=1) as gw:
        for i in range(31):
            body = {"url": f"http://127.0.0.1:{20000 + i}", "labels": _labels(12, 1024)}
            assert gw.admin("POST", "/workers", json=body).status_code == 202
        for _attempt in range(2):
            answer = gw.admin(
                "POST", "/workers", content=big, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400, answer.text
            assert answer.headers["x-smg-error-code"] == "BAD_REQUEST"
            assert str(MAX_SPEC_BYTES) in answer.json()["error"]["message"]
        listed = gw.admin("GET", "/workers").json()
        assert listed["total"] == 31
        assert "http://127.0.0.1:1" not in {w["url"] for w in listed["workers"]}
        # A PATCH over the budget is refused and changes nothing; later changes publish.
        first = listed["workers"][0]
        patch = {"labels": _labels(64, 1024)}
        answer = gw.admin("PATCH", f"/workers/{first['id']}", json=patch)
        assert answer.status_code == 400
        assert gw.admin("GET", f"/workers/{first['id']}").json()["labels"] == first["labels"]
        answer = gw.admin("PATCH", f"/workers/{first['id']}", json={"labels": {"zone": "b"}})
        assert answer.status_code == 202
        assert gw.admin("GET", f"/workers/{first['id']}").json()["labels"]["zone"] == "b"
        small = {"url": "http://127.0.0.1:1", "labels": {"zone": "a"}}
        assert gw.admin("POST", "/workers", json=small).status_code == 202
        assert gw.admin("GET", "/workers").json()["total"] == 32


# --- structure: one readiness, the whole spec restored, loads stamped --------------------------


def test_readiness_is_one_function_of_the_table() -> None:
    table = _table(capacity=1)
    registry = _registry(table)
    entries = lambda: table.read_directory()[1].entries  # noqa: E731
    record = registry.add(_spec("http://127.0.0.1:9001"))
    assert readiness(table, entries()) == (
        503,
        b'{"status":"not ready","reason":"insufficient healthy workers"}',
    )
    registry.apply(record, Event.CONNECTED)
    assert readiness(table, entries()) == (
        200,
        b'{"status":"ready","healthy_workers":1,"total_workers":1}',
    )
    assert readiness(table, entries(), shutting_down=True)[0] == 503
    registry.set_status(record, WorkerStatus.DRAINING)
    assert readiness(table, entries())[0] == 503
    # A stale entry (the row was reused meanwhile) does not count.
    stale = entries()
    registry.remove(record.worker_id)
    other = registry.add(_spec("http://127.0.0.1:9002"))
    registry.apply(other, Event.CONNECTED)
    assert other.row == record.row
    assert readiness(table, stale)[0] == 503
    assert readiness(table, entries())[0] == 200
    table.set_gateway_state(layout.GATEWAY_DRAINING)
    assert readiness(table, entries())[0] == 503


def test_restore_keeps_every_spec_field_and_the_seeded_mark() -> None:
    table = _table()
    registry = _registry(table)
    spec = _spec(
        "http://127.0.0.1:9001",
        model_id="m",
        api_key="sk-1",
        labels={"zone": "a"},
        priority=7,
        cost=2.5,
        health={"timeout_secs": 2, "check_interval_secs": 3, "failure_threshold": 1},
    )
    record = registry.add(spec)
    registry.set_discovery(record, "sglang", ["ignored-for-model-id"], {}, 4096)
    registry.mark_seeded()
    replacement = _registry(table)
    assert replacement.restore() == 1
    assert replacement.seeded
    restored = replacement.workers[record.worker_id]
    assert restored.spec == spec
    assert restored.context_length == 4096
    assert restored.served_models == ("m",)
    assert restored.thresholds(HealthThresholds()).failure_threshold == 1


def test_per_worker_thresholds_drive_the_state_machine() -> None:
    registry = _registry(_table())
    strict = registry.add(_spec("http://127.0.0.1:9001", health={"failure_threshold": 1}))
    default = registry.add(_spec("http://127.0.0.1:9002"))
    for record in (strict, default):
        registry.apply(record, Event.CONNECTED)
        registry.apply(record, Event.PROBE_FAILED)
    assert strict.status == WorkerStatus.NOT_READY
    assert default.status == WorkerStatus.READY
    off = registry.add(_spec("http://127.0.0.1:9003", health={"disable_health_check": True}))
    assert off.status == WorkerStatus.READY


def test_set_load_stamps_the_poll_time() -> None:
    table = _table()
    registry = _registry(table)
    record = registry.add(_spec("http://127.0.0.1:9001"))
    before = time.time()
    registry.set_load(record, BackendLoad(running=3, valid=True))
    assert before <= record.load.updated <= time.time()
    assert record.load.updated == table.read_row(record.row).load_updated
    assert registry.info(record)["backend_load"]["updated"] == record.load.updated


def test_the_control_plane_answers_its_socket_only_with_the_start_up_workers_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor prints SMG_READY once the control plane's socket answers: an admin
    call from then on (POST /start_profile, GET /workers) must see the --worker-urls
    workers. CI once saw `No workers available for profiling` right after SMG_READY."""
    cfg = msgspec.structs.replace(GatewayConfig(), prometheus_port=0)
    spec = _spec("http://127.0.0.1:9")
    cp = ControlPlane(cfg, _table(), root_pid=os.getpid(), processes=1, initial_specs=[spec])
    registered_when_served: list[list[str]] = []
    real_serve = plane_module.ipc.serve

    async def serve(address: str, handler: Any) -> Any:
        registered_when_served.append([r.spec.url for r in cp.registry.workers.values()])
        return await real_serve(address, handler)

    monkeypatch.setattr(plane_module.ipc, "serve", serve)

    async def main() -> None:
        try:
            await cp.start()
        finally:
            await cp.stop()
            server = getattr(cp, "ipc_server", None)
            if server is not None:
                server.close()
            runner = getattr(cp, "metrics_runner", None)
            if runner is not None:
                await runner.cleanup()

    asyncio.run(main())
    assert registered_when_served == [[spec.url]]


# --- item 18: each worker's probes on its own schedule (in-process, fake probe) ---------------


def test_a_hung_worker_is_probed_back_to_back_and_delays_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = msgspec.structs.replace(
        GatewayConfig(), health_check_interval_secs=0.2, health_check_timeout_secs=0.5
    )
    cp = ControlPlane(cfg, _table(), root_pid=os.getpid(), processes=1, initial_specs=[])
    hung = cp.registry.add(_spec("http://127.0.0.1:9001"))
    fine = cp.registry.add(_spec("http://127.0.0.1:9002"))
    for record in (hung, fine):
        cp.registry.apply(record, Event.CONNECTED)
    starts: dict[str, list[float]] = {hung.spec.url: [], fine.spec.url: []}

    async def fake_probe(
        _session: Any, url: str, _endpoint: str, _key: Any, timeout: float
    ) -> bool:
        starts[url].append(time.monotonic())
        if url == hung.spec.url:
            await asyncio.sleep(timeout)  # hangs until the probe timeout
            return False
        return True

    monkeypatch.setattr(plane_module.probes, "probe_health", fake_probe)

    async def main() -> None:
        cp.session = object()  # type: ignore[assignment]
        loops = [asyncio.create_task(cp._health_loop(r)) for r in (hung, fine)]
        await asyncio.sleep(2.1)
        cp._stopping = True
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    asyncio.run(main())
    hung_gaps = [b - a for a, b in zip(starts[hung.spec.url], starts[hung.spec.url][1:])]
    fine_gaps = [b - a for a, b in zip(starts[fine.spec.url], starts[fine.spec.url][1:])]
    # The hung worker: a new probe as soon as the last timed out (0.5 s), never skipped.
    assert len(hung_gaps) >= 3 and all(0.45 < gap < 0.75 for gap in hung_gaps), hung_gaps
    # The other worker keeps its 0.2 s interval meanwhile.
    assert len(fine_gaps) >= 7 and all(0.15 < gap < 0.45 for gap in fine_gaps), fine_gaps
    # Failure threshold 3 at one probe per 0.5 s: NotReady after the third timeout.
    assert hung.status == WorkerStatus.NOT_READY


# --- end to end: real gateway, real mock workers ------------------------------------------------


@contextlib.contextmanager
def _mocks(count: int) -> Iterator[list[mockutil.MockWorkers]]:
    """`count` mock workers, one process each (so one can be SIGSTOPped alone)."""
    started: list[mockutil.MockWorkers] = []
    try:
        for _ in range(count):
            started.append(mockutil.start_mock_workers(1))
        yield started
    finally:
        for mocks in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(mocks.proc.pid, signal.SIGCONT)
            mocks.stop()


def _control_plane_pid(gw: Gateway) -> int:
    """The launch process's child that serves the metrics port: the control plane."""
    assert gw.process is not None
    port = int(gw.metrics_url.rsplit(":", 1)[1].split("/")[0])
    for child in psutil.Process(gw.process.pid).children():
        with contextlib.suppress(psutil.Error):
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return child.pid
    raise AssertionError("no control-plane process found")


def _workers(gw: Gateway) -> list[dict[str, Any]]:
    answer = gw.admin("GET", "/workers")
    assert answer.status_code == 200, answer.text
    return answer.json()["workers"]


def _by_url(gw: Gateway, url: str) -> dict[str, Any] | None:
    return next((w for w in _workers(gw) if w["url"] == url), None)


def _replace_control_plane(gw: Gateway) -> None:
    old = _control_plane_pid(gw)
    os.kill(old, signal.SIGKILL)

    def replaced() -> bool:
        return _control_plane_pid(gw) != old and gw.admin("GET", "/workers").status_code == 200

    wait_until(replaced, 15.0, "a replacement control plane answering /workers")


def test_control_plane_replacement_keeps_deletions_and_every_spec_field() -> None:
    with _mocks(3) as (one, two, three):
        urls = [one.urls[0], two.urls[0]]
        with running_gateway(["--worker-urls", *urls, "--health-check-interval-secs", "1"]) as gw:
            for url in urls:
                wait_until(lambda u=url: _by_url(gw, u)["status"] == "ready", 15.0, "ready")
            # Item 15: a start-up worker removed with DELETE stays removed.
            removed = _by_url(gw, urls[1])
            assert removed is not None
            assert gw.admin("DELETE", f"/workers/{removed['id']}").status_code == 202
            wait_until(lambda: _by_url(gw, urls[1]) is None, 10.0, "the deletion")
            # Item 22: a worker with every optional field, then patched.
            spec = {
                "url": three.urls[0],
                "model_id": "mock-model",
                "api_key": "sk-test",
                "labels": {"zone": "a"},
                "priority": 7,
                "cost": 2.5,
                "health": {"timeout_secs": 2, "check_interval_secs": 1, "failure_threshold": 1},
            }
            added = gw.admin("POST", "/workers", json=spec).json()
            patch = {"labels": {"rack": "r1"}, "health": {"success_threshold": 1}}
            assert (
                gw.admin("PATCH", f"/workers/{added['worker_id']}", json=patch).status_code == 202
            )
            before = gw.admin("GET", f"/workers/{added['worker_id']}").json()
            assert before["health"] == {
                "timeout_secs": 2,
                "check_interval_secs": 1,
                "success_threshold": 1,
                "failure_threshold": 1,
            }

            _replace_control_plane(gw)

            listed = _workers(gw)
            assert sorted(w["url"] for w in listed) == sorted([urls[0], three.urls[0]])
            after = gw.admin("GET", f"/workers/{added['worker_id']}").json()
            for field in ("url", "model_id", "labels", "priority", "cost", "health", "worker_type"):
                assert after[field] == before[field], field
            assert after["labels"] == {"zone": "a", "rack": "r1"}
            # The overrides still apply after the replacement: failure_threshold 1 and a
            # 1 s interval mark this worker NotReady at its first failed probe, while the
            # gateway-wide threshold (3) keeps the other one Ready a while longer.
            mockutil.set_config(three.urls[0], healthy=False)
            mockutil.set_config(urls[0], healthy=False)
            try:
                wait_until(
                    lambda: _by_url(gw, three.urls[0])["status"] == "not_ready", 4.0, "not ready"
                )
                assert _by_url(gw, urls[0])["status"] == "ready"
            finally:
                mockutil.set_config(three.urls[0], healthy=True)
                mockutil.set_config(urls[0], healthy=True)
            # The API key survived too: the replacement's probes still carry it.
            mockutil.reset_stats(three.urls[0])

            def probed_with_key() -> bool:
                seen = mockutil.stats(three.urls[0])["last_request_by_route"]["/health"]
                return seen["header_map"].get("authorization") == "Bearer sk-test"

            wait_until(probed_with_key, 5.0, "a probe with the worker's key")


def test_per_worker_health_overrides_apply() -> None:
    # Gateway-wide: one probe a minute. The strict worker overrides interval and
    # threshold; only it notices its failure within seconds.
    with _mocks(2) as (strict, lenient), running_gateway([]) as gw:
        body = {
            "url": strict.urls[0],
            "health": {"check_interval_secs": 1, "timeout_secs": 1, "failure_threshold": 1},
        }
        assert gw.admin("POST", "/workers", json=body).status_code == 202
        assert gw.admin("POST", "/workers", json={"url": lenient.urls[0]}).status_code == 202
        for url in (strict.urls[0], lenient.urls[0]):
            wait_until(lambda u=url: _by_url(gw, u)["status"] == "ready", 10.0, "ready")
        for url in (strict.urls[0], lenient.urls[0]):
            mockutil.set_config(url, healthy=False)
        wait_until(lambda: _by_url(gw, strict.urls[0])["status"] == "not_ready", 4.0, "not ready")
        assert _by_url(gw, lenient.urls[0])["status"] == "ready"
        mockutil.set_config(strict.urls[0], healthy=True)
        # success_threshold 2 at a 1 s interval.
        wait_until(lambda: _by_url(gw, strict.urls[0])["status"] == "ready", 4.0, "back")


def test_sigstopped_worker_is_probed_every_round_like_the_rust_smg() -> None:
    """Interval 2 s, timeout 3 s, thresholds 3/2, the worker SIGSTOPped just after a probe
    answered. Each probe starts one interval after the last one started, or when it timed
    out if that took longer (as in the Rust SMG, which with interval 1 s and timeout 3 s
    took 9.62 s to mark a SIGSTOPped mock worker not ready, and 1.01 s to take it back):
    probes start at +2, +5 and +8 s and the third fails at +11 s. Skipping a round while a
    probe is in flight (the old loop) started them at +2, +6 and +10: not ready at +13 s."""
    with _mocks(2) as (stopped, other):
        args = [
            "--worker-urls",
            stopped.urls[0],
            other.urls[0],
            "--health-check-interval-secs",
            "2",
            "--health-check-timeout-secs",
            "3",
        ]
        with running_gateway(args, processes=1) as gw:
            for url in (stopped.urls[0], other.urls[0]):
                wait_until(lambda u=url: _by_url(gw, u)["status"] == "ready", 15.0, "ready")

            def health_probes() -> int:
                return mockutil.stats(stopped.urls[0])["requests_by_route"].get("/health", 0)

            seen = health_probes()
            wait_until(lambda: health_probes() > seen, 5.0, "a health probe")
            os.kill(stopped.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                wait_until(
                    lambda: _by_url(gw, stopped.urls[0])["status"] == "not_ready", 25.0, "down"
                )
                down = time.monotonic() - t0
                assert _by_url(gw, other.urls[0])["status"] == "ready"
            finally:
                os.kill(stopped.proc.pid, signal.SIGCONT)
            t1 = time.monotonic()
            wait_until(lambda: _by_url(gw, stopped.urls[0])["status"] == "ready", 10.0, "back")
            back = time.monotonic() - t1
            assert 10.0 < down < 12.3, down
            assert back < 3.0, back
            # Item 27: routine status moves are INFO, a worker turning unhealthy WARNING.
            logs = gw.logs()
            assert f"{stopped.urls[0]}: PENDING -> READY" in logs
            for line in logs.splitlines():
                if "-> READY" in line:
                    assert " INFO [" in line, line
                if "READY -> NOT_READY" in line:
                    assert " WARNING [" in line, line


# --- item 32/33: the Rust SMG 1.13 admin schemas, loads stamped ---------------------------------

# Rust fields smg does not report, with the reason. Everything else in the fixture must be
# present in smg's answer with the same JSON type.
OMITTED = {
    # Rust's ModelCard details from the engine's model info; smg keeps id, type, length.
    "models[].hf_model_type",
    "models[].architectures",
    "models[].tokenizer_path",
    # Rust's per-worker connection retry budget; smg has no such setting.
    "max_connection_attempts",
    # Fields of SGLang's /v1/loads that smg's load parsers do not keep.
    "loads[].num_used_tokens",
    "loads[].max_total_num_tokens",
    "loads[].cache_hit_rate",
    "loads[].utilization",
    "loads[].max_running_requests",
    "aggregate.avg_utilization",
}


def _check(facts: Any, value: Any, path: str, problems: list[str]) -> None:
    name = path.rsplit(".", 1)[-1]
    if any(path.endswith(o) or name == o for o in OMITTED):
        return
    types = {"string": str, "integer": int, "number": float, "boolean": bool}
    if isinstance(facts, str):
        ok = isinstance(value, types[facts]) and not (
            facts == "integer" and isinstance(value, bool)
        )
        if not ok:
            problems.append(f"{path}: {facts} expected, got {value!r}")
        return
    ((kind, inner),) = facts.items()
    if kind == "array":
        if not isinstance(value, list) or not value:
            problems.append(f"{path}: non-empty array expected, got {value!r}")
            return
        for item in value:
            _check(inner, item, path + "[]", problems)
    elif kind == "map":
        if not isinstance(value, dict):
            problems.append(f"{path}: object expected, got {value!r}")
            return
        for key, item in value.items():
            _check(inner, item, f"{path}.{key}", problems)
    else:
        if not isinstance(value, dict):
            problems.append(f"{path}: object expected, got {value!r}")
            return
        for key, sub in inner.items():
            child = f"{path}.{key}" if path else key
            if any(child.endswith(o) for o in OMITTED):
                continue
            if key not in value:
                problems.append(f"{child}: missing")
                continue
            _check(sub, value[key], child, problems)


def test_admin_answers_match_the_rust_smg_schemas_and_loads_are_stamped() -> None:
    facts = json.loads(FIXTURE.read_text())
    with _mocks(1) as (mock,):
        args = ["--worker-urls", mock.urls[0], "--load-monitor-interval", "1"]
        with running_gateway(args, processes=1) as gw:
            gw.admin("PATCH", f"/workers/{_workers(gw)[0]['id']}", json={"labels": {"zone": "a"}})

            def polled() -> float:
                worker = _workers(gw)[0]
                return worker["backend_load"]["valid"] and worker["backend_load"]["updated"]

            first = wait_until(polled, 10.0, "a load poll")
            # Item 33: `updated` is the poll's wall-clock time, and moves with each poll.
            assert abs(first - time.time()) < 5.0
            wait_until(lambda: polled() > first, 5.0, "a later poll")
            answers = {
                "GET /workers": gw.admin("GET", "/workers").json(),
                "GET /workers/{id}": gw.admin("GET", f"/workers/{_workers(gw)[0]['id']}").json(),
                "GET /get_loads": gw.admin("GET", "/get_loads").json(),
            }
    problems: list[str] = []
    for route, answer in answers.items():
        _check(facts[route], answer, "", problems)
    assert not problems, problems
    model = answers["GET /workers/{id}"]["models"][0]
    assert model["id"] == "mock-model" and model["context_length"] == 32768
    assert answers["GET /workers/{id}"]["runtime_type"] == "sglang"
    assert answers["GET /get_loads"]["loads"][0]["worker"] == mock.urls[0]


def test_start_up_workers_are_not_reregistered_by_a_replacement_without_deletions() -> None:
    """The replacement takes the table as it is: same ids, no duplicates."""
    with (
        _mocks(1) as (mock,),
        running_gateway(["--worker-urls", mock.urls[0]], processes=1) as gw,
    ):
        before = [w["id"] for w in _workers(gw)]
        _replace_control_plane(gw)
        assert [w["id"] for w in _workers(gw)] == before


def test_a_worker_policy_label_that_reads_loads_has_them_polled() -> None:
    """--disable-load-monitoring with overload protection off: after the onboarding poll
    nothing is polled until a worker's `policy` label names a policy that reads the loads
    (power_of_two)."""
    with _mocks(1) as (mock,):
        args = [
            "--worker-urls",
            mock.urls[0],
            "--policy",
            "round_robin",
            "--disable-load-monitoring",
            "--disable-worker-overload-protection",
            "--load-monitor-interval",
            "1",
        ]
        with running_gateway(args, processes=1) as gw:
            # One poll when the worker is onboarded, then none.
            first = wait_until(
                lambda: _workers(gw)[0]["backend_load"]["updated"], 10.0, "the onboarding poll"
            )
            time.sleep(2.5)  # two poll intervals
            assert _workers(gw)[0]["backend_load"]["updated"] == first
            worker_id = _workers(gw)[0]["id"]
            patched = gw.admin(
                "PATCH", f"/workers/{worker_id}", json={"labels": {"policy": "power_of_two"}}
            )
            assert patched.status_code == 202, patched.text
            wait_until(
                lambda: _workers(gw)[0]["backend_load"]["updated"] > first, 10.0, "a load poll"
            )
