"""The PD (prefill/decode) roles of the mock worker (smg/mock_worker/pd.py): the pure parts
with exact values, the two roles talking over their bootstrap protocol on loopback, and
the same mocks behind the Rust SMG 1.13 (`--pd-disaggregation`), which shows they check
what a real SGLang PD pair checks."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
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
    assert [r["room"] for r in book.listing(2.0, last=1)] == [3] and len(book) == 2
    assert book.get(3, 12.5) is None  # older than ttl_s
    assert book.listing(12.5) == []


def test_room_book_long_poll() -> None:
    import asyncio

    async def run() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        book = RoomBook()
        loop.call_later(0.05, book.start, [1], 0.0)  # the room appears ...
        loop.call_later(0.1, book.finish, [1], True)  # ... then is prefilled
        t0 = loop.time()
        await book.wait_settled(1, 5.0)
        settled = loop.time() - t0
        t0 = loop.time()
        await book.wait_settled(1, 5.0)  # already settled: at once
        again = loop.time() - t0
        t0 = loop.time()
        await book.wait_settled(2, 0.1)  # never seen: the whole timeout
        return settled, again, loop.time() - t0

    settled, again, unseen = asyncio.run(run())
    assert 0.09 <= settled < 2.0 and again < 0.05 and 0.09 <= unseen < 2.0


def test_bootstrap_routes() -> None:
    book = RoomBook()
    book.start([42], now=1.0)
    assert bootstrap_route(book, "GET", "/pd/rooms/42", 1.5) == (
        200,
        {"room": 42, "state": PREFILLING, "age_s": 0.5},
    )
    assert bootstrap_route(book, "GET", "/pd/rooms/43", 1.5)[0] == 404
    assert bootstrap_route(book, "GET", "/pd/rooms/a%2Fb", 1.5)[0] == 400
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


def test_streamed_decode_without_its_prefill_ends_with_an_error_event(pair: Any) -> None:
    # SGLang sends a stream's head at once; a scheduler abort (a failed KV transfer) is
    # an in-band error event, then [DONE].
    _, decode = pair
    body = pdutil.pd_body({**CHAT, "stream": True}, 3002, pair[0].bootstrap_port)
    status, headers, data = mockutil.request("POST", decode.url + "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in data.decode().split("\n") if line.startswith("data: ")]
    assert len(events) == 2 and events[1] == "data: [DONE]"
    error = json.loads(events[0][len("data: ") :])["error"]
    assert (error["type"], error["code"]) == ("INTERNAL_SERVER_ERROR", 500)
    assert error["message"].startswith("KV transfer failed: bootstrap_room 3002 not ready")


def test_streamed_decode_head_after_the_room_fails_with_a_status() -> None:
    # --pd-stream-head ready: the head waits for the room, so a failure is a plain 500.
    with pdutil.start_decode(1, wait_s=0.3, stream_head="ready") as decode:
        body = pdutil.pd_body({**CHAT, "stream": True}, 3003, free_port())
        status, data = mockutil.request_json("POST", decode.url + "/v1/chat/completions", body)
    assert status == 500
    assert data["error"]["message"].startswith("KV transfer failed: bootstrap_room 3003")


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

RUST_SMG = pdutil.RUST_SMG
needs_rust = pytest.mark.skipif(not RUST_SMG.exists(), reason=f"no Rust SMG 1.13 at {RUST_SMG}")
rust_gateway = pdutil.rust_gateway
ONE_SHOT = pdutil.ONE_SHOT


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
        body = {**CHAT, "stream": True}
        sstatus, _, raw = mockutil.request("POST", url + "/v1/chat/completions", body)
    assert status == 500, data
    assert data["error"]["code"] == "decode_internal_error"
    assert data["error"]["message"].startswith("KV transfer failed: bootstrap_room")
    assert took >= 1.9  # the decode's whole --pd-wait-s 2
    # Streamed, 1.13 relays the decode's stream: 200, the in-band error event, [DONE].
    assert sstatus == 200
    assert b'"message":"KV transfer failed: bootstrap_room' in raw
    assert raw.rstrip().endswith(b"data: [DONE]")


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


def test_decode_survives_a_restarted_prefill_on_the_same_bootstrap_port() -> None:
    # The decode keeps its bootstrap connections alive; one to a prefill that went away
    # is dropped and a fresh one made, not failed.
    port = free_port()
    with pdutil.start_decode(1, wait_s=2.0) as decode:
        for room in (8001, 8002):
            with pdutil.start_prefill(1, bootstrap_port=port) as prefill:
                assert prefill.bootstrap_port == port
                body = pdutil.pd_body(CHAT, room, port)
                (ps, _), (ds, db), took = _both(prefill, decode, "/v1/chat/completions", body)
                assert (ps, ds) == (200, 200), db
                assert took < 1.5  # no wait-out on the stale connection
        assert pdutil.kv_failures(decode.url) == 0


def test_each_prefill_worker_has_its_own_bootstrap_port_and_rooms() -> None:
    with pdutil.start_prefill(2, bootstrap_port=0) as prefill:
        assert len(set(prefill.bootstrap_ports)) == 2
        body = pdutil.pd_body(CHAT, 9001, prefill.bootstrap_ports[1])
        status, _ = mockutil.request_json("POST", prefill.urls[1] + "/v1/chat/completions", body)
        assert status == 200
        assert (pdutil.room_states(prefill, 0), pdutil.room_states(prefill, 1)) == (
            {},
            {9001: READY},
        )
    assert prefill.prefill_args()[:3] == [
        "--prefill",
        prefill.urls[0],
        str(prefill.bootstrap_ports[0]),
    ]
