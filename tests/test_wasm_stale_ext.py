"""A stale smg.wasm._fastcall build (an in-place build from an older checkout: other
functions, other arguments) is set aside at import with one warning, and module calls take
the ctypes path. Before, the runtime used whatever `_fastcall` imported, so a build that
lacked `call_request_raw` failed every request a module saw (AttributeError in the chain)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from smg.wasm import runtime

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: the check is made once, when smg.wasm.runtime is imported.
PROBE = textwrap.dedent(
    """
    import logging, sys, types
    sys.path.insert(0, {tests!r})
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    stale = types.ModuleType("smg.wasm._fastcall")
    {api_line}
    stale.setup = lambda *a: None
    stale.call_request = lambda *a: 1 / 0  # what an older build's call would do: not this one
    sys.modules["smg.wasm._fastcall"] = stale
    from smg.wasm import runtime
    from smg.wasm.runtime import ModuleRunner, compile_component
    from smg.wasm.types import CONTINUE, Limits, Reject
    from test_wasm_runtime import REJECT_403, REQ, guest
    print("fast:", runtime._fast is not None)
    limits = Limits()
    runner = ModuleRunner(None, compile_component(guest(on_request=REJECT_403).encode(), limits), limits)
    print("action:", runner.on_request(REQ))
    """
)


def _probe(api_line: str) -> subprocess.CompletedProcess[str]:
    code = PROBE.format(tests=str(ROOT / "tests"), api_line=api_line)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_a_build_without_the_api_version_is_set_aside_with_a_warning() -> None:
    done = _probe("")
    assert done.returncode == 0, done.stderr
    assert "fast: False" in done.stdout
    assert "action: Reject(status=403)" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "stale build" in line]
    assert len(warnings) == 1, done.stderr
    assert "smg.wasm WARNING" in warnings[0] and "API None, this code needs" in warnings[0]


def test_a_build_with_another_api_version_is_set_aside() -> None:
    done = _probe(f"stale.API = {runtime.FASTCALL_API - 1}")
    assert done.returncode == 0, done.stderr
    assert "fast: False" in done.stdout and "action: Reject(status=403)" in done.stdout


def test_the_built_extension_carries_the_api_this_code_needs() -> None:
    assert runtime._fast is not None and runtime._fast.API == runtime.FASTCALL_API
