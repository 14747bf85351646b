"""Streamed SGLang /generate over gRPC with prompt (input) logprobs: the engine sends them
in its stream's first chunk (PD: the prefill computes them, 1.13 reads its Complete), and
every streamed chunk's meta_info carries `input_token_logprobs` from then on, as the
non-streamed answer does (tests/test_grpc_input_logprobs.py; the mock's values: position i
of the prompt has logprob -0.1 * (1 + i % 7) as a float32, position 0 none). `smg launch
--processes 2` against the gRPC mock, and the PD case against the Rust SMG 1.13 binary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests import pdutil
from tests.gatewayutil import running_gateway, wait_until
from tests.grpcmockutil import llama3_dir, start_grpc_mock
from tests.pdutil import RUST_SMG, rust_smg
from tests.test_grpc_input_logprobs import PROMPT, rows


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama3_dir(tmp_path_factory.mktemp("slp-llama3"))


def _stream(base: str, **extra: Any) -> list[dict[str, Any]]:
    """The streamed /generate's events (before [DONE]) as JSON objects."""
    body = {
        "model": "llama3",
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 3},
        "stream": True,
        **extra,
    }
    with httpx.stream("POST", base + "/generate", json=body, timeout=60.0) as answer:
        assert answer.status_code == 200, answer.read()
        text = answer.read().decode()
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


def _inputs(events: list[dict[str, Any]]) -> list[Any]:
    return [e["meta_info"].get("input_token_logprobs") for e in events]


@pytest.fixture(scope="module")
def plain(llama: Path) -> Iterator[str]:
    with start_grpc_mock(llama, backend="sglang") as mock:
        args = ["--worker-urls", mock.url, "--model-path", str(llama)]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready(timeout=30)
            yield gateway.url


def test_streamed_generate_carries_the_prompts_logprobs(plain: str) -> None:
    events = _stream(plain, return_logprob=True, logprob_start_len=0)
    assert len(events) >= 3  # a chunk per token (the last may come with the finish alone)
    assert _inputs(events) == [rows(0)] * len(events)
    # the output logprobs grow chunk by chunk, as SGLang's non-incremental stream
    assert len(events[-1]["meta_info"]["output_token_logprobs"]) == 3
    events = _stream(plain, return_logprob=True, logprob_start_len=2)
    assert _inputs(events) == [rows(2)] * len(events)


def test_streamed_generate_no_input_logprobs_unless_asked(plain: str) -> None:
    # -1 (the default) at the engine: none, the key left out as in the non-streamed answer
    assert not any(_inputs(_stream(plain, return_logprob=True)))
    assert not any(_inputs(_stream(plain, logprob_start_len=0)))


@pytest.fixture(scope="module")
def pd_pair(llama: Path) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock]]:
    with (
        pdutil.start_grpc_prefill(llama, "sglang") as prefill,
        pdutil.start_grpc_decode(llama, "sglang", wait_s=3.0) as decode,
    ):
        yield prefill, decode


def _pd_args(pair: tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock], llama: Path) -> list[str]:
    prefill, decode = pair
    return [
        "--pd-disaggregation", "--prefill", prefill.url, str(prefill.bootstrap_port),
        "--decode", decode.url, "--model-path", str(llama),
    ]  # fmt: skip


def test_pd_stream_carries_the_prefills_prompt_logprobs(
    llama: Path, pd_pair: tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock]
) -> None:
    """SGLang PD: the decode's prompt logprobs are empty; every streamed chunk carries the
    prefill's (as the 1.13 binary's stream, below)."""
    with running_gateway(_pd_args(pd_pair, llama), processes=2) as gateway:
        gateway.wait_ready(timeout=30)
        events = _stream(gateway.url, return_logprob=True, logprob_start_len=0)
        assert _inputs(events) == [rows(0)] * len(events)
        events = _stream(gateway.url, return_logprob=True, logprob_start_len=3)
        assert _inputs(events) == [rows(3)] * len(events)


def _two_ready(base: str) -> bool:
    workers = httpx.get(base + "/workers", timeout=5).json()["workers"]
    return len(workers) == 2 and all(w["status"] == "ready" for w in workers)


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_1_13_pd_stream_carries_the_prefills_prompt_logprobs(
    llama: Path, pd_pair: tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock]
) -> None:
    with rust_smg(_pd_args(pd_pair, llama)) as url:
        wait_until(lambda: _two_ready(url), 30, "the PD pair ready")
        events = _stream(url, return_logprob=True, logprob_start_len=0)
    # 1.13's streamed /generate has a shape of its own: a chunk per token plus a final
    # one (4 events), and [logprob, token id as a float] pairs without the text; the
    # values are the prefill's, in every event, as smg's (docs/flags.md).
    want = [[value, token] for value, token, _text in rows(0)]
    assert len(events) == 4
    assert all(
        [[value, int(token)] for value, token in inputs] == want for inputs in _inputs(events)
    )
