"""Thin async probes of one worker over HTTP, on an `aiohttp.ClientSession` the caller owns.

Nothing here raises: a timeout, a refused connection, a bad URL, a closed session, a
non-2xx answer or an unusable body becomes False / None / status 0, logged at debug level.
Cancellation still propagates. Every request carries `Authorization: Bearer <api_key>` when
a key is given, reads at most `MAX_BODY_BYTES` of the answer (a longer body is unusable),
and does not follow redirects (a 3xx is not healthy, and the key is not sent elsewhere).
`timeout_s` bounds each request as a whole (aiohttp `ClientTimeout(total=...)`).

What is probed (Rust SMG `model_gateway/src/worker/worker.rs`, `worker/monitor.rs`,
`workflow/steps/local/detect_backend.rs`, `discover_metadata.rs`):

- health: `GET <endpoint>` (default `/health`), a 2xx status is healthy; like Rust, only
  the status line counts, the body is not read;
- load: SGLang `GET /v1/loads?include=core`, then `/metrics`, then `/get_load`; vLLM
  `GET /metrics`; any other engine: the SGLang order, with `/metrics` read by whichever
  engine's gauges it has. Nothing is cached here: `scrape_load_from` says which endpoint
  answered so the caller can pass it back as `endpoints=` next time;
- identity: `GET /v1/models`, `/version`, `/server_info` (404 → `/get_server_info`);
- cache: `POST /flush_cache`; profilers: `POST /start_profile`, `POST /stop_profile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
import orjson

from smg.control import load_parsers as lp
from smg.policies.base import BackendLoad

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024  # a vLLM /metrics with many histograms is well under this

LOADS_V1 = "/v1/loads"
METRICS = "/metrics"
GET_LOAD = "/get_load"

_LOAD_ENDPOINTS: dict[str, tuple[str, ...]] = {
    "sglang": (LOADS_V1, METRICS, GET_LOAD),
    "vllm": (METRICS,),
}
_DEFAULT_LOAD_ENDPOINTS = (LOADS_V1, METRICS, GET_LOAD)

# Only the core section: the other /v1/loads sections cost the engine work we do not use.
_QUERY = {LOADS_V1: "?include=core"}


class BackendInfo(msgspec.Struct):
    engine: str  # "sglang" | "vllm" | "openai" | "unknown"
    model_ids: list[str] = msgspec.field(default_factory=list)
    owned_by: str | None = None
    server_info: dict[str, Any] = msgspec.field(default_factory=dict)
    version: str | None = None  # vLLM /version, or SGLang server_info["version"]
    max_model_len: int | None = None


class _BodyTooLarge(Exception):
    pass


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _join(url: str, path: str) -> str:
    return url.rstrip("/") + path


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    api_key: str | None,
    timeout_s: float,
    limit: int | None,
    json_body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """(status, body); with `limit=None` the body is not read (status-only probes).
    `headers` replaces the Bearer header `api_key` would make (external providers)."""
    async with session.request(
        method,
        url,
        headers=_headers(api_key) if headers is None else headers,
        json=json_body,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        allow_redirects=False,
    ) as resp:
        if limit is None:
            return resp.status, b""
        return resp.status, await _read_capped(resp, limit)


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    api_key: str | None,
    timeout_s: float,
    limit: int | None = MAX_BODY_BYTES,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes] | None:
    """One request; (status, body) for any HTTP answer, None when there was none."""
    try:
        return await _send(session, method, url, api_key, timeout_s, limit, headers=headers)
    except asyncio.CancelledError:
        raise
    except aiohttp.ClientSSLError as e:
        # A certificate that does not verify (or a refused client certificate) is a
        # configuration problem the operator must see, not a transient failure.
        _warn_tls_failure(url, e)
        return None
    except Exception as e:  # a probe must never take its caller down
        log.debug("%s %s failed: %s: %s", method, url, type(e).__name__, e)
        return None


# Certificate failures are logged at WARNING at most once per origin this often (every probe
# of a worker fails the same way).
TLS_WARNING_INTERVAL_SECS = 60.0
_tls_warned: dict[str, float] = {}


def _warn_tls_failure(url: str, exc: Exception, now: float | None = None) -> bool:
    """Log `exc` for `url`'s origin unless that origin was logged within the interval;
    whether it was logged."""
    origin = "/".join(url.split("/", 3)[:3])
    now = time.monotonic() if now is None else now
    last = _tls_warned.get(origin)
    if last is not None and now - last < TLS_WARNING_INTERVAL_SECS:
        log.debug("TLS to %s failed: %s", origin, exc)
        return False
    _tls_warned[origin] = now
    log.warning("TLS to worker %s failed: %s", origin, getattr(exc, "os_error", None) or exc)
    return True


async def _get_ok(
    session: aiohttp.ClientSession, url: str, api_key: str | None, timeout_s: float
) -> bytes | None:
    answer = await _request(session, "GET", url, api_key, timeout_s)
    if answer is None:
        return None
    status, body = answer
    if not 200 <= status < 300:
        log.debug("GET %s answered %d", url, status)
        return None
    return body


async def probe_health(
    session: aiohttp.ClientSession,
    url: str,
    endpoint: str = "/health",
    api_key: str | None = None,
    timeout_s: float = 5.0,
) -> bool:
    """True when `GET url+endpoint` answers a 2xx status within `timeout_s`."""
    answer = await _request(session, "GET", _join(url, endpoint), api_key, timeout_s, limit=None)
    return answer is not None and 200 <= answer[0] < 300


async def get_with_headers(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout_s: float
) -> tuple[int, bytes] | None:
    """`GET url` with exactly `headers` (an external provider's key header); (status,
    body) for any answer, None when there was none."""
    return await _request(session, "GET", url, None, timeout_s, headers=headers)


def _parse_load(endpoint: str, engine: str, body: bytes) -> BackendLoad:
    if endpoint == LOADS_V1:
        return lp.parse_sglang_loads(body)
    if endpoint == GET_LOAD:
        return lp.parse_sglang_get_load(body)
    if endpoint == METRICS:
        return lp.parse_metrics(body, engine)
    raise lp.LoadParseError(f"no parser for {endpoint}")


def load_endpoints(engine: str) -> tuple[str, ...]:
    """The endpoints `scrape_load_from` tries for `engine`, in order."""
    return _LOAD_ENDPOINTS.get(engine, _DEFAULT_LOAD_ENDPOINTS)


async def scrape_load_from(
    session: aiohttp.ClientSession,
    url: str,
    engine: str,
    api_key: str | None = None,
    timeout_s: float = 5.0,
    endpoints: Sequence[str] | None = None,
) -> tuple[BackendLoad, str] | None:
    """The first usable load among `endpoints` (default: `load_endpoints(engine)`) and the
    endpoint that gave it; None when none did. `timeout_s` bounds each request."""
    for endpoint in endpoints or load_endpoints(engine):
        target = _join(url, endpoint + _QUERY.get(endpoint, ""))
        body = await _get_ok(session, target, api_key, timeout_s)
        if body is None:
            continue
        try:
            return _parse_load(endpoint, engine, body), endpoint
        except lp.LoadParseError as e:
            log.debug("GET %s: unusable load: %s", target, e)
    return None


async def _get_json(
    session: aiohttp.ClientSession, url: str, api_key: str | None, timeout_s: float
) -> tuple[int, Any] | None:
    """(status, decoded JSON or None if the body is not JSON); None without an answer."""
    answer = await _request(session, "GET", url, api_key, timeout_s)
    if answer is None:
        return None
    status, body = answer
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, None


def _ok_json(answer: tuple[int, Any] | None) -> Any:
    if answer is None or not 200 <= answer[0] < 300:
        return None
    return answer[1]


async def _server_info(
    session: aiohttp.ClientSession, url: str, api_key: str | None, timeout_s: float
) -> Any:
    answer = await _get_json(session, _join(url, "/server_info"), api_key, timeout_s)
    if answer is not None and answer[0] == 404:
        # Older SGLang only has the deprecated spelling (Rust get_json_with_fallback).
        answer = await _get_json(session, _join(url, "/get_server_info"), api_key, timeout_s)
    return _ok_json(answer)


async def server_info_answer(
    session: aiohttp.ClientSession, url: str, api_key: str | None, timeout_s: float
) -> tuple[int, Any] | None:
    """`/server_info` (404: `/get_server_info`) as (status, JSON or None); None without an
    answer. For --dp-aware, which tells a 404 (no SGLang) from no answer (smg.dp)."""
    answer = await _get_json(session, _join(url, "/server_info"), api_key, timeout_s)
    if answer is not None and answer[0] == 404:
        answer = await _get_json(session, _join(url, "/get_server_info"), api_key, timeout_s)
    return answer


async def discover_backend(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str | None = None,
    timeout_s: float = 5.0,
) -> BackendInfo:
    """Ask `/v1/models`, `/version` and `/server_info` (concurrently) and classify the
    engine with `load_parsers.detect_engine`. A worker that answers nothing is
    `BackendInfo(engine="unknown")`."""
    models_answer, version_answer, info_json = await asyncio.gather(
        _get_json(session, _join(url, "/v1/models"), api_key, timeout_s),
        _get_json(session, _join(url, "/version"), api_key, timeout_s),
        _server_info(session, url, api_key, timeout_s),
    )
    models_json = _ok_json(models_answer)
    version_json = _ok_json(version_answer)
    engine = lp.detect_engine(models_json, version_json, info_json)

    listing = lp.models_from_json(models_json) or lp.ModelList(ids=[])
    server_info: dict[str, Any] = {}
    if isinstance(info_json, dict):
        with contextlib.suppress(lp.LoadParseError):
            server_info = lp.server_info_from_json(info_json)
    source = version_json if engine == "vllm" and isinstance(version_json, dict) else server_info
    version = source.get("version")
    max_len = listing.max_model_len or server_info.get("context_length")
    return BackendInfo(
        engine=engine,
        model_ids=listing.ids,
        owned_by=listing.owned_by,
        server_info=server_info,
        version=version if isinstance(version, str) else None,
        max_model_len=max_len,
    )


async def flush_cache(
    session: aiohttp.ClientSession,
    url: str,
    api_key: str | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, str]:
    """`POST /flush_cache` → (HTTP status, body text). SGLang answers 200 when flushed and
    400 when it refused (requests in flight)."""
    return await admin_post(session, url, "/flush_cache", api_key, timeout_s)


async def admin_post(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    api_key: str | None,
    timeout_s: float,
    json_body: dict[str, Any] | None = None,
) -> tuple[int, str]:
    """An admin `POST {url}{path}` (flush_cache, start_profile, stop_profile) → (HTTP
    status, body text). Status 0 means no HTTP answer (the text then says why, in short)."""
    target = _join(url, path)
    try:
        status, body = await _send(
            session, "POST", target, api_key, timeout_s, 64 * 1024, json_body
        )
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.debug("POST %s failed: %s: %s", target, type(e).__name__, e)
        return 0, (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    return status, body.decode("utf-8", errors="replace")
