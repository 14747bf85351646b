"""Who may call the admin routes (smg.control.cpauth): the pure decision, JWT verification
and the JWKS cache, driven directly with keys made here by joserfc.

The answers follow the Rust SMG 1.13 (crates/auth/src/middleware.rs and jwt.rs; the lead's
measurements with `--control-plane-api-keys 'k1:Ops:admin:adminsecret'
'k2:RO:user:usersecret'`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from smg.config import ConfigError, GatewayConfig, load_config
from smg.control import cpauth
from smg.control.cpauth import (
    AuthFields,
    ControlPlaneAuth,
    JwksCache,
    Mode,
    authorize,
    bearer_token,
    is_loopback,
    role_allows,
    role_from_claims,
)
from smg.logs import JsonFormatter, TextFormatter
from smg.posture import posture_warning

ISSUER = "https://idp.example.com"
AUDIENCE = "smg-gateway"
KEYS = ["k1:Ops:admin:adminsecret", "k2:RO:user:usersecret"]


def cfg_of(**kwargs: Any) -> GatewayConfig:
    return GatewayConfig(**kwargs)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def fields(method: str = "GET", token: str | None = None, peer: str = "10.1.2.3", **kw: Any):
    return AuthFields(
        method=method,
        authorization=None if token is None else f"Bearer {token}",
        peer=peer,
        request_id="req-1",
        **kw,
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Idp:
    """An IDP made at test time: an RSA key (kid rsa-1), an EC key, an Ed25519 key."""

    def __init__(self) -> None:
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS256"})
        self.ec = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
        self.ed = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.as_dict(private=False) for k in (self.rsa, self.ec, self.ed)]}

    def token(self, claims: dict[str, Any] | None = None, *, alg: str = "RS256", key=None, **hdr):
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300, "iat": now}
        body.update(claims or {})
        body = {k: v for k, v in body.items() if v is not None}
        key = key or self.rsa
        header = {"alg": alg, "kid": key.kid, **hdr}
        return jwt.encode(header, body, key, algorithms=[alg])


@pytest.fixture(scope="module")
def idp() -> Idp:
    return Idp()


def jwt_policy(mapping: dict[str, str] | None = None, keys: list[str] | None = None):
    args = ["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    for item in (mapping or {}).items():
        args += ["--jwt-role-mapping", "=".join(item)]
    for key in keys or []:
        args += ["--control-plane-api-keys", key]
    return ControlPlaneAuth.from_config(load_config(args, env={}))


class FakeIdp:
    """A fetch function that counts its calls; `down` makes it fail."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.documents = documents
        self.calls = 0
        self.down = False

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("connect to 127.0.0.1:9 refused")
        return self.documents[min(self.calls, len(self.documents)) - 1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- plain rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer k1", "k1"),
        ("bearer k1", "k1"),
        ("BEARER   k1", "k1"),
        ("Basic k1", None),
        ("Bearerk1", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("k1", None),
        (None, None),
    ],
)
def test_bearer_token(value: str | None, token: str | None) -> None:
    assert bearer_token(value) == token


def test_roles() -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        assert role_allows("admin", method)
    assert role_allows("user", "GET") and role_allows("user", "HEAD")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert not role_allows("user", method)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("192.168.1.1", False),
        ("", False),
        ("localhost", False),  # a peer address is numeric; a name is no loopback proof
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_modes_follow_the_credentials_configured() -> None:
    assert ControlPlaneAuth.from_config(cfg_of()).mode is Mode.LOOPBACK
    assert ControlPlaneAuth.from_config(cfg_of(api_key="k" * 20)).mode is Mode.API_KEY
    assert ControlPlaneAuth.from_config(cfg_of(tenant_api_key=["t:tk"])).mode is Mode.CLOSED
    cp = cfg_of(api_key="k" * 20, control_plane_api_keys=KEYS)
    assert ControlPlaneAuth.from_config(cp).mode is Mode.CONTROL_PLANE
    assert jwt_policy().mode is Mode.CONTROL_PLANE


# --- control-plane keys ------------------------------------------------------------------------


