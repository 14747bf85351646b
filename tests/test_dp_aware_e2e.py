"""--dp-aware end to end: `smg launch --processes 2 --dp-aware` in front of mock SGLang
engines that report a dp_size (`smg mock-worker --dp-size N`); each engine becomes
`url@rank` workers, every body sent carries a `data_parallel_rank` within [0, N) (the mock
answers 400 otherwise and counts the ranks it got), and ranks are chosen by load. The same
requests behind the Rust SMG 1.13 binary, for comparison."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import mockutil
from tests.gatewayutil import running_gateway, wait_until
from tests.pdutil import RUST_SMG, rust_smg

MODEL = "mock-model"
LEAST_REQUESTS = ["--policy", "power_of_two", "--power-of-two-load-metric", "least_requests"]
DP_TWO_ARGS = ["--dp-aware", *LEAST_REQUESTS, "--worker-urls"]


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[str, str, str]]:
    """Two mock SGLang engines, dp_size 3 and 4 (seven rank workers), and a vLLM engine,
    which has no /server_info: 1.13 registers it as one plain worker."""
    with (
        mockutil.start_mock_workers(1, "--engine", "sglang", "--dp-size", "3") as three,
        mockutil.start_mock_workers(1, "--engine", "sglang", "--dp-size", "4") as four,
        mockutil.start_mock_workers(1, "--engine", "vllm") as vllm,
    ):
        yield three.url, four.url, vllm.url


def _rank_view(workers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("url", "dp_base_url", "dp_rank", "dp_size")
    return sorted(tuple(w.get(k) for k in keys) for w in workers)


def _expected_view(engines: tuple[str, str, str]) -> list[tuple[Any, ...]]:
    three, four, vllm = engines
    return sorted(
        [(f"{three}@{r}", three, r, 3) for r in range(3)]
        + [(f"{four}@{r}", four, r, 4) for r in range(4)]
        + [(vllm, None, None, None)]
    )


def _all_ready(base: str, count: int) -> list[dict[str, Any]] | None:
    workers = httpx.get(base + "/workers", timeout=5).json()["workers"]
    ready = [w for w in workers if w["status"] == "ready"]
    return workers if len(ready) == count == len(workers) else None


BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 2}),
    ("/generate", {"text": "a b c", "sampling_params": {"max_new_tokens": 2}}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "s"}], "max_tokens": 2, "stream": True},
    ),
]


def _send_all(base: str, count: int) -> list[int]:
    """`count` requests one after another on one connection (one data-plane process)."""
    statuses = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for i in range(count):
            path, body = BODIES[i % len(BODIES)]
            answer = client.post(path, json={**body, "model": MODEL})
            statuses.append(answer.status_code)
    return statuses


EXPECTED_COUNTS = [{"0": 4, "1": 4, "2": 4}, {"0": 4, "1": 4, "2": 4, "3": 4}, {"none": 4}]


def _rank_counts(engines: tuple[str, str, str]) -> list[dict[str, int]]:
    return [mockutil.stats(url)["requests_by_dp_rank"] for url in engines]


def test_rank_workers_listed_and_every_request_carries_a_rank(
    engines: tuple[str, str, str],
) -> None:
    for url in engines:
        mockutil.reset_stats(url)
    with running_gateway(
        ["--worker-urls", *engines, "--dp-aware", "--policy", "round_robin"]
    ) as gw:
        workers = wait_until(lambda: _all_ready(gw.url, 8), 20, "eight ready workers")
        assert _rank_view(workers) == _expected_view(engines)
        assert {w["model_id"] for w in workers} == {MODEL}
        assert _send_all(gw.url, 32) == [200] * 32
        text = gw.metrics()
        series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line[:1] not in "#"]
        assert len(series) == len(set(series)), "a series repeated (rank workers' labels)"
        assert f'worker="{engines[0]}@2"' in text
    # round_robin in one process over eight rows: each worker got four, each rank worker's
    # with its own rank (none out of range), the vLLM worker's without one.
    assert _rank_counts(engines) == EXPECTED_COUNTS


def test_ranks_chosen_by_load_across_processes() -> None:
    # A two-rank engine under power_of_two on the gateway-wide in-flight count: both rows
    # are always the sampled pair, so each held request goes to the rank holding fewer.
    with (
        mockutil.start_mock_workers(1, "--engine", "sglang", "--dp-size", "2") as two,
        running_gateway([*DP_TWO_ARGS, two.url]) as gw,
    ):
        _held_requests_alternate(gw.url, two.url)


def _held_requests_alternate(base: str, engine: str) -> None:
    """Six held requests, each on its own connection, each sent once the one before is
    in flight at the engine: the ranks got three each."""
    wait_until(lambda: _all_ready(base, 2), 20, "two ready rank workers")
    # The engine holds each request 2 s (set on the mock: 1.13 does not forward x-mock-*).
    mockutil.set_config(engine, ttft_ms=2000.0)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        held = []
        for k in range(1, 7):
            held.append(pool.submit(_held_request, base))
            wait_until(lambda k=k: mockutil.stats(engine)["in_flight"] == k, 10, f"{k} held")
        assert mockutil.stats(engine)["requests_by_dp_rank"] == {"0": 3, "1": 3}
        assert [f.result(timeout=15) for f in held] == [200] * 6


def _held_request(base: str) -> int:
    """A request the engine holds, on a connection of its own."""
    answer = httpx.post(
        base + "/v1/chat/completions",
        # A rank the engine cannot serve (its mock answers 400): the gateway's replaces it.
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1,
            "data_parallel_rank": 99,
        },
        timeout=15,
    )
    return answer.status_code


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_1_13_does_the_same(engines: tuple[str, str, str]) -> None:
    """The same engines and requests behind the 1.13 binary: the same rank workers in
    /workers, the same per-rank counts (its round_robin is gateway-wide)."""
    for url in engines:
        mockutil.reset_stats(url)
    with rust_smg(["--worker-urls", *engines, "--dp-aware", "--policy", "round_robin"]) as url:
        workers = wait_until(lambda: _all_ready(url, 8), 20, "eight ready workers")
        assert _rank_view(workers) == _expected_view(engines)
        assert _send_all(url, 32) == [200] * 32
    assert _rank_counts(engines) == EXPECTED_COUNTS


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_1_13_ranks_by_load() -> None:
    with (
        mockutil.start_mock_workers(1, "--engine", "sglang", "--dp-size", "2") as two,
        rust_smg([*DP_TWO_ARGS, two.url]) as url,
    ):
        _held_requests_alternate(url, two.url)


def test_post_workers_expands_into_ranks(engines: tuple[str, str, str]) -> None:
    """POST /workers under --dp-aware: 202 with the addition's id (no worker's, as 1.13's),
    then the engine's rank workers; the same URL again adds nothing."""
    three, _four, vllm = engines
    mockutil.reset_stats(three)
    with running_gateway(["--worker-urls", vllm, "--dp-aware", "--policy", "round_robin"]) as gw:
        wait_until(lambda: _all_ready(gw.url, 1), 20, "the vLLM worker ready")
        answer = gw.admin("POST", "/workers", json={"url": three})
        assert answer.status_code == 202, answer.text
        added = answer.json()
        assert (added["status"], added["url"]) == ("accepted", three)
        workers = wait_until(lambda: _all_ready(gw.url, 4), 20, "three rank workers ready")
        assert [w for w in _rank_view(workers) if w[1] is not None] == [
            (f"{three}@{r}", three, r, 3) for r in range(3)
        ]
        assert added["worker_id"] not in {w["id"] for w in workers}
        assert gw.admin("POST", "/workers", json={"url": three}).status_code == 202
        time.sleep(0.5)  # an addition of ranks already there would show by now
        assert len(httpx.get(gw.url + "/workers", timeout=5).json()["workers"]) == 4
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            for _ in range(8):
                body = {"model": MODEL, "prompt": "p", "max_tokens": 1}
                assert client.post("/v1/completions", json=body).status_code == 200
    # round_robin in one process over four rows: two each, every rank pinned.
    assert mockutil.stats(three)["requests_by_dp_rank"] == {"0": 2, "1": 2, "2": 2}


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_1_13_pd_pins_ranks_with_routed_dp_rank() -> None:
    """What smg's PD mode would have to send (smg refuses --dp-aware with PD for now): the
    1.13 binary gives the prefill `routed_dp_rank`, the decode `routed_dp_rank` and
    `disagg_prefill_dp_rank`, and no `data_parallel_rank` (smg.dp.pd_rank_fields)."""
    with (
        mockutil.start_mock_workers(
            1,
            "--engine",
            "sglang",
            "--dp-size",
            "2",
            "--pd-role",
            "prefill",
            "--bootstrap-port",
            "0",
        ) as prefill,
        mockutil.start_mock_workers(
            1, "--engine", "sglang", "--dp-size", "2", "--pd-role", "decode"
        ) as decode,
    ):
        bootstrap = mockutil.stats(prefill.url)["pd"]["bootstrap_port"]
        pd = ["--pd-disaggregation", "--prefill", prefill.url, str(bootstrap)]
        with rust_smg([*pd, "--decode", decode.url, "--dp-aware"]) as url:
            wait_until(lambda: _all_ready(url, 4), 20, "four ready rank workers")
            with httpx.Client(base_url=url, timeout=10) as client:
                for _ in range(6):
                    body = {"text": "a b", "sampling_params": {"max_new_tokens": 2}}
                    assert client.post("/generate", json=body).status_code == 200
        for engine in (prefill.url, decode.url):
            counts = mockutil.stats(engine)["requests_by_dp_rank"]
            assert set(counts) <= {"0", "1"} and sum(counts.values()) == 6, counts
        last = mockutil.stats(decode.url)["last_request_by_route"]["/generate"]
        sent = json.loads(base64.b64decode(last["body_b64"]))
        assert "data_parallel_rank" not in sent and sent["disagg_prefill_dp_rank"] in (0, 1)
