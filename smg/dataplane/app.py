"""The data plane of one process: routes, routing decisions, proxying, local endpoints.

Routing state comes from the shared worker table: the directory (identity) is decoded
again only when its generation moves, row statuses are re-read only when the routing
generation moves, and in-flight counts are read live. No lock, no IPC on this path.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import msgspec
import orjson

from smg import ipc
from smg.config import tenant_keys
from smg.dataplane import auth, conversations, loopback, mcp_responses, responses
from smg.dataplane.admission import Admission
from smg.dataplane.cors import Cors
from smg.dataplane.exchange import ANTHROPIC_PATHS, COUNT_TOKENS_ROUTE, Exchange
from smg.dataplane.external import (
    External,
    bearer_token,
    byok_key,
    credential_lines,
    filter_rows,
    merge_models,
    transform_body,
)
from smg.dataplane.gate import CLIENT_LEFT, WorkerGate
from smg.dataplane.lifecycle import State
from smg.dataplane.metrics import DataPlaneMetrics
from smg.dataplane.retry import RetryPolicy
from smg.dataplane.server import Verdict, timeout_verdict
from smg.dataplane.upstream import WorkerPool
from smg.dp import inject_dp_rank
from smg.grpc.workers import is_grpc_entry
from smg.history.store import StorageUnavailable
from smg.httpwire import (
    ANTHROPIC_ROUTE,
    HOP_BY_HOP,
    anthropic_error_body,
    build_response,
    error_body,
    error_response,
    invalid_url,
    request_id_prefix,
    status_line,
)
from smg.httpwire import valid_request_id as _valid_request_id
from smg.logs import access_fields, access_logger, log_access
from smg.policies.base import BackendLoad, NoEligibleWorker, Policy, RouteRequest
from smg.policies.registry import POLICY_NAMES, make_policy
from smg.policies.routing_key import TARGET_WORKER_HEADER, implicit_key, key_headers, routing_key
from smg.policies.shared import SharedRouting
from smg.providers import API_ANTHROPIC, API_BOTH, API_OPENAI, provider_api
from smg.shm.directory import DirectoryEntry
from smg.shm.layout import FLAG_IN_USE, FLAG_LOAD_VALID, ROW_BODY, ROW_SIZE
from smg.shm.readiness import LIVENESS_BODY, LIVENESS_CONTENT_TYPE, readiness
from smg.shm.readiness import routable as is_routable
from smg.worker_url import worker_address

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from smg.config import GatewayConfig
    from smg.dataplane.pd import PDRouter
    from smg.dataplane.server import ClientConnection, Request
    from smg.dataplane.tracing import Tracer
    from smg.grpc.frontend import GrpcFront
    from smg.history.records import ResponseRecord
    from smg.history.store import HistoryStore
    from smg.shm.table import WorkerTable
    from smg.translate import Translation
    from smg.wasm.chain import WasmChain

log = logging.getLogger("smg.dataplane")

PROXY_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/generate",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v1/responses",
        "/v1/messages",
        COUNT_TOKENS_ROUTE,
    }
)
# What a worker speaking only Anthropic's API is asked (the rest gets a 400 naming the
# route), and the routes translated for a worker speaking only OpenAI's.
_ANTHROPIC_API_ROUTES = frozenset({"/v1/chat/completions", ANTHROPIC_ROUTE, COUNT_TOKENS_ROUTE})
_CHAT_ROUTE = "/v1/chat/completions"
ADMIN_PREFIXES = (
    "/workers",
    "/get_loads",
    "/flush_cache",
    "/start_profile",
    "/stop_profile",
    "/wasm",
)
# Answered by the gRPC path's tokenizer (only when a gRPC worker is registered).
GRPC_LOCAL_ROUTES = frozenset({"/v1/tokenize", "/v1/detokenize"})
WORKER_INFO_ROUTES = frozenset({"/get_model_info", "/get_server_info", "/health_generate"})
_LIVENESS_TYPE = LIVENESS_CONTENT_TYPE.encode()
_MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{model}: one model of the list
# Routes answered to GET and HEAD only: a CORS preflight names them in `allow`, and any
# other method gets 405 with that `allow`, as 1.13.
_GET_ROUTES = WORKER_INFO_ROUTES | {"/liveness", "/health", "/readiness", "/v1/models"}
_SKIP_REQUEST_HEADERS = HOP_BY_HOP | {
    b"host",
    b"content-length",
    # The client's credentials are the gateway's business: a worker gets its own key (or
    # --api-key when it has none), never what the client sent.
    b"authorization",
    b"x-api-key",
    b"x-goog-api-key",  # Gemini's key header: a credential too
    b"x-request-id",
    b"expect",
}
# With --enable-trace the worker gets the attempt span's traceparent instead of the client's.
_SKIP_TRACED = _SKIP_REQUEST_HEADERS | {b"traceparent"}


class _RoutingFields(msgspec.Struct):
    """The only fields routing reads; everything else is forwarded untouched."""

    model: Any = None
    stream: Any = False


_routing_decoder = msgspec.json.Decoder(_RoutingFields)


class _TextFields(_RoutingFields):
    """The routing fields plus the prompt, for policies that route on text (cache_aware):
    chat `messages`, completions' `prompt`, responses' and embeddings' `input`. Decoded
    only for such policies, so the others pay nothing."""

    messages: Any = None
    prompt: Any = None
    input: Any = None


_text_decoder = msgspec.json.Decoder(_TextFields)

# The protocol's placeholder for "no model" (Rust openai_protocol UNKNOWN_MODEL_ID): a
# /generate body without `model` carries it there.
UNKNOWN_MODEL = "unknown"
MISSING_MODEL_MESSAGE = "/generate requests must include a model when IGW routing is enabled"


def generate_lacks_model(body: bytes | bytearray | memoryview) -> bool:
    """Whether a /generate body names no model, as the Rust SMG's IGW mode judges it
    (router_manager `requires_explicit_generate_model`: absent, blank after trimming, or
    "unknown"); `"model": null` counts as absent (Rust refuses it with a 422). Bad JSON or
    a non-string model is False: the proxy path answers those as it always does."""
    try:
        model = _routing_decoder.decode(body).model
    except (msgspec.DecodeError, RecursionError):
        return False
    if model is None:
        return True
    return isinstance(model, str) and (not model.strip() or model == UNKNOWN_MODEL)


def _content_text(content: Any) -> str:
    """A message's or an input's text: a string, or the `text` of its parts in order."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                else:
                    inner = part.get("content")
                    if inner is not None and inner is not content:
                        parts.append(_content_text(inner))
        return "".join(parts)
    return ""


def prompt_text(fields: _TextFields) -> str | None:
    """The text prefix routing sees: chat messages as `role: content` lines in order
    (roles included, so the same words from a user and a system prompt differ), else the
    prompt, else the input; None when the body has none of them (or only token ids)."""
    messages = fields.messages
    if isinstance(messages, list):
        lines = []
        for message in messages:
            if isinstance(message, dict):
                role = message.get("role")
                lines.append(
                    f"{role if isinstance(role, str) else ''}: "
                    f"{_content_text(message.get('content'))}\n"
                )
        return "".join(lines) or None
    for value in (fields.prompt, fields.input):
        if value is not None:
            return _content_text(value) or None
    return None


# Why `_choose` found no worker (negative, so a row number is never one of them).
_SHED = -1  # the gate: every candidate is overloaded and shedding is on
_VETOED = -2  # the policy: every candidate is at its waiting-queue cap
_NO_TRIAL = -3  # the gate refused every candidate's claim (half-open trials taken)
_NONE_READY = -4  # no candidate is ready (unhealthy, or every breaker open)
_STREAMING = int(State.STREAMING)


_unpack_row = ROW_BODY.unpack_from


def _retrieved_model(path: str) -> str | None:
    """The model of `/v1/models/{model}` (the openai client's `models.retrieve`; the id
    may hold slashes and be percent-encoded), else None."""
    if path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        return unquote(path[len(_MODEL_PREFIX) :])
    return None


def _is_get_route(path: str) -> bool:
    """A route answered to GET and HEAD only."""
    return path in _GET_ROUTES or _retrieved_model(path) is not None


class ShmLoadView:
    """`LoadView` over the shared table, for policies."""

    __slots__ = ("_buf", "_rows_offset", "_words", "table")

    def __init__(self, table: WorkerTable) -> None:
        self.table = table
        self._buf = table.buf
        self._words = table._words
        self._rows_offset = table.geo.rows_offset

    def in_flight(self, row: int) -> int:
        return self.table.in_flight(row)

    def load_fields(self, row: int) -> tuple[Any, ...] | None:
        """The row's body as `ROW_BODY` unpacks it (generation, status, flags, pad,
        running, waiting, waiting_tokens, token_usage, throughput, load_updated,
        changed) without a BackendLoad, for power_of_two's pair scorer; None while a
        write is in progress (backend_load then waits it out)."""
        offset = self._rows_offset + row * ROW_SIZE
        words = self._words
        before = words[offset >> 3]
        if not before & 1:
            fields = _unpack_row(self._buf, offset + 8)
            if words[offset >> 3] == before:
                return fields
        return None

    def backend_load(self, row: int) -> BackendLoad:
        # layout.read_row's lock-free read inlined (without its Row tuple): a decision
        # reads up to two of these (power_of_two), this halves their cost.
        offset = self._rows_offset + row * ROW_SIZE
        words = self._words
        before = words[offset >> 3]
        if not before & 1:
            _gen, _st, flags, _pad, running, waiting, wtok, usage, tput, updated, _chg = (
                _unpack_row(self._buf, offset + 8)
            )
            if words[offset >> 3] == before:
                return BackendLoad(
                    running=running,
                    waiting=waiting,
                    token_usage=usage,
                    throughput=tput,
                    valid=bool(flags & FLAG_LOAD_VALID),
                    waiting_tokens=wtok,
                    updated=updated,
                )
        # A write in progress: the table's read spins, then yields, until it ends.
        value = self.table.read_row(row)
        return BackendLoad(
            running=value.running,
            waiting=value.waiting,
            token_usage=value.token_usage,
            throughput=value.throughput,
            valid=bool(value.flags & FLAG_LOAD_VALID),
            waiting_tokens=value.waiting_tokens,
            updated=value.load_updated,
        )


