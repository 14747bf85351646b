"""`smg launch --pd-disaggregation --mock-workers N`: the embedded default runs PD on N
SGLang-style prefill mocks (each with its bootstrap server) and N decode mocks, which
check the bootstrap fields and the prefill's room (smg/mock_worker/pd.py), so a request
that succeeds proves both legs met. Through `smg launch --processes 2`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests import mockutil
from tests.gatewayutil import running_gateway, wait_until

GENERATE = {"text": "one two three four", "sampling_params": {"max_new_tokens": 3}}


def _rooms(url: str, bootstrap_port: int) -> list[dict[str, Any]]:
    host = url.rsplit(":", 1)[0]
    status, data = mockutil.request_json("GET", f"{host}:{bootstrap_port}/pd/rooms")
    assert status == 200, data
    return list(data["rooms"])


def test_launch_pd_with_mock_workers_runs_pd_on_prefill_and_decode_mocks() -> None:
    args = ["--pd-disaggregation", "--mock-workers", "2", "--policy", "round_robin"]
    with running_gateway(args, processes=2) as gw:
        gw.wait_ready(timeout=30)
        listed = gw.admin("GET", "/workers").json()
        assert listed["stats"] == {"prefill_count": 2, "decode_count": 2, "regular_count": 0}
        prefills = [w for w in listed["workers"] if w["worker_type"] == "prefill"]
        decodes = [w for w in listed["workers"] if w["worker_type"] == "decode"]
        assert all(isinstance(w["bootstrap_port"], int) for w in prefills)
        assert all("bootstrap_port" not in w for w in decodes)
        wait_until(
            lambda: httpx.get(gw.url + "/readiness", timeout=5.0).status_code == 200,
            15.0,
            "PD readiness",
        )
        with gw.client() as client:
            for _ in range(4):
                answer = client.post("/generate", json=GENERATE)
                assert answer.status_code == 200, answer.text
            with client.stream(
                "POST", "/v1/chat/completions",
                json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3, "stream": True},
            ) as s:  # fmt: skip
                assert s.status_code == 200
                assert s.read().decode().rstrip().endswith("data: [DONE]")
        # Round robin over 2 prefills: each prefill's bootstrap server saw rooms, all
        # of them prefilled (a decode answers only after its room is ready).
        rooms = [_rooms(w["url"], w["bootstrap_port"]) for w in prefills]
        assert sum(len(r) for r in rooms) == 5
        assert all(r for r in rooms), rooms
        assert {room["state"] for r in rooms for room in r} == {"ready"}
        # Every decode mock answered at least one request (round robin) and none failed.
        for w in decodes:
            pd = mockutil.stats(w["url"])["pd"]
            assert pd["kv_failures"] == 0


def test_launch_pd_with_mock_workers_refuses_a_vllm_mock_engine() -> None:
    from tests.gatewayutil import run_launch

    code, output, _ = run_launch(
        ["--pd-disaggregation", "--mock-workers", "1", "--mock-worker-engine", "vllm"]
    )
    assert code == 2
    assert "imitate SGLang only" in output


def test_bench_embedded_runs_pd_through_gateway_args(tmp_path: Path) -> None:
    """`smg bench --embedded --gateway-args=--pd-disaggregation`: the embedded gateway's
    --mock-workers become prefill/decode pairs; every request passes both legs (the decode
    mock fails a request whose prefill never came)."""
    import json
    import uuid

    from tests.benchutil import bench_command, marked, run_bench

    marker = f"emb-pd-{uuid.uuid4().hex[:10]}"
    command = bench_command(
        marker,
        "--gateway-args=--pd-disaggregation",
        "--num-prompts", "12",
        "--random-output-len", "10",
        "--request-rate", "100",
        "--save-result",
        "--result-filename", "r.json",
    )  # fmt: skip
    code, text = run_bench(command, tmp_path)
    assert code == 0, text
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 12 and result["failed"] == 0, result
    assert result["total_output_tokens"] == 12 * 10
    assert marked(marker) == []  # gateway, prefill and decode mocks all stopped
