"""External workers (runtime_type external): a provider's API (OpenAI, Anthropic, xAI,
Gemini, any OpenAI-compatible service) registered as a worker.

The Rust SMG 1.13's external registration workflow (model_gateway/src/workflow/steps/
external/discover_models.rs; facts, not code): the provider is resolved from the spec,
the model name, then the URL's host; models are discovered through `GET {url}/v1/models`
with the key `<PROVIDER>_ADMIN_KEY` > the worker's api_key > none (none: a wildcard worker
that serves any model with the caller's key); ids that differ only by a date suffix
(`-YYYY-MM-DD`, `-YYYY-MM`) are one model card, the shortest id primary, the rest aliases.
smg differs in three ways: a provider nobody names gets the URL's `host[:port]` as a custom
name (so two unknown upstreams never share keys), discovery is retried until
--worker-startup-timeout-secs instead of failing the registration, and external workers'
loads are never scraped (1.13 polls /v1/loads on them).

The first half is pure (tested directly); the second does the HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlencode

import aiohttp
import msgspec
import orjson

from smg import providers
from smg.control import probes
from smg.worker_url import WorkerUrlError, parse_worker_url
from smg.workers_spec import MAX_PROVIDER_BYTES, WorkerSpec, spec_is_external

log = logging.getLogger("smg.control")

ENGINE = "external"  # the record's engine: GET /workers shows it as runtime_type
# Rust DATE_SUFFIX_PATTERN.
DATE_SUFFIX_RE = re.compile(r"-\d{4}-\d{2}(-\d{2})?$")
# IPC ops (external_refresh, external_models) are bounded by this in all.
OP_TIMEOUT_SECS = 5.0
# A provider's model list is paged (Anthropic: has_more + after_id); at most this many pages.
MAX_PAGES = 10
# A refresh of one worker with one key is not repeated within this (a run of misses for a
# model nobody serves must not become a run of /v1/models calls to the provider).
REFRESH_MIN_INTERVAL_SECS = 1.0

# Rust ModelType capability names, in its serialisation order.
_LLM = ("chat", "completions", "responses", "tools")


class ModelCard(NamedTuple):
    id: str
    aliases: tuple[str, ...]


class DiscoveryError(Exception):
    """The provider's model list could not be had (no answer, non-2xx, not a list)."""


# --- pure -----------------------------------------------------------------------------------


def is_external(spec: WorkerSpec) -> bool:
    return spec_is_external(spec.runtime_type, spec.url)


def record_provider(spec: WorkerSpec) -> str:
    """An external worker's provider: the spec's, else its model's, else its URL host's
    (smg.providers.worker_provider), else the URL's `host[:port]`, lowercased: a custom
    provider of its own, so a key meant for one unknown upstream never goes to another."""
    found = providers.worker_provider(spec.provider, spec.model_id, spec.url)
    if found:
        return found
    try:
        host = parse_worker_url(spec.url).host_header
    except WorkerUrlError:
        host = spec.url
    return host.lower()[:MAX_PROVIDER_BYTES]


def startup_spec(spec: WorkerSpec, backend: str) -> WorkerSpec:
    """A `--worker-urls` worker under `--backend openai|anthropic`: external, its provider
    resolved as any external worker's, else the backend's name (the Rust SMG makes its
    OpenAI or Anthropic router for these URLs)."""
    if backend not in (providers.OPENAI, providers.ANTHROPIC) or spec.connection_mode != "http":
        return spec
    provider = spec.provider or providers.worker_provider(None, spec.model_id, spec.url) or backend
    return msgspec.structs.replace(spec, runtime_type=ENGINE, provider=provider)


def discovery_key(provider: str, api_key: str | None, environ: Mapping[str, str]) -> str | None:
    """The key model discovery uses: `<PROVIDER>_ADMIN_KEY` (known providers), else the
    worker's own api_key, else None (a wildcard worker). Never a gateway key."""
    env_name = providers.ADMIN_KEY_ENV.get(provider)
    if env_name:
        value = environ.get(env_name, "")
        if value:
            return value
    return api_key or None


def needs_discovery(spec: WorkerSpec, provider: str, environ: Mapping[str, str]) -> bool:
    """False for a worker registered for one model (that model only) and for a wildcard
    worker (no key to ask with): both are Ready at once."""
    return not spec.model_id and discovery_key(provider, spec.api_key, environ) is not None


def key_headers(provider: str, key: str | None) -> dict[str, str]:
    """The headers a request to `provider` carries its key in (Anthropic: x-api-key with
    anthropic-version; Gemini: x-goog-api-key; others: Authorization Bearer)."""
    return dict(providers.credential_headers(provider, key))


