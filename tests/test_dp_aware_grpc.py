"""--dp-aware for gRPC workers, end to end: `smg launch --processes 2 --dp-aware` in front
of gRPC mock engines that report a dp_size in GetServerInfo (`smg mock-worker --grpc
--dp-size N`: SGLang's server_args.dp_size, vLLM's data_parallel_size). Each engine becomes
`url@rank` workers; every GenerateRequest sent to a rank worker carries its rank in
`data_parallel_rank` (the mock refuses one outside [0, N) and counts the ranks it got);
ranks are chosen by load; /flush_cache reaches each engine once. The same against the Rust
SMG 1.13 binary, for comparison."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2, sglang_scheduler_pb2_grpc

from tests import pdutil
from tests.gatewayutil import Gateway, wait_until
from tests.grpcmockutil import GrpcMock, llama3_dir, start_grpc_mock
from tests.pdutil import RUST_SMG, rust_smg

MODEL = "llama3"
LEAST_REQUESTS = ["--policy", "power_of_two", "--power-of-two-load-metric", "least_requests"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama3_dir(tmp_path_factory.mktemp("dp-grpc") / "model")


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> Iterator[tuple[GrpcMock, GrpcMock]]:
    """A gRPC SGLang engine with dp_size 3 and a gRPC vLLM engine with dp_size 2."""
    sglang = start_grpc_mock(model_dir, backend="sglang", args=["--dp-size", "3"])
    try:
        vllm = start_grpc_mock(model_dir, backend="vllm", args=["--dp-size", "2"])
        try:
            yield sglang, vllm
        finally:
            vllm.stop()
    finally:
        sglang.stop()


def _gateway(model_dir: Path, urls: list[str], *args: str) -> Gateway:
    gw = Gateway(
        ["--worker-urls", *urls, "--dp-aware", "--tokenizer-path", str(model_dir), *args],
        processes=2,
    )
    gw.start(timeout=60.0)
    return gw


def _ready(base: str, count: int) -> list[dict[str, Any]] | None:
    workers = httpx.get(base + "/workers", timeout=5).json()["workers"]
    ready = [w for w in workers if w["status"] == "ready"]
    return workers if len(ready) == count == len(workers) else None


def _rank_view(workers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("url", "dp_base_url", "dp_rank", "dp_size")
    return sorted(tuple(w.get(k) for k in keys) for w in workers)


def _expected_view(sglang: GrpcMock, vllm: GrpcMock) -> list[tuple[Any, ...]]:
    return sorted(
        [(f"{sglang.url}@{r}", sglang.url, r, 3) for r in range(3)]
        + [(f"{vllm.url}@{r}", vllm.url, r, 2) for r in range(2)]
    )


BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "s"}], "max_tokens": 2, "stream": True},
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "one two", "max_tokens": 1, "stream": True}),
]


def _send_all(base: str, count: int) -> list[int]:
    """`count` requests one after another on one connection (one data-plane process)."""
    statuses = []
    # The first request of each process loads the tokenizer (seconds on a busy machine).
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(count):
            path, body = BODIES[i % len(BODIES)]
            answer = client.post(path, json={**body, "model": MODEL})
            statuses.append(answer.status_code)
    return statuses


# round_robin over five rank rows, 20 requests: four each, each with its own rank.
EXPECTED_COUNTS = [{"0": 4, "1": 4, "2": 4}, {"0": 4, "1": 4}]


def _rank_counts(*mocks: GrpcMock | pdutil.GrpcPdMock) -> list[dict[str, int]]:
    return [mock.stats()["requests_by_dp_rank"] for mock in mocks]


def _since(before: list[dict[str, int]], after: list[dict[str, int]]) -> list[dict[str, int]]:
    """The counts added between two _rank_counts (the PD mocks have no /reset)."""
    return [
        {k: v - old.get(k, 0) for k, v in new.items() if v != old.get(k, 0)}
        for old, new in zip(before, after, strict=True)
    ]


def test_rank_workers_listed_and_every_generate_carries_its_rank(
    model_dir: Path, engines: tuple[GrpcMock, GrpcMock]
) -> None:
    sglang, vllm = engines
    for mock in engines:
        mock.reset()
    gw = _gateway(model_dir, [sglang.url, vllm.url], "--policy", "round_robin")
    try:
        workers = wait_until(lambda: _ready(gw.url, 5), 30, "five ready rank workers")
        assert _rank_view(workers) == _expected_view(sglang, vllm)
        assert _send_all(gw.url, 20) == [200] * 20
    finally:
        gw.stop()
        gw.close_log()
    assert _rank_counts(sglang, vllm) == EXPECTED_COUNTS


def test_ranks_chosen_by_load_across_processes(model_dir: Path) -> None:
    """A two-rank engine under power_of_two on the gateway-wide in-flight count: both rows
    are always the sampled pair, so each held request goes to the rank holding fewer,
    whichever data-plane process takes its connection."""
    with start_grpc_mock(model_dir, backend="sglang", args=["--dp-size", "2"]) as two:
        gw = _gateway(model_dir, [two.url], *LEAST_REQUESTS)
        try:
            _held_requests_alternate(gw.url, two)
        finally:
            gw.stop()
            gw.close_log()


def _held_requests_alternate(base: str, engine: GrpcMock) -> None:
    wait_until(lambda: _ready(base, 2), 30, "two ready rank workers")
    # Warm up: each process loads the tokenizer on its first request (seconds), which
    # would otherwise stretch the gaps between the held requests below.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert list(pool.map(lambda _: _held_request(base), range(6))) == [200] * 6
    engine.reset()
    # Held long enough that the sixth is sent before the first ends on a loaded machine.
    engine.config(ttft_ms=8000.0)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        held = []
        for k in range(1, 7):
            held.append(pool.submit(_held_request, base))
            wait_until(lambda k=k: engine.stats()["in_flight"] == k, 60, f"{k} held")
        assert engine.stats()["requests_by_dp_rank"] == {"0": 3, "1": 3}
        assert [f.result(timeout=60) for f in held] == [200] * 6


def _held_request(base: str) -> int:
    answer = httpx.post(
        base + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        timeout=60,
    )
    return answer.status_code


def test_flush_cache_and_profiling_once_per_engine(
    model_dir: Path, engines: tuple[GrpcMock, GrpcMock]
) -> None:
    """/flush_cache, /start_profile and /stop_profile with five rank workers on two
    engines: one RPC per engine (its rank workers share its cache and profiler), each
    listed by its engine's URL. 1.13 calls each engine once per rank (docs/flags.md)."""
    sglang, vllm = engines
    for mock in engines:
        mock.reset()
    gw = _gateway(model_dir, [sglang.url, vllm.url], "--policy", "round_robin")
    try:
        wait_until(lambda: _ready(gw.url, 5), 30, "five ready rank workers")
        answer = httpx.post(gw.url + "/flush_cache", timeout=30)
        assert answer.status_code == 200, answer.text
        listed = sorted(w["worker"] for w in answer.json()["workers"])
        assert listed == sorted([sglang.url, vllm.url])
        for operation in ("start_profile", "stop_profile"):
            answer = httpx.post(f"{gw.url}/{operation}", json={}, timeout=30)
            assert answer.status_code == 200, answer.text
    finally:
        gw.stop()
        gw.close_log()
    for method in ("FlushCache", "StartProfile", "StopProfile"):
        assert [m.stats()["requests"].get(method, 0) for m in engines] == [1, 1], method