class RoutingState:
    """What this process knows of the fleet, rebuilt when a generation moves."""

    def __init__(self) -> None:
        self.directory_generation = -1
        self.routing_generation = -1
        self.entries: dict[int, DirectoryEntry] = {}
        self.aliases: dict[str, str] = {}
        self.models_all: dict[str, list[int]] = {}  # model -> rows serving it, any status
        self.models_ready: dict[str, list[int]] = {}
        self.any_model_all: list[int] = []  # rows whose models are unknown: serve any model
        self.any_model_ready: list[int] = []
        self.ready: list[int] = []


class DataPlane:
    # Class defaults as well as instance attributes: tests build a bare DataPlane
    # (`__new__`) to drive `_choose` alone.
    model_policies: dict[str, Policy] | None = None
    needs_text = False
    grpc: GrpcFront | None = None
    external: External | None = None
    pd: PDRouter | None = None
    igw = False

    def __init__(
        self,
        cfg: GatewayConfig,
        table: WorkerTable,
        index: int,
        root_pid: int,
        policy: Policy,
        loop: asyncio.AbstractEventLoop,
        slot: int | None = None,
        shared: SharedRouting | None = None,
    ) -> None:
        self.cfg = cfg
        self.table = table
        self.index = index  # listener number: x-smg-process, the IPC address
        # This process's slot in the shared table (in-flight counts, process words): `index`
        # at start-up; a replacement started next to its predecessor (live reload) gets the
        # free one (the table has one slot more than there are processes).
        self.slot = index if slot is None else slot
        self.root_pid = root_pid
        self.policy = policy
        self.shared = shared
        # model -> its policy, from a worker's `policy` label when the model first
        # registered (Rust's PolicyRegistry.on_worker_added); None until one has a label,
        # so the common case pays one None check.
        self.model_policies: dict[str, Policy] | None = None
        self._models_seen: set[str] = set()
        # Whether proxy() extracts the prompt text: some policy in use reads it.
        self.needs_text = policy.needs_text
        # The routing-key header names, when any policy reads keys (None: never read).
        self.key_names: tuple[bytes, ...] | None = (
            key_headers(cfg.routing_key_headers) if policy.uses_routing_key else None
        )
        self.loop = loop
        self.view = ShmLoadView(table)
        self.gate = WorkerGate(cfg, table, self.slot)
        # Global admission control (None when --max-concurrent-requests is 0). Each
        # admitted request's Exchange is in `permit_holders` until `exchange_finished`.
        self.admission = Admission.from_config(cfg, table, self.slot, self, loop)
        self.permit_holders: set[Exchange] = set()
        self.state = RoutingState()
        self.metrics = DataPlaneMetrics()
        self.connections: set[ClientConnection] = set()
        self.active: set[Exchange] = set()
        self.tasks: set[asyncio.Task[Any]] = set()  # held so the loop cannot drop them
        self.pools: dict[tuple[int, int], WorkerPool] = {}
        self.local_in_flight: dict[int, tuple[int, int]] = {}  # row -> (generation, count)
        # A coarse clock for client-connection timers, moved by the sweeper (every 0.25 s):
        # the timers count whole seconds, and the hot path saves a clock read per event.
        self.now = time.monotonic()
        self.draining = False  # keep-alive connections close after their current response
        self.not_ready = False  # readiness answers 503 (shutdown has begun)
        self.max_payload_size = cfg.max_payload_size
        self.request_timeout = float(cfg.request_timeout_secs)
        self.retry_policy = RetryPolicy.from_config(cfg)
        self.retries_on = not cfg.disable_retries
        self.max_buffered = cfg.max_buffered_request_bytes
        self.sse_keepalive = float(cfg.sse_keepalive_secs)
        self.streams: set[Exchange] = set()  # SSE streams watched for keep-alive frames
        self.process_header = b"x-smg-process: %d\r\n" % index
        self.request_id_headers = tuple(
            h.lower().encode("latin-1") for h in (cfg.request_id_headers or _DEFAULT_RID_HEADERS)
        )
        self._rid_token = secrets.token_hex(4)
        self._rid_counter = 0
        self._global_api_key = cfg.api_key
        # What clients must present on the serving routes: --api-key or a --tenant-api-key.
        # Empty tuple: no credential asked. (The admin routes are judged by the control plane.)
        admin_key = (cfg.api_key.encode("latin-1"),) if cfg.api_key else ()
        self._serving_keys: tuple[bytes, ...] = admin_key + tuple(
            key.encode("latin-1") for key in tenant_keys(cfg)
        )
        self._sweeper: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None
        # --cors-allowed-origins (None when unset: one None check per answer).
        self.cors = Cors.from_config(cfg.cors_allowed_origins)
        # --access-log: the `smg.access` logger (None when off: one None check per answer).
        self.access_log = access_logger(cfg)
        # With the access log on: when each connection's current request began and the
        # size of its body (one request per connection is answered at a time).
        self._access_started: dict[ClientConnection, tuple[float, int]] = {}
        # Set after the fork by the process when --enable-trace is on (smg.dataplane.tracing).
        self.tracer: Tracer | None = None
        # The gRPC request path (smg.grpc.frontend), made when the directory first lists a
        # gRPC worker; None keeps the HTTP path at one attribute check.
        self.grpc: GrpcFront | None = None
        # External workers' keys, filters and refreshes (smg.dataplane.external), made when
        # the directory first lists one; None keeps the self-hosted path at one check.
        self.external: External | None = None
        # --enable-wasm: this process's WASM modules (smg.wasm.chain), synced with the
        # directory; `wasm` is the chain only while it has modules, so the serving path
        # costs one None check without them.
        self.wasm_chain: WasmChain | None = None
        self.wasm: WasmChain | None = None
        if cfg.enable_wasm:
            from smg.wasm.chain import WasmChain as _Chain
            from smg.wasm.chain import artifact_loader
            from smg.wasm.types import Limits

            limits = Limits()
            self.wasm_chain = _Chain(artifact_loader(limits), limits)
        # --enable-igw: many models, each through its workers' kind (HTTP, gRPC, external).
        # Routing is per model either way; IGW adds only the /generate model requirement.
        self.igw = cfg.enable_igw
        # --pd-disaggregation: the prefill/decode router (smg.dataplane.pd); None keeps the
        # plain path at one attribute check. Its decode side routes with self.policy.
        self.pd: PDRouter | None = None
        if getattr(cfg, "pd_disaggregation", False):
            from smg.dataplane.pd import make_router

            self.pd = make_router(self, cfg)
        # The history store of the Conversations API, opened on its first request, and the
        # tenant each serving key stands for (smg.dataplane.conversations).
        self.history_store: HistoryStore | None = None
        self._tenant_by_key: dict[bytes, str] | None = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.refresh()
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(0.25, self._sweep)

    def _sweep(self) -> None:
        try:
            self.now = now = time.monotonic()
            for exchange in [ex for ex in self.active if ex.deadline <= now]:
                exchange.timed_out()
            for pool in self.pools.values():
                pool.sweep(now)
            if self.streams:
                self._keepalive(now)
            self._close_idle_connections(now)
            self.refresh()
        except Exception as exc:  # the sweeper must keep running whatever happened
            self.log_error("sweep failed", exc)
        self._schedule_sweep()

    def _keepalive(self, now: float) -> None:
        quiet_for = self.sse_keepalive
        for exchange in list(self.streams):
            if exchange.state != _STREAMING:
                self.streams.discard(exchange)  # ended (or completing): no more frames
            else:
                exchange.keepalive(now, quiet_for)

    def _close_idle_connections(self, now: float) -> None:
        cfg = self.cfg
        head_limit = float(cfg.header_read_timeout_secs)
        body_limit = float(cfg.stream_body_stall_timeout_secs)
        idle_limit = float(cfg.idle_connection_timeout_secs)
        for conn in list(self.connections):
            verdict = timeout_verdict(
                conn.phase, conn.since, now, conn.busy, head_limit, body_limit, idle_limit
            )
            if verdict is Verdict.CLOSE:
                conn.close()
            elif verdict is Verdict.ANSWER_408:
                conn.timed_out_body()

    def begin_drain(self) -> None:
        """New requests still get answered; keep-alive connections are closed after theirs."""
        self.draining = True
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    # --- routing state ------------------------------------------------------------------------

    def refresh(self) -> RoutingState:
        state = self.state
        table = self.table
        routing_generation = table.routing_generation()
        if routing_generation == state.routing_generation:
            return state
        directory_generation = table.directory_generation()
        if directory_generation != state.directory_generation:
            generation, directory = table.read_directory()
            self._apply_directory(generation, directory.entries, directory.aliases)
            chain = self.wasm_chain
            if chain is not None:
                chain.sync(directory.wasm)
                self.wasm = chain if chain else None
        self._rebuild(routing_generation)
        return self.state

    def grpc_front(self) -> GrpcFront | None:
        """This process's gRPC front, with the directory read first: the front is made when
        the directory first lists a gRPC worker, and a request may come before the next
        sweep reads it (a worker registered since, e.g. by discovery). Without the read such
        a request took the HTTP proxy path to the gRPC port (HTTP/1.1 to an HTTP/2 engine)."""
        self.refresh()
        return self.grpc

    def _apply_directory(
        self, generation: int, entries: list[DirectoryEntry], aliases: dict[str, str]
    ) -> None:
        new_entries = {entry.row: entry for entry in entries}
        # A row taken by another worker (new generation) starts from zero in this process:
        # decrements for the old generation are ignored from now on.
        for row, (gen, _count) in list(self.local_in_flight.items()):
            entry = new_entries.get(row)
            if entry is None or entry.generation != gen:
                self.table.set_in_flight(self.slot, row, 0)
                del self.local_in_flight[row]
        for key in list(self.pools):
            entry = new_entries.get(key[0])
            if entry is None or entry.generation != key[1]:
                self.pools.pop(key).close_all()
        self.state.entries = new_entries
        self.state.aliases = dict(aliases)
        self.state.directory_generation = generation
        self._affinity_directory(new_entries)
        if self.grpc is None and any(is_grpc_entry(entry) for entry in new_entries.values()):
            from smg.grpc.frontend import GrpcFront

            self.grpc = GrpcFront(self)
        if self.grpc is not None:
            self.grpc.on_directory(new_entries)
        if self.external is None and any(e.provider is not None for e in new_entries.values()):
            self.external = External(self.root_pid, self._serving_keys)

    def _affinity_directory(self, entries: dict[int, DirectoryEntry]) -> None:
        """Tell the policies the fleet (rings and pins key workers by URL and generation),
        and keep the per-model policies as the Rust SMG 1.13's PolicyRegistry does: a
        model's policy is decided when its first worker registers (that worker's `policy`
        label, else --policy; an unknown name is logged and --policy used) and forgotten
        when its last worker leaves."""
        workers = {row: (entry.generation, entry.url) for row, entry in entries.items()}
        present: set[str] = set()
        for entry in sorted(entries.values(), key=lambda e: e.row):
            models = entry.models or ((entry.model_id,) if entry.model_id else ())
            hint = entry.spec.labels.get("policy")
            for model in models:
                present.add(model)
                if model in self._models_seen:
                    continue
                self._models_seen.add(model)
                if not hint or hint == self.cfg.policy:
                    continue
                if hint not in POLICY_NAMES:
                    log.warning(
                        "worker %s: policy label %r is not an implemented policy; model %r "
                        "uses --policy %s",
                        entry.worker_id,
                        hint[:64],
                        model,
                        self.cfg.policy,
                    )
                    continue
                try:
                    policy = make_policy(hint, self.cfg, index=self.index, shared=self.shared)
                except ValueError as exc:  # a setting that policy refuses: keep --policy
                    log.warning("model %r: policy %s not built (%s)", model, hint, exc)
                    continue
                if self.model_policies is None:
                    self.model_policies = {}
                self.model_policies[model] = policy
                if policy.uses_routing_key and self.key_names is None:
                    self.key_names = key_headers(self.cfg.routing_key_headers)
        for model in self._models_seen - present:
            self._models_seen.discard(model)
            if self.model_policies is not None:
                self.model_policies.pop(model, None)
        self.policy.on_directory(workers)
        for policy in (self.model_policies or {}).values():
            policy.on_directory(workers)
        # A model's own policy may read the prompt text (cache_aware, prefix_hash).
        self.needs_text = self.policy.needs_text or any(
            policy.needs_text for policy in (self.model_policies or {}).values()
        )

    def _rebuild(self, routing_generation: int) -> None:
        state = self.state
        models_all: dict[str, list[int]] = {}
        models_ready: dict[str, list[int]] = {}
        any_all: list[int] = []
        any_ready: list[int] = []
        ready: list[int] = []
        table = self.table
        for row, entry in sorted(state.entries.items()):
            value = table.read_row(row)
            if value.generation != entry.generation or not value.flags & FLAG_IN_USE:
                continue
            if entry.spec.worker_type != "regular":
                continue  # prefill/decode: PD mode's alone (1.13's regular router skips them)
            routable = is_routable(value, entry.generation)  # the one rule readiness uses
            if routable:
                ready.append(row)
            models = entry.models or ((entry.model_id,) if entry.model_id else ())
            if not models:
                any_all.append(row)
                if routable:
                    any_ready.append(row)
            for model in models:
                models_all.setdefault(model, []).append(row)
                if routable:
                    models_ready.setdefault(model, []).append(row)
        state.models_all = models_all
        state.models_ready = models_ready
        state.any_model_all = any_all
        state.any_model_ready = any_ready
        state.ready = ready
        state.routing_generation = routing_generation

    # --- request dispatch -----------------------------------------------------------------------

    def handle(self, conn: ClientConnection, request: Request) -> None:
        path = request.path
        method = request.method
        try:
            self._request_id(request)
            if self.access_log is not None:
                started = self._access_started
                if len(started) > 4096:
                    # Entries of requests never answered (a client gone during an admin
                    # call) are dropped with their closed connections.
                    for gone in [c for c in started if c.closed]:
                        del started[gone]
                started[conn] = (time.monotonic(), len(request.body))
            if self.cors is not None and method == b"OPTIONS":
                self._preflight(conn, request)
                return
            if path in PROXY_ROUTES:
                if not self._post_allowed(conn, request, method, path):
                    return
                if self.wasm is not None and not self._wasm_request(conn, request):
                    return
                if path == responses.ROUTE and request.history is None:
                    self._responses_entry(conn, request)
                    return
                admission = self.admission
                if admission is None:
                    self.proxy(conn, request)
                elif admission.enter(conn, request):
                    self.proxy_admitted(conn, request)
                return
            if path.startswith(conversations.PREFIX):
                self._conversations(conn, request)
                return
            if path.startswith(responses.PREFIX):
                self._responses_get(conn, request)
                return
            if method == b"GET" or method == b"HEAD":
                if path == "/v1/models" and self.external is not None:
                    key = self.external.caller_key(
                        request.header(b"authorization"), _caller_key_header(request)
                    )
                    if key is not None:  # the caller's own key: ask its providers too
                        self.spawn(self._models_fanout(conn, request, key))
                        return
                # HEAD answers as GET does, without the body (RFC 9110 9.3.2).
                if path in ("/liveness", "/health"):
                    self._send(conn, request, 200, LIVENESS_BODY, content_type=_LIVENESS_TYPE)
                    return
                local = self._local_get(path)
                if local is not None:
                    status, body = local
                    self._send(conn, request, status, body)
                    return
                retrieved = _retrieved_model(path)
                if retrieved is not None:
                    self._model_get(conn, request, retrieved)
                    return
                if path in WORKER_INFO_ROUTES:
                    grpc = self.grpc_front()
                    if grpc is not None and grpc.handle_info(conn, request):
                        return  # gRPC workers: answered from their model facts / HealthCheck
                    self.proxy(conn, request, body_routing=False)
                    return
            grpc = self.grpc_front() if path in GRPC_LOCAL_ROUTES else None
            if grpc is not None:
                # /v1/tokenize, /v1/detokenize: answered with a gRPC model's tokenizer.
                if not self._post_allowed(conn, request, method, path):
                    return
                if self.wasm is not None and not self._wasm_request(conn, request):
                    return
                grpc.handle_local(conn, request)
                return
            if path.startswith(ADMIN_PREFIXES):
                # Who may call them (keys, roles, JWT, loopback) is decided by the control
                # plane, with the credential passed along (smg.control.cpauth).
                self.spawn(self._admin(conn, request))
                return
            if _is_get_route(path):  # another method on a GET route: 405, as 1.13
                self._method_not_allowed(conn, request, b"GET,HEAD")
                return
            self._send_error(
                conn, request, 404, "unknown_url", invalid_url(method.decode("latin-1"), path)
            )
        except Exception as exc:  # a request must never take the process down
            log.error(
                "request failed: %r",
                exc,
                exc_info=exc,
                extra={"request_id": request.request_id.decode("latin-1"), "path": path},
            )
            exchange = conn.exchange
            if exchange is None:
                if conn.busy:
                    self._send_error(conn, request, 500, "internal_error", "internal gateway error")
            elif isinstance(exchange, Exchange):
                # Raised after the exchange took the request (a pooled connection is handed
                # to it in this call): its own failure path answers and frees it.
                exchange.internal_failure()

    def _wasm_request(self, conn: ClientConnection, request: Request) -> bool:
        """The OnRequest modules on a serving request (smg.wasm.chain): False when they
        answered it (a reject, or 500 when one failed); else the request goes on, with the
        headers and body they set."""
        chain = self.wasm
        assert chain is not None
        if not chain.on_request or isinstance(conn.transport, loopback.Collector):
            return True  # the MCP loop's model calls: 1.13's loop posts to its worker directly
        body = request.body
        if len(body) > chain.limits.max_body_bytes:
            # 1.13 buffers at most max_body_size for its modules and answers 400 past it.
            self._send_error(
                conn,
                request,
                400,
                "request_too_large",
                f"Failed to read request body: over the WASM body limit of "
                f"{chain.limits.max_body_bytes} bytes",
                wasm=False,  # OnRequest's own answers skip OnResponse, as 1.13's
            )
            return False
        outcome = chain.run_request_parsed(
            request.method,
            request.path,
            request.query,
            request.headers,
            body if type(body) is bytes else bytes(body),
            request.request_id,
        )
        if outcome.failed:
            self._send_error(conn, request, 500, "wasm_module_failed", outcome.message, wasm=False)
            return False
        if outcome.status:
            self._send_error(
                conn,
                request,
                outcome.status,
                "wasm_rejected",
                f"The request was rejected by WASM module '{outcome.module}'",
                wasm=False,
            )
            return False
        if outcome.changed:
            request.headers = [
                (n.encode("latin-1"), v.encode("latin-1")) for n, v in outcome.headers
            ]
            request.body = outcome.body
        return True

    def _wasm_error(
        self,
        conn: ClientConnection,
        request: Request,
        status: int,
        code: str,
        message: str,
        extra_headers: bytes,
    ) -> None:
        """A gateway-made error on a serving route, through the OnResponse modules (`_send`)."""
        if request.path in ANTHROPIC_PATHS:
            body = anthropic_error_body(status, message, request.request_id)
        else:
            body = error_body(status, code, message)
        extra = b"x-smg-error-code: %b\r\n%b" % (code.encode("latin-1"), extra_headers)
        self._send(conn, request, status, body, extra_headers=extra, error_code=code)

    def _wasm_answers(self, conn: ClientConnection, request: Request) -> bool:
        """Whether the OnResponse modules see this request's answers: 1.13 runs its WASM
        middleware on the serving routes (the proxied ones, the Conversations and stored
        Responses ones, tokenize/detokenize), not on the MCP loop's own model calls (1.13's
        loop posts to its worker directly; here they come over a loopback connection)."""
        path = request.path
        return (
            path in PROXY_ROUTES
            or path in GRPC_LOCAL_ROUTES
            or path.startswith((conversations.PREFIX, responses.PREFIX))
        ) and not isinstance(conn.transport, loopback.Collector)

    def _post_allowed(
        self, conn: ClientConnection, request: Request, method: bytes, path: str
    ) -> bool:
        """A POST-only serving route's gate (the proxied and the gRPC-local ones): the
        serving API key when one is set, then 405 for any other method. False when
        it has answered."""
        if self._serving_keys and not self._authorized(conn, request, self._serving_keys):
            return False
        if method != b"POST":
            self._method_not_allowed(conn, request, b"POST")
            return False
        return True

    def _method_not_allowed(self, conn: ClientConnection, request: Request, allow: bytes) -> None:
        """405 for a method the route does not take, with its `allow`, in 1.13's words."""
        message = invalid_url(request.method.decode("latin-1"), request.path)
        extra = b"allow: %b\r\n" % allow
        self._send_error(conn, request, 405, "method_not_allowed", message, extra_headers=extra)

    def _preflight(self, conn: ClientConnection, request: Request) -> None:
        """An OPTIONS request with --cors-allowed-origins set: answered here, on every
        route, before any credential check and without a worker, as the Rust SMG 1.13
        does (200, empty body; its `allow` line names the route's methods)."""
        cors = self.cors
        assert cors is not None
        path = request.path
        allow = (
            b"allow: POST\r\n"
            if path in PROXY_ROUTES
            else b"allow: GET,HEAD\r\n"
            if _is_get_route(path)
            else b""
        )
        keep_alive = request.keep_alive and not self.draining
        conn.send(
            b"".join(
                (
                    status_line(200),
                    cors.preflight(request.header(b"origin")),
                    allow,
                    b"content-length: 0\r\n",
                    self.process_header,
                    b"" if keep_alive else b"connection: close\r\n",
                    b"\r\n",
                )
            ),
            keep_alive,
        )
        self._count(request, 200, "", conn)

    def _authorized(
        self, conn: ClientConnection, request: Request, accepted: tuple[bytes, ...]
    ) -> bool:
        """Whether the request presents one of the `accepted` keys; otherwise answer 401 as
        the Rust SMG 1.13 does (probes, /v1/models and the worker-info routes stay open)."""
        presented = auth.presented_key(
            request.header(b"authorization"), request.header(b"x-api-key")
        )
        verdict = auth.judge(accepted, presented)
        if verdict is auth.Verdict.OK:
            return True
        missing = verdict is auth.Verdict.MISSING
        self._send_error(
            conn,
            request,
            401,
            "invalid_api_key",
            auth.MISSING_MESSAGE if missing else auth.INVALID_MESSAGE,
            extra_headers=auth.MISSING_CHALLENGE if missing else auth.INVALID_CHALLENGE,
        )
        return False

    def _local_get(self, path: str) -> tuple[int, bytes] | None:
        if path == "/readiness":
            state = self.refresh()
            return readiness(
                self.table,
                state.entries.values(),
                self.not_ready or self.draining,
                pd=self.cfg.pd_disaggregation,
            )
        if path == "/v1/models":
            return 200, self._models_body()
        return None

    def _model_get(self, conn: ClientConnection, request: Request, model: str) -> None:
        """`GET /v1/models/{model}`, as 1.13: the model's object of the list, else 404."""
        for listed in self._models_list():
            if listed["id"] == model:
                self._send(conn, request, 200, orjson.dumps(listed))
                return
        message = f"No worker available for model '{model}'"
        self._send_error(conn, request, 404, "model_not_found", message)

    def _models_body(self) -> bytes:
        return orjson.dumps({"object": "list", "data": self._models_list()})

    def _models_list(self) -> list[dict[str, Any]]:
        state = self.refresh()
        seen: dict[str, dict[str, Any]] = {}
        for entry in state.entries.values():
            # 1.13's ModelCard::owned_by: the external provider's name, else "self_hosted".
            owner = entry.provider or "self_hosted"
            for model in entry.models or ((entry.model_id,) if entry.model_id else ()):
                if model not in seen:
                    seen[model] = {"id": model, "object": "model", "created": 0, "owned_by": owner}
        for alias, canonical in state.aliases.items():
            if canonical in seen and alias not in seen:
                seen[alias] = {**seen[canonical], "id": alias}
        return list(seen.values())

    async def _models_fanout(self, conn: ClientConnection, request: Request, key: bytes) -> None:
        """/v1/models with the caller's own key: the directory's models plus those the
        external workers the key may go to list for it (the control plane asks them)."""
        external = self.external
        assert external is not None
        header = (
            "authorization"
            if key == bearer_token(request.header(b"authorization"))
            else "x-api-key"
        )
        try:
            upstream = await external.models(key, header)
            if conn.closed:
                return
            data = merge_models(self._models_list(), upstream)
            self._send(conn, request, 200, orjson.dumps({"object": "list", "data": data}))
        except Exception as exc:  # a request must never take the process down
            self.log_error("/v1/models fan-out failed", exc)
            if not conn.closed:
                self._send_error(conn, request, 500, "internal_error", "internal gateway error")

    async def _refresh_then_proxy(
        self, conn: ClientConnection, request: Request, key: bytes | None
    ) -> None:
        """A routing miss with external workers registered: one refresh of their model
        lists (bounded, shared with concurrent misses), then the request is routed again
        (404 if the model is still unknown). A request queued by admission control in
        between may refresh once more when its turn comes."""
        external = self.external
        assert external is not None
        try:
            await external.refresh(key)
            if conn.closed:
                return
            external.rerouted = request
            try:
                # Its permit went back when the miss answered nothing: admitted again, as new.
                admission = self.admission
                if admission is None:
                    self.proxy(conn, request)
                elif admission.enter(conn, request):
                    self.proxy_admitted(conn, request)
            finally:
                external.rerouted = None
        except Exception as exc:  # a request must never take the process down
            self.log_error("routing after a model refresh failed", exc)
            if conn.exchange is None and conn.busy:
                self._send_error(conn, request, 500, "internal_error", "internal gateway error")

    def _external_rows(
        self, conn: ClientConnection | None, request: Request, rows: list[int], model: str | None
    ) -> list[int] | None:
        """`rows` less those the request may not use (smg.dataplane.external.filter_rows);
        None when none is left and `conn` is given: then the 400 has been sent."""
        allowed, code, message = filter_rows(
            self.state.entries,
            rows,
            model,
            request.header(b"authorization"),
            _caller_key_header(request),
            self._serving_keys,
        )
        if code and conn is not None:
            self._send_error(conn, request, 400, code, message)
            return None
        return allowed

    def proxy(self, conn: ClientConnection, request: Request, *, body_routing: bool = True) -> None:
        started = time.monotonic()
        tracer = self.tracer
        if tracer is not None:
            request.trace = tracer.begin(request, request.path)
        if self.pd is not None:
            if body_routing:
                self.pd.proxy(conn, request, started)
            else:  # /get_model_info and friends: the first prefill worker, as 1.13
                self.pd.info(conn, request, started)
            return
        if self.igw and request.path == "/generate" and generate_lacks_model(request.body):
            # Before any worker kind is picked: without a model there is no router to pick.
            self._send_error(conn, request, 400, "missing_model", MISSING_MODEL_MESSAGE)
            return
        # Read before the gRPC check (see grpc_front), and used for the routing below.
        state = self.refresh()
        grpc = self.grpc
        if grpc is not None and body_routing and grpc.handle(conn, request):
            return  # the model's workers are gRPC: smg.grpc.frontend serves it
        model: str | None = None
        stream = False
        text: str | None = None
        if body_routing:
            needs_text = self.needs_text
            try:
                fields = (_text_decoder if needs_text else _routing_decoder).decode(request.body)
            except (msgspec.DecodeError, RecursionError) as exc:
                # RecursionError: nesting deeper than msgspec decodes. Bad input, not a bug.
                reason = str(exc) if isinstance(exc, msgspec.DecodeError) else "nested too deeply"
                self._send_error(conn, request, 400, "invalid_json", f"invalid JSON body: {reason}")
                return
            if fields.model is not None and not isinstance(fields.model, str):
                self._send_error(conn, request, 400, "invalid_request", "'model' must be a string")
                return
            model = fields.model or None
            stream = fields.stream is True
            if needs_text:
                text = prompt_text(fields)  # type: ignore[arg-type]
        if model is not None:
            model = state.aliases.get(model, model)
        # The common case inline (a known model, or none); `_candidates` has the rest.
        rows = state.ready if model is None else state.models_ready.get(model)
        if rows is None:
            rows = self._candidates(state, model)
        if rows is None:
            external = self.external
            if external is not None and model is not None and external.rerouted is not request:
                key = external.caller_key(
                    request.header(b"authorization"), _caller_key_header(request)
                )
                self.spawn(self._refresh_then_proxy(conn, request, key))
                return
            self._send_error(
                conn, request, 404, "model_not_found", f"No worker available for model '{model}'"
            )
            return
        if self.external is not None and rows:
            rows = self._external_rows(conn, request, rows, model)  # type: ignore[assignment]
            if rows is None:
                return
        route = RouteRequest(model=model, stream=stream, text=text)
        if self.key_names is not None:
            header = request.header
            route.routing_key = routing_key(header, self.key_names)
            if route.routing_key is None and self._policy_for(model).implicit_key:
                route.routing_key = implicit_key(header)
            target = header(TARGET_WORKER_HEADER)
            if target:
                route.target_worker = target.decode("latin-1")
        chose_at = time.time_ns() if tracer is not None else 0
        row = self._choose(rows, None, route) if rows else _NONE_READY
        if tracer is not None:
            self._trace_route(request, chose_at, model, rows, row)
        if row < 0:
            status, code, message, extra = self._refusal(row, model)
            self._send_error(conn, request, status, code, message, extra_headers=extra)
            return
        entry = state.entries[row]
        translation = None
        if entry.provider is not None:
            # An external worker: it speaks one API, which may not be the client's.
            try:
                translation = self._translation(request, entry, model)
            except _Unservable as exc:
                self.gate.record(row, entry.generation, CLIENT_LEFT)  # the claim, unused
                self._send_error(conn, request, exc.status, exc.code, str(exc))
                return
        pool = self._pool(row, entry)
        request_id = request.request_id
        body = request.body
        if entry.provider is not None:  # an external worker: the provider's body shape
            path = request.path if translation is None else translation.upstream_path.decode()
            body = transform_body(entry.provider, path, bytes(body))
        if entry.dp_rank is not None:  # a --dp-aware rank worker (smg.dp)
            body = self._dp_body(body, entry.dp_rank)
        wasm = self.wasm
        if wasm is not None and wasm.on_response:
            # OnResponse modules read the answer: ask for it uncompressed.
            request.headers = [h for h in request.headers if h[0] != b"accept-encoding"]
        head = self._upstream_request(request, entry, pool, len(body))
        request.body = b""  # the exchange holds the body now, and drops it once written
        exchange = Exchange(
            self,
            conn,
            row,
            entry.generation,
            pool,
            head,
            body,
            request_id,
            request.path,
            # Only served model names become metric labels: a wildcard worker would
            # otherwise let clients mint unbounded label values.
            model if model in state.models_all else (entry.model_id or ("other" if model else "")),
            stream,
            request.keep_alive,
            request.version == "1.0",
            request.method == b"HEAD",
            started,
        )
        if tracer is not None:
            exchange.trace = request.trace
        if entry.provider is not None:
            exchange.translation = translation
            exchange.worker_api = provider_api(entry.provider)
        if request.history:  # /v1/responses with history: observe the answer
            exchange.translation = request.history
        if wasm is not None and wasm.on_response and self._wasm_answers(conn, request):
            from smg.wasm.chain import ResponseHook

            exchange.translation = ResponseHook(
                wasm, exchange.translation, request.path.encode(), body, stream
            )
        if request.method != b"POST":
            exchange.method = request.method.decode("latin-1")
        if self.cors is not None:
            exchange.cors = self.cors.response(request.header(b"origin"))
        if self.retries_on:
            max_attempts = self.retry_policy.max_attempts
            exchange.allow_retries(
                request, route, max_attempts, max_attempts > 1 and len(body) <= self.max_buffered
            )
        self._in_flight_add(row, entry.generation)
        self.active.add(exchange)
        conn.exchange = exchange
        self.policy.on_dispatch(row)
        exchange.start()

    def proxy_admitted(self, conn: ClientConnection, request: Request) -> None:
        """`proxy` for a request holding an admission permit. The permit goes with the
        Exchange proxy() starts for it (released in `exchange_finished`); when proxy()
        answers without one (bad JSON, no worker, ...) or fails, it is released here.

        The Exchange is recognised as `conn.exchange` not yet in `permit_holders`: an
        answer sent inside proxy() may start the connection's next pipelined request
        (nested, its own permit), whose Exchange is already a holder by then."""
        try:
            self.proxy(conn, request)
        finally:
            exchange = conn.exchange
            # An Exchange, or a gRPC path's GrpcExchange (not an admission Waiter).
            if (
                exchange is not None
                and hasattr(exchange, "attempting")
                and exchange not in self.permit_holders
            ):
                self.permit_holders.add(exchange)
            else:
                self.admission.release()  # type: ignore[union-attr]

    def _translation(
        self, request: Request, entry: DirectoryEntry, model: str | None
    ) -> Translation | None:
        """For a request routed to an external worker: the translation into the API the
        worker speaks (None when it speaks the client's), with the request rewritten for
        it (path, body, no compression asked: the answer is read by smg.translate); or
        raise `_Unservable` when that worker cannot take it."""
        api = provider_api(entry.provider)
        path = request.path
        if api == API_ANTHROPIC:
            if path not in _ANTHROPIC_API_ROUTES:
                raise _Unservable(
                    400,
                    "unsupported_route",
                    f"{path} is not supported for model '{model}': its worker speaks only "
                    "the Anthropic Messages API (use /v1/messages or /v1/chat/completions)",
                )
            if path != _CHAT_ROUTE:
                return None  # Messages and count_tokens pass through
        elif api == API_OPENAI:
            if path == COUNT_TOKENS_ROUTE:
                # The Rust SMG 1.13's OpenAI router answers 501 with these words (tried).
                raise _Unservable(
                    501,
                    "not_implemented",
                    f"Messages token counting not implemented for this router: model "
                    f"'{model}' is served by an OpenAI-API worker, which has no token counting",
                )
            if path != ANTHROPIC_ROUTE:
                return None
        else:
            return None
        from smg.translate import TranslateError, translation

        try:
            body = orjson.loads(request.body)
            if not isinstance(body, dict):
                raise TranslateError("the request body must be a JSON object")
            found = translation(path, body, api, model)
        except (TranslateError, orjson.JSONDecodeError) as exc:
            raise _Unservable(400, "invalid_request", str(exc)) from None
        if found is None:
            return None
        request.url = found.upstream_path
        request.body = found.upstream_body
        request.headers = [h for h in request.headers if h[0] != b"accept-encoding"]
        return found

    # --- worker selection, for the first attempt and every retry --------------------------------

    @staticmethod
    def _candidates(state: RoutingState, model: str | None) -> list[int] | None:
        """The ready rows that may serve `model` (all ready rows without one); None when
        no worker, ready or not, knows the model (404)."""
        if model is None:
            return state.ready
        rows = state.models_ready.get(model)
        if rows is not None:
            return rows
        if model in state.models_all:
            return []
        if not state.any_model_ready and not state.any_model_all:
            return None
        return state.any_model_ready

    def _choose(self, rows: list[int], failed: list[int] | None, route: RouteRequest) -> int:
        """One row through the gate and the policy, or a negative reason (`_refusal`).

        Rows an earlier attempt of this request failed on are left out unless nothing
        else is eligible (then a worker that failed is still better than no answer)."""
        gate = self.gate
        allowed = gate.filter(rows)
        if allowed is None:
            return _SHED
        if route.target_worker is not None:
            return self._target(allowed, route)
        if failed:
            route.retry = True
            fresh = [row for row in allowed if row not in failed]
            if fresh:
                allowed = fresh
        policy = self._policy_for(route.model)
        view = self.view
        while allowed:
            try:
                row = policy.select(allowed, view, route)
            except NoEligibleWorker:
                return _VETOED
            if gate.claim(row):
                return row
            allowed = [other for other in allowed if other != row]
        return _NO_TRIAL

    def _policy_for(self, model: str | None) -> Policy:
        """The policy that routes `model`: its own (from a worker's `policy` label), else
        --policy."""
        policies = self.model_policies
        if policies is None or model is None:
            return self.policy
        return policies.get(model, self.policy)

    def _target(self, allowed: list[int], route: RouteRequest) -> int:
        """X-SMG-Target-Worker: that worker (by id, URL or index among the model's
        workers, as 1.13's consistent_hashing takes it) if it is routable, else no worker
        (503 no_available_workers, as 1.13 answers a target miss)."""
        state = self.state
        target = route.target_worker
        model = route.model
        if model is None:
            candidates = sorted(state.entries)
        else:
            candidates = state.models_all.get(model) or state.any_model_all
        row = -1
        # ASCII digits only (str.isdigit takes "²", which int() refuses), and few enough
        # that int() never meets its digit limit.
        if target is not None and len(target) <= 18 and target.isascii() and target.isdigit():
            index = int(target)
            if index < len(candidates):
                row = candidates[index]
        else:
            for candidate in candidates:
                entry = state.entries.get(candidate)
                if entry is not None and target in (entry.worker_id, entry.url):
                    row = candidate
                    break
        if row in allowed and self.gate.claim(row):
            return row
        return _NONE_READY

    def poll_retry_after(self) -> bytes:
        """The Retry-After line of an overload shed or of no worker loaded yet: the load
        poll interval (1.13)."""
        return b"retry-after: %d\r\n" % max(1, int(self.cfg.load_monitor_interval))

    def _refusal(self, reason: int, model: str | None) -> tuple[int, str, str, bytes]:
        """(status, error code, message, extra header lines) for a `_choose` refusal, in
        the Rust SMG 1.13's words and Retry-After values."""
        if reason == _SHED:
            return (
                503,
                "worker_overload_protection_shed",
                f"All workers for model '{model or 'unknown'}' are overloaded",
                self.poll_retry_after(),
            )
        if reason == _NONE_READY:
            return (
                503,
                "no_available_workers",
                "All workers are unavailable (circuit breaker open or unhealthy)",
                b"retry-after: 1\r\n",
            )
        if reason == _VETOED:
            return (
                503,
                "worker_overload_protection_shed",
                "every worker is at its waiting-queue cap (--least-load-max-waiting-requests)",
                b"",
            )
        return (
            503,
            "no_available_workers",
            "All workers are unavailable (circuit breaker open or unhealthy)",
            self.poll_retry_after(),
        )

    def next_attempt(self, exchange: Exchange) -> tuple[int, str, str, bytes] | None:
        """Point `exchange` at a worker for its next attempt and account the attempt
        (None), or say why there is none (a refusal, as `_refusal`)."""
        request = exchange.request
        route = exchange.route
        body = exchange.body
        if request is None or route is None or body is None:
            return 502, "internal_error", "the request can no longer be retried", b""
        state = self.refresh()
        rows = self._candidates(state, route.model)
        if self.external is not None and rows:
            rows = self._external_rows(None, request, rows, route.model)
        if rows:
            # The body went out in one API (translated or not): the retry stays on it.
            api = getattr(exchange, "worker_api", API_BOTH)
            entries = state.entries
            rows = [r for r in rows if provider_api(entries[r].provider) == api]
        chose_at = time.time_ns() if self.tracer is not None else 0
        row = self._choose(rows, exchange.failed_rows, route) if rows else _NONE_READY
        if self.tracer is not None:
            self._trace_route(request, chose_at, route.model, rows, row)
        if row < 0:
            return self._refusal(row, route.model)
        entry = state.entries[row]
        pool = self._pool(row, entry)
        exchange.row = row
        exchange.generation = entry.generation
        exchange.pool = pool
        if entry.provider is not None:
            translation = exchange.translation  # the body went out in the worker's API
            path = request.path if translation is None else translation.upstream_path.decode()
            exchange.body = body = transform_body(entry.provider, path, body)
        if entry.dp_rank is not None:  # the retry's rank worker's rank replaces the last one
            exchange.body = body = self._dp_body(body, entry.dp_rank)
        exchange.head = self._upstream_request(request, entry, pool, len(body))
        self._in_flight_add(row, entry.generation)
        self.policy.on_dispatch(row)
        return None

    def _trace_route(
        self, request: Request, chose_at: int, model: str | None, rows: list[int] | None, row: int
    ) -> None:
        """The `select_worker` span of a routing decision (tracing on)."""
        worker = self.state.entries[row].url if row >= 0 else None
        error = None if row >= 0 else self._refusal(row, model)[1]
        policy = self._policy_for(model).name
        request.trace.route(chose_at, policy, model, len(rows or ()), worker, error)

    def has_untried_worker(self, exchange: Exchange) -> bool:
        """Whether a worker this request has not failed on may take it now."""
        route = exchange.route
        if route is None:
            return False
        rows = self._candidates(self.refresh(), route.model)
        if self.external is not None and rows and exchange.request is not None:
            rows = self._external_rows(None, exchange.request, rows, route.model)
        allowed = self.gate.filter(rows) if rows else None
        if not allowed:
            return False
        failed = exchange.failed_rows or ()
        return any(row not in failed for row in allowed)

    def _pool(self, row: int, entry: DirectoryEntry) -> WorkerPool:
        key = (row, entry.generation)
        pool = self.pools.get(key)
        if pool is None:
            address = worker_address(entry.url)
            pool = self.pools[key] = WorkerPool(
                self.loop,
                address.host,
                address.port,
                max_connections=self.cfg.upstream_pool_max_per_worker,
                idle_timeout=float(self.cfg.upstream_pool_idle_timeout_secs),
                connect_timeout=float(self.cfg.upstream_connect_timeout_secs),
                ssl_context=self._ssl_context() if address.tls else None,
                host_header=address.host_header.encode("latin-1"),
                path_prefix=address.path.encode("latin-1"),
                stats=self.metrics.pool(entry.url),
            )
        return pool

    def _ssl_context(self) -> ssl.SSLContext:
        """One client context per process for every https:// worker: verified against
        --ca-cert-paths (else the system store), presenting --client-cert-path if set.
        Built from the material the supervisor read before the fork, on first use."""
        if self._tls is None:
            from smg.tlsconf import worker_context_for

            self._tls = worker_context_for(self.cfg)
        return self._tls

    def _request_id(self, request: Request) -> None:
        """The answer's id: the client's (first valid one of the id headers) or a new one.

        Upstream gets an `x-request-id` only when the client sent that header, as the Rust
        SMG does: an engine such as vLLM builds its response ids from it, so a generated id
        would come back with a doubled prefix (`chatcmpl-chatcmpl-...`).
        """
        request.client_id = request.header(b"x-request-id") is not None
        for name in self.request_id_headers:
            value = request.header(name)
            if value is not None and _valid_request_id(value):
                request.request_id = value
                return
        request.request_id = self.new_request_id(request.path)

    def new_request_id(self, path: str) -> bytes:
        self._rid_counter += 1
        prefix = request_id_prefix(path)
        return f"{prefix}{self._rid_token}{self.index:02x}{self._rid_counter:014x}".encode()

    @staticmethod
    def _dp_body(body: Any, rank: int) -> Any:
        """The body with `data_parallel_rank` set (1.13's prepare_request). A body that is
        not a JSON object goes as it is: body routes decoded it as an object already, and
        the others (bodiless GETs) carry no request to pin."""
        if not body:
            return body
        injected = inject_dp_rank(body, rank)
        return body if injected is None else injected

    def _upstream_request(
        self,
        request: Request,
        entry: DirectoryEntry,
        pool: WorkerPool,
        size: int | None = None,
        second_leg: bool = False,
    ) -> bytes:
        """The request head for the worker, ending with the blank line; the body (bytes-like,
        `request.body`) is written after it as it is.

        A worker URL's path prefixes the target (as the Rust SMG joins them); HEAD goes up as
        GET, whose answer the exchange relays without its body (RFC 9110 9.3.2): the
        upstream parser cannot be told that an answer belongs to a HEAD. `size` is the
        body's length when the exchange holds it already (a retry)."""
        prefix = pool.path_prefix
        method = request.method
        tracer = self.tracer
        parts = [
            b"GET" if method == b"HEAD" else method,
            b" ",
            prefix + request.url if prefix else request.url,
            b" HTTP/1.1\r\nhost: ",
            pool.host_header,
            b"\r\n",
        ]
        append = parts.append
        skip = _SKIP_REQUEST_HEADERS if tracer is None else _SKIP_TRACED
        connection = request.header(b"connection")
        if connection is not None:
            # Headers the client named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            skip = skip | {token.strip().lower() for token in connection.split(b",")}
        for name, value in request.headers:
            if name in skip:
                continue
            append(name)
            append(b": ")
            append(value)
            append(b"\r\n")
        if entry.provider is None:
            key = entry.api_key or self._global_api_key
            if key:
                append(b"authorization: Bearer " + key.encode("latin-1") + b"\r\n")
        else:  # an external worker: the caller's own key or the worker's, never the gateway's
            append(self._external_credential(request, entry))
        if size is None:
            size = len(request.body)
        if size or request.method not in (b"GET", b"HEAD"):
            append(b"content-length: %d\r\n" % size)
        if request.client_id:
            append(b"x-request-id: " + request.request_id + b"\r\n")
        if tracer is not None:
            trace = request.trace
            # This attempt's traceparent; a PD prefill leg (`second_leg`) shares its pair's.
            append(trace.second_leg(entry.url) if second_leg else trace.begin_attempt(entry.url))
        append(b"\r\n")
        return b"".join(parts)

    def _external_credential(self, request: Request, entry: DirectoryEntry) -> bytes:
        provider = entry.provider
        assert provider is not None
        key = byok_key(
            provider,
            request.header(b"authorization"),
            _caller_key_header(request),
            self._serving_keys,
        )
        version = request.header(b"anthropic-version") is not None
        return credential_lines(provider, key, entry.api_key, version)

    # --- bookkeeping ------------------------------------------------------------------------------

    def _in_flight_add(self, row: int, generation: int) -> None:
        current = self.local_in_flight.get(row)
        count = current[1] + 1 if current is not None and current[0] == generation else 1
        self.local_in_flight[row] = (generation, count)
        self.table.set_in_flight(self.slot, row, count)

    def _in_flight_done(self, row: int, generation: int) -> None:
        current = self.local_in_flight.get(row)
        if current is None or current[0] != generation:
            return  # the row now belongs to another worker: its counts started from zero
        count = current[1] - 1
        self.local_in_flight[row] = (generation, count)
        self.table.set_in_flight(self.slot, row, count)

    def attempt_done(self, exchange: Exchange, outcome: int) -> None:
        """One attempt ended: its in-flight count, the policy's tally, the gate's outcome
        (the upstream status, or 0 for a transport failure)."""
        row = exchange.row
        generation = exchange.generation
        self._in_flight_done(row, generation)
        self.policy.on_complete(row)
        self.gate.record(row, generation, outcome)
        if self.tracer is not None:
            exchange.trace.end_attempt(outcome, "" if outcome else "upstream transport failure")

    def exchange_finished(self, exchange: Exchange, status: int, error_code: str) -> None:
        """Called exactly once per exchange, after its last attempt."""
        self.active.discard(exchange)
        if exchange.attempting:  # the last attempt ends with the exchange (attempt_done)
            exchange.attempting = False
            row = exchange.row
            generation = exchange.generation
            self._in_flight_done(row, generation)
            self.policy.on_complete(row)
            self.gate.record(row, generation, exchange.outcome)
        if self.tracer is not None:
            trace = exchange.trace
            trace.end_attempt(exchange.outcome, "" if exchange.outcome else error_code)
            trace.finish(status, error_code)
        if exchange.client.exchange is exchange:
            exchange.client.exchange = None
        metrics = self.metrics
        path = exchange.endpoint
        metrics.request(exchange.method, path)
        metrics.response(path, status, error_code)
        metrics.duration(exchange.method, path, time.monotonic() - exchange.started)
        metrics.routed_request(exchange.model, path, exchange.stream, exchange.connection_mode)
        if self.access_log is not None:
            self._log_exchange(exchange, status, error_code)
        holders = self.permit_holders
        if exchange in holders:
            holders.discard(exchange)
            self.admission.release()  # type: ignore[union-attr]

    def _log_exchange(self, exchange: Exchange, status: int, error_code: str) -> None:
        """The access line of a proxied request (--access-log on)."""
        started = self._access_started.pop(exchange.client, None)
        entry = self.state.entries.get(exchange.row)
        worker = (
            entry.url if entry is not None and entry.generation == exchange.generation else None
        )
        log_access(
            self.access_log,  # type: ignore[arg-type]
            access_fields(
                exchange.method,
                exchange.endpoint,
                status,
                error_code,
                worker,
                time.monotonic() - exchange.started,
                exchange.request_id,
                started[1] if started is not None else 0,
                None,  # relayed bytes are not counted (the relay stays a plain write)
            ),
        )

    # --- simple responses ---------------------------------------------------------------------------

    def _send_listed(
        self,
        conn: ClientConnection,
        request: Request,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]],
        dropped: frozenset[str],
        error_code: str | None = None,
    ) -> None:
        """`_send` with the head given as a (name, value) list (`_answer_head`); the error
        code counted is `error_code`, else the list's x-smg-error-code."""
        content_type, extra, listed_code = _answer_head(headers, dropped)
        self._send(
            conn,
            request,
            status,
            body,
            content_type=content_type,
            extra_headers=extra,
            error_code=listed_code if error_code is None else error_code,
        )

    def _send(
        self,
        conn: ClientConnection,
        request: Request,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        extra_headers: bytes = b"",
        error_code: str = "",
        wasm: bool = True,
    ) -> None:
        chain = self.wasm
        if chain is not None and wasm and chain.on_response and self._wasm_answers(conn, request):
            from smg.wasm.chain import local_answer

            answer = local_answer(chain, status, content_type, extra_headers, body, error_code)
            status, content_type, extra_headers = answer.status, answer.content_type, answer.extra
            body, error_code = answer.body, answer.code
        keep_alive = request.keep_alive and not self.draining
        if self.cors is not None:
            extra_headers += self.cors.response(request.header(b"origin"))
        conn.send(
            build_response(
                status,
                body,
                content_type=content_type,
                extra_headers=b"%bx-request-id: %b\r\n%b"
                % (extra_headers, request.request_id, self.process_header),
                keep_alive=keep_alive,
                head_only=request.method == b"HEAD",
            ),
            keep_alive,
        )
        self._count(request, status, error_code, conn, len(body))

    def _send_error(
        self,
        conn: ClientConnection,
        request: Request,
        status: int,
        code: str,
        message: str,
        *,
        extra_headers: bytes = b"",
        wasm: bool = True,
    ) -> None:
        chain = self.wasm
        if chain is not None and wasm and chain.on_response and self._wasm_answers(conn, request):
            # 1.13 runs OnResponse on every answer of its serving routes, the gateway's own too.
            self._wasm_error(conn, request, status, code, message, extra_headers)
            return
        keep_alive = request.keep_alive and not self.draining
        if self.cors is not None:
            extra_headers += self.cors.response(request.header(b"origin"))
        answer = error_response(
            status,
            code,
            message,
            extra_headers=extra_headers + self.process_header,
            keep_alive=keep_alive,
            request_id=request.request_id,
            anthropic=request.path in ANTHROPIC_PATHS,
            head_only=request.method == b"HEAD",
        )
        conn.send(answer, keep_alive)
        size = len(answer) - answer.find(b"\r\n\r\n") - 4 if self.access_log is not None else 0
        self._count(request, status, code, conn, size)

    def _count(
        self,
        request: Request,
        status: int,
        code: str,
        conn: ClientConnection | None = None,
        size: int = 0,
    ) -> None:
        """Metrics (and the access line) for an answer made here; `size`: its body's."""
        path = _metric_path(request.path)
        method = request.method.decode("latin-1")
        self.metrics.request(method, path)
        self.metrics.response(path, status, code)
        if self.access_log is not None:
            started, bytes_in = self._access_started.pop(conn, None) or (time.monotonic(), 0)
            log_access(
                self.access_log,
                access_fields(
                    method,
                    request.path,
                    status,
                    code,
                    None,
                    time.monotonic() - started,
                    request.request_id,
                    bytes_in,
                    0 if request.method == b"HEAD" else size,
                ),
            )
        if self.tracer is not None:
            # A proxied request answered here (bad JSON, no worker, ...): end its span.
            trace = getattr(request, "trace", None)
            if trace is not None:
                request.trace = None
                trace.finish(status, code)

    # --- the Conversations API (smg.dataplane.conversations) ---------------------------------------

    def _conversations(self, conn: ClientConnection, request: Request) -> None:
        """/v1/conversations...: the serving-key check, the route and method, then the store
        call in a task (the history store may be another process or a database)."""
        found = self._history_route(conn, request, conversations)
        if found is None:
            return
        route, method = found

        def call(store: HistoryStore, tenant: str) -> Awaitable[Any]:
            return conversations.serve(
                store, tenant, route[0], method, route[1], route[2], request.query, request.body
            )

        self._history_admit(conn, request, "conversations", call)

    def _history_route(
        self, conn: ClientConnection, request: Request, api: Any
    ) -> tuple[Any, str] | None:
        """The checks both history APIs (`api`: smg.dataplane.conversations or .responses)
        make before their store call: the serving key, the route (404), the method (405),
        and a store to call (501 with --history-backend none). None: answered here."""
        if self._serving_keys and not self._authorized(conn, request, self._serving_keys):
            return None
        if self.wasm is not None and not self._wasm_request(conn, request):
            return None  # 1.13's WASM middleware covers these routes too
        path = request.path
        route = api.match_route(path)
        if route is None:
            self._send_error(
                conn,
                request,
                404,
                "unknown_url",
                invalid_url(request.method.decode("latin-1"), path),
            )
            return None
        method = request.method.decode("latin-1")
        try:
            method = api.check_method(route[0], method, path)
        except conversations.ConvError as exc:
            self._send_method_error(conn, request, exc)
            return None
        if self.cfg.history_backend == "none":
            self._send_error(conn, request, 501, "not_implemented", api.DISABLED)
            return None
        return route, method

    def _history_admit(
        self,
        conn: ClientConnection,
        request: Request,
        what: str,
        call: Callable[[HistoryStore, str], Awaitable[Any]],
    ) -> None:
        """A history route's store call, through admission when it is on: 1.13 puts the
        Conversations and Responses routes (GET and DELETE too) under its admission layer,
        so they take a permit, queue and get its 429/503 refusals as the proxied routes."""
        admission = self.admission
        if admission is None:
            self.spawn(self._history_answer(conn, request, what, call))
            return

        def admitted(conn: ClientConnection, request: Request) -> None:
            task = self.spawn(self._history_answer(conn, request, what, call))
            task.add_done_callback(lambda _task: admission.release())

        if admission.enter(conn, request, admitted):
            admitted(conn, request)

    def _send_method_error(
        self, conn: ClientConnection, request: Request, exc: conversations.ConvError
    ) -> None:
        """A history route's method refusal, with its `allow` line."""
        allow = b"allow: %b\r\n" % exc.allow.encode("latin-1")
        self._send_error(conn, request, exc.status, exc.code, exc.message, extra_headers=allow)

    async def _history_answer(
        self,
        conn: ClientConnection,
        request: Request,
        what: str,
        call: Callable[[HistoryStore, str], Awaitable[Any]],
    ) -> None:
        """One history route's store call (the Conversations API, a stored response), in
        a task: its answer as JSON, or its error (400/404 from the route, 503 when the store
        is unavailable, 500 for anything else)."""
        try:
            store, tenant = self._history(request)
            answer = await call(store, tenant)
        except Exception as exc:  # a request must never take the process down
            self._history_failed(conn, request, what, exc)
            return
        if not conn.closed:
            self._send(conn, request, 200, orjson.dumps(answer))

    def _history_failed(
        self, conn: ClientConnection, request: Request, what: str, exc: Exception
    ) -> None:
        """A history route's failure as its answer: the route's own 400/404, 503 when the
        store is unavailable, 500 (logged) for anything else."""
        if isinstance(exc, conversations.ConvError):
            status, code, message = exc.status, exc.code, exc.message
        elif isinstance(exc, StorageUnavailable):
            log.warning("history store unavailable: %s", exc)
            status, code, message = 503, "storage_unavailable", "the history store is unavailable"
        else:
            self.log_error(f"{what} request failed", exc)
            status, code, message = 500, "internal_error", "internal gateway error"
        if not conn.closed:
            self._send_error(conn, request, status, code, message)

    def _history(self, request: Request) -> tuple[HistoryStore, str]:
        """The history store (opened on first use, in this process's loop, after the fork:
        a database client must not be shared across processes) and the request's tenant."""
        store = self.history_store
        if store is None:
            from smg.history import open_store

            store = self.history_store = open_store(
                self.cfg, in_control_plane=False, root_pid=self.root_pid
            )
        if self._tenant_by_key is None:
            self._tenant_by_key = conversations.tenant_keys_by_secret(
                self.cfg.api_key, tenant_keys(self.cfg)
            )
        presented = auth.presented_key(
            request.header(b"authorization"), request.header(b"x-api-key")
        )
        cfg = self.cfg
        header = (
            request.header(cfg.tenant_header_name.lower().encode("latin-1"))
            if cfg.trust_tenant_header
            else None
        )
        assert store is not None
        return store, conversations.resolve_tenant(presented, self._tenant_by_key, header)

    # --- the Responses API's history (smg.dataplane.responses) ------------------------------------

    def _responses_entry(self, conn: ClientConnection, request: Request) -> None:
        """POST /v1/responses: its admission permit first, then `_responses_post` in a task:
        1.13's admission layer runs before the handler, so a queued request loads no history
        (no store read) until it is admitted. The MCP loop's model calls (loopback
        connections) take no permit: the client's request holds the one permit for the whole
        loop, as 1.13's loop posts to its worker directly; a model call waiting for a permit
        its own caller holds would deadlock at --max-concurrent-requests 1."""
        admission = self.admission
        if admission is None or isinstance(conn.transport, loopback.Collector):
            self.spawn(self._responses_post(conn, request, False))
        elif admission.enter(conn, request, self._responses_admitted):
            self._responses_admitted(conn, request)

    def _responses_admitted(self, conn: ClientConnection, request: Request) -> None:
        self.spawn(self._responses_post(conn, request, True))

    async def _responses_post(self, conn: ClientConnection, request: Request, permit: bool) -> None:
        """POST /v1/responses: load the history it names (previous_response_id,
        conversation) into its input, and observe the answer to store it (`store`, default
        true); then the request goes on as any proxied one. A body that is not a JSON
        object goes on untouched (the worker answers it). `permit`: it holds an admission
        permit, which goes on with the relayed request or is released here."""
        held = permit
        try:
            try:
                body = orjson.loads(request.body)
            except orjson.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                request.history = False
                held = False
                self._responses_relay(conn, request, permit)
                return
            if mcp_responses.wanted(body):  # MCP tools: the tool loop answers
                await mcp_responses.serve(self, conn, request, body)
                return
            backend_on = self.cfg.history_backend != "none"
            expansion = await responses.expand(body, backend_on, lambda: self._history(request))
            if not backend_on:
                request.history = False
            elif expansion.store is None:
                # Nothing to load or store; the answer still gets the request's fields back
                # (store: false among them), as 1.13 patches every answer.
                request.history = responses.Observer(
                    request.body, body.get("stream") is True, _no_write, None, None, False, body
                )
            else:
                store, tenant, conv_tenant = (
                    expansion.store,
                    expansion.tenant,
                    expansion.conv_tenant,
                )
                upstream = orjson.dumps(expansion.upstream(body))

                def done(answer: dict[str, object]) -> asyncio.Future[bool] | None:
                    # The write starts now; the answer's last bytes wait for it (settle()).
                    record = expansion.record(answer)
                    if record is None:
                        return None
                    return self.spawn(self._responses_store(store, tenant, conv_tenant, record))

                request.history = responses.Observer(
                    upstream,
                    body.get("stream") is True,
                    done,
                    expansion.previous,
                    expansion.conversation,
                    expansion.keep,
                    body,
                )
                request.body = upstream
                request.headers = [h for h in request.headers if h[0] != b"accept-encoding"]
            if not conn.closed:
                held = False
                self._responses_relay(conn, request, permit)
        except Exception as exc:  # a request must never take the process down
            self._history_failed(conn, request, "responses", exc)
        finally:
            if held:
                self.admission.release()  # type: ignore[union-attr]

    def _responses_relay(self, conn: ClientConnection, request: Request, permit: bool) -> None:
        """The Responses request relayed; its permit (if any) goes with the Exchange."""
        if permit:
            self.proxy_admitted(conn, request)
        else:
            self.proxy(conn, request)

    async def _responses_store(
        self,
        store: HistoryStore,
        tenant: str,
        conv_tenant: str,
        record: ResponseRecord,
    ) -> bool:
        """After a 2xx answer with `store` (1.13: store=false persists nothing, the
        conversation included): the response record, and the turn's items appended to its
        conversation, before the answer's last bytes go out (Observer.settle). False: the
        write failed (logged); 1.13 then answers a whole response 503 storage_unavailable
        and still streams a stream whole (the exchange does either)."""
        try:
            await store.put_response(tenant, record)
            if record.conversation_id is not None:
                await store.add_items(
                    conv_tenant,
                    record.conversation_id,
                    record.input_items + record.output_items,
                )
        except Exception as exc:
            log.warning("storing response %s failed: %r", record.id, exc)
            return False
        return True

    def _responses_get(self, conn: ClientConnection, request: Request) -> None:
        """GET/DELETE /v1/responses/{id}, GET .../input_items."""
        found = self._history_route(conn, request, responses)
        if found is None:
            return
        route, method = found

        def call(store: HistoryStore, tenant: str) -> Awaitable[Any]:
            return responses.serve(store, tenant, route[0], method, route[1], request.query)

        self._history_admit(conn, request, "responses", call)

    # --- admin: forwarded to the control plane ----------------------------------------------------

    async def _admin(self, conn: ClientConnection, request: Request) -> None:
        # The control plane judges the call (smg.control.cpauth): it gets the credential as
        # presented, the socket's peer address (never a header such as X-Forwarded-For)
        # and the request id for its audit line. They travel only on the local channel.
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        authorization = request.header(b"authorization")
        x_api_key = request.header(b"x-api-key")
        method = "GET" if request.method == b"HEAD" else request.method.decode("latin-1")
        try:
            status, headers, body = await ipc.call(
                ipc.control_plane_address(self.root_pid),
                {
                    "kind": "admin",
                    "method": method,
                    "path": request.path,
                    "query": request.query,
                    "body": bytes(request.body),
                    "auth": {
                        "method": request.method.decode("latin-1"),
                        "authorization": None
                        if authorization is None
                        else authorization.decode("latin-1"),
                        "x_api_key": None if x_api_key is None else x_api_key.decode("latin-1"),
                        "peer": host,
                        "request_id": request.request_id.decode("latin-1"),
                    },
                },
                timeout=_admin_timeout(method, request.path),
            )
        except Exception as exc:
            # Expected while the control plane is being replaced: one line, no traceback.
            log.warning("admin call to the control plane failed: %r", exc)
            self._send_error(
                conn, request, 503, "control_plane_unavailable", "the control plane did not answer"
            )
            return
        if conn.closed:
            return
        # Let the change reach this process's routing before the client's next request.
        self.refresh()
        # The answer carries this request's id (set by _send) and the control plane's
        # content-type; its x-smg-error-code is counted in smg_http_responses_total.
        self._send_listed(conn, request, status, body, headers, _ADMIN_DROPPED)

    def metric_families(self) -> list[Any]:
        """Every series this process counts (scraped, and pushed once more at exit)."""
        families = self.metrics.families(self.index)
        families += self.gate.families(self.state.entries, self.index)
        if self.admission is not None:
            families += self.admission.families(self.index)
        if self.wasm_chain is not None:
            families += self.wasm_chain.families(self.index)
        if self.pd is not None:
            families += self.pd.families(self.index)
        return families

    async def on_ipc(self, message: Any) -> Any:
        kind = message.get("kind") if isinstance(message, dict) else None
        if kind == "metrics":
            self.metrics.connections_active = len(self.connections)
            return self.metric_families()
        if kind == "stats":
            return {
                "process": self.index,
                "connections": len(self.connections),
                "active": len(self.active),
                "in_flight": {str(row): count for row, (_g, count) in self.local_in_flight.items()},
                "admission": None if self.admission is None else self.admission.stats(),
            }
        return {"error": f"unknown message kind {kind!r}"}

    def log_error(self, message: str, exc: BaseException | None) -> None:
        log.error("%s: %r", message, exc, exc_info=exc)


