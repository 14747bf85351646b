"""The control plane's view of one gRPC worker: its backend, health, model facts, load,
cache flush and tokenizer bundle, over one grpc.aio channel that lives in the control-plane
process (it never forks after making it).

As smg.control.probes does for HTTP workers, nothing here raises for a worker that fails
to answer: health is False, discovery and loads are None, a flush is (status 0 or the
HTTP status the Rust SMG maps the gRPC code to, text). Only `fetch_tokenizer` raises,
with a message fit for the log (the caller holds the worker back and says why).

What the Rust SMG 1.13 does (model_gateway/src/workflow/steps/local/detect_backend.rs,
discover_metadata.rs, worker/worker.rs, workflow/tokenizer_registration.rs, health.rs):
the backend is the service whose HealthCheck answers (SGLang tried first); health is
HealthCheck's `healthy`; metadata is GetModelInfo (+ GetServerInfo, whose failure is only
a warning); the model id is `served_model_name`, else `model_path`; the tokenizer comes
from the worker's GetTokenizer when the gateway has no local one, and /readiness holds
until it is registered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smg.grpc.types import EngineError, GrpcModelInfo
from smg.policies.base import BackendLoad
from smg.worker_url import worker_address

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.grpc.client import EngineClient

log = logging.getLogger("smg.control")

# A bundle is fetched with at least this long a deadline (a large tokenizer.json over a
# slow link takes longer than a health check).
MIN_BUNDLE_TIMEOUT_SECS = 30.0


def grpc_target(url: str) -> tuple[str, bool]:
    """("host:port", tls) of a validated grpc:// or grpcs:// worker URL."""
    address = worker_address(url)
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}", address.tls


def local_tokenizer_dir(cfg: GatewayConfig) -> str | None:
    """The gateway's own tokenizer: --tokenizer-path, else --model-path, when it names an
    existing local directory (a hub id is never downloaded)."""
    for path in (cfg.tokenizer_path, cfg.model_path):
        if path and os.path.isdir(path):
            return path
    return None


def needs_bundle(cfg: GatewayConfig) -> bool:
    """Whether gRPC workers' tokenizers are fetched (and readiness waits for them)."""
    return not cfg.disable_tokenizer_autoload and local_tokenizer_dir(cfg) is None


class GrpcProbe:
    """One gRPC worker, as the control plane reaches it. The backend is detected once
    (the first call that finds the worker up); the channel is kept until `close`."""

    def __init__(self, url: str, *, tls: Any | None = None, api_key: str | None = None) -> None:
        self.url = url
        self.target, secure = grpc_target(url)
        self.tls = tls if secure else None
        self.secure = secure
        self.api_key = api_key
        self.client: EngineClient | None = None
        self._detecting: asyncio.Lock | None = None

    @property
    def backend(self) -> str | None:
        return self.client.backend if self.client is not None else None

    async def _client(self, timeout: float) -> EngineClient | None:
        if self.client is not None:
            return self.client
        # One detection at a time: the first probe, scrape and discovery of a new worker
        # run together, and each would otherwise open a channel of its own.
        if self._detecting is None:
            self._detecting = asyncio.Lock()
        async with self._detecting:
            if self.client is None:
                await self._detect(timeout)
        return self.client

    async def _detect(self, timeout: float) -> None:
        from smg.grpc.client import EngineClient, detect_backend

        target = ("grpcs://" if self.secure else "grpc://") + self.target
        try:
            backend = await detect_backend(
                target, timeout=timeout, tls=self.tls, api_key=self.api_key
            )
        except EngineError as exc:
            log.debug("gRPC worker %s: no backend answered: %s", self.url, exc)
            return
        self.client = EngineClient(target, backend, tls=self.tls, api_key=self.api_key)
        log.info("gRPC worker %s speaks %s", self.url, backend)

    async def health(self, timeout: float) -> bool:
        client = await self._client(timeout)
        return client is not None and await client.health(timeout)

    async def discover(self, timeout: float) -> tuple[GrpcModelInfo, dict[str, Any]] | None:
        """(model facts, server facts) or None when the worker does not answer."""
        client = await self._client(timeout)
        if client is None:
            return None
        try:
            info = await client.model_info(timeout)
        except EngineError as exc:
            log.warning("gRPC worker %s: GetModelInfo failed: %s", self.url, exc)
            return None
        return info, dict(client.last_server_info)

    async def load(self, timeout: float) -> BackendLoad | None:
        client = await self._client(timeout)
        if client is None:
            return None
        try:
            return await client.loads(timeout)
        except EngineError as exc:
            log.debug("gRPC worker %s: GetLoads failed: %s", self.url, exc)
            return None

    async def flush_cache(self, timeout: float) -> tuple[int, str]:
        """(HTTP status, text): 200 flushed, 400 refused by the engine (requests in
        flight, as SGLang's HTTP /flush_cache answers), else the mapped gRPC status; 0
        when the worker is not reachable."""
        from smg.grpc.protos import http_status_for

        client = await self._client(timeout)
        if client is None:
            return 0, "gRPC worker not reachable"
        try:
            ok, message = await client.flush_cache(timeout)
        except EngineError as exc:
            return http_status_for(exc.code)[0], f"{exc.code}: {exc.message}"
        return (200 if ok else 400), message

    async def profile(
        self, operation: str, options: dict[str, Any], timeout: float
    ) -> tuple[int, str]:
        """start_profile / stop_profile over the engine's RPC: (200, "") when it succeeded,
        else (0, why) in flush_cache's convention (0: no usable answer)."""
        client = await self._client(timeout)
        if client is None:
            return 0, "gRPC worker not reachable"
        try:
            ok, message = await client.profile(operation, options, timeout)
        except EngineError as exc:
            return 0, f"{exc.code}: {exc.message}"
        return (200, message) if ok else (0, message or "the engine refused")

    async def fetch_tokenizer(self, cache_root: Path | None, timeout: float) -> Path:
        """The worker's tokenizer bundle, checked and unpacked under `cache_root` (None:
        smg.tokenizer.bundle's default root); raises
        EngineError / TokenizerLoadError / OSError (the caller logs and retries later)."""
        client = await self._client(timeout)
        if client is None:
            raise EngineError("UNAVAILABLE", "gRPC worker not reachable")
        return await client.tokenizer_bundle(cache_root, max(timeout, MIN_BUNDLE_TIMEOUT_SECS))

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a channel that will not close must not stop a removal
                log.debug("closing the channel to %s failed: %r", self.url, exc)
