"""External workers (provider APIs) on the data plane: whose key goes upstream, which
candidate rows a request may use, the provider's body transform, refresh on a routing miss
and the /v1/models BYOK fan-out.

The data plane builds an `External` only once the directory lists an external worker
(`DirectoryEntry.provider` set); until then every path here costs one None check, and a
self-hosted row costs one `entry.provider is None` check when its request head is built.

The key rule (smg's, stricter than the Rust SMG 1.13, which forwards the caller's
`Authorization` as it came, the gateway's own key included):
- a caller's key that is not a gateway key (--api-key, tenant keys) is the caller's own
  ("bring your own key") and goes to the external worker the request routes to;
- a key whose form names its provider (`providers.key_provider`) goes only to workers of
  that provider: other providers' rows are left out of the candidates;
- otherwise the worker's own `api_key`, else no key. A gateway key never leaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from smg import ipc, providers
from smg.dataplane import auth

if TYPE_CHECKING:
    from smg.shm.directory import DirectoryEntry

log = logging.getLogger("smg.dataplane")

# The control plane bounds a refresh and a fan-out to 5 s; the call waits a little longer.
IPC_TIMEOUT = 6.0
MISMATCH_CODE = "provider_key_mismatch"
AMBIGUOUS_CODE = "ambiguous_provider"


def bearer_token(authorization: bytes | None) -> bytes | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def _is_gateway_key(key: bytes, gateway_keys: tuple[bytes, ...]) -> bool:
    return bool(gateway_keys) and auth.judge(gateway_keys, key) is auth.Verdict.OK


def byok_key(
    provider: str | None,
    authorization: bytes | None,
    x_api_key: bytes | None,
    gateway_keys: tuple[bytes, ...],
) -> bytes | None:
    """The caller's own key for a worker of `provider`: the first of the presented keys
    that is not a gateway key, `x-api-key` first for Anthropic (as the Rust SMG prefers
    it there), `Authorization: Bearer` first otherwise. With --api-key set, a caller
    authenticates with the Bearer gateway key and brings its own key as `x-api-key`."""
    bearer = bearer_token(authorization)
    api_key = x_api_key.strip() if x_api_key is not None else None
    # The provider's own header first (Anthropic's x-api-key, Gemini's x-goog-api-key, both
    # read as `x_api_key`), as the Rust SMG prefers them there.
    own = providers.key_header(provider) is not None
    order = (api_key, bearer) if own else (bearer, api_key)
    for key in order:
        if key and not _is_gateway_key(key, gateway_keys):
            return key
    return None


def credential_lines(
    provider: str, byok: bytes | None, worker_key: str | None, caller_version: bool
) -> bytes:
    """The credential header lines for an external worker: the caller's own key, else
    the worker's, in the provider's form (`x-api-key` plus `anthropic-version` when the
    caller sent none, for Anthropic; `Authorization: Bearer` otherwise)."""
    key = byok.decode("latin-1") if byok is not None else worker_key
    headers = providers.credential_headers(provider, key, send_version=not caller_version)
    # Header names go up in lower case, as every other line this proxy writes.
    return b"".join(b"%s: %s\r\n" % (n.lower().encode(), v.encode("latin-1")) for n, v in headers)


def transform_body(provider: str, path: str, body: bytes) -> bytes:
    """The body as `provider` takes it (`providers.transform_request`): decoded and
    encoded again only for a known provider, and only when something changed."""
    if provider not in providers.KNOWN_PROVIDERS or not body:
        return body
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body  # not JSON: the worker judges it, as it would any other body
    if not isinstance(decoded, dict) or not providers.transform_request(provider, path, decoded):
        return body
    return orjson.dumps(decoded)


def filter_rows(
    entries: dict[int, DirectoryEntry],
    rows: Sequence[int],
    model: str | None,
    authorization: bytes | None,
    x_api_key: bytes | None,
    gateway_keys: tuple[bytes, ...],
) -> tuple[list[int], str, str]:
    """The candidate rows a request may use, and (error code, message) when a filter
    left none of them (then the list is empty).

    1. Several external providers among the candidates (the Rust SMG's
       filter_by_provider): keep the rows of the provider the model name suggests
       (`providers.provider_from_model`); self-hosted rows stay.
    2. A caller's key whose form names a provider: external rows of other providers go."""
    kept: list[int] = []
    found: set[str] = set()
    for row in rows:
        provider = entries[row].provider
        if provider is not None:
            found.add(provider)
    if len(found) > 1:
        target = providers.provider_from_model(model) if model else None
        kept = [row for row in rows if entries[row].provider in (None, target)]
        if not kept and target is None:
            caller = byok_key(None, authorization, x_api_key, gateway_keys)
            if caller is None or providers.key_provider(caller.decode("latin-1")) is not None:
                # Each worker sends its own key, or the key's form says where it may go
                # (step 2): nothing can cross, so the providers may share the model
                # (failover between two hosts of one open model).
                kept = list(rows)
        if not kept:
            names = ", ".join(sorted(found))
            what = f"model '{model}' is" if model else "requests without a model are"
            return (
                [],
                AMBIGUOUS_CODE,
                f"{what} served by several providers ({names}); name a model whose name "
                "says its provider",
            )
    else:
        kept = list(rows)
    if not found:
        return kept, "", ""
    allowed: list[int] = []
    named: str | None = None
    for row in kept:
        provider = entries[row].provider
        if provider is not None:
            key = byok_key(provider, authorization, x_api_key, gateway_keys)
            owner = providers.key_provider(key.decode("latin-1")) if key else None
            if owner is not None and owner != provider:
                named = owner
                continue
        allowed.append(row)
    if not allowed and named is not None:
        serving = ", ".join(sorted({entries[row].provider or "" for row in kept}))
        return (
            [],
            MISMATCH_CODE,
            f"the API key presented is for provider {named}, but model '{model}' is served "
            f"by {serving}: a key is only sent to its own provider",
        )
    return allowed, "", ""


