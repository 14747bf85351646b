"""smg.translate never fails but with TranslateError, whatever a client sends or a worker
answers: valid requests, answers and stream events with random parts replaced by random
JSON values (seeded, bounded count), through every entry point."""

from __future__ import annotations

import random
from typing import Any

import orjson

from smg.providers import API_ANTHROPIC, API_OPENAI
from smg.translate import TranslateError, translation

_JUNK: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    "",
    "x",
    "data:,",
    [],
    [None],
    {},
    {"type": "text"},
    [{"type": 1}],
]

_MESSAGES_REQ = {
    "model": "m",
    "max_tokens": 8,
    "stream": True,
    "system": [{"type": "text", "text": "s"}],
    "stop_sequences": ["E"],
    "metadata": {"user_id": "u"},
    "thinking": {"type": "enabled", "budget_tokens": 2000},
    "tools": [{"name": "t", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "tool", "name": "t", "disable_parallel_tool_use": True},
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "AA"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "h", "signature": "s"},
                {"type": "tool_use", "id": "i", "name": "t", "input": {"k": 1}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "i",
                    "content": [{"type": "text", "text": "r"}],
                }
            ],
        },
    ],
}
_CHAT_REQ = {
    "model": "m",
    "max_tokens": 8,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["E"],
    "user": "u",
    "reasoning_effort": "low",
    "parallel_tool_calls": False,
    "tools": [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "t"}},
    "messages": [
        {"role": "system", "content": "s"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "i", "type": "function", "function": {"name": "t", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "i", "content": "r"},
    ],
}
_CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "model": "m",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "stop_reason": "E",
            "message": {
                "role": "assistant",
                "content": "x",
                "reasoning_content": "r",
                "refusal": None,
                "tool_calls": [{"id": "c", "function": {"name": "t", "arguments": "{}"}}],
            },
        }
    ],
    "usage": {
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 1},
    },
}
_CHAT_CHUNKS = [
    {
        "id": "c",
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a", "reasoning": "r"}}],
        "usage": {"prompt_tokens": 1},
    },
    {
        "id": "c",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 0, "id": "x", "function": {"name": "t", "arguments": "{"}}
                    ]
                },
            }
        ],
    },
    {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"error": {"message": "m"}},
]
_MESSAGES_ANSWER = {
    "id": "msg_1",
    "model": "m",
    "stop_reason": "tool_use",
    "content": [
        {"type": "text", "text": "x"},
        {"type": "thinking", "thinking": "t"},
        {"type": "tool_use", "id": "i", "name": "t", "input": {}},
    ],
    "usage": {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": 1},
}
_MESSAGES_EVENTS = [
    {
        "type": "message_start",
        "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 1}},
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "i", "name": "t"},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": "{}"},
    },
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": "a"}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "b"}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "thinking_delta", "thinking": "b"},
    },
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
    {"type": "error", "error": {"type": "api_error", "message": "m"}},
    {"type": "message_stop"},
]


def _mutate(value: Any, rng: random.Random) -> Any:
    """A copy of value with about one in four of its parts replaced by junk."""
    if rng.random() < 0.25:
        return rng.choice(_JUNK)
    if isinstance(value, dict):
        return {k: _mutate(v, rng) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutate(v, rng) for v in value]
    return value


def _exercise(
    client_path: str,
    worker_api: str,
    request: dict[str, Any],
    answer: Any,
    events: list[Any],
    sse: bytes,
    rng: random.Random,
) -> None:
    body = _mutate(request, rng)
    try:
        t = translation(client_path, body if isinstance(body, dict) else {}, worker_api, None)
    except TranslateError:
        t = None
    if t is None:
        t = translation(client_path, request, worker_api, None)
    assert t is not None
    orjson.loads(t.upstream_body)
    for status in (200, 400, 500):
        assert t.response(status, orjson.dumps(_mutate(answer, rng)))
    assert t.response(200, b"not json")
    frames = b"".join(sse % orjson.dumps(_mutate(e, rng)) for e in events)
    cut = rng.randrange(len(frames) + 1)
    out = t.feed(frames[:cut]) + t.feed(frames[cut:]) + t.feed(b"data: {bad\n\n") + t.finish()
    assert isinstance(out, bytes)


def test_fuzz_messages_over_chat() -> None:
    rng = random.Random(14)
    for _ in range(400):
        _exercise(
            "/v1/messages",
            API_OPENAI,
            _MESSAGES_REQ,
            _CHAT_ANSWER,
            _CHAT_CHUNKS,
            b"data: %b\n\n",
            rng,
        )


def test_fuzz_chat_over_messages() -> None:
    rng = random.Random(41)
    for _ in range(400):
        _exercise(
            "/v1/chat/completions",
            API_ANTHROPIC,
            _CHAT_REQ,
            _MESSAGES_ANSWER,
            _MESSAGES_EVENTS,
            b"event: x\ndata: %b\n\n",
            rng,
        )


def test_non_object_body_is_a_translate_error() -> None:
    for path, api in (("/v1/messages", API_OPENAI), ("/v1/chat/completions", API_ANTHROPIC)):
        try:
            translation(path, [], api, None)  # type: ignore[arg-type]
        except TranslateError:
            continue
        raise AssertionError(path)


def test_untranslatable_2xx_answers_begin_with_an_error_shape() -> None:
    """The data plane tells a 2xx it could not translate by the body's first bytes (then it
    answers 502): error bodies begin so, answers never do."""
    messages = translation("/v1/messages", _MESSAGES_REQ, API_OPENAI, None)
    chat = translation("/v1/chat/completions", _CHAT_REQ, API_ANTHROPIC, None)
    assert messages is not None and chat is not None
    for bad in (b"", b"[]", b'{"choices":[]}', b'{"content":3}'):
        assert messages.response(200, bad).startswith(b'{"type":"error"')
        assert chat.response(200, bad).startswith(b'{"error":')
    assert messages.response(200, orjson.dumps(_CHAT_ANSWER)).startswith(b'{"id":')
    assert chat.response(200, orjson.dumps(_MESSAGES_ANSWER)).startswith(b'{"id":')
