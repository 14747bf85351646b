"""IGW mode (`--enable-igw`): one gateway, started with no worker, serving many models at
once, each through the kind of worker that serves it (HTTP mock workers, the gRPC mock,
an external OpenAI-API provider), all added at run time through POST /workers.

What IGW changes, as the Rust SMG 1.13's router_manager (checked against its binary):
`/generate` must name a model (400 `missing_model`), readiness needs any Ready worker, and
the flag is no longer inert. Per-model policies and per-worker breakers are the same code
as without IGW; the end-to-end test checks the policies stay per model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mockutil
import openai
import pytest
from gatewayutil import Gateway, secret, wait_until
from grpcmockutil import llama3_dir, start_grpc_mock
from providerfakes import FakeProvider

from smg.config import GatewayConfig
from smg.dataplane.app import MISSING_MODEL_MESSAGE, generate_lacks_model
from smg.launch import inert_settings

pytestmark = pytest.mark.timeout(120)

CHAT = "/v1/chat/completions"
HTTP_MODEL = "http-model"
HASHED_MODEL = "hashed-model"
GRPC_MODEL = "grpc-model"
EXTERNAL_MODEL = "gpt-4o-mini"


# --- pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "lacks"),
    [
        (b'{"text":"hi"}', True),
        (b'{"text":"hi","model":""}', True),
        (b'{"text":"hi","model":"  \\t"}', True),
        (b'{"text":"hi","model":"unknown"}', True),
        (b'{"text":"hi","model":null}', True),
        (b'{"text":"hi","model":"Unknown"}', False),  # Rust compares exactly: 404 there
        (b'{"text":"hi","model":"m"}', False),
        (b'{"text":"hi","model":" m "}', False),
        (b'{"text":"hi","model":5}', False),  # the proxy path's "'model' must be a string"
        (b"not json", False),  # the proxy path's invalid_json
        (b"[1]", False),
        (b"", False),
    ],
)
def test_generate_lacks_model(body: bytes, lacks: bool) -> None:
    assert generate_lacks_model(body) is lacks


def test_enable_igw_is_no_longer_inert() -> None:
    assert inert_settings(GatewayConfig(enable_igw=True)) == []


# --- end to end ------------------------------------------------------------------------------


def _post(client: httpx.Client, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(path, json=body, headers=headers)


def _chat(model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    if model is not None:
        body["model"] = model
    return body


def _by_model(urls: list[str]) -> dict[str, dict[str, int]]:
    return {url: mockutil.stats(url)["requests_by_model"] for url in urls}


def _chats(urls: list[str]) -> dict[str, int]:
    return {url: mockutil.stats(url)["requests_by_route"].get(CHAT, 0) for url in urls}


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {url: after[url] - before[url] for url in after if after[url] != before[url]}


def _healthy(gw: Gateway) -> set[str]:
    listing = gw.admin("GET", "/workers").json()["workers"]
    return {w["url"] for w in listing if w.get("is_healthy")}


def _add(gw: Gateway, spec: dict[str, Any]) -> None:
    added = gw.admin("POST", "/workers", json=spec)
    assert added.status_code == 202, added.text


@contextlib.contextmanager
def _igw_gateway() -> Iterator[Gateway]:
    gw = Gateway(["--enable-igw", "--policy", "round_robin"], processes=2)
    gw.start(timeout=60.0)
    try:
        yield gw
    finally:
        gw.stop()
        gw.close_log()


def test_e2e_igw_one_gateway_http_grpc_and_external_models(tmp_path: Path) -> None:
    # No provider-naming prefix (sk-, sk-ant-): the fake is a custom provider (host:port).
    provider_key = secret("igw-provider-key-0123456789")
    with (
        mockutil.start_mock_workers(2, "--model", HTTP_MODEL) as http_mocks,
        mockutil.start_mock_workers(2, "--model", HASHED_MODEL) as hashed_mocks,
        start_grpc_mock(llama3_dir(tmp_path / "llama3"), model=GRPC_MODEL) as grpc_mock,
        FakeProvider("openai", [EXTERNAL_MODEL], key=provider_key) as fake,
        _igw_gateway() as gw,
        gw.client() as client,
    ):
        # No worker yet: it started, is not ready, and /generate without a model is refused
        # before any routing (as 1.13: 400 missing_model, even with no worker at all).
        assert client.get("/readiness").status_code == 503
        refused = _post(client, "/generate", {"text": "hi"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "missing_model"
        assert refused.json()["error"]["message"] == MISSING_MODEL_MESSAGE

        # One worker of any kind is enough for readiness: here an external provider's.
        _add(gw, {"url": fake.url, "runtime_type": "external", "api_key": provider_key})
        wait_until(lambda: fake.url in _healthy(gw), 20.0, "the external worker")
        wait_until(lambda: client.get("/readiness").status_code == 200, 10.0, "readiness")

        for url in http_mocks.urls:
            _add(gw, {"url": url})
        for url in hashed_mocks.urls:
            _add(gw, {"url": url, "labels": {"policy": "consistent_hashing"}})
        _add(gw, {"url": grpc_mock.url})
        everything = {*http_mocks.urls, *hashed_mocks.urls, grpc_mock.url, fake.url}
        wait_until(lambda: _healthy(gw) >= everything, 40.0, "every worker healthy")

        # /v1/models lists the models of all three kinds.
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert {HTTP_MODEL, HASHED_MODEL, GRPC_MODEL, EXTERNAL_MODEL} <= listed, listed

        # Each model's request reaches its own upstream, checked there.
        # The SDK presents the provider's key: BYOK for the external model (not a gateway
        # key), never forwarded to the self-hosted ones.
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=provider_key, max_retries=0)
        http_before = _by_model(http_mocks.urls)
        grpc_before = grpc_mock.stats()["requests"].get("Generate", 0)
        fake.clear()
        for model in (HTTP_MODEL, GRPC_MODEL, EXTERNAL_MODEL):
            answer = sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            assert answer.choices[0].message.content, model
        http_after = _by_model(http_mocks.urls)
        assert sum(a.get(HTTP_MODEL, 0) for a in http_after.values()) == 1 + sum(
            b.get(HTTP_MODEL, 0) for b in http_before.values()
        )
        served = next(u for u in http_mocks.urls if http_after[u] != http_before[u])
        last = mockutil.stats(served)["last_request_by_route"][CHAT]["header_map"]
        assert "authorization" not in last and "x-api-key" not in last
        assert grpc_mock.stats()["requests"].get("Generate", 0) == grpc_before + 1
        seen = [r for r in fake.seen() if r["method"] == "POST"]
        assert [(r["path"], r["body"]["model"]) for r in seen] == [(CHAT, EXTERNAL_MODEL)]
        assert seen[0]["headers"]["authorization"] == f"Bearer {provider_key}"

        # /generate: with a model, through that model's worker kind; without one, 400.
        generates = sum(
            mockutil.stats(u)["requests_by_route"].get("/generate", 0) for u in http_mocks.urls
        )
        native = _post(client, "/generate", {"text": "hi", "model": HTTP_MODEL})
        assert native.status_code == 200, native.text
        assert (
            sum(mockutil.stats(u)["requests_by_route"].get("/generate", 0) for u in http_mocks.urls)
            == generates + 1
        )
        via_grpc = _post(
            client,
            "/generate",
            {"text": "hi", "model": GRPC_MODEL, "sampling_params": {"max_new_tokens": 4}},
        )
        assert via_grpc.status_code == 200, via_grpc.text
        assert grpc_mock.stats()["requests"].get("Generate", 0) == grpc_before + 2
        for body in (
            {"text": "hi"},
            {"text": "hi", "model": "unknown"},
            {"text": "hi", "model": " "},
        ):
            refused = _post(client, "/generate", body)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "missing_model"
        assert _post(client, "/generate", {"text": "hi", "model": "nope"}).status_code == 404

        # Per-model policies stay per model: http-model keeps --policy round_robin (one
        # connection: one process, strict alternation); hashed-model routes by its
        # workers' consistent_hashing label, a key sticking to one worker.
        before = _chats(http_mocks.urls)
        for _ in range(4):
            assert _post(client, CHAT, _chat(HTTP_MODEL)).status_code == 200
        assert sorted(_diff(_chats(http_mocks.urls), before).values()) == [2, 2]
        for key in ("user-1", "user-2"):
            before = _chats(hashed_mocks.urls)
            for _ in range(4):
                sent = _post(client, CHAT, _chat(HASHED_MODEL), **{"X-SMG-Routing-Key": key})
                assert sent.status_code == 200, sent.text
            assert list(_diff(_chats(hashed_mocks.urls), before).values()) == [4]


def test_e2e_generate_without_model_is_routed_when_igw_is_off() -> None:
    """Without --enable-igw nothing changes: /generate without a model goes to any worker."""
    with mockutil.start_mock_workers(1) as mocks:
        gw = Gateway(["--worker-urls", mocks.url], processes=1)
        gw.start(timeout=60.0)
        try:
            gw.wait_ready(30.0)
            answer = httpx.post(gw.url + "/generate", json={"text": "hi"}, timeout=30.0)
            assert answer.status_code == 200, answer.text
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not mockutil.stats(mocks.url)[
                "requests_by_route"
            ].get("/generate"):
                time.sleep(0.05)
            assert mockutil.stats(mocks.url)["requests_by_route"].get("/generate") == 1
        finally:
            gw.stop()
            gw.close_log()
