"""PD disaggregation (issue 17): flags, worker specs, registry, /workers and readiness.

Pure parts (config, readiness) are checked directly with exact values; registration,
/workers and readiness end to end through `smg launch --processes 2` with mock workers.
The Rust SMG 1.13 facts each refusal is checked against are in docs/flags.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import mockutil
import pytest
from gatewayutil import Gateway, run_launch, running_gateway, wait_until

from smg.config import (
    ConfigError,
    PdWorker,
    load_config,
    pd_workers,
    prefill_admission,
)
from smg.control.registry import Registry
from smg.control.worker_state import Event, HealthThresholds, WorkerStatus
from smg.shm import layout
from smg.shm.readiness import readiness
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec, validate_worker_spec

PD = ["--pd-disaggregation", "--prefill", "http://127.0.0.1:9001"]
PD_PAIR = [*PD, "--decode", "http://127.0.0.1:9002"]
ADMISSION_ON = ["--prefill-max-inflight-requests-per-worker", "2"]

# --- flags ----------------------------------------------------------------------------------


def test_prefill_and_decode_flags_become_pd_workers() -> None:
    cfg = load_config(
        [
            "--pd-disaggregation",
            "--prefill",
            "http://127.0.0.1:9001",
            "9100",
            "--prefill",
            "http://localhost:9003/",
            "NONE",
            "--prefill",
            "http://127.0.0.1:9004",
            "--decode",
            "http://127.0.0.1:9002",
            "--prefill-policy",
            "round_robin",
            "--decode-policy",
            "power_of_two",
            "--decode",
            "http://127.0.0.1:9005",
        ],
        {},
    )
    assert cfg.prefill == [
        ["http://127.0.0.1:9001", "9100"],
        ["http://localhost:9003"],
        ["http://127.0.0.1:9004"],
    ]
    assert cfg.decode == ["http://127.0.0.1:9002", "http://127.0.0.1:9005"]
    assert pd_workers(cfg) == [
        PdWorker("http://127.0.0.1:9001", "prefill", 9100),
        PdWorker("http://localhost:9003", "prefill", None),
        PdWorker("http://127.0.0.1:9004", "prefill", None),
        PdWorker("http://127.0.0.1:9002", "decode", None),
        PdWorker("http://127.0.0.1:9005", "decode", None),
    ]
    assert (cfg.prefill_policy, cfg.decode_policy) == ("round_robin", "power_of_two")


def test_pd_defaults_are_1_13s() -> None:
    cfg = load_config([], {})
    assert (cfg.pd_disaggregation, cfg.prefill, cfg.decode) == (False, None, None)
    assert (cfg.prefill_policy, cfg.decode_policy) == (None, None)
    assert cfg.prefill_max_inflight_requests_per_worker == -1
    assert (cfg.prefill_queue_size, cfg.prefill_queue_timeout_secs) == (None, None)
    assert (cfg.pd_admission_wait_secs, cfg.bucket_adjust_interval_secs) == (30, 5)
    # A PD gateway may start with no worker at all: they come through POST /workers (1.13).
    assert pd_workers(load_config(["--pd-disaggregation"], {})) == []


def test_prefill_admission_takes_1_13s_queue_defaults_when_on() -> None:
    assert prefill_admission(load_config(PD_PAIR, {})) is None
    on = ["--prefill-max-inflight-requests-per-worker", "4"]
    assert prefill_admission(load_config([*PD_PAIR, *on], {})) == (4, 100, 60)
    both = [*on, "--prefill-queue-size", "0", "--prefill-queue-timeout-secs", "7"]
    assert prefill_admission(load_config([*PD_PAIR, *both], {})) == (4, 0, 7)


def test_prefill_entries_from_the_environment_and_a_file(tmp_path: Path) -> None:
    env = {
        "SMG_PD_DISAGGREGATION": "true",
        "SMG_PREFILL": "http://127.0.0.1:9001 9100, http://127.0.0.1:9003",
        "SMG_DECODE": "http://127.0.0.1:9002",
    }
    cfg = load_config([], env)
    assert cfg.prefill == [["http://127.0.0.1:9001", "9100"], ["http://127.0.0.1:9003"]]
    assert cfg.decode == ["http://127.0.0.1:9002"]
    path = tmp_path / "pd.yaml"
    path.write_text(
        "pd-disaggregation: true\n"
        "prefill: [[http://127.0.0.1:9001, 9100], 'http://127.0.0.1:9003 none']\n"
        "decode: [http://127.0.0.1:9002]\n"
    )
    cfg = load_config(["--config", str(path)], {})
    assert pd_workers(cfg) == [
        PdWorker("http://127.0.0.1:9001", "prefill", 9100),
        PdWorker("http://127.0.0.1:9003", "prefill", None),
        PdWorker("http://127.0.0.1:9002", "decode", None),
    ]


REFUSALS: list[tuple[list[str], str, str]] = [
    # 1.13 refuses these too (same reason)
    ([*PD, "abc", "--decode", "http://h:2"], "prefill", "invalid bootstrap port 'abc'"),
    ([*PD, "0"], "prefill", "bootstrap port must be 1-65535, got 0"),
    ([*PD, "70000"], "prefill", "bootstrap port must be 1-65535, got 70000"),
    (
        [*PD_PAIR, "--prefill-policy", "power_of_two"],
        "prefill_policy",
        "Power-of-two policy for prefill requires at least 2 prefill workers",
    ),
    (
        [*PD_PAIR, "--decode-policy", "power_of_two"],
        "decode_policy",
        "Power-of-two policy for decode requires at least 2 decode workers",
    ),
    ([*PD_PAIR, "--decode-policy", "bucket"], "decode_policy", "must be one of random,"),
    (
        [*PD_PAIR, "--prefill-queue-size", "5"],
        "prefill_queue_size",
        "Prefill queue options require --prefill-max-inflight-requests-per-worker to be positive",
    ),
    (
        [*PD_PAIR, *ADMISSION_ON, "--prefill-queue-timeout-secs", "0"],
        "prefill_queue_timeout_secs",
        "must be > 0 when the prefill queue is enabled",
    ),
    ([*PD_PAIR, "--pd-admission-wait-secs", "-1"], "pd_admission_wait_secs", "must be >= 0"),
    ([*PD_PAIR, "--pd-admission-wait-secs", "0.5"], "pd_admission_wait_secs", "an integer"),
    (["--epd-disaggregation"], "epd_disaggregation", "EPD (encode-prefill-decode)"),
    # 1.13 starts and ignores the setting silently; smg says so
    (["--prefill", "http://h:1"], "prefill", "needs --pd-disaggregation"),
    (["--decode", "http://h:1"], "decode", "needs --pd-disaggregation"),
    (
        [*PD_PAIR, "--worker-urls", "http://127.0.0.1:9009"],
        "worker_urls",
        "cannot be combined with --pd-disaggregation",
    ),
    ([*PD, "--decode", "http://127.0.0.1:9001"], "decode", "is listed twice"),
    ([*PD, "--prefill", "http://127.0.0.1:9001/"], "prefill", "is listed twice"),
    ([*PD_PAIR, "--backend", "openai"], "backend", "needs self-hosted engines"),
    (
        [*PD_PAIR, "--mock-workers", "2", "--mock-worker-engine", "vllm"],
        "mock_worker_engine",
        "imitate SGLang only",
    ),
    # 1.13 accepts these
    ([*PD, "9000", "extra"], "prefill", "takes URL [BOOTSTRAP_PORT]"),
    ([*PD_PAIR, "--enable-igw"], "enable_igw", "PD with IGW"),
]


@pytest.mark.parametrize(("argv", "key", "reason"), REFUSALS)
def test_pd_refusals(argv: list[str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(argv, {})
    assert caught.value.key == key
    assert reason in caught.value.reason, caught.value.reason


def test_dp_aware_is_accepted_with_pd() -> None:
    # As 1.13: each prefill/decode engine becomes url@rank workers (smg.dataplane.pd).
    assert load_config([*PD_PAIR, "--dp-aware"], {}).dp_aware


def test_bucket_interval_is_checked_only_with_the_bucket_policy() -> None:
    # As 1.13: 0 is accepted while no bucket policy reads it.
    assert load_config([*PD_PAIR, "--bucket-adjust-interval-secs", "0"], {}).prefill


def test_launch_refuses_pd_flags_without_pd_mode() -> None:
    code, err, _ = run_launch(["--prefill", "http://127.0.0.1:9", "--port", "0"])
    assert code == 2
    assert "prefill: needs --pd-disaggregation (from flag --prefill)" in err


# --- readiness (pure) -------------------------------------------------------------------------


def _table(capacity: int = 4) -> WorkerTable:
    geo = layout.geometry(capacity, 2, None)
    buf = bytearray(geo.total_size)
    layout.init_header(buf, geo, supervisor_pid=1)
    return WorkerTable(buf, geo)


def test_pd_readiness_needs_a_ready_prefill_and_a_ready_decode() -> None:
    table = _table()
    registry = Registry(table, HealthThresholds(), health_check_disabled=False)

    def answer(pd: bool = True) -> tuple[int, Any]:
        status, body = readiness(table, table.read_directory()[1].entries, pd=pd)
        return status, json.loads(body)

    def add(url: str, kind: str) -> Any:
        record = registry.add(validate_worker_spec(WorkerSpec(url=url, worker_type=kind)))
        registry.apply(record, Event.CONNECTED)
        return record

    not_ready = {"status": "not ready", "reason": "no prefill or decode worker is ready"}
    assert answer() == (503, not_ready)
    regular = add("http://127.0.0.1:9000", "regular")
    assert answer() == (503, not_ready)  # a regular worker does not count in PD mode
    assert answer(pd=False) == (
        200,
        {"status": "ready", "healthy_workers": 1, "total_workers": 1},
    )
    # (prefill and decode workers below never count outside PD mode: checked at the end)
    prefill = add("http://127.0.0.1:9001", "prefill")
    assert answer() == (503, {"status": "not ready", "reason": "no decode worker is ready"})
    decode = add("http://127.0.0.1:9002", "decode")
    ready = {
        "status": "ready",
        "healthy_workers": 3,  # as 1.13: every routable worker, the regular one too
        "total_workers": 3,
        "ready_prefill_workers": 1,
        "ready_decode_workers": 1,
    }
    assert answer() == (200, ready)
    registry.set_status(prefill, WorkerStatus.DRAINING)
    assert answer() == (503, {"status": "not ready", "reason": "no prefill worker is ready"})
    registry.set_status(prefill, WorkerStatus.READY)
    registry.remove(decode.worker_id)
    assert answer() == (503, {"status": "not ready", "reason": "no decode worker is ready"})
    assert regular.status == WorkerStatus.READY
    # Outside PD mode the regular worker decides; the prefill one is counted as healthy.
    assert answer(pd=False) == (
        200,
        {"status": "ready", "healthy_workers": 2, "total_workers": 2},
    )
    registry.remove(regular.worker_id)
    not_regular = {"status": "not ready", "reason": "insufficient healthy workers"}
    assert answer(pd=False) == (503, not_regular)


# --- end to end -----------------------------------------------------------------------------


def _workers(gw: Gateway) -> dict[str, Any]:
    return gw.admin("GET", "/workers").json()


def _readiness(gw: Gateway) -> tuple[int, Any]:
    # A new connection each time: with 2 processes, either may answer.
    answer = httpx.get(gw.url + "/readiness", timeout=5.0)
    return answer.status_code, answer.json()


def test_launch_registers_pd_workers_shows_them_and_gates_readiness() -> None:
    with mockutil.start_mock_workers(3, "--model", "m1") as mocks:
        p1, p2, d1 = mocks.urls
        args = ["--pd-disaggregation", "--prefill", p1, "9100", "--prefill", p2, "--decode", d1]
        with running_gateway([*args, "--health-check-interval-secs", "1"]) as gw:
            gw.wait_ready()
            listed = _workers(gw)
            assert listed["stats"] == {"prefill_count": 2, "decode_count": 1, "regular_count": 0}
            by_url = {w["url"]: w for w in listed["workers"]}
            assert (by_url[p1]["worker_type"], by_url[p1]["bootstrap_port"]) == ("prefill", 9100)
            # As 1.13: no bootstrap_port key when none was given.
            assert by_url[p2]["worker_type"] == "prefill" and "bootstrap_port" not in by_url[p2]
            assert by_url[d1]["worker_type"] == "decode" and "bootstrap_port" not in by_url[d1]
            ready = {
                "status": "ready",
                "healthy_workers": 3,
                "total_workers": 3,
                "ready_prefill_workers": 2,
                "ready_decode_workers": 1,
            }
            for _ in range(6):
                assert _readiness(gw) == (200, ready)
            # The decode leaves: not ready in every process; a decode POSTed: ready again.
            decode_id = by_url[d1]["id"]
            assert gw.admin("DELETE", f"/workers/{decode_id}").status_code == 202
            gone = (503, {"status": "not ready", "reason": "no decode worker is ready"})
            wait_until(lambda: _readiness(gw) == gone, 10.0, "readiness 503 without decode")
            for _ in range(6):
                assert _readiness(gw) == gone
            spec = {"url": d1, "worker_type": "decode"}
            assert gw.admin("POST", "/workers", json=spec).status_code == 202
            wait_until(lambda: _readiness(gw)[0] == 200, 15.0, "readiness with the new decode")
            for _ in range(6):
                assert _readiness(gw) == (200, ready)


def test_regular_mode_registers_a_prefill_worker_but_never_routes_to_it() -> None:
    with mockutil.start_mock_workers(2, "--model", "m1") as mocks:
        regular, prefill = mocks.urls
        with running_gateway(["--worker-urls", regular, "--policy", "round_robin"]) as gw:
            gw.wait_ready()
            spec = {"url": prefill, "worker_type": "prefill", "bootstrap_port": 9100}
            assert gw.admin("POST", "/workers", json=spec).status_code == 202

            def prefill_ready() -> bool:
                workers = _workers(gw)["workers"]
                return any(w["url"] == prefill and w["status"] == "ready" for w in workers)

            wait_until(prefill_ready, 15.0, "the prefill worker ready")
            mockutil.reset_stats(regular)
            mockutil.reset_stats(prefill)
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
            with gw.client() as client:
                for _ in range(8):
                    answer = client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
                    assert answer.status_code == 200, answer.text
            assert mockutil.stats(regular)["inference_answered"] == 8
            assert mockutil.stats(prefill)["inference_answered"] == 0
            # Readiness outside PD mode counts the regular worker only.
            healthy = {"status": "ready", "healthy_workers": 2, "total_workers": 2}
            assert _readiness(gw) == (200, healthy)
            # Over gRPC, PD workers register too (served in PD mode: smg.grpc.pd).
            grpc = {"url": "grpc://127.0.0.1:9", "worker_type": "decode"}
            answer = gw.admin("POST", "/workers", json=grpc)
            assert answer.status_code == 202, answer.text
            with gw.client() as client:  # the plain path still serves the regular worker
                answer = client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
                assert answer.status_code == 200, answer.text
            assert mockutil.stats(regular)["inference_answered"] == 9


def test_pd_policies_that_read_loads_keep_the_load_polls_on() -> None:
    from smg.control.plane import loads_always_polled

    quiet = ["--disable-load-monitoring", "--disable-worker-overload-protection"]
    assert loads_always_polled(load_config([*PD_PAIR, *quiet, "--policy", "random"], {})) is False
    for flag in ("--prefill-policy", "--decode-policy"):
        cfg = load_config([*PD_PAIR, *quiet, "--policy", "random", flag, "least_load"], {})
        assert loads_always_polled(cfg) is True


def test_a_prefill_whose_bootstrap_port_refuses_is_registered_warned_and_counted() -> None:
    import socket

    with (
        mockutil.start_mock_workers(3, "--model", "m1") as mocks,
        socket.socket() as bootstrap,
        socket.socket() as closed,
    ):
        bootstrap.bind(("127.0.0.1", 0))
        bootstrap.listen(4)  # a bootstrap server that accepts
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        open_port, closed_port = bootstrap.getsockname()[1], closed.getsockname()[1]
        p1, p2, d1 = mocks.urls
        args = ["--pd-disaggregation", "--prefill", p1, str(open_port)]
        args += ["--prefill", p2, str(closed_port), "--decode", d1]
        with running_gateway(args) as gw:
            gw.wait_ready()
            series = 'smg_pd_rendezvous_failures_total{leg="prefill",phase="probe"} 1'
            wait_until(lambda: series in gw.metrics(), 10.0, "the probe failure counted")
            logs = gw.logs()
            assert f"worker={p2} worker_type=prefill" in logs
            assert f"bootstrap_port={closed_port} bootstrap_port_source=registered" in logs
            assert logs.count("Bootstrap port did not accept a connection") == 1  # p1's took it
            assert _workers(gw)["stats"]["prefill_count"] == 2  # still registered


def test_a_reload_keeps_the_pd_topology() -> None:
    from smg.reload import plan_reload

    old = load_config(PD_PAIR, {})
    new = load_config([*PD, "--decode", "http://127.0.0.1:9003", "--prefill-policy", "bucket"], {})
    plan = plan_reload(old, new)
    assert [k[0] for k in plan.kept] == ["decode", "prefill_policy"]
    assert (plan.cfg.decode, plan.cfg.prefill_policy) == (["http://127.0.0.1:9002"], None)
