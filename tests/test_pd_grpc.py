"""PD disaggregation over gRPC workers (smg.grpc.pd), smg being the full server: the pure
parts with exact values, then `smg launch --processes 2 --pd-disaggregation` with the
gRPC PD mocks (tests/pdutil.py start_grpc_prefill/decode), which check what real engines
check (SGLang: disaggregated_params and a prefilled room; vLLM/NIXL: exactly the
kv_transfer_params the prefill returned), so a request that succeeds proves the legs met."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from smg.grpc import pd
from smg.grpc.types import EngineError, GenerateInput, SamplingParams
from tests import pdutil
from tests.gatewayutil import Gateway, running_gateway

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

# --- pure parts ---------------------------------------------------------------------------


def test_room_is_an_int32() -> None:
    rooms = [pd.new_room(random.Random(7)) for _ in range(3)]
    assert rooms == [pd.new_room(random.Random(7))] * 3  # seeded: the same room
    assert all(0 <= r < 2**31 - 1 for r in rooms)


def test_kv_mode_by_connector() -> None:
    assert pd.kv_mode("NixlConnector", "h", 1, "e") == pd.KvMode("nixl")
    assert pd.kv_mode("", "h", 1, "") == pd.KvMode("passthrough")
    assert pd.kv_mode("MooncakeConnector", "10.0.0.2", None, "") == pd.KvMode(
        "mooncake", "10.0.0.2", 8998, None
    )


def _req(n: int = 1) -> GenerateInput:
    sampling = SamplingParams(max_tokens=9, min_tokens=3, n=n, stop=["x"], stop_token_ids=[2])
    return GenerateInput(request_id="r", input_ids=[1, 2], sampling=sampling, stream=True)


def test_vllm_prefill_input_nixl_is_1_13s_bytes() -> None:
    out = pd.vllm_prefill_input(_req(), pd.KvMode("nixl"), None)
    s = out.sampling
    assert (s.max_tokens, s.min_tokens, s.n, s.stop, s.stop_token_ids, s.ignore_eos) == (
        1, 0, 1, [], [], True,
    )  # fmt: skip
    assert out.stream is False and out.request_id == "r"
    assert out.kv_transfer_params_json == '{"do_remote_decode":true,"do_remote_prefill":false}'
    assert pd.vllm_prefill_input(_req(n=2), pd.KvMode("nixl"), None).kv_transfer_params_json is None


def test_vllm_mooncake_params() -> None:
    mode = pd.kv_mode("MooncakeConnector", "10.0.0.2", 9000, "eng")
    tid = pd.transfer_id_for(mode, 1)
    assert tid is not None and tid.startswith("xfer-")
    assert pd.transfer_id_for(mode, 2) is None
    assert pd.transfer_id_for(pd.kv_mode("MooncakeConnector", "h", 1, ""), 1) is None
    assert json.loads(pd.vllm_prefill_input(_req(), mode, "xfer-1").kv_transfer_params_json) == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_id": "xfer-1",
    }
    assert json.loads(pd.vllm_decode_params(mode, '{"ignored":1}', "xfer-1", 1) or "") == {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "transfer_id": "xfer-1",
        "remote_engine_id": "eng",
        "remote_bootstrap_addr": "http://10.0.0.2:9000",
    }


def test_vllm_decode_params_nixl_relays_as_is() -> None:
    returned = '{"remote_request_id": "kv-1"}'
    assert pd.vllm_decode_params(pd.KvMode("nixl"), returned, None, 1) == returned
    assert pd.vllm_decode_params(pd.KvMode("passthrough"), returned, None, 1) == returned
    assert pd.vllm_decode_params(pd.KvMode("nixl"), returned, None, 2) is None
    assert pd.vllm_decode_params(pd.KvMode("nixl"), None, None, 1) is None


def test_leg_errors_are_1_13s() -> None:
    e = pd.leg_error(EngineError("UNAVAILABLE", "gone"), "prefill")
    assert (e.code, e.message) == ("UNAVAILABLE", "Prefill worker failed to start: gone")
    assert e.pd_answer == (503, "prefill_worker_failed_to_start", 499)  # not the decode's fault
    started = EngineError("INTERNAL", "cut", before_first_token=False)
    e = pd.leg_error(started, "prefill")
    assert (e.message, e.pd_answer) == (
        "Prefill stream error: cut",
        (500, "prefill_stream_error", 499),
    )
    e = pd.leg_error(EngineError("INTERNAL", "boom"), "decode")
    assert (e.message, e.pd_answer) == (
        "Decode worker failed to start: boom",
        (500, "decode_worker_failed_to_start", 500),
    )
    assert pd.leg_error(EngineError("UNAVAILABLE", "x"), "decode").pd_answer[2] == 0  # transport
    assert pd.leg_error(started, "decode") is started  # mid-stream: the stream's own error


class _FakeEngine:
    """An engine client that records its requests and answers one finished output."""

    def __init__(self, params: str = "") -> None:
        self.sent: list[GenerateInput] = []
        self.params = params

    async def generate_batches(self, req: GenerateInput, *, timeout: float | None) -> Any:
        from smg.grpc.types import EngineOutput

        self.sent.append(req)
        yield [EngineOutput(0, [7], finished=True, kv_transfer_params_json=self.params)]

    async def abort(self, request_ids: list[str]) -> None:
        pass


def _p_entry(labels: dict[str, str], connector: str = "") -> Any:
    from types import SimpleNamespace

    from smg.grpc.types import GrpcModelInfo

    spec = SimpleNamespace(bootstrap_port=9100, labels=labels)
    info = GrpcModelInfo(backend="vllm", kv_connector=connector)
    return SimpleNamespace(
        url="grpc://10.0.0.2:30001", spec=spec, grpc=info, row=1, generation=1, dp_rank=None
    )


def _sequential(p_entry: Any, returned: str = "") -> tuple[_FakeEngine, _FakeEngine, list[Any]]:
    import asyncio
    from types import SimpleNamespace

    prefill, decode = _FakeEngine(returned), _FakeEngine()
    decode.backend = "vllm"  # type: ignore[attr-defined]
    exchange = SimpleNamespace(app=SimpleNamespace(pd=None), pd=None)
    client = pd.PdClient(exchange, prefill, decode, p_entry)  # type: ignore[arg-type]

    async def run() -> list[Any]:
        return [outs async for outs in client.generate_batches(_req(), timeout=5.0)]

    return prefill, decode, asyncio.run(run())


def test_sequential_sends_mooncakes_synthesized_params_to_the_decode() -> None:
    # labels say Mooncake, the engine NIXL: labels first (1.13's create_worker.rs)
    labels = {"kv_connector": "MooncakeConnector", "kv_engine_id": "eng-1"}
    prefill, decode, outs = _sequential(_p_entry(labels, connector="NixlConnector"))
    assert len(outs) == 1 and outs[0][0].token_ids == [7]
    tagged = json.loads(prefill.sent[0].kv_transfer_params_json or "")
    sent = json.loads(decode.sent[0].kv_transfer_params_json or "")
    assert sent == {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "transfer_id": tagged["transfer_id"],
        "remote_engine_id": "eng-1",
        "remote_bootstrap_addr": "http://10.0.0.2:9100",
    }
    assert decode.sent[0].request_id == prefill.sent[0].request_id == "r"  # same id
    assert decode.sent[0].sampling.max_tokens == 9 and decode.sent[0].stream is True


def test_sequential_relays_nixls_params_as_is() -> None:
    returned = '{"remote_request_id":"kv-1","remote_port":5}'
    prefill, decode, _outs = _sequential(_p_entry({}, connector="NixlConnector"), returned)
    assert prefill.sent[0].kv_transfer_params_json == pd.NIXL_PREFILL_PARAMS
    assert decode.sent[0].kv_transfer_params_json == returned


def test_generate_request_carries_the_pd_fields() -> None:
    from smg.grpc.protos import build_generate_request

    s = build_generate_request("sglang", pd.dataclasses.replace(_req(), disaggregated=("h", 5, 7)))
    dp = s.disaggregated_params
    assert (dp.bootstrap_host, dp.bootstrap_port, dp.bootstrap_room) == ("h", 5, 7)
    assert not build_generate_request("sglang", _req()).HasField("disaggregated_params")
    v = build_generate_request("vllm", pd.dataclasses.replace(_req(), kv_transfer_params_json="{}"))
    assert v.kv_transfer_params_json == "{}"
    assert not build_generate_request("vllm", _req()).HasField("kv_transfer_params_json")


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pdg-llama3"))


@contextlib.contextmanager
def grpc_pd(
    llama_dir: Path, backend: str, *extra: str, wait_s: float = 3.0, mocks: tuple[str, ...] = ()
) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock, Gateway]]:
    with (
        pdutil.start_grpc_prefill(llama_dir, backend, *mocks) as prefill,
        pdutil.start_grpc_decode(llama_dir, backend, *mocks, wait_s=wait_s) as decode,
        pdutil.grpc_pd_gateway(prefill, decode, llama_dir, *extra) as gateway,
    ):
        yield prefill, decode, gateway


def _content(text: str) -> tuple[str, list[str]]:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    content = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in orjson.loads(event)["choices"]
    )
    return content, events


def _chat_both_ways(gateway: Gateway) -> None:
    """CHAT through the PD pair, plain and streamed: both answered in full (5 tokens)."""
    with gateway.client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 5
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            assert s.status_code == 200
            streamed, events = _content(s.read().decode())
    assert events[-1] == "[DONE]"
    assert streamed and answer.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def sglang(llama_dir: Path) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock, Gateway]]:
    with grpc_pd(llama_dir, "sglang") as trio:
        yield trio


@pytest.fixture(scope="module")
def vllm(llama_dir: Path) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock, Gateway]]:
    # Retries off: the failure tests below see each leg's error once (the binary's
    # answers they are compared with were taken with retries off as well).
    with grpc_pd(llama_dir, "vllm", "--disable-retries") as trio:
        yield trio


def test_sglang_chat_both_legs_meet(sglang: Any) -> None:
    prefill, decode, gateway = sglang
    before = len(prefill.pd_stats()["rooms"])
    _chat_both_ways(gateway)
    rooms = prefill.pd_stats()["rooms"][before:]
    assert [r["state"] for r in rooms] == ["ready", "ready"]
    sent = decode.stats()["last_generate_request"]["disaggregated_params"]
    assert sent["bootstrap_room"] == rooms[-1]["room"] and 0 <= sent["bootstrap_room"] < 2**31
    assert sent["bootstrap_host"] == "127.0.0.1"
    assert sent["bootstrap_port"] == prefill.bootstrap_port
    p_sent = prefill.stats()["last_generate_request"]["disaggregated_params"]
    assert p_sent == sent  # the same params to both legs
    assert decode.pd_stats()["kv_failures"] == 0


def test_sglang_generate_and_a_completions_batch(sglang: Any) -> None:
    """/generate, /v1/completions with two prompts (each prompt its own pair of legs and
    room: 1.13 dispatches a batch's prompts as separate PD requests), chat with n=2 (one
    room; the engines use room + i per choice)."""
    prefill, decode, gateway = sglang
    before = len(prefill.pd_stats()["rooms"])
    with gateway.client() as client:
        answer = client.post(
            "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 3}}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["meta_info"]["completion_tokens"] == 3
        batch = {"model": "llama3", "prompt": ["one", "two"], "max_tokens": 2}
        answer = client.post("/v1/completions", json=batch)
        assert answer.status_code == 200, answer.text
        assert [c["index"] for c in answer.json()["choices"]] == [0, 1]
        answer = client.post("/v1/chat/completions", json={**CHAT, "n": 2})  # room, room + 1
        assert answer.status_code == 200, answer.text
        assert [c["index"] for c in answer.json()["choices"]] == [0, 1]
    rooms = prefill.pd_stats()["rooms"][before:]
    assert [r["state"] for r in rooms] == ["ready"] * 5
    assert len({r["room"] for r in rooms}) == 5
    assert rooms[4]["room"] == rooms[3]["room"] + 1
    assert decode.pd_stats()["kv_failures"] == 0


def test_sglang_unavailable_leg_retries_the_pair(sglang: Any) -> None:
    """A prefill or decode answering UNAVAILABLE (503) before any output: the whole pair
    is tried again (new room) and the client gets the answer, as the 1.13 binary does on
    the same mocks (one prefill, one decode: the same pair again)."""
    prefill, decode, gateway = sglang
    for leg in (prefill, decode):
        before = len(prefill.pd_stats()["rooms"])
        leg.config(fail_next=1, fail_code="UNAVAILABLE")
        with gateway.client() as client:
            answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text
        rooms = prefill.pd_stats()["rooms"][before:]
        assert len({r["room"] for r in rooms}) == 2  # two attempts, two rooms
        assert rooms[-1]["state"] == "ready"


def test_vllm_chat_relays_the_prefills_params(vllm: Any) -> None:
    prefill, decode, gateway = vllm
    _chat_both_ways(gateway)
    rooms = prefill.pd_stats()["rooms"]
    assert [r["state"] for r in rooms][-2:] == ["ready", "ready"]
    p_sent = prefill.stats()["last_generate_request"]
    assert json.loads(p_sent["kv_transfer_params_json"]) == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
    }
    assert p_sent["sampling_params"]["max_tokens"] == 1
    d_sent = json.loads(decode.stats()["last_generate_request"]["kv_transfer_params_json"])
    # relayed as is (the mock's decode compared them with what its prefill returned)
    assert d_sent["remote_request_id"] == rooms[-1]["room"]
    assert d_sent["remote_port"] == prefill.bootstrap_port
    assert decode.pd_stats()["kv_failures"] == 0


def _wait_for_a_room(prefill: pdutil.GrpcPdMock) -> None:
    """Until the prefill has its leg (a bootstrap room), at most 30 s (the gateway's first
    request loads the tokenizer: 10 s was too short on a loaded box)."""
    deadline = time.monotonic() + 30
    while not prefill.pd_stats()["rooms"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prefill.pd_stats()["rooms"], "the prefill never got its leg"


def test_sglang_prefill_dying_mid_request_one_clean_error(llama_dir: Path) -> None:
    with grpc_pd(llama_dir, "sglang", "--disable-retries", wait_s=8.0) as (
        prefill,
        decode,
        gateway,
    ):
        prefill.config(ttft_ms=4000)  # a slow prefill, killed while it computes
        result: dict[str, Any] = {}

        def ask() -> None:
            with gateway.client() as client:
                answer = client.post("/v1/chat/completions", json=CHAT)
                result["done_at"] = time.monotonic()
                result["answer"] = answer

        thread = threading.Thread(target=ask)
        thread.start()
        try:
            _wait_for_a_room(prefill)
            prefill.proc.kill()
            killed_at = time.monotonic()
        finally:
            thread.join(20)
        answer = result["answer"]
        # UNAVAILABLE: 503 (1.13 answers a dead worker 500 "...: transport error")
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "prefill_worker_failed_to_start"
        assert error["message"].startswith("Prefill worker failed to start: ")
        # answered on the prefill's end, not after the decode's 8 s wait for its KV
        assert result["done_at"] - killed_at < 4.0
        # the decode leg was aborted (Abort RPC for the engine's request id)
        rid = answer.headers["x-request-id"]
        assert rid in decode.stats()["aborted"], (rid, decode.stats()["aborted"])


def test_vllm_forged_params_fail(vllm: Any) -> None:
    """The decode refuses params its prefill did not return: shown by asking it directly
    with another request's params (what a gateway that forged or mixed them up would do)."""
    import grpc
    from smg_grpc_proto.generated import vllm_engine_pb2 as pbv
    from smg_grpc_proto.generated import vllm_engine_pb2_grpc

    _prefill, decode, _gateway = vllm
    test_vllm_chat_relays_the_prefills_params(vllm)  # a request that met, whatever ran first
    relayed = json.loads(decode.stats()["last_generate_request"]["kv_transfer_params_json"])
    params = {**relayed, "remote_block_ids": [99]}
    req = pbv.GenerateRequest(
        request_id="forged",
        tokenized=pbv.TokenizedInput(input_ids=[128000, 9906]),
        sampling_params=pbv.SamplingParams(max_tokens=2),
        kv_transfer_params_json=json.dumps(params),
    )
    with grpc.insecure_channel(decode.url[len("grpc://") :]) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("stream", "code", "status", "kind"),
    [
        (False, "INTERNAL", 500, "server_error"),
        (True, "INTERNAL", 500, "server_error"),  # 1.13: a JSON error, not SSE
        (False, "INVALID_ARGUMENT", 400, "invalid_request_error"),
    ],
)
def test_vllm_decode_failing_is_one_clean_error(
    vllm: Any, stream: bool, code: str, status: int, kind: str
) -> None:
    prefill, decode, gateway = vllm
    before = len(prefill.pd_stats()["rooms"])
    decode.config(fail_next=1, fail_code=code)
    with gateway.client() as client:
        answer = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == _error(
        "decode_worker_failed_to_start", "Decode worker failed to start: mock failure", kind
    )  # the binary's bytes (test_rust_answers_leg_failures_as_smg)
    assert [r["state"] for r in prefill.pd_stats()["rooms"][before:]] == ["ready"]


