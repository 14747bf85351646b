"""Metrics exposition, the metrics bind address and worker-URL paths (issue 6: 12, 23, 25).

Pure parts (the one Prometheus renderer, the bind-address rule, the data plane's samples
over IPC) are tested directly; the whole /metrics answer is tested on a running gateway
with two data-plane processes and registered workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import mockutil
import msgspec
import psutil
import pytest
from gatewayutil import Gateway, interleaved, pinned_clients, promtool_check
from prometheus_client.parser import text_string_to_metric_families

from smg import ipc
from smg.config import GatewayConfig, prometheus_bind_host
from smg.dataplane.metrics import DataPlaneMetrics
from smg.promtext import Family, Sample, decode_families, render

# A served model name with every character that can break a label value.
ODD_MODEL = 'odd"model\\x}y\nz'


def _parse(text: str) -> list[Any]:
    """prometheus_client's families; fails if one family name appears twice (split)."""
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, f"families split into pieces: {repeated}"
    return families


# --- the renderer -----------------------------------------------------------------------------


def test_render_merges_families_across_processes_and_escapes() -> None:
    def process(index: int) -> list[Family]:
        proc = ("process", str(index))
        return [
            Family(
                "smg_router_requests_total",
                "counter",
                "Routed\\requests\nby model",
                [Sample("", [proc, ("model", ODD_MODEL)], 3 + index)],
            ),
            Family(
                "smg_http_request_duration_seconds",
                "histogram",
                "Duration",
                [
                    Sample("_bucket", [proc, ("le", "0.5")], 1),
                    Sample("_bucket", [proc, ("le", "+Inf")], 2),
                    Sample("_sum", [proc], 0.75),
                    Sample("_count", [proc], 2),
                ],
            ),
        ]

    gauge = Family("smg_gateway_in_flight_requests", "gauge", "In flight", [Sample("", [], 0)])
    text = render([*process(0), gauge, *process(1)])
    assert text.count("# TYPE smg_router_requests_total counter") == 1
    assert text.count("# HELP smg_router_requests_total ") == 1
    assert "# HELP smg_router_requests_total Routed\\\\requests\\nby model\n" in text
    families = {f.name: f for f in _parse(text)}
    routed = families["smg_router_requests"]  # the parser drops _total from counter names
    assert [(s.labels["process"], s.labels["model"], s.value) for s in routed.samples] == [
        ("0", ODD_MODEL, 3.0),
        ("1", ODD_MODEL, 4.0),
    ]
    histogram = families["smg_http_request_duration_seconds"]
    assert histogram.type == "histogram"
    assert [s.name for s in histogram.samples] == [
        "smg_http_request_duration_seconds_bucket",
        "smg_http_request_duration_seconds_bucket",
        "smg_http_request_duration_seconds_sum",
        "smg_http_request_duration_seconds_count",
    ] * 2
    assert families["smg_gateway_in_flight_requests"].samples[0].value == 0.0
    promtool_check(text)


def test_render_values_and_empty_families() -> None:
    text = render(
        [
            Family("a", "gauge", "h", [Sample("", [], 3), Sample("", [("k", "v")], 0.25)]),
            Family("b", "gauge", "h", [Sample("", [], float("inf")), Sample("", [], float("nan"))]),
            Family("c_total", "counter", "no series yet", []),
        ]
    )
    assert text.splitlines() == [
        "# HELP a h",
        "# TYPE a gauge",
        "a 3",
        'a{k="v"} 0.25',
        "# HELP b h",
        "# TYPE b gauge",
        "b +Inf",
        "b NaN",
        "# HELP c_total no series yet",
        "# TYPE c_total counter",
    ]
    assert render([]) == ""
    with pytest.raises(ValueError, match="unknown metric kind"):
        render([Family("d", "summary", "h", [])])


