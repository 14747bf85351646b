"""`--cors-allowed-origins`: the pure header decisions, then a real `smg launch`.

The expected answers were taken from the Rust SMG 1.13 with the same requests
(`--cors-allowed-origins http://a.example`, then `'*'`, then unset; `--api-key` set): any
OPTIONS is a preflight answered 200 with an empty body and no key asked; a list echoes an
exactly matching Origin with `vary: origin` and exposes x-request-id/traceparent/
tracestate on every answer; `*` answers `*` everywhere; unset adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from gatewayutil import Gateway, running_gateway, secret
from mockutil import request, start_mock_workers, stats

from smg.dataplane.cors import Cors

KEY = secret("cors-gw-key-5b2f0c9e7d")
A = "http://a.example"
B = "http://b.example"
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
PREFLIGHT_HEADERS = (
    "content-type,authorization,anthropic-version,anthropic-beta,traceparent,tracestate"
)


def lines(raw: bytes) -> list[str]:
    return raw.decode().splitlines()


def test_unset_means_no_cors() -> None:
    assert Cors.from_config([]) is None


def test_list_preflight() -> None:
    cors = Cors([A, "https://c.example:8443"])
    assert lines(cors.preflight(A.encode())) == [
        "vary: origin",
        "access-control-allow-methods: GET,POST,PATCH,DELETE,OPTIONS",
        f"access-control-allow-headers: {PREFLIGHT_HEADERS}",
        "access-control-max-age: 3600",
        f"access-control-allow-origin: {A}",
    ]
    assert lines(cors.preflight(b"https://c.example:8443"))[-1] == (
        "access-control-allow-origin: https://c.example:8443"
    )
    # Not allowed, or no Origin: the same answer without the allowance.
    for origin in (B.encode(), None, b"HTTP://A.EXAMPLE", A.encode() + b"/", b"null"):
        got = lines(cors.preflight(origin))
        assert len(got) == 4 and not any(h.startswith("access-control-allow-origin") for h in got)


def test_list_response() -> None:
    cors = Cors([A])
    assert lines(cors.response(A.encode())) == [
        "vary: origin",
        f"access-control-allow-origin: {A}",
        "access-control-expose-headers: x-request-id,traceparent,tracestate",
    ]
    for origin in (B.encode(), None, b"http://a.example:80"):
        assert lines(cors.response(origin)) == [
            "vary: origin",
            "access-control-expose-headers: x-request-id,traceparent,tracestate",
        ]


def test_any_origin() -> None:
    cors = Cors(["*"])
    for origin in (A.encode(), None):
        assert lines(cors.preflight(origin)) == [
            "access-control-allow-methods: *",
            "access-control-allow-headers: *",
            "access-control-max-age: 3600",
            "access-control-allow-origin: *",
        ]
        assert lines(cors.response(origin)) == [
            "access-control-expose-headers: *",
            "access-control-allow-origin: *",
        ]


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listed() -> Iterator[tuple[Gateway, str]]:
    with (
        start_mock_workers(1) as mocks,
        running_gateway(
            ["--worker-urls", mocks.url, "--api-key", KEY, "--cors-allowed-origins", A]
        ) as gw,
    ):
        gw.wait_ready()
        yield gw, mocks.url


def routed(url: str, path: str) -> int:
    return stats(url)["requests_by_route"].get(path, 0)


def test_preflight_answered_without_worker_or_key(listed: tuple[Gateway, str]) -> None:
    gw, mock = listed
    before = {p: routed(mock, p) for p in ("/v1/chat/completions", "/get_server_info")}
    for path, allow in (
        ("/v1/chat/completions", "POST"),
        ("/v1/messages", "POST"),
        ("/v1/models", "GET,HEAD"),
        ("/get_server_info", "GET,HEAD"),
        ("/liveness", "GET,HEAD"),
        ("/workers", None),
        ("/no/such/route", None),
    ):
        status, headers, body = request(
            "OPTIONS",
            gw.url + path,
            headers={
                "Origin": A,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
        )
        assert status == 200, (path, body)
        assert body == b""
        assert headers["access-control-allow-origin"] == A
        assert headers["vary"] == "origin"
        assert headers["access-control-allow-methods"] == "GET,POST,PATCH,DELETE,OPTIONS"
        assert headers["access-control-allow-headers"] == PREFLIGHT_HEADERS
        assert headers["access-control-max-age"] == "3600"
        assert "access-control-allow-credentials" not in headers
        assert headers.get("allow") == allow
        assert headers["content-length"] == "0"
    # A disallowed origin: 200 as well, without the allowance (the browser refuses).
    status, headers, _ = request(
        "OPTIONS",
        gw.url + "/v1/chat/completions",
        headers={"Origin": B, "Access-Control-Request-Method": "POST"},
    )
    assert status == 200
    assert "access-control-allow-origin" not in headers
    assert headers["access-control-max-age"] == "3600"
    # No worker saw any of it.
    assert {p: routed(mock, p) for p in before} == before


def test_actual_answers_carry_the_allowance(listed: tuple[Gateway, str]) -> None:
    gw, _mock = listed
    auth = {"Authorization": f"Bearer {KEY}"}
    expose = "x-request-id,traceparent,tracestate"
    # Proxied.
    status, headers, body = request(
        "POST", gw.url + "/v1/chat/completions", CHAT, {"Origin": A, **auth}
    )
    assert status == 200, body
    assert headers["access-control-allow-origin"] == A
    assert headers["vary"] == "origin"
    assert headers["access-control-expose-headers"] == expose
    # Streamed.
    status, headers, body = request(
        "POST", gw.url + "/v1/chat/completions", {**CHAT, "stream": True}, {"Origin": A, **auth}
    )
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["access-control-allow-origin"] == A
    # 401 (the browser can read why), local answers, errors, admin answers.
    status, headers, body = request("POST", gw.url + "/v1/chat/completions", CHAT, {"Origin": A})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["access-control-allow-origin"] == A
    for method, path, want in (
        ("GET", "/liveness", 200),
        ("GET", "/v1/models", 200),
        ("GET", "/no/such/route", 404),
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/workers", 200),
        ("GET", "/get_server_info", 200),
    ):
        status, headers, _ = request(method, gw.url + path, headers={"Origin": A, **auth})
        assert status == want, path
        assert headers["access-control-allow-origin"] == A, path
        assert headers["access-control-expose-headers"] == expose, path
    # A disallowed origin, or none: vary and expose only.
    for origin in ({"Origin": B}, {}):
        status, headers, _ = request(
            "POST", gw.url + "/v1/chat/completions", CHAT, {**origin, **auth}
        )
        assert status == 200
        assert "access-control-allow-origin" not in headers
        assert headers["vary"] == "origin"
        assert headers["access-control-expose-headers"] == expose
    # A worker's error on /v1/messages, rewritten into Anthropic's shape, carries it too.
    status, headers, body = request(
        "POST",
        gw.url + "/v1/messages",
        {"model": "mock-model", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
        {"Origin": A, **auth},
    )
    # (the mock SGLang worker has no /v1/messages: its 404, in Anthropic's shape)
    assert status == 404, body
    assert json.loads(body)["error"]["type"] == "not_found_error"
    assert headers["access-control-allow-origin"] == A


def test_any_origin_end_to_end() -> None:
    with (
        start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, "--cors-allowed-origins", "*"]) as gw,
    ):
        gw.wait_ready()
        before = routed(mocks.url, "/v1/chat/completions")
        status, headers, body = request(
            "OPTIONS",
            gw.url + "/v1/chat/completions",
            headers={"Origin": B, "Access-Control-Request-Method": "POST"},
        )
        assert (status, body) == (200, b"")
        assert headers["access-control-allow-origin"] == "*"
        assert headers["access-control-allow-methods"] == "*"
        assert headers["access-control-allow-headers"] == "*"
        assert "vary" not in headers
        assert routed(mocks.url, "/v1/chat/completions") == before
        status, headers, _ = request("POST", gw.url + "/v1/chat/completions", CHAT, {"Origin": B})
        assert status == 200
        assert headers["access-control-allow-origin"] == "*"
        assert headers["access-control-expose-headers"] == "*"
        assert routed(mocks.url, "/v1/chat/completions") == before + 1


def test_unset_adds_nothing_and_options_is_not_a_preflight() -> None:
    with (
        start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url]) as gw,
    ):
        gw.wait_ready()
        status, headers, _ = request("POST", gw.url + "/v1/chat/completions", CHAT, {"Origin": A})
        assert status == 200
        assert not [h for h in headers if h.startswith("access-control-") or h == "vary"]
        status, headers, body = request(
            "OPTIONS",
            gw.url + "/v1/chat/completions",
            headers={"Origin": A, "Access-Control-Request-Method": "POST"},
        )
        assert status == 405  # as 1.13 without the flag
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
        assert not [h for h in headers if h.startswith("access-control-")]