def merge_models(local: list[dict[str, Any]], upstream: Any) -> list[dict[str, Any]]:
    """The directory's model objects followed by the fan-out's, one per id."""
    seen = {item["id"] for item in local}
    merged = list(local)
    if not isinstance(upstream, dict) or not isinstance(upstream.get("data"), list):
        return merged
    for item in upstream["data"]:
        if not isinstance(item, dict):
            continue
        model_id = item.get("id")
        if isinstance(model_id, str) and model_id and model_id not in seen:
            seen.add(model_id)
            merged.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": item.get("created") if isinstance(item.get("created"), int) else 0,
                    "owned_by": str(item.get("owned_by") or "external"),
                }
            )
    return merged


class External:
    """The I/O half: the control-plane calls a routing miss and /v1/models make, with one
    call in flight per (provider, credential) shared by every request that waits on it."""

    def __init__(self, root_pid: int, gateway_keys: tuple[bytes, ...]) -> None:
        self.address = ipc.control_plane_address(root_pid)
        self.gateway_keys = gateway_keys
        # The request being routed again after its refresh (it is not refreshed twice).
        self.rerouted: object | None = None
        self._refreshing: dict[tuple[str | None, str | None], asyncio.Future[Any]] = {}

    def caller_key(self, authorization: bytes | None, x_api_key: bytes | None) -> bytes | None:
        """The caller's own key, not for one provider in particular (refresh, fan-out)."""
        return byok_key(None, authorization, x_api_key, self.gateway_keys)

    async def refresh(self, credential: bytes | None) -> bool:
        """Ask the control plane to re-discover the external workers the credential may go
        to (its provider's when its form names one, else all); True when a worker's model
        list changed. Concurrent misses with the same credential share the call."""
        text = credential.decode("latin-1") if credential else None
        provider = providers.key_provider(text) if text else None
        slot = (provider, text)
        pending = self._refreshing.get(slot)
        if pending is None:
            message = {"kind": "external_refresh", "provider": provider, "credential": text}
            pending = asyncio.ensure_future(self._call(message))
            self._refreshing[slot] = pending
            pending.add_done_callback(lambda _f: self._refreshing.pop(slot, None))
        answer = await asyncio.shield(pending)
        return isinstance(answer, dict) and bool(answer.get("refreshed"))

    async def models(self, credential: bytes, header: str) -> Any:
        """The models the caller's key sees at the external workers it may go to."""
        message = {
            "kind": "external_models",
            "credential": credential.decode("latin-1"),
            "header": header,
        }
        return await self._call(message)

    async def _call(self, message: dict[str, Any]) -> Any:
        try:
            return await ipc.call(self.address, message, IPC_TIMEOUT)
        except Exception as exc:  # the request goes on with what the directory has
            log.warning("%s call to the control plane failed: %r", message["kind"], exc)
            return None