def test_vllm_prefill_failing_never_reaches_the_decode(vllm: Any) -> None:
    prefill, decode, gateway = vllm
    sent = decode.stats()["last_generate_request"]
    prefill.config(fail_next=1, fail_code="INTERNAL")
    with gateway.client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 500, answer.text
    assert answer.json()["error"] == _error(
        "prefill_worker_failed_to_start", "Prefill worker failed to start: mock failure"
    )
    assert decode.stats()["last_generate_request"] == sent  # sequential: no decode leg


def test_sglang_decode_dying_aborts_the_prefill(llama_dir: Path) -> None:
    with grpc_pd(llama_dir, "sglang", "--disable-retries") as (prefill, decode, gateway):
        prefill.config(ttft_ms=4000)  # still computing when the decode dies
        result: dict[str, Any] = {}

        def ask() -> None:
            with gateway.client() as client:
                result["answer"] = client.post("/v1/chat/completions", json=CHAT)

        thread = threading.Thread(target=ask)
        thread.start()
        try:
            _wait_for_a_room(prefill)
            decode.proc.kill()
        finally:
            thread.join(20)
        answer = result["answer"]
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "decode_worker_failed_to_start"
        assert [r["state"] for r in prefill.pd_stats()["rooms"]] == ["failed"]  # cancelled
        assert answer.headers["x-request-id"] in prefill.stats()["aborted"]


