"""Prompt (input) logprobs on the gRPC path: SGLang /generate's `logprob_start_len` goes to
the engine as given (the Rust SMG 1.13: `body.logprob_start_len.unwrap_or(-1)`), and the
engine's InputLogProbs come back as `meta_info.input_token_logprobs` when `return_logprob`
is set. The mock's values: position i of the prompt has logprob -0.1 * (1 + i % 7) as a
float32 (the proto's type), position 0 none. Pure parts first, then `smg launch
--processes 2` against the gRPC mock."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl

from smg.grpc.prepare import Defaults, prepare_generate
from smg.grpc.protos import build_generate_request, output_from
from smg.grpc.types import GenerateInput
from smg.mock_worker.grpc_server import input_logprobs_message
from tests.gatewayutil import Gateway, running_gateway
from tests.grpcmockutil import GrpcMock, llama3_dir, start_grpc_mock

PROMPT = [128000, 9906, 1917, 0]


def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def rows(start: int) -> list[list[Any]]:
    """What the gateway renders for PROMPT from `start` on."""
    return [
        [None if i == 0 else f32(-round(0.1 * (1 + i % 7), 4)), PROMPT[i], None]
        for i in range(start, len(PROMPT))
    ]


# --- pure -----------------------------------------------------------------------------------


def _request(body: dict[str, Any]) -> Any:
    p = prepare_generate(body, Defaults())
    return build_generate_request(
        "sglang", GenerateInput(request_id="r", input_ids=PROMPT, sampling=p.sampling)
    )


def test_logprob_start_len_is_sent_as_given() -> None:
    assert _request({"input_ids": PROMPT}).logprob_start_len == -1
    req = _request({"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 2})
    assert (req.return_logprob, req.logprob_start_len) == (True, 2)
    # 1.13 sends it even without return_logprob (SGLang then computes none)
    assert _request({"input_ids": PROMPT, "logprob_start_len": 0}).logprob_start_len == 0


def test_logprob_start_len_must_be_an_integer() -> None:
    from smg.grpc.prepare import RequestError

    with pytest.raises(RequestError) as e:
        prepare_generate({"input_ids": PROMPT, "logprob_start_len": "x"}, Defaults())
    assert e.value.status == 400


def test_input_logprobs_are_read_from_the_complete() -> None:
    message = sgl.GenerateResponse(
        request_id="r",
        complete=sgl.GenerateComplete(
            output_ids=[5], input_logprobs=input_logprobs_message(sgl, PROMPT, 1)
        ),
    )
    out = output_from("sglang", message)
    assert out.input_logprobs == [(r[0], r[1]) for r in rows(1)]
    first = output_from(
        "sglang",
        sgl.GenerateResponse(
            complete=sgl.GenerateComplete(input_logprobs=input_logprobs_message(sgl, PROMPT, 0))
        ),
    )
    assert first.input_logprobs is not None and first.input_logprobs[0] == (None, 128000)
    assert (
        output_from("sglang", sgl.GenerateResponse(complete=sgl.GenerateComplete())).input_logprobs
        is None
    )


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama3_dir(tmp_path_factory.mktemp("lp-llama3"))


@pytest.fixture(scope="module")
def sglang(llama: Path) -> Iterator[tuple[Gateway, GrpcMock]]:
    with start_grpc_mock(llama, backend="sglang") as mock:
        args = ["--worker-urls", mock.url, "--model-path", str(llama)]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready(timeout=30)
            yield gateway, mock


def _generate(gateway: Gateway, **extra: Any) -> dict[str, Any]:
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}, **extra}
    answer = httpx.post(gateway.url + "/generate", json=body, timeout=30.0)
    assert answer.status_code == 200, answer.text
    return answer.json()["meta_info"]


def test_generate_renders_the_prompts_logprobs(sglang: tuple[Gateway, GrpcMock]) -> None:
    gateway, mock = sglang
    meta = _generate(gateway, return_logprob=True, logprob_start_len=0)
    assert meta["input_token_logprobs"] == rows(0)
    assert len(meta["output_token_logprobs"]) == 2
    meta = _generate(gateway, return_logprob=True, logprob_start_len=2)
    assert meta["input_token_logprobs"] == rows(2)
    assert mock.stats()["last_generate_request"]["logprob_start_len"] == 2


def test_no_input_logprobs_unless_asked(sglang: tuple[Gateway, GrpcMock]) -> None:
    gateway, _ = sglang
    # return_logprob without logprob_start_len: -1 at the engine, none (1.13 omits the key)
    assert "input_token_logprobs" not in _generate(gateway, return_logprob=True)
    # logprob_start_len without return_logprob: no logprobs at all
    assert "input_token_logprobs" not in _generate(gateway, logprob_start_len=0)


def test_pd_answers_the_prefills_prompt_logprobs(llama: Path) -> None:
    """SGLang PD: the decode's input logprobs are empty (its prefill computed them); the
    answer carries the prefill's, as 1.13 (its same-mock answer: the four rows)."""
    from tests import pdutil

    with (
        pdutil.start_grpc_prefill(llama, "sglang") as prefill,
        pdutil.start_grpc_decode(llama, "sglang", wait_s=3.0) as decode,
    ):
        args = [
            "--pd-disaggregation", "--prefill", prefill.url, str(prefill.bootstrap_port),
            "--decode", decode.url, "--model-path", str(llama),
        ]  # fmt: skip
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready(timeout=30)
            meta = _generate(gateway, return_logprob=True, logprob_start_len=0)
            assert meta["input_token_logprobs"] == rows(0)
            assert len(meta["output_token_logprobs"]) == 2
            meta = _generate(gateway, return_logprob=True, logprob_start_len=3)
            assert meta["input_token_logprobs"] == rows(3)
            assert "input_token_logprobs" not in _generate(gateway, return_logprob=True)
