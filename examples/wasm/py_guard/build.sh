#!/bin/sh
# Builds py_guard.wasm (about 18 MB: it carries a CPython) from app.py against smg's WIT world with componentize-py
# (`pip install componentize-py`; no network needed). Takes about 20 s; compiling it in smg takes about 15 s more.
set -e
here=$(cd "$(dirname "$0")" && pwd)
wit="${SMG_WIT:-$here/../../../smg/wasm/smg.wit}"
cd "$here"
exec "${COMPONENTIZE_PY:-componentize-py}" -d "$wit" -w smg componentize app -o "${1:-$here/py_guard.wasm}"
