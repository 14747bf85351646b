"""The fake providers speak their APIs well enough for the official SDKs: every answer
parses with the SDK's own types, and what reached the fake is recorded."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest
from providerfakes import FakeProvider, anthropic_client

WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[FakeProvider]:
    with FakeProvider("openai", ["gpt-4o", "gpt-4o-2024-08-06"], key="sk-proj-fake") as fake:
        yield fake


@pytest.fixture(scope="module")
def anthropic_fake() -> Iterator[FakeProvider]:
    with FakeProvider("anthropic", ["claude-3-5-haiku"], key="sk-ant-fake") as fake:
        yield fake


def test_openai_fake_with_the_openai_sdk(openai_fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=openai_fake.url + "/v1", api_key="sk-proj-fake", max_retries=0)
    assert [m.id for m in client.models.list()] == ["gpt-4o", "gpt-4o-2024-08-06"]
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi there"}]
    )
    assert answer.choices[0].message.content == "Hello from gpt-4o. You said: hi there"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.prompt_tokens == 2
    called = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL_OPENAI],  # type: ignore[list-item]
    )
    call = called.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert called.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from gpt-4o. You said: hi"
    assert chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason == "stop"
    headers = openai_fake.seen()[-1]["headers"]
    assert headers["authorization"] == "Bearer sk-proj-fake"


def test_openai_fake_refuses_a_wrong_key(openai_fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=openai_fake.url + "/v1", api_key="sk-proj-other", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_anthropic_fake_with_the_anthropic_sdk(anthropic_fake: FakeProvider) -> None:
    client = anthropic_client(anthropic_fake.url, "sk-ant-fake")
    message = client.messages.create(
        model="claude-3-5-haiku", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "Hello from claude-3-5-haiku. You said: hi"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.usage.input_tokens == 1
    tool = client.messages.create(
        model="claude-3-5-haiku",
        max_tokens=64,
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "weather?"}],
    )
    use = tool.content[-1]
    assert use.type == "tool_use" and use.input == {"city": "Paris"}  # type: ignore[union-attr]
    assert tool.stop_reason == "tool_use"
    result = client.messages.create(
        model="claude-3-5-haiku",
        max_tokens=64,
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],  # type: ignore[union-attr]
            },
        ],
    )
    assert result.content[0].text == "The tool said: sunny"  # type: ignore[union-attr]
    with client.messages.stream(
        model="claude-3-5-haiku",
        max_tokens=64,
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens > 1
    headers = anthropic_fake.seen()[-1]["headers"]
    assert headers["x-api-key"] == "sk-ant-fake" and "authorization" not in headers


def test_anthropic_fake_stop_reasons_and_errors(anthropic_fake: FakeProvider) -> None:
    client = anthropic_client(anthropic_fake.url, "sk-ant-fake")
    short = client.messages.create(
        model="claude-3-5-haiku", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
    )
    assert short.stop_reason == "max_tokens" and short.content[0].text == "Hello"  # type: ignore[union-attr]
    stopped = client.messages.create(
        model="claude-3-5-haiku",
        max_tokens=50,
        stop_sequences=["You"],
        messages=[{"role": "user", "content": "hi"}],
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "You")
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.post("/v1/chat/completions", body={}, cast_to=object)
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_fake_fails_with_429_first(tmp_path: object) -> None:
    with FakeProvider("openai", ["gpt-4o"], fail_429=1) as fake:
        client = openai.OpenAI(base_url=fake.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.response.headers["retry-after"] == "1"
        ok = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
        assert ok.choices[0].message.content == "Hello from gpt-4o. You said: x"
        fake.set_models(["gpt-5"])
        assert [m.id for m in client.models.list()] == ["gpt-5"]
