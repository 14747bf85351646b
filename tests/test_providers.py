"""smg.providers: provider detection, key attribution and request shaping (pure)."""

from __future__ import annotations

import pytest

from smg import providers


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("openai", "openai"),
        ("OpenAI", "openai"),
        ("grok", "xai"),
        ("claude", "anthropic"),
        ("google", "gemini"),
        ("together", "together"),
    ],
)
def test_parse_provider_folds_rust_aliases(name: str, expected: str) -> None:
    assert providers.parse_provider(name) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.openai.com", "openai"),
        ("https://api.x.ai/v1", "xai"),
        ("https://api.anthropic.com", "anthropic"),
        ("https://generativelanguage.googleapis.com", "gemini"),
        ("api.openai.com", "openai"),
        ("http://127.0.0.1:8000", None),
        ("http://[::1", None),
    ],
)
def test_provider_from_url(url: str, expected: str | None) -> None:
    assert providers.provider_from_url(url) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "openai"),
        ("o1-mini", "openai"),
        ("o3", "openai"),
        ("Claude-3-5-sonnet", "anthropic"),
        ("gemini-2.0-flash", "gemini"),
        ("grok-2", "xai"),
        ("llama-3", None),
    ],
)
def test_provider_from_model(model: str, expected: str | None) -> None:
    assert providers.provider_from_model(model) == expected


def test_worker_provider_prefers_spec_then_model_then_url() -> None:
    assert providers.worker_provider("claude", "gpt-4o", "https://api.openai.com") == "anthropic"
    assert providers.worker_provider(None, "gpt-4o", "https://api.anthropic.com") == "openai"
    assert providers.worker_provider(None, "llama", "https://api.anthropic.com") == "anthropic"
    assert providers.worker_provider(None, None, "http://127.0.0.1:1") is None


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("sk-ant-api03-abc", "anthropic"),
        ("sk-proj-abc", "openai"),
        ("sk-svcacct-abc", "openai"),
        ("xai-abc", "xai"),
        ("AIzaSyabc", "gemini"),
        ("sk-abc", None),
        ("gateway-key", None),
    ],
)
def test_key_provider(key: str, expected: str | None) -> None:
    assert providers.key_provider(key) == expected


def test_api_of_providers() -> None:
    assert providers.provider_api(None) == providers.API_BOTH
    assert providers.provider_api("anthropic") == providers.API_ANTHROPIC
    assert providers.provider_api("openai") == providers.API_OPENAI
    assert providers.provider_api("together") == providers.API_OPENAI
    assert providers.key_header("anthropic") == "x-api-key"
    assert providers.key_header("gemini") == "x-goog-api-key"
    assert providers.key_header("openai") is None and providers.key_header(None) is None


def test_transform_strips_sglang_fields_for_known_providers_only() -> None:
    body = {"model": "gpt-4o", "top_k": 5, "regex": "x", "temperature": 0.1}
    assert providers.transform_request("openai", "/v1/chat/completions", body)
    assert body == {"model": "gpt-4o", "temperature": 0.1}
    custom = {"model": "m", "top_k": 5}
    assert not providers.transform_request("together", "/v1/chat/completions", custom)
    assert not providers.transform_request(None, "/v1/chat/completions", custom)
    assert custom == {"model": "m", "top_k": 5}


def test_gemini_drops_false_logprobs_on_chat_only() -> None:
    body = {"model": "gemini-2", "logprobs": False}
    assert providers.transform_request("gemini", "/v1/chat/completions", body)
    assert body == {"model": "gemini-2"}
    kept = {"model": "gemini-2", "logprobs": True}
    assert not providers.transform_request("gemini", "/v1/chat/completions", kept)
    assert kept["logprobs"] is True


def test_xai_responses_input_items() -> None:
    body = {
        "model": "grok-2",
        "input": [
            {
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hi"}],
            },
            {"role": "user", "content": [{"type": "input_image", "image_url": "u"}]},
        ],
    }
    assert providers.transform_request("xai", "/v1/responses", body)
    assert body["input"][0] == {
        "role": "assistant",
        "content": [{"type": "input_text", "text": "hi"}],
    }
    assert body["input"][1]["content"][0]["type"] == "input_image"
