"""The gRPC engine client (grpc.aio): one channel to one worker, for either backend.

A channel belongs to the process and event loop that made it: data-plane processes make
theirs lazily after the fork (smg.grpc.workers), the control plane its own. Channel
options follow the Rust SMG's transport profile (crates/grpc_client/src/channel.rs:
HTTP/2 keepalive every 30 s, 10 s ack timeout, pings while idle) and the servicers'
256 MiB message limits (the servicers accept pings every 10 s or more).

Every RPC failure becomes `EngineError(code name, details)`; `generate` says whether it
failed before the first output (`before_first_token`, so the caller may still retry) and
cancels the call when its consumer stops iterating (the caller also sends Abort: a
cancelled RPC is noticed by the servicer only at its next yield).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vll
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vll_grpc

from smg.grpc.protos import (
    BACKENDS,
    StreamNormalizer,
    build_abort_request,
    build_generate_request,
    load_from,
    model_info_from,
    output_from,
    server_info_from,
)
from smg.grpc.types import EngineError, EngineOutput, GenerateInput, GrpcModelInfo
from smg.policies.base import BackendLoad

log = logging.getLogger("smg.grpc")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Our own retries (before the first token) decide; the channel's would double them.
    ("grpc.enable_retries", 0),
]
# A tokenizer bundle larger than this is refused while it streams (tokenizer.json of the
# largest vocabularies is tens of MiB).
MAX_BUNDLE_BYTES = 512 * 1024 * 1024


def split_target(target: str) -> tuple[str, bool]:
    """("host:port", tls) from "host:port", "grpc://host:port" or "grpcs://host:port"."""
    if target.startswith("grpcs://"):
        return target[len("grpcs://") :].rstrip("/"), True
    if target.startswith("grpc://"):
        return target[len("grpc://") :].rstrip("/"), False
    return target, False


def channel_credentials(tls: Any) -> grpc.ChannelCredentials:
    """Credentials from `grpc.ChannelCredentials` (as is) or smg.tlsconf's `WorkerTls`
    (--ca-cert-paths as the roots, else gRPC's default roots; --client-cert-path /
    --client-key-path for mutual TLS)."""
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    ca_pem = getattr(tls, "ca_pem", None)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem.encode("ascii") if ca_pem else None,
        private_key=getattr(tls, "key_pem", None),
        certificate_chain=getattr(tls, "cert_pem", None),
    )


def make_channel(target: str, tls: Any | None = None) -> grpc.aio.Channel:
    address, secure = split_target(target)
    if tls is not None or secure:
        creds = channel_credentials(tls) if tls is not None else grpc.ssl_channel_credentials()
        return grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def _error(exc: grpc.aio.AioRpcError, *, before_first_token: bool = True) -> EngineError:
    return EngineError(
        exc.code().name, exc.details() or exc.code().name, before_first_token=before_first_token
    )


class _Api:
    """The backend's stub and its request message types."""

    def __init__(self, backend: str, channel: grpc.aio.Channel) -> None:
        if backend == "vllm":
            self.stub: Any = vll_grpc.VllmEngineStub(channel)
            self.pb: Any = vll
        elif backend == "sglang":
            self.stub = sgl_grpc.SglangSchedulerStub(channel)
            self.pb = sgl
        else:
            raise ValueError(f"unknown gRPC backend {backend!r} (expected vllm or sglang)")