def test_control_plane_keys_and_roles() -> None:
    policy = ControlPlaneAuth.from_config(cfg_of(control_plane_api_keys=KEYS))
    missing = run(authorize(policy, None, fields("GET")))
    assert (missing.status, missing.code, missing.message) == (
        401,
        "unauthorized",
        "Missing or invalid Authorization header",
    )
    assert missing.headers == (("www-authenticate", 'Bearer realm="control-plane"'),)
    wrong = run(authorize(policy, None, fields("GET", "nope")))
    assert (wrong.status, wrong.message) == (401, "Invalid authentication token")
    assert wrong.headers == missing.headers
    # x-api-key is not read on the control plane (Rust reads Authorization only).
    assert run(authorize(policy, None, fields("GET", x_api_key="adminsecret"))).status == 401
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        denied = run(authorize(policy, None, fields(method, "usersecret")))
        assert (denied.status, denied.code, denied.message) == (
            403,
            "forbidden",
            "Admin role required for this control plane operation",
        )
        assert denied.principal == cpauth.Principal("k2", "api_key", "user")
        assert run(authorize(policy, None, fields(method, "adminsecret"))).allowed
    for method in ("GET", "HEAD"):
        ok = run(authorize(policy, None, fields(method, "usersecret")))
        assert ok.allowed and ok.principal.id == "k2"


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared with hmac.compare_digest, matched or not."""
    policy = ControlPlaneAuth.from_config(cfg_of(control_plane_api_keys=KEYS))
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(cpauth.hmac, "compare_digest", spy)
    assert policy.match_key("adminsecret") is not None
    assert compared == [b"adminsecret", b"usersecret"]
    compared.clear()
    assert policy.match_key("nothing") is None
    assert len(compared) == 2


def test_api_key_stops_opening_admin_routes_once_control_plane_keys_exist() -> None:
    """As Rust's server.rs: with control-plane auth configured it alone guards the routes."""
    policy = ControlPlaneAuth.from_config(
        cfg_of(api_key="serving-key-123", control_plane_api_keys=KEYS)
    )
    assert run(authorize(policy, None, fields("GET", "serving-key-123"))).status == 401


def test_api_key_mode_and_tenant_only_and_loopback() -> None:
    policy = ControlPlaneAuth.from_config(cfg_of(api_key="serving-key-123"))
    assert run(authorize(policy, None, fields("POST", "serving-key-123"))).allowed
    assert run(authorize(policy, None, fields("POST", x_api_key="serving-key-123"))).allowed
    missing = run(authorize(policy, None, fields("GET")))
    assert (missing.status, missing.code) == (401, "invalid_api_key")
    assert missing.message.startswith("Missing API key")
    closed = ControlPlaneAuth.from_config(cfg_of(tenant_api_key=["t1:tenant-key"]))
    assert run(authorize(closed, None, fields("GET", "tenant-key"))).status == 401
    open_ = ControlPlaneAuth.from_config(cfg_of())
    assert run(authorize(open_, None, fields("POST", peer="127.0.0.1"))).allowed
    far = run(authorize(open_, None, fields("POST", peer="10.0.0.7")))
    assert (far.status, far.code) == (403, "forbidden")


def test_a_non_loopback_peer_with_a_valid_credential_is_accepted(idp: Idp) -> None:
    """Any address that presents a valid credential is accepted (keys, --api-key, JWT)."""
    for peer in ("10.0.0.7", "203.0.113.9", "2001:db8::1"):
        keys = ControlPlaneAuth.from_config(cfg_of(control_plane_api_keys=KEYS))
        assert run(authorize(keys, None, fields("POST", "adminsecret", peer=peer))).allowed
        api = ControlPlaneAuth.from_config(cfg_of(api_key="serving-key-123"))
        assert run(authorize(api, None, fields("POST", "serving-key-123", peer=peer))).allowed
        cache = JwksCache(FakeIdp([idp.jwks()]))
        token = idp.token({"roles": ["admin"]})
        assert run(authorize(jwt_policy(), cache, fields("POST", token, peer=peer))).allowed


# --- JWT ---------------------------------------------------------------------------------------


def judge_jwt(idp: Idp, token: str, method: str = "GET", policy=None) -> cpauth.Decision:
    cache = JwksCache(FakeIdp([idp.jwks()]))
    return run(authorize(policy or jwt_policy(), cache, fields(method, token)))


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
def test_valid_tokens_of_each_key_type(idp: Idp) -> None:
    for key, alg in ((idp.rsa, "RS256"), (idp.ec, "ES256"), (idp.ed, "EdDSA")):
        decision = judge_jwt(idp, idp.token({"roles": "admin"}, alg=alg, key=key), "POST")
        assert decision.allowed, (alg, decision)
        assert decision.principal == cpauth.Principal("alice", "jwt", "admin")


