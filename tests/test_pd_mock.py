"""The PD (prefill/decode) roles of the mock worker (smg/mock_worker/pd.py): the pure parts
with exact values, the two roles talking over their bootstrap protocol on loopback, and
the same mocks behind the Rust SMG 1.13 (`--pd-disaggregation`), which shows they check
what a real SGLang PD pair checks."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smg.mock_worker.options import parse_options
from smg.mock_worker.pd import (
    FAILED,
    PREFILLING,
    READY,
    RoomBook,
    bootstrap_route,
    bootstrap_targets,
    item_count,
)
from smg.mock_worker.plan import ApiError
from tests import mockutil, pdutil
from tests.gatewayutil import free_port

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "one two three"}]}


# --- pure: bootstrap fields ---------------------------------------------------------------


def test_targets_single_request() -> None:
    obj = pdutil.pd_body(CHAT, 7, 9000, host="10.0.0.2")
    assert bootstrap_targets("chat", obj) == [("10.0.0.2", 9000, 7)]


def test_targets_scalar_room_spreads_over_a_batch_as_sglang() -> None:
    # SGLang's GenerateReqInput: a scalar room becomes room + i for sequence i.
    obj = {
        "text": ["a", "b", "c"],
        "bootstrap_host": "h",
        "bootstrap_port": 1,
        "bootstrap_room": 10,
    }
    assert bootstrap_targets("generate", obj) == [("h", 1, 10), ("h", 1, 11), ("h", 1, 12)]


def test_targets_lists_as_the_rust_router_sends_them() -> None:
    obj = {
        "prompt": ["a", "b"],
        "bootstrap_host": ["h", "h"],
        "bootstrap_port": [5, 5],
        "bootstrap_room": [3, 99],
    }
    assert bootstrap_targets("completion", obj) == [("h", 5, 3), ("h", 5, 99)]


def test_targets_refused_with_the_reason() -> None:
    with pytest.raises(ApiError) as e:
        bootstrap_targets("chat", dict(CHAT))
    assert e.value.status == 400
    assert "without bootstrap_room, bootstrap_host" in e.value.message
    bad = pdutil.pd_body(CHAT, -1, 9000)
    with pytest.raises(ApiError, match="bootstrap_room must be an integer"):
        bootstrap_targets("chat", bad)
    with pytest.raises(ApiError, match="every bootstrap_port must be a port number"):
        bootstrap_targets(
            "chat", {**CHAT, "bootstrap_host": "h", "bootstrap_port": [0], "bootstrap_room": [1]}
        )
    mixed = {**CHAT, "bootstrap_host": ["h"], "bootstrap_port": [1, 2], "bootstrap_room": [1, 2]}
    with pytest.raises(ApiError, match=r"bootstrap_host \(1\), bootstrap_port \(2\)"):
        bootstrap_targets("chat", mixed)


def test_targets_null_port_is_the_engines_own_as_sglang() -> None:
    # SGLang's scheduler: a request without bootstrap_port uses the engine's
    # --disaggregation-bootstrap-port; 1.13 sends null for `--prefill URL` without a port.
    obj = {**CHAT, "n": 2, "bootstrap_host": ["h", "h"], "bootstrap_port": [None, 7]}
    obj["bootstrap_room"] = [1, 2]
    assert bootstrap_targets("chat", obj, default_port=8998) == [("h", 8998, 1), ("h", 7, 2)]
    one = {**CHAT, "bootstrap_host": "h", "bootstrap_room": 5}
    assert bootstrap_targets("chat", one, default_port=9) == [("h", 9, 5)]


def test_item_count() -> None:
    assert item_count("chat", {"n": 3}) == 3
    assert item_count("chat", {}) == 1
    assert item_count("completion", {"prompt": ["a", "b"], "n": 2}) == 4
    assert item_count("completion", {"prompt": [1, 2, 3]}) == 1  # token ids: one prompt
    assert item_count("generate", {"input_ids": [[1], [2]]}) == 2
    assert item_count("generate", {"text": "x", "sampling_params": {"n": 2}}) == 2


def test_generate_logprobs_shape() -> None:
    import random

    from smg.mock_worker.plan import Timing, plan_generate, word_id
    from smg.mock_worker.render import generate_response

    obj = {"text": "a b", "return_logprob": True, "sampling_params": {"max_new_tokens": 2}}
    plan = plan_generate(obj, Timing(0.0, 0.0, 16, 0.0), random.Random(0))
    assert plan.logprob_ids == [[word_id("a"), word_id("b")]]
    meta = json.loads(generate_response(plan, "r"))["meta_info"]
    assert meta["input_token_logprobs"] == [[None, word_id("a"), None], [-0.2, word_id("b"), None]]
    assert meta["output_token_logprobs"] == [[-0.25, 1000, None], [-0.25, 1001, None]]
    plan.input_logprobs = False  # a decode engine's answer
    assert json.loads(generate_response(plan, "r"))["meta_info"]["input_token_logprobs"] == []


# --- pure: the room book and the bootstrap routes -------------------------------------------


def test_room_book_states_and_bounds() -> None:
    book = RoomBook(max_rooms=2, ttl_s=10.0)
    book.start([1, 2], now=0.0)
    book.finish([1], ok=True)
    book.finish([2], ok=False)
    book.finish([1], ok=False)  # only a room still prefilling changes
    assert book.get(1, 1.0) == {"room": 1, "state": READY, "age_s": 1.0}
    assert book.get(2, 1.0)["state"] == FAILED  # type: ignore[index]
    book.start([3], now=2.0)  # over max_rooms: the oldest goes
    assert book.get(1, 2.0) is None
    assert [r["room"] for r in book.listing(2.0)] == [2, 3]
    assert book.get(3, 12.5) is None  # older than ttl_s
    assert book.listing(12.5) == []


def test_bootstrap_routes() -> None:
    book = RoomBook()
    book.start([42], now=1.0)
    assert bootstrap_route(book, "GET", "/pd/rooms/42", 1.5) == (
        200,
        {"room": 42, "state": PREFILLING, "age_s": 0.5},
    )
    assert bootstrap_route(book, "GET", "/pd/rooms/43", 1.5)[0] == 404
    assert bootstrap_route(book, "GET", "/pd/rooms/x", 1.5)[0] == 400
    assert bootstrap_route(book, "POST", "/pd/rooms", 1.5)[0] == 405
    assert bootstrap_route(book, "GET", "/pd/rooms", 1.5)[1] == {
        "rooms": [{"room": 42, "state": PREFILLING, "age_s": 0.5}]
    }


def test_cli_refusals() -> None:
    assert parse_options(["--pd-role", "prefill"]).bootstrap_port == 8998  # SGLang's default
    assert parse_options(["--pd-role", "decode", "--bootstrap-port", "9"]).bootstrap_port == 9
    for argv in (
        ["--pd-role", "prefill", "--engine", "vllm"],
        ["--bootstrap-port", "9000"],
        ["--pd-role", "decode", "--bootstrap-port", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_options(argv)


# --- the two roles on loopback ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[pdutil.PdMocks, pdutil.PdMocks]]:
    prefill = pdutil.start_prefill(1, "--output-len", "8")
    try:
        decode = pdutil.start_decode(1, "--output-len", "8", wait_s=2.0)
        try:
            yield prefill, decode
        finally:
            decode.stop()
    finally:
        prefill.stop()


@pytest.fixture(autouse=False)
def clean(pair: tuple[pdutil.PdMocks, pdutil.PdMocks]) -> Iterator[None]:
    yield
    for mocks in pair:
        pdutil.set_faults(mocks.url, ttft_ms=0, error_rate=0.0, hang_rate=0.0, crash_rate=0.0)


def _both(
    prefill: pdutil.PdMocks, decode: pdutil.PdMocks, path: str, body: dict[str, Any]
) -> tuple[tuple[int, bytes], tuple[int, bytes], float]:
    """Send `body` to the prefill and the decode at once (as a PD router does):
    ((prefill status, body), (decode status, body), decode seconds)."""

    def one(url: str) -> tuple[int, bytes, float]:
        t0 = time.monotonic()
        status, _, data = mockutil.request("POST", url + path, body, timeout=10.0)
        return status, data, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fp = pool.submit(one, prefill.url)
        fd = pool.submit(one, decode.url)
        p, d = fp.result(), fd.result()
    return (p[0], p[1]), (d[0], d[1]), d[2]


def test_both_roles_refuse_a_request_without_bootstrap_fields(pair: Any) -> None:
    for mocks in pair:
        status, data = mockutil.request_json("POST", mocks.url + "/v1/chat/completions", CHAT)
        assert status == 400, data
        assert "Disaggregated request received without bootstrap_room" in data["error"]["message"]


def test_pair_answers_and_the_room_is_recorded(pair: Any, clean: None) -> None:
    prefill, decode = pair
    body = pdutil.pd_body(CHAT, 1001, prefill.bootstrap_port)
    (ps, pb), (ds, db), _ = _both(prefill, decode, "/v1/chat/completions", body)
    assert ps == 200 and ds == 200, (pb, db)
    # The prefill computes one token (SGLang: max_new_tokens = 1); the decode the answer.
    assert json.loads(pb)["usage"]["completion_tokens"] == 1
    assert json.loads(db)["usage"]["completion_tokens"] == 8
    assert pdutil.room_state(prefill, 1001) == READY
    assert pdutil.room_state(prefill, 999_999) is None


def test_pair_streams(pair: Any, clean: None) -> None:
    prefill, decode = pair
    body = pdutil.pd_body({**CHAT, "stream": True}, 1002, prefill.bootstrap_port)
    (ps, _), (ds, db), _ = _both(prefill, decode, "/v1/chat/completions", body)
    assert ps == 200 and ds == 200
    events = [line for line in db.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 8 + 2  # the role chunk, 8 tokens, the finish chunk, [DONE]


def test_pair_batch(pair: Any, clean: None) -> None:
    prefill, decode = pair
    body = {
        "prompt": ["a b", "c d e"],
        "bootstrap_host": ["127.0.0.1"] * 2,
        "bootstrap_port": [prefill.bootstrap_port] * 2,
        "bootstrap_room": [2001, 2002],
    }
    (ps, _), (ds, db), _ = _both(prefill, decode, "/v1/completions", body)
    assert ps == 200 and ds == 200
    assert len(json.loads(db)["choices"]) == 2
    states = pdutil.room_states(prefill)
    assert (states[2001], states[2002]) == (READY, READY)


def test_pair_generate_logprobs_come_from_the_prefill(pair: Any, clean: None) -> None:
    prefill, decode = pair
    body = {"input_ids": [5, 6, 7], "return_logprob": True, "sampling_params": {}}
    body = pdutil.pd_body(body, 1003, prefill.bootstrap_port)
    (ps, pb), (ds, db), _ = _both(prefill, decode, "/generate", body)
    assert (ps, ds) == (200, 200)
    rows = [[None, 5, None], [-0.2, 6, None], [-0.3, 7, None]]
    assert json.loads(pb)["meta_info"]["input_token_logprobs"] == rows
    assert json.loads(db)["meta_info"]["input_token_logprobs"] == []
    assert len(json.loads(db)["meta_info"]["output_token_logprobs"]) == 8


def test_decode_without_its_prefill_fails_after_the_wait(pair: Any) -> None:
    _, decode = pair
    before = pdutil.kv_failures(decode.url)
    body = pdutil.pd_body(CHAT, 3001, pair[0].bootstrap_port)
    t0 = time.monotonic()
    status, data = mockutil.request_json("POST", decode.url + "/v1/chat/completions", body)
    took = time.monotonic() - t0
    assert status == 500, data
    assert data["error"]["message"].startswith("KV transfer failed: bootstrap_room 3001 not ready")
    assert 1.9 <= took < 8.0  # --pd-wait-s 2
    assert pdutil.kv_failures(decode.url) == before + 1


def test_decode_waits_for_a_slow_prefill(pair: Any, clean: None) -> None:
    prefill, decode = pair
    pdutil.set_faults(prefill.url, ttft_ms=400)
    body = pdutil.pd_body(CHAT, 4001, prefill.bootstrap_port)
    (ps, _), (ds, _), took = _both(prefill, decode, "/v1/chat/completions", body)
    assert (ps, ds) == (200, 200)
    assert took >= 0.38  # the decode answered only once the prefill was done


def test_failed_prefill_fails_the_decode_at_once(pair: Any, clean: None) -> None:
    prefill, decode = pair
    pdutil.set_faults(prefill.url, error_rate=1.0)
    body = pdutil.pd_body(CHAT, 5001, prefill.bootstrap_port)
    (ps, _), (ds, db), took = _both(prefill, decode, "/v1/chat/completions", body)
    assert (ps, ds) == (500, 500)
    assert b"the prefill of bootstrap_room 5001" in db
    assert took < 1.5  # not the whole 2 s wait
    assert pdutil.room_state(prefill, 5001) == FAILED


def test_prefill_crash_kills_the_process_and_fails_the_decode() -> None:
    with (
        pdutil.start_prefill(1, "--crash-rate", "1", "--ttft-ms", "100") as prefill,
        pdutil.start_decode(1, wait_s=0.5) as decode,
    ):
        body = pdutil.pd_body(CHAT, 6001, prefill.bootstrap_port)

        def to_prefill() -> str:
            try:
                mockutil.request("POST", prefill.url + "/v1/chat/completions", body)
            except (OSError, ConnectionError) as e:  # reset: no answer at all
                return type(e).__name__
            return "answered"

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(to_prefill)
            status, data = mockutil.request_json("POST", decode.url + "/v1/chat/completions", body)
            assert fut.result() != "answered"
        assert status == 500 and "KV transfer failed" in data["error"]["message"]
        assert prefill.proc.wait(5) == 1


# --- behind the Rust SMG 1.13 -----------------------------------------------------------------

RUST_SMG = Path(os.environ.get("SMG_RUST_BIN", "/work/main/native_bench/.venv-rust/bin/smg"))
needs_rust = pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")


@contextlib.contextmanager
def rust_gateway(
    pd_args: list[str], *extra: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The Rust SMG 1.13 in PD mode on a free port, ready; stopped on leaving."""
    port = free_port()
    argv = [str(RUST_SMG), "launch", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--pd-disaggregation", *pd_args, "--prometheus-port", str(free_port())]
    # No shutdown grace: it would hold every stop 5 s although nothing is in flight.
    argv += ["--log-level", "warn", "--shutdown-grace-period-secs", "0", *extra]
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if mockutil.request("GET", url + "/readiness", timeout=1.0)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"Rust SMG not ready: {log.read()[-2000:]!r}")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# One attempt per request and no breaker, so a fault test sees exactly one PD dispatch.
ONE_SHOT = ("--disable-retries", "--disable-circuit-breaker")


