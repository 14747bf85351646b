"""Anthropic Messages on a gRPC model, end to end: `smg launch` in front of the gRPC mock
(`smg mock-worker --grpc`) serving a Qwen3 model (its real chat template; the qwen tool
parser and the qwen3 reasoning parser by name), driven with the official anthropic SDK
(max_retries=0) and httpx. smg renders the prompt and parses the output itself: the
request is translated to chat (smg.translate), served by the gRPC chat path, and the answer
(whole, streamed, or an error) translated back. /v1/messages/count_tokens is the rendered
prompt's length, the very ids the engine gets for the same request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from grpcmockutil import GrpcMock, served_gateway
from providerfakes import anthropic_client, sse_events

from tests.gatewayutil import Gateway

MODEL = "Qwen/Qwen3-8B"  # qwen tool parser, qwen3 reasoning parser (1.13's name patterns)
TEMPLATE = "Qwen-Qwen3-0.6B.jinja"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
CALL_REPLY = (
    "<think>The user wants weather.</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    "</tool_call>"
)
ASK = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
# Qwen3's template thinks unless told not to; Anthropic's `thinking` is that switch here.
OFF = {"thinking": {"type": "disabled"}}
ON = {"thinking": {"type": "enabled", "budget_tokens": 1024}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, GrpcMock]]:
    with served_gateway(
        tmp_path_factory.mktemp("qwen3"),
        model=MODEL,
        template=TEMPLATE,
        gateway_args=[],
        ready=lambda gw: _post(gw, "/v1/messages", _ask(max_tokens=20)).status_code == 200,
        what="the gRPC model served on /v1/messages",
    ) as served:
        yield served


def _ask(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2000, "messages": ASK, **OFF, **fields}


def _post(gw: Gateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=30.0)


def _client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic_client(gw.url, "unused")


def _engine_prompt(mock: GrpcMock) -> list[int]:
    sent = mock.stats()["last_generate_request"]
    return [int(x) for x in sent["tokenized"]["input_ids"]]


def test_text_answer_with_usage(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("Hello there.")
    message = _client(gw).messages.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}], extra_body=OFF
    )
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello there.")]
    assert message.role == "assistant" and message.type == "message"
    assert message.model == MODEL
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == len(_engine_prompt(mock))
    assert message.usage.output_tokens == 4  # "Hello", " there", ".", EOS


def test_max_tokens_and_stop_sequence(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("one two three four five six")
    client = _client(gw)
    cut = client.messages.create(model=MODEL, max_tokens=2, messages=ASK, extra_body=OFF)
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 2
    stopped = client.messages.create(
        model=MODEL, max_tokens=50, messages=ASK, stop_sequences=["four"], extra_body=OFF
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "four"
    assert stopped.content[0].text == "one two three "


def test_stream_events_in_anthropics_order(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("Hello there.")
    with _client(gw).messages.stream(
        model=MODEL, max_tokens=100, messages=ASK, extra_body=OFF
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    assert kinds[-2] == "message_delta"
    assert [(b.type, b.text) for b in final.content] == [("text", "Hello there.")]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4
    # The input tokens arrive with message_start (the prompt is known before the first token).
    answer = _post(gw, "/v1/messages", _ask(stream=True))
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.text)
    assert events[0][1]["message"]["usage"]["input_tokens"] == len(_engine_prompt(mock))


def test_tool_use_and_thinking_parsed_by_smg(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply(CALL_REPLY)
    # anthropic==0.38.0 has no thinking type: the whole answer is checked by shape.
    whole = _post(gw, "/v1/messages", _ask(tools=[WEATHER], **ON)).json()
    kinds = [block["type"] for block in whole["content"]]
    assert kinds == ["thinking", "text", "tool_use"], whole
    assert whole["content"][0]["thinking"] == "The user wants weather."
    assert whole["content"][1]["text"].strip() == "Let me check."
    call = whole["content"][2]
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris", "days": 2})
    assert call["id"]
    assert whole["stop_reason"] == "tool_use"
    # Streamed: the same blocks, the call's input as input_json_delta pieces.
    events = sse_events(_post(gw, "/v1/messages", _ask(tools=[WEATHER], stream=True, **ON)).text)
    starts = [
        data["content_block"]["type"] for name, data in events if name == "content_block_start"
    ]
    assert starts == ["thinking", "text", "tool_use"]
    pieces = "".join(
        data["delta"]["partial_json"]
        for name, data in events
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
    )
    assert json.loads(pieces) == {"city": "Paris", "days": 2}
    (delta,) = [data for name, data in events if name == "message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use"


def test_tool_result_round_trip_reaches_the_template(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("It is sunny in Paris.")
    tool_id = "toolu_01"
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "sunny, 21 C"}],
        },
    ]
    message = _client(gw).messages.create(
        model=MODEL,
        max_tokens=100,
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        extra_body=OFF,
    )
    assert message.content[0].text == "It is sunny in Paris."
    assert message.stop_reason == "end_turn"
    # The engine's prompt is Qwen3's rendering of the call and its result.
    prompt = mock.stats()["last_generate_request"]["tokenized"]["original_text"]
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert '"name": "get_weather"' in prompt


def test_count_tokens_is_the_engines_prompt(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("Hello there.")
    system = "You are terse."
    asked = {"model": MODEL, "messages": ASK, "system": system, "tools": [WEATHER], **OFF}
    counted = _post(gw, "/v1/messages/count_tokens", asked)
    assert counted.status_code == 200, counted.text
    _client(gw).messages.create(
        model=MODEL,
        max_tokens=100,
        messages=ASK,  # type: ignore[arg-type]
        system=system,
        tools=[WEATHER],  # type: ignore[list-item]
        extra_body=OFF,
    )
    assert counted.json() == {"input_tokens": len(_engine_prompt(mock))}
    # Errors on count_tokens take Anthropic's shape too.
    bad = _post(gw, "/v1/messages/count_tokens", {"model": MODEL, "messages": "nope"})
    assert bad.status_code == 400
    assert bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_errors_in_anthropics_shape(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    client = _client(gw)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            max_tokens="many",  # type: ignore[arg-type]
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    # An engine failure after the first token ends the stream with Anthropic's error event.
    mock.reply("one two three four five six")
    mock.config(fail_next=1, fail_code="INTERNAL", fail_after_tokens=3)
    with (
        pytest.raises(anthropic.APIStatusError) as broken,
        client.messages.stream(model=MODEL, max_tokens=100, messages=ASK, extra_body=OFF) as stream,
    ):
        for _event in stream:
            pass
    assert broken.value.body["type"] == "error"  # type: ignore[index]
    assert broken.value.body["error"]["message"] == "mock failure"  # type: ignore[index]
    # The gateway keeps serving.
    assert client.messages.create(
        model=MODEL, max_tokens=10, messages=ASK, extra_body=OFF
    ).stop_reason