def test_dataplane_families_survive_the_ipc_codec() -> None:
    metrics = DataPlaneMetrics(buckets=(0.1, 1.0))
    metrics.request("POST", "/v1/chat/completions")
    metrics.response("/v1/chat/completions", 200, "")
    metrics.duration("POST", "/v1/chat/completions", 0.05)
    metrics.routed_request(ODD_MODEL, "/v1/chat/completions", streaming=True)
    metrics.connections_active = 2
    sent = metrics.families(1)
    frame = ipc.encode_frame(sent)
    received = decode_families(msgspec.msgpack.decode(frame[4:]))
    assert received == sent
    text = render(received)
    assert text.count("# TYPE ") == len(sent)  # one per family, however many there are
    assert 'smg_http_request_duration_seconds_bucket{process="1",' in text
    assert 'model="odd\\"model\\\\x}y\\nz"' in text
    with pytest.raises(msgspec.ValidationError):
        decode_families([["name", "gauge"]])


# --- the metrics bind address -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "prometheus_host", "expected"),
    [
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.2", None, "127.0.0.2"),
        ("::1", None, "::1"),
        ("localhost", None, "localhost"),
        ("0.0.0.0", None, "0.0.0.0"),
        ("10.1.2.3", None, "0.0.0.0"),
        ("::", None, "::"),
        ("fd00::1", None, "::"),
        ("127.0.0.1", "0.0.0.0", "0.0.0.0"),
        ("0.0.0.0", "127.0.0.1", "127.0.0.1"),
    ],
)
def test_prometheus_bind_host(host: str, prometheus_host: str | None, expected: str) -> None:
    cfg = GatewayConfig(host=host, prometheus_host=prometheus_host)
    assert prometheus_bind_host(cfg) == expected


# --- a running gateway --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Gateway, list[str]]]:
    with (
        mockutil.start_mock_workers(2, "--model", "mock-model") as main,
        mockutil.start_mock_workers(1, "--model", ODD_MODEL) as odd,
    ):
        urls = [*main.urls, odd.url]
        gw = Gateway(
            [
                "--worker-urls",
                *urls,
                "--policy",
                "round_robin",
                "--health-check-interval-secs",
                "1",
                "--worker-startup-check-interval",
                "1",
            ],
            processes=2,
        )
        gw.start()
        try:
            _wait_all_ready(gw, len(urls))
            yield gw, urls
        finally:
            gw.stop()
            gw.close_log()


def _wait_all_ready(gw: Gateway, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = gw.admin("GET", "/workers").json()
        ready = [w for w in listing["workers"] if w.get("status") == "ready"]
        if len(ready) == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"workers not ready in {timeout} s:\n{gw.logs()[-3000:]}")


