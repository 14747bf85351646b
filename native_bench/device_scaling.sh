#!/usr/bin/env bash
# One prepared run on a lent 16-core host without network (the device tool): smg's data-plane
# processes against the Rust SMG 1.13 pinned to the same cores (1, 2, 4, 8), then TLS on both
# and --api-key on both at 8 cores. The load side (C stub + wrk) always has cores 8-15.
#
# Needs, carried beside the tree: .whl/ (cp312 wheels of smg's compiled dependencies and
# trustme; README "Performance" says which), native_bench/build/offline/ (from
# `run.py --prepare-offline`: the Rust SMG wheel, setproctitle, wrk and its libluajit), and
# native_bench/build/{stub,loadgen} in case the host has no C compiler.
# Writes at most 8 files to $OUT (the tool's limit): env.txt, all.log and six results JSONs.
set -u
OUT=${OUT:-/tmp/smg-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
    echo "nproc: $(nproc)"; uname -a; python3 -V
    echo "nproc under taskset -c 0-3: $(taskset -c 0-3 nproc)"
    cc --version 2>&1 | head -1
    python3 -c 'import smg, uvloop, httptools, msgspec, orjson, atomicshm; print("smg", smg.__file__)'
} > "$OUT/env.txt" 2>&1
WHEEL=$(ls native_bench/build/offline/smg-*.whl)
COMMON=(--rust-wheel "$WHEEL" --rust-venv /tmp/venv-rust --smg-python python3
    --wrk native_bench/build/offline/wrk --rounds 1 --duration 5 --warmup 1
    --fixed-rate-fraction 0 --gateways smg,rust --load-cores 8-15 --payloads chat,stream)
bench() {  # name, then run.py arguments
    local name=$1
    shift
    echo "=== $name $(date -u +%T)" >> "$OUT/all.log"
    timeout 150 python3 native_bench/run.py "${COMMON[@]}" "$@" --out "$OUT/$name.json" \
        >> "$OUT/all.log" 2>&1
    echo "=== $name exit $?" >> "$OUT/all.log"
}
for p in 1 2 4 8; do
    bench "scale-$p" --gateway-cores "0-$((p - 1))" --smg-processes "$p"
done
bench tls-8 --gateway-cores 0-7 --smg-processes 8 --tls
bench apikey-8 --gateway-cores 0-7 --smg-processes 8 --api-key bench-device-key-0123456789
