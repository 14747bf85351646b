"""Test helpers for WASM middleware: the example components under examples/wasm/, built offline.

The small examples are component-model text (.wat) that wasmtime parses directly; `component_bytes` turns one
into the binary a file path in `POST /wasm` names. The Python guest (examples/wasm/py_guard) is built with
componentize-py once and cached on disk by the hash of its inputs (a build takes ~20 s and ~18 MB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "wasm"
WIT = ROOT / "smg" / "wasm" / "smg.wit"
# the examples and fixtures by name: examples/wasm/<dir>/<name>.wat
WAT = {
    "auth": EXAMPLES / "auth" / "auth.wat",
    "logger": EXAMPLES / "logger" / "logger.wat",
    "size_limit": EXAMPLES / "size_limit" / "size_limit.wat",
    "noop": EXAMPLES / "testing" / "noop.wat",
    "trap": EXAMPLES / "testing" / "trap.wat",
    "spin": EXAMPLES / "testing" / "spin.wat",
    "hog": EXAMPLES / "testing" / "hog.wat",
}
AUTH_KEY = "secret-api-key-12345"  # compiled into examples/wasm/auth/auth.wat
SIZE_LIMIT = 16384  # examples/wasm/size_limit/size_limit.wat rejects bodies over this many bytes


def component_bytes(name: str) -> bytes:
    """The binary component of example `name` (wat2wasm of its source)."""
    return wasmtime.wat2wasm(WAT[name].read_text())


def write_component(directory: Path, name: str) -> Path:
    path = directory / f"{name}.wasm"
    path.write_bytes(component_bytes(name))
    return path


def componentize_py() -> str | None:
    """The componentize-py command next to this interpreter, or on PATH; None when it is not installed."""
    here = Path(sys.executable).with_name("componentize-py")
    return str(here) if here.exists() else shutil.which("componentize-py")


def py_guard_component(timeout_s: float = 300.0) -> tuple[Path, float]:
    """Build examples/wasm/py_guard (cached by the hash of app.py, the WIT and the tool's version): the .wasm
    path and the build's seconds (0.0 when cached)."""
    tool = componentize_py()
    if tool is None:
        raise RuntimeError("componentize-py is not installed (pip install componentize-py)")
    src = EXAMPLES / "py_guard"
    version = subprocess.run(
        [tool, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    key = hashlib.sha256(
        (src / "app.py").read_bytes() + WIT.read_bytes() + version.encode()
    ).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"smg-wasm-py-guard-{key}.wasm"
    if cache.exists():
        return cache, 0.0
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    start = time.monotonic()
    env = {**os.environ, "SMG_WIT": str(WIT), "COMPONENTIZE_PY": tool}
    proc = subprocess.run(
        ["sh", str(src / "build.sh"), str(tmp)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"componentize-py failed: {proc.stderr[-2000:]}")
    tmp.replace(cache)  # atomic: a concurrent session sees the whole file or none
    return cache, time.monotonic() - start