def test_audience_may_be_a_list(idp: Idp) -> None:
    token = idp.token({"aud": ["other", AUDIENCE], "roles": "admin"})
    assert judge_jwt(idp, token, "POST").allowed


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 120}, "token expired"),
        ({"exp": None}, "missing claim exp"),
        ({"nbf": int(time.time()) + 600}, "token not yet valid"),
        ({"iss": "https://evil.example.com"}, "wrong issuer"),
        ({"aud": "another-service"}, "wrong audience"),
        ({"aud": ["a", "b"]}, "wrong audience"),
        ({"iss": None}, "missing claim iss"),
    ],
)
def test_bad_claims_get_401(idp: Idp, claims: dict[str, Any], reason: str) -> None:
    decision = judge_jwt(idp, idp.token(claims))
    assert (decision.status, decision.code) == (401, "unauthorized")
    assert decision.message == f"Invalid JWT: {reason}"
    assert decision.headers == (("www-authenticate", 'Bearer realm="control-plane"'),)


def test_leeway_lets_small_clock_skew_through(idp: Idp) -> None:
    now = int(time.time())
    assert judge_jwt(idp, idp.token({"exp": now - 10})).allowed
    assert judge_jwt(idp, idp.token({"nbf": now + 10})).allowed


def test_alg_none_and_hs256_with_the_public_key_fail(idp: Idp) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300, "roles": "admin"}
    payload = b64(json.dumps(claims).encode())
    none_token = b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode()) + "." + payload + "."
    decision = judge_jwt(idp, none_token, "POST")
    assert (
        decision.status == 401
        and decision.message == "Invalid JWT: algorithm 'none' is not allowed"
    )
    # HS/RS confusion: HS256 with the RSA public key (PEM and JWK forms) as the HMAC secret.
    for secret in (idp.rsa.as_pem(private=False), json.dumps(idp.jwks()["keys"][0]).encode()):
        head = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
        signing_input = f"{head}.{payload}".encode()
        sig = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
        decision = judge_jwt(idp, f"{head}.{payload}.{sig}", "POST")
        assert decision.status == 401
        assert decision.message == "Invalid JWT: algorithm 'HS256' is not allowed"


def test_a_token_whose_algorithm_is_not_its_keys_fails(idp: Idp) -> None:
    # PS256 signed by the RSA key whose JWK says alg RS256: Rust refuses the mismatch.
    private = {k: v for k, v in idp.rsa.as_dict(private=True).items() if k != "alg"}
    token = idp.token({"roles": "admin"}, alg="PS256", key=RSAKey.import_key(private))
    decision = judge_jwt(idp, token, "POST")
    assert decision.status == 401 and "algorithm mismatch" in decision.message


def test_bad_signature_and_garbage(idp: Idp) -> None:
    other = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS256"})
    forged = idp.token({"roles": "admin"}, key=other)
    decision = judge_jwt(idp, forged, "POST")
    assert decision.status == 401 and decision.message.startswith("Invalid JWT: signature")
    garbage = judge_jwt(idp, "a.b.c")
    assert (garbage.status, garbage.message) == (401, "Invalid JWT: malformed token")
    # Not three parts: tried as a control-plane key, as Rust does.
    policy = jwt_policy(keys=KEYS)
    assert judge_jwt(idp, "adminsecret", "POST", policy).principal.id == "k1"
    assert judge_jwt(idp, "nope", "POST", policy).message == "Invalid authentication token"


def test_role_from_claims_as_rust() -> None:
    mapping = {"Gateway.Admin": "admin", "Gateway.User": "user"}
    assert role_from_claims({"roles": ["x", "Gateway.Admin"]}, mapping) == "admin"
    assert role_from_claims({"groups": ["Gateway.Admin"]}, mapping) == "admin"
    assert role_from_claims({"role": "Gateway.User"}, mapping) == "user"
    assert role_from_claims({"roles": ["Gateway.Other"]}, mapping) == "user"
    # The role claim ("roles") present: the alternates are not read.
    assert role_from_claims({"roles": [], "groups": ["Gateway.Admin"]}, mapping) == "user"
    assert role_from_claims({"roles": "admin"}, {}) == "admin"
    assert role_from_claims({"roles": "Gateway.Admin"}, {}) == "user"
    assert role_from_claims({}, {}) == "user"


def test_token_without_a_mapped_role_may_read_not_change(idp: Idp) -> None:
    """Rust defaults such a token to role user: GET 200, changes 403 (not 401)."""
    policy = jwt_policy({"Gateway.Admin": "admin"})
    token = idp.token({"groups": ["Somebody.Else"]})
    assert judge_jwt(idp, token, "GET", policy).allowed
    denied = judge_jwt(idp, token, "DELETE", policy)
    assert denied.status == 403 and denied.principal.auth_method == "jwt"
    admin = idp.token({"groups": ["Gateway.Admin"]})
    assert judge_jwt(idp, admin, "DELETE", policy).allowed