# --- the Rust SMG 1.13 on the same mocks ----------------------------------------------------

RUST_SMG = pdutil.RUST_SMG


@pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
def test_rust_answers_leg_failures_as_smg(llama_dir: Path) -> None:
    """The bytes the binary answers for a failing prefill and decode leg (vLLM pair, the
    same mocks and knobs as the tests above): smg's LegError copies them."""
    import tempfile

    from tests.test_pd_mock import ONE_SHOT, rust_gateway

    with (
        pdutil.start_grpc_prefill(llama_dir, "vllm") as prefill,
        pdutil.start_grpc_decode(llama_dir, "vllm", wait_s=3.0) as decode,
        tempfile.TemporaryDirectory() as cache,
    ):
        args = ["--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url]
        extra = ("--model-path", str(llama_dir), *ONE_SHOT)
        with (
            rust_gateway(args, *extra, env={"XDG_CACHE_HOME": cache}) as url,
            httpx_client(url) as client,
        ):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            answers = []
            legs = [(prefill, "INTERNAL"), (decode, "INTERNAL"), (decode, "INTERNAL")]
            legs.append((decode, "INVALID_ARGUMENT"))
            for who, code in legs:
                who.config(fail_next=1, fail_code=code)
                stream = len(answers) == 2
                answer = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                answers.append((answer.status_code, answer.json()["error"]))
    failed = "Decode worker failed to start: mock failure"
    assert answers == [
        (
            500,
            _error(
                "prefill_worker_failed_to_start", "Prefill worker failed to start: mock failure"
            ),
        ),
        (500, _error("decode_worker_failed_to_start", failed)),
        (500, _error("decode_worker_failed_to_start", failed)),  # streamed: a JSON error too
        (400, _error("decode_worker_failed_to_start", failed, "invalid_request_error")),
    ]


def _error(code: str, message: str, kind: str = "server_error") -> dict[str, Any]:
    return {"type": kind, "code": code, "message": message, "param": None}


def httpx_client(url: str) -> Any:
    import httpx

    return httpx.Client(base_url=url, timeout=20)


def test_sglang_cache_aware_prefill_keeps_a_prompt_on_one_prefill(llama_dir: Path) -> None:
    """--prefill-policy cache_aware routes gRPC PD on the prompt's token ids (the exchange
    keeps them for the prefill policy): the same prompt three times, one prefill."""
    with (
        pdutil.start_grpc_prefill(llama_dir, "sglang") as p1,
        pdutil.start_grpc_prefill(llama_dir, "sglang") as p2,
        pdutil.start_grpc_decode(llama_dir, "sglang") as decode,
    ):
        args = [
            "--pd-disaggregation", "--prefill", p1.url, str(p1.bootstrap_port),
            "--prefill", p2.url, str(p2.bootstrap_port), "--decode", decode.url,
            "--model-path", str(llama_dir), "--prefill-policy", "cache_aware",
            "--decode-policy", "round_robin",
        ]  # fmt: skip
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready(timeout=30)
            long = {**CHAT, "messages": [{"role": "user", "content": "a long prompt " * 20}]}
            with gateway.client() as client:
                for _ in range(3):
                    answer = client.post("/v1/chat/completions", json=long)
                    assert answer.status_code == 200, answer.text
            counts = sorted(len(p.pd_stats()["rooms"]) for p in (p1, p2))
    assert counts == [0, 3]


def test_vllm_mooncake_pair_meets(llama_dir: Path) -> None:
    """vLLM with MooncakeConnector (the mocks' --kv-connector mooncake: GetServerInfo
    reports it and kv_engine_id; the decode checks the synthesized params against the
    prefill's bootstrap server): the prefill is tagged with a minted transfer id, the
    decode gets {transfer_id, remote_engine_id, remote_bootstrap_addr} and answers."""
    mooncake = ("--kv-connector", "mooncake")
    with grpc_pd(llama_dir, "vllm", wait_s=3.0, mocks=mooncake) as (prefill, decode, gateway):
        _chat_both_ways(gateway)
        tagged = json.loads(prefill.stats()["last_generate_request"]["kv_transfer_params_json"])
        assert tagged["transfer_id"].startswith("xfer-")
        assert set(tagged) == {"do_remote_decode", "do_remote_prefill", "transfer_id"}
        sent = json.loads(decode.stats()["last_generate_request"]["kv_transfer_params_json"])
        assert sent["transfer_id"] == tagged["transfer_id"]
        assert sent["remote_bootstrap_addr"] == f"http://127.0.0.1:{prefill.bootstrap_port}"
        assert sent["do_remote_prefill"] is True and sent["remote_engine_id"]
        assert decode.pd_stats()["kv_failures"] == 0


def test_in_flight_counts_settle_to_zero(sglang: Any, vllm: Any) -> None:
    """After every request above (answers, failed legs, aborted legs), each prefill and
    decode row's in-flight count is back to 0 in every process (run last: file order)."""
    from tests.gatewayutil import in_flight_total, wait_until

    for _prefill, _decode, gateway in (sglang, vllm):
        wait_until(lambda g=gateway: in_flight_total(g) == 0, 5.0, "in-flight back to 0")
