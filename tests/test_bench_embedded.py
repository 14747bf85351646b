"""`smg bench --embedded`: a real gateway and mock workers, started and stopped by the bench."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from smg.bench import serve
from smg.bench.args import build_parser
from smg.bench.embedded import DEFAULT_MOCK_ARGS, launch_command, plot_by_default
from tests.benchutil import bench_command, marked, run_bench
from tests.gatewayutil import wait_until


def test_launch_command_and_defaults() -> None:
    args = build_parser().parse_args(["--embedded", "--gateway-args", "--policy round_robin"])
    assert (args.embedded_workers, args.embedded_processes) == (2, 1)
    assert args.mock_worker_args == DEFAULT_MOCK_ARGS
    assert launch_command(args, python="py") == [
        "py",
        "-m",
        "smg",
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--prometheus-port",
        "0",
        "--processes",
        "1",
        "--mock-workers",
        "2",
        "--mock-worker-args",
        DEFAULT_MOCK_ARGS,
        "--policy",
        "round_robin",
    ]


def test_plot_is_on_by_default_only_when_unset() -> None:
    unset = argparse.Namespace(plot=None)
    plot_by_default(unset)
    assert unset.plot == ""
    given = argparse.Namespace(plot="mine.html")
    plot_by_default(given)
    assert given.plot == "mine.html"
    absent = argparse.Namespace()
    plot_by_default(absent)
    assert not hasattr(absent, "plot")


@pytest.mark.parametrize(
    "flags",
    [
        ["--base-url", "http://127.0.0.1:9"],
        ["--host", "10.0.0.1"],
        ["--port", "9000"],
        ["--overhead"],
        ["--embedded-workers", "0"],
    ],
)
def test_refuses_flags_that_pick_another_target(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve.run(["--embedded", *flags, "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "smg bench:" in err and ("--embedded" in err or ">= 1" in err)


def test_embedded_run_exits_zero_with_valid_result_and_stops_everything(tmp_path: Path) -> None:
    marker = f"emb-{uuid.uuid4().hex[:10]}"
    command = bench_command(
        marker,
        "--num-prompts",
        "24",
        "--random-output-len",
        "20",
        "--request-rate",
        "200",
        "--save-result",
        "--result-filename",
        "r.json",
    )
    code, text = run_bench(command, tmp_path)
    assert code == 0, text
    assert "embedded: smg gateway http://127.0.0.1:" in text
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 24 and result["failed"] == 0 and result["smg_valid"]
    assert result["model_id"] == marker and result["total_output_tokens"] == 24 * 20
    # The mock's pace (2 ms between tokens) shows through the gateway.
    assert 1.0 < result["mean_itl_ms"] < 50.0
    if hasattr(build_parser().parse_args([]), "plot"):  # the report's flag exists
        assert "report: " in text, text
    # Nothing it started is left: gateway, its workers, the mock workers.
    assert marked(marker) == []
    assert not list(tmp_path.glob("smg-bench-embedded-*.log"))  # its log is removed


def test_bad_gateway_args_exit_2_and_leave_nothing() -> None:
    marker = f"emb-{uuid.uuid4().hex[:10]}"
    command = bench_command(marker, "--num-prompts", "2", "--gateway-args=--no-such-flag")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "embedded gateway exited with status 2" in done.stderr
    assert "--no-such-flag" in done.stderr
    assert marked(marker) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_stops_gateway_and_workers(sig: int, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT): the bench stops them in order. SIGTERM kills the bench at once; the
    gateway gets SIGTERM from the kernel (parent-death signal) and stops its workers."""
    marker = f"emb-{uuid.uuid4().hex[:10]}"
    command = bench_command(
        marker,
        "--num-prompts",
        "40",
        "--random-output-len",
        "200",
        "--max-concurrency",
        "2",
        mock="--ttft-ms 5 --itl-ms 50",
    )
    log = tmp_path / "bench.log"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # a killed bench leaves its gateway log
    with open(log, "wb") as handle:
        # SIGINT at its default in the bench, as in a terminal: a runner that started these
        # tests in the background of a non-interactive shell has it ignored, inherited.
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=handle,
            stderr=handle,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        wait_until(lambda: "embedded: smg gateway" in log.read_text(), 60, "the gateway")
        # The launcher and its mock workers are up (the gateway's own workers may share the
        # launcher's command line).
        assert len(marked(marker, exclude=proc.pid)) >= 2
        time.sleep(0.5)  # requests in flight
        proc.send_signal(sig)
        proc.wait(40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    try:
        text = log.read_text()
        if sig == signal.SIGINT:
            # A line and exit 130, not a traceback.
            assert proc.returncode == 130, text
            assert "smg bench: interrupted" in text
            assert "Traceback" not in text
            assert "embedded: interrupted; stopping the gateway" in text
            assert marked(marker) == []
        else:
            assert proc.returncode == -signal.SIGTERM, text
            wait_until(lambda: marked(marker) == [], 30, "the gateway to stop after the bench died")
    finally:
        for left in marked(marker):  # only when an assertion above failed
            left.kill()
