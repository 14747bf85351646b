"""A mixed PD fleet (a gRPC prefill with an HTTP decode, or the other way) is not paired,
as in 1.13 (router_manager.rs pairs gRPC legs with gRPC legs, HTTP with HTTP): the
request gets 1.13's 503 no_available_workers, whose message here also names the
mismatch. Through `smg launch --processes 2` and on the Rust SMG 1.13 binary."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import pdutil
from tests.gatewayutil import running_gateway

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pdmix-llama3"))


@contextlib.contextmanager
def _mixed(llama_dir: Path, grpc_side: str) -> Iterator[list[str]]:
    """A prefill and a decode serving llama3, the `grpc_side` one over gRPC; yields the
    gateway's PD arguments."""
    with contextlib.ExitStack() as stack:
        if grpc_side == "prefill":
            g = stack.enter_context(pdutil.start_grpc_prefill(llama_dir, "sglang"))
            h = stack.enter_context(pdutil.start_decode(1, "--model", "llama3", wait_s=5))
            yield ["--prefill", g.url, str(g.bootstrap_port), *h.decode_args()]
        else:
            h = stack.enter_context(pdutil.start_prefill(1, "--model", "llama3"))
            g = stack.enter_context(pdutil.start_grpc_decode(llama_dir, "sglang"))
            yield [*h.prefill_args(), "--decode", g.url]


def _missing(grpc_side: str) -> str:
    return "decode" if grpc_side == "prefill" else "prefill"


WORDS = "No {} worker is registered for model 'llama3' at the moment (its other leg is): "
WORDS += "the pair is incomplete"


@pytest.mark.parametrize("grpc_side", ["prefill", "decode"])
def test_smg_refuses_a_mixed_pair_naming_the_mismatch(llama_dir: Path, grpc_side: str) -> None:
    """Before this: 503 server_selection_failed "No available decode workers (all circuits
    open or unhealthy)", although the worker was ready (only not gRPC)."""
    with _mixed(llama_dir, grpc_side) as pd_args:
        args = ["--pd-disaggregation", *pd_args, "--model-path", str(llama_dir)]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready(timeout=30)
            answers = [
                httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=30.0)
                for _ in range(2)  # either process
            ]
    missing = _missing(grpc_side)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["x-smg-error-code"] == "no_available_workers"
        message = answer.json()["error"]["message"]
        assert message.startswith(WORDS.format(missing)), message
        assert f"the ready {missing} workers speak HTTP" in message
        assert "mixed HTTP/gRPC prefill-decode pairs are not supported" in message


@pytest.mark.skipif(not pdutil.RUST_SMG.exists(), reason="no Rust SMG 1.13 binary")
@pytest.mark.parametrize("grpc_side", ["prefill", "decode"])
def test_rust_refuses_a_mixed_pair(llama_dir: Path, grpc_side: str) -> None:
    with (
        _mixed(llama_dir, grpc_side) as pd_args,
        tempfile.TemporaryDirectory() as cache,
        pdutil.rust_gateway(
            pd_args, "--model-path", str(llama_dir), env={"XDG_CACHE_HOME": cache}
        ) as url,
    ):
        answer = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30.0)
    assert answer.status_code == 503, answer.text
    assert answer.headers["x-smg-error-code"] == "no_available_workers"
    assert answer.json()["error"]["message"] == WORDS.format(_missing(grpc_side))
