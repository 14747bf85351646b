"""Run `smg bench --embedded` as a subprocess and find what it left running.

marker = f"emb-{uuid.uuid4().hex[:10]}"  # the mocks' --model: marks every process
code, text = benchutil.run_bench(benchutil.bench_command(marker, "--num-prompts", "4"), tmp_path)
assert code == 0, text
assert benchutil.marked(marker) == []  # gateway and mock workers all stopped
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil


def marked(marker: str, exclude: int | None = None) -> list[psutil.Process]:
    """Live processes whose command line carries `marker` (the mock's --model name)."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["pid"] == exclude or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(marker in part for part in cmd):
            out.append(proc)
    return out


def bench_command(marker: str, *extra: str, mock: str = "--ttft-ms 5 --itl-ms 2") -> list[str]:
    return [
        sys.executable,
        "-m",
        "smg",
        "bench",
        "--embedded",
        "--mock-worker-args",
        f"{mock} --output-len 100000 --model {marker}",
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        *extra,
    ]


def run_bench(command: list[str], tmp_path: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run `command` in `tmp_path` (also its TMPDIR, where the embedded gateway's log goes)
    to its end, killed past `timeout`: (exit status, stdout + stderr)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out.decode() + err.decode()
