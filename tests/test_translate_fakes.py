"""smg.translate against the fake providers' real bytes (tests/providerfakes.py, servers
on loopback written from the providers' API references): each translated request is
accepted by the other API's server, and its answer, whole and streamed (read in small
pieces), comes back as the client's API, checked with that SDK's types. No gateway: the
data-plane wiring is tested end to end elsewhere."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from anthropic._models import construct_type
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from providerfakes import FakeProvider
from pydantic import TypeAdapter

from smg.providers import ANTHROPIC_VERSION, API_ANTHROPIC, API_OPENAI
from smg.translate import Translation, translation

_EVENT = TypeAdapter(RawMessageStreamEvent)
_WEATHER = {
    "name": "get_weather",
    "description": "weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
_CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather of a city",
        "parameters": _WEATHER["input_schema"],
    },
}


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[FakeProvider]:
    fake = FakeProvider("openai", ["gpt-4o", "gpt-reason"]).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def anthropic_fake() -> Iterator[FakeProvider]:
    fake = FakeProvider("anthropic", ["claude-x"]).start()
    try:
        yield fake
    finally:
        fake.stop()


def _exchange(fake: FakeProvider, t: Translation) -> tuple[int, bytes]:
    """Send the translated request; the client's bytes (a stream read in 7-byte pieces)."""
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(fake.url).port, timeout=10)
    try:
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        conn.request("POST", t.upstream_path.decode(), t.upstream_body, headers)
        answer = conn.getresponse()
        if not (t.stream and answer.status == 200):
            return answer.status, t.response(answer.status, answer.read())
        out = []
        for _ in range(100_000):
            piece = answer.read(7)
            if not piece:
                break
            out.append(t.feed(piece))
        out.append(t.finish())
        return answer.status, b"".join(out)
    finally:
        conn.close()


def _messages(fake: FakeProvider, body: dict[str, Any]) -> tuple[int, Any]:
    t = translation("/v1/messages", {"max_tokens": 64, **body}, API_OPENAI, None)
    assert t is not None
    status, raw = _exchange(fake, t)
    if status != 200:
        return status, orjson.loads(raw)
    if not t.stream:
        return status, orjson.loads(raw)
    snapshot = None
    thinking = []
    for frame in raw.split(b"\n\n")[:-1]:
        body = orjson.loads(frame.split(b"\ndata: ")[1])
        delta = body.get("delta", {})
        if body.get("content_block", {}).get("type") == "thinking" or delta.get("type") in (
            "thinking_delta",
            "signature_delta",
        ):
            # anthropic 0.38.0 has no thinking types: built leniently, as its stream does.
            thinking.append(delta.get("thinking", ""))
            event = construct_type(type_=RawMessageStreamEvent, value=body)
        else:
            event = _EVENT.validate_python(body)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot)
    return status, (snapshot, "".join(thinking))


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_messages_text_and_stream(openai_fake: FakeProvider) -> None:
    status, out = _messages(openai_fake, {"model": "gpt-4o", "messages": _user("hi there")})
    assert status == 200
    message = Message.model_validate(out)
    assert (
        message.content[0].type == "text"
        and message.content[0].text == "Hello from gpt-4o. You said: hi there"
    )
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    _, (snapshot, _) = _messages(
        openai_fake, {"model": "gpt-4o", "messages": _user("hi there"), "stream": True}
    )
    assert snapshot.content[0].text == message.content[0].text
    assert (snapshot.stop_reason, snapshot.usage.output_tokens) == (
        "end_turn",
        message.usage.output_tokens,
    )


