"""wasm_bench's --pages: the noop module with a larger memory still answers continue, and its
memory is what was asked for."""

from __future__ import annotations

from wasm_bench import NOOP_WAT, noop_wat

from smg.wasm.runtime import ModuleRunner, compile_component
from smg.wasm.types import CONTINUE, Limits, WasmRequest


def test_one_page_is_the_file_itself() -> None:
    assert noop_wat(1) == NOOP_WAT.read_text()


def test_a_rust_shaped_memory_answers_continue() -> None:
    wat = noop_wat(17)
    assert '(memory (export "memory") 17)' in wat and "(i32.const 1040384)" in wat
    limits = Limits()
    runner = ModuleRunner(None, compile_component(wat.encode(), limits), limits)
    request = WasmRequest("POST", "/v1/chat/completions", "", [("a", "b")], b"{}" * 90, "r", 0)
    assert [runner.on_request(request) for _ in range(40)] == [CONTINUE] * 40
