"""TTFT / ITL / token accounting from timed response pieces (pure)."""

from __future__ import annotations

import json

import pytest

from smg.bench.stream import StreamAccumulator


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat(delta: dict, usage: dict | None = None) -> bytes:
    obj: dict = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    if usage is not None:
        obj["usage"] = usage
    return sse(obj)


def make(kind: str = "chat", t_send: float = 100.0) -> StreamAccumulator:
    acc = StreamAccumulator(kind, t_send)
    acc.on_status(200)
    return acc


def test_role_only_chunk_does_not_start_ttft() -> None:
    acc = make()
    acc.feed(100.05, chat({"role": "assistant", "content": ""}))
    acc.feed(100.20, chat({"content": "Hello"}))
    acc.feed(100.22, chat({"content": " world"}))
    acc.feed(100.25, chat({"content": "!"}))
    acc.feed(100.26, sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}))
    acc.feed(100.26, b"data: [DONE]\n\n")
    acc.finish(100.27)
    assert acc.first_ts == 100.20
    assert acc.first_ts - acc.t_send == pytest.approx(0.20)
    assert acc.itl == pytest.approx([0.02, 0.03])
    assert acc.text == "Hello world!"
    assert (acc.usage_in, acc.usage_out) == (7, 3)
    assert acc.done and acc.error is None


def test_reasoning_and_tool_call_deltas_count_as_content() -> None:
    acc = make()
    acc.feed(1.0, chat({"role": "assistant"}))
    acc.feed(1.5, chat({"reasoning_content": "thinking"}))
    acc.feed(1.6, chat({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}))
    assert acc.first_ts == 1.5 and acc.itl == pytest.approx([0.1])
    acc2 = make()
    acc2.feed(2.0, chat({"reasoning": "x"}))
    assert acc2.first_ts == 2.0


def test_chunk_with_several_tokens_splits_its_gap() -> None:
    # Continuous usage stats give the cumulative count: 1, then 4 (3 new), then 5.
    acc = make()
    acc.feed(10.0, chat({"content": "a"}, {"completion_tokens": 1}))
    acc.feed(10.3, chat({"content": "bcd"}, {"completion_tokens": 4}))
    acc.feed(10.4, chat({"content": "e"}, {"completion_tokens": 5}))
    assert acc.itl == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert acc.tokens_seen == 5
    assert acc.first_ts + sum(acc.itl) == pytest.approx(acc.last_ts)


def test_logprobs_give_token_count_per_chunk() -> None:
    acc = make()
    acc.feed(1.0, chat({"content": "a"}))
    lp = {"content": [{"token": "b"}, {"token": "c"}]}
    obj = {"choices": [{"index": 0, "delta": {"content": "bc"}, "logprobs": lp}]}
    acc.feed(1.2, sse(obj))
    assert acc.itl == pytest.approx([0.1, 0.1])


def test_events_split_across_reads_and_joined_in_one_read() -> None:
    acc = make("completions")
    stream = (
        sse({"choices": [{"text": "A"}]})
        + sse({"choices": [{"text": "B"}]})
        + sse({"choices": [{"text": "C"}]})
    )
    cut1, cut2 = 10, len(stream) - 5
    acc.feed(1.0, stream[:cut1])  # nothing complete yet
    assert acc.first_ts is None
    acc.feed(2.0, stream[cut1:cut2])  # completes A and B together
    acc.feed(3.0, stream[cut2:])  # completes C
    assert acc.first_ts == 2.0
    assert acc.itl == pytest.approx([0.0, 1.0])
    assert acc.text == "ABC"


def test_crlf_events_and_comments() -> None:
    acc = make("completions")
    acc.feed(1.0, b": ping\r\n\r\n")
    acc.feed(2.0, b'data: {"choices":[{"text":"x"}]}\r\n\r\n')
    assert acc.first_ts == 2.0 and acc.text == "x"


def test_empty_text_chunk_is_a_token() -> None:
    # A special token or a partial UTF-8 character streams as an empty text: it is a token
    # (vLLM's rule), so its gap is not merged into the next one.
    acc = make("completions")
    acc.feed(1.0, sse({"choices": [{"text": ""}]}))
    acc.feed(1.5, sse({"choices": [{"text": "y"}]}))
    acc.feed(1.75, sse({"choices": [{"text": ""}]}))
    acc.feed(2.0, sse({"choices": [{"text": "z"}]}))
    assert acc.first_ts == 1.0
    assert acc.itl == pytest.approx([0.5, 0.25, 0.25])
    assert acc.text == "yz" and acc.tokens_seen == 4


def test_chat_empty_content_is_a_token_role_and_finish_are_not() -> None:
    acc = make(t_send=0.0)
    acc.feed(0.10, chat({"role": "assistant", "content": ""}))
    acc.feed(0.10, chat({"content": "a"}))
    acc.feed(0.20, chat({"content": ""}))
    acc.feed(0.30, chat({"content": "b"}))
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    acc.feed(0.30, sse(finish))
    acc.feed(0.30, sse({"choices": [], "usage": {"completion_tokens": 3}}))
    assert acc.first_ts == 0.10
    assert acc.itl == pytest.approx([0.1, 0.1])
    assert acc.tokens_seen == 3 and acc.text == "ab"


