#!/usr/bin/env bash
# One prepared run on a lent 16-core host without network (the device tool): smg's data-plane
# processes against the Rust SMG 1.13 pinned to the same cores (1, 2, 4, 8; chat), then TLS on
# both and --api-key on both at 8 cores (chat and stream). The load side (C stub + wrk) always has cores 8-15.
#
# Needs, carried beside the tree: .whl/ (cp312 manylinux wheels, `pip download --no-deps`, of
# what that host's image lacks: httptools msgspec orjson atomicshm starlette uvicorn joserfc
# cryptography cffi pycparser trustme idna), native_bench/build/offline/ (from
# `run.py --prepare-offline`: the Rust SMG wheel, setproctitle, wrk and its libluajit), and
# native_bench/build/{stub,loadgen} in case the host has no C compiler.
# Writes env.txt, all.log and results.tar.gz (every results JSON and table) to $OUT (the
# device tool brings back at most 8 files). ROUNDS=3 for three rotated rounds per system.
set -u
OUT=${OUT:-/tmp/smg-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
# Not the repo: run.py adds it for smg only (the Rust SMG is also a package called smg).
export PYTHONPATH=/tmp/site
{
    echo "nproc: $(nproc)"; uname -a; python3 -V
    echo "nproc under taskset -c 0-3: $(taskset -c 0-3 nproc)"
    cc --version 2>&1 | head -1
    python3 -c 'import smg, uvloop, httptools, msgspec, orjson, atomicshm; print("smg", smg.__file__)'
} > "$OUT/env.txt" 2>&1
WHEEL=$(ls native_bench/build/offline/smg-*.whl)
COMMON=(--rust-wheel "$WHEEL" --rust-venv /tmp/venv-rust --smg-python python3
    --wrk native_bench/build/offline/wrk --rounds "${ROUNDS:-1}" --duration 5 --warmup 1
    --fixed-rate-fraction 0 --gateways smg,rust --load-cores 8-15)
bench() {  # name, time limit in seconds, then run.py arguments
    local name=$1 limit=$2
    shift 2
    echo "=== $name $(date -u +%T)" >> "$OUT/all.log"
    timeout "$limit" python3 native_bench/run.py "${COMMON[@]}" "$@" --out "$OUT/$name.json" \
        >> "$OUT/all.log" 2>&1
    echo "=== $name exit $? $(date -u +%T)" >> "$OUT/all.log"
}
# The whole script must end inside one device command (10 minutes, start-up included).
bench scale-1 150 --gateway-cores 0 --smg-processes 1 --payloads chat
for p in 2 4 8; do
    bench "scale-$p" 100 --gateway-cores "0-$((p - 1))" --smg-processes "$p" --payloads chat
done
bench tls-8 130 --gateway-cores 0-7 --smg-processes 8 --payloads chat,stream --tls
bench apikey-8 130 --gateway-cores 0-7 --smg-processes 8 --payloads chat,stream \
    --api-key bench-device-key-0123456789
tar -C "$OUT" -czf "$OUT/results.tar.gz" --remove-files $(cd "$OUT" && ls *.json *.md)
