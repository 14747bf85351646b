#!/bin/sh
# Builds auth.wasm next to auth.wat (needs the wasmtime PyPI package: smg's venv has it).
set -e
here=$(dirname "$0")
exec "${PYTHON:-python3}" "$here/../build_wat.py" "$here/auth.wat"
