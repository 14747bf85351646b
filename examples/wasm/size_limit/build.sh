#!/bin/sh
# Builds size_limit.wasm next to size_limit.wat (needs the wasmtime PyPI package: smg's venv has it).
set -e
here=$(dirname "$0")
exec "${PYTHON:-python3}" "$here/../build_wat.py" "$here/size_limit.wat"