class _Unservable(Exception):
    """The chosen worker cannot take this request (its API lacks the route, or the
    request cannot be expressed in it): (status, error code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_DEFAULT_RID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
_KNOWN_PATHS = (
    PROXY_ROUTES
    | WORKER_INFO_ROUTES
    | {
        "/liveness",
        "/health",
        "/readiness",
        "/v1/models",
        "/workers",
        "/get_loads",
        "/flush_cache",
        "/start_profile",
        "/stop_profile",
        "/wasm",
    }
)


# Header names an answer built from a (name, value) list leaves out (_send writes them).
_ADMIN_DROPPED = frozenset({"x-request-id"})


def _answer_head(
    headers: list[tuple[str, str]], dropped: frozenset[str]
) -> tuple[bytes, bytes, str]:
    """A (name, value) header list -> the answer's content-type (application/json when it
    has none), its other lines for `_send` (less `dropped`; names compared lowercase, sent
    as given) and its x-smg-error-code ('' when none)."""
    content_type = b"application/json"
    error_code = ""
    extra = []
    for name, value in headers:
        lower = name.lower()
        if lower == "content-type":
            content_type = value.encode("latin-1")
            continue
        if lower in dropped:
            continue
        if lower == "x-smg-error-code":
            error_code = value
        extra.append(name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n")
    return content_type, b"".join(extra), error_code


def _no_write(_answer: dict[str, Any]) -> None:
    """An Observer's `done` for a turn that is not stored."""