# --- the JWKS cache ----------------------------------------------------------------------------


def test_unknown_kid_triggers_exactly_one_refresh(idp: Idp) -> None:
    fetch, clock = FakeIdp([idp.jwks()]), Clock()
    cache = JwksCache(fetch, clock=clock, min_refetch=10.0)
    policy = jwt_policy()
    good = idp.token({"roles": "admin"})
    assert run(authorize(policy, cache, fields("GET", good))).allowed
    assert fetch.calls == 1
    stranger = RSAKey.generate_key(2048, parameters={"kid": "random-kid-1", "alg": "RS256"})
    denied = run(authorize(policy, cache, fields("GET", idp.token(key=stranger))))
    assert denied.status == 401 and "no signing key" in denied.message
    assert fetch.calls == 2  # one refresh
    for n in range(5):  # more random kids inside the window: no more fetches
        other = RSAKey.generate_key(2048, parameters={"kid": f"random-{n}", "alg": "RS256"})
        assert run(authorize(policy, cache, fields("GET", idp.token(key=other)))).status == 401
    assert fetch.calls == 2
    assert run(authorize(policy, cache, fields("GET", good))).allowed  # known kid: no fetch
    clock.now += 10.0
    assert run(authorize(policy, cache, fields("GET", idp.token(key=stranger)))).status == 401
    assert fetch.calls == 3


def test_rotated_key_is_found_by_the_refresh(idp: Idp) -> None:
    new = RSAKey.generate_key(2048, parameters={"kid": "rsa-2", "alg": "RS256"})
    rotated = {"keys": [new.as_dict(private=False)]}
    fetch = FakeIdp([idp.jwks(), rotated])
    cache = JwksCache(fetch, clock=Clock())
    policy = jwt_policy()
    assert run(authorize(policy, cache, fields("GET", idp.token()))).allowed
    assert run(authorize(policy, cache, fields("GET", idp.token(key=new)))).allowed
    assert fetch.calls == 2


def test_ttl_refetch_and_stale_keys_on_failure(idp: Idp) -> None:
    fetch, clock = FakeIdp([idp.jwks()]), Clock()
    cache = JwksCache(fetch, clock=clock, ttl=100.0, min_refetch=10.0)
    policy = jwt_policy()
    token = idp.token()
    assert run(authorize(policy, cache, fields("GET", token))).allowed
    clock.now += 100.0
    fetch.down = True
    # The TTL ran out and the IDP is down: the stale keys still verify.
    assert run(authorize(policy, cache, fields("GET", token))).allowed
    assert fetch.calls == 2
    assert run(authorize(policy, cache, fields("GET", token))).allowed
    assert fetch.calls == 2  # no retry inside the back-off


def test_jwks_endpoint_down_gives_401_and_one_log_line_per_attempt(
    idp: Idp, caplog: pytest.LogCaptureFixture
) -> None:
    fetch, clock = FakeIdp([idp.jwks()]), Clock()
    fetch.down = True
    cache = JwksCache(fetch, clock=clock, min_refetch=10.0)
    policy = jwt_policy()
    token = idp.token({"roles": "admin"})
    with caplog.at_level(logging.ERROR, logger="smg.control"):
        for _ in range(5):
            decision = run(authorize(policy, cache, fields("POST", token)))
            assert (decision.status, decision.message) == (
                401,
                "Invalid JWT: signing keys unavailable",
            )
    assert fetch.calls == 1
    lines = [r.getMessage() for r in caplog.records if "JWKS fetch failed" in r.getMessage()]
    assert len(lines) == 1 and "ConnectionRefusedError" in lines[0]
    assert token not in caplog.text
    clock.now += 10.0
    fetch.down = False
    assert run(authorize(policy, cache, fields("POST", token))).allowed
    assert fetch.calls == 2


def test_algorithms_refused_before_any_fetch(idp: Idp) -> None:
    fetch = FakeIdp([idp.jwks()])
    cache = JwksCache(fetch)
    head = b64(json.dumps({"alg": "HS256", "kid": "whatever"}).encode())
    token = f"{head}.{b64(b'{}')}.{b64(b'sig')}"
    assert run(authorize(jwt_policy(), cache, fields("GET", token))).status == 401
    assert fetch.calls == 0


