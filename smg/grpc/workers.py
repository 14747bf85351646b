"""Per data-plane process: the gRPC workers' EngineClients, the tokenizers and chat templates.

Everything here is made lazily after the fork (a grpc.aio channel must not cross a fork)
and lives on the process's event loop:

- one `EngineClient` per engine (URL, key, backend), shared by the rows on it (a
  --dp-aware engine's rank workers are one engine: one channel, not one per rank); a row
  taken by another worker (a new generation) or dropped from the directory lets go of
  its client, closed when no row uses it;
- one `Tokenizer` per source: --tokenizer-path, else --model-path when it is a local
  directory, else the worker's bundle directory (`entry.grpc.tokenizer_dir`, fetched by
  the control plane); --chat-template overrides the template. Loading a tokenizer takes
  about a second for a large vocabulary, so it runs on a thread once per source and every
  request for that source awaits the same future;
- one `ChatTemplate` per tokenizer (compiled once).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smg.worker_url import worker_address

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.shm.directory import DirectoryEntry

log = logging.getLogger("smg.grpc")


class NoTokenizer(LookupError):
    """No tokenizer source for a gRPC worker: neither a local --tokenizer-path /
    --model-path nor a bundle fetched from the worker."""


def local_tokenizer_dir(cfg: GatewayConfig) -> str | None:
    """The gateway's own tokenizer directory: --tokenizer-path, else --model-path, when
    it is a local directory (a hub id is never downloaded)."""
    for path in (cfg.tokenizer_path, cfg.model_path):
        if path and os.path.isdir(path):
            return path
    return None


def is_grpc_entry(entry: DirectoryEntry) -> bool:
    """Whether a worker is served over gRPC: the control plane published its model facts,
    or it was registered as one (grpc:// URL or connection_mode grpc)."""
    return entry.grpc is not None or entry.spec.connection_mode == "grpc"


# The data plane's transport to gRPC workers: "h2" (smg.grpc.h2client, ~10x less CPU per
# streamed message) or "aio" (grpc.aio, smg.grpc.client: the reference implementation).
GRPC_TRANSPORT = os.environ.get("SMG__GRPC_TRANSPORT", "h2")


def _default_client_factory(target: str, backend: str, tls: Any | None, api_key: str | None) -> Any:
    if GRPC_TRANSPORT == "h2":
        from smg.grpc.h2client import H2EngineClient

        return H2EngineClient(target, backend, tls=tls, api_key=api_key)
    from smg.grpc.client import EngineClient

    return EngineClient(target, backend, tls=tls, api_key=api_key)


def _default_tokenizer_loader(path: str, chat_template: str | None, cfg: GatewayConfig) -> Any:
    from smg.tokenizer import load_tokenizer
    from smg.tokenizer.bytelevel import byte_tables
    from smg.tokenizer.cache import TokenizerCacheConfig

    cache = None
    if cfg.tokenizer_cache_enable_l0 or cfg.tokenizer_cache_enable_l1:
        cache = TokenizerCacheConfig.from_config(cfg)
    tokenizer = load_tokenizer(path, chat_template_path=chat_template, cache=cache)
    # The detokenizer's byte-level table (~0.4 s for a 128K vocabulary) is built here, on
    # the loader's thread, rather than by the first stream on the event loop.
    byte_tables(tokenizer)
    # The exact fast encode for Llama-3-style tokenizers (smg.tokenizer.fastpath): its
    # one-time check of the regex engines (~0.4 s) runs here too. SMG__TOKENIZER_FASTPATH=0
    # turns it off, SMG__TOKENIZER_NATIVE=0 its C parts, the merges and the split and
    # lookup (for measuring against the library and the regex module alone).
    if os.environ.get("SMG__TOKENIZER_FASTPATH", "1") != "0":
        tokenizer.enable_fast_path(native=os.environ.get("SMG__TOKENIZER_NATIVE", "1") != "0")
    return tokenizer


def _default_template_factory(tokenizer: Any) -> Any:
    from smg.chat import ChatTemplate

    if not tokenizer.chat_template:
        return None
    return ChatTemplate(
        tokenizer.chat_template,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        special_tokens=tokenizer.special_tokens,
    )


class GrpcWorkers:
    def __init__(
        self,
        cfg: GatewayConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        client_factory: Callable[[str, str, Any | None, str | None], Any] = (
            _default_client_factory
        ),
        tokenizer_loader: Callable[[str, str | None, GatewayConfig], Any] = (
            _default_tokenizer_loader
        ),
        template_factory: Callable[[Any], Any] = _default_template_factory,
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.clients: dict[tuple[int, int], Any] = {}  # (row, generation) -> client
        self._engines: dict[tuple[str, str | None, str], Any] = {}  # (url, key, backend)
        self.tokenizers: dict[str, asyncio.Future[Any]] = {}
        self.templates: dict[int, Any] = {}  # id(tokenizer) -> ChatTemplate | None
        self._template_owners: dict[int, Any] = {}  # keeps the id valid
        self.local_dir = local_tokenizer_dir(cfg)
        self._client_factory = client_factory
        self._tokenizer_loader = tokenizer_loader
        self._template_factory = template_factory
        self._tls: Any | None = None
        self._closing: set[asyncio.Task[Any]] = set()

    # --- engine clients ---------------------------------------------------------------------

    def client(self, entry: DirectoryEntry) -> Any:
        key = (entry.row, entry.generation)
        client = self.clients.get(key)
        if client is None:
            backend = (entry.grpc.backend if entry.grpc is not None else "") or "vllm"
            engine = (entry.url, entry.api_key, backend)
            client = self._engines.get(engine)
            if client is None:
                address = worker_address(entry.url)
                host = f"[{address.host}]" if ":" in address.host else address.host
                client = self._client_factory(
                    f"{host}:{address.port}",
                    backend,
                    self._tls_for(address.tls),
                    # Only the worker's own key, as metadata (the control plane's rule too).
                    entry.api_key,
                )
                self._engines[engine] = client
            self.clients[key] = client
        return client

    def _tls_for(self, tls: bool) -> Any | None:
        """grpcs:// workers: channel credentials from --ca-cert-paths (else the system
        roots) and --client-cert-path/--client-key-path, built once."""
        if not tls:
            return None
        if self._tls is None and GRPC_TRANSPORT == "h2":
            # An ssl.SSLContext for the h2 client: the same files, the CAs added to the
            # system roots as for https:// workers (smg.tlsconf), ALPN h2 set by the client.
            from smg.tlsconf import worker_context_for

            self._tls = worker_context_for(self.cfg)
        if self._tls is None:
            import grpc

            cfg = self.cfg
            roots = b"".join(_read(path) for path in cfg.ca_cert_paths) or None
            cert = _read(cfg.client_cert_path) if cfg.client_cert_path else None
            key = _read(cfg.client_key_path) if cfg.client_key_path else None
            self._tls = grpc.ssl_channel_credentials(roots, key, cert)
        return self._tls

    def on_directory(self, entries: dict[int, DirectoryEntry]) -> None:
        """Close the clients of rows that left the directory or changed hands."""
        for key in list(self.clients):
            entry = entries.get(key[0])
            if entry is None or entry.generation != key[1]:
                self.clients.pop(key)
        used = {id(client) for client in self.clients.values()}
        for engine, client in list(self._engines.items()):
            if id(client) not in used:
                del self._engines[engine]
                task = self.loop.create_task(_close(client))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        clients = list(self._engines.values())
        self.clients.clear()
        self._engines.clear()
        for client in clients:
            await _close(client)

    # --- tokenizers ---------------------------------------------------------------------------

    def tokenizer_source(self, entry: DirectoryEntry | None) -> str:
        """Where `entry`'s tokenizer is read from (NoTokenizer when nowhere)."""
        if self.local_dir is not None:
            return self.local_dir
        if entry is not None and entry.grpc is not None and entry.grpc.tokenizer_dir:
            return entry.grpc.tokenizer_dir
        raise NoTokenizer(
            "no tokenizer for this model: start smg with --tokenizer-path or --model-path "
            "(a local directory), or let it fetch the worker's tokenizer"
        )

    async def tokenizer(self, entry: DirectoryEntry | None) -> Any:
        source = self.tokenizer_source(entry)
        future = self.tokenizers.get(source)
        if future is None:
            future = self.loop.run_in_executor(
                None, self._tokenizer_loader, source, self.cfg.chat_template, self.cfg
            )
            self.tokenizers[source] = future
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A failed load is not cached: the next request tries again (a bundle may
            # have been replaced meanwhile).
            if self.tokenizers.get(source) is future:
                del self.tokenizers[source]
            raise

    def loaded_tokenizer(self, entry: DirectoryEntry | None) -> Any | None:
        """The tokenizer if it is loaded already (no wait), else None."""
        try:
            future = self.tokenizers.get(self.tokenizer_source(entry))
        except NoTokenizer:
            return None
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def template(self, tokenizer: Any) -> Any | None:
        key = id(tokenizer)
        if key not in self.templates:
            self.templates[key] = self._template_factory(tokenizer)
            self._template_owners[key] = tokenizer
        return self.templates[key]


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


async def _close(client: Any) -> None:
    try:
        await client.close()
    except Exception as exc:  # closing a dead channel must not disturb the process
        log.debug("closing a gRPC client failed: %r", exc)