class EngineClient:
    def __init__(
        self,
        target: str,
        backend: str,
        *,
        tls: Any | None = None,
        api_key: str | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """`target`: "host:port" or a grpc:// / grpcs:// URL; `tls`: grpc.ChannelCredentials
        or a WorkerTls (grpcs:// without it: the default roots); `api_key`: sent as
        `authorization: Bearer <key>` metadata (the servicers ignore it; a proxy in front
        may not); `channel`: an existing channel to share (not closed by `close`)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown gRPC backend {backend!r} (expected vllm or sglang)")
        self.backend = backend
        self.target = target
        self._own_channel = channel is None
        self.channel = channel if channel is not None else make_channel(target, tls)
        self._api = _Api(backend, self.channel)
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {api_key}"),) if api_key else None
        )
        self.last_server_info: dict[str, Any] = {}

    # --- generation ---------------------------------------------------------------------------

    async def generate(
        self, req: GenerateInput, *, timeout: float | None
    ) -> AsyncIterator[EngineOutput]:
        """The engine's outputs for `req`, normalised (`StreamNormalizer`): each token once,
        `completion_tokens` a running total, one `finished` output per choice.
        EngineError on a failed RPC (DEADLINE_EXCEEDED past `timeout`)."""
        request = build_generate_request(self.backend, req)
        call = self._api.stub.Generate(request, timeout=timeout, metadata=self._metadata)
        normalizer = StreamNormalizer()
        backend = self.backend
        yielded = False
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                out = normalizer.feed(output_from(backend, response))
                if out is None:
                    continue
                yielded = True
                yield out
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, before_first_token=not yielded) from None
        finally:
            if not call.done():
                call.cancel()

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests on the engine; never raises (the request is gone either way)."""
        if not request_ids:
            return
        try:
            if self.backend == "vllm":
                await self._api.stub.Abort(
                    build_abort_request("vllm", request_ids), timeout=5.0, metadata=self._metadata
                )
            else:
                for request_id in request_ids:
                    await self._api.stub.Abort(
                        build_abort_request("sglang", [request_id]),
                        timeout=5.0,
                        metadata=self._metadata,
                    )
        except grpc.aio.AioRpcError as exc:
            log.debug("Abort %s on %s failed: %s", request_ids, self.target, exc.code().name)

    async def embed(
        self, request_id: str, input_ids: list[int], timeout: float | None
    ) -> tuple[list[float], int]:
        """(embedding, prompt tokens)."""
        pb = self._api.pb
        request = pb.EmbedRequest(
            request_id=request_id,
            tokenized=pb.TokenizedInput(input_ids=input_ids),
        )
        try:
            answer = await self._api.stub.Embed(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return list(answer.embedding), answer.prompt_tokens

    # --- management ---------------------------------------------------------------------------

    async def health(self, timeout: float) -> bool:
        """HealthCheck answered and `healthy` (the Rust SMG's monitor reads the flag)."""
        try:
            answer = await self._api.stub.HealthCheck(
                self._api.pb.HealthCheckRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("HealthCheck %s: %s", self.target, exc.code().name)
            return False
        return bool(answer.healthy)

    async def model_info(self, timeout: float) -> GrpcModelInfo:
        """GetModelInfo, with GetServerInfo's facts kept in `last_server_info` (its failure
        is not one: the Rust SMG warns and goes on). EngineError when GetModelInfo fails."""
        pb = self._api.pb
        try:
            model = await self._api.stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        server = None
        try:
            server = await self._api.stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("GetServerInfo %s failed: %s", self.target, exc.code().name)
        self.last_server_info = server_info_from(self.backend, server)
        return model_info_from(self.backend, model, server)

    async def loads(self, timeout: float) -> BackendLoad:
        try:
            answer = await self._api.stub.GetLoads(
                self._api.pb.GetLoadsRequest(include=["core"]),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return load_from(self.backend, answer)

    async def flush_cache(self, timeout: float) -> tuple[bool, str]:
        """FlushCache with `timeout_s` 0 (flush now, refused while requests run)."""
        try:
            answer = await self._api.stub.FlushCache(
                common_pb2.FlushCacheRequest(timeout_s=0.0),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return bool(answer.success), answer.message

    async def profile(
        self, operation: str, options: dict[str, Any], timeout: float
    ) -> tuple[bool, str]:
        """StartProfile (with `options`, 1.13's ProfileOptions) or StopProfile."""
        try:
            if operation == "start_profile":
                answer = await self._api.stub.StartProfile(
                    common_pb2.StartProfileRequest(**options),
                    timeout=timeout,
                    metadata=self._metadata,
                )
            else:
                answer = await self._api.stub.StopProfile(
                    common_pb2.StopProfileRequest(), timeout=timeout, metadata=self._metadata
                )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return bool(answer.success), answer.message

    async def tokenizer_bundle(self, cache_root: Path | None, timeout: float) -> Path:
        """GetTokenizer: the zip's chunks joined, checked against the sha256 of the last
        chunk and unpacked under `cache_root` (None: smg.tokenizer.bundle.bundle_cache_root())
        by smg.tokenizer.bundle.unpack_bundle, off the loop. EngineError for a failed RPC, a digest mismatch or a bundle over
        MAX_BUNDLE_BYTES; TokenizerLoadError for a bad archive."""
        call = self._api.stub.GetTokenizer(
            common_pb2.GetTokenizerRequest(), timeout=timeout, metadata=self._metadata
        )
        parts: list[bytes] = []
        size = 0
        digest = ""
        try:
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    break
                size += len(chunk.data)
                if size > MAX_BUNDLE_BYTES:
                    call.cancel()
                    raise EngineError(
                        "RESOURCE_EXHAUSTED", f"tokenizer bundle over {MAX_BUNDLE_BYTES} bytes"
                    )
                parts.append(chunk.data)
                if chunk.sha256:
                    digest = chunk.sha256
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        data = b"".join(parts)
        if not digest:
            raise EngineError("DATA_LOSS", "tokenizer bundle without a sha256 on its last chunk")
        # Checked here too (unpack_bundle does): the message names both digests.
        actual = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if actual != digest.lower():
            raise EngineError(
                "DATA_LOSS",
                f"tokenizer bundle sha256 mismatch: the worker said {digest}, "
                f"the {len(data)} bytes received hash to {actual}",
            )
        from smg.tokenizer.bundle import bundle_cache_root, unpack_bundle

        root = cache_root if cache_root is not None else bundle_cache_root()
        return await asyncio.to_thread(unpack_bundle, data, digest, root)

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()


async def detect_backend(
    target: str, *, timeout: float, tls: Any | None = None, api_key: str | None = None
) -> str:
    """ "sglang" or "vllm": which service answers HealthCheck (the Rust SMG tries SGLang
    first, then vLLM; an answer counts whether or not it says healthy). Both are asked at
    once on one channel. EngineError when neither answers: the SGLang call's status
    (UNAVAILABLE for a refused connection, UNIMPLEMENTED when some other service listens)."""
    channel = make_channel(target, tls)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    try:
        calls = {
            "sglang": sgl_grpc.SglangSchedulerStub(channel).HealthCheck(
                sgl.HealthCheckRequest(), timeout=timeout, metadata=metadata
            ),
            "vllm": vll_grpc.VllmEngineStub(channel).HealthCheck(
                vll.HealthCheckRequest(), timeout=timeout, metadata=metadata
            ),
        }
        answers = await asyncio.gather(*calls.values(), return_exceptions=True)
        errors: list[BaseException] = []
        for backend, answer in zip(calls, answers, strict=True):
            if not isinstance(answer, BaseException):
                return backend
            errors.append(answer)
        first = errors[0]
        if isinstance(first, grpc.aio.AioRpcError):
            raise _error(first)
        raise first
    finally:
        await channel.close()
