"""The WASM modules of one data-plane process, run in order on the serving routes.

The control plane publishes the module list with the worker directory
(`smg.shm.directory.WasmModuleEntry`); each data-plane process `sync`s its chain to it when
the directory's generation moves: a new module is loaded from its compiled artifact (never
compiled again), a removed one dropped. Components are instantiated here, after the fork.

As the Rust SMG 1.13's middleware (model_gateway/src/middleware/wasm.rs): OnRequest modules
see the request (method, path, query, headers, body, request id, time) in order, each the
previous one's result; `reject(status)` answers at once; `modify` sets/adds/removes headers
and replaces the body. OnResponse modules see a whole (not streamed) answer and may change
its status, headers and body. Header changes are `smg.wasm.types.apply_headers` (1.13's
`apply_modify_action_to_headers`: set, then add, then remove; a name or value that is not a
valid header is skipped, so a module cannot inject header lines).

Where smg differs (on purpose): a module that traps, runs out of time or memory, or cannot be
loaded fails the request with a 500 (1.13 logs it and goes on as if it had answered
`continue`, which would let a broken auth module wave every request through).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from smg.httpwire import error_body
from smg.promtext import Family, Sample
from smg.shm.directory import WasmModuleEntry
from smg.wasm.types import (
    CONTINUE,
    Continue,
    Limits,
    Modify,
    Reject,
    WasmRequest,
    WasmResponse,
    WasmTrap,
    apply_headers,
)

log = logging.getLogger("smg.wasm")

Headers = list[tuple[str, str]]


RawHeaders = list[tuple[bytes, bytes]]


def decoded(headers: RawHeaders) -> Headers:
    """The parsed request's header lines as the chain's str headers: Latin-1 (every byte a
    character, as the parser keeps them), names lower-cased."""
    return [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in headers]


def module_view(headers: Headers) -> Headers:
    """`smg.wasm.types.headers_for_module` (the headers 1.13 shows a module: visible ASCII
    values, tab allowed) for lower-case names, with a fast path: `isprintable()` on an ASCII
    string is exactly 0x20-0x7E, so only a value with a tab or a control character takes the
    per-character check (measured: 10 headers, 50 us -> 3 us per module call)."""
    out = []
    for name, value in headers:
        if value.isascii() and (value.isprintable() or _visible_or_tab(value)):
            out.append((name, value))
    return out


def _visible_or_tab(value: str) -> bool:
    return all(c == "\t" or " " <= c <= "~" for c in value)


def reject_status(status: int) -> int:
    """The status a `reject` answers with: 1.13 takes any valid code, else 400 (a 1xx is
    not a final answer, so smg takes 200-999)."""
    return status if 200 <= status <= 999 else 400


@dataclass
class ModuleStats:
    invocations: int = 0
    rejections: int = 0
    # Failed calls (the request answered 500) by kind: smg.wasm.types.WasmTrap's kinds
    # (trap, timeout, memory, stack, invalid, body), "load" (not loaded), "error" (a bug).
    traps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    max_seconds: float = 0.0


@dataclass
class LoadedModule:
    entry: WasmModuleEntry
    runner: Any | None  # smg.wasm.runtime.ModuleRunner; None when it failed to load
    load_error: str = ""
    stats: ModuleStats = field(default_factory=ModuleStats)
    # The runner's on_request_raw (the parsed request's bytes lowered in C), looked up once.
    on_request_raw: Callable[..., Any] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.on_request_raw = getattr(self.runner, "on_request_raw", None)


@dataclass
class Outcome:
    """What the chain decided: `status` 0 goes on (with `headers`/`body`, maybe changed);
    otherwise answer `status` (a reject, or 500 with `message` when a module failed)."""

    status: int
    headers: Headers
    body: bytes
    module: str = ""
    message: str = ""
    failed: bool = False
    changed: bool = False
    response_status: int = 0  # OnResponse: the answer's status after the modules


Loader = Callable[[WasmModuleEntry], Any]


class WasmChain:
    def __init__(self, loader: Loader, limits: Limits) -> None:
        self.loader = loader
        self.limits = limits
        self.modules: list[LoadedModule] = []
        self.on_request: tuple[LoadedModule, ...] = ()
        self.on_response: tuple[LoadedModule, ...] = ()
        # Every module ever run here, by id, kept after its removal so that its counts
        # never go backwards in /metrics.
        self.stats: dict[str, tuple[str, ModuleStats]] = {}

    def __bool__(self) -> bool:
        return bool(self.modules)

    def sync(self, entries: Iterable[WasmModuleEntry]) -> None:
        """Load what is new, drop what is gone, keep the published order."""
        have = {m.entry.module_id: m for m in self.modules}
        modules = []
        for entry in entries:
            loaded = have.get(entry.module_id)
            if loaded is None:
                loaded = self._load(entry)
            modules.append(loaded)
        self.modules = modules
        self.on_request = tuple(m for m in modules if "OnRequest" in m.entry.attach_points)
        self.on_response = tuple(m for m in modules if "OnResponse" in m.entry.attach_points)

    def _load(self, entry: WasmModuleEntry) -> LoadedModule:
        known = self.stats.get(entry.module_id)
        stats = known[1] if known else ModuleStats()
        self.stats[entry.module_id] = (entry.name, stats)
        try:
            runner = self.loader(entry)
        except Exception as exc:  # a module this process cannot load fails its requests
            log.error("WASM module %s (%s) not loaded: %r", entry.name, entry.module_id, exc)
            return LoadedModule(entry, None, f"{type(exc).__name__}: {exc}", stats)
        log.info("WASM module %s (%s) loaded", entry.name, entry.module_id)
        return LoadedModule(entry, runner, "", stats)

    # --- running -------------------------------------------------------------------------------

    def _call(self, module: LoadedModule, name: str, *args: Any) -> Any:
        """One module's answer (its runner's `name` on `args`), counted; an Outcome (500) when
        it failed."""
        stats = module.stats
        stats.invocations += 1
        if module.runner is None:
            stats.traps["load"] = stats.traps.get("load", 0) + 1
            return _failed(module, f"it could not be loaded in this process ({module.load_error})")
        call = module.on_request_raw if name == "on_request_raw" else getattr(module.runner, name)
        started = time.perf_counter()
        kind = ""
        try:
            action = call(*args)
        except WasmTrap as exc:
            kind = getattr(exc, "kind", "trap")
            action = _failed(module, str(exc))
        except Exception as exc:  # a runner's bug must fail this request only
            log.exception("WASM module %s raised", module.entry.name)
            kind = "error"
            action = _failed(module, f"{type(exc).__name__}: {exc}")
        took = time.perf_counter() - started
        stats.seconds += took
        if took > stats.max_seconds:
            stats.max_seconds = took
        if action is CONTINUE:  # the common answer: nothing more to check or count
            return action
        if not isinstance(action, (Continue, Reject, Modify, Outcome)):
            kind = "invalid"
            action = _failed(module, f"it answered {type(action).__name__}, not an action")
        if isinstance(action, Outcome):
            stats.traps[kind] = stats.traps.get(kind, 0) + 1
        elif isinstance(action, Reject):
            stats.rejections += 1
        return action

    def run_request(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        request_id: str,
        changed: bool = False,
        start: int = 0,
    ) -> Outcome:
        """The OnRequest modules from the `start`th on, each seeing the last one's result."""
        for module in self.on_request[start:]:
            request = WasmRequest(
                method=method,
                path=path,
                query=query,
                # A module sees the headers 1.13 shows (visible ASCII values); its changes
                # apply to all of them.
                headers=module_view(headers),
                body=body,
                request_id=request_id,
                now_epoch_ms=time.time_ns() // 1_000_000,
            )
            step = _request_step(module, self._call(module, "on_request", request), headers, body)
            if step is not None:
                if step.status:
                    return step
                headers, body, changed = step.headers, step.body, True
        return Outcome(0, headers, body, changed=changed)

    def run_request_parsed(
        self,
        method: bytes,
        path: str,
        query: str,
        raw: RawHeaders,
        body: bytes,
        request_id: bytes,
    ) -> Outcome:
        """run_request on the data plane's parsed request (its bytes): while the modules answer
        `continue`, each gets them lowered in C (ModuleRunner.on_request_raw: no WasmRequest, no
        str per header; the same values). The str headers are made only when a module answers
        anything else, or has no on_request_raw, and the rest runs as run_request. An unchanged
        Outcome's `headers` are not the request's: it goes on with its own."""
        for i, module in enumerate(self.on_request):
            if module.on_request_raw is None:
                break
            now = time.time_ns() // 1_000_000
            action = self._call(
                module, "on_request_raw", method, path, query, raw, body, request_id, now
            )
            if action is CONTINUE:
                continue
            step = _request_step(module, action, decoded(raw), body)
            if step is None:
                continue
            if step.status:
                return step
            return self.run_request(
                method.decode("latin-1"), path, query, step.headers, step.body,
                request_id.decode("latin-1"), changed=True, start=i + 1,
            )  # fmt: skip
        else:
            return Outcome(0, [], body)
        return self.run_request(
            method.decode("latin-1"), path, query, decoded(raw), body,
            request_id.decode("latin-1"), start=i,
        )  # fmt: skip

    def run_response(self, status: int, headers: Headers, body: bytes) -> Outcome:
        """The OnResponse modules on a whole answer. `response_status` is the status to
        answer with; `status` != 0 only when a module failed (500)."""
        changed = False
        for module in self.on_response:
            shown = module_view(headers)
            action = self._call(
                module, "on_response", WasmResponse(status=status, headers=shown, body=body)
            )
            if isinstance(action, Outcome):
                return action
            if isinstance(action, Reject):
                # 1.13: the answer so far, with the reject's status.
                return Outcome(
                    0, headers, body, module.entry.name, changed=True,
                    response_status=reject_status(action.status),
                )  # fmt: skip
            if isinstance(action, Modify):
                if action.status is not None and 200 <= action.status <= 999:
                    status = action.status
                headers = apply_headers(headers, action)
                if action.body_replace is not None:
                    body = bytes(action.body_replace)
                changed = True
        return Outcome(0, headers, body, changed=changed, response_status=status)

    # --- metrics -------------------------------------------------------------------------------

    def families(self, process: int) -> list[Family]:
        proc = ("process", str(process))
        series: dict[str, list[Sample]] = {
            "invocations": [],
            "rejections": [],
            "traps": [],
            "seconds": [],
            "max": [],
        }
        for module_id, (name, stats) in self.stats.items():
            labels = [("module_id", module_id), ("module", name), proc]
            series["invocations"].append(Sample("", labels, stats.invocations))
            series["rejections"].append(Sample("", labels, stats.rejections))
            for kind, count in sorted(stats.traps.items()):
                series["traps"].append(Sample("", [*labels, ("kind", kind)], count))
            series["seconds"].append(Sample("", labels, stats.seconds))
            series["max"].append(Sample("", labels, stats.max_seconds))
        return [
            Family(
                "smg_wasm_invocations_total", "counter", HELP_INVOCATIONS, series["invocations"]
            ),
            Family("smg_wasm_rejections_total", "counter", HELP_REJECTIONS, series["rejections"]),
            Family("smg_wasm_traps_total", "counter", HELP_TRAPS, series["traps"]),
            Family("smg_wasm_execution_seconds_total", "counter", HELP_SECONDS, series["seconds"]),
            Family("smg_wasm_execution_seconds_max", "gauge", HELP_MAX, series["max"]),
        ]


