"""External workers end to end: `smg launch` in front of fake providers (tests/providerfakes.py)
registered through POST /workers as runtime_type external. What each upstream received is
read back from the fakes: whose key, in which header, which body.

- keys: the caller's own key goes only to the provider it belongs to; a key that names
  another provider gets 400 and reaches nobody; the gateway's keys (--api-key, a tenant
  key) never reach a provider, the worker's own key does;
- SGLang-only fields are stripped for known providers, kept for a custom one;
- /v1/models: the union of the directory's models, plus the caller's providers' lists
  (BYOK fan-out); a routing miss refreshes the providers' lists once;
- a provider's 429 is retried, and its retry-after reaches the client once retries are out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import mockutil
import openai
import pytest
from gatewayutil import Gateway, wait_until
from providerfakes import FakeProvider, anthropic_client

pytestmark = pytest.mark.timeout(120)

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
HELLO = [{"role": "user", "content": "hello"}]
KEY_HEADERS = ("authorization", "x-api-key")


@dataclass
class Fleet:
    gw: Gateway
    openai_fake: FakeProvider  # provider openai, model gpt-4o, worker key sk-proj-worker
    anthropic_fake: FakeProvider  # provider anthropic, model claude-sonnet-4
    custom_fake: FakeProvider  # provider "acme" (OpenAI API), model llama-x, worker key acme-key
    ratey_fake: FakeProvider  # provider "ratey": the first 3 POSTs answer 429

    def fakes(self) -> list[FakeProvider]:
        return [self.openai_fake, self.anthropic_fake, self.custom_fake, self.ratey_fake]

    def clear(self) -> None:
        for fake in self.fakes():
            fake.clear()


def register(gw: Gateway, fake: FakeProvider, provider: str, models: int, **spec: Any) -> None:
    """POST /workers for `fake` as an external worker, then wait until every data-plane
    process lists its `models` discovered model ids."""
    headers = spec.pop("admin_headers", None)
    body = {"url": fake.url, "runtime_type": "external", "provider": provider, **spec}
    answer = gw.admin("POST", "/workers", json=body, headers=headers)
    assert answer.status_code == 202, answer.text

    def listed() -> bool:
        workers = gw.admin("GET", "/workers", headers=headers).json()["workers"]
        mine = [w for w in workers if w["url"] == fake.url]
        return bool(mine) and mine[0]["status"] == "ready" and len(mine[0]["models"]) == models

    wait_until(listed, 20, f"{provider} worker ready with {models} model(s)")


def key_headers(seen: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r["headers"].items() if k in KEY_HEADERS} for r in seen]


def posts(fake: FakeProvider) -> list[dict[str, Any]]:
    return [r for r in fake.seen() if r["method"] == "POST"]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with (
        FakeProvider("openai", ["gpt-4o"]) as openai_fake,
        FakeProvider("anthropic", ["claude-sonnet-4"]) as anthropic_fake,
        FakeProvider("openai", ["llama-x"]) as custom_fake,
        FakeProvider("openai", ["rate-model"], fail_429=3) as ratey_fake,
    ):
        # round_robin: two workers serving one model would each get every other request.
        gw = Gateway(
            [
                "--policy",
                "round_robin",
                "--retry-max-retries",
                "2",
                "--retry-initial-backoff-ms",
                "10",
            ]
        )
        gw.start()
        try:
            register(gw, openai_fake, "openai", 1, api_key="sk-proj-worker")
            register(gw, anthropic_fake, "anthropic", 1, api_key="sk-ant-worker")
            register(gw, custom_fake, "acme", 1, api_key="acme-key")
            register(gw, ratey_fake, "ratey", 1, model_id="rate-model")
            yield Fleet(gw, openai_fake, anthropic_fake, custom_fake, ratey_fake)
        finally:
            gw.stop()
            gw.close_log()


def test_two_providers_keys_each_upstream_saw_only_its_own(fleet: Fleet) -> None:
    fleet.clear()
    oa = openai.OpenAI(base_url=fleet.gw.url + "/v1", api_key="sk-proj-caller", max_retries=0)
    chat = oa.chat.completions.create(model="gpt-4o", messages=HELLO)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == "Hello from gpt-4o. You said: hello"
    an = anthropic_client(fleet.gw.url, "sk-ant-caller")
    message = an.messages.create(model="claude-sonnet-4", max_tokens=32, messages=HELLO)
    assert message.content[0].text == "Hello from claude-sonnet-4. You said: hello"

    assert key_headers(fleet.openai_fake.seen()) == [{"authorization": "Bearer sk-proj-caller"}]
    seen = fleet.anthropic_fake.seen()
    assert key_headers(seen) == [{"x-api-key": "sk-ant-caller"}]
    assert seen[0]["headers"]["anthropic-version"] == "2023-06-01"
    assert fleet.custom_fake.seen() == [] and fleet.ratey_fake.seen() == []


def test_anthropic_key_as_bearer_goes_as_x_api_key(fleet: Fleet) -> None:
    fleet.clear()
    answer = httpx.post(
        fleet.gw.url + MESSAGES,
        json={"model": "claude-sonnet-4", "max_tokens": 8, "messages": HELLO},
        headers={"authorization": "Bearer sk-ant-bearer", "anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    seen = fleet.anthropic_fake.seen()
    assert key_headers(seen) == [{"x-api-key": "sk-ant-bearer"}]
    assert seen[0]["headers"]["anthropic-version"] == "2023-06-01"  # the caller's, once


def test_unattributed_key_reaches_only_the_routed_worker(fleet: Fleet) -> None:
    fleet.clear()
    for model, fake in (("gpt-4o", fleet.openai_fake), ("llama-x", fleet.custom_fake)):
        answer = httpx.post(
            fleet.gw.url + CHAT,
            json={"model": model, "messages": HELLO},
            headers={"authorization": "Bearer plain-key-123"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert key_headers(posts(fake)) == [{"authorization": "Bearer plain-key-123"}]
    assert fleet.anthropic_fake.seen() == [] and fleet.ratey_fake.seen() == []


def test_mismatched_key_is_400_and_reaches_nobody(fleet: Fleet) -> None:
    fleet.clear()
    chat = httpx.post(
        fleet.gw.url + CHAT,
        json={"model": "gpt-4o", "messages": HELLO},
        headers={"authorization": "Bearer sk-ant-caller"},
        timeout=10,
    )
    assert chat.status_code == 400
    error = chat.json()["error"]
    assert error["code"] == "provider_key_mismatch" and "anthropic" in error["message"]
    messages = httpx.post(
        fleet.gw.url + MESSAGES,
        json={"model": "claude-sonnet-4", "max_tokens": 8, "messages": HELLO},
        headers={"x-api-key": "sk-proj-caller"},
        timeout=10,
    )
    assert messages.status_code == 400
    body = messages.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "provider openai" in body["error"]["message"]
    assert all(fake.seen() == [] for fake in fleet.fakes())


def test_without_a_caller_key_the_workers_key_goes(fleet: Fleet) -> None:
    fleet.clear()
    answer = httpx.post(
        fleet.gw.url + CHAT, json={"model": "gpt-4o", "messages": HELLO}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    assert key_headers(posts(fleet.openai_fake)) == [{"authorization": "Bearer sk-proj-worker"}]
    answer = httpx.post(
        fleet.gw.url + CHAT, json={"model": "llama-x", "messages": HELLO}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    assert key_headers(posts(fleet.custom_fake)) == [{"authorization": "Bearer acme-key"}]


def test_sglang_fields_are_stripped_for_known_providers(fleet: Fleet) -> None:
    fleet.clear()
    extras = {"top_k": 5, "regex": "a+", "separate_reasoning": True, "temperature": 0.5}
    for model in ("gpt-4o", "llama-x"):
        answer = httpx.post(
            fleet.gw.url + CHAT,
            json={"model": model, "messages": HELLO, **extras},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
    assert posts(fleet.openai_fake)[0]["body"] == {
        "model": "gpt-4o",
        "messages": HELLO,
        "temperature": 0.5,
    }
    # A custom provider takes the body as it came (the Rust SMG's default provider).
    assert posts(fleet.custom_fake)[0]["body"] == {
        "model": "llama-x",
        "messages": HELLO,
        **extras,
    }


def test_models_union_and_byok_fanout(fleet: Fleet) -> None:
    listed = httpx.get(fleet.gw.url + "/v1/models", timeout=10).json()["data"]
    owners = {m["id"]: m["owned_by"] for m in listed}
    assert owners == {
        "gpt-4o": "openai",
        "claude-sonnet-4": "anthropic",
        "llama-x": "acme",
        "rate-model": "ratey",
    }
    fleet.clear()
    fleet.openai_fake.set_models(["gpt-4o", "gpt-4o-mini"])
    try:
        fanned = httpx.get(
            fleet.gw.url + "/v1/models",
            headers={"authorization": "Bearer sk-proj-caller"},
            timeout=10,
        ).json()["data"]
    finally:
        fleet.openai_fake.set_models(["gpt-4o"])
    ids = [m["id"] for m in fanned]
    assert sorted(ids) == ["claude-sonnet-4", "gpt-4o", "gpt-4o-mini", "llama-x", "rate-model"]
    assert key_headers(fleet.openai_fake.seen()) == [{"authorization": "Bearer sk-proj-caller"}]
    assert fleet.openai_fake.seen()[0]["path"] == "/v1/models"
    # An OpenAI key is never shown to the other providers, not even to list models.
    assert fleet.anthropic_fake.seen() == [] and fleet.custom_fake.seen() == []
    assert fleet.ratey_fake.seen() == []


def test_refresh_on_a_miss_finds_a_model_listed_after_registration(fleet: Fleet) -> None:
    fleet.clear()
    fleet.anthropic_fake.set_models(["claude-sonnet-4", "claude-opus-9"])
    time.sleep(1.1)  # the control plane does not refresh one worker twice within 1 s
    answer = httpx.post(
        fleet.gw.url + MESSAGES,
        json={"model": "claude-opus-9", "max_tokens": 8, "messages": HELLO},
        headers={"anthropic-version": "2023-06-01"},
        timeout=15,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "claude-opus-9"
    seen = fleet.anthropic_fake.seen()
    assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/models"), ("POST", MESSAGES)]
    assert key_headers(seen) == [{"x-api-key": "sk-ant-worker"}] * 2
    # Still unknown after the refresh: 404, once.
    missing = httpx.post(
        fleet.gw.url + CHAT, json={"model": "gpt-nothing", "messages": HELLO}, timeout=15
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert posts(fleet.openai_fake) == [] and posts(fleet.custom_fake) == []


def test_provider_429_is_retried_and_its_retry_after_reaches_the_client(fleet: Fleet) -> None:
    fleet.clear()
    body = {"model": "rate-model", "messages": HELLO}
    # --retry-max-retries 2: two attempts, both 429 (the fake fails its first 3 POSTs).
    first = httpx.post(fleet.gw.url + CHAT, json=body, timeout=15)
    assert first.status_code == 429
    assert first.headers["retry-after"] == "1"
    assert first.json()["error"]["message"] == "Rate limit reached"  # the provider's answer
    assert len(posts(fleet.ratey_fake)) == 2
    # The third POST fails, the retry succeeds.
    second = httpx.post(fleet.gw.url + CHAT, json=body, timeout=15)
    assert second.status_code == 200, second.text
    assert len(posts(fleet.ratey_fake)) == 4


def test_gateway_keys_never_reach_a_provider() -> None:
    admin = {"authorization": "Bearer gw-admin-key"}
    with (
        FakeProvider("openai", ["gpt-4o"]) as openai_fake,
        FakeProvider("anthropic", ["claude-sonnet-4"]) as anthropic_fake,
    ):
        gw = Gateway(["--api-key", "gw-admin-key", "--tenant-api-key", "t1:gw-tenant-key"])
        gw.start()
        try:
            register(gw, openai_fake, "openai", 1, api_key="sk-proj-worker", admin_headers=admin)
            register(gw, anthropic_fake, "anthropic", 0, admin_headers=admin)  # no key: wildcard
            for gateway_key in ("gw-admin-key", "gw-tenant-key"):
                auth = {"authorization": f"Bearer {gateway_key}"}
                chat = httpx.post(
                    gw.url + CHAT, json={"model": "gpt-4o", "messages": HELLO}, headers=auth
                )
                assert chat.status_code == 200, chat.text
                messages = httpx.post(
                    gw.url + MESSAGES,
                    json={"model": "claude-sonnet-4", "max_tokens": 8, "messages": HELLO},
                    headers={**auth, "anthropic-version": "2023-06-01"},
                )
                assert messages.status_code == 200, messages.text
                # A wildcard worker without a key of its own gets no credential at all.
                assert key_headers(posts(anthropic_fake))[-1] == {}
                listed = httpx.get(gw.url + "/v1/models", headers=auth).json()["data"]
                assert [m["id"] for m in listed] == ["gpt-4o"]  # no fan-out for gateway keys
            assert (
                key_headers(posts(openai_fake)) == [{"authorization": "Bearer sk-proj-worker"}] * 2
            )
            everything = str([openai_fake.seen(), anthropic_fake.seen()])
            # Authenticated with the gateway key, the caller brings its own as x-api-key.
            openai_fake.clear()
            byok = httpx.post(
                gw.url + CHAT,
                json={"model": "gpt-4o", "messages": HELLO},
                headers={**admin, "x-api-key": "sk-proj-mine"},
            )
            assert byok.status_code == 200, byok.text
            assert key_headers(openai_fake.seen()) == [{"authorization": "Bearer sk-proj-mine"}]
            everything += str([openai_fake.seen(), anthropic_fake.seen()])
        finally:
            gw.stop()
            gw.close_log()
    assert "gw-admin-key" not in everything and "gw-tenant-key" not in everything


def models_of(fleet: Fleet, fake: FakeProvider) -> int:
    workers = fleet.gw.admin("GET", "/workers").json()["workers"]
    return sum(len(w["models"]) for w in workers if w["url"] == fake.url)


def refresh_all(fleet: Fleet) -> None:
    """A miss (a model nobody lists) makes the gateway re-discover every provider's list."""
    time.sleep(1.1)  # the control plane does not refresh one worker twice within 1 s
    missing = httpx.post(
        fleet.gw.url + CHAT, json={"model": "nobody-serves-this", "messages": HELLO}, timeout=15
    )
    assert missing.status_code == 404, missing.text


