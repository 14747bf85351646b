"""The WASM component runtime (wasmtime): compile once in the control plane, load the artifact in every data-plane
process, run a module per call in a fresh store and instance.

As 1.13 (crates/wasm/src/runtime.rs): a fresh Store and instance for every call (a module never sees another
request's data), epoch interruption with 100 ms ticks and a deadline of max_execution_ms / 100 ticks, a store
memory limit, the stack limit in the engine config, WASI p2 linked with an empty context for components built
for wasm32-wasip2. Measured here: a store and instance cost ~15 us, so no pooling of instances.

Values cross into wasm through wasmtime's C API directly (wasmtime_component_val_t built in Python-owned memory)
rather than wasmtime-py's generic converters, which lower a list<u8> one Python call per byte.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from ctypes import POINTER, addressof, byref, cast, string_at
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import component as wc

from smg.wasm.types import (
    ATTACH_POINTS,
    CONTINUE,
    EXPORTS,
    Action,
    Limits,
    Modify,
    Reject,
    WasmError,
    WasmRequest,
    WasmResponse,
    WasmTrap,
)

EPOCH_INTERVAL_S = 0.1  # 1.13's EPOCH_INTERVAL_MS
TYPES_IMPORT = "smg:gateway/middleware-types"

_VAL = ffi.wasmtime_component_val_t
_ENTRY = ffi.wasmtime_component_valrecord_entry_t
_VAL_SIZE = ctypes.sizeof(_VAL)
_OF = _VAL.of.offset
_K_U8 = ffi.WASMTIME_COMPONENT_U8.value
_K_U16 = ffi.WASMTIME_COMPONENT_U16.value
_K_U64 = ffi.WASMTIME_COMPONENT_U64.value
_K_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_K_LIST = ffi.WASMTIME_COMPONENT_LIST.value
_K_RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
_K_VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value
_K_OPTION = ffi.WASMTIME_COMPONENT_OPTION.value


def new_engine(limits: Limits) -> wasmtime.Engine:
    """The engine config an artifact is compiled AND loaded with (Component.deserialize checks they match)."""
    cfg = wasmtime.Config()
    cfg.wasm_component_model = True
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = limits.max_stack_bytes
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
    engine = new_engine(limits)
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
        raise WasmError(
            f"failed to parse WebAssembly component: {_first_line(e)}. The file must be in component format "
            "(wrap a core module with `wasm-tools component new`)."
        ) from None
    _check_component(engine, component, points)
    return bytes(component.serialize())


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n", 1)[0]


# --- engines and the epoch ticker (one per process) ---------------------------------------------------------


class EngineOwner:
    """The engines of one process (one per stack limit, the only engine setting that varies) and the daemon
    thread that ticks their epochs every 100 ms. Threads do not survive fork and a wasmtime engine must not be
    shared across one, so everything here is per pid: a forked data-plane process starts afresh on first use.
    wasm runs through ctypes, which releases the GIL, so the tick lands while a module loops."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._engines: dict[int, wasmtime.Engine] = {}
        self._ticker: threading.Thread | None = None

    def engine(self, limits: Limits) -> wasmtime.Engine:
        if self._pid != os.getpid():
            # Inherited through fork: the lock may be held by a thread that no longer exists here.
            self._reset()
        with self._lock:
            engine = self._engines.get(limits.max_stack_bytes)
            if engine is None:
                engine = self._engines[limits.max_stack_bytes] = new_engine(limits)
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


# --- lowering (Python -> wasmtime_component_val_t, in Python-owned memory) ------------------------------------


