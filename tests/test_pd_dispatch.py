"""The pure parts of the PD data plane (smg.dataplane.pd), against the Rust SMG 1.13's
behaviour (pd_router.rs, and the binary tried with the same bytes)."""

from __future__ import annotations

import random

import orjson

from smg.dataplane import pd


def test_rooms_are_63_bit_and_one_per_batch_item() -> None:
    rng = random.Random(7)
    rooms = pd.new_rooms(None, rng)
    assert len(rooms) == 1
    many = pd.new_rooms(1000, rng)
    assert len(many) == 1000
    assert all(0 <= room < 2**63 for room in many)
    assert max(many) >= 2**62  # the top bit of the 63 is used
    assert len(set(many)) == 1000


def test_batch_size_follows_1_13() -> None:
    assert pd.batch_size("/generate", {"text": "hi"}) is None
    assert pd.batch_size("/generate", {"input_ids": [[1, 2], [3, 4]]}) == 2
    assert pd.batch_size("/generate", {"input_ids": [1, 2, 3]}) is None
    assert pd.batch_size("/generate", {"input_ids": []}) is None
    assert pd.batch_size("/v1/chat/completions", {"n": 2}) == 2
    assert pd.batch_size("/v1/chat/completions", {"n": 1}) is None
    assert pd.batch_size("/v1/chat/completions", {"n": True}) is None
    assert pd.batch_size("/v1/completions", {"prompt": ["a", "b", "c"]}) == 3
    assert pd.batch_size("/v1/completions", {"prompt": "a"}) is None
    assert pd.batch_size("/v1/completions", {"prompt": []}) is None


def test_inject_scalars_and_arrays() -> None:
    body: dict[str, object] = {"text": "hi"}
    pd.inject_bootstrap(body, "10.0.0.1", 8998, None, [5])
    assert body == {
        "text": "hi",
        "bootstrap_host": "10.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": 5,
    }
    batch: dict[str, object] = {"prompt": ["a", "b"]}
    pd.inject_bootstrap(batch, "h", None, 2, [1, 2])
    assert batch["bootstrap_host"] == ["h", "h"]
    assert batch["bootstrap_port"] == [None, None]  # a prefill without a bootstrap port
    assert batch["bootstrap_room"] == [1, 2]


def test_wants_logprobs_per_route() -> None:
    assert pd.wants_logprobs("/generate", {"return_logprob": True})
    assert not pd.wants_logprobs("/generate", {})
    assert pd.wants_logprobs("/v1/chat/completions", {"logprobs": True})
    assert not pd.wants_logprobs("/v1/chat/completions", {"logprobs": False})
    assert pd.wants_logprobs("/v1/completions", {"logprobs": 0})
    assert not pd.wants_logprobs("/v1/completions", {})


def test_merge_whole_answer_puts_prefill_rows_first() -> None:
    prefill = pd.prefill_logprobs(
        b'{"text":"","meta_info":{"input_token_logprobs":[[-1.0,1,null],[-2.0,2,null]]}}'
    )
    assert prefill == [[-1.0, 1, None], [-2.0, 2, None]]
    merged = pd.merge_answer(
        prefill, b'{"text":"hello","meta_info":{"input_token_logprobs":[[-3.0,3,null]]}}'
    )
    # 1.13's bytes for the same answers (tried): compact JSON, prefill rows first.
    assert merged == (
        b'{"text":"hello","meta_info":{"input_token_logprobs":'
        b"[[-1.0,1,null],[-2.0,2,null],[-3.0,3,null]]}}"
    )
    untouched = b'{"text": "x"}'
    assert pd.merge_answer(prefill, untouched) is untouched
    assert pd.prefill_logprobs(b"not json") is None


def test_stream_merger_joins_split_events_and_keeps_done() -> None:
    merger = pd.StreamMerger([[-1.0, 1, None]])
    event = b'data: {"text":"a","meta_info":{"input_token_logprobs":[[-3.0,3,null]]}}\n\n'
    first = merger.feed(event[:20])
    assert first == b""
    out = merger.feed(event[20:] + b"data: [DONE]\n\n")
    assert out == (
        b'data: {"text":"a","meta_info":{"input_token_logprobs":[[-1.0,1,null],[-3.0,3,null]]}}'
        b"\n\ndata: [DONE]\n\n"
    )
    assert merger.feed(b": comment\n\n") == b": comment\n\n"
    assert merger.feed(b"data: {tail") == b""
    assert merger.finish() == b"data: {tail"


def test_prefill_error_mapping_as_1_13() -> None:
    # Tried on 1.13: a prefill answering 500 {"error": {"message": "prefill boom"}}.
    status, code, message = pd.prefill_error(500, b'{"error": {"message": "prefill boom"}}')
    assert (status, code) == (500, "prefill_internal_error")
    assert message == (
        'Prefill server error (500 Internal Server Error): {"error": {"message": "prefill boom"}}'
    )
    assert pd.prefill_error(503, b"x")[:2] == (503, "prefill_unavailable")
    assert pd.prefill_error(429, b"x")[:2] == (500, "prefill_error")


def test_decode_error_mapping_as_1_13() -> None:
    assert pd.decode_error(500, b'{"error": {"message": "decode boom"}}') == (
        500,
        "decode_internal_error",
        "decode boom",
    )
    assert pd.decode_error(400, b'{"message": "bad"}') == (400, "decode_bad_request", "bad")
    assert pd.decode_error(418, b"teapot") == (500, "decode_error", "teapot")
    event = pd.decode_stream_error(500, b'{"error": "x"}')
    assert event == b'data: {"error":{"message":{"error":"x"},"status":500}}\n\n'
    assert orjson.loads(pd.decode_stream_error(502, b"plain")[6:]) == {
        "error": {"message": "plain", "status": 502}
    }


def test_transport_message_names_the_url() -> None:
    assert pd.transport_message("http://127.0.0.1:31101", "/generate") == (
        "Transport error: error sending request for url (http://127.0.0.1:31101/generate)"
    )
    assert pd.TRANSPORT_CODE == "PD disaggregation request failed"
