"""The admin routes behind control-plane keys and JWT, end to end through `smg launch`:
roles, JWT (valid, expired, wrong issuer and audience, `alg: none`, HS/RS confusion,
unknown `kid`, JWKS endpoint down), audit lines, and no secret in any log line.

A loopback IDP (http.server on a free port) serves the OIDC discovery document and the
JWKS and counts its fetches; its keys are made here by joserfc. The Rust SMG 1.13 gives the
same statuses, messages and challenge (text/plain there; smg answers in the OpenAI shape).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from gatewayutil import Gateway, free_port, running_gateway, secret, wait_until
from joserfc.jwk import RSAKey
from mockutil import request, start_mock_workers
from test_cpauth import AUDIENCE, Idp

SERVING_KEY = secret("serving-key-e2e-0123456789")
ADMIN_SECRET = secret("adminsecret-e2e-0123456789")
USER_SECRET = secret("usersecret-e2e-0123456789")
CHALLENGE = 'Bearer realm="control-plane"'


class IdpServer:
    """OIDC discovery + JWKS on 127.0.0.1, counting fetches."""

    def __init__(self, idp: Idp) -> None:
        self.idp = idp
        self.fetches = {"discovery": 0, "jwks": 0}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    outer.fetches["discovery"] += 1
                    body = {"issuer": outer.issuer, "jwks_uri": outer.issuer + "/jwks.json"}
                elif self.path == "/jwks.json":
                    outer.fetches["jwks"] += 1
                    body = outer.idp.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> IdpServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Env:
    def __init__(self, gw: Gateway, idp: Idp, server: IdpServer, urls: list[str]) -> None:
        self.gw, self.idp, self.server, self.urls = gw, idp, server, urls
        self.tokens: list[str] = []

    def token(self, claims: dict[str, Any] | None = None, **kw: Any) -> str:
        base = {"iss": self.server.issuer}
        token = self.idp.token({**base, **(claims or {})}, **kw)
        self.tokens.append(secret(token))
        return token

    def call(
        self, method: str, path: str, bearer: str | None = None, body: Any = None, **headers: str
    ) -> tuple[int, dict[str, str], Any]:
        hdrs = dict(headers)
        if bearer is not None:
            hdrs["Authorization"] = f"Bearer {bearer}"
        status, got, data = request(method, self.gw.url + path, body, hdrs, timeout=15.0)
        return status, got, json.loads(data) if data else None


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    idp = Idp()
    with IdpServer(idp) as server, start_mock_workers(2) as mocks:
        args = [
            "--worker-urls",
            mocks.urls[0],
            "--api-key",
            SERVING_KEY,
            "--control-plane-api-keys",
            f"k1:Ops:admin:{ADMIN_SECRET}",
            f"k2:RO:user:{USER_SECRET}",
            "--control-plane-audit-enabled",
            "--log-json",
            "--jwt-issuer",
            server.issuer,  # no --jwt-jwks-uri: discovered from the issuer
            "--jwt-audience",
            AUDIENCE,
            "--jwt-role-mapping",
            "Gateway.Admin=admin",
            "Gateway.User=user",
        ]
        with running_gateway(args) as gw:
            gw.wait_ready()
            yield Env(gw, idp, server, mocks.urls)


def assert_401(answer: tuple[int, dict[str, str], Any], message: str) -> None:
    status, headers, body = answer
    assert status == 401, answer
    assert headers["www-authenticate"] == CHALLENGE
    assert headers["x-smg-error-code"] == "unauthorized"
    assert body["error"]["message"] == message
    assert body["error"]["code"] == "unauthorized"


def worker_id(env: Env) -> str:
    status, _, body = env.call("GET", "/workers", ADMIN_SECRET)
    assert status == 200
    return body["workers"][0]["id"]


def test_missing_and_wrong_credentials_get_rusts_401(env: Env) -> None:
    assert_401(env.call("GET", "/workers"), "Missing or invalid Authorization header")
    assert_401(
        env.call("GET", "/workers", secret("nope-wrong-cp-key-e2e")), "Invalid authentication token"
    )
    assert_401(
        env.call("GET", "/workers", Authorization="Basic YTpi"),
        "Missing or invalid Authorization header",
    )
    # With control-plane credentials configured, --api-key no longer opens the admin
    # routes (as Rust's server.rs), in either header; it still opens the serving routes.
    assert_401(env.call("GET", "/workers", SERVING_KEY), "Invalid authentication token")
    assert env.call("GET", "/workers", **{"x-api-key": ADMIN_SECRET})[0] == 401
    assert env.call("GET", "/v1/models")[0] == 200
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    assert env.call("POST", "/v1/chat/completions", SERVING_KEY, chat)[0] == 200
    assert env.call("POST", "/v1/chat/completions", ADMIN_SECRET, chat)[0] == 401


def test_forwarded_headers_grant_nothing(env: Env) -> None:
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        status = env.call("GET", "/workers", **{header: "127.0.0.1"})[0]
        assert status == 401, header
    assert env.call("GET", "/workers", USER_SECRET, **{"X-Forwarded-For": "10.9.9.9"})[0] == 200


def test_user_key_reads_and_gets_403_on_changes(env: Env) -> None:
    wid = worker_id(env)
    for method, path in (("GET", "/workers"), ("GET", f"/workers/{wid}"), ("GET", "/get_loads")):
        assert env.call(method, path, USER_SECRET)[0] == 200, path
    assert (
        request("HEAD", env.gw.url + "/workers", None, {"Authorization": f"Bearer {USER_SECRET}"})[
            0
        ]
        == 200
    )
    changes = [
        ("POST", "/workers", {"url": env.urls[1]}),
        ("PATCH", f"/workers/{wid}", {"priority": 5}),
        ("PUT", f"/workers/{wid}", {"url": env.urls[0]}),
        ("DELETE", f"/workers/{wid}", None),
        ("POST", "/flush_cache", None),
    ]
    for method, path, body in changes:
        status, headers, answer = env.call(method, path, USER_SECRET, body)
        assert status == 403, (method, path, status)
        assert headers["x-smg-error-code"] == "forbidden"
        assert answer["error"]["message"] == "Admin role required for this control plane operation"
    assert len(env.call("GET", "/workers", USER_SECRET)[2]["workers"]) == 1  # nothing changed


def test_admin_key_changes_things(env: Env) -> None:
    status, _, body = env.call("POST", "/workers", ADMIN_SECRET, {"url": env.urls[1]})
    assert status == 202, body
    added = body["worker_id"]
    assert env.call("POST", "/flush_cache", ADMIN_SECRET)[0] == 200
    assert env.call("DELETE", f"/workers/{added}", ADMIN_SECRET)[0] == 202


def test_jwt_roles(env: Env) -> None:
    admin = env.token({"groups": ["Gateway.Admin"], "sub": "alice@example.com"})
    user = env.token({"groups": ["Gateway.User"], "sub": "bob@example.com"})
    unmapped = env.token({"groups": ["Elsewhere"], "sub": "carol@example.com"})
    assert env.call("POST", "/flush_cache", admin)[0] == 200
    assert env.call("GET", "/workers", user)[0] == 200
    assert env.call("POST", "/flush_cache", user)[0] == 403
    # No mapped role: role user, as Rust (reads allowed, changes 403).
    assert env.call("GET", "/workers", unmapped)[0] == 200
    assert env.call("DELETE", f"/workers/{worker_id(env)}", unmapped)[0] == 403
    assert env.server.fetches["discovery"] == 1


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 300}, "Invalid JWT: token expired"),
        ({"iss": "https://elsewhere.example.com"}, "Invalid JWT: wrong issuer"),
        ({"aud": "another-service"}, "Invalid JWT: wrong audience"),
    ],
)
def test_jwt_with_bad_claims_gets_401(env: Env, claims: dict[str, Any], message: str) -> None:
    token = env.token({"groups": ["Gateway.Admin"], **claims})
    assert_401(env.call("GET", "/workers", token), message)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_alg_none_and_hs_rs_confusion_get_401(env: Env) -> None:
    now = int(time.time())
    claims = {
        "iss": env.server.issuer,
        "aud": AUDIENCE,
        "sub": "mallory",
        "exp": now + 300,
        "groups": ["Gateway.Admin"],
    }
    payload = _b64(json.dumps(claims).encode())
    head = _b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
    assert_401(
        env.call("POST", "/flush_cache", f"{head}.{payload}."),
        "Invalid JWT: algorithm 'none' is not allowed",
    )
    head = _b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    secret = env.idp.rsa.as_pem(private=False)
    sig = _b64(hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest())
    assert_401(
        env.call("POST", "/flush_cache", f"{head}.{payload}.{sig}"),
        "Invalid JWT: algorithm 'HS256' is not allowed",
    )


def test_unknown_kid_triggers_exactly_one_jwks_refresh(env: Env) -> None:
    known = env.token({"groups": ["Gateway.Admin"]})
    assert env.call("GET", "/workers", known)[0] == 200  # the key set is cached
    before = env.server.fetches["jwks"]
    for n in range(3):
        stranger = RSAKey.generate_key(2048, parameters={"kid": f"stranger-{n}", "alg": "RS256"})
        token = env.token({"groups": ["Gateway.Admin"]}, key=stranger)
        assert_401(
            env.call("GET", "/workers", token),
            f"Invalid JWT: no signing key for kid 'stranger-{n}'",
        )
    assert env.server.fetches["jwks"] == before + 1  # one refresh, then rate-limited
    assert env.call("GET", "/workers", known)[0] == 200


AUDIT_KEYS = (
    "principal",
    "auth_method",
    "role",
    "method",
    "path",
    "outcome",
    "status",
    "request_id",
    "peer",
    "details",
)


def test_audit_lines_name_who_what_and_outcome(env: Env) -> None:
    env.call(
        "POST", "/workers", USER_SECRET, {"url": env.urls[1]}, **{"x-request-id": "audit-rid-1"}
    )
    env.call("GET", "/workers", ADMIN_SECRET, **{"x-request-id": "audit-rid-2"})
    env.call("GET", "/get_loads", **{"x-request-id": "audit-rid-3"})

    def events() -> dict[str, dict[str, Any]]:
        found = {}
        for line in env.gw.logs().splitlines():
            if '"message":"control_plane_audit"' in line:
                event = json.loads(line)
                found[event["request_id"]] = {key: event[key] for key in AUDIT_KEYS}
        return found

    got = wait_until(lambda: (e := events()).get("audit-rid-3") and e, 10.0, "audit lines")
    assert got["audit-rid-1"] | {"peer": None} == {
        "principal": "k2",
        "auth_method": "api_key",
        "role": "user",
        "method": "POST",
        "path": "/workers",
        "outcome": "denied",
        "status": 403,
        "request_id": "audit-rid-1",
        "peer": None,
        "details": "Admin role required for this control plane operation",
    }
    assert got["audit-rid-1"]["peer"] == "127.0.0.1"
    ok = got["audit-rid-2"]
    assert (ok["principal"], ok["role"], ok["outcome"], ok["status"]) == (
        "k1",
        "admin",
        "success",
        200,
    )
    anonymous = got["audit-rid-3"]
    assert (anonymous["principal"], anonymous["auth_method"], anonymous["outcome"]) == (
        "unauthenticated",
        "none",
        "denied",
    )
    jwt_events = [e for e in got.values() if e["auth_method"] == "jwt"]
    assert any(
        e["principal"] == "alice@example.com" and e["outcome"] == "success" for e in jwt_events
    )


def test_no_secret_in_any_log_line(env: Env) -> None:
    logs = env.gw.logs()
    for value in (ADMIN_SECRET, USER_SECRET, SERVING_KEY, *env.tokens):
        assert value not in logs
    # Nor in an admin answer.
    body = json.dumps(env.call("GET", "/workers", ADMIN_SECRET)[2])
    assert ADMIN_SECRET not in body and SERVING_KEY not in body


def test_jwks_endpoint_down_gives_401_and_the_gateway_stays_up() -> None:
    idp = Idp()
    dead = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    args = [
        "--jwt-issuer",
        "https://idp.example.com",
        "--jwt-audience",
        AUDIENCE,
        "--jwt-jwks-uri",
        dead,
    ]
    with start_mock_workers(1) as mocks, running_gateway(["--worker-urls", mocks.url, *args]) as gw:
        gw.wait_ready()
        token = idp.token({"roles": "admin"})
        for _ in range(3):
            status, headers, data = request(
                "GET", gw.url + "/workers", None, {"Authorization": f"Bearer {token}"}, 15.0
            )
            assert status == 401 and headers["www-authenticate"] == CHALLENGE
            assert json.loads(data)["error"]["message"] == "Invalid JWT: signing keys unavailable"
        assert request("GET", gw.url + "/readiness", timeout=10.0)[0] == 200
        failures = [line for line in gw.logs().splitlines() if "JWKS fetch failed" in line]
        assert len(failures) == 1, failures  # one attempt inside the back-off, logged once
        assert token not in gw.logs()


def test_sighup_turns_control_plane_keys_on(tmp_path: Path) -> None:
    """The control plane judges with the configuration it runs now: keys added by a reload
    shut the admin routes to anonymous loopback callers at once."""
    with start_mock_workers(1) as mocks:
        config = tmp_path / "smg.yaml"
        config.write_text(f"worker-urls: [{mocks.url}]\n")
        with running_gateway(["--config", str(config)]) as gw:
            gw.wait_ready()
            assert request("GET", gw.url + "/workers", timeout=10.0)[0] == 200
            config.write_text(
                f"worker-urls: [{mocks.url}]\n"
                f"control-plane-api-keys: ['k1:Ops:admin:{ADMIN_SECRET}']\n"
            )
            gw.signal(signal.SIGHUP)
            wait_until(
                lambda: request("GET", gw.url + "/workers", timeout=10.0)[0] == 401,
                60.0,
                "the reload to apply the keys",
            )
            auth = {"Authorization": f"Bearer {ADMIN_SECRET}"}
            assert request("GET", gw.url + "/workers", None, auth, timeout=10.0)[0] == 200
            assert ADMIN_SECRET not in gw.logs()
