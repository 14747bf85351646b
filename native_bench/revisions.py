"""Two revisions of smg side by side: the same C stub and wrk, runs alternated A, B, A, B.

For hot-path changes, where the question is "did this commit cost anything" rather than
"how do we compare with the Rust SMG" (that is `run.py`). Each revision is a checkout with
its own Python (a venv with that checkout installed): one before the change, one after.
On a shared 2-core machine single runs differ by 10-20%, so alternate several rounds and
compare medians.

    git worktree add /tmp/smg-base <rev> && python3 -m venv /tmp/smg-base/.venv \
        && /tmp/smg-base/.venv/bin/pip install -e /tmp/smg-base
    .venv/bin/python native_bench/revisions.py \
        --a /tmp/smg-base/.venv/bin/python:/tmp/smg-base --b .venv/bin/python:. \
        --payloads chat,stream --rounds 5

Needs wrk on PATH and psutil; builds nothing (run `run.py` once to build the stub).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
STUB = HERE / "build" / "stub"
PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "stream": "/v1/chat/completions",
}


def one_run(
    python: str, repo: str, payload: str, seconds: int, connections: int
) -> tuple[float, float]:
    """(requests/s, gateway CPU seconds per 1,000 requests) of one fresh gateway."""
    stub = subprocess.Popen(
        [str(STUB), "--host", "127.0.0.1", "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    gateway = None
    try:
        port = stub.stdout.readline().split()[2]  # type: ignore[union-attr]
        gateway = subprocess.Popen(
            [
                python,
                *("-m", "smg", "launch", "--host", "127.0.0.1", "--port", "0", "--processes", "2"),
                *("--worker-urls", f"http://127.0.0.1:{port}", "--prometheus-port", "0"),
                *("--log-level", "warn", "--policy", "round_robin"),
            ],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(Path(repo).resolve())},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        url = gateway.stdout.readline().strip().split()[-1]  # type: ignore[union-attr]
        time.sleep(1.5)
        root = psutil.Process(gateway.pid)
        processes = [root, *root.children(recursive=True)]
        wrk = ["wrk", "-t1", "-c", str(connections), "-s", str(HERE / "post.lua")]
        target = [url + PATHS[payload], "--", str(HERE / "payloads" / f"{payload}.json")]
        subprocess.run([*wrk, "-d2s", *target], capture_output=True, check=True)  # warm-up
        before = sum(sum(p.cpu_times()[:2]) for p in processes)
        out = subprocess.run(
            [*wrk, f"-d{seconds}s", *target], capture_output=True, text=True, check=True
        ).stdout
        cpu = sum(sum(p.cpu_times()[:2]) for p in processes) - before
        requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
        return requests / seconds, cpu / requests * 1000
    finally:
        if gateway is not None:
            os.killpg(gateway.pid, signal.SIGTERM)
            gateway.wait(15)
        stub.terminate()
        stub.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--a", required=True, help="PYTHON:REPO of revision A (before)")
    ap.add_argument("--b", required=True, help="PYTHON:REPO of revision B (after)")
    ap.add_argument("--payloads", default="chat,stream")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    if not STUB.exists():
        print(f"{STUB} is missing: run native_bench/run.py once to build it", file=sys.stderr)
        return 2
    systems = {"A": args.a.split(":", 1), "B": args.b.split(":", 1)}
    for payload in args.payloads.split(","):
        results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        for round_no in range(args.rounds):
            order = ("A", "B") if round_no % 2 == 0 else ("B", "A")
            for name in order:
                python, repo = systems[name]
                rps, cpu = one_run(python, repo, payload, args.duration, args.connections)
                results[name].append((rps, cpu))
                print(
                    f"{payload} round {round_no + 1} {name}: {rps:,.0f} req/s, {cpu:.4f} CPU s/1k",
                    flush=True,
                )
        a_rps = statistics.median(r for r, _ in results["A"])
        b_rps = statistics.median(r for r, _ in results["B"])
        a_cpu = statistics.median(c for _, c in results["A"])
        b_cpu = statistics.median(c for _, c in results["B"])
        print(
            f"{payload}: median A {a_rps:,.0f} req/s {a_cpu:.4f} CPU s/1k, "
            f"B {b_rps:,.0f} req/s {b_cpu:.4f} CPU s/1k; B/A throughput {b_rps / a_rps:.3f}, "
            f"CPU {b_cpu / a_cpu:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
