"""Compare smg's two listening modes: one SO_REUSEPORT socket per process vs one inherited
socket that every process accepts from. Reports requests/s and how evenly requests spread
over the data-plane processes (from each process's own `smg_http_requests_total`).

    python native_bench/listen_modes.py --rounds 3 --duration 5 --processes 2

Needs wrk and the C stub (built by run.py: `python native_bench/run.py --gateways direct`
once, or `cc -O2 -o native_bench/build/stub native_bench/stub.c`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# tests/gatewayutil.free_port: the one port picker (no port handed out twice lately).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gatewayutil import free_port

HERE = Path(__file__).resolve().parent
STUB = HERE / "build" / "stub"
LUA = HERE / "post.lua"
PAYLOAD = HERE / "payloads" / "chat.json"


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready")


def per_process_requests(metrics_url: str) -> dict[str, int]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    counts: dict[str, int] = {}
    pattern = re.compile(
        r'^smg_http_requests_total\{process="(\d+)",method="POST",path="/v1/chat/completions"\} (\d+)'
    )
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + int(match.group(2))
    return counts


def run_mode(mode: str, stub_url: str, processes: int, duration: int, connections: int) -> dict:
    port, metrics_port = free_port(), free_port()
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smg",
            "launch",
            "--worker-urls",
            stub_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-port",
            str(metrics_port),
            "--processes",
            str(processes),
            "--policy",
            "round_robin",
            "--log-level",
            "warn",
            "--listen-mode",
            mode,
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readiness")
        env = dict(os.environ)
        target = f"http://127.0.0.1:{port}/v1/chat/completions"
        subprocess.run(
            ["wrk", "-t1", f"-c{connections}", "-d1s", "-s", str(LUA), target, "--", str(PAYLOAD)],
            capture_output=True,
            env=env,
            check=True,
        )
        before = per_process_requests(f"http://127.0.0.1:{metrics_port}/metrics")
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{duration}s",
                "-s",
                str(LUA),
                target,
                "--",
                str(PAYLOAD),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        after = per_process_requests(f"http://127.0.0.1:{metrics_port}/metrics")
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        spread = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return {"rps": rps, "per_process": spread}
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    stub_port = free_port()
    stub = subprocess.Popen(
        [str(STUB), "--host", "127.0.0.1", "--port", str(stub_port)], stdout=subprocess.DEVNULL
    )
    results: dict[str, list[dict]] = {"reuseport": [], "inherit": []}
    try:
        wait_http(f"http://127.0.0.1:{stub_port}/health")
        for round_index in range(args.rounds):
            modes = ["reuseport", "inherit"] if round_index % 2 == 0 else ["inherit", "reuseport"]
            for mode in modes:
                result = run_mode(
                    mode,
                    f"http://127.0.0.1:{stub_port}",
                    args.processes,
                    args.duration,
                    args.connections,
                )
                results[mode].append(result)
                print(mode, json.dumps(result), flush=True)
    finally:
        stub.terminate()
        stub.wait(10)
    print("\n| mode | req/s median (min-max) | busiest process share, median |")
    print("|---|---|---|")
    for mode, runs in results.items():
        rates = [r["rps"] for r in runs]
        shares = [
            max(r["per_process"].values()) / max(1, sum(r["per_process"].values())) for r in runs
        ]
        print(
            f"| {mode} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {statistics.median(shares):.2f} (even: {1 / args.processes:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
