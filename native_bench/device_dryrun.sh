#!/usr/bin/env bash
# The check before a device run, here: native_bench/device_issues9_11.sh with DRY=1 (tiny
# sizes, 2-3 minutes) in a stand-in for the device host, on a copy of this tree.
#
# The stand-in, built once under $SIM (default /tmp/devsim; delete it to rebuild): a venv of
# this box's python3 holding only packages the host image has (KINDS.md's list) that smg and
# the benches use, at the host's versions where they matter (tokenizers 0.23.2,
# huggingface_hub 1.33.0); the carried wheels' names and versions (read from WHL, default
# .whl) downloaded again for this python (the device gets the cp312 ones); the Rust SMG wheel
# from OFFLINE (default native_bench/build/offline) with setproctitle for this python. A
# package smg needs that is neither on the host nor carried fails the dry run here.
#
#   bash native_bench/device_dryrun.sh        # from /work/main: WHL=.whl is the real one
#   WHL=/work/main/.whl OFFLINE=/work/main/native_bench/build/offline bash native_bench/device_dryrun.sh
set -eu
SIM=${SIM:-/tmp/devsim}
WHL=$(realpath "${WHL:-.whl}")
OFFLINE=$(realpath "${OFFLINE:-native_bench/build/offline}")
# On the host image (KINDS.md) and imported by smg or the benches (regex: smg/tokenizer's
# fast path, which pyproject does not list).
HOST_PKGS=(uvloop aiohttp httpx psutil pyyaml tokenizers==0.23.2 huggingface_hub==1.33.0 jinja2
    xxhash rich requests click regex)
mkdir -p "$SIM"
if [ ! -x "$SIM/venv/bin/python3" ]; then
    python3 -m venv "$SIM/venv"
fi
"$SIM/venv/bin/pip" install -q "${HOST_PKGS[@]}"
if [ ! -d "$SIM/whl" ]; then
    mkdir -p "$SIM/whl.tmp"
    # name==version of every carried wheel (wheel file names: NAME-VERSION-...).
    wanted=()
    for f in "$WHL"/*.whl; do
        wanted+=("$(basename "$f" | sed -E 's#^([^-]+)-([^-]+)-.*#\1==\2#')")
    done
    "$SIM/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$SIM/whl.tmp" "${wanted[@]}"
    mv "$SIM/whl.tmp" "$SIM/whl"
fi
if [ ! -d "$SIM/offline" ]; then
    mkdir -p "$SIM/offline.tmp"
    ln -s "$OFFLINE"/smg-*.whl "$SIM/offline.tmp/"
    spt=$(basename "$OFFLINE"/setproctitle-*.whl | sed -E 's#^([^-]+)-([^-]+)-.*#\1==\2#')
    "$SIM/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$SIM/offline.tmp" "$spt"
    mv "$SIM/offline.tmp" "$SIM/offline"
fi
# The tree as the device gets it: tracked and untracked-not-ignored files.
rm -rf "$SIM/tree" "$SIM/site" "$SIM/work" "$SIM/out" "$SIM/rust"
mkdir -p "$SIM/tree"
git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2> /dev/null | tar -xf - -C "$SIM/tree"
# What travels: the tree and the two carried folders (the device tool's limit is 64 MiB).
bytes=$(du -scb "$SIM/tree" "$WHL" "$OFFLINE" | tail -1 | cut -f1)
echo "travels: $((bytes / 1048576)) MiB of 64 (tree $(du -sm "$SIM/tree" | cut -f1), $WHL \
$(du -sm "$WHL" | cut -f1), $OFFLINE $(du -smL "$OFFLINE" | cut -f1))"
((bytes < 64 * 1048576)) || { echo "device dry run: FAILED: over 64 MiB"; exit 1; }
cd "$SIM/tree"
PATH="$SIM/venv/bin:$PATH" DRY=1 PY="$SIM/venv/bin/python3" WHL="$SIM/whl" \
    OFFLINE="$SIM/offline" SITE="$SIM/site" WORK="$SIM/work" RUST_VENV="$SIM/rust" \
    OUT="$SIM/out" bash native_bench/device_issues9_11.sh
# Every part must have run to its end, with every row measured.
status=0
grep -E '=== .* (exit [1-9]|SKIPPED)' "$SIM/out/all.log" && status=1
grep -E 'IMPORT FAILED|error:|skipped:' "$SIM/out/summary.md" "$SIM/out/env.txt" && status=1
echo "device dry run: $([ $status = 0 ] && echo PASSED || echo FAILED) (logs: $SIM/out)"
exit $status
