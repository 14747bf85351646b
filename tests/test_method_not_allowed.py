"""A method a route does not take, answered as the Rust SMG 1.13's binary answers it (checked
side by side): a GET route (probes, /v1/models, the worker-info routes) 405 with
`allow: GET,HEAD`, a POST route 405 with `allow: POST`, both `method_not_allowed` with the
message `Invalid URL (METHOD PATH)`; a path that is no route stays 404 `unknown_url`."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests import mockutil
from tests.gatewayutil import running_gateway

# (method, path, status, allow, code): the 1.13 binary's answers.
CASES = [
    ("POST", "/health", 405, "GET,HEAD", "method_not_allowed"),
    ("POST", "/liveness", 405, "GET,HEAD", "method_not_allowed"),
    ("POST", "/readiness", 405, "GET,HEAD", "method_not_allowed"),
    ("POST", "/v1/models", 405, "GET,HEAD", "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "GET,HEAD", "method_not_allowed"),
    ("POST", "/get_model_info", 405, "GET,HEAD", "method_not_allowed"),
    ("PUT", "/get_server_info", 405, "GET,HEAD", "method_not_allowed"),
    ("POST", "/health_generate", 405, "GET,HEAD", "method_not_allowed"),
    ("PATCH", "/v1/completions", 405, "POST", "method_not_allowed"),
    ("GET", "/generate", 405, "POST", "method_not_allowed"),
    ("DELETE", "/v1/chat/completions", 405, "POST", "method_not_allowed"),
    ("POST", "/metrics", 404, None, "unknown_url"),
    ("GET", "/nope", 404, None, "unknown_url"),
]


@pytest.fixture(scope="module")
def gateway_port() -> Iterator[int]:
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", *mocks.urls]) as gw,
    ):
        gw.wait_ready()
        yield gw.port


@pytest.mark.parametrize(("method", "path", "status", "allow", "code"), CASES)
def test_a_method_the_route_does_not_take(
    gateway_port: int, method: str, path: str, status: int, allow: str | None, code: str
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)
    try:
        conn.request(method, path, body=b"{}" if method != "GET" else None)
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    assert answer.status == status, body
    assert answer.getheader("allow") == allow
    assert answer.getheader("x-smg-error-code") == code
    error = json.loads(body)["error"]
    assert error == {
        "type": "invalid_request_error",
        "code": code,
        "message": f"Invalid URL ({method} {path})",
        "param": None,
    }