def test_mock_refuses_a_rank_out_of_range(engines: tuple[GrpcMock, GrpcMock]) -> None:
    """The mock's check the tests above rely on: a rank outside [0, dp_size) is refused
    (INVALID_ARGUMENT) and counted as invalid; an unset rank is counted as none."""
    sglang, _ = engines
    sglang.reset()
    request = sglang_scheduler_pb2.GenerateRequest(
        request_id="r1",
        tokenized=sglang_scheduler_pb2.TokenizedInput(input_ids=[1, 2, 3]),
        sampling_params=sglang_scheduler_pb2.SamplingParams(max_new_tokens=1),
        data_parallel_rank=3,
    )
    with grpc.insecure_channel(sglang.target) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        request.ClearField("data_parallel_rank")
        request.request_id = "r2"
        assert list(stub.Generate(request, timeout=10))
    assert sglang.stats()["requests_by_dp_rank"] == {"invalid": 1, "none": 1}


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_1_13_does_the_same(model_dir: Path, engines: tuple[GrpcMock, GrpcMock]) -> None:
    sglang, vllm = engines
    for mock in engines:
        mock.reset()
    args = ["--worker-urls", sglang.url, vllm.url, "--dp-aware", "--policy", "round_robin"]
    with rust_smg([*args, "--tokenizer-path", str(model_dir)]) as url:
        workers = wait_until(lambda: _ready(url, 5), 30, "five ready rank workers")
        assert _rank_view(workers) == _expected_view(sglang, vllm)
        assert _send_all(url, 20) == [200] * 20
    # 1.13's SGLang proto has data_parallel_rank as a plain int32 (no presence): rank 0 is
    # the default value, not on the wire, so the mock sees no rank. smg's proto (the
    # installed smg_grpc_proto) marks it optional and sends 0 (docs/flags.md).
    sglang_counts, vllm_counts = EXPECTED_COUNTS
    rust_sglang = {("none" if k == "0" else k): v for k, v in sglang_counts.items()}
    assert _rank_counts(sglang, vllm) == [rust_sglang, vllm_counts]


