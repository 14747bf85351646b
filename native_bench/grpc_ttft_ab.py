#!/usr/bin/env python3
"""TTFT A/B of two smg revisions over gRPC at one fixed, moderate rate (not a fraction of
another gateway's saturation: on a shared box that rate swings 2-3x between runs and can put
smg past its own saturation). One gRPC mock (grpc_bench.start_mock), then per round this
checkout's smg and --smg-base's (`git worktree add --detach DIR REV`), the order swapped
every round; `smg bench` streaming chat, 1,024-token random prompts, Poisson arrivals.

    .venv/bin/python native_bench/grpc_ttft_ab.py --smg-base /tmp/base --rate 40 --rounds 3

With native_bench/ttft_stages.patch applied to both trees (`git apply`) and
SMG__TTFT_TRACE=PREFIX set, each data-plane process appends per-request stage timestamps
(monotonic seconds) to PREFIX.<pid>: start (request parsed), task, tok, ids (prompt
tokenized), b0/b1 (proto request built), conn, open (HEADERS+DATA written), arr (the
first message parsed off the socket), got (the exchange's task has it), sent (first SSE
write). The patch is for measuring only; it is not meant to be merged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc_bench as gb

KEYS = ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "request_throughput")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smg-base", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s")
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    opts = ap.parse_args()
    args = gb.parse_args(
        ["--gateways", "smg-p2,smg-base", "--input-lens", str(opts.input_len),
         "--smg-base", str(opts.smg_base)]
    )  # fmt: skip
    rows: dict[str, list[dict[str, Any]]] = {"smg-p2": [], "smg-base": []}
    with tempfile.TemporaryDirectory(prefix="ttft-ab-") as tmp:
        work = Path(tmp)
        model_dir = gb.make_model_dir(work / "llama3")
        mock = gb.start_mock(model_dir, "vllm", processes=2)
        try:
            for r in range(opts.rounds):
                order = ("smg-p2", "smg-base") if r % 2 == 0 else ("smg-base", "smg-p2")
                for name in order:
                    gw, port = gb.start_gateway(name, args, mock, model_dir, work)
                    try:
                        res = gb.run_load(
                            args, port, model_dir, opts.input_len, opts.num_prompts,
                            opts.rate, work, f"{name}-{r}",
                        )  # fmt: skip
                    finally:
                        gw.stop()
                    row = {k: round(float(res.get(k) or 0.0), 2) for k in KEYS}
                    row["loadavg"] = round(os.getloadavg()[0], 1)
                    rows[name].append(row)
                    gb.log(f"round {r} {name}: {json.dumps(row)}")
        finally:
            mock.stop()
    for name, got in rows.items():
        for k in ("median_ttft_ms", "p90_ttft_ms"):
            v = [row[k] for row in got]
            if v:
                print(f"{name} {k}: median {statistics.median(v):.2f} range {min(v)}-{max(v)}")
    if opts.out is not None:
        opts.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
