"""The gateway's own observability series (issue 8): overhead per request, event-loop lag,
accept to first request, upstream connect time, upstream pool hits and misses.

The counting is tested on `DataPlaneMetrics` directly; the series are checked on a real
`smg launch` in front of a mock worker, and promtool (when installed) reads the page.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import mockutil
from gatewayutil import promtool_check, running_gateway
from prometheus_client.parser import text_string_to_metric_families

from smg.dataplane.metrics import DataPlaneMetrics
from smg.dataplane.upstream import WorkerPool

CHAT = "/v1/chat/completions"
NEW_FAMILIES = {
    "smg_gateway_overhead_seconds": "histogram",
    "smg_event_loop_lag_seconds": "histogram",
    "smg_http_accept_to_request_seconds": "histogram",
    "smg_upstream_connect_seconds": "histogram",
    "smg_upstream_pool_hits": "counter",  # prometheus_client strips _total
    "smg_upstream_pool_misses": "counter",
}


def _families(text: str) -> dict[str, Any]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families) == len(list(text_string_to_metric_families(text))), "split family"
    return families


def _value(families: dict[str, Any], name: str, sample: str, **labels: str) -> float:
    total = 0.0
    for s in families[name].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


# --- pure: the samples -------------------------------------------------------------------------


def test_every_data_plane_series_has_the_process_label() -> None:
    metrics = DataPlaneMetrics()
    metrics.request("POST", CHAT)
    metrics.response(CHAT, 200, "")
    metrics.duration("POST", CHAT, 0.01)
    metrics.routed_request("m", CHAT, False)
    metrics.ttft("m", CHAT, "http", 0.2)
    metrics.retry(CHAT, 1, 0.05)
    metrics.retries_exhausted(CHAT)
    metrics.overhead.observe(0.0002)
    metrics.loop_lag.observe(0.003)
    metrics.accept_to_head.observe(0.0001)
    stats = metrics.pool("http://w:1")
    stats.hits += 3
    stats.misses += 1
    stats.connect.observe(0.0004)
    families = metrics.families(7)
    names = {f.name for f in families}
    assert {
        "smg_gateway_overhead_seconds",
        "smg_event_loop_lag_seconds",
        "smg_http_accept_to_request_seconds",
        "smg_upstream_connect_seconds",
        "smg_upstream_pool_hits_total",
        "smg_upstream_pool_misses_total",
    } <= names
    for family in families:
        assert family.samples, family.name
        for sample in family.samples:
            assert ("process", "7") in sample.labels, (family.name, sample)
    by_name = {f.name: f for f in families}
    hits = by_name["smg_upstream_pool_hits_total"].samples
    assert [(s.labels, s.value) for s in hits] == [
        ([("process", "7"), ("worker", "http://w:1")], 3)
    ]
    connect_count = [
        s for s in by_name["smg_upstream_connect_seconds"].samples if s.suffix == "_count"
    ]
    assert [s.value for s in connect_count] == [1]


def test_pool_numbers_outlive_the_pool() -> None:
    """A pool is dropped when its row is reused; its worker's counts stay (a counter never
    goes back) and the next pool for that URL adds to them."""
    import asyncio

    metrics = DataPlaneMetrics()
    loop = asyncio.new_event_loop()
    try:
        for _ in range(2):
            pool = WorkerPool(
                loop,
                "127.0.0.1",
                1,
                max_connections=1,
                idle_timeout=3.0,
                connect_timeout=1.0,
                stats=metrics.pool("http://127.0.0.1:1"),
            )
            pool.stats.misses += 1
    finally:
        loop.close()
    assert metrics.pool("http://127.0.0.1:1").misses == 2


# --- end to end --------------------------------------------------------------------------------


def test_new_families_on_a_running_gateway() -> None:
    requests = 6
    ttft_ms = 40
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, "--disable-health-check"], processes=1) as gw,
    ):
        gw.wait_ready()
        before = _families(gw.metrics())
        body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
        # One client connection (keep-alive) for every request: one accept measured.
        with httpx.Client(base_url=gw.url, timeout=10.0) as client:
            for _ in range(requests):
                r = client.post(CHAT, json=body, headers={"x-mock-ttft-ms": str(ttft_ms)})
                assert r.status_code == 200
            r = client.post(CHAT, json={**body, "stream": True})
            assert r.status_code == 200
            assert r.text.rstrip().endswith("data: [DONE]")
        time.sleep(1.2)  # at least two loop-lag probes (every 0.5 s)
        text = gw.metrics()
    promtool_check(text)
    families = _families(text)
    for name, kind in NEW_FAMILIES.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert sample.labels.get("process") == "0", (name, sample)
    proxied = requests + 1
    worker = {"worker": mocks.url}

    # Overhead: one observation per proxied request (the stream's head part only), above
    # zero, and far below the requests' durations (the worker's 40 ms are excluded).
    overhead_count = _value(
        families, "smg_gateway_overhead_seconds", "smg_gateway_overhead_seconds_count"
    )
    overhead_sum = _value(
        families, "smg_gateway_overhead_seconds", "smg_gateway_overhead_seconds_sum"
    )
    duration_sum = _value(
        families,
        "smg_http_request_duration_seconds",
        "smg_http_request_duration_seconds_sum",
        path=CHAT,
    )
    assert overhead_count == proxied
    assert 0.0 < overhead_sum < duration_sum
    assert duration_sum >= requests * ttft_ms / 1000
    assert overhead_sum < duration_sum - requests * ttft_ms / 1000 * 0.9

    # Upstream pool: one connection opened (a miss, connected once), every later request
    # on it kept alive (a hit).
    misses = _value(
        families, "smg_upstream_pool_misses", "smg_upstream_pool_misses_total", **worker
    )
    hits = _value(families, "smg_upstream_pool_hits", "smg_upstream_pool_hits_total", **worker)
    connects = _value(
        families, "smg_upstream_connect_seconds", "smg_upstream_connect_seconds_count", **worker
    )
    connect_sum = _value(
        families, "smg_upstream_connect_seconds", "smg_upstream_connect_seconds_sum", **worker
    )
    assert misses == 1, families["smg_upstream_pool_misses"].samples
    assert connects == misses
    assert hits == proxied - 1
    assert 0.0 < connect_sum < 1.0

    # Accept to first request: once for the one client connection (the readiness polls
    # before it were connections of their own; the scrapes go to the exporter's port).
    count = "smg_http_accept_to_request_seconds_count"
    accepts = _value(families, "smg_http_accept_to_request_seconds", count)
    assert accepts - _value(before, "smg_http_accept_to_request_seconds", count) == 1
    accept_sum = _value(
        families,
        "smg_http_accept_to_request_seconds",
        "smg_http_accept_to_request_seconds_sum",
    )
    assert 0.0 < accept_sum < accepts  # well below a second each on loopback

    # Event-loop lag: the probe ran (every 0.5 s), lateness small on an idle loop.
    lag_count = _value(families, "smg_event_loop_lag_seconds", "smg_event_loop_lag_seconds_count")
    lag_sum = _value(families, "smg_event_loop_lag_seconds", "smg_event_loop_lag_seconds_sum")
    assert lag_count >= 2
    assert 0.0 <= lag_sum < lag_count * 0.5
