"""`smg bench` end to end against mock workers (`smg mock-worker`) and the bench stub."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mockutil
import pytest

from smg.bench import arrivals
from smg.bench import main as bench_main
from smg.bench.calibrate import measure, start_stub


def run_bench(args: list[str], tmp_path: Path, name: str = "r.json") -> tuple[int, dict[str, Any]]:
    code = bench_main(
        [*args, "--save-result", "--result-dir", str(tmp_path), "--result-filename", name]
    )
    path = tmp_path / name
    return code, json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture
def stub() -> Iterator[str]:
    proc, port = start_stub()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SMALL = ["--random-input-len", "16", "--model", "mock-model"]


def test_median_ttft_and_itl_match_the_mock(tmp_path: Path) -> None:
    with mockutil.start_mock_workers(1, "--ttft-ms", "200", "--itl-ms", "20") as mocks:
        code, r = run_bench(
            [
                "--base-url",
                mocks.url,
                "--backend",
                "openai-chat",
                "--num-prompts",
                "8",
                "--max-concurrency",
                "4",
                "--random-output-len",
                "10",
                *SMALL,
                "--save-detailed",
                "--metric-percentiles",
                "50,99",
            ],
            tmp_path,
        )
    assert code == 0, r.get("smg_invalid_reasons")
    assert r["completed"] == 8 and r["failed"] == 0
    assert abs(r["median_ttft_ms"] - 200.0) <= 3.0
    assert abs(r["median_itl_ms"] - 20.0) <= 1.0
    assert abs(r["median_tpot_ms"] - 20.0) <= 1.0
    assert r["total_output_tokens"] == 80
    assert all(len(itl) == 9 for itl in r["itls"])  # 10 tokens: TTFT + 9 gaps
    assert r["smg_client"]["processes"] == 1 and r["smg_valid"] is True
    assert r["smg_run"]["command"].startswith("smg bench --base-url")
    assert (tmp_path / "r.csv").exists()


def test_injected_failures_are_counted_not_timed(tmp_path: Path) -> None:
    with mockutil.start_mock_workers(1, "--ttft-ms", "5", "--itl-ms", "1", "--seed", "3") as m:
        mockutil.set_config(m.url, error_rate=0.4)
        code, r = run_bench(
            [
                "--base-url",
                m.url,
                "--backend",
                "openai",
                "--num-prompts",
                "40",
                "--max-concurrency",
                "8",
                "--random-output-len",
                "4",
                *SMALL,
                "--save-detailed",
            ],
            tmp_path,
        )
        served = mockutil.stats(m.url)["responses_by_status"]
    assert code == 1  # 40 % errors is above the default --max-error-rate 1 %
    assert r["smg_valid"] is False
    assert 0 < r["failed"] < 40 and r["completed"] + r["failed"] == 40
    assert r["failed"] == served.get("500", 0)  # the mock's own count agrees
    assert r["smg_failures"]["by_status"] == {"500": r["failed"]}
    assert r["smg_failures"]["by_error"] == {"http_500": r["failed"]}
    failed = [i for i, e in enumerate(r["errors"]) if e]
    assert len(failed) == r["failed"]
    assert all(r["ttfts"][i] == 0.0 and r["output_lens"][i] == 0 for i in failed)
    assert r["total_output_tokens"] == 4 * r["completed"]


def test_hangs_end_as_timeouts(tmp_path: Path) -> None:
    with mockutil.start_mock_workers(1, "--ttft-ms", "1", "--seed", "5") as m:
        mockutil.set_config(m.url, hang_rate=0.3)
        code, r = run_bench(
            [
                "--base-url",
                m.url,
                "--backend",
                "openai-chat",
                "--num-prompts",
                "20",
                "--max-concurrency",
                "20",
                "--random-output-len",
                "3",
                *SMALL,
                "--request-timeout",
                "0.5",
                "--max-error-rate",
                "0.9",
            ],
            tmp_path,
        )
    assert code == 0
    assert r["failed"] > 0
    assert r["smg_failures"]["by_error"] == {"timeout": r["failed"]}
    assert r["max_concurrent_requests"] <= r["completed"]
    assert r["p99_e2el_ms"] < 500.0  # timed-out requests are not in the latency stats


@pytest.mark.parametrize(
    ("engine", "backend", "extra"),
    [
        ("vllm", "openai", []),
        ("sglang", "sglang", []),
        ("vllm", "openai-chat", ["--disable-stream"]),
        ("vllm", "embeddings", []),
    ],
)
def test_backends_against_the_mock(
    engine: str, backend: str, extra: list[str], tmp_path: Path
) -> None:
    with mockutil.start_mock_workers(1, "--ttft-ms", "2", "--itl-ms", "1", engine=engine) as m:
        code, r = run_bench(
            [
                "--base-url",
                m.url,
                "--backend",
                backend,
                "--num-prompts",
                "6",
                "--random-output-len",
                "5",
                "--ignore-eos",
                *SMALL,
                *extra,
            ],
            tmp_path,
        )
    assert code == 0, r.get("smg_failures")
    assert r["completed"] == 6
    if backend == "embeddings":
        assert r["total_input_tokens"] == 6 * 16 and "mean_e2el_ms" in r
    else:
        assert r["total_output_tokens"] == 30
        assert r["smg_short_outputs"] == {"requests": 0, "missing_tokens": 0}


def test_model_from_server_and_usage_errors(tmp_path: Path) -> None:
    with mockutil.start_mock_workers(1, "--model", "served-x") as m:
        code, r = run_bench(
            [
                "--base-url",
                m.url,
                "--num-prompts",
                "2",
                "--random-input-len",
                "8",
                "--random-output-len",
                "2",
                "--ready-check-timeout-sec",
                "5",
            ],
            tmp_path,
        )
    assert code == 0 and r["model_id"] == "served-x"
    assert bench_main(["--dataset-name", "sharegpt", "--model", "m"]) == 2
    assert bench_main(["--goodput", "ttft=5", "--model", "m", "--port", "1"]) == 2
    assert bench_main(["--request-rate", "5", "--ramp-up-strategy", "linear"]) == 2


def test_results_reload_and_compare(tmp_path: Path, stub: str) -> None:
    common = ["--base-url", stub, "--backend", "openai-chat", "--random-output-len", "4", *SMALL]
    code_a, a = run_bench([*common, "--num-prompts", "50"], tmp_path, "a.json")
    code_b, b = run_bench([*common, "--num-prompts", "100", "--label", "b"], tmp_path, "b.json")
    assert code_a == 0 and code_b == 0 and a["completed"] == 50 and b["completed"] == 100
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smg",
            "bench",
            "compare",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("completed "))
    assert line.split()[1:] == ["50", "100", "2.000"]


def test_poisson_rate_is_kept(tmp_path: Path, stub: str) -> None:
    code, r = run_bench(
        [
            "--base-url",
            stub,
            "--num-prompts",
            "100",
            "--request-rate",
            "200",
            "--seed",
            "1",
            "--random-output-len",
            "2",
            *SMALL,
            "--save-detailed",
        ],
        tmp_path,
    )
    assert code == 0 and r["completed"] == 100
    # The Poisson schedule is rescaled to end at N / rate = 0.5 s after the start, whose
    # origin is the first arrival; requests leave on time (loose bound: shared CI).
    sched = r["smg_scheduled_times"]
    assert sched[0] == 0.0 and sched == sorted(sched)
    first_gap = arrivals.schedule(100, 200.0, 1.0, seed=1)[0][0]
    assert sched[-1] == pytest.approx(0.5 - first_gap)
    assert max(r["start_times"]) - sched[-1] < 0.05
    assert r["smg_client"]["send_lag_ms"]["median"] < 5.0


def test_multiprocess_client(tmp_path: Path, stub: str) -> None:
    code, r = run_bench(
        [
            "--base-url",
            stub,
            "--num-prompts",
            "300",
            "--client-processes",
            "2",
            "--max-concurrency",
            "16",
            "--random-output-len",
            "8",
            *SMALL,
        ],
        tmp_path,
    )
    assert code == 0 and r["completed"] == 300
    client = r["smg_client"]
    assert client["processes"] == 2 and len({p["pid"] for p in client["per_process"]}) == 2
    assert client["peak_in_flight"] <= 16
    assert r["total_output_tokens"] == 300 * 8


def test_client_throughput_floor(stub: str) -> None:
    # Calibrated at ~30,000 req/s here; the floor is loose because CI shares 2 cores.
    port = int(stub.rsplit(":", 1)[1])
    plain = measure(port, "/v1/completions", 3000, 32, 1, False)
    assert plain["succeeded"] == 3000
    assert plain["requests_per_s"] > 2000
    streamed = measure(port, "/v1/chat/completions", 100, 32, 200, True)
    assert streamed["succeeded"] == 100
    assert streamed["chunks_per_s"] > 20000


def test_overhead_mode_pairs_requests(tmp_path: Path) -> None:
    # The gateway is stood in for by a second mock process: the mode's bookkeeping
    # (pairing, CPU and PSS of the process behind the gateway port, worker spread) is
    # what is tested here; tests with `smg launch` belong with the gateway.
    with (
        mockutil.start_mock_workers(1, "--ttft-ms", "1") as direct,
        mockutil.start_mock_workers(1, "--ttft-ms", "1") as gw,
    ):
        code, r = run_bench(
            [
                "--overhead",
                "--direct-url",
                direct.url,
                "--gateway-url",
                gw.url,
                "--worker-url",
                direct.url,
                "--worker-url",
                gw.url,
                "--backend",
                "openai-chat",
                "--num-prompts",
                "30",
                "--random-output-len",
                "3",
                *SMALL,
            ],
            tmp_path,
        )
    assert code == 0
    o = r["smg_overhead"]
    assert o["pairs"] == 30
    assert set(o["added_e2el_ms"]) >= {"mean", "median", "p99"}
    assert abs(o["added_e2el_ms"]["median"]) < 20.0
    assert o["gateway_pids"] == [gw.proc.pid]
    assert o["gateway_cpu_seconds_per_1k_requests"] is not None
    assert o["gateway_pss_bytes"] and o["gateway_pss_bytes"] > 1_000_000
    assert o["worker_requests"] == {direct.url: 30, gw.url: 30}
    assert o["worker_spread"]["jain_index"] == pytest.approx(1.0)
    assert r["direct"]["completed"] == 30 and r["gateway"]["completed"] == 30


def test_timed_trace_is_replayed_at_its_timestamps(tmp_path: Path, stub: str) -> None:
    rows = [
        {"timestamp": t, "input_length": 12, "output_length": 2, "hash_ids": [1, i]}
        for i, t in enumerate([5000, 5100, 5100, 5400])
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, r = run_bench(
        [
            "--base-url",
            stub,
            "--dataset-name",
            "timed_trace",
            "--dataset-path",
            str(trace),
            "--timed-trace-sec-multiplier",
            "0.001",
            "--timed-trace-chunk-hash-size",
            "8",
            "--model",
            "m",
            "--save-detailed",
        ],
        tmp_path,
    )
    assert code == 0 and r["completed"] == 4
    assert r["smg_scheduled_times"] == pytest.approx([0.0, 0.1, 0.1, 0.4])
    late = [a - s for a, s in zip(r["start_times"], r["smg_scheduled_times"])]
    assert all(-0.002 <= x < 0.05 for x in late)  # ms-grained timers


def test_ramp_up_and_shared_prefix_dataset(tmp_path: Path, stub: str) -> None:
    code, r = run_bench(
        [
            "--base-url",
            stub,
            "--dataset-name",
            "generated-shared-prefix",
            "--gsp-num-groups",
            "4",
            "--gsp-prompts-per-group",
            "10",
            "--gsp-system-prompt-len",
            "32",
            "--gsp-question-len",
            "8",
            "--gsp-output-len",
            "3",
            "--ramp-up-strategy",
            "linear",
            "--ramp-up-start-rps",
            "50",
            "--ramp-up-end-rps",
            "200",
            "--burstiness",
            "inf",
            "--model",
            "m",
            "--save-detailed",
        ],
        tmp_path,
    )
    assert code == 0 and r["completed"] == 40 and r["num_prompts"] == 40
    assert r["ramp_up_strategy"] == "linear"
    sched = r["smg_scheduled_times"]
    # With burstiness inf the gap before request i is 1 / rate_i, rate_i rising linearly
    # from 50 to 200 req/s over the 40 requests.
    gaps = [b - a for a, b in itertools.pairwise(sched)]
    assert gaps == pytest.approx([1 / (50 + 150 * i / 39) for i in range(1, 40)])
    late = [a - s for a, s in zip(r["start_times"], sched)]
    assert all(-0.002 <= x < 0.05 for x in late)  # ms-grained timers