@pytest.fixture(scope="module")
def rust_pd(pair: tuple[pdutil.PdMocks, pdutil.PdMocks]) -> Iterator[str]:
    prefill, decode = pair
    with rust_gateway([*prefill.prefill_args(), *decode.decode_args()]) as url:
        yield url


def _rooms_added(prefill: pdutil.PdMocks, before: dict[int, str]) -> dict[int, str]:
    return {r: s for r, s in pdutil.room_states(prefill).items() if r not in before}


@needs_rust
def test_rust_pd_non_stream(pair: Any, rust_pd: str) -> None:
    prefill, _ = pair
    before = pdutil.room_states(prefill)
    status, data = mockutil.request_json("POST", rust_pd + "/v1/chat/completions", CHAT)
    assert status == 200, data
    assert data["usage"]["completion_tokens"] == 8  # the decode's answer
    added = _rooms_added(prefill, before)
    assert list(added.values()) == [READY]
    assert all(0 <= room < 2**63 for room in added)  # 1.13's range


@needs_rust
def test_rust_pd_stream(pair: Any, rust_pd: str) -> None:
    prefill, _ = pair
    before = pdutil.room_states(prefill)
    status, _, data = mockutil.request(
        "POST", rust_pd + "/v1/chat/completions", {**CHAT, "stream": True}
    )
    assert status == 200
    events = [line for line in data.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 11
    assert list(_rooms_added(prefill, before).values()) == [READY]


@needs_rust
def test_rust_pd_batch(pair: Any, rust_pd: str) -> None:
    prefill, _ = pair
    before = pdutil.room_states(prefill)
    body = {"model": "mock-model", "prompt": ["a b", "c d", "e f"], "max_tokens": 4}
    status, data = mockutil.request_json("POST", rust_pd + "/v1/completions", body)
    assert status == 200, data
    assert len(data["choices"]) == 3
    assert list(_rooms_added(prefill, before).values()) == [READY] * 3  # one room per prompt


@needs_rust
def test_rust_pd_wrong_bootstrap_port_fails_in_the_decode(pair: Any) -> None:
    # The decode is reached, but its prefill is not where the gateway says: no KV.
    prefill, decode = pair
    wrong = ["--prefill", prefill.url, str(free_port()), *decode.decode_args()]
    with rust_gateway(wrong, *ONE_SHOT) as url:
        t0 = time.monotonic()
        status, data = mockutil.request_json("POST", url + "/v1/chat/completions", CHAT)
        took = time.monotonic() - t0
    assert status == 500, data
    assert data["error"]["code"] == "decode_internal_error"
    assert data["error"]["message"].startswith("KV transfer failed: bootstrap_room")
    assert took >= 1.9  # the decode's whole --pd-wait-s 2


@needs_rust
def test_rust_pd_prefill_error_is_the_prefills(pair: Any, clean: None) -> None:
    prefill, decode = pair
    with rust_gateway([*prefill.prefill_args(), *decode.decode_args()], *ONE_SHOT) as url:
        pdutil.set_faults(prefill.url, error_rate=1.0)
        status, data = mockutil.request_json("POST", url + "/v1/chat/completions", CHAT)
    assert status == 500, data
    assert data["error"]["code"] == "prefill_internal_error"  # 1.13 reports the prefill's
    assert "mock injected error (error_rate)" in data["error"]["message"]


@needs_rust
def test_rust_pd_prefill_crash_aborts_the_decode(pair: Any) -> None:
    _, decode = pair
    before = mockutil.stats(decode.url)["disconnects"]
    with (
        pdutil.start_prefill(1, "--crash-rate", "1", "--ttft-ms", "100") as prefill,
        rust_gateway([*prefill.prefill_args(), *decode.decode_args()], *ONE_SHOT) as url,
    ):
        status, data = mockutil.request_json("POST", url + "/v1/chat/completions", CHAT)
        assert prefill.proc.wait(5) == 1
    assert status == 502, data
    assert data["error"]["code"] == "PD disaggregation request failed"
    assert data["error"]["message"].startswith("Transport error")
    # The gateway dropped the decode leg at once: it never waited out its KV.
    mockutil.wait_for(lambda: mockutil.stats(decode.url)["disconnects"] > before, 3.0)
    assert mockutil.stats(decode.url)["disconnects"] == before + 1


@needs_rust
def test_rust_pd_merges_the_prefills_input_logprobs(rust_pd: str) -> None:
    # 1.13 merges meta_info.input_token_logprobs from the prefill's JSON answer into the
    # decode's for a non-streamed single /generate (its SSE or batch answers it leaves as
    # the decode sent them: it parses the prefill body as one JSON object).
    body = {
        "input_ids": [5, 6, 7],
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 2},
    }
    status, data = mockutil.request_json("POST", rust_pd + "/generate", body)
    assert status == 200, data
    meta = data["meta_info"]
    assert meta["input_token_logprobs"] == [[None, 5, None], [-0.2, 6, None], [-0.3, 7, None]]
    assert meta["output_token_logprobs"] == [[-0.25, 1000, None], [-0.25, 1001, None]]
    status, _, raw = mockutil.request("POST", rust_pd + "/generate", {**body, "stream": True})
    assert status == 200
    first = json.loads(raw.decode().split("\n")[0][len("data: ") :])
    assert first["meta_info"]["input_token_logprobs"] == []  # not merged by 1.13