def _caller_key_header(request: Request) -> bytes | None:
    """A provider key the caller presented outside Authorization: `x-api-key` (Anthropic's
    header, and where a caller authenticated by a gateway Bearer key brings its own), or
    Gemini's `x-goog-api-key`."""
    value = request.header(b"x-api-key")
    return value if value is not None else request.header(b"x-goog-api-key")


# How long an admin call may take on the control plane. POST /wasm compiles the modules
# there (an 18 MB Python guest took 13 s on an idle 2-core box and over 30 s on a loaded
# one): answering 503 while the control plane goes on to add the module would tell the
# caller it failed when it did not, so that call waits up to the compile bound.
ADMIN_TIMEOUT_S = 30.0
WASM_ADD_TIMEOUT_S = 600.0


def _admin_timeout(method: str, path: str) -> float:
    return WASM_ADD_TIMEOUT_S if method == "POST" and path == "/wasm" else ADMIN_TIMEOUT_S


def _metric_path(path: str) -> str:
    if path in _KNOWN_PATHS:
        return path
    if path.startswith("/workers/"):
        return "/workers/{id}"
    if path.startswith("/wasm/"):
        return "/wasm/{id}"
    if path.startswith(conversations.PREFIX):
        route = conversations.match_route(path)
        return conversations.METRIC_PATHS[route[0]] if route else "other"
    if path.startswith(responses.PREFIX):  # ids would make one series per response
        found = responses.match_route(path)
        return responses.METRIC_PATHS[found[0]] if found else "other"
    return "other"
