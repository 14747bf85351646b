"""External providers: which provider a worker, a model name or a key belongs to, and how
a request is shaped for it. Pure code, no I/O.

The facts follow the Rust SMG 1.13 (`ProviderType` in crates/protocols/src/worker.rs, the
providers of routers/openai/provider/): names and aliases, detection from the URL's host
and from the model name, the SGLang-only request fields stripped before a request leaves
for a provider, Anthropic's `x-api-key` header. smg adds one rule of its own: a caller's
key whose form names its provider (`key_provider`) is never sent to another provider.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

OPENAI = "openai"
XAI = "xai"
ANTHROPIC = "anthropic"
GEMINI = "gemini"
KNOWN_PROVIDERS: tuple[str, ...] = (OPENAI, XAI, ANTHROPIC, GEMINI)
# Rust's serde aliases of ProviderType; any other name is a custom provider (kept as given).
_ALIASES = {
    "openai": OPENAI,
    "xai": XAI,
    "grok": XAI,
    "anthropic": ANTHROPIC,
    "claude": ANTHROPIC,
    "gemini": GEMINI,
    "google": GEMINI,
}

# The API a worker speaks to the gateway: the OpenAI family (chat, completions,
# responses, embeddings), Anthropic Messages, or both (self-hosted engines: SGLang and
# vLLM serve both, so a request is passed through as it came).
API_OPENAI = "openai"
API_ANTHROPIC = "anthropic"
API_BOTH = "both"

# Per-provider admin keys for model discovery (Rust `admin_key_env_var`).
ADMIN_KEY_ENV = {
    OPENAI: "OPENAI_ADMIN_KEY",
    XAI: "XAI_ADMIN_KEY",
    ANTHROPIC: "ANTHROPIC_ADMIN_KEY",
    GEMINI: "GEMINI_ADMIN_KEY",
}

# Request fields only SGLang understands (Rust SGLANG_FIELDS): a provider answers 400 to
# unknown fields, so they are removed before a request is sent to one.
SGLANG_FIELDS: tuple[str, ...] = (
    "request_id",
    "priority",
    "top_k",
    "min_p",
    "min_tokens",
    "regex",
    "ebnf",
    "json_schema",
    "stop_token_ids",
    "no_stop_trim",
    "ignore_eos",
    "continue_final_message",
    "skip_special_tokens",
    "lora_path",
    "session_params",
    "separate_reasoning",
    "stream_reasoning",
    "chat_template",
    "chat_template_kwargs",
    "return_hidden_states",
    "repetition_penalty",
    "sampling_seed",
    "backend_url",
)

# Anthropic's API version header: sent when the caller named none (the API refuses a
# request without it).
ANTHROPIC_VERSION = "2023-06-01"

# Key forms that name their provider unambiguously. A bare `sk-` is used by many
# OpenAI-compatible services, so it names none.
_KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("sk-ant-", ANTHROPIC),
    ("sk-proj-", OPENAI),
    ("sk-svcacct-", OPENAI),
    ("sk-admin-", OPENAI),
    ("xai-", XAI),
    ("AIza", GEMINI),
)


def parse_provider(name: str) -> str:
    """A provider name as a spec gives it: a known one (aliases folded, any case), else the
    custom name as given (Rust `ProviderType::Custom`)."""
    return _ALIASES.get(name.strip().lower(), name.strip())


def provider_from_url(url: str) -> str | None:
    """The provider a URL's host belongs to (Rust `ProviderType::from_url`), else None."""
    try:
        host = (urlsplit(url if "://" in url else "https://" + url).hostname or "").lower()
    except ValueError:
        return None
    if host.endswith("openai.com"):
        return OPENAI
    if host.endswith("x.ai"):
        return XAI
    if host.endswith("anthropic.com"):
        return ANTHROPIC
    if host.endswith("googleapis.com"):
        return GEMINI
    return None


