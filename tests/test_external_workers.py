"""External workers end to end: `smg launch` with fake providers (tests/providerfakes.py)
on loopback. Registration through POST /workers and through `--backend openai
--worker-urls`, model discovery with the admin-key order, wildcard workers, /workers's view,
the IPC ops the data plane calls (external_refresh, external_models), and the rule that the
gateway's own key never reaches a provider (not by discovery, probes or load scrapes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from gatewayutil import Gateway, running_gateway, wait_until
from providerfakes import FakeProvider

from smg import ipc

pytestmark = pytest.mark.timeout(90)

GATEWAY_KEY = "sk-gateway-own-key"
TENANT_KEY = "sk-tenant-own-key"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


def _workers(gateway: Gateway) -> dict[str, dict[str, Any]]:
    answer = gateway.admin("GET", "/workers", headers=AUTH)
    assert answer.status_code == 200, answer.text
    return {w["url"]: w for w in answer.json()["workers"]}


def _ready(gateway: Gateway, url: str) -> dict[str, Any] | None:
    worker = _workers(gateway).get(url)
    return worker if worker is not None and worker["status"] == "ready" else None


def _post_worker(gateway: Gateway, spec: dict[str, Any]) -> httpx.Response:
    return gateway.admin("POST", "/workers", json=spec, headers=AUTH)


def _ipc(gateway: Gateway, message: dict[str, Any]) -> Any:
    assert gateway.process is not None
    address = ipc.control_plane_address(gateway.process.pid)
    return asyncio.run(ipc.call(address, message, 10.0))


def _ipc_together(gateway: Gateway, message: dict[str, Any], count: int) -> list[Any]:
    assert gateway.process is not None
    address = ipc.control_plane_address(gateway.process.pid)

    async def calls() -> list[Any]:
        return list(await asyncio.gather(*(ipc.call(address, message, 10.0) for _ in range(count))))

    return asyncio.run(calls())


def _no_gateway_key(*fakes: FakeProvider) -> None:
    for fake in fakes:
        for request in fake.seen():
            text = repr(request)
            assert GATEWAY_KEY not in text and TENANT_KEY not in text, request


def test_post_workers_external_discovery_wildcard_and_ipc_ops() -> None:
    with (
        FakeProvider(
            "openai", ["gpt-4o", "gpt-4o-2024-05-13", "gpt-4o-2024-08-06"], key="sk-proj-wk"
        ) as openai_fake,
        FakeProvider(
            "anthropic", ["claude-3-5-haiku", "claude-3-5-haiku-2024-10"], key="adm-a"
        ) as anthropic_fake,
        FakeProvider("openai", ["anything"]) as custom_fake,
        running_gateway(
            ["--api-key", GATEWAY_KEY, "--tenant-api-key", f"t1:{TENANT_KEY}"],
            env={"ANTHROPIC_ADMIN_KEY": "adm-a"},
        ) as gateway,
    ):
        # 1. An OpenAI-API worker with its own key: discovered with it, cards grouped.
        answer = _post_worker(
            gateway,
            {
                "url": openai_fake.url,
                "runtime_type": "external",
                "provider": "openai",
                "api_key": "sk-proj-wk",
            },
        )
        # The Rust 1.13 binary answers 202 with this body to the same request.
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["status"] == "accepted" and body["url"] == openai_fake.url
        assert answer.headers["location"] == f"/workers/{body['worker_id']}"
        # 2. An Anthropic worker: ANTHROPIC_ADMIN_KEY wins over its spec key (the fake
        # answers 401 to the spec key), sent as x-api-key with anthropic-version.
        assert (
            _post_worker(
                gateway,
                {
                    "url": anthropic_fake.url,
                    "runtime_type": "EXTERNAL",
                    "provider": "claude",
                    "api_key": "spec-key-a",
                },
            ).status_code
            == 202
        )
        # 3. No key at all (and --api-key is not used): a wildcard worker, Ready at once.
        assert (
            _post_worker(gateway, {"url": custom_fake.url, "runtime_type": "external"}).status_code
            == 202
        )
        worker = wait_until(lambda: _ready(gateway, openai_fake.url), 15, "openai worker ready")
        assert worker["runtime_type"] == "external"
        assert worker["provider"] == "openai"
        assert worker["model_id"] == "gpt-4o"
        assert worker["models"] == [
            {
                "id": "gpt-4o",
                "aliases": ["gpt-4o-2024-05-13", "gpt-4o-2024-08-06"],
                "model_type": ["chat", "completions", "responses", "vision", "tools"],
                "provider": "openai",
            }
        ]
        assert "api_key" not in worker
        worker = wait_until(lambda: _ready(gateway, anthropic_fake.url), 15, "anthropic ready")
        assert worker["provider"] == "anthropic"
        assert [(c["id"], c.get("aliases")) for c in worker["models"]] == [
            ("claude-3-5-haiku", ["claude-3-5-haiku-2024-10"])
        ]
        wildcard = wait_until(lambda: _ready(gateway, custom_fake.url), 15, "wildcard ready")
        host = custom_fake.url.removeprefix("http://")
        assert (wildcard["provider"], wildcard["models"], wildcard["model_id"]) == (host, [], None)
        assert _workers(gateway)[openai_fake.url]["is_healthy"] is True

        seen = openai_fake.seen()
        assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/models")]
        assert seen[0]["headers"]["authorization"] == "Bearer sk-proj-wk"
        seen = anthropic_fake.seen()
        assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/models")]
        assert seen[0]["headers"]["x-api-key"] == "adm-a"
        assert seen[0]["headers"]["anthropic-version"] == "2023-06-01"
        assert "authorization" not in seen[0]["headers"]
        # No discovery, no /health probes, no load scrapes for a wildcard provider: a
        # load-monitor round (default interval) passes without a request.
        time.sleep(1.5)
        assert custom_fake.seen() == []

        # external_refresh: the provider added a model; a refresh finds it.
        openai_fake.set_models(["gpt-4o", "gpt-4.1"])
        openai_fake.clear()
        assert _ipc(
            gateway, {"kind": "external_refresh", "provider": "openai", "credential": None}
        ) == {"refreshed": 1}
        models = [c["id"] for c in _workers(gateway)[openai_fake.url]["models"]]
        assert models == ["gpt-4o", "gpt-4.1"]
        assert len(openai_fake.seen()) == 1
        # Throttled: the same refresh at once asks nobody.
        assert _ipc(
            gateway, {"kind": "external_refresh", "provider": None, "credential": None}
        ) == {"refreshed": 0}
        assert len(openai_fake.seen()) == 1
        assert anthropic_fake.seen()[-1]["headers"]["x-api-key"] == "adm-a"
        # A gateway key offered as the credential is never used.
        time.sleep(1.1)
        anthropic_fake.clear()
        openai_fake.clear()
        _ipc(
            gateway, {"kind": "external_refresh", "provider": "anthropic", "credential": TENANT_KEY}
        )
        assert [r["headers"]["x-api-key"] for r in anthropic_fake.seen()] == ["adm-a"]
        assert openai_fake.seen() == []

        # Concurrent refreshes of the same provider share one run: both see its result,
        # the provider is asked once. The provider answers slowly, so the run is still
        # going when the last call arrives (on a loaded box one came after a fast run
        # ended and was throttled).
        time.sleep(1.1)
        openai_fake.set_models(["gpt-4o", "gpt-4.1", "gpt-5"])
        openai_fake.set_models_delay(1.0)
        openai_fake.clear()
        assert (
            _ipc_together(
                gateway, {"kind": "external_refresh", "provider": "openai", "credential": None}, 3
            )
            == [{"refreshed": 1}] * 3
        )
        openai_fake.set_models_delay(0.0)
        assert len(openai_fake.seen()) == 1

        # external_models: a caller's key goes only to its own provider's workers.
        openai_fake.clear()
        anthropic_fake.clear()
        answer = _ipc(
            gateway,
            {"kind": "external_models", "credential": "sk-proj-wk", "header": "authorization"},
        )
        assert answer == {
            "data": [
                {"id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "openai"},
                {
                    "id": "gpt-4.1",
                    "object": "model",
                    "created": 1_700_000_000,
                    "owned_by": "openai",
                },
                {"id": "gpt-5", "object": "model", "created": 1_700_000_000, "owned_by": "openai"},
            ]
        }
        assert [r["headers"]["authorization"] for r in openai_fake.seen()] == ["Bearer sk-proj-wk"]
        assert anthropic_fake.seen() == [] and custom_fake.seen() == []
        # An Anthropic key: only the Anthropic worker is asked (it refuses that key: 401).
        answer = _ipc(
            gateway,
            {"kind": "external_models", "credential": "sk-ant-caller", "header": "x-api-key"},
        )
        assert answer == {"data": []}
        assert [r["headers"]["x-api-key"] for r in anthropic_fake.seen()] == ["sk-ant-caller"]
        assert len(openai_fake.seen()) == 1 and custom_fake.seen() == []
        # An unattributed key with three providers registered goes nowhere; a gateway key
        # neither; a malformed op is answered, not fatal.
        for credential in ("sk-plain", GATEWAY_KEY, TENANT_KEY):
            answer = _ipc(
                gateway,
                {"kind": "external_models", "credential": credential, "header": "authorization"},
            )
            assert answer == {"data": []}
        assert "error" in _ipc(gateway, {"kind": "external_models", "credential": 3})
        assert len(openai_fake.seen()) == 1 and len(anthropic_fake.seen()) == 1
        assert custom_fake.seen() == []

        # PATCH cannot change what a worker is.
        worker_id = _workers(gateway)[openai_fake.url]["id"]
        answer = gateway.admin(
            "PATCH", f"/workers/{worker_id}", json={"runtime_type": "vllm"}, headers=AUTH
        )
        assert answer.status_code == 400 and "runtime_type" in answer.text
        _no_gateway_key(openai_fake, anthropic_fake, custom_fake)


def test_backend_openai_worker_urls_are_external() -> None:
    with (
        FakeProvider("openai", ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"], key="adm-o") as fake,
        running_gateway(
            ["--backend", "openai", "--worker-urls", fake.url, "--api-key", GATEWAY_KEY],
            env={"OPENAI_ADMIN_KEY": "adm-o"},
        ) as gateway,
    ):
        worker = wait_until(lambda: _ready(gateway, fake.url), 15, "worker ready")
        assert (worker["runtime_type"], worker["provider"]) == ("external", "openai")
        assert worker["models"][0]["aliases"] == ["gpt-4o-mini-2024-07-18"]
        time.sleep(1.5)  # a load-monitor round: no scrape, no probe
        # A provider has no cache to flush: it is not asked.
        answer = gateway.admin("POST", "/flush_cache", headers=AUTH)
        assert answer.status_code == 200 and answer.json()["workers"] == []
        seen = fake.seen()
        assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/models")]
        assert seen[0]["headers"]["authorization"] == "Bearer adm-o"
        _no_gateway_key(fake)


def test_external_discovery_retry_timeout_and_opted_in_probes() -> None:
    with (
        FakeProvider("openai", [], key="sk-k") as empty,
        FakeProvider("anthropic", ["claude-x"], key="sk-ant-k") as probed,
        running_gateway(
            [
                "--worker-startup-timeout-secs",
                "2",
                "--worker-startup-check-interval",
                "1",
                "--health-check-endpoint",
                "/v1/models",
                "--health-check-interval-secs",
                "1",
                "--api-key",
                GATEWAY_KEY,
            ]
        ) as gateway,
    ):
        # A provider listing no models: discovery is retried, then the worker is Failed.
        spec = {"url": empty.url, "runtime_type": "external", "api_key": "sk-k"}
        assert _post_worker(gateway, spec).status_code == 202
        assert _workers(gateway)[empty.url]["status"] == "pending"
        # Health checks only when the spec asks; its own key in Anthropic's header.
        spec = {
            "url": probed.url,
            "runtime_type": "external",
            "provider": "anthropic",
            "api_key": "sk-ant-k",
            "health": {"disable_health_check": False},
        }
        assert _post_worker(gateway, spec).status_code == 202
        wait_until(lambda: _workers(gateway)[empty.url]["status"] == "failed", 15, "failed")
        seen = empty.seen()
        assert len(seen) >= 2 and all(r["path"] == "/v1/models" for r in seen)  # retried
        assert _ready(gateway, probed.url) is not None
        wait_until(lambda: len(probed.seen()) >= 3, 10, "discovery and two probes")
        for request in probed.seen():
            assert (request["path"], request["headers"].get("x-api-key")) == (
                "/v1/models",
                "sk-ant-k",
            )
            assert "authorization" not in request["headers"]
        _no_gateway_key(empty, probed)
