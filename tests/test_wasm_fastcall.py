"""smg.wasm._fastcall (the whole module call in one C function) against the ctypes path it
replaces: the same component and input through both give the same Action, or the same WasmTrap
(message and kind), for every shape the runtime tests use: echoes of every field, rejects, empty
values, a 1 MiB body, strings that are not UTF-8, traps, the execution, memory and stack limits,
malformed actions, a component importing WASI."""

from __future__ import annotations

from typing import Any

import pytest
from test_wasm_runtime import (
    BAD_CASE,
    BAD_UTF8,
    ECHO_REQUEST,
    ECHO_RESPONSE,
    LEAK_PROBE,
    LEAK_PROBE_GLOBAL,
    LOOP,
    OUT_OF_BOUNDS,
    RECURSE,
    RECURSE_FN,
    REJECT_403,
    REJECT_502,
    REQ,
    RESP,
    TRAP,
    grow,
    guest,
)

from smg.wasm import runtime
from smg.wasm.runtime import POOL_SLOTS, ModuleRunner, compile_component
from smg.wasm.types import CONTINUE, Limits, Modify, Reject, WasmRequest, WasmResponse, WasmTrap

WASI = '(import "wasi:cli/environment@0.2.0" (instance (export "get-arguments" (func (result (list string))))))'


def _wasi_guest() -> str:
    wat = guest(on_request=REJECT_403).rstrip()
    return wat[: -len(")")] + WASI + ")"


def _pair(wat: str, limits: Limits) -> tuple[ModuleRunner, ModuleRunner]:
    artifact = compile_component(wat.encode(), limits)
    fast = ModuleRunner(None, artifact, limits)
    slow = ModuleRunner(None, artifact, limits, fast=False)
    assert fast._fast is not None and slow._fast is None
    return fast, slow


def _outcome(call: Any, arg: Any) -> Any:
    try:
        return ("action", call(arg))
    except WasmTrap as e:
        return ("trap", str(e), e.kind)


def test_the_extension_is_built_and_used() -> None:
    """CI builds it (`pip install -e .` runs setup.py's build_ext): a missing build would
    silently run the 4x slower ctypes path."""
    assert runtime._fast is not None
    fast, _ = _pair(guest(), Limits())
    assert fast.on_request(REQ) is CONTINUE and fast.on_response(RESP) is CONTINUE


SURROGATES = WasmRequest("GET", "/a\udcff", "q=\ud800", [("x-k", "v\udc80")], b"", "r\udfff", 0)
BIG = WasmRequest("POST", "/", "", [], bytes(range(256)) * 4096, "r", 0)
EMPTY = WasmRequest("", "", "", [], b"", "", 0)
WRAP = WasmRequest("POST", "/", "", [("a", "")], b"\x00", "r", 2**64 + 5)  # now wraps to u64
REQUESTS = {"req": REQ, "surrogates": SURROGATES, "big": BIG, "empty": EMPTY, "wrap": WRAP}
RESPONSES = {
    "resp": RESP,
    "empty": WasmResponse(204, [], b""),
    "status-wraps": WasmResponse(65536 + 201, [("k", "v" * 300)], b"x"),
}

# Separate limits: a 1 MiB body lowered under a 300 ms deadline can time out on a loaded box.
SMALL = Limits(max_memory_bytes=4 * 1024 * 1024)
SHORT = Limits(max_execution_ms=300)
CASES: dict[str, tuple[str, Limits]] = {
    "continue": (guest(), Limits()),
    "echo": (guest(on_request=ECHO_REQUEST, on_response=ECHO_RESPONSE), Limits()),
    "reject": (guest(on_request=REJECT_403, on_response=REJECT_502), Limits()),
    "trap": (guest(on_request=TRAP, on_response=TRAP), Limits()),
    "loop": (guest(on_request=LOOP), SHORT),
    "memory-fits": (guest(on_request=grow(2)), SMALL),
    "memory-over": (guest(on_request=grow(100)), SMALL),
    "stack": (guest(on_request=RECURSE, extra=RECURSE_FN), Limits()),
    "bad-case": (guest(on_request=BAD_CASE), Limits()),
    "bad-utf8": (guest(on_request=BAD_UTF8), Limits()),
    "out-of-bounds": (guest(on_request=OUT_OF_BOUNDS), Limits()),
    "wasi": (_wasi_guest(), Limits()),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_same_outcome_as_the_ctypes_path(case: str) -> None:
    wat, limits = CASES[case]
    fast, slow = _pair(wat, limits)
    requests = dict(REQUESTS)
    if case == "loop":  # one input: each call runs to the time limit
        requests = {"req": REQ}
    for name, req in requests.items():
        got, want = _outcome(fast.on_request, req), _outcome(slow.on_request, req)
        assert got == want, name
    for name, resp in RESPONSES.items():
        got, want = _outcome(fast.on_response, resp), _outcome(slow.on_response, resp)
        assert got == want, name


def test_exact_values_through_the_fast_path() -> None:
    """Not only equal to the ctypes path: the values themselves (test_wasm_runtime's echo tests
    run through the fast path too, it being the default)."""
    fast, _ = _pair(guest(on_request=ECHO_REQUEST, on_response=ECHO_RESPONSE), Limits())
    assert fast.on_request(BIG).body_replace == BIG.body  # type: ignore[union-attr]
    assert fast.on_request(SURROGATES).headers_add == [("x-k", "v?")]  # type: ignore[union-attr]
    # A tuple of headers and a bytearray body are taken as the ctypes path takes them.
    odd = WasmRequest("POST", "/", "", (("a", "b"),), bytearray(b"xy"), "r", 0)  # type: ignore[arg-type]
    assert fast.on_request(odd).headers_add == [("a", "b")]  # type: ignore[union-attr]
    assert fast.on_request(odd).body_replace == b"xy"  # type: ignore[union-attr]
    assert fast.on_response(RESP) == Modify(
        status=201, headers_add=RESP.headers, body_replace=b"\x01" * 3000
    )


def test_bad_argument_types_raise_not_crash() -> None:
    fast, _ = _pair(guest(), Limits())
    for req in (
        WasmRequest("POST", "/", "", [("a",)], b"", "r", 0),  # type: ignore[list-item]
        WasmRequest("POST", "/", "", [("a", 1)], b"", "r", 0),  # type: ignore[list-item]
        WasmRequest(b"POST", "/", "", [], b"", "r", 0),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError):
            fast.on_request(req)
    assert fast.on_request(REQ) is CONTINUE


def test_fresh_instance_and_slots_given_back_through_the_fast_path() -> None:
    """The pool's slots are reused (3x their number): every call still sees a fresh instance, and
    failed calls give their slot back."""
    fast, _ = _pair(guest(on_request=LEAK_PROBE, extra=LEAK_PROBE_GLOBAL), Limits())
    big = WasmRequest("POST", "/p", "", [], b"\xaa" * 40000, "r1", 0)
    small = WasmRequest("POST", "/p", "", [], b"", "r2", 0)
    seen = [fast.on_request(big if i % 2 == 0 else small) for i in range(3 * POOL_SLOTS)]
    assert seen == [Reject(300)] * (3 * POOL_SLOTS)
    trap, _ = _pair(guest(on_request=TRAP, on_response=REJECT_502), Limits())
    for _ in range(POOL_SLOTS + 5):
        with pytest.raises(WasmTrap, match="unreachable"):
            trap.on_request(REQ)
    assert trap.on_response(RESP) == Reject(502)