HELP_INVOCATIONS = "WASM module calls (OnRequest and OnResponse)"
HELP_REJECTIONS = "WASM module calls that answered reject"
HELP_TRAPS = (
    "WASM module calls that failed (trap, time or memory limit, not loaded): the request "
    "answered 500"
)
HELP_SECONDS = "Time spent in WASM module calls"
HELP_MAX = "The longest WASM module call in this process"


def _request_step(
    module: LoadedModule, action: Any, headers: Headers, body: bytes
) -> Outcome | None:
    """What an OnRequest module's answer does: None goes on unchanged; an Outcome with a
    status ends the chain (a reject, or the module failed); one without goes on with its
    headers and body (a modify)."""
    if isinstance(action, Outcome):
        return action
    if isinstance(action, Reject):
        return Outcome(reject_status(action.status), headers, body, module.entry.name)
    if isinstance(action, Modify):
        headers = apply_headers(headers, action)
        if action.body_replace is not None:
            body = bytes(action.body_replace)
        return Outcome(0, headers, body, changed=True)
    return None


def _failed(module: LoadedModule, reason: str) -> Outcome:
    return Outcome(
        500,
        [],
        b"",
        module.entry.name,
        f"WASM module '{module.entry.name}' failed: {reason}",
        failed=True,
    )


