"""Prefill/decode disaggregation over HTTP through `smg launch --processes 2
--pd-disaggregation` with the PD mock workers (tests/pdutil.py): the mocks check what a
real SGLang pair checks (bootstrap fields present, the decode answers only once its
room's prefill is done), so a request that succeeds proves the pair met."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests import mockutil, pdutil
from tests.gatewayutil import Gateway, interleaved, pinned_clients, running_gateway, wait_until
from tests.pdutil import metric_sum, pd_gateway

GENERATE = {"text": "one two three four", "sampling_params": {"max_new_tokens": 3}}
CHAT = {
    "model": "mock-model",
    "max_tokens": 3,
    "messages": [{"role": "user", "content": "one two three"}],
}


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[pdutil.PdMocks, pdutil.PdMocks, Gateway]]:
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=5) as decode,
        pd_gateway(prefill, decode) as gateway,
    ):
        yield prefill, decode, gateway


def _rooms(prefill: pdutil.PdMocks) -> dict[int, str]:
    return pdutil.room_states(prefill)


def test_generate_not_streamed_meets_in_one_new_room(pair: Any) -> None:
    prefill, _decode, gateway = pair
    before = _rooms(prefill)
    with gateway.client() as client:
        answer = client.post("/generate", json=GENERATE)
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == "The quick brown"
    new = {room: state for room, state in _rooms(prefill).items() if room not in before}
    assert list(new.values()) == ["ready"]
    assert 0 <= next(iter(new)) < 2**63


def test_chat_streamed_relays_the_decode_stream(pair: Any) -> None:
    _prefill, _decode, gateway = pair
    with (
        gateway.client() as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        text = answer.read().decode()
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    content = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in orjson.loads(event)["choices"]
    )
    assert content == "The quick brown"


def test_batches_carry_one_room_per_item(pair: Any) -> None:
    prefill, _decode, gateway = pair
    before = _rooms(prefill)
    with gateway.client() as client:
        completions = client.post(
            "/v1/completions",
            json={"model": "mock-model", "prompt": ["a b", "c d", "e f"], "max_tokens": 2},
        )
        generate = client.post(
            "/generate",
            json={"input_ids": [[1, 2], [3, 4]], "sampling_params": {"max_new_tokens": 2}},
        )
    assert completions.status_code == 200, completions.text
    assert [c["index"] for c in completions.json()["choices"]] == [0, 1, 2]
    assert generate.status_code == 200, generate.text
    assert len(generate.json()) == 2
    new = [state for room, state in _rooms(prefill).items() if room not in before]
    assert new == ["ready"] * 5  # 3 + 2 rooms, each prefilled


def test_input_logprobs_come_from_the_prefill(pair: Any) -> None:
    prefill, _decode, gateway = pair
    body = {**GENERATE, "return_logprob": True}
    # What the prefill alone answers for this prompt (the decode reports no input rows).
    status, direct = mockutil.request_json(
        "POST", prefill.url + "/generate", pdutil.pd_body(body, 12345, prefill.bootstrap_port)
    )
    assert status == 200
    expected = direct["meta_info"]["input_token_logprobs"]
    assert len(expected) == 4
    with gateway.client() as client:
        answer = client.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["meta_info"]["input_token_logprobs"] == expected


def test_other_routes_are_refused_clearly(pair: Any) -> None:
    _prefill, _decode, gateway = pair
    with gateway.client() as client:
        answer = client.post("/v1/embeddings", json={"model": "mock-model", "input": "x"})
        bad = client.post("/generate", content=b"[1, 2]")
    assert answer.status_code == 501
    assert answer.json()["error"]["code"] == "not_implemented"
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "Request must be a JSON object"


def test_prefill_dying_mid_request_aborts_both_legs() -> None:
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=5) as decode,
        pd_gateway(prefill, decode) as gateway,
    ):
        pdutil.set_faults(prefill.url, crash_rate=1.0)
        with gateway.client() as client:
            answer = client.post("/generate", json=GENERATE)
        # One clean error, in 1.13's words, long before the decode's 5 s KV wait.
        assert answer.status_code == 502
        assert answer.json()["error"] == {
            "type": "server_error",
            "code": "PD disaggregation request failed",
            "message": f"Transport error: error sending request for url ({prefill.url}/generate)",
            "param": None,
        }
        assert answer.elapsed.total_seconds() < 3.0

        # Each attempt's decode leg was dropped by the gateway (a disconnect), none was
        # answered or failed by the mock (1.13 retries the whole pair, as here).
        def settled() -> dict[str, Any] | None:
            stats = mockutil.stats(decode.url)
            sent = stats["requests_by_route"]["/generate"]
            return stats if sent >= 1 and stats["disconnects"] == sent else None

        stats = wait_until(settled, 10.0, "every decode leg dropped")
        assert stats["pd"]["kv_failures"] == 0
        wait_until(lambda: not prefill.alive(), 10.0, "the crashed prefill to exit")


def test_prefill_error_answer_is_1_13s() -> None:
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=5) as decode,
        pd_gateway(prefill, decode, "--disable-retries") as gateway,
    ):
        pdutil.set_faults(prefill.url, error_rate=1.0)
        with gateway.client() as client:
            answer = client.post("/generate", json=GENERATE)
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert error["code"] == "prefill_internal_error"
        assert error["message"].startswith("Prefill server error (500 Internal Server Error): ")
        assert answer.headers["x-smg-error-code"] == "prefill_internal_error"


def test_prefill_admission_holds_across_processes() -> None:
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=10) as decode,
        pd_gateway(prefill, decode, "--prefill-max-inflight-requests-per-worker", "1") as gateway,
        pinned_clients(gateway.url, 6) as pinned,  # six on each process
    ):
        pdutil.set_faults(prefill.url, ttft_ms=150)
        clients = interleaved(pinned)
        answers = pdutil.staggered_posts(gateway.url, "/generate", GENERATE, [0.0] * 12, clients)
        assert [a.status_code for a in answers] == [200] * 12
        assert {a.headers.get("x-smg-process", "") for a in answers} == {"0", "1"}
        # Never two prefills at once on the worker, whichever process sent them.
        assert mockutil.stats(prefill.url)["peak_in_flight"] == 1


def test_prefill_cache_aware_decode_power_of_two() -> None:
    with (
        pdutil.start_prefill(2) as prefill,
        pdutil.start_decode(2, wait_s=5) as decode,
        pd_gateway(
            prefill, decode, "--prefill-policy", "cache_aware", "--decode-policy", "power_of_two"
        ) as gateway,
    ):
        prompt = {**GENERATE, "text": "a long shared system prompt " * 20}
        with gateway.client() as client:
            for _ in range(6):
                answer = client.post("/generate", json=prompt)
                assert answer.status_code == 200, answer.text
        per_prefill = [
            mockutil.stats(url)["requests_by_route"].get("/generate", 0) for url in prefill.urls
        ]
        per_decode = [
            mockutil.stats(url)["requests_by_route"].get("/generate", 0) for url in decode.urls
        ]
        # cache_aware: the same prompt stays on one prefill worker (the index is shared by
        # both processes); the decode side is its own policy and only has to add up.
        assert sorted(per_prefill) == [0, 6]
        assert sum(per_decode) == 6


def test_pd_metrics_count_each_dispatch(pair: Any) -> None:
    _prefill, _decode, gateway = pair
    before = gateway.metrics()
    with gateway.client() as client:
        for _ in range(3):
            assert client.post("/generate", json=GENERATE).status_code == 200
    after = gateway.metrics()
    for family in ("smg_pd_ttft_seconds_count{", "smg_pd_prefill_duration_seconds_count{"):
        assert metric_sum(after, family) - metric_sum(before, family) == 3, family
    routed = 'smg_router_requests_total{process="'
    pd_lines = [line for line in after.splitlines() if line.startswith(routed)]
    assert pd_lines and all('backend_type="pd"' in line for line in pd_lines)
    assert 'runtime="sglang"' in after


def test_prefill_dying_is_retried_on_another_pair() -> None:
    with (
        pdutil.start_prefill() as dying,
        pdutil.start_prefill() as healthy,
        pdutil.start_decode(wait_s=5) as decode,
    ):
        args = [
            "--pd-disaggregation",
            *dying.prefill_args(),
            *healthy.prefill_args(),
            *decode.decode_args(),
            "--prefill-policy",
            "round_robin",
        ]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready()
            pdutil.set_faults(dying.url, crash_rate=1.0)
            # One connection (one process): round robin sends one of the first two
            # requests to the dying prefill; 1.13 retries the pair with a new room.
            with gateway.client() as client:
                answers = [client.post("/generate", json=GENERATE) for _ in range(2)]
            assert [a.status_code for a in answers] == [200, 200], answers[-1].text
            wait_until(lambda: not dying.alive(), 10.0, "the crashed prefill to exit")
            assert list(pdutil.room_states(healthy).values()) == ["ready", "ready"]


def test_prefill_admission_queue_timeout_and_full_as_1_13() -> None:
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=10) as decode,
        pd_gateway(prefill, decode, *pdutil.admission_args(1, queue_size=1)) as gateway,
    ):
        pdutil.set_faults(prefill.url, ttft_ms=2500)
        answers = pdutil.staggered_posts(gateway.url, "/generate", GENERATE, (0.0, 0.3, 0.6))
        pdutil.assert_queue_timeout_and_full(answers, gateway.metrics())


def test_decode_answer_waits_for_the_prefill() -> None:
    # A decode that answers at once (a plain mock: it ignores the bootstrap fields) and a
    # prefill that answers after 400 ms: the decode's answer is held until the prefill's
    # is in (1.13 reads the prefill's answer before relaying the decode's), then relayed.
    with (
        pdutil.start_prefill() as prefill,
        mockutil.start_mock_workers(1) as plain,
    ):
        args = ["--pd-disaggregation", *prefill.prefill_args(), "--decode", plain.url]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready()
            pdutil.set_faults(prefill.url, ttft_ms=400)
            with gateway.client(timeout=10.0) as client:
                for stream in (False, True):
                    answer = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                    assert answer.status_code == 200, answer.text
                    assert answer.elapsed.total_seconds() >= 0.4
                    assert "The" in answer.text


def test_worker_info_comes_from_the_first_prefill(pair: Any) -> None:
    prefill, _decode, gateway = pair
    direct = httpx.get(prefill.url + "/get_model_info", timeout=10.0)
    with gateway.client() as client:
        answer = client.get("/get_model_info")
    assert answer.status_code == 200, answer.text
    assert answer.json() == direct.json()