class _Lowerer:
    """Builds argument values whose every buffer Python owns: func_call only reads its arguments, so nothing is
    handed to wasmtime's allocator and nothing needs freeing afterwards. `keep` holds the buffers alive."""

    __slots__ = ("keep",)

    def __init__(self) -> None:
        self.keep: list[Any] = []

    def name(self, data: bytes) -> ffi.wasm_byte_vec_t:
        self.keep.append(data)
        vec = ffi.wasm_byte_vec_t()
        vec.size = len(data)
        vec.data = cast(ctypes.c_char_p(data), POINTER(ffi.wasm_byte_t))
        return vec

    def string(self, val: Any, text: str) -> None:
        val.kind = _K_STRING
        val.of.string = self.name(text.encode("utf-8", "surrogatepass"))

    def u8_list(self, val: Any, data: bytes) -> None:
        n = len(data)
        # One 32-byte value per byte (the C API's shape); built with two strided copies, not a Python loop.
        buf = bytearray(n * _VAL_SIZE)
        if n:
            buf[0::_VAL_SIZE] = bytes((_K_U8,)) * n
            buf[_OF::_VAL_SIZE] = data
        arr = (_VAL * n).from_buffer(buf)
        self.keep.append(buf)
        self.keep.append(arr)
        val.kind = _K_LIST
        val.of.list.size = n
        val.of.list.data = cast(arr, POINTER(_VAL))

    def record(self, val: Any, names: tuple[bytes, ...]) -> Any:
        entries = (_ENTRY * len(names))()
        self.keep.append(entries)
        for i, n in enumerate(names):
            entries[i].name = self.name(n)
        val.kind = _K_RECORD
        val.of.record.size = len(names)
        val.of.record.data = cast(entries, POINTER(_ENTRY))
        return entries

    def headers(self, val: Any, headers: list[tuple[str, str]]) -> None:
        n = len(headers)
        arr = (_VAL * n)()
        self.keep.append(arr)
        for i, (name, value) in enumerate(headers):
            entries = self.record(arr[i], (b"name", b"value"))
            self.string(entries[0].val, name)
            self.string(entries[1].val, value)
        val.kind = _K_LIST
        val.of.list.size = n
        val.of.list.data = cast(arr, POINTER(_VAL))


_REQUEST_FIELDS = (
    b"method",
    b"path",
    b"query",
    b"headers",
    b"body",
    b"request-id",
    b"now-epoch-ms",
)
_RESPONSE_FIELDS = (b"status", b"headers", b"body")


def _lower_request(req: WasmRequest) -> tuple[Any, _Lowerer]:
    low = _Lowerer()
    arg = _VAL()
    e = low.record(arg, _REQUEST_FIELDS)
    low.string(e[0].val, req.method)
    low.string(e[1].val, req.path)
    low.string(e[2].val, req.query)
    low.headers(e[3].val, req.headers)
    low.u8_list(e[4].val, req.body)
    low.string(e[5].val, req.request_id)
    e[6].val.kind = _K_U64
    e[6].val.of.u64 = req.now_epoch_ms & 0xFFFFFFFFFFFFFFFF
    return arg, low


def _lower_response(resp: WasmResponse) -> tuple[Any, _Lowerer]:
    low = _Lowerer()
    arg = _VAL()
    e = low.record(arg, _RESPONSE_FIELDS)
    e[0].val.kind = _K_U16
    e[0].val.of.u16 = resp.status & 0xFFFF
    low.headers(e[1].val, resp.headers)
    low.u8_list(e[2].val, resp.body)
    return arg, low


# --- lifting (the result, owned by wasmtime; freed once with val_delete) --------------------------------------


def _vec_bytes(vec: Any) -> bytes:
    return string_at(addressof(vec.data.contents), vec.size) if vec.size else b""


def _lift_str(val: Any) -> str:
    if val.kind != _K_STRING:
        raise WasmTrap("module returned a malformed action", "invalid")
    return _vec_bytes(val.of.string).decode("utf-8", "replace")


def _list_items(val: Any) -> Any:
    if val.kind != _K_LIST:
        raise WasmTrap("module returned a malformed action", "invalid")
    n = val.of.list.size
    return (_VAL * n).from_address(addressof(val.of.list.data.contents)) if n else ()