def artifact_loader(limits: Limits) -> Loader:
    """The loader of a data-plane process: the artifact read and checked against its
    published digest, then deserialized with this process's engine (smg.wasm.runtime's
    per-pid EngineOwner: made on first use, after the fork)."""

    def load(entry: WasmModuleEntry) -> Any:
        from smg.wasm.runtime import ModuleRunner

        with open(entry.artifact_path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry.artifact_sha256:
            raise ValueError(f"artifact {entry.artifact_path} is not the one published")
        return ModuleRunner(None, data, limits)  # the process's own engine (per pid)

    return load


# Worker headers an OnResponse module is not shown (framing and the gateway's own; the
# answer is written with a new length and its x-request-id).
_HIDDEN = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"content-encoding",
        b"x-request-id",
        b"x-smg-process",
    }
)


class ResponseHook:
    """The OnResponse modules on a proxied answer: a pass-through `Translation`
    (smg.translate's protocol) around the exchange's own (an external worker's translation,
    /v1/responses' history Observer) or none. A whole answer is held by the exchange and
    handed to `wasm_answer` once complete (status, headers and body may change); a 2xx event
    stream is relayed untouched, as 1.13 skips OnResponse for streams."""

    def __init__(
        self, chain: WasmChain, inner: Any | None, path: bytes, body: bytes, stream: bool
    ) -> None:
        self.chain = chain
        self.inner = inner
        self.upstream_path: bytes = inner.upstream_path if inner is not None else path
        self.upstream_body: bytes = inner.upstream_body if inner is not None else body
        self.stream = stream
        settle = getattr(inner, "settle", None)
        if settle is not None:
            self.settle = settle

    def response(self, status: int, body: bytes) -> bytes:
        return self.inner.response(status, body) if self.inner is not None else body

    def feed(self, data: bytes) -> bytes:
        return self.inner.feed(data) if self.inner is not None else data

    def finish(self) -> bytes:
        return self.inner.finish() if self.inner is not None else b""

    def abort(self, code: str, message: str) -> bytes:
        if self.inner is not None:
            return self.inner.abort(code, message)
        # The plain relay's event for a broken stream (1.13's "stream_error").
        body = orjson.dumps({"error": {"message": message, "type": "stream_error", "code": code}})
        return b"data: %b\n\ndata: [DONE]\n\n" % body

    def wasm_answer(self, exchange: Any, status: int, body: bytes) -> tuple[int, bytes]:
        """The whole answer through the modules: (status, body) to write; the exchange's
        held headers are replaced by the modules' when they changed them."""
        chain = self.chain
        if len(body) > chain.limits.max_body_bytes:
            exchange.held_headers = []
            return 500, error_body(
                500,
                "response_too_large",
                f"Failed to read response body: over the WASM body limit of "
                f"{chain.limits.max_body_bytes} bytes",
            )
        headers = [
            (n.decode("latin-1").lower(), v.decode("latin-1"))
            for n, v in exchange.held_headers or ()
            if n.lower() not in _HIDDEN
        ]
        outcome = chain.run_response(status, headers, body)
        if outcome.failed:
            exchange.held_headers = []
            return 500, error_body(500, "wasm_module_failed", outcome.message)
        if not outcome.changed:
            return status, body
        exchange.held_headers = [
            (n.encode("latin-1"), v.encode("latin-1")) for n, v in outcome.headers
        ]
        return outcome.response_status, outcome.body


