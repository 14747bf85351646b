"""smg.translate.responses_chat, /v1/responses served by a chat pipeline (pure): the request
mapping with exact values; answers and streams (split every 1..7 bytes) with exact events,
validated by the openai SDK's Response and ResponseStreamEvent types; the history observer
(smg.dataplane.responses.Observer) chained after it."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from smg.dataplane.responses import Observer
from smg.translate import TranslateError, responses_over_chat
from smg.translate.responses_chat import Observed, ResponsesOverChat

_EVENT = TypeAdapter(ResponseStreamEvent)


def _t(body: dict[str, Any], model: str | None = None) -> ResponsesOverChat:
    counter = itertools.count(1)
    return ResponsesOverChat(
        body, model, ids=lambda prefix: f"{prefix}{next(counter)}", clock=lambda: 1700000000.5
    )


def _req(body: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    return orjson.loads(_t({"model": "m", **body}, model).upstream_body)


# --- the request ---------------------------------------------------------------------------


def test_request_text_input_and_fields() -> None:
    t = _t(
        {
            "model": "m",
            "input": "hi",
            "instructions": "be brief",
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "u-1",
            "stop": ["END"],
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.3,
            "presence_penalty": 0.4,
            "metadata": {"k": "v"},
            "store": True,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_object"}},
        },
        model="resolved",
    )
    assert t.upstream_path == b"/v1/chat/completions" and t.stream is False
    assert orjson.loads(t.upstream_body) == {
        "model": "resolved",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "max_completion_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u-1",
        "frequency_penalty": 0.3,
        "presence_penalty": 0.4,
        "stop": ["END"],
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "response_format": {"type": "json_object"},
        "reasoning_effort": "low",
    }


def test_request_items_one_assistant_turn_per_turn() -> None:
    items = [
        {"type": "message", "role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x":1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "s"}]},
    ]  # fmt: skip
    assert _req({"input": items})["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "content": "ok",
            "reasoning_content": "think",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": "no"},
    ]


def test_request_mcp_history_items() -> None:
    items = [
        {"role": "user", "content": "add 2 and 3"},
        {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "calc", "tools": []},
        {"type": "mcp_call", "id": "mcp_1", "server_label": "calc", "name": "add", "arguments": '{"a":2,"b":3}', "output": "5", "error": None},
        {"type": "mcp_call", "id": "mcp_2", "server_label": "calc", "name": "fail", "arguments": "{}", "output": None, "error": "boom"},
        {"role": "assistant", "content": "5"},
    ]  # fmt: skip
    assert _req({"input": items})["messages"] == [
        {"role": "user", "content": "add 2 and 3"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "mcp_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "mcp_1", "content": "5"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "mcp_2", "type": "function", "function": {"name": "fail", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "mcp_2", "content": "boom"},
        {"role": "assistant", "content": "5"},
    ]  # fmt: skip


def test_request_two_assistant_messages_stay_two() -> None:
    items = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "one"},
        {"role": "assistant", "content": "two"},
    ]
    assert _req({"input": items})["messages"][1:] == [
        {"role": "assistant", "content": "one"},
        {"role": "assistant", "content": "two"},
    ]


def test_request_tools_choice_format_stream() -> None:
    tool = {
        "type": "function",
        "name": "get",
        "description": "d",
        "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
        "strict": True,
    }
    schema = {"type": "object", "properties": {}}
    req = _req(
        {
            "input": "x",
            "tools": [tool, {"type": "function", "name": "bare"}],
            "tool_choice": {"type": "function", "name": "get"},
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
            "stream": True,
        }
    )  # fmt: skip
    assert req["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get",
                "description": "d",
                "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {"name": "bare", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert req["tool_choice"] == {"type": "function", "function": {"name": "get"}}
    assert req["parallel_tool_calls"] is False
    assert req["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": True},
    }
    assert req["stream"] is True and req["stream_options"] == {"include_usage": True}
    off = _req({"input": "x", "stream": True, "stream_options": {"include_usage": False}})
    assert off["stream_options"] == {"include_usage": False}


def test_request_choice_without_tools_and_text_format_are_dropped() -> None:
    req = _req({"input": "x", "tool_choice": "required", "parallel_tool_calls": True, "text": {"format": {"type": "text"}}})  # fmt: skip
    assert req == {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": 3}, "'input' must be a string or a list of items"),
        ({"input": []}, "'input' needs at least one item"),
        ({"input": [5]}, "input[0] must be an object"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]: input item type 'item_reference' cannot be sent to this model"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0]: 'role' must be user, assistant, system or developer"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0]: content part type 'input_file' cannot be sent to this model"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}, "input[0]: a function_call's 'arguments' must be a string"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]: a function_call_output needs 'call_id'"),
        ({"input": "x", "tools": [{"type": "mcp", "server_label": "s"}]}, "tool type 'mcp' cannot be sent to this model"),
        ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}}, "'tool_choice' must be auto, none, required or a function with a name"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "'text.format.type' must be text, json_object or json_schema"),
        ({"input": "x", "max_output_tokens": 0}, "'max_output_tokens' must be a positive integer"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "'reasoning.effort' must be minimal, low, medium or high"),
        ({"input": "x", "instructions": 5}, "'instructions' must be a string"),
        ({"input": "x", "background": True}, "'background' responses cannot be served for this model"),
    ],
)  # fmt: skip
def test_request_refusals(body: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslateError) as err:
        _req(body)
    assert str(err.value) == message


def test_not_an_object() -> None:
    with pytest.raises(TranslateError):
        responses_over_chat([], None)  # type: ignore[arg-type]


# --- whole answers ---------------------------------------------------------------------------

ECHO = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "safety_identifier": None,
    "temperature": None,
    "top_p": None,
    "user": None,
    "truncation": "disabled",
    "tool_choice": "auto",
    "service_tier": "default",
    "parallel_tool_calls": True,
    "store": True,
    "tools": [],
    "metadata": {},
    "reasoning": {"effort": None, "summary": None},
    "text": {"format": {"type": "text"}},
}
USAGE_CHAT = {
    "prompt_tokens": 10,
    "completion_tokens": 6,
    "total_tokens": 16,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
    "output_tokens": 6,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 16,
}


def _chat(message: dict[str, Any], finish: str = "stop") -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 5,
            "model": "served",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": USAGE_CHAT,
        }
    )


def test_answer_reasoning_message_calls() -> None:
    t = _t({"model": "m", "input": "x"})
    message = {
        "role": "assistant",
        "content": "Hi",
        "reasoning_content": "hmm",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    answer = orjson.loads(t.response(200, _chat(message, "tool_calls")))
    assert answer == {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "completed_at": 1700000000,
        "status": "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "model": "served",
        "output": [
            {
                "id": "rs_2",
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "hmm"}],
                "status": "completed",
            },
            {
                "id": "msg_3",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
            },
            {
                "id": "fc_4",
                "type": "function_call",
                "status": "completed",
                "arguments": "{}",
                "call_id": "call_a",
                "name": "f",
            },
        ],
        **ECHO,
        "usage": USAGE,
    }
    Response.model_validate(answer)


def test_answer_length_is_incomplete_and_echo() -> None:
    body = {
        "model": "m",
        "input": "x",
        "instructions": "i",
        "max_output_tokens": 2,
        "temperature": 0.5,
        "tools": [{"type": "function", "name": "f"}],
        "tool_choice": "none",
        "store": False,
        "metadata": {"a": "b"},
        "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "json_object"}},
    }
    answer = orjson.loads(_t(body).response(200, _chat({"content": "ab"}, "length")))
    assert answer["status"] == "incomplete"
    assert answer["incomplete_details"] == {"reason": "max_output_tokens"}
    assert {k: answer[k] for k in ECHO} == {
        **ECHO,
        "instructions": "i",
        "max_output_tokens": 2,
        "temperature": 0.5,
        "tools": [{"type": "function", "name": "f"}],
        "tool_choice": "none",
        "store": False,
        "metadata": {"a": "b"},
        "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "json_object"}},
    }
    Response.model_validate(answer)


def test_answer_refusal_and_errors_pass() -> None:
    t = _t({"model": "m", "input": "x"})
    answer = orjson.loads(t.response(200, _chat({"content": None, "refusal": "no"})))
    assert answer["output"][0]["content"] == [{"type": "refusal", "refusal": "no"}]
    error = b'{"error":{"message":"bad","type":"invalid_request_error","code":"x"}}'
    assert t.response(400, error) == error
    failed = orjson.loads(t.response(200, b'{"choices":[]}'))
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"


# --- streams ---------------------------------------------------------------------------------


def _sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "model": "served",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


STREAM = _sse(
    [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "th"}),
        _chunk({"reasoning_content": "ink"}),
        _chunk({"content": "\n\n"}),  # whitespace between reasoning and a call: no item
        _chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
        _chunk({}, "tool_calls"),
        {"id": "chatcmpl-1", "model": "served", "choices": [], "usage": USAGE_CHAT},
    ]
)  # fmt: skip


def _events(data: bytes) -> list[dict[str, Any]]:
    events = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        name, payload = block.split("\n")
        event = orjson.loads(payload.removeprefix("data: "))
        assert name == "event: " + event["type"]
        _EVENT.validate_python(event)
        events.append(event)
    return events


def _split(t: Any, data: bytes, size: int) -> bytes:
    out = b"".join(t.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + t.finish()


@pytest.mark.parametrize("size", range(1, 8))
def test_stream_reasoning_then_call_split_anywhere(size: int) -> None:
    events = _events(_split(_t({"model": "m", "input": "x", "stream": True}), STREAM, size))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    brief = [
        (e["type"], e.get("delta") or e.get("text") or e.get("arguments") or "")
        for e in events
        if e["type"] not in ("response.created", "response.in_progress")
    ]
    assert brief == [
        ("response.output_item.added", ""),
        ("response.content_part.added", ""),
        ("response.reasoning_text.delta", "th"),
        ("response.reasoning_text.delta", "ink"),
        ("response.reasoning_text.done", "think"),
        ("response.content_part.done", ""),
        ("response.output_item.done", ""),
        ("response.output_item.added", ""),
        ("response.function_call_arguments.delta", '{"a"'),
        ("response.function_call_arguments.delta", ":1}"),
        ("response.function_call_arguments.done", '{"a":1}'),
        ("response.output_item.done", ""),
        ("response.completed", ""),
    ]
    created = events[0]["response"]
    assert (created["id"], created["status"], created["output"], created["model"]) == (
        "resp_1",
        "in_progress",
        [],
        "served",
    )
    assert created["completed_at"] is None
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"] == USAGE
    assert final["completed_at"] == 1700000000
    assert final["output"] == [
        {
            "id": "rs_2",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "think"}],
            "status": "completed",
        },
        {
            "id": "fc_3",
            "type": "function_call",
            "status": "completed",
            "arguments": '{"a":1}',
            "call_id": "c1",
            "name": "f",
        },
    ]


def test_stream_text_exact_events() -> None:
    data = _sse([_chunk({"content": "Hel"}), _chunk({"content": "lo"}, "length")])
    t = _t({"model": "m", "input": "x", "stream": True})
    events = _events(t.feed(data) + t.finish())
    where = {"item_id": "msg_2", "output_index": 0, "content_index": 0}
    assert events[2:] == [
        {
            "type": "response.output_item.added",
            "sequence_number": 2,
            "output_index": 0,
            "item": {
                "id": "msg_2",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            },
        },
        {
            "type": "response.content_part.added",
            "sequence_number": 3,
            **where,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
        {
            "type": "response.output_text.delta",
            "sequence_number": 4,
            **where,
            "delta": "Hel",
            "logprobs": [],
        },
        {
            "type": "response.output_text.delta",
            "sequence_number": 5,
            **where,
            "delta": "lo",
            "logprobs": [],
        },
        {
            "type": "response.output_text.done",
            "sequence_number": 6,
            **where,
            "text": "Hello",
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "sequence_number": 7,
            **where,
            "part": {"type": "output_text", "text": "Hello", "annotations": []},
        },
        {
            "type": "response.output_item.done",
            "sequence_number": 8,
            "output_index": 0,
            "item": {
                "id": "msg_2",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
            },
        },
        {
            "type": "response.completed",
            "sequence_number": 9,
            "response": {
                **t.response_object(
                    "incomplete", [events[8]["item"]], None, {"reason": "max_output_tokens"}
                ),
            },
        },
    ]


def test_stream_cut_short_and_error_chunk_fail() -> None:
    t = _t({"model": "m", "input": "x", "stream": True})
    first = t.feed(b"data: " + orjson.dumps(_chunk({"content": "a"})) + b"\n\n")
    events = _events(first + t.finish())
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_stream_ended"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["output"] == []  # the message never ended
    assert failed["error"] == {
        "code": "server_error",
        "message": "the stream ended before the answer was complete",
    }
    t = _t({"model": "m", "input": "x", "stream": True})
    error = b'data: {"error":{"message":"boom","type":"stream_error","code":"internal_error"}}\n\n'
    events = _events(t.feed(error))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert (events[2]["code"], events[2]["message"]) == ("stream_error", "boom")
    assert t.feed(b"data: [DONE]\n\n") == b"" and t.finish() == b""
    assert t.abort("x", "y") == b""


def test_abort_mid_stream() -> None:
    t = _t({"model": "m", "input": "x", "stream": True})
    t.feed(b"data: " + orjson.dumps(_chunk({"content": "a"})) + b"\n\n")
    events = _events(t.abort("upstream_timeout", "late"))
    assert [e["type"] for e in events] == ["error", "response.failed"]
    assert events[0]["sequence_number"] == 5


# --- with the history observer ---------------------------------------------------------------


def _observed(stream: bool, stored: list[dict[str, Any]], write: Any) -> Observed:
    def done(answer: dict[str, Any]) -> Any:
        stored.append(answer)
        return write

    observer = Observer(b"{}", stream, done, "resp_prev", "conv_1", True)
    return Observed(_t({"model": "m", "input": "x", "stream": stream, "store": False}), observer)


def test_observed_whole_answer_puts_history_fields_back() -> None:
    stored: list[dict[str, Any]] = []
    write = object()
    t = _observed(False, stored, write)
    answer = orjson.loads(t.response(200, _chat({"content": "Hi"})))
    assert answer["previous_response_id"] == "resp_prev" and answer["store"] is True
    assert answer["conversation"] == {"id": "conv_1"}
    assert [s["id"] for s in stored] == ["resp_1"]
    assert t.settle() is write


def test_observed_stream_withholds_completed_until_finish() -> None:
    stored: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    try:
        write = loop.create_future()
        t = _observed(True, stored, write)
        body = _sse([_chunk({"content": "Hi"}, "stop")])
        sent = b"".join(t.feed(body[i : i + 3]) for i in range(0, len(body), 3))
        assert b"response.output_item.done" in sent and b"response.completed" not in sent
        assert stored == []  # the write starts at finish(): the stream ended whole
        last = t.finish()
        assert [e["type"] for e in _events(last)] == ["response.completed"]
        final = _events(last)[0]["response"]
        assert (final["previous_response_id"], final["store"], final["conversation"]) == (
            "resp_prev",
            True,
            {"id": "conv_1"},
        )
        assert [s["id"] for s in stored] == ["resp_1"] and t.settle() is write
    finally:
        loop.close()


def test_observed_abort_stores_nothing() -> None:
    stored: list[dict[str, Any]] = []
    t = _observed(True, stored, None)
    t.feed(_sse([_chunk({"content": "Hi"}, "stop")]))  # response.completed withheld
    events = _events(t.abort("upstream_timeout", "late"))
    assert [e["type"] for e in events] == []  # the inner answer had ended: nothing more
    assert t.finish() == b"" and stored == []
