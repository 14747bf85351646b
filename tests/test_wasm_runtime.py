"""smg.wasm runtime: WAT components compiled once, loaded from the artifact, run with 1.13's limits; the pure
action application. Exact values: the echo guest returns what it was given, so lowering and lifting are checked
byte for byte."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from smg.wasm.runtime import ModuleRunner, compile_component
from smg.wasm.types import (
    CONTINUE,
    Continue,
    Limits,
    Modify,
    Reject,
    WasmError,
    WasmRequest,
    WasmResponse,
    WasmTrap,
    apply_headers,
    apply_to_request,
    apply_to_response,
    attach_point_json,
    headers_for_module,
    parse_attach_point,
)
from smg.wasm.watwrap import component_wat

# A bump allocator that grows memory as needed (traps when it cannot): enough for the canonical ABI's lowering.
_REALLOC = """
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 4096))
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32) (local $end i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.const 7)) (i32.const -8)))
      (local.set $end (i32.add (local.get $p) (local.get 3)))
      (global.set $bump (local.get $end))
      (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
        (then (if (i32.eq (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end)
                        (i32.mul (memory.size) (i32.const 65536))) (i32.const 16)) (i32.const 1))) (i32.const -1))
          (then unreachable))))
      (local.get $p))
    (data (i32.const 200) "x-method")
    (data (i32.const 208) "x-path")
    (data (i32.const 216) "x-query")
    (data (i32.const 224) "x-request-id")
    (data (i32.const 240) "server")
