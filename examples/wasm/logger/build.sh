#!/bin/sh
# Builds logger.wasm next to logger.wat (needs the wasmtime PyPI package: smg's venv has it).
set -e
here=$(dirname "$0")
exec "${PYTHON:-python3}" "$here/../build_wat.py" "$here/logger.wat"
