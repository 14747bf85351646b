"""The MCP tool loop's pure state (smg.mcp.loop), with exact values: the model's requests,
whole answers and event streams fed split anywhere, the client's items and events."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from smg.mcp.loop import (
    NOT_EXECUTED,
    LoopError,
    ToolLoop,
    add_usage,
    exposed_names,
    history_as_functions,
    mcp_item_id,
    mcp_labels,
)
from smg.mcp.manager import McpTool

ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}
ADD = McpTool("calc", "add", "Add two numbers", ADD_SCHEMA, None)
FAIL = McpTool("calc", "fail", "Always fails", {"type": "object", "properties": {}}, None)


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "input": "what is 2+3?",
        "tools": [{"type": "mcp", "server_label": "calc"}],
        "store": False,
        **extra,
    }


def call_item(n: int, name: str = "add", args: str = '{"a":2,"b":3}') -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{n}",
        "call_id": f"call_{n}",
        "name": name,
        "arguments": args,
        "status": "completed",
    }


def message(text: str, n: int = 9) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{n}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def answer(output: list[dict[str, Any]], tokens: int = 1) -> dict[str, Any]:
    return {
        "id": "resp_model",
        "object": "response",
        "created_at": 5,
        "status": "completed",
        "model": "m",
        "output": output,
        "usage": {
            "input_tokens": tokens,
            "output_tokens": 2 * tokens,
            "total_tokens": 3 * tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def make(b: dict[str, Any], tools: list[McpTool] | None = None) -> ToolLoop:
    return ToolLoop(b, {"calc": tools or [ADD, FAIL]}, response_id="resp_1", created_at=7)


def test_labels() -> None:
    assert mcp_labels({"tools": [{"type": "function", "name": "f"}]}) is None
    assert mcp_labels({}) is None
    tools = [
        {"type": "mcp", "server_label": "a"},
        {"type": "function", "name": "f"},
        {"type": "mcp", "server_label": "b"},
        {"type": "mcp", "server_label": "a"},
    ]
    assert mcp_labels({"tools": tools}) == ["a", "b"]
    with pytest.raises(LoopError) as err:
        mcp_labels({"tools": [{"type": "mcp"}]})
    assert (err.value.status, err.value.message) == (400, "an mcp tool needs a 'server_label'")


def test_names_without_collisions() -> None:
    listed = {
        "one": [McpTool("one", "add", "", {}, None), McpTool("one", "echo", "", {}, None)],
        "two": [McpTool("two", "add", "", {}, None), McpTool("two", "lookup", "", {}, None)],
    }
    names = exposed_names(listed, {"lookup"})  # a client function named lookup
    assert {k: (v[0], v[1].name) for k, v in names.items()} == {
        "mcp_one_add": ("one", "add"),
        "echo": ("one", "echo"),
        "mcp_two_add": ("two", "add"),
        "mcp_two_lookup": ("two", "lookup"),
    }


def test_first_request() -> None:
    b = body(
        tools=[
            {"type": "mcp", "server_label": "calc", "allowed_tools": ["add"]},
            {"type": "function", "name": "weather", "parameters": {}},
        ],
        max_tool_calls=3,
        tool_choice={"type": "mcp", "server_label": "calc", "name": "add"},
        stream=True,
    )
    loop = make(b)
    assert loop.request() == {
        "model": "m",
        "input": [{"type": "message", "role": "user", "content": "what is 2+3?"}],
        "tools": [
            {"type": "function", "name": "weather", "parameters": {}},
            {
                "type": "function",
                "name": "add",
                "description": "Add two numbers",
                "parameters": ADD_SCHEMA,
            },
        ],
        "store": False,
        "stream": True,
        "tool_choice": {"type": "function", "name": "add"},
    }
    assert loop.limit == 3


def test_whole_loop() -> None:
    loop = make(body(previous_response_id="resp_0", max_output_tokens=50))
    first = loop.request()
    assert "previous_response_id" not in first and first["max_output_tokens"] == 50
    loop.take(answer([call_item(1)]))
    assert not loop.finished
    calls = loop.calls()
    assert [(c.item_id, c.server_label, c.tool, c.arguments, c.output_index) for c in calls] == [
        ("mcp_1", "calc", "add", '{"a":2,"b":3}', 1)
    ]
    loop.result(calls[0], "5", None)
    second = loop.request()
    assert second["input"][1:] == [
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a":2,"b":3}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "5"},
    ]
    assert second["tool_choice"] == "auto"
    loop.take(answer([message("5")], tokens=10))
    assert loop.finished and loop.calls() == []
    out = loop.response()
    assert out["id"] == "resp_1" and out["created_at"] == 7 and out["status"] == "completed"
    assert [i["type"] for i in out["output"]] == ["mcp_list_tools", "mcp_call", "message"]
    listed = out["output"][0]
    assert listed["server_label"] == "calc" and listed["error"] is None
    assert [t["name"] for t in listed["tools"]] == ["add", "fail"]
    assert listed["tools"][0]["input_schema"] == ADD_SCHEMA
    assert out["output"][1] == {
        "id": "mcp_1",
        "type": "mcp_call",
        "status": "completed",
        "approval_request_id": None,
        "arguments": '{"a":2,"b":3}',
        "error": None,
        "name": "add",
        "output": "5",
        "server_label": "calc",
    }
    assert out["usage"] == {
        "input_tokens": 11,
        "output_tokens": 22,
        "total_tokens": 33,
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    assert out["tools"] == [{"type": "mcp", "server_label": "calc"}]
    assert "incomplete_details" not in out


def test_failed_tool_and_model_sees_error() -> None:
    loop = make(body())
    loop.request()
    loop.take(answer([call_item(1, "fail", "{}")]))
    (call,) = loop.calls()
    loop.result(call, "", "tool fail failed: boom")
    assert loop.request()["input"][-1] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": '{"error":"tool fail failed: boom"}',
    }
    loop.take(answer([message("sorry")]))
    item = loop.response()["output"][1]
    assert (item["status"], item["error"], item["output"]) == (
        "failed",
        "tool fail failed: boom",
        "",
    )


def test_limit_stops_with_incomplete_details() -> None:
    loop = make(body(max_tool_calls=2))
    for n in range(2):
        loop.request()
        loop.take(answer([call_item(n)]))
        (call,) = loop.calls()
        loop.result(call, "5", None)
    loop.request()
    loop.take(answer([call_item(2)]))
    assert loop.finished
    assert loop.calls() == []  # the third is not run
    out = loop.response()
    assert out["status"] == "completed"
    assert out["incomplete_details"] == {"reason": "max_tool_calls"}
    assert [(i["type"], i.get("status"), i.get("error")) for i in out["output"]] == [
        ("mcp_list_tools", None, None),
        ("mcp_call", "completed", None),
        ("mcp_call", "completed", None),
        ("mcp_call", "failed", NOT_EXECUTED),
    ]
    assert loop.model_calls == 3


def test_default_limit_is_ten() -> None:
    loop = make(body(max_tool_calls=50))
    ran = 0
    while not loop.finished:
        loop.request()
        loop.take(answer([call_item(ran)]))
        for call in loop.calls():
            loop.result(call, "5", None)
            ran += 1
    assert (ran, loop.model_calls) == (10, 11)
    assert loop.response()["incomplete_details"] == {"reason": "max_tool_calls"}


def test_client_function_ends_loop() -> None:
    b = body(tools=[{"type": "mcp", "server_label": "calc"}, {"type": "function", "name": "w"}])
    loop = make(b)
    loop.request()
    loop.take(answer([call_item(1), call_item(2, "w", "{}")]))
    assert loop.finished
    (call,) = loop.calls()  # the MCP call in the same answer still runs
    loop.result(call, "5", None)
    out = loop.response()["output"]
    assert [(i["type"], i.get("name")) for i in out] == [
        ("mcp_list_tools", None),
        ("mcp_call", "add"),
        ("function_call", "w"),
    ]


def test_bad_model_answer() -> None:
    loop = make(body())
    loop.request()
    with pytest.raises(LoopError) as err:
        loop.take({"error": "x"})
    assert err.value.status == 502


def test_history_items_for_the_model() -> None:
    items = [
        {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "calc", "tools": []},
        {"type": "mcp_call", "id": "mcp_1", "name": "add", "arguments": "{}", "output": "5"},
        {"type": "mcp_call", "id": "mcp_2", "name": "fail", "arguments": "{}", "error": "no"},
        {"type": "message", "role": "user", "content": "x"},
    ]
    assert history_as_functions(items) == [
        {"type": "function_call", "call_id": "mcp_1", "name": "add", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "mcp_1", "output": "5"},
        {"type": "function_call", "call_id": "mcp_2", "name": "fail", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "mcp_2", "output": '{"error":"no"}'},
        {"type": "message", "role": "user", "content": "x"},
    ]


def test_small_helpers() -> None:
    assert [mcp_item_id(s) for s in ("fc_a", "call_b", "mcp_c", "d")] == [
        "mcp_a",
        "mcp_b",
        "mcp_c",
        "mcp_d",
    ]
    assert add_usage(None, None) is None
    assert add_usage({"a": 1, "d": {"x": 1}}, {"a": 2, "d": {"x": 3}, "b": 1}) == {
        "a": 3,
        "d": {"x": 4},
        "b": 1,
    }


# --- streams ---------------------------------------------------------------------------------


def frames(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        b"event: %b\ndata: %b\n\n" % (e["type"].encode(), orjson.dumps({**e, "sequence_number": n}))
        for n, e in enumerate(events)
    )


def call_stream(n: int, name: str = "add", args: str = '{"a":2,"b":3}') -> bytes:
    item = call_item(n, name, args)
    opened = {**item, "arguments": "", "status": "in_progress"}
    return frames(
        [
            {"type": "response.created", "response": {"id": "resp_m"}},
            {"type": "response.output_item.added", "output_index": 0, "item": opened},
            {
                "type": "response.function_call_arguments.delta",
                "output_index": 0,
                "item_id": item["id"],
                "delta": args,
            },
            {
                "type": "response.function_call_arguments.done",
                "output_index": 0,
                "item_id": item["id"],
                "arguments": args,
            },
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": answer([item])},
        ]
    )


def text_stream(text: str) -> bytes:
    item = message(text)
    at = {"item_id": "msg_9", "output_index": 0, "content_index": 0}
    return frames(
        [
            {"type": "response.created", "response": {"id": "resp_m"}},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "content": []},
            },
            {"type": "response.output_text.delta", **at, "delta": text},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": answer([item], tokens=10)},
        ]
    )


def parse(data: bytes, done: bool = True) -> list[dict[str, Any]]:
    """The events; with `done`, the stream must end with `data: [DONE]` (as 1.13's)."""
    if done:
        assert data.endswith(b"\n\ndata: [DONE]\n\n")
        data = data[: -len(b"data: [DONE]\n\n")]
    out = []
    for block in data.split(b"\n\n"):
        if block:
            name, payload = block.split(b"\n")
            event = json.loads(payload[len(b"data: ") :])
            assert name == b"event: " + event["type"].encode()
            out.append(event)
    return out


def feed_split(loop: ToolLoop, data: bytes, size: int) -> None:
    for start in range(0, len(data), size):
        loop.feed(data[start : start + size])
    loop.stream_end()


@pytest.mark.parametrize("size", [1, 7, 100000])
def test_stream_loop(size: int) -> None:
    loop = make(body(stream=True), [ADD])
    loop.opening()
    assert loop.request()["stream"] is True
    feed_split(loop, call_stream(1), size)
    (call,) = loop.calls()
    loop.result(call, "5", None)
    loop.request()
    feed_split(loop, text_stream("5"), size)
    assert loop.finished and loop.calls() == []
    loop.closing()
    events = parse(loop.events())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.mcp_list_tools.in_progress", 0),
        ("response.mcp_list_tools.completed", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.mcp_call.in_progress", 1),
        ("response.mcp_call_arguments.delta", 1),
        ("response.mcp_call_arguments.done", 1),
        ("response.mcp_call.completed", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.output_text.delta", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    assert events[0]["response"]["id"] == "resp_1"
    assert events[6]["item"]["type"] == "mcp_call" and events[6]["item"]["id"] == "mcp_1"
    assert events[8]["delta"] == '{"a":2,"b":3}' and events[8]["item_id"] == "mcp_1"
    assert events[11]["item"]["output"] == "5"
    assert events[13]["delta"] == "5"
    final = events[-1]["response"]
    assert final["id"] == "resp_1"
    assert [i["type"] for i in final["output"]] == ["mcp_list_tools", "mcp_call", "message"]
    assert final["usage"]["total_tokens"] == 33


def test_stream_limit_and_failed_call() -> None:
    loop = make(body(stream=True, max_tool_calls=1))
    loop.opening()
    loop.request()
    feed_split(loop, call_stream(1, "fail", "{}"), 13)
    (call,) = loop.calls()
    loop.result(call, "", "boom")
    loop.request()
    feed_split(loop, call_stream(2), 13)
    assert loop.finished and loop.calls() == []
    loop.closing()
    events = parse(loop.events())
    kinds = [e["type"] for e in events]
    assert kinds.count("response.mcp_call.failed") == 2
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_tool_calls"}
    assert [(i["type"], i.get("error")) for i in final["output"]] == [
        ("mcp_list_tools", None),
        ("mcp_call", "boom"),
        ("mcp_call", NOT_EXECUTED),
    ]


def test_stream_item_without_done_event() -> None:
    """A model stream that never sends output_item.done for its message: the item comes
    from its response.completed."""
    loop = make(body(stream=True))
    loop.request()
    item = message("hi")
    feed_split(
        loop,
        frames(
            [
                {"type": "response.output_item.added", "output_index": 0, "item": item},
                {"type": "response.completed", "response": answer([item])},
            ]
        ),
        5,
    )
    assert loop.finished
    assert [i["type"] for i in loop.response()["output"]] == ["mcp_list_tools", "message"]


def test_stream_errors() -> None:
    loop = make(body(stream=True))
    loop.request()
    loop.feed(frames([{"type": "response.created", "response": {}}]))
    with pytest.raises(LoopError) as err:
        loop.stream_end()
    assert err.value.message == "the model's stream ended before it completed"
    loop = make(body(stream=True))
    with pytest.raises(LoopError) as err:
        loop.feed(frames([{"type": "error", "code": "overloaded", "message": "busy"}]))
    assert (err.value.code, err.value.message) == ("overloaded", "busy")
    loop.failed("overloaded", "busy")
    (event,) = parse(loop.events())
    assert event == {
        "type": "error",
        "code": "overloaded",
        "message": "busy",
        "param": None,
        "sequence_number": 0,
    }