def test_completions_finish_only_chunk_is_not_a_token() -> None:
    acc = make("completions", t_send=0.0)
    acc.feed(0.1, sse({"choices": [{"text": "a", "finish_reason": None}]}))
    acc.feed(0.2, sse({"choices": [{"text": "", "finish_reason": None}]}))
    acc.feed(0.2, sse({"choices": [{"text": "", "finish_reason": "length"}]}))
    assert acc.itl == pytest.approx([0.1]) and acc.tokens_seen == 2
    # The last token and the finish reason in one chunk: a token.
    acc2 = make("completions", t_send=0.0)
    acc2.feed(0.1, sse({"choices": [{"text": "a"}]}))
    acc2.feed(0.3, sse({"choices": [{"text": "b", "finish_reason": "length"}]}))
    assert acc2.itl == pytest.approx([0.2])


def test_cumulative_usage_decides_what_is_a_token() -> None:
    # Continuous usage stats: the count, not the text, says whether a chunk is a token.
    acc = make(t_send=0.0)
    acc.feed(0.1, chat({"role": "assistant", "content": ""}, {"completion_tokens": 0}))
    acc.feed(0.2, chat({"content": ""}, {"completion_tokens": 1}))
    acc.feed(0.4, chat({"content": "x"}, {"completion_tokens": 2}))
    acc.feed(0.4, chat({"content": ""}, {"completion_tokens": 2}))
    assert acc.first_ts == 0.2
    assert acc.itl == pytest.approx([0.2]) and acc.tokens_seen == 2


def test_final_usage_total_is_not_a_running_count() -> None:
    # A server that sends the usage total in its last token chunk (no continuous stats):
    # that chunk is one token, not `total` tokens splitting its gap.
    acc = make("completions", t_send=0.0)
    acc.feed(0.1, sse({"choices": [{"text": "a"}]}))
    acc.feed(0.2, sse({"choices": [{"text": "b"}]}))
    last = {
        "choices": [{"text": "c", "finish_reason": "length"}],
        "usage": {"completion_tokens": 3},
    }
    acc.feed(0.3, sse(last))
    assert acc.itl == pytest.approx([0.1, 0.1]) and acc.usage_out == 3


def test_sglang_generate_cumulative_text_and_counts() -> None:
    acc = make("generate", t_send=0.0)
    acc.feed(0.5, sse({"text": "a", "meta_info": {"prompt_tokens": 9, "completion_tokens": 1}}))
    acc.feed(0.7, sse({"text": "abc", "meta_info": {"completion_tokens": 3}}))
    acc.feed(0.8, sse({"text": "abc", "meta_info": {"completion_tokens": 3}}))  # no new token
    acc.feed(0.9, sse({"text": "abcd", "meta_info": {"completion_tokens": 4}}))
    acc.feed(0.9, b"data: [DONE]\n\n")
    acc.finish(0.9)
    assert acc.first_ts == 0.5
    assert acc.itl == pytest.approx([0.1, 0.1, 0.2])
    assert acc.text == "abcd" and acc.usage_out == 4 and acc.usage_in == 9


def test_stream_error_object_marks_failure() -> None:
    acc = make()
    acc.feed(1.0, sse({"error": {"message": "boom"}}))
    assert acc.error == "stream_error"


def test_invalid_json_marks_failure() -> None:
    acc = make()
    acc.feed(1.0, b"data: {not json\n\n")
    assert acc.error == "invalid_json"


def test_malformed_chunk_marks_failure_without_raising() -> None:
    acc = make()
    acc.feed(1.0, sse({"choices": [{"delta": ["not", "a", "dict"]}]}))
    assert acc.error == "invalid_response"
    acc2 = make()
    acc2.feed(1.0, b"data: [1, 2]\n\n")
    assert acc2.error == "invalid_response"


def test_non_200_keeps_error_body_and_no_timing() -> None:
    acc = StreamAccumulator("chat", 0.0)
    acc.on_status(503)
    acc.feed(1.0, b'{"error":{"message":"overloaded"}}')
    acc.finish(1.0)
    assert acc.first_ts is None
    assert "overloaded" in acc.error_body()


def test_non_streamed_body() -> None:
    acc = StreamAccumulator("chat", 0.0, stream=False)
    acc.on_status(200)
    body = {
        "choices": [{"message": {"role": "assistant", "content": "hi there"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    raw = json.dumps(body).encode()
    acc.feed(0.4, raw[:10])
    acc.feed(0.5, raw[10:])
    acc.finish(0.5)
    assert acc.first_ts == 0.5 and acc.itl == []
    assert acc.text == "hi there" and acc.usage_out == 2


def test_embeddings_body() -> None:
    acc = StreamAccumulator("embeddings", 0.0)
    acc.on_status(200)
    acc.feed(0.1, b'{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":4}}')
    acc.finish(0.1)
    assert acc.first_ts == 0.1 and acc.usage_in == 4 and acc.error is None


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ValueError):
        StreamAccumulator("nope", 0.0)