def test_a_model_two_providers_serve_goes_to_the_one_its_name_names(fleet: Fleet) -> None:
    fleet.custom_fake.set_models(["llama-x", "gpt-4o"])
    try:
        refresh_all(fleet)
        wait_until(lambda: models_of(fleet, fleet.custom_fake) == 2, 10, "acme listing gpt-4o")
        fleet.clear()
        for _ in range(6):
            answer = httpx.post(
                fleet.gw.url + CHAT, json={"model": "gpt-4o", "messages": HELLO}, timeout=10
            )
            assert answer.status_code == 200, answer.text
        assert len(posts(fleet.openai_fake)) == 6 and posts(fleet.custom_fake) == []
    finally:
        fleet.custom_fake.set_models(["llama-x"])
        refresh_all(fleet)


def test_gemini_takes_its_key_as_x_goog_api_key() -> None:
    """Gemini's key goes in its own header (as the Rust SMG's apply_provider_headers
    sends it), the worker's for discovery and the caller's on requests; a caller's
    x-goog-api-key is a credential, never relayed to a self-hosted worker as a header."""
    with (
        FakeProvider("openai", ["gemini-2.0-flash"]) as gemini_fake,
        mockutil.start_mock_workers(1, "--model", "local-model") as local,
    ):
        gw = Gateway(["--worker-urls", local.urls[0]])
        gw.start()
        try:
            register(gw, gemini_fake, "gemini", 1, api_key="AIza-worker")
            discovery = [r for r in gemini_fake.seen() if r["path"] == "/v1/models"]
            assert discovery and discovery[-1]["headers"].get("x-goog-api-key") == "AIza-worker"
            assert "authorization" not in discovery[-1]["headers"]
            gemini_fake.clear()
            for headers, expected in (
                ({"x-goog-api-key": "AIza-caller"}, "AIza-caller"),
                ({}, "AIza-worker"),
            ):
                answer = httpx.post(
                    gw.url + CHAT,
                    json={"model": "gemini-2.0-flash", "messages": HELLO},
                    headers=headers,
                    timeout=10,
                )
                assert answer.status_code == 200, answer.text
                sent = posts(gemini_fake)[-1]["headers"]
                assert sent.get("x-goog-api-key") == expected and "authorization" not in sent
            wait_until(lambda: gw.client().get("/readiness").status_code == 200, 20, "ready")
            answer = httpx.post(
                gw.url + CHAT,
                json={"model": "local-model", "messages": HELLO},
                headers={"x-goog-api-key": "AIza-caller"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            last = mockutil.stats(local.urls[0])["last_request_by_route"][CHAT]["header_map"]
            assert "x-goog-api-key" not in last
        finally:
            gw.stop()
            gw.close_log()
