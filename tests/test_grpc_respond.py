"""smg.grpc.respond: engine outputs -> deltas (stop strings across token boundaries, stop
tokens, finish reasons) -> vLLM's OpenAI bodies and SSE chunks and SGLang's /generate
shapes, each parsed by the openai client's own models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from smg.grpc.prepare import Defaults, prepare_chat, prepare_completion, prepare_generate
from smg.grpc.respond import (
    ChatStreamWriter,
    ChoiceState,
    CompletionStreamWriter,
    Delta,
    GenerateStreamWriter,
    Usage,
    chat_body,
    completion_body,
    detokenize_body,
    embeddings_body,
    generate_body,
    tokenize_body,
)
from smg.grpc.types import EngineOutput, SamplingParams, TokenLogprob

# --------------------------------------------------------------------------- a tiny tokenizer

# id -> bytes; 0 is EOS (special); 7 and 8 are the two halves of "é" (a byte-level split)
VOCAB: dict[int, bytes] = {
    0: b"<eos>",
    1: b"Hello",
    2: b",",
    3: b" world",
    4: b" EN",
    5: b"D",
    6: b"!",
    7: b"\xc3",
    8: b"\xa9",
    9: b" more",
    10: b"<tool>",
}
SPECIAL = {0, 10}


class FakeTokenizer:
    eos_token_ids = (0,)
    vocab_size = len(VOCAB)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        data = b"".join(VOCAB[i] for i in ids if not (skip_special_tokens and i in SPECIAL))
        return data.decode("utf-8", "replace")

    def id_to_token(self, token_id: int) -> str | None:
        raw = VOCAB.get(token_id)
        return None if raw is None else raw.decode("latin-1")


class FakeDetokenizer:
    """The IncrementalDetokenizer contract: held-back incomplete UTF-8 at the end."""

    def __init__(self, tok: FakeTokenizer, skip: bool) -> None:
        self.tok, self.skip, self.ids, self.sent = tok, skip, [], 0

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        out, self.sent = text[self.sent : end], end
        return out

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        out, self.sent = text[self.sent :], len(text)
        return out


class FakeStops:
    """The StopMatcher contract: hold back the longest tail that may start a stop string."""

    def __init__(self, stops: Sequence[str], include: bool) -> None:
        self.stops, self.include, self.buf = list(stops), include, ""

    def feed(self, delta: str) -> tuple[str, str | None]:
        self.buf += delta
        best = None
        for s in self.stops:
            at = self.buf.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            out = self.buf[: at + len(s)] if self.include else self.buf[:at]
            self.buf = ""
            return out, s
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, None

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out


TOK = FakeTokenizer()


def state(sampling: SamplingParams, index: int = 0) -> ChoiceState:
    stops = FakeStops(sampling.stop, sampling.include_stop_str_in_output) if sampling.stop else None
    return ChoiceState(
        index,
        TOK,
        sampling,
        detokenizer=FakeDetokenizer(TOK, sampling.skip_special_tokens),
        stops=stops,
    )


def out(ids: list[int], **kw: Any) -> EngineOutput:
    return EngineOutput(index=kw.pop("index", 0), token_ids=ids, **kw)


def run(sampling: SamplingParams, chunks: list[EngineOutput]) -> list[Delta]:
    st = state(sampling)
    deltas = [st.on_output(c) for c in chunks]
    assert st.done()
    return deltas


# --------------------------------------------------------------------------- ChoiceState


def test_plain_text_and_eos_hidden() -> None:
    deltas = run(
        SamplingParams(),
        [out([1, 2]), out([3]), out([0], finished=True, finish_reason="stop")],
    )
    assert [(d.text, d.finish_reason, d.matched_stop, d.token_ids) for d in deltas] == [
        ("Hello,", None, None, [1, 2]),
        (" world", None, None, [3]),
        ("", "stop", None, [0]),
    ]


def test_split_utf8_is_held_back_until_complete() -> None:
    deltas = run(
        SamplingParams(), [out([1, 7]), out([8, 6], finished=True, finish_reason="length")]
    )
    assert [(d.text, d.finish_reason) for d in deltas] == [("Hello", None), ("é!", "length")]


def test_stop_string_across_tokens_is_hidden_and_ends_the_choice() -> None:
    st = state(SamplingParams(stop=["END"]))
    d1 = st.on_output(out([1, 4]))
    d2 = st.on_output(out([5, 6]))
    assert (d1.text, d1.finish_reason) == ("Hello ", None)  # " EN" may start "END": held
    assert (d2.text, d2.finish_reason, d2.matched_stop) == ("", "stop", "END")
    assert st.done()
    late = st.on_output(out([9], finished=True, finish_reason="length"))
    assert (late.text, late.finish_reason, late.token_ids) == ("", None, [])


def test_stop_string_shown_with_include_stop_str_in_output() -> None:
    deltas = run(
        SamplingParams(stop=["END"], include_stop_str_in_output=True),
        [out([1, 4]), out([5, 6])],
    )
    assert "".join(d.text for d in deltas) == "Hello END"
    assert (deltas[-1].finish_reason, deltas[-1].matched_stop) == ("stop", "END")


def test_engine_already_stopped_on_the_stop_string() -> None:
    deltas = run(
        SamplingParams(stop=["END"]),
        [out([1, 4, 5], finished=True, finish_reason="stop", matched_stop="END")],
    )
    assert [(d.text, d.finish_reason, d.matched_stop) for d in deltas] == [
        ("Hello ", "stop", "END")
    ]


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    deltas = run(
        SamplingParams(stop=["END"]),
        [out([1, 4]), out([9], finished=True, finish_reason="length")],
    )
    assert [(d.text, d.finish_reason) for d in deltas] == [
        ("Hello ", None),
        ("EN more", "length"),
    ]


def test_stop_token_id_hidden_unless_include_stop_str() -> None:
    # a normal token (6, "!") as a stop_token_id: hidden, reported as stop_reason 6
    deltas = run(
        SamplingParams(stop_token_ids=[6]),
        [out([1, 6], finished=True, finish_reason="stop", matched_stop=6)],
    )
    assert [(d.text, d.finish_reason, d.matched_stop) for d in deltas] == [("Hello", "stop", 6)]
    deltas = run(
        SamplingParams(stop_token_ids=[6], include_stop_str_in_output=True),
        [out([1, 6], finished=True, finish_reason="stop", matched_stop=6)],
    )
    assert [(d.text, d.matched_stop) for d in deltas] == [("Hello!", 6)]


def test_special_eos_is_not_text_even_when_included() -> None:
    deltas = run(
        SamplingParams(include_stop_str_in_output=True),
        [out([1, 0], finished=True, finish_reason="stop", matched_stop=0)],
    )
    assert deltas[0].text == "Hello"
    deltas = run(
        SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False),
        [out([1, 0], finished=True, finish_reason="stop", matched_stop=0)],
    )
    assert deltas[0].text == "Hello<eos>"


def test_stop_strings_are_not_matched_within_min_tokens() -> None:
    deltas = run(
        SamplingParams(stop=["Hello"], min_tokens=1),
        [out([1]), out([1]), out([6], finished=True, finish_reason="length")],
    )
    assert [(d.text, d.finish_reason, d.matched_stop) for d in deltas[:2]] == [
        ("Hello", None, None),
        ("", "stop", "Hello"),
    ]


@pytest.mark.parametrize(
    ("engine", "client"),
    [("stop", "stop"), ("length", "length"), ("abort", "abort"), ("error", "abort")],
)
def test_finish_reason_mapping(engine: str, client: str) -> None:
    deltas = run(SamplingParams(), [out([1], finished=True, finish_reason=engine)])
    assert deltas[0].finish_reason == client


def test_logprobs_pass_through() -> None:
    lp = [TokenLogprob(1, -0.5, [(1, -0.5), (3, -1.0)])]
    deltas = run(
        SamplingParams(logprobs=1), [out([1], logprobs=lp, finished=True, finish_reason="length")]
    )
    assert deltas[0].logprobs == lp


# --------------------------------------------------------------------------- bodies

NONE = Defaults()


def chat_prepared(**fields: Any) -> Any:
    return prepare_chat(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}, NONE
    )


def sse_events(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    events = []
    for block in data.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        payload = block[len(b"data: ") :]
        events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


LPS = [
    TokenLogprob(1, -0.25, [(3, -2.0), (1, -0.25)]),
    TokenLogprob(7, -0.5, [(7, -0.5)]),
    TokenLogprob(8, float("-inf"), []),
]


def test_chat_body_parses_with_openai() -> None:
    p = chat_prepared(logprobs=True, top_logprobs=2)
    deltas = [
        Delta(0, "Hello", LPS[:1], None, None, [1]),
        Delta(0, "é", LPS[1:], "stop", None, [7, 8]),
    ]
    body = chat_body(p, "abc", "m", 1700000000, TOK, [deltas], Usage(5, 3, 2))
    raw = orjson.loads(body)
    assert raw == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Helloé"},
                "logprobs": {
                    "content": [
                        {
                            "token": "Hello",
                            "logprob": -0.25,
                            "bytes": [72, 101, 108, 108, 111],
                            "top_logprobs": [
                                {
                                    "token": "Hello",
                                    "logprob": -0.25,
                                    "bytes": [72, 101, 108, 108, 111],
                                },
                                {
                                    "token": " world",
                                    "logprob": -2.0,
                                    "bytes": [32, 119, 111, 114, 108, 100],
                                },
                            ],
                        },
                        {
                            "token": "\ufffd",
                            "logprob": -0.5,
                            "bytes": [239, 191, 189],
                            "top_logprobs": [
                                {"token": "\ufffd", "logprob": -0.5, "bytes": [239, 191, 189]}
                            ],
                        },
                        {
                            "token": "\ufffd",
                            "logprob": -9999.0,
                            "bytes": [239, 191, 189],
                            "top_logprobs": [],
                        },
                    ]
                },
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    parsed = ChatCompletion.model_validate(raw)
    assert parsed.choices[0].message.content == "Helloé"
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 2


def test_chat_stream_shapes_parse_with_openai() -> None:
    p = chat_prepared(n=2, stream=True, stream_options={"include_usage": True})
    w = ChatStreamWriter(p, "abc", "m", 1700000000, TOK)
    data = w.start()
    data += w.delta(Delta(0, "Hello", None, None, None, [1]))
    assert w.delta(Delta(1, "", None, None, None, [7])) == b""  # nothing to say
    data += w.delta(Delta(1, "é", None, "length", None, [8]))
    data += w.delta(Delta(0, "", None, "stop", "END", [4, 5]))
    data += w.end(Usage(5, 5, 0))
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert (c["id"], c["object"], c["created"], c["model"]) == (
            "chatcmpl-abc",
            "chat.completion.chunk",
            1700000000,
            "m",
        )
    assert [c["choices"] for c in chunks] == [
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        [
            {
                "index": 1,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
        [
            {
                "index": 1,
                "delta": {"content": "é"},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        [
            {
                "index": 0,
                "delta": {},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": "END",
            }
        ],
        [],
    ]
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all("usage" not in c for c in chunks[:-1])


def test_chat_stream_without_usage_ends_with_done_only() -> None:
    w = ChatStreamWriter(chat_prepared(stream=True), "x", "m", 1, TOK)
    assert w.end(Usage(1, 1, 0)) == b"data: [DONE]\n\n"


def test_chat_stream_continuous_usage() -> None:
    p = chat_prepared(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    w = ChatStreamWriter(p, "x", "m", 1, TOK, prompt_tokens=4)
    first = sse_events(w.start())[0]
    assert first["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    second = sse_events(w.delta(Delta(0, "Hello", None, None, None, [1, 2])))[0]
    assert second["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    ChatCompletionChunk.model_validate(second)


def test_chat_stream_logprobs_chunk() -> None:
    p = chat_prepared(stream=True, logprobs=True, top_logprobs=1)
    w = ChatStreamWriter(p, "x", "m", 1, TOK)
    c = sse_events(w.delta(Delta(0, "", LPS[1:2], None, None, [7])))[0]
    ChatCompletionChunk.model_validate(c)
    assert c["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "\ufffd",
                "logprob": -0.5,
                "bytes": [239, 191, 189],
                "top_logprobs": [{"token": "\ufffd", "logprob": -0.5, "bytes": [239, 191, 189]}],
            }
        ]
    }


def test_completion_body_with_echo_and_logprobs() -> None:
    p = prepare_completion({"model": "m", "prompt": "Hi:", "echo": True, "logprobs": 1}, NONE)
    deltas = [
        Delta(0, "Hello", LPS[:1], None, None, [1]),
        Delta(0, " world", [TokenLogprob(3, -1.0, [(3, -1.0)])], "length", None, [3]),
    ]
    raw = orjson.loads(completion_body(p, "abc", "m", 7, TOK, [deltas], Usage(2, 2, 0)))
    assert raw["id"] == "cmpl-abc"
    assert raw["object"] == "text_completion"
    assert raw["choices"] == [
        {
            "index": 0,
            "text": "Hi:Hello world",
            "logprobs": {
                "text_offset": [3, 8],
                "token_logprobs": [-0.25, -1.0],
                "tokens": ["Hello", " world"],
                "top_logprobs": [{"Hello": -0.25}, {" world": -1.0}],
            },
            "finish_reason": "length",
            "stop_reason": None,
        }
    ]
    assert Completion.model_validate(raw).choices[0].text == "Hi:Hello world"


def test_completion_stream_parses_with_openai() -> None:
    p = prepare_completion(
        {
            "model": "m",
            "prompt": [1],
            "echo": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        NONE,
    )
    w = CompletionStreamWriter(p, "abc", "m", 7, TOK)
    data = w.start() + w.delta(Delta(0, " world", None, "stop", 0, [3, 0])) + w.end(Usage(1, 2, 0))
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    for c in events[:-1]:
        completion_chunk_validate(c)
    assert [c["choices"] for c in events[:-1]] == [
        [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": None}],
        [
            {
                "index": 0,
                "text": " world",
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": 0,
            }
        ],
        [],
    ]


def completion_chunk_validate(chunk: dict[str, Any]) -> None:
    """The client reads completion stream chunks as `Completion` without validation
    (`construct`); its model types finish_reason without null, which vLLM's chunks (and
    these) carry until the end: validate everything else strictly."""
    fixed = {
        **chunk,
        "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]],
    }
    Completion.model_validate(fixed)


def test_generate_body_sglang_shape() -> None:
    p = prepare_generate({"text": "x", "rid": "r1"}, NONE)
    deltas = [Delta(0, "Hello", None, None, None, [1]), Delta(0, "", None, "stop", 0, [0])]
    raw = orjson.loads(generate_body(p, "r1", "m", 7, TOK, [deltas], Usage(3, 2, 1)))
    assert raw == {
        "text": "Hello",
        "output_ids": [1, 0],
        "meta_info": {
            "id": "r1",
            "finish_reason": {"type": "stop", "matched": 0},
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "cached_tokens": 1,
        },
    }


def test_generate_body_n2_is_a_list_and_length_reason() -> None:
    p = prepare_generate({"text": "x", "sampling_params": {"n": 2}}, NONE)
    choices = [
        [Delta(0, "Hello", None, "length", None, [1])],
        [Delta(1, "!", None, "length", None, [6])],
    ]
    raw = orjson.loads(generate_body(p, "r", "m", 7, TOK, choices, Usage(3, 2, 0)))
    assert [item["meta_info"]["id"] for item in raw] == ["r-0", "r-1"]
    assert [item["meta_info"]["finish_reason"] for item in raw] == [
        {"type": "length", "length": 1},
        {"type": "length", "length": 1},
    ]


def test_generate_stream_is_cumulative() -> None:
    p = prepare_generate({"text": "x", "stream": True}, NONE)
    w = GenerateStreamWriter(p, "r", "m", 7, TOK, prompt_tokens=3)
    data = w.start()
    data += w.delta(Delta(0, "Hello", None, None, None, [1]))
    data += w.delta(Delta(0, ",", None, "length", None, [2]))
    data += w.end(Usage(3, 2, 0))
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert [(e["text"], e["output_ids"], e["meta_info"]["finish_reason"]) for e in events[:-1]] == [
        ("Hello", [1], None),
        ("Hello,", [1, 2], {"type": "length", "length": 2}),
    ]


def test_tokenize_and_detokenize_bodies() -> None:
    assert orjson.loads(tokenize_body([1, 3], TOK, 4096, {})) == {
        "count": 2,
        "max_model_len": 4096,
        "tokens": [1, 3],
        "token_strs": None,
    }
    assert orjson.loads(detokenize_body({"tokens": [1, 3, 0]}, TOK)) == {
        "prompt": "Hello world<eos>"
    }


def test_embeddings_body() -> None:
    raw = orjson.loads(embeddings_body([([0.5, -1.0], 3), ([1.0, 0.0], 2)], "m", {}))
    assert raw["object"] == "list"
    assert raw["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, -1.0]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]},
    ]
    assert raw["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert raw["model"] == "m"