def provider_from_model(model: str) -> str | None:
    """The provider a model name suggests (Rust `ProviderType::from_model_name`)."""
    lower = model.lower()
    if lower.startswith("grok"):
        return XAI
    if lower.startswith("gemini"):
        return GEMINI
    if lower.startswith("claude"):
        return ANTHROPIC
    if lower.startswith(("gpt", "o1", "o3")):
        return OPENAI
    return None


def worker_provider(spec_provider: str | None, model_id: str | None, url: str) -> str | None:
    """An external worker's provider: the spec's, else its model's, else its URL host's."""
    if spec_provider:
        return parse_provider(spec_provider)
    if model_id:
        found = provider_from_model(model_id)
        if found is not None:
            return found
    return provider_from_url(url)


def key_provider(key: str) -> str | None:
    """The provider a caller's key names by its form, or None when it names none."""
    for prefix, provider in _KEY_PREFIXES:
        if key.startswith(prefix):
            return provider
    return None


# The header a provider takes its key in, where it is not `Authorization: Bearer` (the
# Rust SMG's apply_provider_headers: Anthropic's `x-api-key`, Gemini's `x-goog-api-key`).
_KEY_HEADERS = {ANTHROPIC: "x-api-key", GEMINI: "x-goog-api-key"}
# Every header a caller may present a provider key in, besides Authorization.
CALLER_KEY_HEADERS: tuple[str, ...] = ("x-api-key", "x-goog-api-key")


def key_header(provider: str | None) -> str | None:
    """The header `provider` takes its key in; None: `Authorization: Bearer`."""
    return _KEY_HEADERS.get(provider or "")


def credential_headers(
    provider: str | None, key: str | None, *, send_version: bool = True
) -> list[tuple[str, str]]:
    """The headers a request to `provider` carries `key` in: `x-api-key` for Anthropic
    (with `anthropic-version`, sent with or without a key since the API refuses a request
    without it, unless `send_version` is False because the caller sent its own),
    `x-goog-api-key` for Gemini, `Authorization: Bearer` otherwise; none without a key."""
    headers: list[tuple[str, str]] = []
    header = key_header(provider)
    if key:
        headers.append((header, key) if header is not None else ("Authorization", f"Bearer {key}"))
    if provider == ANTHROPIC and send_version:
        headers.append(("anthropic-version", ANTHROPIC_VERSION))
    return headers


def provider_api(provider: str | None) -> str:
    """The API an external worker of `provider` speaks (None: a self-hosted engine)."""
    if provider is None:
        return API_BOTH
    return API_ANTHROPIC if provider == ANTHROPIC else API_OPENAI


def transform_request(provider: str | None, endpoint: str, body: dict[str, Any]) -> bool:
    """Shape a request body for `provider` in place (Rust `Provider::transform_request`);
    True when anything changed. None (a self-hosted engine) and custom providers take the
    body as it came, as the Rust SMG's default provider does."""
    if provider not in KNOWN_PROVIDERS:
        return False
    changed = False
    for field in SGLANG_FIELDS:
        if field in body:
            del body[field]
            changed = True
    if provider == GEMINI and endpoint == "/v1/chat/completions" and body.get("logprobs") is False:
        del body["logprobs"]
        changed = True
    if provider == XAI and endpoint == "/v1/responses":
        changed = _xai_responses_input(body) or changed
    return changed


def _xai_responses_input(body: dict[str, Any]) -> bool:
    """xAI takes replayed Responses items without `id`/`status`, and `output_text` parts as
    `input_text` (Rust XAIProvider::transform_responses_input)."""
    items = body.get("input")
    if not isinstance(items, list):
        return False
    changed = False
    for item in items:
        if not isinstance(item, dict):
            continue
        for field in ("id", "status"):
            if field in item:
                del item[field]
                changed = True
        content = item.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "output_text":
                part["type"] = "input_text"
                changed = True
    return changed
