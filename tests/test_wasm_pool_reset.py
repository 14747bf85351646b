"""A pooled instance slot is reset to the module's initial image between calls, however it is
reset: the part wasmtime keeps resident is rewritten in place (smg.wasm.runtime's
POOL_KEEP_RESIDENT), the rest given back to the kernel. A module shaped like a Rust one (17
pages: a 1 MiB shadow stack below its data) leaves marks below, around and far above the kept
part and over a data segment; the next call in that slot must find none of them."""

from __future__ import annotations

from test_wasm_runtime import guest

from smg.wasm.runtime import POOL_KEEP_RESIDENT, POOL_SLOTS, ModuleRunner, compile_component
from smg.wasm.types import Limits, Reject, WasmRequest

PAGES = 17
# Offsets written by every call: inside the first page, just past the kept part, mid-memory,
# near the top of the shadow stack, and the first byte of the data segment "x-method" (200).
MARKS = (5000, POOL_KEEP_RESIDENT + 8, 500_000, PAGES * 65536 - 64)


def _probe() -> str:
    """reject(300 + one bit per mark found set, + 16 when the data segment's byte is not 'x'),
    then set every mark and overwrite the data segment's byte."""
    expr = "(i32.const 0)"
    for bit, at in enumerate(MARKS):
        expr = (
            f"(i32.or {expr} (i32.shl (i32.ne (i32.load8_u (i32.const {at})) (i32.const 0))"
            f" (i32.const {bit})))"
        )
    expr = (
        f"(i32.or {expr} (i32.shl (i32.ne (i32.load8_u (i32.const 200)) (i32.const 120))"
        f" (i32.const {len(MARKS)})))"
    )
    marks = " ".join(f"(i32.store8 (i32.const {at}) (i32.const 9))" for at in MARKS)
    return (
        "(i32.store8 (i32.const 16) (i32.const 1))"
        f"(i32.store16 (i32.const 20) (i32.add (i32.const 300) {expr}))"
        f"{marks} (i32.store8 (i32.const 200) (i32.const 0)) (i32.const 16)"
    )


def _runner(extra: str = "") -> ModuleRunner:
    wat = guest(on_request=_probe(), extra=extra)
    one = '(memory (export "memory") 1)'
    assert wat.count(one) == 1
    wat = wat.replace(one, f'(memory (export "memory") {PAGES})')
    limits = Limits()
    return ModuleRunner(None, compile_component(wat.encode(), limits), limits)


REQUEST = WasmRequest("POST", "/p", "", [("a", "b")], b"body" * 100, "r", 0)


def test_every_call_finds_the_initial_image_in_a_large_memory() -> None:
    runner = _runner()
    # More calls than slots, so that slots are reused.
    seen = [runner.on_request(REQUEST) for _ in range(3 * POOL_SLOTS)]
    assert seen == [Reject(300)] * (3 * POOL_SLOTS)


def test_an_image_with_the_marks_set_is_restored_every_call() -> None:
    """The probe sees a mark that is there (so the test above can fail): with the marks in the
    module's own data, every call finds all of them, wherever they lie."""
    runner = _runner(" ".join(f'(data (i32.const {at}) "\\01")' for at in MARKS))
    seen = [runner.on_request(REQUEST) for _ in range(3 * POOL_SLOTS)]
    assert seen == [Reject(300 + 2 ** len(MARKS) - 1)] * (3 * POOL_SLOTS)