def _lift_headers(val: Any) -> list[tuple[str, str]]:
    out = []
    for item in _list_items(val):
        rec = item.of.record
        fields = (_ENTRY * rec.size).from_address(addressof(rec.data.contents))
        out.append((_lift_str(fields[0].val), _lift_str(fields[1].val)))
    return out


def _lift_bytes(val: Any) -> bytes:
    if val.kind != _K_LIST:
        raise WasmTrap("module returned a malformed action", "invalid")
    n = val.of.list.size
    if not n:
        return b""
    return string_at(addressof(val.of.list.data.contents), n * _VAL_SIZE)[_OF::_VAL_SIZE]


def _lift_action(val: Any) -> Action:
    if val.kind != _K_VARIANT:
        raise WasmTrap("module returned a malformed action", "invalid")
    tag = _vec_bytes(val.of.variant.discriminant)
    if tag == b"continue":
        return CONTINUE
    payload = val.of.variant.val.contents
    if tag == b"reject":
        return Reject(int(payload.of.u16))
    if tag != b"modify":
        raise WasmTrap(f"module returned an unknown action {tag!r}", "invalid")
    rec = payload.of.record
    f = (_ENTRY * rec.size).from_address(addressof(rec.data.contents))
    status_opt = f[0].val.of.option
    body_opt = f[4].val.of.option
    return Modify(
        status=int(status_opt.contents.of.u16) if status_opt else None,
        headers_set=_lift_headers(f[1].val),
        headers_add=_lift_headers(f[2].val),
        headers_remove=[_lift_str(v) for v in _list_items(f[3].val)],
        body_replace=_lift_bytes(body_opt.contents) if body_opt else None,
    )


# --- the runner -----------------------------------------------------------------------------------------------


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


class ModuleRunner:
    """One loaded module in one process: the deserialized component (never compiled again) and its linker.
    Calls are synchronous and may block up to max_execution_ms; each runs in a fresh store and instance."""

    def __init__(self, engine_owner: EngineOwner | None, artifact: bytes, limits: Limits) -> None:
        self.limits = limits
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
        self._deadline = max(1, int(limits.max_execution_ms / (EPOCH_INTERVAL_S * 1000)))

    def serves(self, point: str) -> bool:
        return point in self._index

    def on_request(self, req: WasmRequest) -> Action:
        if len(req.body) > self.limits.max_body_bytes:
            raise WasmTrap(
                f"request body over the module limit ({self.limits.max_body_bytes} bytes)", "body"
            )
        arg, low = _lower_request(req)
        return self._call("OnRequest", arg, low)

    def on_response(self, resp: WasmResponse) -> Action:
        if len(resp.body) > self.limits.max_body_bytes:
            raise WasmTrap(
                f"response body over the module limit ({self.limits.max_body_bytes} bytes)", "body"
            )
        arg, low = _lower_response(resp)
        return self._call("OnResponse", arg, low)

    def _call(self, point: str, arg: Any, low: _Lowerer) -> Action:
        idx = self._index.get(point)
        if idx is None:
            raise WasmTrap(f"module does not export the {point} interface", "invalid")
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.limits.max_memory_bytes)
        store.set_epoch_deadline(self._deadline)
        if self.wasi:
            store.set_wasi(wasmtime.WasiConfig())
        try:
            instance = self.linker.instantiate(store, self.component)
            func = instance.get_func(store, idx)
            if func is None:
                raise WasmTrap(f"module does not export the {point} function", "invalid")
            result = _VAL()
            err = ffi.wasmtime_component_func_call(
                byref(func._func), store._context(), byref(arg), 1, byref(result), 1
            )
            if err:
                raise wasmtime.WasmtimeError._from_ptr(err)
        except WasmTrap:
            raise
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            raise _trap(e, self.limits) from None
        del low  # the argument buffers may go once the call returned
        try:
            return _lift_action(result)
        finally:
            ffi.wasmtime_component_val_delete(byref(result))
