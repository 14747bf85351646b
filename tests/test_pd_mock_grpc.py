"""The gRPC PD roles of the mock engine (smg/mock_worker/grpc_pd.py): the pure parts, the
roles talking over their bootstrap server, and the same mocks behind the Rust SMG 1.13
(SGLang disaggregated_params, vLLM NIXL and Mooncake kv_transfer_params)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smg.mock_worker.pd import READY
from tests import mockutil, pdutil

needs_rust = pytest.mark.skipif(
    not pdutil.RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {pdutil.RUST_SMG}"
)
rust_gateway = pdutil.rust_gateway
ONE_SHOT = pdutil.ONE_SHOT


PROMPT_IDS = [128000, 9906, 1917, 11, 1268, 527, 499, 30]  # 8 tokens: one 16-token block


def _sglang_req(room: int | None, port: int, max_new: int = 4, n: int = 1) -> Any:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    req = pb.GenerateRequest(
        request_id="r1",
        tokenized=pb.TokenizedInput(input_ids=PROMPT_IDS),
        sampling_params=pb.SamplingParams(max_new_tokens=max_new, n=n),
    )
    if room is not None:
        req.disaggregated_params.CopyFrom(
            pb.DisaggregatedParams(
                bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=room
            )
        )
    return req


def _vllm_req(params: dict[str, Any] | None, max_tokens: int = 4) -> Any:
    from smg_grpc_proto.generated import vllm_engine_pb2 as pb

    req = pb.GenerateRequest(
        request_id="r1",
        tokenized=pb.TokenizedInput(input_ids=PROMPT_IDS),
        sampling_params=pb.SamplingParams(max_tokens=max_tokens),
    )
    if params is not None:
        req.kv_transfer_params_json = json.dumps(params)
    return req


def test_grpc_cli() -> None:
    from smg.mock_worker.grpc_options import parse_grpc_options

    base = ["--grpc", "--tokenizer-path", "x"]
    opts = parse_grpc_options([*base, "--pd-role", "decode", "--kv-connector", "mooncake"])
    assert (opts.impl, opts.bootstrap_port, opts.pd_wait_s) == ("aio", 8998, 5.0)
    for bad in (
        ["--bootstrap-port", "9"],  # without a role
        ["--pd-role", "prefill", "--grpc-impl", "fast"],
        ["--pd-role", "prefill", "--processes", "2"],
        ["--pd-role", "decode", "--bootstrap-port", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_grpc_options([*base, *bad])


def test_grpc_leg_sglang() -> None:
    import grpc

    from smg.mock_worker.grpc_pd import GrpcPd, PdRefused

    pd = GrpcPd("decode", "sglang", "127.0.0.1", 8998, 1.0)
    with pytest.raises(PdRefused) as e:
        pd.leg(_sglang_req(None, 0))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    leg = pd.leg(_sglang_req(40, 0, n=2))  # port 0: the engine's own; n=2: room + i
    assert leg.targets == [("127.0.0.1", 8998, 40), ("127.0.0.1", 8998, 41)]


def test_grpc_leg_vllm() -> None:
    from smg.mock_worker.grpc_pd import GrpcPd, PdRefused

    prefill = GrpcPd("prefill", "vllm", "127.0.0.1", 0, 1.0)
    prefill.bootstrap_port = 4321
    with pytest.raises(PdRefused, match="do_remote_decode"):
        prefill.leg(_vllm_req(None))
    leg = prefill.leg(_vllm_req({"do_remote_decode": True, "do_remote_prefill": False}))
    assert leg.params is not None and leg.keys == [leg.params["remote_request_id"]]
    assert {k: v for k, v in leg.params.items() if k != "remote_request_id"} == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [1],
        "remote_engine_id": prefill.engine_id,
        "remote_host": "127.0.0.1",
        "remote_port": 4321,
        "tp_size": 1,
    }
    decode = GrpcPd("decode", "vllm", "127.0.0.1", 8998, 1.0)
    with pytest.raises(PdRefused, match="needs the kv_transfer_params_json its prefill returned"):
        decode.leg(_vllm_req({"do_remote_decode": True}))
    dleg = decode.leg(_vllm_req(leg.params))
    assert dleg.targets == [("127.0.0.1", 4321, leg.params["remote_request_id"])]
    assert dleg.expect == leg.params


def test_grpc_leg_vllm_mooncake() -> None:
    from smg.mock_worker.grpc_pd import GrpcPd, PdRefused

    prefill = GrpcPd("prefill", "vllm", "127.0.0.1", 0, 1.0, connector="mooncake")
    with pytest.raises(PdRefused, match="transfer_id"):
        prefill.leg(_vllm_req({"do_remote_decode": True}))
    tag = {"do_remote_decode": True, "do_remote_prefill": False, "transfer_id": "xfer-1"}
    leg = prefill.leg(_vllm_req(tag))
    assert (leg.keys, leg.params) == (["xfer-1"], None)  # push-based: nothing returned
    decode = GrpcPd("decode", "vllm", "127.0.0.1", 8998, 1.0, connector="mooncake")
    params = {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "transfer_id": "xfer-1",
        "remote_engine_id": prefill.engine_id,
        "remote_bootstrap_addr": "http://127.0.0.1:4321",
    }
    dleg = decode.leg(_vllm_req(params))
    assert (dleg.targets, dleg.engine_id) == ([("127.0.0.1", 4321, "xfer-1")], prefill.engine_id)
    with pytest.raises(PdRefused, match="remote_bootstrap_addr"):
        decode.leg(_vllm_req({**params, "remote_bootstrap_addr": "127.0.0.1:4321"}))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pd-llama3"))


def _generate(target: str, backend: str, req: Any, timeout: float = 10.0) -> list[Any]:
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc, vllm_engine_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        if backend == "sglang":
            stub: Any = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        else:
            stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        return list(stub.Generate(req, timeout=timeout))


def _target(mock: pdutil.GrpcPdMock) -> str:
    return mock.url[len("grpc://") :]


def test_grpc_sglang_pair(llama_dir: Path) -> None:
    import grpc

    with (
        pdutil.start_grpc_prefill(llama_dir, "sglang") as prefill,
        pdutil.start_grpc_decode(llama_dir, "sglang", wait_s=2.0) as decode,
    ):
        req = _sglang_req(77, prefill.bootstrap_port)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(_generate, _target(decode), "sglang", req)
            p = _generate(_target(prefill), "sglang", req)
            d = fut.result()
        assert len(p[-1].complete.output_ids) == 1  # the prefill: one token
        assert len(d[-1].complete.output_ids) == 4
        assert [(r["room"], r["state"]) for r in prefill.pd_stats()["rooms"]] == [(77, READY)]
        with pytest.raises(grpc.RpcError) as e:  # a room no prefill served
            _generate(_target(decode), "sglang", _sglang_req(78, prefill.bootstrap_port))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "KV transfer failed: bootstrap_room 78 not ready" in (e.value.details() or "")
        assert decode.pd_stats()["kv_failures"] == 1
        # The mock's faults hold in a PD role: a failing prefill fails its room, and the
        # decode waiting on it fails at once rather than after its 2 s.
        prefill.config(fail_next=1, fail_code="UNAVAILABLE")
        req = _sglang_req(79, prefill.bootstrap_port)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            fut = pool.submit(_generate, _target(decode), "sglang", req)
            with pytest.raises(grpc.RpcError) as e:
                _generate(_target(prefill), "sglang", req)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as e:
                fut.result()
            took = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "the prefill of bootstrap_room 79" in (e.value.details() or "")
        assert took < 1.8


def test_grpc_vllm_pair_relays_only_the_prefills_params(llama_dir: Path) -> None:
    import grpc

    with (
        pdutil.start_grpc_prefill(llama_dir, "vllm") as prefill,
        pdutil.start_grpc_decode(llama_dir, "vllm", wait_s=0.5) as decode,
    ):
        tag = {"do_remote_decode": True, "do_remote_prefill": False}
        p = _generate(_target(prefill), "vllm", _vllm_req(tag, max_tokens=1))
        params = json.loads(p[-1].complete.kv_transfer_params_json)
        assert params["remote_port"] == prefill.bootstrap_port
        d = _generate(_target(decode), "vllm", _vllm_req(params))
        assert len(d[-1].complete.output_ids) == 4
        forged = {**params, "remote_block_ids": [9]}
        with pytest.raises(grpc.RpcError) as e:
            _generate(_target(decode), "vllm", _vllm_req(forged))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "differ from what the prefill" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            _generate(_target(decode), "vllm", _vllm_req(None))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@contextlib.contextmanager
def _rust_grpc_pd(llama_dir: Path, backend: str, *mock_args: str) -> Iterator[tuple[str, Any, Any]]:
    with (
        pdutil.start_grpc_prefill(llama_dir, backend, *mock_args) as prefill,
        pdutil.start_grpc_decode(llama_dir, backend, *mock_args, wait_s=2.0) as decode,
        tempfile.TemporaryDirectory() as cache,
    ):
        pd_args = ["--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url]
        extra = ("--model-path", str(llama_dir), *ONE_SHOT)
        with rust_gateway(pd_args, *extra, env={"XDG_CACHE_HOME": cache}) as url:
            yield url, prefill, decode


GRPC_CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@needs_rust
@pytest.mark.parametrize("backend", ["sglang", "vllm", "vllm-mooncake"])
def test_rust_grpc_pd(llama_dir: Path, backend: str) -> None:
    engine, _, connector = backend.partition("-")
    mock_args = ["--kv-connector", connector] if connector else []
    with _rust_grpc_pd(llama_dir, engine, *mock_args) as (url, prefill, decode):
        status, data = mockutil.request_json("POST", url + "/v1/chat/completions", GRPC_CHAT)
        assert status == 200, data
        assert data["usage"]["completion_tokens"] == 5
        body = {**GRPC_CHAT, "stream": True}
        status, _, raw = mockutil.request("POST", url + "/v1/chat/completions", body, timeout=10)
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
        rooms = prefill.pd_stats()["rooms"]
        assert [r["state"] for r in rooms] == [READY, READY]
        sent = decode.stats()["last_generate_request"]
        if backend == "vllm-mooncake":  # 1.13 mints the transfer id, names the prefill
            tag = json.loads(prefill.stats()["last_generate_request"]["kv_transfer_params_json"])
            assert tag["transfer_id"] == rooms[-1]["room"] and tag["do_remote_decode"] is True
            assert json.loads(sent["kv_transfer_params_json"]) == {
                "do_remote_decode": False,
                "do_remote_prefill": True,
                "transfer_id": tag["transfer_id"],
                "remote_engine_id": prefill.pd_stats()["engine_id"],
                "remote_bootstrap_addr": f"http://127.0.0.1:{prefill.bootstrap_port}",
            }
        elif backend == "vllm":  # 1.13 relays what the prefill returned, as is
            assert (
                json.loads(sent["kv_transfer_params_json"])["remote_request_id"]
                == rooms[-1]["room"]
            )
            tag = prefill.stats()["last_generate_request"]
            assert json.loads(tag["kv_transfer_params_json"]) == {
                "do_remote_decode": True,
                "do_remote_prefill": False,
            }
            assert tag["sampling_params"]["max_tokens"] == 1
        else:
            assert sent["disaggregated_params"]["bootstrap_room"] == rooms[-1]["room"]
        assert decode.pd_stats()["kv_failures"] == 0
