"""smg.translate, /v1/messages served by an OpenAI-chat-only worker (pure): the request
mapping with exact values, answers and streams validated by the anthropic SDK's types."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from smg.providers import API_ANTHROPIC, API_BOTH, API_OPENAI
from smg.translate import TranslateError, translation
from smg.translate.messages_chat import SIGNATURE_PLACEHOLDER, MessagesOverChat

_EVENT = TypeAdapter(RawMessageStreamEvent)


def _t(body: dict[str, Any], model: str | None = None) -> MessagesOverChat:
    found = translation("/v1/messages", body, API_OPENAI, model)
    assert isinstance(found, MessagesOverChat)
    return found


def _req(body: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    return orjson.loads(_t(body, model).upstream_body)


def _base(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def test_no_translation_for_same_api_or_both() -> None:
    assert translation("/v1/messages", _base(), API_ANTHROPIC, None) is None
    assert translation("/v1/messages", _base(), API_BOTH, None) is None
    assert translation("/v1/chat/completions", {"model": "m"}, API_OPENAI, None) is None
    assert translation("/v1/completions", {"model": "m"}, API_OPENAI, None) is None


def test_request_core_fields() -> None:
    body = _base(
        system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        stop_sequences=["END", "STOP"],
        metadata={"user_id": "u-1"},
    )
    t = _t(body, model="resolved")
    assert t.upstream_path == b"/v1/chat/completions"
    assert t.stream is False
    assert orjson.loads(t.upstream_body) == {
        "model": "resolved",
        "messages": [
            {"role": "system", "content": "be brief\nbe kind"},
            {"role": "user", "content": "hi"},
        ],
        "max_completion_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["END", "STOP"],
        "user": "u-1",
    }


def test_request_stream_asks_for_usage() -> None:
    t = _t(_base(stream=True, system="sys"))
    req = orjson.loads(t.upstream_body)
    assert t.stream is True
    assert req["stream"] is True and req["stream_options"] == {"include_usage": True}
    assert req["model"] == "m"
    assert req["messages"][0] == {"role": "system", "content": "sys"}


def test_request_images_tools_and_round_trip() -> None:
    body = _base(
        messages=[
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
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "calling"},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "sunny"}],
                    },
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
        tools=[
            {
                "name": "get",
                "description": "weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            {"name": "bare"},
        ],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    req = _req(body)
    assert req["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": "calling",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "and?"},
    ]
    assert req["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get",
                "description": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {
            "type": "function",
            "function": {"name": "bare", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert req["tool_choice"] == "required"
    assert req["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get"}, {"type": "function", "function": {"name": "get"}}),
    ],
)
def test_request_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    req = _req(
        _base(tools=[{"name": "get", "input_schema": {"type": "object"}}], tool_choice=choice)
    )
    assert req["tool_choice"] == expected
    assert "parallel_tool_calls" not in req


def test_request_tool_only_assistant_has_null_content_and_result_images_follow() -> None:
    req = _req(
        _base(
            messages=[
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "text", "text": "a"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/jpeg",
                                        "data": "Zg==",
                                    },
                                },
                            ],
                        }
                    ],
                },
            ]
        )
    )
    assert req["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "a"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,Zg=="}}],
        },
    ]


@pytest.mark.parametrize(
    ("budget", "effort"),
    [(1024, "low"), (2048, "medium"), (3000, "medium"), (4096, "high"), (20000, "high")],
)
def test_request_thinking_becomes_reasoning_effort(budget: int, effort: str) -> None:
    req = _req(_base(thinking={"type": "enabled", "budget_tokens": budget}))
    assert req["reasoning_effort"] == effort
    assert "reasoning_effort" not in _req(_base(thinking={"type": "disabled"}))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "content"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "document"}]}],
            },
            "document",
        ),
        (
            _base(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "web_search_20250305",
        ),
        (_base(tool_choice={"type": "maybe"}), "tool_choice"),
        (
            _base(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            ),
            "file",
        ),
        (_base(system=[{"type": "image"}]), "system"),
    ],
)
def test_request_errors(body: dict[str, Any], words: str) -> None:
    with pytest.raises(TranslateError, match=words):
        translation("/v1/messages", body, API_OPENAI, None)


def _chat_answer(message: dict[str, Any], finish: str = "stop", **choice: Any) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-abc",
            "object": "chat.completion",
            "created": 1,
            "model": "up-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", **message},
                    "finish_reason": finish,
                    **choice,
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        }
    )


def test_response_text() -> None:
    out = orjson.loads(_t(_base()).response(200, _chat_answer({"content": "hello"})))
    assert out == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 4},
    }
    Message.model_validate(out)


def test_response_tool_use_and_thinking() -> None:
    answer = _chat_answer(
        {
            "content": None,
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"a": 1}'},
                }
            ],
        },
        "tool_calls",
    )
    out = orjson.loads(_t(_base()).response(200, answer))
    assert out["content"] == [
        {"type": "thinking", "thinking": "think", "signature": SIGNATURE_PLACEHOLDER},
        {"type": "tool_use", "id": "call_9", "name": "get", "input": {"a": 1}},
    ]
    assert out["stop_reason"] == "tool_use"
    # anthropic 0.38.0 has no thinking type: the rest validates, thinking checked by shape above.
    Message.model_validate({**out, "content": out["content"][1:]})


@pytest.mark.parametrize(
    ("finish", "choice", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),
        ("stop", {"stop_reason": 128009}, "end_turn", None),
        ("stop", {"stop_reason": "other"}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("tool_calls", {}, "tool_use", None),
        ("content_filter", {}, "refusal", None),
    ],
)
def test_response_stop_reasons(
    finish: str, choice: dict[str, Any], stop_reason: str, stop_sequence: str | None
) -> None:
    out = orjson.loads(
        _t(_base(stop_sequences=["END"])).response(
            200, _chat_answer({"content": "x"}, finish, **choice)
        )
    )
    assert (out["stop_reason"], out["stop_sequence"]) == (stop_reason, stop_sequence)
    if stop_reason != "refusal":  # anthropic 0.38.0 predates `refusal`
        Message.model_validate(out)


def test_response_cached_usage() -> None:
    answer = orjson.loads(_chat_answer({"content": "x"}))
    answer["usage"]["prompt_tokens_details"] = {"cached_tokens": 6}
    out = orjson.loads(_t(_base()).response(200, orjson.dumps(answer)))
    assert out["usage"] == {"input_tokens": 4, "output_tokens": 4, "cache_read_input_tokens": 6}
    assert Message.model_validate(out).usage.cache_read_input_tokens == 6


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (
            400,
            b'{"error":{"message":"bad thing","type":"invalid_request_error","code":null}}',
            "invalid_request_error",
            "bad thing",
        ),
        (
            401,
            b'{"error":{"message":"no key","type":"invalid_request_error"}}',
            "authentication_error",
            "no key",
        ),
        (429, b'{"error":{"message":"slow down"}}', "rate_limit_error", "slow down"),
        (500, b"upstream exploded", "api_error", "upstream exploded"),
        (404, b'{"detail":"x","message":"Not Found"}', "not_found_error", "Not Found"),
        (503, b"", "overloaded_error", "Service Unavailable"),
    ],
)
def test_response_errors_take_anthropic_shape(
    status: int, body: bytes, kind: str, message: str
) -> None:
    out = orjson.loads(_t(_base()).response(status, body))
    assert out == {"type": "error", "error": {"type": kind, "message": message}}


def test_response_without_choices_is_an_error() -> None:
    out = orjson.loads(_t(_base()).response(200, b'{"id":"x","choices":[]}'))
    assert out["type"] == "error" and out["error"]["type"] == "api_error"
