"""1.13's PD phase families beyond smg_pd_ttft_seconds / smg_pd_prefill_duration_seconds:
smg_pd_decode_ttft_seconds (decode dispatch to the first decode token, streamed answers
only), smg_pd_kv_transfer_duration_seconds (vLLM sequential PD: prefill end to decode
dispatch) and smg_pd_kv_connector_mode_total{mode} (vLLM sequential PD, one per request
whose decode was established). What the 1.13 binary records over the same mocks and
traffic: HTTP PD none of the three; gRPC SGLang the decode TTFT only; gRPC vLLM all three.
Through `smg launch --processes 2` with the PD mocks (tests/pdutil.py)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import pdutil
from tests.gatewayutil import free_port, promtool_check, running_gateway

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
GENERATE = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
LABELS = ('backend_type="pd"', 'model="llama3"')
NEW = ("smg_pd_decode_ttft_seconds", "smg_pd_kv_transfer_duration_seconds")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pdmf-llama3"))


def _sum(metrics: str, prefix: str, *having: str) -> float:
    """The sum over processes of the samples whose line starts with `prefix` and carries
    every label in `having`."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(prefix) and all(h in line for h in having)
    )


def _traffic(url: str, path: str, body: dict) -> None:
    """One non-streamed and one streamed request, both answered in full."""
    with httpx.Client(base_url=url, timeout=30.0) as client:
        answer = client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        with client.stream("POST", path, json={**body, "stream": True}) as stream:
            assert stream.status_code == 200
            stream.read()


@contextlib.contextmanager
def _grpc_mocks(llama_dir: Path, backend: str, connector: str | None) -> Iterator[list[str]]:
    """A gRPC prefill and decode; yields the gateway's PD arguments."""
    extra = ("--kv-connector", connector) if connector else ()
    with (
        pdutil.start_grpc_prefill(llama_dir, backend, *extra) as prefill,
        pdutil.start_grpc_decode(llama_dir, backend, *extra, wait_s=10) as decode,
    ):
        yield [
            "--prefill", prefill.url, str(prefill.bootstrap_port),
            "--decode", decode.url, "--model-path", str(llama_dir),
        ]  # fmt: skip


def _smg_metrics(pd_args: list[str], path: str, body: dict) -> str:
    with running_gateway(["--pd-disaggregation", *pd_args], processes=2) as gateway:
        gateway.wait_ready(timeout=30)
        _traffic(gateway.url, path, body)
        return gateway.metrics()


@pytest.mark.parametrize(("backend", "connector"), [("vllm", "nixl"), ("vllm", "mooncake")])
def test_grpc_vllm_records_the_relay_decode_ttft_and_connector_mode(
    llama_dir: Path, backend: str, connector: str
) -> None:
    """vLLM sequential PD, one unary and one streamed chat: the relay window and the
    connector mode once per request (2), the decode TTFT for the streamed one (1), with
    runtime="vllm"; the relay window sits inside the TTFT, the decode TTFT too."""
    with _grpc_mocks(llama_dir, backend, connector) as pd_args:
        metrics = _smg_metrics(pd_args, "/v1/chat/completions", CHAT)
    labels = (*LABELS, 'runtime="vllm"')
    assert _sum(metrics, "smg_pd_kv_transfer_duration_seconds_count{", *labels) == 2, metrics
    assert _sum(metrics, "smg_pd_decode_ttft_seconds_count{", *labels) == 1
    assert _sum(metrics, "smg_pd_ttft_seconds_count{", *labels) == 1
    assert _sum(metrics, "smg_pd_kv_connector_mode_total{", f'mode="{connector}"') == 2
    assert _sum(metrics, "smg_pd_kv_connector_mode_total{") == 2  # no other mode
    ttft = _sum(metrics, "smg_pd_ttft_seconds_sum{")
    assert 0 < _sum(metrics, "smg_pd_decode_ttft_seconds_sum{") <= ttft
    # The relay is the gateway's own work between the legs: well under a second.
    assert 0 <= _sum(metrics, "smg_pd_kv_transfer_duration_seconds_sum{") < 1.0
    promtool_check(metrics)


def test_grpc_sglang_records_the_decode_ttft_only(llama_dir: Path) -> None:
    """SGLang parallel PD: the decode TTFT for the streamed chat, equal in count to the
    TTFT (both legs leave together); no relay window and no connector mode (1.13 records
    neither on the parallel path)."""
    with _grpc_mocks(llama_dir, "sglang", None) as pd_args:
        metrics = _smg_metrics(pd_args, "/v1/chat/completions", CHAT)
    labels = (*LABELS, 'runtime="sglang"')
    assert _sum(metrics, "smg_pd_decode_ttft_seconds_count{", *labels) == 1, metrics
    assert _sum(metrics, "smg_pd_ttft_seconds_count{", *labels) == 1
    assert _sum(metrics, "smg_pd_kv_transfer_duration_seconds_count{") == 0
    assert "smg_pd_kv_connector_mode_total{" not in metrics
    promtool_check(metrics)


def test_http_pd_records_none_of_the_three() -> None:
    """The HTTP PD router: TTFT and prefill duration as before, none of the new samples
    (the 1.13 binary's HTTP router records none either)."""
    with pdutil.start_prefill() as prefill, pdutil.start_decode(wait_s=5) as decode:
        metrics = _smg_metrics(
            [*prefill.prefill_args(), *decode.decode_args()], "/generate", GENERATE
        )
    assert _sum(metrics, "smg_pd_ttft_seconds_count{") == 2, metrics
    for family in NEW:
        assert _sum(metrics, family + "_count{") == 0, family
    assert "smg_pd_kv_connector_mode_total{" not in metrics
    promtool_check(metrics)


@pytest.mark.skipif(not pdutil.RUST_SMG.exists(), reason="no Rust SMG 1.13 binary")
def test_rust_records_the_same_on_grpc_vllm(llama_dir: Path) -> None:
    """The 1.13 binary over the same vLLM NIXL mocks and traffic: the counts smg records
    above (its later --prometheus-port wins over the helper's)."""
    port = free_port()
    with (
        _grpc_mocks(llama_dir, "vllm", "nixl") as pd_args,
        tempfile.TemporaryDirectory() as cache,
        pdutil.rust_gateway(
            pd_args, "--prometheus-port", str(port), env={"XDG_CACHE_HOME": cache}
        ) as url,
    ):
        _traffic(url, "/v1/chat/completions", CHAT)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
    labels = (*LABELS, 'runtime="vllm"')
    assert _sum(metrics, "smg_pd_kv_transfer_duration_seconds_count{", *labels) == 2, metrics
    assert _sum(metrics, "smg_pd_decode_ttft_seconds_count{", *labels) == 1
    assert _sum(metrics, "smg_pd_kv_connector_mode_total{", 'mode="nixl"') == 2