# Lines of a gateway-made answer that a module is neither shown nor can set: the framing and
# the gateway's own (written again with the answer).
_LOCAL_DROPPED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "x-request-id",
        "x-smg-process",
    }
)


@dataclass
class LocalAnswer:
    """A whole answer the gateway made itself, after the OnResponse modules: its status,
    content type, other header lines (CRLF-ended, as the writers take them), body and the
    error code to count ('' for none)."""

    status: int
    content_type: bytes
    extra: bytes
    body: bytes
    code: str


def local_answer(
    chain: WasmChain, status: int, content_type: bytes, extra: bytes, body: bytes, code: str = ""
) -> LocalAnswer:
    """A whole answer the gateway makes itself (the Conversations and stored-Responses
    routes, tokenize/detokenize, gRPC workers' answers, the MCP loop's, its own errors)
    through the OnResponse modules, as 1.13 runs its middleware on every answer of those
    routes. Modules see the content type and the given lines; a failed module makes the
    answer 500 wasm_module_failed."""
    headers = [("content-type", content_type.decode("latin-1"))]
    for line in extra.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            low = name.strip().decode("latin-1").lower()
            if low not in _LOCAL_DROPPED:
                headers.append((low, value.strip().decode("latin-1")))
    outcome = chain.run_response(status, headers, body)
    if outcome.failed:
        failed = "wasm_module_failed"
        return LocalAnswer(
            500,
            b"application/json",
            b"x-smg-error-code: wasm_module_failed\r\n",
            error_body(500, failed, outcome.message),
            failed,
        )
    if not outcome.changed:
        return LocalAnswer(status, content_type, extra, body, code)
    content_type = b"application/json"  # as `_send` writes an answer with none
    lines = []
    for name, value in outcome.headers:
        if name == "content-type":
            content_type = value.encode("latin-1")
        elif name not in _LOCAL_DROPPED:
            if name == "x-smg-error-code":
                code = value
            lines.append(b"%b: %b\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    return LocalAnswer(outcome.response_status, content_type, b"".join(lines), outcome.body, code)
