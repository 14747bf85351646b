#!/usr/bin/env python3
"""Build a component-model WAT source into a .wasm component: `python3 build_wat.py SRC.wat [OUT.wasm]`.

wasmtime (the `wasmtime` PyPI package smg depends on) parses the component text format itself, so this is the
whole tool chain: text -> binary, then a compile to check that the result is a valid component.
"""

from __future__ import annotations

import sys
from pathlib import Path

import wasmtime
from wasmtime import component


def build(src: Path, out: Path | None = None) -> Path:
    binary = wasmtime.wat2wasm(src.read_text())
    component.Component(wasmtime.Engine(), binary)  # raises on an invalid component
    out = out or src.with_suffix(".wasm")
    out.write_bytes(binary)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    path = build(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None)
    print(f"built {path} ({path.stat().st_size} bytes)")