def test_concurrent_callers_share_one_fetch(idp: Idp) -> None:
    class SlowIdp(FakeIdp):
        async def __call__(self) -> dict[str, Any]:
            await asyncio.sleep(0.05)
            return await super().__call__()

    fetch = SlowIdp([idp.jwks()])
    cache = JwksCache(fetch)
    token = idp.token()

    async def many() -> list[cpauth.Decision]:
        return await asyncio.gather(
            *(authorize(jwt_policy(), cache, fields("GET", token)) for _ in range(10))
        )

    assert all(d.allowed for d in run(many()))
    assert fetch.calls == 1


def test_secret_keys_in_the_jwks_are_never_used(idp: Idp) -> None:
    """An `oct` key published in the JWKS must not verify anything (HS confusion again)."""
    document = {"keys": [{"kty": "oct", "kid": "hs", "k": b64(b"shared-secret-0123456789")}]}
    cache = JwksCache(FakeIdp([document]))
    head = b64(json.dumps({"alg": "HS256", "kid": "hs"}).encode())
    token = f"{head}.{b64(b'{}')}.{b64(b'x')}"
    assert run(authorize(jwt_policy(), cache, fields("GET", token))).status == 401


def test_jwks_url_problem() -> None:
    assert cpauth.jwks_url_problem("https://idp.example.com/keys") is None
    assert cpauth.jwks_url_problem("http://127.0.0.1:8080/keys") is None
    assert cpauth.jwks_url_problem("http://localhost/keys") is None
    assert cpauth.jwks_url_problem("http://idp.example.com/keys") is not None
    assert cpauth.jwks_url_problem("file:///etc/passwd") is not None
    assert cpauth.url_for_log("https://u:p@idp:8443/keys?x=1") == "https://idp:8443/keys"


# --- audit -------------------------------------------------------------------------------------


def test_audit_event_fields_and_outcomes() -> None:
    policy = ControlPlaneAuth.from_config(cfg_of(control_plane_api_keys=KEYS))
    ok = run(authorize(policy, None, fields("POST", "adminsecret")))
    event = cpauth.audit_event(ok, fields("POST", "adminsecret"), "/workers", 202)
    assert event == {
        "principal": "k1",
        "auth_method": "api_key",
        "role": "admin",
        "method": "POST",
        "path": "/workers",
        "outcome": "success",
        "status": 202,
        "request_id": "req-1",
        "peer": "10.1.2.3",
        "details": None,
    }
    failed = cpauth.audit_event(ok, fields("POST", "adminsecret"), "/workers", 400, "BAD_REQUEST")
    assert (failed["outcome"], failed["details"]) == ("failed", "BAD_REQUEST")
    denied = run(authorize(policy, None, fields("DELETE", "usersecret")))
    event = cpauth.audit_event(denied, fields("DELETE", "usersecret"), "/workers/x", 403)
    assert (event["principal"], event["role"], event["outcome"]) == ("k2", "user", "denied")
    anonymous = run(authorize(policy, None, fields("GET", "wrong")))
    event = cpauth.audit_event(anonymous, fields("GET", "wrong"), "/workers", 401)
    assert (event["principal"], event["auth_method"], event["outcome"]) == (
        "unauthenticated",
        "none",
        "denied",
    )
    assert "wrong" not in json.dumps(event) and "usersecret" not in json.dumps(event)


def test_audit_line_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    decision = cpauth.Decision(cpauth.UNAUTHENTICATED, 401, "unauthorized", "x")
    event = cpauth.audit_event(decision, fields("GET"), "/workers\n2026 forged line", 401)
    with caplog.at_level(logging.INFO, logger="smg.audit"):
        cpauth.write_audit(event)
    (record,) = caplog.records
    assert record.name == "smg.audit" and record.getMessage() == "control_plane_audit"
    assert record.path == "/workers\n2026 forged line"  # a field, escaped by the formatters
    for formatter in (JsonFormatter(), TextFormatter()):
        assert "\n" not in formatter.format(record)


# --- configuration and posture -----------------------------------------------------------------


def test_jwt_issuer_needs_an_audience() -> None:
    with pytest.raises(ConfigError, match="needs --jwt-audience"):
        load_config(["--jwt-issuer", ISSUER], env={})


def test_posture_counts_control_plane_credentials() -> None:
    keyed = posture_warning(cfg_of(host="127.0.0.1", control_plane_api_keys=KEYS))
    assert "control_plane=" not in keyed
    assert 'data_plane="OPEN: ' in keyed
    jwt_only = posture_warning(
        load_config(["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE], env={})
    )
    assert "control_plane=" not in jwt_only and 'data_plane="OPEN: ' in jwt_only
    tenant = posture_warning(cfg_of(host="127.0.0.1", tenant_api_key=["t:tenant-key"]))
    assert "control_plane=" not in tenant