def key_may_go(credential: str, provider: str, external_providers: Iterable[str]) -> bool:
    """Whether a caller's key may be sent to a worker of `provider`: a key whose form names
    its provider only there; an unattributed key only when exactly one external provider
    is registered (the Rust SMG fans out to every one: a deliberate difference)."""
    named = providers.key_provider(credential)
    if named is not None:
        return named == provider
    return set(external_providers) == {provider}


def parse_models_page(body: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """A `/v1/models` answer (OpenAI's list or Anthropic's page): its model objects (each
    with a string id) and the id to continue after when the page says `has_more`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DiscoveryError(f"the model list is not JSON: {exc}") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise DiscoveryError("the model list has no data array")
    models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]
    more = isinstance(doc, dict) and doc.get("has_more") is True
    last = doc.get("last_id") if more else None
    if more and not isinstance(last, str) and models:
        last = models[-1]["id"]
    return models, last if more and isinstance(last, str) else None


def group_models(ids: Iterable[str]) -> list[ModelCard]:
    """Ids grouped by their name without a date suffix (Rust group_models_into_cards): per
    group the shortest id (then the alphabetically first) is the card's id, the rest its
    aliases. Groups come in the order of their first id (Rust's is a HashMap's)."""
    groups: dict[str, list[str]] = {}
    for model in ids:
        variants = groups.setdefault(DATE_SUFFIX_RE.sub("", model), [])
        if model not in variants:
            variants.append(model)
    cards = []
    for variants in groups.values():
        ordered = sorted(variants, key=lambda v: (len(v), v))
        cards.append(ModelCard(ordered[0], tuple(ordered[1:])))
    return cards


def card_provider(model: str) -> str | None:
    """The provider a model card names (Rust infer_provider_from_id)."""
    lower = model.lower()
    if (
        lower.startswith(
            ("gpt", "o1", "o3", "dall-e", "whisper", "tts", "text-embedding", "babbage", "davinci")
        )
        or "omni" in lower
    ):
        return providers.OPENAI
    if lower.startswith("grok"):
        return providers.XAI
    if lower.startswith("claude"):
        return providers.ANTHROPIC
    if lower.startswith("gemini"):
        return providers.GEMINI
    return None


def model_type(model: str) -> list[str]:
    """A model card's capabilities by its id (Rust infer_model_type_from_id), as the names
    Rust serialises ModelType to."""
    lower = model.lower()
    if "embed" in lower or "ada-002" in lower:
        return ["embeddings"]
    if "rerank" in lower:
        return ["rerank"]
    if lower.startswith(("dall-e", "sora")) or ("image" in lower and "vision" not in lower):
        return ["image_gen"]
    if lower.startswith(("tts", "whisper")) or any(
        word in lower for word in ("audio", "realtime", "transcribe")
    ):
        return ["audio"]
    if "moderation" in lower:
        return ["moderation"]
    if "vision" in lower or "4o" in lower:
        return [*_LLM[:3], "vision", "tools"]
    if lower.startswith(("o1", "o3")):
        return [*_LLM, "reasoning"]
    return list(_LLM)


def card_views(models: Iterable[str]) -> list[dict[str, Any]]:
    """An external worker's `models` in GET /workers, as the Rust SMG 1.13 shows them."""
    views = []
    for card in group_models(models):
        view: dict[str, Any] = {"id": card.id}
        if card.aliases:
            view["aliases"] = list(card.aliases)
        view["model_type"] = model_type(card.id)
        provider = card_provider(card.id)
        if provider is not None:
            view["provider"] = provider
        views.append(view)
    return views


def merge_models(old: tuple[str, ...], new: list[str]) -> list[str]:
    """A list found with a caller's key added to the worker's own (that caller may see
    models the worker's key does not; the others stay)."""
    return [*old, *(m for m in new if m not in old)]


def key_digest(key: str | None) -> bytes:
    """What the refresh throttle remembers of a key (never the key itself)."""
    return hashlib.sha256((key or "").encode()).digest()[:16]


# --- I/O ------------------------------------------------------------------------------------


async def fetch_models(
    session: aiohttp.ClientSession, url: str, provider: str, key: str | None, timeout_s: float
) -> list[dict[str, Any]]:
    """`GET {url}/v1/models` with `key` in the provider's header, following pages (at most
    MAX_PAGES); the model objects, or DiscoveryError."""
    headers = key_headers(provider, key)
    models: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(MAX_PAGES):
        target = url.rstrip("/") + "/v1/models"
        if after is not None:
            target += "?" + urlencode({"after_id": after, "limit": 1000})
        answer = await probes.get_with_headers(session, target, headers, timeout_s)
        if answer is None:
            raise DiscoveryError(f"no answer from {target}")
        status, body = answer
        if not 200 <= status < 300:
            raise DiscoveryError(f"{target} answered {status}")
        page, after = parse_models_page(body)
        models.extend(page)
        if after is None:
            break
    return models
