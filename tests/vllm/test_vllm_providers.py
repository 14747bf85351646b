"""External providers and Anthropic Messages with a real engine (issue 14).

vLLM's HTTP server is a real implementation of both OpenAI chat and Anthropic
`/v1/messages`, so it stands in for a provider on loopback:
- self-hosted, smg passes `/v1/messages` through (the anthropic SDK against smg equals the
  SDK against vLLM);
- registered as an external OpenAI provider, smg translates `/v1/messages` to chat;
- registered as an external Anthropic provider, smg translates chat to `/v1/messages`;
- in IGW mode one gateway serves a model on HTTP mock workers, one on the gRPC mock and
  vLLM as an external provider at once.
At temperature 0 the translated answers equal vLLM's own answers to the same request in
its own API: text, stop reason and token counts. This environment has a current anthropic
SDK (the main one pins 0.38.0), so thinking blocks are parsed by the SDK's own types here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gatewayutil import Gateway, wait_until
from grpcmockutil import llama3_dir, start_grpc_mock
from mockutil import start_mock_workers
from mockutil import stats as mock_stats
from providerfakes import FakeProvider
from vllmutil import MODEL_NAME, Engine

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 12
QUESTION = "Name three colours."
GATEWAY_READY_S = 180.0


def oai(base_url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def anth(base_url: str, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def vllm_chat(engine: Engine, **extra: Any) -> Any:
    return oai(engine.url).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        **extra,
    )


def messages_create(client: anthropic.Anthropic, **extra: Any) -> Any:
    return client.messages.create(
        model=MODEL_NAME,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": QUESTION}],
        # This SDK takes no `temperature` argument any more; the API still does.
        extra_body={"temperature": 0},
        **extra,
    )


@pytest.fixture
def igw() -> Iterator[Gateway]:
    """A gateway in IGW mode with no worker yet: each test registers what it needs."""
    gw = Gateway(["--enable-igw"], processes=2)
    gw.start(timeout=60)
    try:
        yield gw
    finally:
        gw.stop()
        gw.close_log()


def add_worker(gw: Gateway, spec: dict[str, Any], model: str) -> None:
    answer = gw.admin("POST", "/workers", json=spec)
    assert answer.status_code == 202, answer.text

    def serves() -> bool:
        workers = gw.admin("GET", "/workers").json()["workers"]
        healthy = {w["url"] for w in workers if w.get("is_healthy")}
        listed = gw.client().get("/v1/models").json()["data"]
        return spec["url"] in healthy and model in [m["id"] for m in listed]

    wait_until(serves, GATEWAY_READY_S, f"{spec['url']} serving {model}")


def test_messages_pass_through_to_a_self_hosted_engine(vllm_http: Engine) -> None:
    """vLLM as a self-hosted worker: /v1/messages is relayed; the anthropic SDK gets what
    vLLM itself answers."""
    gw = Gateway(["--worker-urls", vllm_http.url], processes=2)
    gw.start(timeout=60)
    try:
        gw.wait_ready(timeout=GATEWAY_READY_S)
        direct = messages_create(anth(vllm_http.url))
        through = messages_create(anth(gw.url))
        assert through.content[0].text == direct.content[0].text
        assert (through.stop_reason, through.usage.output_tokens) == ("max_tokens", MAX_TOKENS)
        assert through.usage.input_tokens == direct.usage.input_tokens
        with anth(gw.url).messages.stream(
            model=MODEL_NAME,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"temperature": 0},
        ) as stream:
            streamed = stream.get_final_message()
        assert streamed.content[0].text == direct.content[0].text
        counted = anth(gw.url).messages.count_tokens(
            model=MODEL_NAME, messages=[{"role": "user", "content": QUESTION}]
        )
        assert counted.input_tokens == direct.usage.input_tokens
    finally:
        gw.stop()
        gw.close_log()


def test_anthropic_sdk_through_translation_to_an_openai_provider(
    igw: Gateway, vllm_http: Engine
) -> None:
    """vLLM registered as an external OpenAI provider: /v1/messages becomes chat upstream;
    the answer is vLLM's chat answer in Anthropic's shape."""
    add_worker(
        igw,
        {"url": vllm_http.url, "runtime_type": "external", "provider": "openai", "api_key": "k1"},
        MODEL_NAME,
    )
    reference = vllm_chat(vllm_http)
    message = messages_create(anth(igw.url))
    assert message.content[0].text == reference.choices[0].message.content
    assert message.stop_reason == "max_tokens"
    assert message.usage.input_tokens == reference.usage.prompt_tokens
    assert message.usage.output_tokens == reference.usage.completion_tokens == MAX_TOKENS
    with anth(igw.url).messages.stream(
        model=MODEL_NAME,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"temperature": 0},
    ) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert streamed.content[0].text == reference.choices[0].message.content
    assert streamed.stop_reason == "max_tokens"


def test_openai_sdk_through_translation_to_an_anthropic_provider(
    igw: Gateway, vllm_http: Engine
) -> None:
    """vLLM registered as an external Anthropic provider: chat becomes /v1/messages
    upstream; the answer is vLLM's Messages answer in OpenAI's shape."""
    add_worker(
        igw,
        {
            "url": vllm_http.url,
            "runtime_type": "external",
            "provider": "anthropic",
            "api_key": "k2",
        },
        MODEL_NAME,
    )
    reference = messages_create(anth(vllm_http.url))
    answer = oai(igw.url).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert answer.choices[0].message.content == reference.content[0].text
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == reference.usage.input_tokens
    assert answer.usage.completion_tokens == reference.usage.output_tokens
    stream = oai(igw.url).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.content[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reference.usage.output_tokens


def _vllm_requests(engine: Engine) -> float:
    text = httpx.get(engine.url + "/metrics", timeout=10).text
    found = re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return sum(float(value) for value in found)


def test_igw_serves_three_kinds_at_once(igw: Gateway, vllm_http: Engine, tmp_path: Path) -> None:
    """One gateway: a model on HTTP mock workers, a model on the gRPC mock, and vLLM as an
    external provider; /v1/models lists all three and each request reaches its own."""
    with (
        start_mock_workers(1, "--model", "mock-http") as http_mock,
        start_grpc_mock(llama3_dir(tmp_path / "llama3"), model="mock-grpc") as grpc_mock,
    ):
        add_worker(igw, {"url": http_mock.urls[0]}, "mock-http")
        add_worker(igw, {"url": grpc_mock.url}, "mock-grpc")
        add_worker(
            igw,
            {
                "url": vllm_http.url,
                "runtime_type": "external",
                "provider": "openai",
                "api_key": "k3",
            },
            MODEL_NAME,
        )
        listed = sorted(m.id for m in oai(igw.url).models.list())
        assert listed == sorted(["mock-http", "mock-grpc", MODEL_NAME])
        client = oai(igw.url)
        before_http = mock_stats(http_mock.urls[0])["total_requests"]
        before_grpc = grpc_mock.stats()["requests"].get("Generate", 0)
        before_vllm = _vllm_requests(vllm_http)
        for model in ("mock-http", "mock-grpc", MODEL_NAME):
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert answer.model == model
        assert mock_stats(http_mock.urls[0])["total_requests"] == before_http + 1
        assert grpc_mock.stats()["requests"].get("Generate", 0) == before_grpc + 1
        wait_until(lambda: _vllm_requests(vllm_http) == before_vllm + 1, 10, "vLLM counted it")


def test_thinking_blocks_parse_with_a_current_anthropic_sdk(igw: Gateway) -> None:
    """An OpenAI-compatible provider's `reasoning_content` becomes Anthropic thinking
    blocks, which this SDK (not the main env's 0.38.0) parses as its own types."""
    with FakeProvider("openai", ["reason-model"], key="sk-proj-think") as fake:
        add_worker(
            igw,
            {
                "url": fake.url,
                "runtime_type": "external",
                "provider": "openai",
                "api_key": "sk-proj-think",
            },
            "reason-model",
        )
        # The caller's key goes to the provider (BYOK): the provider's own key, then.
        client = anth(igw.url, key="sk-proj-think")
        message = client.messages.create(
            model="reason-model",
            max_tokens=64,
            thinking={"type": "enabled", "budget_tokens": 32},
            messages=[{"role": "user", "content": "hi"}],
        )
        assert isinstance(message.content[0], anthropic.types.ThinkingBlock)
        assert message.content[0].thinking.strip() == "Let me think about it."
        assert isinstance(message.content[1], anthropic.types.TextBlock)
        with client.messages.stream(
            model="reason-model",
            max_tokens=64,
            thinking={"type": "enabled", "budget_tokens": 32},
            messages=[{"role": "user", "content": "hi"}],
        ) as stream:
            final = stream.get_final_message()
        # The stream accumulator gives its own subclasses (ParsedTextBlock).
        assert isinstance(final.content[0], anthropic.types.ThinkingBlock)
        assert isinstance(final.content[1], anthropic.types.TextBlock)
        assert len(final.content) == 2
        assert final.content[1].text == message.content[1].text