def test_messages_tool_round_trip(openai_fake: FakeProvider) -> None:
    body = {"model": "gpt-4o", "messages": _user("weather?"), "tools": [_WEATHER]}
    message = Message.model_validate(_messages(openai_fake, body)[1])
    assert message.stop_reason == "tool_use"
    call = message.content[-1]
    assert (
        call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    )
    _, (snapshot, _) = _messages(openai_fake, {**body, "stream": True})
    assert snapshot.stop_reason == "tool_use"
    streamed_call = snapshot.content[-1]
    assert streamed_call.id.startswith("call_") and streamed_call.input == {"city": "Paris"}
    follow = {
        **body,
        "messages": [
            *body["messages"],
            {"role": "assistant", "content": [c.model_dump() for c in message.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    }
    answer = Message.model_validate(_messages(openai_fake, follow)[1])
    assert answer.content[0].text == "The tool said: sunny" and answer.stop_reason == "end_turn"
    assert openai_fake.seen()[-1]["body"]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call.id,
        "content": "sunny",
    }


def test_messages_thinking_and_max_tokens(openai_fake: FakeProvider) -> None:
    out = _messages(openai_fake, {"model": "gpt-reason", "messages": _user("hi")})[1]
    assert out["content"][0]["type"] == "thinking" and out["content"][0]["thinking"].startswith(
        "Let me think"
    )
    _, (snapshot, thinking) = _messages(
        openai_fake, {"model": "gpt-reason", "messages": _user("hi"), "stream": True}
    )
    assert thinking.strip() == out["content"][0]["thinking"].strip()
    assert snapshot.content[1].text == out["content"][1]["text"]
    short = Message.model_validate(
        _messages(openai_fake, {"model": "gpt-4o", "messages": _user("hi"), "max_tokens": 1})[1]
    )
    assert short.stop_reason == "max_tokens"


def test_messages_upstream_error() -> None:
    with FakeProvider("openai", ["gpt-4o"], key="sk-right") as fake:
        status, out = _messages(fake, {"model": "gpt-4o", "messages": _user("hi")})
    assert status == 401
    assert out == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key"},
    }


def _chat(fake: FakeProvider, body: dict[str, Any]) -> tuple[int, Any]:
    t = translation("/v1/chat/completions", body, API_ANTHROPIC, None)
    assert t is not None
    status, raw = _exchange(fake, t)
    if status != 200 or not t.stream:
        return status, orjson.loads(raw)
    state = ChatCompletionStreamState()
    frames = raw.split(b"\n\n")[:-1]
    assert frames[-1] == b"data: [DONE]"
    for frame in frames[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(orjson.loads(frame[6:])))
    return status, state.get_final_completion()


def test_chat_text_and_stream(anthropic_fake: FakeProvider) -> None:
    body = {
        "model": "claude-x",
        "messages": [{"role": "system", "content": "be brief"}, *_user("hi there")],
    }
    completion = ChatCompletion.model_validate(_chat(anthropic_fake, body)[1])
    text = completion.choices[0].message.content
    assert text is not None and text.startswith("Hello from claude-x.")
    assert completion.choices[0].finish_reason == "stop"
    sent = anthropic_fake.seen()[-1]["body"]
    assert (sent["system"], sent["max_tokens"]) == ("be brief", 4096)
    streamed = _chat(
        anthropic_fake, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )[1]
    assert streamed.choices[0].message.content == text
    assert (
        streamed.usage is not None and streamed.usage.total_tokens == completion.usage.total_tokens
    )


def test_chat_tool_round_trip_and_stops(anthropic_fake: FakeProvider) -> None:
    body = {"model": "claude-x", "messages": _user("weather?"), "tools": [_CHAT_WEATHER]}
    completion = ChatCompletion.model_validate(_chat(anthropic_fake, body)[1])
    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls" and calls is not None
    assert (calls[0].function.name, orjson.loads(calls[0].function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    streamed = _chat(anthropic_fake, {**body, "stream": True})[1]
    streamed_call = streamed.choices[0].message.tool_calls[0]
    assert orjson.loads(streamed_call.function.arguments) == {"city": "Paris"}
    follow = {
        **body,
        "messages": [
            *body["messages"],
            completion.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
        ],
    }
    answer = ChatCompletion.model_validate(_chat(anthropic_fake, follow)[1])
    assert answer.choices[0].message.content == "The tool said: sunny"
    stopped = _chat(
        anthropic_fake, {"model": "claude-x", "messages": _user("hi"), "stop": ["from"]}
    )[1]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == "Hello "
    short = _chat(anthropic_fake, {"model": "claude-x", "messages": _user("hi"), "max_tokens": 1})[
        1
    ]
    assert short["choices"][0]["finish_reason"] == "length"


def test_chat_thinking_and_error(anthropic_fake: FakeProvider) -> None:
    body = {"model": "claude-x", "messages": _user("hi"), "reasoning_effort": "low"}
    out = _chat(anthropic_fake, body)[1]
    assert anthropic_fake.seen()[-1]["body"]["thinking"] == {
        "type": "enabled",
        "budget_tokens": 1024,
    }
    reasoning = out["choices"][0]["message"]["reasoning_content"]
    assert reasoning.startswith("Let me think")
    ChatCompletion.model_validate(out)
    with FakeProvider("anthropic", ["claude-x"], key="sk-ant-right") as fake:
        status, err = _chat(fake, {"model": "claude-x", "messages": _user("hi")})
    assert status == 401
    assert err == {
        "error": {
            "message": "invalid x-api-key",
            "type": "invalid_request_error",
            "code": "authentication_error",
            "param": None,
        }
    }