# --- gRPC PD roles (grpc_pd.py) ------------------------------------------------------------

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
        pdutil.start_grpc_decode(llama_dir, "sglang", wait_s=0.5) as decode,
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
def _rust_grpc_pd(llama_dir: Path, backend: str) -> Iterator[tuple[str, Any, Any]]:
    with (
        pdutil.start_grpc_prefill(llama_dir, backend) as prefill,
        pdutil.start_grpc_decode(llama_dir, backend, wait_s=2.0) as decode,
        tempfile.TemporaryDirectory() as cache,
    ):
        pd_args = ["--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url]
        extra = ("--model-path", str(llama_dir), *ONE_SHOT)
        with rust_gateway(pd_args, *extra, env={"XDG_CACHE_HOME": cache}) as url:
            yield url, prefill, decode


GRPC_CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@needs_rust
@pytest.mark.parametrize("backend", ["sglang", "vllm"])
def test_rust_grpc_pd(llama_dir: Path, backend: str) -> None:
    with _rust_grpc_pd(llama_dir, backend) as (url, prefill, decode):
        status, data = mockutil.request_json("POST", url + "/v1/chat/completions", GRPC_CHAT)
        assert status == 200, data
        assert data["usage"]["completion_tokens"] == 5
        body = {**GRPC_CHAT, "stream": True}
        status, _, raw = mockutil.request("POST", url + "/v1/chat/completions", body, timeout=10)
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
        rooms = prefill.pd_stats()["rooms"]
        assert [r["state"] for r in rooms] == [READY, READY]
        sent = decode.stats()["last_generate_request"]
        if backend == "vllm":  # 1.13 relays what the prefill returned, as is
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
