#!/usr/bin/env bash
# One prepared wasm_bench run on a lent 16-core host without network (the device tool): one trivial OnRequest
# WASM module against none, smg with 8 and with 2 data-plane processes on cores 0-7, the C stub and wrk on 8-15.
#
# Needs, carried in native_bench/build/ (ignored by git): whl/ (cp312 manylinux wheels, `pip download --no-deps`:
# smg's imported dependencies and wasmtime 50), offline/ (wrk and its libluajit) and the stub/loadgen binaries.
# Writes env.txt and wasm-*.{log,json} to $OUT. Prepare here, then carry native_bench/build:
#   mkdir -p native_bench/build/whl native_bench/build/offline
#   .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d native_bench/build/whl httptools msgspec orjson atomicshm starlette uvicorn joserfc cryptography cffi \
#     pycparser trustme idna 'wasmtime>=50,<51' xxhash uvloop aiohttp multidict yarl frozenlist aiosignal \
#     propcache aiohappyeyeballs attrs httpx httpcore h11 anyio sniffio certifi pyyaml psutil jinja2 markupsafe \
#     rich markdown-it-py mdurl pygments hpack typing_extensions tokenizers          # about 31 MB with offline/
#   cp /usr/bin/wrk native_bench/build/offline/ && cp -L /lib/x86_64-linux-gnu/libluajit-5.1.so.2 native_bench/build/offline/
#   .venv/bin/python -c 'import sys; sys.path.insert(0, "native_bench"); import run; run.build_native()'
set -u
OUT=${OUT:-/tmp/smg-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    native_bench/build/whl/*.whl > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{
    echo "nproc: $(nproc)"; uname -a; python3 -V
    python3 -c 'import smg.dataplane.app, smg.control.plane, smg.wasm.runtime, wasmtime; print("imports ok")'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
for procs in 8 2; do
    timeout 240 python3 native_bench/wasm_bench.py --rounds 3 --duration 5 --warmup 1 --connections 64 \
        --processes "$procs" --out "$OUT/wasm-$procs.json" > "$OUT/wasm-$procs.log" 2>&1
    echo "=== $procs processes: exit $?"
    tail -12 "$OUT/wasm-$procs.log"
done
