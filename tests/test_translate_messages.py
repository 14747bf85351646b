"""smg.translate, /v1/messages served by an OpenAI-chat-only worker (pure): the request
mapping with exact values, answers and streams validated by the anthropic SDK's types."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import BetaErrorResponse, Message, RawMessageStreamEvent
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


def test_request_tool_choice_without_tools_is_dropped() -> None:
    req = _req(_base(tool_choice={"type": "none", "disable_parallel_tool_use": True}))
    assert "tool_choice" not in req and "parallel_tool_calls" not in req


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


def test_request_adaptive_thinking_and_named_effort() -> None:
    assert _req(_base(thinking={"type": "adaptive"}))["reasoning_effort"] == "medium"
    body = _base(
        thinking={"type": "enabled", "budget_tokens": 1024}, output_config={"effort": "high"}
    )
    assert _req(body)["reasoning_effort"] == "high"
    assert "reasoning_effort" not in _req(_base(output_config={"effort": "max"}))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": []}]}, "content"),
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
        (_base(mcp_servers=[{"type": "url", "url": "https://m", "name": "m"}]), "mcp_servers"),
        (_base(container="c-1"), "container"),
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


@pytest.mark.parametrize(
    ("finish", "stop_reason"), [("stop", "tool_use"), ("length", "max_tokens")]
)
def test_tool_calls_finished_by_stop_or_cut_by_length(finish: str, stop_reason: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"a":'}}
    out = orjson.loads(_t(_base()).response(200, _chat_answer({"tool_calls": [call]}, finish)))
    assert out["stop_reason"] == stop_reason
    stream = (
        _chunk({"tool_calls": [{"index": 0, **call}]}) + _chunk({}, finish) + b"data: [DONE]\n\n"
    )
    events = _events(_run(stream))
    assert events[-2][1]["delta"]["stop_reason"] == stop_reason


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
    BetaErrorResponse.model_validate(out)


def test_response_without_choices_is_an_error() -> None:
    out = orjson.loads(_t(_base()).response(200, b'{"id":"x","choices":[]}'))
    assert out["type"] == "error" and out["error"]["type"] == "api_error"


# --- streams ---------------------------------------------------------------------------


def _chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    **choice: Any,
) -> bytes:
    """One chat stream event; delta None: the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up-model",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


_USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}

_CHAT_STREAM = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "let me "}),
        _chunk({"reasoning_content": "see"}),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get", "arguments": ""},
                    }
                ]
            }
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "now", "arguments": "{}"},
                    }
                ]
            }
        ),
        b": keep-alive comment\r\n\r\n",
        _chunk({}, "tool_calls"),
        _chunk(None, usage=_USAGE),
        b"data: [DONE]\n\n",
    ]
)


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.split(b"\n\n"):
        if not frame:
            continue
        name, data = frame.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        body = orjson.loads(data[6:])
        assert body["type"] == name[7:].decode()
        out.append((body["type"], body))
    return out


def _is_thinking(body: dict[str, Any]) -> bool:
    return body.get("content_block", {}).get("type") == "thinking" or body.get("delta", {}).get(
        "type"
    ) in (
        "thinking_delta",
        "signature_delta",
    )


def _validate(events: list[tuple[str, dict[str, Any]]]) -> None:
    for name, body in events:
        if name == "error":  # the SDK raises on it (no event type): Anthropic's error shape
            BetaErrorResponse.model_validate(body)
        elif not _is_thinking(body):  # anthropic 0.38.0 has no thinking types: checked by shape
            _EVENT.validate_python(body)


def _run(stream: bytes, body: dict[str, Any] | None = None, split: int = 0) -> bytes:
    t = _t(body or _base(stream=True))
    if split:
        out = b"".join(t.feed(stream[i : i + split]) for i in range(0, len(stream), split))
    else:
        out = t.feed(stream)
    return out + t.finish()


def test_stream_full_event_sequence() -> None:
    raw = _run(_CHAT_STREAM)
    events = _events(raw)
    _validate(events)
    assert [body for _, body in events] == [
        {
            "type": "message_start",
            "message": {
                "id": "msg_s1",
                "type": "message",
                "role": "assistant",
                "model": "up-model",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        },
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "let me "},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "see"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": SIGNATURE_PLACEHOLDER},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "call_1", "name": "get", "input": {}},
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
            "type": "content_block_start",
            "index": 3,
            "content_block": {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 3,
            "delta": {"type": "input_json_delta", "partial_json": "{}"},
        },
        {"type": "content_block_stop", "index": 3},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"input_tokens": 12, "output_tokens": 7},
        },
        {"type": "message_stop"},
    ]


@pytest.mark.parametrize("split", [1, 2, 7, 64])
def test_stream_split_anywhere_gives_the_same_bytes(split: int) -> None:
    assert _run(_CHAT_STREAM, split=split) == _run(_CHAT_STREAM)
    crlf = _CHAT_STREAM.replace(b"\n", b"\r\n")
    assert _run(crlf, split=split) == _run(_CHAT_STREAM)


def test_stream_accumulates_with_the_sdk() -> None:
    from anthropic.lib.streaming._messages import accumulate_event

    stream = b"".join(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"content": "A"}),
            _chunk({"content": "B"}, "stop", stop_reason="END"),
            _chunk(None, usage=_USAGE),
            b"data: [DONE]\n\n",
        ]
    )
    snapshot = None
    for _, body in _events(_run(stream, _base(stream=True, stop_sequences=["END"]))):
        snapshot = accumulate_event(event=_EVENT.validate_python(body), current_snapshot=snapshot)
    assert snapshot is not None
    assert snapshot.content[0].type == "text" and snapshot.content[0].text == "AB"
    assert (snapshot.stop_reason, snapshot.stop_sequence, snapshot.usage.output_tokens) == (
        "stop_sequence",
        "END",
        7,
    )


def test_stream_length_without_done_closes_at_finish() -> None:
    t = _t(_base(stream=True))
    out = t.feed(_chunk({"content": "x"}) + _chunk({}, "length"))
    assert b"message_delta" not in out
    events = _events(out + t.finish())
    _validate(events)
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-1][0] == "message_stop"
    assert t.finish() == b"" and t.feed(b"data: [DONE]\n\n") == b""


def test_stream_cut_short_ends_with_an_error_event() -> None:
    t = _t(_base(stream=True))
    out = t.feed(_chunk({"content": "x"}))
    events = _events(out + t.finish())
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {
                "type": "api_error",
                "message": "the worker's stream ended before the answer was complete",
            },
        },
    )
    _validate(events)


def test_stream_upstream_error_event_and_abort() -> None:
    t = _t(_base(stream=True))
    out = t.feed(
        _chunk({"content": "x"})
        + b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
        + _chunk({"content": "y"})
    )
    events = _events(out)
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "boom"}},
    )
    assert t.finish() == b""
    t2 = _t(_base(stream=True))
    assert _events(t2.abort("upstream_timeout", "too slow")) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "too slow"}})
    ]
    _validate(events)


def test_stream_cached_usage_in_message_start() -> None:
    # vLLM's continuous usage stats put usage on the first chunk already.
    first = _chunk(
        {"role": "assistant"},
        usage={
            "prompt_tokens": 9,
            "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 3},
        },
    )
    events = _events(_t(_base(stream=True)).feed(first))
    assert events[0][1]["message"]["usage"] == {
        "input_tokens": 6,
        "output_tokens": 0,
        "cache_read_input_tokens": 3,
    }
    _validate(events)
