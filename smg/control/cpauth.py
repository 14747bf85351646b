"""Who may call the admin routes: the decision, JWT verification, the JWKS cache and the
audit line. Pure code (the JWKS cache takes its fetch function and clock), tested directly;
the control plane (`ControlPlane.on_ipc`) runs it for every admin call.

The rules follow the Rust SMG 1.13 (crates/auth/src/middleware.rs, jwt.rs, audit.rs and
model_gateway/src/server.rs):

- With `--control-plane-api-keys` or JWT (`--jwt-issuer` + `--jwt-audience`) configured,
  only those open the admin routes (`--api-key` no longer does), from any address. The
  credential is `Authorization: Bearer <token>`. A JWT is tried first; a token that fails
  as a JWT and has three dot-separated parts is refused as a JWT (it is not tried as a key).
  Role `admin` may use every method, role `user` only GET and HEAD (403 otherwise).
- Else with `--api-key`: that key (Bearer or x-api-key, as on the serving routes) opens
  them, role admin, from any address; with only `--tenant-api-key` they answer 401 to all.
- Else (no credential configured): loopback peers only (the socket's address, never a
  header such as X-Forwarded-For), as before.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import ipaddress
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from joserfc import jws, jwt
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
    SecurityWarning,
)
from joserfc.jwk import KeySet

from smg.config import control_plane_keys, jwt_role_mapping, tenant_keys
from smg.dataplane import auth as dp_auth

if TYPE_CHECKING:
    from joserfc.jwk import Key

    from smg.config import GatewayConfig

log = logging.getLogger("smg.control")
audit_log = logging.getLogger("smg.audit")

ADMIN = "admin"
USER = "user"
READ_METHODS = frozenset({"GET", "HEAD"})

# Asymmetric signatures only: no `none`, no HS* (an HS256 token "signed" with the IDP's
# public key as the HMAC secret must fail). Rust 1.13 allows RS256/384/512 and ES256/384;
# smg also takes PS*, ES512 and EdDSA, which IDPs issue too.
ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "Ed25519",  # RFC 9864's fully specified names for EdDSA
    "Ed448",
)
# "EdDSA" is accepted on purpose (IDPs still issue it); joserfc's deprecation warning for it
# (RFC 9864) would otherwise land in the log at the first such token.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
LEEWAY_SECS = 30  # clock skew allowed on exp/nbf/iat (Rust's default)
JWKS_TTL_SECS = 3600.0  # a key set is re-fetched after this long (Rust's default)
# At most one JWKS fetch per this many seconds beyond the TTL-driven ones: a refresh for an
# unknown `kid`, or a retry after a failed fetch. Random kids cannot hammer the IDP.
JWKS_MIN_REFETCH_SECS = 10.0
MAX_JWKS_BYTES = 1 << 20  # Rust's limit on the JWKS / discovery document
_AUDIT_FIELD_MAX = 1024  # Rust's sanitize_for_log limit

# The Rust SMG 1.13's answers (it sends them as text/plain; smg in the OpenAI error shape).
CHALLENGE = ("www-authenticate", 'Bearer realm="control-plane"')
MISSING_MESSAGE = "Missing or invalid Authorization header"
INVALID_MESSAGE = "Invalid authentication token"
FORBIDDEN_MESSAGE = "Admin role required for this control plane operation"
LOOPBACK_MESSAGE = "admin routes answer only clients on loopback"


class Mode(enum.Enum):
    CONTROL_PLANE = "control_plane"  # --control-plane-api-keys and/or JWT
    API_KEY = "api_key"  # --api-key (role admin)
    CLOSED = "closed"  # --tenant-api-key alone: nothing opens the admin routes
    LOOPBACK = "loopback"  # no credential configured


@dataclass(frozen=True)
class Principal:
    id: str  # key id, JWT subject, or "unauthenticated"
    auth_method: str  # "api_key", "jwt" or "none"
    role: str


UNAUTHENTICATED = Principal("unauthenticated", "none", USER)


@dataclass(frozen=True)
class Decision:
    """The verdict on one admin call: `status` 0 lets it run; else the answer to send."""

    principal: Principal
    status: int = 0
    code: str = ""
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    details: str | None = None  # why, for the audit line (never a credential)

    @property
    def allowed(self) -> bool:
        return self.status == 0


@dataclass(frozen=True)
class AuthFields:
    """What the data plane passes with an admin call (the credential travels only on the
    gateway's own local channel and is never logged)."""

    method: str  # the client's method (HEAD stays HEAD)
    authorization: str | None = None
    x_api_key: str | None = None
    peer: str = ""
    request_id: str = ""

    @classmethod
    def from_message(cls, message: Any, fallback_method: str) -> AuthFields:
        raw = message.get("auth") if isinstance(message, dict) else None
        if not isinstance(raw, dict):
            # No credential passed: judged as a request presenting none.
            return cls(method=fallback_method)

        def text(name: str) -> str | None:
            value = raw.get(name)
            return value if isinstance(value, str) else None

        return cls(
            method=text("method") or fallback_method,
            authorization=text("authorization"),
            x_api_key=text("x_api_key"),
            peer=text("peer") or "",
            request_id=text("request_id") or "",
        )


def bearer_token(value: str | None) -> str | None:
    """The token of `Bearer <token>` (scheme case-insensitive, as Rust's bearer_token)."""
    if value is None:
        return None
    scheme, sep, rest = value.partition(" ")
    if not sep or scheme.lower() != "bearer":
        return None
    token = rest.strip(" ")
    return token or None


def role_allows(role: str, method: str) -> bool:
    """`admin` may use every method, `user` only the read-only ones."""
    return role == ADMIN or method in READ_METHODS


def is_loopback(host: str) -> bool:
    """Whether a socket peer address is a loopback address (IPv4-mapped IPv6 included)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# --- JWT ---------------------------------------------------------------------------------------


class JwtError(Exception):
    """A token refused; the message is safe to answer and log (it never holds the token)."""


class JwksUnavailable(JwtError):
    """The key set could not be had (IDP down, bad answer): such tokens get 401."""


@dataclass(frozen=True)
class JwtSettings:
    issuer: str
    audience: str
    role_mapping: dict[str, str]
    leeway: int = LEEWAY_SECS
    algorithms: tuple[str, ...] = ALGORITHMS


# Where the role is read from, in Rust's order: its role claim ("roles"), else the
# alternates role, roles, groups, group (all of those that are present).
_ROLE_CLAIM = "roles"
_ROLE_ALTERNATES = ("role", "roles", "groups", "group")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def role_from_claims(claims: dict[str, Any], mapping: dict[str, str]) -> str:
    """The gateway role of a verified token, as Rust's extract_role: without a mapping a
    claim value `admin`/`user` is taken as it is; with one, the first mapped value wins. A
    token with no (mapped) role is a `user` (it may read, not change): Rust does the same."""
    if _ROLE_CLAIM in claims:
        values = _strings(claims[_ROLE_CLAIM])
    else:
        values = [v for name in _ROLE_ALTERNATES for v in _strings(claims.get(name))]
    if not mapping:
        for value in values:
            if value.lower() in (ADMIN, USER):
                return value.lower()
        return USER
    for value in values:
        if value in mapping:
            return mapping[value]
    return USER


def subject(claims: dict[str, Any]) -> str:
    for name in ("sub", "email", "preferred_username"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return "unknown"


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS (read with joserfc; nothing verified yet)."""
    try:
        header = jws.extract_compact(token.encode("ascii")).headers()
    except (JoseError, ValueError, UnicodeError) as exc:
        raise JwtError("malformed token") from exc
    if not isinstance(header, dict):
        raise JwtError("malformed token")
    return dict(header)


def check_header(header: dict[str, Any], settings: JwtSettings) -> tuple[str, str]:
    """(kid, alg) of a header the gateway may verify; refused before any key is fetched."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in settings.algorithms:
        raise JwtError(f"algorithm {str(alg)[:20]!r} is not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtError("token header missing 'kid'")  # Rust requires it too
    return kid, alg


def verify_jwt(token: str, key: Key, alg: str, settings: JwtSettings, now: int) -> dict[str, Any]:
    """The claims of `token` once joserfc has checked its signature with `key` and its
    exp (required, as Rust's jsonwebtoken does), nbf, iat, iss and aud (a list may hold
    it) with the leeway."""
    key_alg = key.get("alg")
    if key_alg is not None and key_alg != alg:
        # Rust: the token's algorithm must be the key's (no algorithm confusion).
        raise JwtError(f"algorithm mismatch: token uses {alg} but the key is for {key_alg}")
    try:
        decoded = jwt.decode(token, key, algorithms=[alg])
    except JoseError as exc:
        raise JwtError(f"signature or format rejected ({exc.error})") from exc
    registry = jwt.JWTClaimsRegistry(
        now=now,
        leeway=settings.leeway,
        exp={"essential": True},
        iss={"essential": True, "value": settings.issuer},
        aud={"essential": True, "value": settings.audience},
    )
    try:
        registry.validate(decoded.claims)
    except ExpiredTokenError as exc:
        raise JwtError("token expired") from exc
    except MissingClaimError as exc:
        raise JwtError(f"missing claim {exc.claim}") from exc
    except InvalidClaimError as exc:
        claim = exc.claim
        if claim == "iss":
            raise JwtError("wrong issuer") from exc
        if claim == "aud":
            raise JwtError("wrong audience") from exc
        if claim == "nbf":
            raise JwtError("token not yet valid") from exc
        raise JwtError(f"invalid claim {claim}") from exc
    return decoded.claims


def jwks_url_problem(url: str) -> str | None:
    """Why the gateway will not fetch keys from `url`, or None. As Rust: https, or http to
    loopback only (an IDP's keys over plain http to another host could be swapped)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        if host == "localhost" or is_loopback(host):
            return None
        return "only https:// URLs are allowed for JWKS endpoints (http:// on loopback only)"
    return "not an http(s):// URL"


def url_for_log(url: str) -> str:
    """`url` without any user:password part and query (never logged)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class JwksCache:
    """The IDP's key set: fetched on first need and kept `ttl` seconds; fetched again at
    once for an unknown `kid`, but such refreshes (and retries after a failed fetch) happen
    at most once per `min_refetch` seconds, so random kids cannot hammer the IDP. Concurrent
    callers share one fetch. A failed fetch is logged once (one line per attempt, and
    attempts are rate-limited); stale keys are kept until a fetch succeeds."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[dict[str, Any]]],
        clock: Callable[[], float] = time.monotonic,
        ttl: float = JWKS_TTL_SECS,
        min_refetch: float = JWKS_MIN_REFETCH_SECS,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self.ttl = ttl
        self.min_refetch = min_refetch
        self.keys: KeySet | None = None
        self.fetched_at = 0.0  # last successful fetch
        self.failed_at: float | None = None  # last failed fetch
        self.kid_refresh_at: float | None = None  # last refresh for an unknown kid
        self.last_error = ""
        self.fetches = 0  # attempts, for tests and logs
        self._inflight: asyncio.Future[None] | None = None

    def _recent(self, at: float | None, now: float) -> bool:
        return at is not None and now - at < self.min_refetch

    async def key(self, kid: str) -> Key:
        """The key for `kid`; raises JwksUnavailable (no key set) or JwtError (no such key)."""
        now = self._clock()
        if (self.keys is None or now - self.fetched_at >= self.ttl) and not self._recent(
            self.failed_at, now
        ):
            await self._refresh()
        if self.keys is None:
            # The cause (addresses of the IDP) is in the log, not in the answer.
            raise JwksUnavailable("signing keys unavailable")
        found = self._find(kid)
        if found is not None:
            return found
        now = self._clock()
        if not self._recent(self.kid_refresh_at, now) and not self._recent(self.failed_at, now):
            self.kid_refresh_at = now
            log.warning("JWT key id %r is not in the cached key set; fetching it again", kid[:64])
            await self._refresh()
            found = self._find(kid)
            if found is not None:
                return found
        raise JwtError(f"no signing key for kid {kid[:64]!r}")

    def _find(self, kid: str) -> Key | None:
        if self.keys is None:
            return None
        for key in self.keys.keys:
            if key.kid == kid:
                return key
        return None

    async def _refresh(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        self.fetches += 1
        try:
            document = await self._fetch()
            keys = KeySet.import_key_set(_public_keys(document))
        except Exception as exc:  # the IDP's trouble must never reach the caller as a crash
            self.failed_at = self._clock()
            self.last_error = _safe_error(exc)
            log.error("JWKS fetch failed: %s", self.last_error)
        else:
            self.keys = keys
            self.fetched_at = self._clock()
            self.failed_at = None
            self.last_error = ""
        finally:
            self._inflight.set_result(None)
            self._inflight = None


def _public_keys(document: Any) -> Any:
    """The signature keys of a JWKS document (secret `oct` keys are dropped: an HS key
    must never verify an operator's token)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS document has no 'keys' list")
    keys = [
        k
        for k in document["keys"]
        if isinstance(k, dict)
        and k.get("kty") in ("RSA", "EC", "OKP")
        and k.get("use", "sig") == "sig"
        and "d" not in k  # a private key published by mistake is not used either
    ]
    return {"keys": keys}


def _safe_error(exc: BaseException) -> str:
    # The exception's class and message, cut short; a JWKS URL carries no secret, but any
    # userinfo in it is never printed (fetch functions raise without it).
    text = str(exc).replace("\n", " ")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    id: str
    role: str
    secret: bytes


class ControlPlaneAuth:
    """The admin-route policy of one configuration."""

    def __init__(
        self,
        mode: Mode,
        keys: Iterable[_Key] = (),
        api_key: bytes | None = None,
        jwt_settings: JwtSettings | None = None,
        audit: bool = False,
    ) -> None:
        self.mode = mode
        self.keys = tuple(keys)
        self.api_key = api_key
        self.jwt = jwt_settings
        self.audit = audit

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> ControlPlaneAuth:
        keys = [_Key(k.id, k.role, k.key.encode("latin-1")) for k in control_plane_keys(cfg)]
        settings = None
        if cfg.jwt_issuer and cfg.jwt_audience:
            settings = JwtSettings(cfg.jwt_issuer, cfg.jwt_audience, jwt_role_mapping(cfg))
        if keys or settings is not None:
            mode = Mode.CONTROL_PLANE
        elif cfg.api_key:
            mode = Mode.API_KEY
        elif tenant_keys(cfg):
            mode = Mode.CLOSED
        else:
            mode = Mode.LOOPBACK
        api_key = cfg.api_key.encode("latin-1") if cfg.api_key else None
        return cls(mode, keys, api_key, settings, cfg.control_plane_audit_enabled)

    def match_key(self, token: str) -> _Key | None:
        """The control-plane key equal to `token`; every key is compared in constant time, so
        the time taken does not tell which one (or whether one) matched."""
        presented = token.encode("latin-1", "replace")
        found: _Key | None = None
        for key in self.keys:
            if hmac.compare_digest(key.secret, presented) and found is None:
                found = key
        return found

    def judge_without_jwt(self, fields: AuthFields) -> Decision | None:
        """The decision for every case that needs no key set; None when the token must be
        verified as a JWT first (then `judge_token` finishes)."""
        if self.mode is Mode.LOOPBACK:
            if is_loopback(fields.peer):
                return Decision(Principal("unauthenticated", "none", ADMIN), details="loopback")
            return Decision(
                UNAUTHENTICATED,
                403,
                "forbidden",
                LOOPBACK_MESSAGE,
                details=f"peer {fields.peer[:64]} is not loopback",
            )
        if self.mode in (Mode.API_KEY, Mode.CLOSED):
            presented = dp_auth.presented_key(
                _latin1(fields.authorization), _latin1(fields.x_api_key)
            )
            accepted = (self.api_key,) if self.mode is Mode.API_KEY and self.api_key else ()
            verdict = dp_auth.judge(accepted, presented)
            if verdict is dp_auth.Verdict.OK:
                return Decision(Principal("api_key", "api_key", ADMIN))
            missing = verdict is dp_auth.Verdict.MISSING
            challenge = (
                'Bearer realm="data-plane"'
                if missing
                else 'Bearer realm="data-plane", error="invalid_token"'
            )
            return Decision(
                UNAUTHENTICATED,
                401,
                "invalid_api_key",
                dp_auth.MISSING_MESSAGE if missing else dp_auth.INVALID_MESSAGE,
                (("www-authenticate", challenge),),
                details="missing API key" if missing else "invalid API key",
            )
        token = bearer_token(fields.authorization)
        if token is None:
            return Decision(
                UNAUTHENTICATED, 401, "unauthorized", MISSING_MESSAGE, (CHALLENGE,), MISSING_MESSAGE
            )
        if self.jwt is not None:
            return None
        return self.judge_key(token, fields.method)

    def judge_key(self, token: str, method: str) -> Decision:
        key = self.match_key(token)
        if key is None:
            return Decision(
                UNAUTHENTICATED, 401, "unauthorized", INVALID_MESSAGE, (CHALLENGE,), "Invalid token"
            )
        return self.judge_role(Principal(key.id, "api_key", key.role), method)

    @staticmethod
    def judge_role(principal: Principal, method: str) -> Decision:
        if role_allows(principal.role, method):
            return Decision(principal)
        return Decision(principal, 403, "forbidden", FORBIDDEN_MESSAGE, (), FORBIDDEN_MESSAGE)

    def judge_jwt_failure(self, token: str, method: str, error: JwtError) -> Decision:
        """Rust: a token with three dot-separated parts is a JWT and refused as one; any
        other token is tried as a control-plane key."""
        if token.count(".") == 2:
            message = f"Invalid JWT: {error}"
            return Decision(UNAUTHENTICATED, 401, "unauthorized", message, (CHALLENGE,), message)
        return self.judge_key(token, method)


async def authorize(
    policy: ControlPlaneAuth,
    jwks: JwksCache | None,
    fields: AuthFields,
    now: Callable[[], float] = time.time,
) -> Decision:
    """The whole decision for one admin call (JWT keys fetched through `jwks`)."""
    decided = policy.judge_without_jwt(fields)
    if decided is not None:
        return decided
    settings = policy.jwt
    token = bearer_token(fields.authorization)
    assert settings is not None and token is not None
    try:
        if jwks is None:
            raise JwksUnavailable("signing keys unavailable")
        kid, alg = check_header(unverified_header(token), settings)
        key = await jwks.key(kid)
        claims = verify_jwt(token, key, alg, settings, int(now()))
    except JwtError as exc:
        return policy.judge_jwt_failure(token, fields.method, exc)
    principal = Principal(
        subject(claims)[:256], "jwt", role_from_claims(claims, settings.role_mapping)
    )
    return policy.judge_role(principal, fields.method)


# --- audit -------------------------------------------------------------------------------------


def _clip(value: str) -> str:
    return value if len(value) <= _AUDIT_FIELD_MAX else value[:_AUDIT_FIELD_MAX] + "...[TRUNCATED]"


def audit_event(
    decision: Decision, fields: AuthFields, path: str, status: int, details: str | None = None
) -> dict[str, Any]:
    """One audit record: who (principal, auth_method, role), what (method, path), the
    outcome (`denied` by the gateway's rules; `success`, or `failed` when the call itself
    answered 4xx/5xx), with the request id and the status. Never a credential."""
    if not decision.allowed:
        outcome = "denied"
    elif status < 400:
        outcome = "success"
    else:
        outcome = "failed"
    return {
        "principal": _clip(decision.principal.id),
        "auth_method": decision.principal.auth_method,
        "role": decision.principal.role,
        "method": _clip(fields.method),
        "path": _clip(path),
        "outcome": outcome,
        "status": status,
        "request_id": _clip(fields.request_id) or None,
        "peer": _clip(fields.peer) or None,
        "details": _clip(details or decision.details or "") or None,
    }


def write_audit(event: dict[str, Any]) -> None:
    """One line on logger `smg.audit`: message `control_plane_audit`, the event as fields
    (top-level keys with --log-json, quoted logfmt `key=value` otherwise: either way every
    control character is escaped, so a path cannot forge a line)."""
    audit_log.info("control_plane_audit", extra=event)


def _latin1(value: str | None) -> bytes | None:
    return None if value is None else value.encode("latin-1", "replace")