@pytest.fixture(scope="module")
def pd_pair(model_dir: Path) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock]]:
    """An SGLang gRPC prefill with dp_size 2 and a decode with dp_size 3 (different sizes:
    a leg given the other's rank would show, or be refused)."""
    with (
        pdutil.start_grpc_prefill(model_dir, "sglang", "--dp-size", "2") as prefill,
        pdutil.start_grpc_decode(model_dir, "sglang", "--dp-size", "3") as decode,
    ):
        yield prefill, decode


PD_POLICIES = ["--prefill-policy", "round_robin", "--decode-policy", "round_robin"]
PD_COUNTS = [{"0": 3, "1": 3}, {"0": 2, "1": 2, "2": 2}]


def _pd_args(prefill: pdutil.GrpcPdMock, decode: pdutil.GrpcPdMock) -> list[str]:
    return [
        "--pd-disaggregation", "--prefill", prefill.url, str(prefill.bootstrap_port),
        "--decode", decode.url, "--dp-aware", *PD_POLICIES,
    ]  # fmt: skip


def _send_chats(base: str, count: int) -> list[int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with httpx.Client(base_url=base, timeout=60) as client:
        return [client.post("/v1/chat/completions", json=body).status_code for _ in range(count)]


def test_pd_legs_carry_their_own_ranks(
    model_dir: Path, pd_pair: tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock]
) -> None:
    """gRPC PD with --dp-aware: both engines become rank workers, and each leg's
    GenerateRequest carries its own worker's rank (1.13's execute_parallel_pd): round_robin
    on both sides, six requests: three per prefill rank, two per decode rank."""
    prefill, decode = pd_pair
    before = _rank_counts(prefill, decode)
    gw = Gateway([*_pd_args(prefill, decode), "--tokenizer-path", str(model_dir)], processes=2)
    gw.start(timeout=60.0)
    try:
        wait_until(lambda: _ready(gw.url, 5), 30, "five ready rank workers")
        assert _send_chats(gw.url, 6) == [200] * 6
    finally:
        gw.stop()
        gw.close_log()
    assert _since(before, _rank_counts(prefill, decode)) == PD_COUNTS


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_1_13_pd_legs_carry_their_ranks(
    model_dir: Path, pd_pair: tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock]
) -> None:
    prefill, decode = pd_pair
    before = _rank_counts(prefill, decode)
    with rust_smg([*_pd_args(prefill, decode), "--tokenizer-path", str(model_dir)]) as url:
        wait_until(lambda: _ready(url, 5), 30, "five ready rank workers")
        assert _send_chats(url, 6) == [200] * 6
    # As above, rank 0 reaches the engine unset from 1.13 (its proto's plain int32).
    rust = [{("none" if k == "0" else k): v for k, v in c.items()} for c in PD_COUNTS]
    assert _since(before, _rank_counts(prefill, decode)) == rust
