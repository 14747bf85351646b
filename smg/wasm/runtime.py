"""The WASM component runtime (wasmtime): compile once in the control plane, load the artifact in every data-plane
process, run a module per call in a fresh store and instance.

As 1.13 (crates/wasm/src/runtime.rs): a fresh Store and instance for every call (a module never sees another
request's data), epoch interruption with 100 ms ticks and a deadline of max_execution_ms / 100 ticks, a store
memory limit, the stack limit in the engine config, WASI p2 linked with an empty context for components built
for wasm32-wasip2. Unlike 1.13, a component must export the interfaces of its attach points to be added at all
(1.13 accepts any component and fails each call with "no exported instance named ...").

Where a call's time goes (trivial module, 180-byte body, 4 headers; CPU time, this 2-core shared machine, in a
loop): ~53 us with an mmap/munmap of a fresh memory per instance (~13 us of it system time), ~30 us with wasmtime's
pooling instance allocator (as 1.13; memory kept resident, reset by memset), ~23-25 us through ctypes over plain
addresses. Of those, in Python: lowering the request ~8 us, the dozen ctypes calls and lifting; in wasmtime: a store
made and dropped ~3.5 us, instantiation ~4.5 us, the call ~8 us (the C API carries a list<u8> as one 32-byte value
per byte, converted and lowered one by one: ~25-45 ns per body byte). smg/wasm/_fastcall.c (an optional C
extension, used when built) does the lowering and the whole store -> instantiate -> call -> delete sequence in one
C call with the GIL released, and answers `continue` without lifting: measured side by side on the same (loaded)
box, 64 -> 17 us a call in a loop, and in the gateway 56-60 us of thread CPU time under wrk (the ctypes path's
~58 us before was on a quiet box; caches and TLB are cold between requests, so everything costs 2-3x the loop's)
(native_bench/RESULTS-2026-11-29-wasm.md). smg_wasm_execution_seconds is wall time, which on an oversubscribed
box includes being preempted.

Limits that differ from 1.13: wasmtime-py's store limiter cannot trap on a failed memory.grow (1.13 sets
trap_on_grow_failure), so a module over 64 MiB sees memory.grow return -1 and traps on its own (Rust's allocator
aborts: "unreachable"); either way the call fails as a WasmTrap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from ctypes import (
    POINTER,
    addressof,
    c_bool,
    c_size_t,
    c_uint64,
    c_void_p,
    cast,
    create_string_buffer,
    sizeof,
)
from functools import partial
from typing import Any

import wasmtime
from wasmtime import _bindings as _raw
from wasmtime import _ffi as ffi
from wasmtime import component as wc

from smg.wasm import capi
from smg.wasm.chain import decoded, module_view
from smg.wasm.types import (
    ATTACH_POINTS,
    CONTINUE,
    EXPORTS,
    Action,
    Limits,
    WasmError,
    WasmRequest,
    WasmResponse,
    WasmTrap,
)

EPOCH_INTERVAL_S = 0.1  # 1.13's EPOCH_INTERVAL_MS
TYPES_IMPORT = "smg:gateway/middleware-types"


# Instance slots per engine (one engine per process and stack limit). Calls in a data-plane process run one at a
# time and free their store on return, so a few slots suffice; 1.13 (crates/wasm/src/runtime.rs) uses 20.
POOL_SLOTS = 32
# Memory (and table) bytes a freed slot keeps mapped and resets with memset instead of madvise: a trivial
# module's pages are reset without a system call (measured: 13 us of system time per call -> 0). wasmtime
# memsets min(this, the memory's size) on EVERY call, touched or not, and gives the rest back with one
# madvise (only the pages the call touched are then faulted in again): 64 KiB covers a one-page module
# whole, and a Rust-shaped 17-page memory (1 MiB shadow stack) is not memset whole per call (measured in a
# loop, same box: 17 pages 55 -> 36 us a call; one page 24 us either way; 8-16 KiB slower for one page,
# 0 slower for both: RESULTS-2026-11-29-wasm.md).
POOL_KEEP_RESIDENT = 64 * 1024


def new_engine(limits: Limits, pooling: bool = True) -> wasmtime.Engine:
    """The engine config an artifact is compiled AND loaded with (Component.deserialize checks they match).

    `pooling`: wasmtime's pooling instance allocator, as 1.13's: every call still gets a FRESH instance (the
    guarantee that a module never sees another request's data is wasmtime's: a slot's memory is reset to the
    module's initial image, zeroed or copied, before it is reused), but its memory, tables and instance record
    come from slots reserved once instead of mmap/munmap per call (measured, trivial module, 180-byte body:
    ~60 -> ~35 us CPU per call). The control plane, which only compiles, does not reserve slots."""
    cfg = wasmtime.Config()
    cfg.wasm_component_model = True
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = limits.max_stack_bytes
    # A 64 MiB reservation and a 64 KiB guard instead of wasmtime's 4 GiB + 32 MiB: explicit bounds checks in
    # the module's code, but ~30% less time to create and drop an instance (measured: 33 -> 23 us), which every
    # call pays. A pooled memory cannot move, so a limit above 64 MiB reserves the whole limit (the compiling
    # engine too: the reservation is part of the compiled code's settings).
    cfg.memory_reservation = max(64 * 1024 * 1024, limits.max_memory_bytes)
    cfg.memory_guard_size = 64 * 1024
    if pooling:
        pool = ffi.wasmtime_pooling_allocation_config_new()
        try:
            ffi.wasmtime_pooling_allocation_config_max_memory_size_set(
                pool, limits.max_memory_bytes
            )
            ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, POOL_SLOTS)
            ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, POOL_SLOTS)
            ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, POOL_SLOTS)
            ffi.wasmtime_pooling_allocation_config_total_component_instances_set(pool, POOL_SLOTS)
            ffi.wasmtime_pooling_allocation_config_total_stacks_set(pool, 0)  # no async stacks here
            ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(
                pool, POOL_KEEP_RESIDENT
            )
            ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, POOL_KEEP_RESIDENT)
            ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pool)
        finally:
            ffi.wasmtime_pooling_allocation_config_delete(pool)
    return wasmtime.Engine(cfg)


# --- structural check of the exports against the WIT world -------------------------------------------------


def _shape(ty: Any) -> Any:
    """A WIT type as nested tuples, to compare a component's function types with smg.wit structurally."""
    if isinstance(ty, wc.RecordType):
        return ("record", tuple((n, _shape(t)) for n, t in ty.fields))
    if isinstance(ty, wc.VariantType):
        return ("variant", tuple((n, None if t is None else _shape(t)) for n, t in ty.cases))
    if isinstance(ty, wc.OptionType):
        return ("option", _shape(ty.payload))
    if isinstance(ty, wc.ListType):
        return ("list", _shape(ty.element))
    return type(ty).__name__


_HEADERS = ("list", ("record", (("name", "String"), ("value", "String"))))
_BYTES = ("list", "U8")
_ACTION = (
    "variant",
    (
        ("continue", None),
        ("reject", "U16"),
        (
            "modify",
            (
                "record",
                (
                    ("status", ("option", "U16")),
                    ("headers-set", _HEADERS),
                    ("headers-add", _HEADERS),
                    ("headers-remove", ("list", "String")),
                    ("body-replace", ("option", _BYTES)),
                ),
            ),
        ),
    ),
)
_SIGNATURES = {
    "OnRequest": (
        (
            "record",
            (
                ("method", "String"),
                ("path", "String"),
                ("query", "String"),
                ("headers", _HEADERS),
                ("body", _BYTES),
                ("request-id", "String"),
                ("now-epoch-ms", "U64"),
            ),
        ),
        _ACTION,
    ),
    "OnResponse": (
        ("record", (("status", "U16"), ("headers", _HEADERS), ("body", _BYTES))),
        _ACTION,
    ),
}


def _check_component(
    engine: wasmtime.Engine, component: wc.Component, attach_points: list[str]
) -> None:
    ctype = component.type
    for name in ctype.imports(engine):
        # smg's world imports only the types interface; wasm32-wasip2 builds also import WASI (linked, empty).
        if name != TYPES_IMPORT and not name.startswith("wasi:"):
            raise WasmError(f"component imports {name!r}, which smg does not provide")
    exports = ctype.exports(engine)
    for point in attach_points:
        iface, func = EXPORTS[point]
        ext = exports.get(iface)
        inst_ty = ext.ty if ext is not None else None
        if not isinstance(inst_ty, wc.ComponentInstanceType):
            raise WasmError(f"component does not export {iface} (needed for {point})")
        fext = inst_ty.exports(engine).get(func)
        fty = fext.ty if fext is not None else None
        if not isinstance(fty, wc.FuncType):
            raise WasmError(f"component's {iface} has no function {func}")
        params = [_shape(t) for _, t in fty.params]
        result = None if fty.result is None else _shape(fty.result)
        want_param, want_result = _SIGNATURES[point]
        if params != [want_param] or result != want_result:
            raise WasmError(f"{iface}#{func} does not match the smg:gateway WIT signature")


def compile_component(data: bytes, limits: Limits, attach_points: list[str] | None = None) -> bytes:
    """Validate and compile a component once (control plane); the serialized artifact for ModuleRunner."""
    limits.validate()
    points = list(ATTACH_POINTS) if attach_points is None else attach_points
    for point in points:
        if point not in EXPORTS:
            raise WasmError(f"unknown attach point {point!r}")
    engine = new_engine(limits, pooling=False)
    source: bytes | str = data
    if data[:4] != b"\0asm":
        # The component text format (`(component ...)`) compiles directly, as `wasmtime` does for .wat files.
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise WasmError("not a WebAssembly binary or text file") from None
    try:
        component = wc.Component(engine, source)
    except wasmtime.WasmtimeError as e:
        # 1.13's words (wasm_module_registration's validate_wasm_component), with wasmtime's cause.
        raise WasmError(
            f"Invalid WASM component: {_cause(e)}. Hint: The WASM file must be in component format. If you're "
            "using wit-bindgen, use 'wasm-tools component new' to wrap the WASM module into a component."
        ) from None
    _check_component(engine, component, points)
    return bytes(component.serialize())


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n", 1)[0]


# --- engines and the epoch ticker (one per process) ---------------------------------------------------------


class EngineOwner:
    """The engines of one process (one per stack and memory limit, the engine settings that vary) and the daemon
    thread that ticks their epochs every 100 ms. Threads do not survive fork and a wasmtime engine must not be
    shared across one, so everything here is per pid: a forked data-plane process starts afresh on first use.
    wasm runs through ctypes, which releases the GIL, so the tick lands while a module loops."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._engines: dict[tuple[int, int], wasmtime.Engine] = {}
        self._ticker: threading.Thread | None = None

    def engine(self, limits: Limits) -> wasmtime.Engine:
        if self._pid != os.getpid():
            # Inherited through fork: the lock may be held by a thread that no longer exists here.
            self._reset()
        with self._lock:
            key = (limits.max_stack_bytes, limits.max_memory_bytes)
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = new_engine(limits)
            if self._ticker is None or not self._ticker.is_alive():
                self._ticker = threading.Thread(
                    target=self._tick, name="smg-wasm-epoch", daemon=True
                )
                self._ticker.start()
            return engine

    def _tick(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(EPOCH_INTERVAL_S)
            for engine in list(self._engines.values()):
                engine.increment_epoch()


_DEFAULT_OWNER = EngineOwner()


# --- the runner -----------------------------------------------------------------------------------------------


def _raw_fn(name: str, restype: Any, nargs: int) -> Any:
    """wasmtime's C function `name` as a ctypes prototype of our own over plain addresses (ints): no
    wasmtime-py wrapper, no POINTER/byref objects made and type-checked per argument. `dll[name]` makes a new
    function object, so wasmtime-py's own prototypes (dll.name) are left as they are."""
    fn = _raw.dll[name]
    fn.restype = restype
    fn.argtypes = [c_void_p] * nargs
    return fn


_store_new = _raw_fn("wasmtime_store_new", c_void_p, 3)  # (engine, data, finalizer): None for both
_store_context = _raw_fn("wasmtime_store_context", c_void_p, 1)
_store_delete = _raw_fn("wasmtime_store_delete", None, 1)
_set_epoch_deadline = _raw.dll["wasmtime_context_set_epoch_deadline"]
_set_epoch_deadline.restype = None
_set_epoch_deadline.argtypes = [c_void_p, c_uint64]
_instantiate = _raw_fn("wasmtime_component_linker_instantiate", c_void_p, 4)
_get_func = _raw_fn("wasmtime_component_instance_get_func", c_bool, 4)
_func_call = _raw.dll["wasmtime_component_func_call"]
_func_call.restype = c_void_p
_func_call.argtypes = [c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t]
_val_delete = _raw_fn("wasmtime_component_val_delete", None, 1)
_ERROR_PTR = POINTER(ffi.wasmtime_error_t)
_CONTEXT_PTR = POINTER(ffi.wasmtime_context_t)
# One call's out-parameters (the instance, the function, the result value) in one buffer.
_O_FUNC = 32
_O_RESULT = 64
_SCRATCH = _O_RESULT + capi.VAL_SIZE
_ZERO_VAL = bytes(capi.VAL_SIZE)
if (sizeof(ffi.wasmtime_component_instance_t), sizeof(ffi.wasmtime_component_func_t)) > (32, 32):
    raise ImportError("unexpected wasmtime C API instance/function layout")  # pragma: no cover


# The whole call in one C function (smg/wasm/_fastcall.c, an optional extension built by setup.py):
# the same C API calls as ModuleRunner._call in the same order, without ctypes per step or the
# Python packing of the argument. Without it (no compiler at install), the ctypes path runs.
# FASTCALL_API in _fastcall.c: a build from an older checkout (an in-place build that
# `pip install -e` made once and nothing rebuilt) has other functions or arguments, and would
# fail every module call; it is set aside with one warning and the ctypes path runs.
FASTCALL_API = 2
try:
    from smg.wasm import _fastcall as _fast
except ImportError:  # pragma: no cover - the extension is built wherever the tests run
    _fast = None
if _fast is not None and getattr(_fast, "API", None) != FASTCALL_API:
    logging.getLogger("smg.wasm").warning(
        "smg.wasm._fastcall at %s is a stale build (API %s, this code needs %s): using the "
        "slower ctypes path; rebuild it with `pip install -e .` or `python setup.py "
        "build_ext --inplace`",
        getattr(_fast, "__file__", "?"),
        getattr(_fast, "API", None),
        FASTCALL_API,
    )
    _fast = None
if _fast is not None:

    def _address(name: str) -> int:
        return cast(_raw.dll[name], c_void_p).value

    _fast.setup(
        tuple(
            _address(name)
            for name in (
                "wasmtime_store_new",
                "wasmtime_store_context",
                "wasmtime_store_delete",
                "wasmtime_context_set_epoch_deadline",
                "wasmtime_component_linker_instantiate",
                "wasmtime_component_instance_get_func",
                "wasmtime_component_func_call",
                "wasmtime_component_val_delete",
                "wasi_config_new",
                "wasmtime_context_set_wasi",
            )
        ),
        (
            capi.K_U8,
            capi.K_U16,
            capi.K_U64,
            capi.K_STRING,
            capi.K_LIST,
            capi.K_RECORD,
            capi.K_VARIANT,
        ),
    )
# _fastcall's answers besides None (`continue`): (code, address).
_FAST_LIFT, _FAST_NO_FUNC, _FAST_ERROR = 1, 2, 3


def _error(ptr: int) -> wasmtime.WasmtimeError:
    return wasmtime.WasmtimeError._from_ptr(cast(ptr, _ERROR_PTR))


def _cause(e: BaseException) -> str:
    """wasmtime's message is "error while executing at wasm backtrace: <frames> Caused by: <cause>": the cause."""
    text = str(e)
    if "Caused by:" in text:
        text = text.split("Caused by:", 1)[1]
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _trap(e: BaseException, limits: Limits) -> WasmTrap:
    cause = _cause(e)
    if cause.endswith("wasm trap: interrupt"):
        return WasmTrap(f"execution time limit exceeded ({limits.max_execution_ms} ms)", "timeout")
    if "call stack exhausted" in cause:
        return WasmTrap(cause, "stack")
    return WasmTrap(cause, "trap")


def _list(headers: Any) -> list[tuple[str, str]]:
    """The headers as _fastcall takes them: a list of 2-tuples."""
    if type(headers) is list:
        return headers
    return [(n, v) for n, v in headers]


def _bytes(body: Any) -> bytes:
    return body if type(body) is bytes else bytes(body)


class ModuleRunner:
    """One loaded module in one process: the deserialized component (never compiled again) and its linker.
    Calls are synchronous and may block up to max_execution_ms; each runs in a fresh store and instance."""

    def __init__(
        self,
        engine_owner: EngineOwner | None,
        artifact: bytes,
        limits: Limits,
        fast: bool = True,
    ) -> None:
        """`fast`: call through smg.wasm._fastcall when it is built (False: the ctypes path, which
        the tests compare it with)."""
        self.limits = limits
        self._fast = _fast if fast else None
        self.engine = (engine_owner or _DEFAULT_OWNER).engine(limits)
        try:
            self.component = wc.Component.deserialize(self.engine, artifact)
        except wasmtime.WasmtimeError as e:
            raise WasmError(f"cannot load the compiled module: {_first_line(e)}") from None
        self.linker = wc.Linker(self.engine)
        self.wasi = any(n.startswith("wasi:") for n in self.component.type.imports(self.engine))
        if self.wasi:
            self.linker.add_wasip2()
        # Export indices resolve once per component; a missing one means the attach point is not served.
        self._index: dict[str, Any] = {}
        for point, (iface, func) in EXPORTS.items():
            inst = self.component.get_export_index(iface)
            idx = self.component.get_export_index(func, inst) if inst is not None else None
            if idx is not None:
                self._index[point] = idx
        self._index_ptr = {
            point: cast(idx.ptr(), c_void_p).value for point, idx in self._index.items()
        }
        # Out-parameter buffers, reused: a call pops one (a concurrent call on another thread
        # makes its own) and gives it back; list.pop and append are atomic under the GIL.
        self._scratch: list[Any] = []
        self._deadline = max(1, int(limits.max_execution_ms / (EPOCH_INTERVAL_S * 1000)))
        self._engine_ptr = cast(self.engine.ptr(), c_void_p).value
        self._linker_ptr = cast(self.linker.ptr(), c_void_p).value
        self._component_ptr = cast(self.component.ptr(), c_void_p).value
        # on_request_raw's C call with its six per-module arguments bound once (None: no
        # extension or no OnRequest export): per request, no attribute or dict look-ups for them.
        self._request_raw: Any = None
        idx = self._index_ptr.get("OnRequest")
        if self._fast is not None and idx is not None:
            self._request_raw = partial(
                self._fast.call_request_raw, self._engine_ptr, self._linker_ptr,
                self._component_ptr, idx, self._deadline, self.wasi,
            )  # fmt: skip

    def _check_body(self, kind: str, body: bytes) -> None:
        if len(body) > self.limits.max_body_bytes:
            raise WasmTrap(
                f"{kind} body over the module limit ({self.limits.max_body_bytes} bytes)", "body"
            )

    def serves(self, point: str) -> bool:
        return point in self._index

    def on_request(self, req: WasmRequest) -> Action:
        self._check_body("request", req.body)
        fast = self._fast
        idx = self._index_ptr.get("OnRequest")
        if fast is not None and idx is not None:
            got = fast.call_request(
                self._engine_ptr, self._linker_ptr, self._component_ptr, idx, self._deadline,
                self.wasi, req.method, req.path, req.query, _list(req.headers), _bytes(req.body),
                req.request_id, req.now_epoch_ms,
            )  # fmt: skip
            return CONTINUE if got is None else self._fast_outcome("OnRequest", got)
        return self._call("OnRequest", capi.lower_request(req))

    def on_request_raw(
        self,
        method: bytes,
        path: str,
        query: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        request_id: bytes,
        now_epoch_ms: int,
    ) -> Action:
        """on_request on the data plane's parsed request (smg.dataplane.server.Request's bytes):
        the module sees exactly what on_request shows it for the headers the gateway decodes
        (Latin-1, names lower-cased, smg.wasm.chain.module_view's), lowered in C without a
        WasmRequest or a str per header; without the extension, through on_request."""
        call = self._request_raw
        if call is None:
            return self.on_request(
                WasmRequest(
                    method.decode("latin-1"), path, query, module_view(decoded(headers)), body,
                    request_id.decode("latin-1"), now_epoch_ms,
                )
            )  # fmt: skip
        self._check_body("request", body)
        got = call(method, path, query, headers, _bytes(body), request_id, now_epoch_ms)
        return CONTINUE if got is None else self._fast_outcome("OnRequest", got)

    def on_response(self, resp: WasmResponse) -> Action:
        self._check_body("response", resp.body)
        fast = self._fast
        idx = self._index_ptr.get("OnResponse")
        if fast is not None and idx is not None:
            got = fast.call_response(
                self._engine_ptr, self._linker_ptr, self._component_ptr, idx, self._deadline,
                self.wasi, resp.status, _list(resp.headers), _bytes(resp.body),
            )  # fmt: skip
            return CONTINUE if got is None else self._fast_outcome("OnResponse", got)
        return self._call("OnResponse", capi.lower_response(resp))

    def _fast_outcome(self, point: str, got: tuple[int, int]) -> Action:
        """_fastcall's answer other than `continue`, as _call ends: the action lifted by the
        same capi code, or the same WasmTrap."""
        code, address = got
        if code == _FAST_LIFT:
            try:
                return capi.lift_action_at(address)
            finally:
                _fast.release(address)
        if code == _FAST_NO_FUNC:
            raise WasmTrap(f"module does not export the {point} function", "invalid")
        raise _trap(_error(address), self.limits)

    def _call(self, point: str, arg: capi.Packed) -> Action:
        idx = self._index_ptr.get(point)
        if idx is None:
            raise WasmTrap(f"module does not export the {point} interface", "invalid")
        # wasmtime's C API straight through ctypes over plain addresses, not wasmtime-py's
        # Store/Linker/Instance wrappers (their per-call Python objects, a finalizer callback cast
        # per Store and a GC-timed drop cost ~15 us a call), and the store deleted here, not when
        # Python collects it: its pooled instance slot goes back at once, even when a trap's
        # traceback keeps this frame alive. No store limiter: the pool's per-memory maximum
        # (new_engine) is the same max_memory_bytes bound and fails memory.grow the same way.
        try:
            scratch = self._scratch.pop()
        except IndexError:
            scratch = create_string_buffer(_SCRATCH)
        out = addressof(scratch)
        store = _store_new(self._engine_ptr, None, None)
        try:
            ctx = _store_context(store)
            _set_epoch_deadline(ctx, self._deadline)
            if self.wasi:
                err = ffi.wasmtime_context_set_wasi(
                    cast(ctx, _CONTEXT_PTR), wasmtime.WasiConfig()._consume()
                )
                if err:
                    raise wasmtime.WasmtimeError._from_ptr(err)
            err = _instantiate(self._linker_ptr, ctx, self._component_ptr, out)
            if err:
                raise _error(err)
            if not _get_func(out, ctx, idx, out + _O_FUNC):
                raise WasmTrap(f"module does not export the {point} function", "invalid")
            # The C API assigns the result over the value there, dropping it: it must be a
            # plain one (zeroes), not the last call's, already freed.
            scratch[_O_RESULT:_SCRATCH] = _ZERO_VAL
            err = _func_call(out + _O_FUNC, ctx, arg.address, 1, out + _O_RESULT, 1)
            if err:
                raise _error(err)
            try:
                return capi.lift_action_at(out + _O_RESULT)
            finally:
                _val_delete(out + _O_RESULT)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            raise _trap(e, self.limits) from None
        finally:
            _store_delete(store)
            self._scratch.append(scratch)
