"""smg.translate, /v1/chat/completions served by an Anthropic-Messages-only worker
(pure): the request mapping with exact values, answers and streams validated by the
openai SDK's types (and its own stream accumulator)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from smg.providers import API_ANTHROPIC
from smg.translate import TranslateError, translation
from smg.translate.chat_messages import DEFAULT_MAX_TOKENS, ChatOverMessages


def _t(body: dict[str, Any], model: str | None = None) -> ChatOverMessages:
    found = translation("/v1/chat/completions", body, API_ANTHROPIC, model)
    assert isinstance(found, ChatOverMessages)
    return found


def _req(body: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    return orjson.loads(_t(body, model).upstream_body)


def _base(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_request_core_fields_and_default_max_tokens() -> None:
    t = _t(
        _base(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "be kind"}]},
                {"role": "user", "content": "hi"},
            ],
            temperature=0.2,
            top_p=0.8,
            top_k=3,
            stop="END",
            user="u-7",
            seed=1,
            presence_penalty=0.5,
        ),
        model="claude-resolved",
    )
    assert t.upstream_path == b"/v1/messages" and t.stream is False
    assert orjson.loads(t.upstream_body) == {
        "model": "claude-resolved",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "system": "be brief\nbe kind",
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 3,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-7"},
    }
    assert DEFAULT_MAX_TOKENS == 4096


def test_request_max_tokens_names_and_stream() -> None:
    assert _req(_base(max_tokens=10))["max_tokens"] == 10
    assert _req(_base(max_tokens=10, max_completion_tokens=20))["max_tokens"] == 20
    t = _t(_base(stream=True, stream_options={"include_usage": True}, stop=["a", "b"]))
    req = orjson.loads(t.upstream_body)
    assert t.stream is True and req["stream"] is True and "stream_options" not in req
    assert req["stop_sequences"] == ["a", "b"]


def test_request_images_tools_and_round_trip() -> None:
    req = _req(
        _base(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/y.png", "detail": "low"},
                        },
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "dropped",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "now", "arguments": ""},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "noon"}],
                },
                {"role": "user", "content": "and?"},
            ],
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "get",
                        "description": "weather",
                        "parameters": {"type": "object"},
                    },
                },
                {"type": "function", "function": {"name": "now"}},
            ],
            tool_choice="required",
            parallel_tool_calls=False,
        )
    )
    assert req["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "get", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
                {"type": "text", "text": "and?"},
            ],
        },
    ]
    assert req["tools"] == [
        {"name": "get", "description": "weather", "input_schema": {"type": "object"}},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert req["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "get"}}, {"type": "tool", "name": "get"}),
    ],
)
def test_request_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "get"}}]
    assert _req(_base(tools=tools, tool_choice=choice))["tool_choice"] == expected


def test_request_tool_choice_without_tools_is_dropped() -> None:
    assert "tool_choice" not in _req(_base(tool_choice="none", parallel_tool_calls=False))


def test_request_parallel_false_without_choice_is_auto_without_parallel() -> None:
    tools = [{"type": "function", "function": {"name": "get"}}]
    assert _req(_base(tools=tools, parallel_tool_calls=False))["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }


@pytest.mark.parametrize(("effort", "budget"), [("low", 1024), ("medium", 2048), ("high", 4096)])
def test_request_reasoning_effort_becomes_thinking(effort: str, budget: int) -> None:
    req = _req(_base(reasoning_effort=effort))
    assert req["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert req["max_tokens"] == DEFAULT_MAX_TOKENS + budget
    assert _req(_base(reasoning_effort=effort, max_tokens=9000))["max_tokens"] == 9000
    assert "thinking" not in _req(_base(reasoning_effort="minimal"))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "system", "content": "only"}]}, "at least one"),
        (_base(n=2), "'n'"),
        (_base(logprobs=True), "logprobs"),
        (_base(functions=[{"name": "f"}]), "functions"),
        (_base(response_format={"type": "json_object"}), "json_object"),
        (_base(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "input_audio"),
        (
            _base(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png,AAAA"}}
                        ],
                    }
                ]
            ),
            "base64",
        ),
        (_base(messages=[{"role": "tool", "content": "x"}]), "tool_call_id"),
        (_base(messages=[{"role": "function", "content": "x"}]), "role"),
        (
            _base(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            ),
            "JSON object",
        ),
        (_base(tools=[{"type": "custom", "custom": {}}]), "function"),
        (_base(tool_choice="sometimes"), "tool_choice"),
        (_base(reasoning_effort="max"), "reasoning_effort"),
    ],
)
def test_request_errors(body: dict[str, Any], words: str) -> None:
    with pytest.raises(TranslateError, match=words):
        translation("/v1/chat/completions", body, API_ANTHROPIC, None)


def _message(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_abc",
            "type": "message",
            "role": "assistant",
            "model": "claude-up",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 4, **usage},
        }
    )


def test_response_text() -> None:
    t = _t(_base())
    out = orjson.loads(
        t.response(200, _message([{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]))
    )
    assert isinstance(out.pop("created"), int)
    assert out == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "model": "claude-up",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    }
    ChatCompletion.model_validate({**out, "created": 1})


def test_response_tool_use_thinking_and_cache_usage() -> None:
    body = _message(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "calling"},
            {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris"}},
        ],
        "tool_use",
        cache_read_input_tokens=5,
        cache_creation_input_tokens=2,
    )
    out = orjson.loads(_t(_base()).response(200, body))
    completion = ChatCompletion.model_validate(out)
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": "calling",
        "reasoning_content": "hmm",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert completion.choices[0].finish_reason == "tool_calls"
    assert out["usage"] == {
        "prompt_tokens": 17,
        "completion_tokens": 4,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 5},
    }


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
def test_response_stop_reasons(stop_reason: str, finish: str) -> None:
    out = orjson.loads(
        _t(_base()).response(200, _message([{"type": "text", "text": "x"}], stop_reason))
    )
    assert ChatCompletion.model_validate(out).choices[0].finish_reason == finish


@pytest.mark.parametrize(
    ("status", "body", "kind", "code", "message"),
    [
        (
            400,
            b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}',
            "invalid_request_error",
            "invalid_request_error",
            "max_tokens: too big",
        ),
        (
            429,
            b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}',
            "invalid_request_error",
            "rate_limit_error",
            "slow",
        ),
        (
            529,
            b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}',
            "server_error",
            "overloaded_error",
            "busy",
        ),
        (502, b"bad gateway", "server_error", None, "bad gateway"),
    ],
)
def test_response_errors_take_openai_shape(
    status: int, body: bytes, kind: str, code: str | None, message: str
) -> None:
    out = orjson.loads(_t(_base()).response(status, body))
    assert out == {"error": {"message": message, "type": kind, "code": code, "param": None}}


# --- streams ---------------------------------------------------------------------------


def _ev(body: dict[str, Any]) -> bytes:
    return b"event: " + body["type"].encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


_START = {
    "type": "message_start",
    "message": {
        "id": "msg_s1",
        "type": "message",
        "role": "assistant",
        "model": "claude-up",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 3},
    },
}

_MESSAGES_STREAM = b"".join(
    _ev(e)
    for e in [
        _START,
        {"type": "ping"},
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "hmm"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "sig"},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"city":'},
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
        },
        {"type": "content_block_stop", "index": 2},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
)


def _chunks(raw: bytes) -> list[dict[str, Any] | str]:
    out: list[dict[str, Any] | str] = []
    for frame in raw.split(b"\n\n"):
        if not frame:
            continue
        assert frame.startswith(b"data: ") and b"\n" not in frame
        data = frame[6:]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def _run(stream: bytes, body: dict[str, Any] | None = None, split: int = 0) -> bytes:
    t = _t(body or _base(stream=True))
    if split:
        out = b"".join(t.feed(stream[i : i + split]) for i in range(0, len(stream), split))
    else:
        out = t.feed(stream)
    return out + t.finish()


def test_stream_chunks_and_sdk_accumulation() -> None:
    chunks = _chunks(
        _run(_MESSAGES_STREAM, _base(stream=True, stream_options={"include_usage": True}))
    )
    assert chunks[-1] == "[DONE]"
    bodies = [c for c in chunks[:-1] if isinstance(c, dict)]
    created = bodies[0]["created"]
    deltas = [
        (b["choices"][0]["delta"], b["choices"][0]["finish_reason"]) if b["choices"] else b["usage"]
        for b in bodies
    ]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"reasoning_content": "hmm"}, None),
        ({"content": "Hel"}, None),
        ({"content": "lo"}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, None),
        ({}, "tool_calls"),
        {
            "prompt_tokens": 15,
            "completion_tokens": 9,
            "total_tokens": 24,
            "prompt_tokens_details": {"cached_tokens": 3},
        },
    ]
    state = ChatCompletionStreamState()
    for body in bodies:
        assert (
            body["id"] == "chatcmpl-s1"
            and body["model"] == "claude-up"
            and body["created"] == created
        )
        state.handle_chunk(ChatCompletionChunk.model_validate(body))
    final = state.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Hello"
    assert (
        message.tool_calls is not None
        and message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    )
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.total_tokens == 24


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    chunks = _chunks(_run(_MESSAGES_STREAM))
    assert chunks[-1] == "[DONE]"
    assert all(isinstance(c, dict) and c["choices"] for c in chunks[:-1])


@pytest.mark.parametrize("split", [1, 3, 50])
def test_stream_split_anywhere_gives_the_same_bytes(split: int) -> None:
    body = _base(stream=True, stream_options={"include_usage": True})
    whole = _run(_MESSAGES_STREAM, body)  # `created` is a clock reading: compared without it
    assert _strip_created(_run(_MESSAGES_STREAM, body, split)) == _strip_created(whole)
    crlf = _MESSAGES_STREAM.replace(b"\n", b"\r\n")
    assert _strip_created(_run(crlf, body, split)) == _strip_created(whole)


def _strip_created(raw: bytes) -> list[Any]:
    out = []
    for chunk in _chunks(raw):
        if isinstance(chunk, dict):
            chunk.pop("created")
        out.append(chunk)
    return out


def test_stream_upstream_error_cut_short_and_abort() -> None:
    t = _t(_base(stream=True))
    err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    chunks = _chunks(t.feed(_ev(_START) + _ev(err) + _ev({"type": "message_stop"})))
    assert chunks[1:] == [
        {"error": {"message": "Overloaded", "type": "stream_error", "code": "overloaded_error"}},
        "[DONE]",
    ]
    assert t.finish() == b""
    t2 = _t(_base(stream=True))
    t2.feed(_ev(_START))
    assert _chunks(t2.finish()) == [
        {
            "error": {
                "message": "the worker's stream ended before the answer was complete",
                "type": "stream_error",
                "code": "upstream_stream_ended",
            }
        },
        "[DONE]",
    ]
    assert _chunks(_t(_base(stream=True)).abort("upstream_timeout", "slow")) == [
        {"error": {"message": "slow", "type": "stream_error", "code": "upstream_timeout"}},
        "[DONE]",
    ]