def _chat(gw: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # A fresh connection each time, so the kernel spreads requests over both processes.
    with httpx.Client(timeout=10.0) as client:
        return client.post(gw.url + "/v1/chat/completions", json=body)


def test_whole_metrics_answer_parses_once_per_family(gateway: tuple[Gateway, list[str]]) -> None:
    gw, urls = gateway
    served: set[str] = set()
    for i in range(200):  # bounded: stops as soon as both processes served both models
        answer = _chat(gw, ODD_MODEL if i % 2 else "mock-model")
        assert answer.status_code == 200, answer.text
        served.add(answer.headers["x-smg-process"])
        if served == {"0", "1"} and i >= 3:
            break
    assert served == {"0", "1"}

    answer = httpx.get(gw.metrics_url, timeout=10.0)
    assert answer.status_code == 200
    text = answer.text
    families = {f.name: f for f in _parse(text)}
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    for name in ("smg_http_requests_total", "smg_router_requests_total", "smg_worker_health"):
        assert text.count(f"# TYPE {name} ") == 1, name
        assert text.count(f"# HELP {name} ") == 1, name

    types = {name: f.type for name, f in families.items()}
    assert types == {
        "smg_http_requests": "counter",
        "smg_http_responses": "counter",
        "smg_http_request_duration_seconds": "histogram",
        "smg_router_requests": "counter",
        "smg_http_connections_active": "gauge",
        "smg_worker_health": "gauge",
        "smg_worker_requests_active": "gauge",
        "smg_engine_running_requests": "gauge",
        "smg_engine_waiting_requests": "gauge",
        "smg_engine_token_usage": "gauge",
        "smg_worker_health_checks": "counter",
        "smg_gateway_in_flight_requests": "gauge",
        "smg_dataplane_restarts": "counter",
        "smg_config_reloads": "counter",
        # Circuit breakers, liveness and overload protection (issue 7).
        "smg_worker_cb_state": "gauge",
        "smg_worker_cb_consecutive_failures": "gauge",
        "smg_worker_cb_consecutive_successes": "gauge",
        "smg_worker_cb_transitions": "counter",
        "smg_worker_cb_outcomes": "counter",
        "smg_worker_stalled": "gauge",
        "smg_workers_overloaded": "gauge",
        "smg_worker_overload_shed": "counter",
        "smg_worker_overload_fallback": "counter",
        "smg_worker_liveness_fallback": "counter",
        # Admission control (issue 7), on by default (the limit derived from the host).
        "smg_http_rate_limit": "counter",
        "smg_admission_queue_rejected": "counter",
        "smg_admission_queued": "counter",
        "smg_admission_queue_cancelled": "counter",
        "smg_admission_queue_wait_seconds": "histogram",
        "smg_admission_inflight": "gauge",
        "smg_admission_queue_depth": "gauge",
        "smg_gateway_admission_inflight": "gauge",
        "smg_gateway_admission_queue_depth": "gauge",
        "smg_worker_retries": "counter",
        "smg_worker_retries_exhausted": "counter",
        "smg_worker_retry_backoff_seconds": "histogram",
        # The gateway's own observability (issue 8).
        "smg_gateway_overhead_seconds": "histogram",
        "smg_event_loop_lag_seconds": "histogram",
        "smg_http_accept_to_request_seconds": "histogram",
        "smg_upstream_connect_seconds": "histogram",
        "smg_upstream_pool_hits": "counter",
        "smg_upstream_pool_misses": "counter",
        # For deploy/'s dashboard and alerts (issue 12).
        "smg_router_ttft_seconds": "histogram",
        "smg_dataplane_processes": "gauge",
        "smg_dataplane_heartbeat_age_seconds": "gauge",
        "smg_dataplane_heartbeat_timeout_seconds": "gauge",
    }
    processes = {s.labels["process"] for s in families["smg_http_requests"].samples}
    assert processes == {"0", "1"}
    models = {s.labels["model"] for s in families["smg_router_requests"].samples}
    assert models == {"mock-model", ODD_MODEL}
    health = {s.labels["worker"]: s.value for s in families["smg_worker_health"].samples}
    assert health == dict.fromkeys(urls, 1.0)
    promtool_check(text)


def test_metrics_listen_on_loopback_with_a_loopback_host(
    gateway: tuple[Gateway, list[str]],
) -> None:
    gw, _urls = gateway
    port = int(gw.metrics_url.rsplit(":", 1)[1].split("/")[0])
    listening = {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"}


def test_worker_url_path_prefixes_every_route(gateway: tuple[Gateway, list[str]]) -> None:
    """A worker behind a path (`--root-path` in vLLM) gets its probes and its requests under
    that path, as the Rust SMG 1.13 joins URL and route; a trailing `/` is no path."""
    gw, urls = gateway
    with mockutil.start_mock_workers(
        1, "--model", "prefixed-model", "--root-path", "/prefix/v2"
    ) as prefixed:
        url = prefixed.url + "/prefix/v2/"
        answer = gw.admin("POST", "/workers", json={"url": url})
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 20
        worker: dict[str, object] = {}
        while time.monotonic() < deadline:
            listing = gw.admin("GET", "/workers").json()["workers"]
            worker = next(w for w in listing if w["url"] == url.rstrip("/"))
            if worker["status"] == "ready":  # /prefix/v2/health answered
                break
            time.sleep(0.2)
        assert worker["status"] == "ready", worker
        # Twice from each process; the mock answers 404 outside its prefix.
        body = {"model": "prefixed-model", "messages": [{"role": "user", "content": "hi"}]}
        served: list[str] = []
        with pinned_clients(gw.url, 2) as pinned:
            for client in interleaved(pinned):
                chat = client.post("/v1/chat/completions", json=body)
                assert chat.status_code == 200, chat.text
                assert chat.json()["model"] == "prefixed-model"
                served.append(chat.headers["x-smg-process"])
        assert served == ["0", "1"] * 2
        gw.admin("DELETE", f"/workers/{worker['id']}")
    listing = gw.admin("GET", "/workers").json()["workers"]
    assert sorted(w["url"] for w in listing) == sorted(urls)