"""
_REQ = (
    '(func (export "smg:gateway/middleware-on-request#on-request") (param $m i32) (param $ml i32) '
    "(param $p i32) (param $pl i32) (param $q i32) (param $ql i32) (param $h i32) (param $hl i32) "
    "(param $b i32) (param $bl i32) (param $r i32) (param $rl i32) (param $now i64) (result i32)"
)
_RESP = (
    '(func (export "smg:gateway/middleware-on-response#on-response") (param $s i32) (param $h i32) '
    "(param $hl i32) (param $b i32) (param $bl i32) (result i32)"
)
_CONTINUE = "(i32.store8 (i32.const 16) (i32.const 0)) (i32.const 16)"


def guest(on_request: str = _CONTINUE, on_response: str = _CONTINUE, extra: str = "") -> str:
    return component_wat(f"{_REALLOC}\n{extra}\n{_REQ}\n{on_request})\n{_RESP}\n{on_response})")


def _header(at: int, name_ptr: int, name_len: int, value: str) -> str:
    """Store one header record at `at`: a static name and a value (ptr, len) taken from two params."""
    vp, vl = value.split(",")
    return (
        f"(i32.store (i32.const {at}) (i32.const {name_ptr})) (i32.store (i32.const {at + 4}) (i32.const {name_len}))"
        f" (i32.store (i32.const {at + 8}) (local.get {vp})) (i32.store (i32.const {at + 12}) (local.get {vl}))"
    )


# Echo: modify{status: now & 0xffff, headers-set: method/path/query/request-id, headers-add: the request's headers,
# headers-remove: ["server"], body-replace: the body}.
ECHO_REQUEST = (
    "(i32.store8 (i32.const 16) (i32.const 2))"
    "(i32.store8 (i32.const 20) (i32.const 1)) (i32.store16 (i32.const 22) (i32.wrap_i64 (local.get $now)))"
    + _header(64, 200, 8, "$m,$ml")
    + _header(80, 208, 6, "$p,$pl")
    + _header(96, 216, 7, "$q,$ql")
    + _header(112, 224, 12, "$r,$rl")
    + "(i32.store (i32.const 24) (i32.const 64)) (i32.store (i32.const 28) (i32.const 4))"
    "(i32.store (i32.const 32) (local.get $h)) (i32.store (i32.const 36) (local.get $hl))"
    "(i32.store (i32.const 128) (i32.const 240)) (i32.store (i32.const 132) (i32.const 6))"
    "(i32.store (i32.const 40) (i32.const 128)) (i32.store (i32.const 44) (i32.const 1))"
    "(i32.store8 (i32.const 48) (i32.const 1)) (i32.store (i32.const 52) (local.get $b))"
    "(i32.store (i32.const 56) (local.get $bl)) (i32.const 16)"
)
# Echo: modify{status: status + 1, headers-add: the headers, body-replace: the body}.
ECHO_RESPONSE = (
    "(i32.store8 (i32.const 16) (i32.const 2))"
    "(i32.store8 (i32.const 20) (i32.const 1)) (i32.store16 (i32.const 22) (i32.add (local.get $s) (i32.const 1)))"
    "(i32.store (i32.const 24) (i32.const 0)) (i32.store (i32.const 28) (i32.const 0))"
    "(i32.store (i32.const 32) (local.get $h)) (i32.store (i32.const 36) (local.get $hl))"
    "(i32.store (i32.const 40) (i32.const 0)) (i32.store (i32.const 44) (i32.const 0))"
    "(i32.store8 (i32.const 48) (i32.const 1)) (i32.store (i32.const 52) (local.get $b))"
    "(i32.store (i32.const 56) (local.get $bl)) (i32.const 16)"
)
REJECT_403 = "(i32.store8 (i32.const 16) (i32.const 1)) (i32.store16 (i32.const 20) (i32.const 403)) (i32.const 16)"
REJECT_502 = "(i32.store8 (i32.const 16) (i32.const 1)) (i32.store16 (i32.const 20) (i32.const 502)) (i32.const 16)"
TRAP = "unreachable"
LOOP = "(loop $l (br $l)) (i32.const 16)"
# Grows from 1 page by `pages` and writes the new last byte: over the memory limit the grow fails (-1) and the
# write is out of bounds.
GROW = (
    "(drop (memory.grow (i32.const {pages}))) (i32.store8 (i32.const {last}) (i32.const 1))"
    " (i32.store8 (i32.const 16) (i32.const 0)) (i32.const 16)"
)


def grow(pages: int) -> str:
    return GROW.format(pages=pages, last=(pages + 1) * 65536 - 1)


RECURSE = "(call $down (i32.const 0)) (i32.const 16)"
RECURSE_FN = "(func $down (param i32) (call $down (i32.add (local.get 0) (i32.const 1))))"

LIMITS = Limits()
REQ = WasmRequest(
    method="POST",
    path="/v1/chat/completions",
    query="a=1&b=2",
    headers=[("content-type", "application/json"), ("x-api-key", "sk-é")],
    body=b'{"model":"m"}\x00\xff',
    request_id="req-123",
    now_epoch_ms=1_700_000_001_234,
)
RESP = WasmResponse(
    status=200, headers=[("content-type", "application/json"), ("server", "w")], body=b"\x01" * 3000
)


def runner(wat: str, limits: Limits = LIMITS) -> ModuleRunner:
    return ModuleRunner(None, compile_component(wat.encode(), limits), limits)


# --- the runtime ----------------------------------------------------------------------------------------------


def test_echo_request_roundtrips_every_field_exactly() -> None:
    r = runner(guest(on_request=ECHO_REQUEST))
    action = r.on_request(REQ)
    assert action == Modify(
        status=1_700_000_001_234 & 0xFFFF,
        headers_set=[
            ("x-method", "POST"),
            ("x-path", "/v1/chat/completions"),
            ("x-query", "a=1&b=2"),
            ("x-request-id", "req-123"),
        ],
        headers_add=[("content-type", "application/json"), ("x-api-key", "sk-é")],
        headers_remove=["server"],
        body_replace=b'{"model":"m"}\x00\xff',
    )
    # A second call gets a fresh instance: the same answer, nothing carried over.
    assert r.on_request(REQ) == action


def test_echo_response_and_empty_values() -> None:
    r = runner(guest(on_response=ECHO_RESPONSE))
    assert r.on_response(RESP) == Modify(
        status=201,
        headers_set=[],
        headers_add=RESP.headers,
        headers_remove=[],
        body_replace=b"\x01" * 3000,
    )
    empty = WasmResponse(status=204, headers=[], body=b"")
    assert r.on_response(empty) == Modify(status=205, body_replace=b"")
    # The request side of the same module is the default continue.
    assert r.on_request(REQ) is CONTINUE


def test_reject_actions() -> None:
    r = runner(guest(on_request=REJECT_403, on_response=REJECT_502))
    assert r.on_request(REQ) == Reject(403)
    assert r.on_response(RESP) == Reject(502)


def test_large_body_roundtrip() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    r = runner(guest(on_request=ECHO_REQUEST))
    action = r.on_request(WasmRequest("POST", "/", "", [], body, "r", 0))
    assert isinstance(action, Modify) and action.body_replace == body


def test_body_over_limit_is_refused_before_the_module_runs() -> None:
    limits = Limits(max_body_bytes=1000)
    r = runner(guest(on_request=ECHO_REQUEST), limits)
    with pytest.raises(WasmTrap, match="over the module limit") as e:
        r.on_request(WasmRequest("POST", "/", "", [], b"x" * 1001, "r", 0))
    assert e.value.kind == "body"
    assert isinstance(r.on_request(WasmRequest("POST", "/", "", [], b"x" * 1000, "r", 0)), Modify)


def test_trap_is_a_wasmtrap_and_the_runner_still_works() -> None:
    r = runner(guest(on_request=TRAP, on_response=REJECT_502))
    with pytest.raises(WasmTrap) as e:
        r.on_request(REQ)
    assert (str(e.value), e.value.kind) == (
        "wasm trap: wasm `unreachable` instruction executed",
        "trap",
    )
    assert r.on_response(RESP) == Reject(502)


@pytest.mark.timeout(30)
def test_infinite_loop_is_interrupted_by_the_execution_limit() -> None:
    r = runner(guest(on_request=LOOP), Limits(max_execution_ms=300))
    t0 = time.monotonic()
    with pytest.raises(WasmTrap, match=r"execution time limit exceeded \(300 ms\)") as e:
        r.on_request(REQ)
    elapsed = time.monotonic() - t0
    assert e.value.kind == "timeout"
    # Epoch ticks of 100 ms: 3 ticks, so 0.2..0.3 s plus scheduling; generous on a shared machine.
    assert 0.15 <= elapsed < 3.0, elapsed


def test_memory_limit() -> None:
    small = Limits(max_memory_bytes=4 * 1024 * 1024)
    # 2 more pages (192 KiB in all) fit; 100 pages (6.3 MiB) do not: the grow fails and the write traps.
    assert runner(guest(on_request=grow(2)), small).on_request(REQ) is CONTINUE
    with pytest.raises(WasmTrap, match="out of bounds"):
        runner(guest(on_request=grow(100)), small).on_request(REQ)
    # The default 64 MiB: 1023 more pages fit, 1024 do not.
    assert runner(guest(on_request=grow(1023))).on_request(REQ) is CONTINUE
    with pytest.raises(WasmTrap, match="out of bounds"):
        runner(guest(on_request=grow(1024))).on_request(REQ)


def test_memory_limit_above_the_reservation() -> None:
    # The engine reserves 64 MiB, or the whole limit when it is larger (a pooled memory cannot move).
    big = Limits(max_memory_bytes=128 * 1024 * 1024)
    assert runner(guest(on_request=grow(1500)), big).on_request(REQ) is CONTINUE
    with pytest.raises(WasmTrap, match="out of bounds"):
        runner(guest(on_request=grow(2048)), big).on_request(REQ)


def test_strings_that_are_not_utf8_are_replaced_not_fatal() -> None:
    # A WIT string must be UTF-8: a lone surrogate (a bad percent-decoding, say) reaches the module as "?".
    req = WasmRequest("GET", "/a\udcff", "q=\ud800", [("x-k", "v\udc80")], b"", "r\udfff", 0)
    action = runner(guest(on_request=ECHO_REQUEST)).on_request(req)
    assert isinstance(action, Modify)
    assert action.headers_set == [
        ("x-method", "GET"),
        ("x-path", "/a?"),
        ("x-query", "q=?"),
        ("x-request-id", "r?"),
    ]
    assert action.headers_add == [("x-k", "v?")]


def test_component_importing_wasi_is_linked_with_an_empty_wasi() -> None:
    """Components built for wasm32-wasip2 (how 1.13's Rust examples are built) import WASI interfaces; 1.13
    links WASI p2 with an empty context, and so does smg."""
    wasi = '(import "wasi:cli/environment@0.2.0" (instance (export "get-arguments" (func (result (list string))))))'
    wat = guest(on_request=REJECT_403).rstrip()
    wat = wat[: -len(")")] + wasi + ")"  # last, so the template's type indices stay as they are
    r = runner(wat)
    assert r.wasi
    assert r.on_request(REQ) == Reject(403)


BAD_CASE = "(i32.store8 (i32.const 16) (i32.const 9)) (i32.const 16)"
BAD_UTF8 = (
    "(i32.store8 (i32.const 16) (i32.const 2)) (i32.store8 (i32.const 20) (i32.const 0))"
    "(i32.store8 (i32.const 300) (i32.const 255)) (i32.store (i32.const 64) (i32.const 300))"
    "(i32.store (i32.const 68) (i32.const 1)) (i32.store (i32.const 40) (i32.const 64))"
    "(i32.store (i32.const 44) (i32.const 1)) (i32.const 16)"
)
OUT_OF_BOUNDS = (
    "(i32.store8 (i32.const 16) (i32.const 2)) (i32.store8 (i32.const 48) (i32.const 1))"
    "(i32.store (i32.const 52) (i32.const 60000)) (i32.store (i32.const 56) (i32.const 100000000)) (i32.const 16)"
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (BAD_CASE, r"discriminant 9 out of range \[0..3\)"),
        (BAD_UTF8, "invalid utf-8"),
        (OUT_OF_BOUNDS, "out of bounds"),
    ],
    ids=["bad-case", "bad-utf8", "out-of-bounds"],
)
def test_a_malformed_action_is_a_trap_not_a_crash(body: str, message: str) -> None:
    r = runner(guest(on_request=body))
    with pytest.raises(WasmTrap, match=message):
        r.on_request(REQ)


def test_stack_overflow_is_a_trap() -> None:
    r = runner(guest(on_request=RECURSE, extra=RECURSE_FN))
    with pytest.raises(WasmTrap) as e:
        r.on_request(REQ)
    assert e.value.kind == "stack", str(e.value)


def test_concurrent_calls_from_threads_each_see_only_their_own_request() -> None:
    """A data plane may run modules on a thread pool (ctypes releases the GIL): one runner, four threads, every
    answer echoes exactly its own request."""
    r = runner(guest(on_request=ECHO_REQUEST))
    errors: list[str] = []

    def work(t: int) -> None:
        for i in range(40):
            body = f"thread {t} call {i} ".encode() * (1 + i % 7)
            req = WasmRequest("POST", f"/t{t}", f"i={i}", [("x-t", str(t))], body, f"r{t}-{i}", i)
            got = r.on_request(req)
            if (
                not isinstance(got, Modify)
                or got.body_replace != body
                or got.headers_add != [("x-t", str(t))]
            ):
                errors.append(f"{t}/{i}: {got!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert errors == []


def test_runner_never_compiles_it_loads_the_artifact() -> None:
    artifact = compile_component(guest(on_request=REJECT_403).encode(), LIMITS)
    assert artifact[:4] != b"\0asm"  # a serialized native artifact, not wasm
    assert ModuleRunner(None, artifact, LIMITS).on_request(REQ) == Reject(403)
    with pytest.raises(WasmError, match="cannot load the compiled module"):
        ModuleRunner(None, b"garbage", LIMITS)


@pytest.mark.timeout(60)
def test_artifact_compiled_in_the_parent_runs_in_a_forked_child() -> None:
    """The control plane compiles; a forked data-plane process loads the artifact and gets its own engine and
    epoch ticker (the parent's ticker thread does not exist in the child: the loop must still be interrupted)."""
    echo = compile_component(guest(on_request=ECHO_REQUEST).encode(), LIMITS)
    short = Limits(max_execution_ms=200)
    loop = compile_component(guest(on_request=LOOP).encode(), short)
    assert ModuleRunner(None, echo, LIMITS).on_request(REQ) == ModuleRunner(
        None, echo, LIMITS
    ).on_request(REQ)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status only
        code = 1
        try:
            ok = isinstance(ModuleRunner(None, echo, LIMITS).on_request(REQ), Modify)
            try:
                ModuleRunner(None, loop, short).on_request(REQ)
            except WasmTrap as e:
                ok = ok and e.kind == "timeout"
            else:
                ok = False
            code = 0 if ok else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    status = 0
    try:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the forked child did not finish in 30 s")
    finally:
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_compile_rejects_bad_input() -> None:
    with pytest.raises(WasmError, match="not a WebAssembly binary or text"):
        compile_component(b"\xff\xfe", LIMITS)
    with pytest.raises(WasmError, match=r"^Invalid WASM component: expected `\(`"):
        compile_component(b"hello", LIMITS)
    core = b"\0asm\x01\0\0\0"  # an empty core module, not a component
    with pytest.raises(WasmError) as e:
        compile_component(core, LIMITS)
    assert str(e.value) == (
        "Invalid WASM component: attempted to parse a wasm module with a component parser. Hint: The WASM file "
        "must be in component format. If you're using wit-bindgen, use 'wasm-tools component new' to wrap the "
        "WASM module into a component."
    )
    # A component without the interfaces.
    with pytest.raises(WasmError, match="does not export smg:gateway/middleware-on-request"):
        compile_component(b"\0asm\x0d\0\x01\0", LIMITS)
    # Only the attach points asked for are required.
    assert compile_component(b"\0asm\x0d\0\x01\0", LIMITS, attach_points=[])
    with pytest.raises(WasmError, match="unknown attach point"):
        compile_component(guest().encode(), LIMITS, attach_points=["OnError"])


def test_a_runner_serves_only_the_exported_attach_points() -> None:
    both = runner(guest())
    assert both.serves("OnRequest") and both.serves("OnResponse")
    empty = ModuleRunner(
        None, compile_component(b"\0asm\x0d\0\x01\0", LIMITS, attach_points=[]), LIMITS
    )
    assert not empty.serves("OnRequest") and not empty.serves("OnResponse")
    with pytest.raises(WasmTrap, match="does not export the OnRequest interface") as e:
        empty.on_request(REQ)
    assert e.value.kind == "invalid"


def test_compile_rejects_a_wrong_signature() -> None:
    wrong = guest().replace('(field "now-epoch-ms" u64)', '(field "now-epoch-ms" u32)')
    wrong = wrong.replace("(param $rl i32) (param $now i64)", "(param $rl i32) (param $now i32)")
    with pytest.raises(WasmError, match="does not match the smg:gateway WIT signature"):
        compile_component(wrong.encode(), LIMITS)


def test_compile_rejects_unknown_imports() -> None:
    wat = '(component (import "acme:x/y" (instance)))'
    with pytest.raises(WasmError, match="imports 'acme:x/y'"):
        compile_component(wat.encode(), LIMITS, attach_points=[])


def test_limits_validate() -> None:
    Limits().validate()
    with pytest.raises(WasmError, match="max_execution_ms"):
        Limits(max_execution_ms=0).validate()
    with pytest.raises(WasmError, match="max_stack_bytes"):
        Limits(max_stack_bytes=1024).validate()


# --- pure -----------------------------------------------------------------------------------------------------


def test_attach_points_json() -> None:
    assert parse_attach_point({"Middleware": "OnRequest"}) == "OnRequest"
    assert parse_attach_point({"Middleware": "OnResponse"}) == "OnResponse"
    assert attach_point_json("OnResponse") == {"Middleware": "OnResponse"}
    with pytest.raises(WasmError, match="OnError attach point not yet implemented"):
        parse_attach_point({"Middleware": "OnError"})
    for bad in ("OnRequest", {"Middleware": "onrequest"}, {"Other": "OnRequest"}, {}):
        with pytest.raises(WasmError, match="invalid attach point"):
            parse_attach_point(bad)


def test_apply_headers_order_and_validation() -> None:
    headers = [("Content-Type", "a"), ("x-a", "1"), ("x-a", "2"), ("server", "s")]
    action = Modify(
        headers_set=[("X-A", "new"), ("bad name", "v"), ("x-b", "bad\nvalue")],
        headers_add=[("x-c", "3"), ("X-C", "4")],
        headers_remove=["SERVER", "x-c"],
    )
    # set replaces every x-a at the first one's place; add appends; remove runs last (so x-c is gone).
    assert apply_headers(headers, action) == [("Content-Type", "a"), ("x-a", "new")]
    assert apply_headers(headers, Modify(headers_add=[("x-c", "3")])) == [*headers, ("x-c", "3")]


def test_headers_for_module() -> None:
    assert headers_for_module(
        [("Content-Type", "a"), ("X-Bin", "caf\u00e9"), ("x-tab", "a\tb")]
    ) == [
        ("content-type", "a"),
        ("x-tab", "a\tb"),
    ]


def test_apply_to_request() -> None:
    assert apply_to_request(REQ, Continue()) is REQ
    assert apply_to_request(REQ, Reject(401)) == 401
    assert apply_to_request(REQ, Reject(42)) == 400  # not an HTTP status: 1.13 answers 400
    out = apply_to_request(
        REQ, Modify(status=500, headers_set=[("x-api-key", "k")], body_replace=b"{}")
    )
    assert isinstance(out, WasmRequest)
    assert out.headers == [("content-type", "application/json"), ("x-api-key", "k")]
    assert out.body == b"{}" and out.method == "POST" and out.request_id == "req-123"


def test_apply_to_response() -> None:
    assert apply_to_response(RESP, CONTINUE) == (RESP, False)
    assert apply_to_response(RESP, Reject(503)) == (
        WasmResponse(503, RESP.headers, RESP.body),
        True,
    )
    assert apply_to_response(RESP, Reject(1000))[0].status == 400
    out, stop = apply_to_response(
        RESP, Modify(status=201, headers_remove=["server"], body_replace=b"x")
    )
    assert (out.status, out.headers, out.body, stop) == (
        201,
        [("content-type", "application/json")],
        b"x",
        False,
    )
    assert (
        apply_to_response(RESP, Modify(status=7))[0].status == 200
    )  # an invalid status is ignored


# --- pooled instances (wasmtime's pooling allocator): every call still starts from the module's initial image --

# Reports what it finds left over, then leaves its own traces: reject(300 + 1 if its global is set, + 2 if the
# word at 1024 is set, + 4 if the memory is larger than its initial page, + 8 if its body is empty and the byte
# at 40000 (where a previous call's 40 KB body lay) is not 0). Then it sets the global and the word and grows the memory by a page.
LEAK_PROBE_GLOBAL = "(global $mark (mut i32) (i32.const 0))"
LEAK_PROBE = (
    "(i32.store8 (i32.const 16) (i32.const 1))"
    "(i32.store16 (i32.const 20) (i32.add (i32.const 300) (i32.or (i32.or"
    " (i32.ne (global.get $mark) (i32.const 0))"
    " (i32.shl (i32.ne (i32.load (i32.const 1024)) (i32.const 0)) (i32.const 1)))"
    " (i32.or (i32.shl (i32.gt_u (memory.size) (i32.const 1)) (i32.const 2))"
    " (i32.shl (i32.and (i32.eqz (local.get $bl)) (i32.ne (i32.load8_u (i32.const 40000)) (i32.const 0)))"
    " (i32.const 3))))))"
    "(global.set $mark (i32.const 1)) (i32.store (i32.const 1024) (i32.const 7))"
    "(drop (memory.grow (i32.const 1))) (i32.store8 (i32.const 70000) (i32.const 9))"
    "(i32.const 16)"
)


def test_a_call_never_sees_the_previous_calls_data() -> None:
    """Calls run in instances from wasmtime's pool (a reused slot): each must see a fresh instance: its globals,
    its memory's contents and size as the module declares them, nothing of the previous call's body. 3x the
    pool's slots, so that slots are reused (a runner that reuses its instance fails this: checked)."""
    from smg.wasm.runtime import POOL_SLOTS

    r = runner(guest(on_request=LEAK_PROBE, extra=LEAK_PROBE_GLOBAL))
    big = WasmRequest("POST", "/p", "", [], b"\xaa" * 40000, "r1", 0)
    small = WasmRequest("POST", "/p", "", [], b"", "r2", 0)
    seen = [r.on_request(big if i % 2 == 0 else small) for i in range(3 * POOL_SLOTS)]
    assert seen == [Reject(300)] * (3 * POOL_SLOTS)


def test_failed_calls_give_their_pool_slots_back() -> None:
    """A trap or a timeout must not keep its instance's slot: more failed calls than slots, then a good one."""
    from smg.wasm.runtime import POOL_SLOTS

    r = runner(guest(on_request=TRAP, on_response=REJECT_502))
    for _ in range(POOL_SLOTS + 5):
        with pytest.raises(WasmTrap, match="unreachable"):
            r.on_request(REQ)
    assert r.on_response(RESP) == Reject(502)
