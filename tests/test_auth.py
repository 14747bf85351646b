"""`--api-key` on the data plane: the pure rules, then a real `smg launch`.

The answers were taken from the Rust SMG 1.13 with the same requests (`--api-key` set,
one mock worker): 401 `invalid_api_key` with its two messages and `www-authenticate`
challenges, Anthropic's shape on /v1/messages; probes, /v1/models and the worker-info
routes open; admin routes closed without the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from gatewayutil import Gateway, running_gateway, secret
from mockutil import request, start_mock_workers, stats

from smg.config import ConfigError, GatewayConfig, load_config, render_config
from smg.dataplane.auth import Verdict, judge, presented_key
from smg.posture import posture_warning

# Registered with gatewayutil.secret: the session's gateway logs are grepped for each.
KEY = secret("gw-key-0123456789abcdef")
WRONG = secret("wrong-key-5e0d9c27b1")
UNCHECKED = secret("client-key-unchecked-8a41f3")
TENANT1 = secret("tenant-key-1-c93e5a")
TENANT2 = secret("tenant-key-2-17b4d8")
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "mock-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        (b"Bearer k1", None, b"k1"),
        (b"bearer   k1 ", None, b"k1"),
        (b"BEARER k1", b"other", b"k1"),  # a Bearer credential is the one judged
        (None, b"k2", b"k2"),
        (b"k1", None, None),  # no scheme: not a credential (1.13: "Missing API key")
        (b"Basic azE=", None, None),
        (b"Bearer ", b" ", None),
        (None, None, None),
    ],
)
def test_presented_key(
    authorization: bytes | None, x_api_key: bytes | None, expected: bytes | None
) -> None:
    assert presented_key(authorization, x_api_key) == expected


def test_judge() -> None:
    assert judge((b"secret",), b"secret") is Verdict.OK
    assert judge((b"secret",), b"secreT") is Verdict.INVALID
    assert judge((b"secret",), b"secret-longer") is Verdict.INVALID
    assert judge((b"secret",), None) is Verdict.MISSING
    assert judge((b"a-key", b"b-key"), b"b-key") is Verdict.OK
    assert judge((), b"anything") is Verdict.INVALID  # nothing opens a shut route


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Gateway, str]]:
    with (
        start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, "--api-key", KEY]) as gw,
    ):
        gw.wait_ready()
        yield gw, mocks.url


def post(gw: Gateway, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict, dict]:
    status, got, data = request("POST", gw.url + path, body, headers, timeout=10.0)
    return status, got, json.loads(data)


def test_missing_and_wrong_keys_get_smgs_401(gateway: tuple[Gateway, str]) -> None:
    gw, _url = gateway
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic eA=="}):
        status, got, body = post(gw, "/v1/chat/completions", CHAT, headers)
        assert status == 401
        assert got["www-authenticate"] == 'Bearer realm="data-plane"'
        assert got["x-smg-error-code"] == "invalid_api_key"
        assert body["error"]["message"] == (
            "Missing API key: send it as `Authorization: Bearer <key>`"
        )
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "invalid_api_key"
    for headers in ({"Authorization": f"Bearer {WRONG}"}, {"x-api-key": WRONG}):
        status, got, body = post(gw, "/v1/completions", {"model": "mock-model"}, headers)
        assert status == 401
        assert got["www-authenticate"] == 'Bearer realm="data-plane", error="invalid_token"'
        assert body["error"]["message"] == "Invalid API key"


def test_messages_401_in_anthropic_shape(gateway: tuple[Gateway, str]) -> None:
    gw, _url = gateway
    status, _got, body = post(gw, "/v1/messages", MESSAGES, {})
    assert status == 401
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"


def test_the_key_opens_the_serving_routes_and_never_reaches_the_worker(
    gateway: tuple[Gateway, str],
) -> None:
    gw, url = gateway
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        status, _got, _body = post(gw, "/v1/chat/completions", CHAT, headers)
        assert status == 200
        seen = stats(url)["last_request"]["header_map"]
        assert "x-api-key" not in seen
        # The worker has no key of its own: it gets --api-key as its Bearer, as in 1.13.
        assert seen["authorization"] == f"Bearer {KEY}"


def test_probes_models_and_worker_info_stay_open(gateway: tuple[Gateway, str]) -> None:
    gw, _url = gateway
    for path in ("/liveness", "/readiness", "/health", "/v1/models", "/get_model_info"):
        assert request("GET", gw.url + path, timeout=10.0)[0] == 200, path


def test_admin_routes_need_the_key(gateway: tuple[Gateway, str]) -> None:
    gw, _url = gateway
    status, got, _data = request("GET", gw.url + "/workers", timeout=10.0)
    assert status == 401
    assert got["x-smg-error-code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}"}
    assert request("GET", gw.url + "/workers", None, headers, timeout=10.0)[0] == 200


def test_without_api_key_nothing_is_asked(gateway: tuple[Gateway, str]) -> None:
    _gw, url = gateway
    with running_gateway(["--worker-urls", url]) as gw:
        gw.wait_ready()
        status, _got, _body = post(gw, "/v1/chat/completions", CHAT, {"x-api-key": UNCHECKED})
        assert status == 200
        assert "x-api-key" not in stats(url)["last_request"]["header_map"]
        # One start-up warning names every open surface and how to close it.
        lines = [line for line in gw.logs().splitlines() if "SECURITY POSTURE" in line]
        assert len(lines) == 1
        assert 'data_plane="OPEN: ' in lines[0]
        assert "protect them with --api-key <key>" in lines[0]


def test_posture_names_every_open_surface() -> None:
    open_line = posture_warning(GatewayConfig(host="0.0.0.0", prometheus_port=29000))
    assert 'control_plane="LOOPBACK ONLY: ' in open_line
    assert 'data_plane="OPEN: ' in open_line
    assert 'metrics_listener="0.0.0.0:29000 serves /metrics' in open_line
    keyed = posture_warning(GatewayConfig(host="127.0.0.1", prometheus_port=9100, api_key="k" * 20))
    assert "data_plane=" not in keyed and "control_plane=" not in keyed
    # A loopback gateway keeps its metrics on loopback (smg.config.prometheus_bind_host).
    assert 'metrics_listener="127.0.0.1:9100 serves /metrics' in keyed


def test_keyed_gateway_logs_only_the_metrics_listener(gateway: tuple[Gateway, str]) -> None:
    gw, _url = gateway
    lines = [line for line in gw.logs().splitlines() if "SECURITY POSTURE" in line]
    assert len(lines) == 1
    assert "client keys guard the serving routes" in lines[0]
    assert "data_plane=" not in lines[0]
    assert KEY not in gw.logs()  # the key itself is never logged


def test_tenant_keys_open_serving_only_and_never_reach_the_worker() -> None:
    """As the Rust SMG 1.13: tenant keys alone make the serving routes ask for a key and
    shut the admin routes (401 even with a tenant key). Unlike 1.13, which sends the
    tenant's key on to the worker, smg never forwards a client's key."""
    args = ["--tenant-api-key", f"t1:{TENANT1}", "--tenant-api-key", f"t2:{TENANT2}"]
    with start_mock_workers(1) as mocks, running_gateway(["--worker-urls", mocks.url, *args]) as gw:
        gw.wait_ready()
        assert post(gw, "/v1/chat/completions", CHAT, {})[0] == 401
        wrong = post(gw, "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {WRONG}"})
        assert wrong[0] == 401 and wrong[2]["error"]["message"] == "Invalid API key"
        for key in (TENANT1, TENANT2):
            ok = post(gw, "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"})
            assert ok[0] == 200
            assert "authorization" not in stats(mocks.url)["last_request"]["header_map"]
        for headers in ({}, {"Authorization": f"Bearer {TENANT1}"}):
            assert request("GET", gw.url + "/workers", None, headers, timeout=10.0)[0] == 401
        assert TENANT1 not in gw.logs()


def test_tenant_keys_are_validated_and_masked() -> None:
    cfg = load_config(["--tenant-api-key", "t1:tenant-secret-key-123456"], env={})
    text = render_config(cfg)
    assert "tenant-secret-key-123456" not in text
    assert "t1:ten***" in text
    for bad in ("no-colon", ":key", "t1:", "t1:has space"):
        with pytest.raises(ConfigError):
            load_config(["--tenant-api-key", bad], env={})
    with pytest.raises(ConfigError, match="given twice"):
        load_config(["--tenant-api-key", "t:k1", "--tenant-api-key", "t:k2"], env={})
