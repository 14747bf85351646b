"""Sweeps and the SLO search: the pure parts (SLO names, the search's exact walk, the
table) and end to end through `smg bench` against mock workers and a gateway."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import gatewayutil
import mockutil
import pytest

from smg.bench import main as bench_main
from smg.bench.args import build_parser
from smg.bench.sweep import (
    LimitSearch,
    SloError,
    answer_text,
    docs_valid,
    meets_slo,
    parse_slo,
    plan_of,
    result_key,
    table_text,
    tail_percentile,
    walk,
)

# ---------------------------------------------------------------- SLO names and checks


def test_slo_names_in_either_order_become_the_result_keys() -> None:
    slo = parse_slo(
        [
            "ttft_p99:500",
            "p99_e2el_ms:5000",
            "itl_median:20",
            "mean_tpot:12.5",
            "e2el_p99.9:9000",
            "ttft_p90.0:300",
        ]
    )
    assert slo == {
        "ttft_p99": 500.0,
        "e2el_p99": 5000.0,
        "itl_median": 20.0,
        "tpot_mean": 12.5,
        "e2el_p99.9": 9000.0,
        "ttft_p90": 300.0,
    }
    assert [result_key(k) for k in slo] == [
        "p99_ttft_ms",
        "p99_e2el_ms",
        "median_itl_ms",
        "mean_tpot_ms",
        "p99.9_e2el_ms",
        "p90_ttft_ms",
    ]


@pytest.mark.parametrize(
    "item",
    ["ttft:500", "foo_p99:1", "ttft_p101:1", "ttft_p99:-1", "ttft_p99", "ttft_p99:x", "ttft_max:1"],
)
def test_bad_slo_items_are_refused(item: str) -> None:
    with pytest.raises(SloError):
        parse_slo([item])


def test_meets_slo_needs_a_valid_run_and_every_bound() -> None:
    slo = {"ttft_p99": 500.0, "e2el_median": 1000.0}
    good = {"smg_valid": True, "p99_ttft_ms": 500.0, "median_e2el_ms": 999.0}
    assert meets_slo(good, slo)  # a bound is inclusive
    assert not meets_slo({**good, "p99_ttft_ms": 500.1}, slo)
    assert not meets_slo({**good, "smg_valid": False}, slo)
    assert not meets_slo({**good, "median_e2el_ms": math.nan}, slo)
    assert not meets_slo({"smg_valid": True, "p99_ttft_ms": 1.0}, slo)  # a bound unread


def test_slo_percentiles_and_metrics_are_added_to_the_run() -> None:
    args = build_parser().parse_args(
        [
            "--max-concurrency",
            "1,2",
            "--metric-percentiles",
            "50",
            "--percentile-metrics",
            "ttft",
            "--slo",
            "e2el_p99.9:100",
            "--slo",
            "ttft_median:5",
        ]
    )
    sp = plan_of(args)
    assert sp is not None and sp.variable == "max_concurrency" and sp.values == [1.0, 2.0]
    assert args.metric_percentiles == "50,99.9"
    assert args.percentile_metrics == "ttft,e2el"


# ---------------------------------------------------------------- the search, exactly


def test_rate_search_doubles_then_bisects_to_the_precision() -> None:
    s = LimitSearch(start=1.0, cap=1024.0, precision=0.1)
    seen = walk(s, lambda rate: rate <= 5.3)
    assert seen == [
        (1.0, True),
        (2.0, True),
        (4.0, True),
        (8.0, False),
        (6.0, False),
        (5.0, True),
        (5.5, False),
    ]
    assert (s.low, s.high) == (5.0, 5.5)  # (5.5 - 5) / 5 = 0.1: within the precision


def test_concurrency_search_stops_at_one() -> None:
    s = LimitSearch(start=1.0, cap=1024.0, precision=0.1, integer=True)
    assert walk(s, lambda c: c <= 4) == [
        (1.0, True),
        (2.0, True),
        (4.0, True),
        (8.0, False),
        (6, False),
        (5, False),
    ]
    assert s.low == 4
    s = LimitSearch(start=1.0, cap=1024.0, precision=0.1, integer=True)
    values = [v for v, _ in walk(s, lambda c: c <= 37)]
    assert values == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert (s.low, s.high) == (37, 38)


def test_search_ends_at_the_cap_or_when_the_start_fails() -> None:
    s = LimitSearch(start=1.0, cap=100.0, precision=0.1)
    assert [v for v, _ in walk(s, lambda r: True)] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert (s.low, s.high) == (100.0, None)
    s = LimitSearch(start=2.0, cap=100.0, precision=0.1)
    assert walk(s, lambda r: False) == [(2.0, False)]
    assert s.low is None


def fake_server(rate: float) -> dict[str, Any]:
    """Latency grows with load as in a queue (100 ms unloaded, 10 req/s capacity); from
    9 req/s on, a tenth of the requests fail (an invalid run)."""
    e2el = 100.0 / (1 - rate / 10) if rate < 10 else math.inf
    return {"smg_valid": rate < 9, "p99_e2el_ms": e2el, "p99_ttft_ms": e2el / 2}


def test_search_against_a_fake_queue_finds_its_limit() -> None:
    slo = parse_slo(["e2el_p99:400"])  # 100 / (1 - r / 10) <= 400  <=>  r <= 7.5
    s = LimitSearch(start=1.0, cap=64.0, precision=0.05)
    seen = walk(s, lambda r: meets_slo(fake_server(r), slo))
    assert seen == [
        (1.0, True),
        (2.0, True),
        (4.0, True),
        (8.0, False),
        (6.0, True),
        (7.0, True),
        (7.5, True),
        (7.75, False),
    ]
    assert s.low == 7.5
    # A failed (invalid) run does not meet, however low its latency.
    loose = parse_slo(["e2el_p99:1e9"])
    s = LimitSearch(start=1.0, cap=64.0, precision=0.1)
    walk(s, lambda r: meets_slo(fake_server(r), loose))
    assert (s.low, s.high) == (8.5, 9.0)


# ---------------------------------------------------------------- the table


def _point(value: float, met: bool | None, **over: Any) -> dict[str, Any]:
    r = {
        "request_throughput": 1.5,
        "output_throughput": 96.25,
        "median_ttft_ms": 10.0,
        "p99_ttft_ms": 12.04,
        "median_itl_ms": 5.0,
        "p99_itl_ms": 6.0,
        "median_e2el_ms": 100.0,
        "p99_e2el_ms": 120.0,
        "request_goodput": None,
        "failed": 0,
        "smg_valid": True,
        **over,
    }
    return {"value": value, "result": r, "meets_slo": met}


def test_table_text_is_exact() -> None:
    doc = {
        "smg_sweep": {
            "variable": "request_rate",
            "slo": {"e2el_p99": 150.0},
            "search": None,
            "points": [
                _point(1.0, True, request_goodput=1.25),
                _point(math.inf, False, failed=3, smg_valid=False, p99_e2el_ms=math.nan),
            ],
        }
    }
    lines = table_text(doc).splitlines()
    assert lines[1] == "-" * len(lines[0])
    assert lines[:1] + lines[2:] == [
        "request_rate  req/s  out tok/s  TTFT p50  TTFT p99  ITL p50  ITL p99  E2E p50  E2E p99"
        "  goodput  errors  valid  SLO met",
        "1              1.50       96.2      10.0      12.0      5.0      6.0    100.0    120.0"
        "     1.25       0    yes      yes",
        "inf            1.50       96.2      10.0      12.0      5.0      6.0    100.0        -"
        "        -       3     NO       no",
    ]
    assert answer_text(doc) == "sweep: highest request_rate meeting e2el_p99 <= 150 ms: 1"
    assert tail_percentile([50.0, 90.0]) == "90" and tail_percentile([99.0, 99.9]) == "99"
    assert docs_valid([doc]) is False  # a plain sweep: every run must be valid
    doc["smg_sweep"]["search"] = {"result": 1.0, "high": 2.0, "start": 1.0}
    assert docs_valid([doc]) is True  # a search: its answer exists


# ---------------------------------------------------------------- end to end

SMALL = ["--model", "mock-model", "--random-input-len", "16"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    base = [*SMALL, "--port", "1"]  # nothing is contacted: each is refused first
    cases = [
        (["--request-rate", "1,2", "--max-concurrency", "1,2"], "not both"),
        (["--search", "request-rate"], "--search needs at least one --slo"),
        (["--search", "request-rate", "--slo", "ttft_p99:5", "--request-rate", "1,2"], "no comma"),
        (["--request-rate", "1,0"], "--request-rate values must be > 0"),
        (["--max-concurrency", "4,-1"], "--max-concurrency values must be > 0"),
        (["--slo", "ttft:500", "--max-concurrency", "1,2"], "invalid --slo metric"),
        (
            [
                "--search",
                "max-concurrency",
                "--slo",
                "e2el_p99:9",
                "--search-min",
                "8",
                "--search-max",
                "4",
            ],
            "--search-max must be",
        ),
        (["--request-rate", "1,2", "--ramp-up-strategy", "linear"], "--ramp-up-strategy"),
        (["--max-concurrency", "1,2", "--num-prompts", "0"], "--num-prompts must be > 0"),
    ]
    for flags, message in cases:
        assert bench_main([*base, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit) as exc:
        bench_main([*base, "--request-rate", "1,x"])
    assert exc.value.code == 2
    assert "comma list" in capsys.readouterr().err


def test_rate_sweep_against_the_mock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mockutil.start_mock_workers(1, "--ttft-ms", "20", "--itl-ms", "5") as mocks:
        code = bench_main(
            [
                "--base-url",
                mocks.url,
                *SMALL,
                "--random-output-len",
                "4",
                "--num-prompts",
                "10",
                "--request-rate",
                "20,40",
                "--goodput",
                "e2el:2000",
                "--slo",
                "e2el_p99:2000",
                "--save-result",
                "--result-dir",
                str(tmp_path),
                "--label",
                "sw",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    sweeps = list(tmp_path.glob("sw-sweep-request_rate-mock-model-*.json"))
    assert len(sweeps) == 1
    # Each point also keeps its own vllm-named result file.
    assert len(list(tmp_path.glob("sw-20.0qps-mock-model-*.json"))) == 1
    assert len(list(tmp_path.glob("sw-40.0qps-mock-model-*.json"))) == 1
    doc = json.loads(sweeps[0].read_text())["smg_sweep"]
    assert doc["variable"] == "request_rate" and doc["search"] is None
    assert doc["slo"] == {"e2el_p99": 2000.0} and doc["goodput"] == {"e2el": 2000.0}
    points = doc["points"]
    assert [p["value"] for p in points] == [20.0, 40.0]
    assert [p["result"]["request_rate"] for p in points] == [20.0, 40.0]
    assert [p["result"]["completed"] for p in points] == [10, 10]
    assert [p["meets_slo"] for p in points] == [True, True]
    assert all(p["result"]["request_goodput"] > 0 for p in points)
    # Same seed: the same prompts at every point.
    assert points[0]["result"]["total_input_tokens"] == points[1]["result"]["total_input_tokens"]
    # Twice the rate, a schedule half as long (10 requests due by 0.5 s, then 0.25 s).
    assert points[0]["result"]["duration"] > points[1]["result"]["duration"]
    csv_rows = sweeps[0].with_suffix(".csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("value,meets_slo,")
    assert "request_rate  req/s  out tok/s  TTFT p50  TTFT p99" in out
    assert "sweep: highest request_rate meeting e2el_p99 <= 2000 ms: 40" in out


def test_concurrency_search_finds_the_gateway_limit(tmp_path: Path) -> None:
    """A gateway admitting 4 requests at once (the rest queue) in front of a mock taking
    300 ms per request: up to 4 clients a request takes ~300 ms, from 5 on some wait a
    whole request more (~600 ms), so with e2el_p99 <= 450 ms the limit is exactly 4."""
    mock_flags = ("--ttft-ms", "150", "--itl-ms", "30", "--output-len", "6")
    with mockutil.start_mock_workers(1, *mock_flags) as mocks:
        admission = ["--max-concurrent-requests", "4", "--queue-size", "256"]
        flags = ["--worker-urls", mocks.url, *admission, "--queue-timeout-secs", "30"]
        with gatewayutil.running_gateway(flags, processes=1) as gw:
            gw.wait_ready()
            command = [
                sys.executable,
                "-m",
                "smg",
                "bench",
                "--base-url",
                gw.url,
                *SMALL,
                "--random-output-len",
                "6",
                "--num-prompts",
                "8",
                "--search",
                "max-concurrency",
                "--slo",
                "e2el_p99:450",
                "--save-result",
                "--result-dir",
                str(tmp_path),
                "--result-filename",
                "search.json",
            ]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "search.json").read_text())["smg_sweep"]
    walked = [(p["value"], p["meets_slo"]) for p in doc["points"]]
    assert walked == [(1, True), (2, True), (4, True), (8, False), (6, False), (5, False)]
    assert doc["search"]["result"] == 4 and doc["search"]["high"] == 5
    e2el = {p["value"]: p["result"]["p99_e2el_ms"] for p in doc["points"]}
    print(f"p99 E2EL by concurrency: {e2el}")
    assert all(e2el[c] < 450 for c in (1, 2, 4)), e2el
    assert all(e2el[c] > 500 for c in (5, 6, 8)), e2el  # they queued at the gateway
    # --result-filename names the sweep; no per-point files beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.csv", "search.json"]
    assert "search: highest max_concurrency meeting e2el_p99 <= 450 ms: 4" in proc.stdout


def test_rate_search_ends_at_the_cap_or_at_a_failing_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rate search through `smg bench` against the mock: every point meets up to the
    cap (exit 0, the cap is the answer), or the first point fails (exit 1, no answer);
    a single run with --slo says whether it met; --overhead refuses a search."""
    with mockutil.start_mock_workers(1, "--ttft-ms", "20", "--itl-ms", "5") as mocks:
        common = [
            "--base-url",
            mocks.url,
            *SMALL,
            "--random-output-len",
            "4",
            "--num-prompts",
            "8",
            "--search",
            "request-rate",
            "--search-min",
            "20",
            "--search-max",
            "40",
            "--save-result",
            "--result-dir",
            str(tmp_path),
        ]
        code = bench_main([*common, "--slo", "ttft_p99:5000", "--result-filename", "cap.json"])
        out = capsys.readouterr().out
        assert code == 0, out
        doc = json.loads((tmp_path / "cap.json").read_text())["smg_sweep"]
        assert [(p["value"], p["meets_slo"]) for p in doc["points"]] == [(20, True), (40, True)]
        assert doc["search"] == {
            "precision": 0.1,
            "start": 20.0,
            "max": 40.0,
            "low": 40.0,
            "high": None,
            "result": 40.0,
        }
        assert "ttft_p99 <= 5000 ms: 40 (the --search-max cap" in out
        # TTFT is ~20 ms: a 1 ms bound fails at once.
        code = bench_main([*common, "--slo", "p99_ttft_ms:1", "--result-filename", "none.json"])
        out = capsys.readouterr().out
        assert code == 1, out
        doc = json.loads((tmp_path / "none.json").read_text())["smg_sweep"]
        assert [(p["value"], p["meets_slo"]) for p in doc["points"]] == [(20, False)]
        assert doc["search"]["result"] is None and doc["search"]["high"] == 20.0
        assert "search: no request_rate tried meets ttft_p99 <= 1 ms (not even 20)" in out
        single = ["--base-url", mocks.url, *SMALL, "--random-output-len", "4", "--num-prompts"]
        assert bench_main([*single, "4", "--slo", "ttft_median:5000"]) == 0
        assert "SLO ttft_median <= 5000 ms: met" in capsys.readouterr().out
    overhead = ["--overhead", "--direct-url", mocks.url, "--gateway-url", mocks.url]
    assert bench_main([*overhead, *SMALL, "--search", "request-rate", "--slo", "ttft_p99:1"]) == 2
    assert "--overhead does not run" in capsys.readouterr().err
