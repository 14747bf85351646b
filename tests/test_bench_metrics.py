"""Result computation, result files and `smg bench compare` (pure / files only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from smg.bench import metrics, results
from smg.bench.compare import compare_rows, format_table
from smg.bench.compare import main as compare_main
from smg.bench.runner import Outcome, ProcStats


def outcome(
    index: int,
    t_send: float,
    ttft: float | None,
    itl: list[float],
    done: float,
    usage_out: int | None = None,
    error: str | None = None,
    status: int = 200,
    text: str = "",
) -> Outcome:
    return Outcome(
        index=index,
        target=0,
        success=error is None,
        error=error,
        status=status,
        t_sched=t_send,
        t_eligible=t_send,
        t_send=t_send,
        t_first=None if ttft is None else t_send + ttft,
        t_done=done,
        itl=itl,
        first_tokens=1,
        tokens_seen=len(itl) + (ttft is not None),
        usage_in=None,
        usage_out=usage_out,
        text=text,
    )


def sample_outcomes() -> list[Outcome]:
    return [
        # 3 tokens: ttft 0.1, itl 0.05 + 0.05, e2e 0.2 -> tpot (0.2-0.1)/2 = 0.05
        outcome(0, 10.0, 0.1, [0.05, 0.05], 10.2, usage_out=3),
        # 5 tokens: ttft 0.3, e2e 0.7 -> tpot 0.1
        outcome(1, 10.1, 0.3, [0.1, 0.1, 0.1, 0.1], 10.8, usage_out=5),
        # failed: never timed
        outcome(2, 10.2, None, [], 10.25, error="http_500", status=500),
        # output count from the tokenizer (no usage): 2 tokens, ttft 0.2, e2e 0.4 -> tpot 0.2
        outcome(3, 10.3, 0.2, [0.2], 10.7, usage_out=None, text="a b"),
    ]


def config(**kw: object) -> metrics.MetricConfig:
    base: dict = {"percentiles": [50.0, 99.0], "max_error_rate": 0.5}
    base.update(kw)
    return metrics.MetricConfig(**base)


def compute(cfg: metrics.MetricConfig, outs: list[Outcome] | None = None) -> dict:
    outs = outs or sample_outcomes()
    return metrics.compute(outs, [10, 20, 30, 40], [3, 5, 5, 4], [None, None, None, 2], 2.0, cfg)


def test_vllm_keys_and_values() -> None:
    r = compute(config(goodput_ms={"ttft": 250}))
    assert r["completed"] == 3 and r["failed"] == 1
    assert r["total_input_tokens"] == 10 + 20 + 40  # the failed request's prompt excluded
    assert r["total_output_tokens"] == 3 + 5 + 2
    assert r["request_throughput"] == pytest.approx(1.5)
    assert r["output_throughput"] == pytest.approx(5.0)
    assert r["total_token_throughput"] == pytest.approx(40.0)
    assert r["request_goodput"] == pytest.approx(1.0)  # ttfts 0.1 and 0.2 meet 250 ms
    assert r["mean_ttft_ms"] == pytest.approx(200.0)
    assert r["median_ttft_ms"] == pytest.approx(200.0)
    assert r["p99_ttft_ms"] == pytest.approx(298.0)
    assert r["mean_tpot_ms"] == pytest.approx((50 + 100 + 200) / 3)
    assert r["mean_itl_ms"] == pytest.approx(1000 * (0.05 * 2 + 0.1 * 4 + 0.2) / 7)
    assert r["median_itl_ms"] == pytest.approx(100.0)
    assert r["mean_e2el_ms"] == pytest.approx((200 + 700 + 400) / 3)
    assert r["std_e2el_ms"] == pytest.approx(205.4805, rel=1e-4)  # sqrt(126666.67 / 3)
    assert r["max_concurrent_requests"] == 2  # [10.1, 10.8) overlaps the others
    assert r["smg_failures"] == {"by_error": {"http_500": 1}, "by_status": {"500": 1}}
    assert r["smg_error_rate"] == 0.25 and r["smg_valid"] is True


def test_failures_make_run_invalid_above_threshold() -> None:
    r = compute(config(max_error_rate=0.1))
    assert r["smg_valid"] is False
    assert "above --max-error-rate" in r["smg_invalid_reasons"][0]
    all_failed = [outcome(i, 0.0, None, [], 1.0, error="timeout", status=0) for i in range(4)]
    r2 = compute(config(), all_failed)
    assert r2["completed"] == 0 and r2["smg_valid"] is False
    assert r2["smg_failures"]["by_status"] == {"none": 4}
    assert r2["mean_ttft_ms"] == 0.0


def test_short_outputs_reported_with_ignore_eos() -> None:
    r = compute(config(ignore_eos=True))
    # request 3 asked for 4 tokens, got 2; others got what they asked
    assert r["smg_short_outputs"] == {"requests": 1, "missing_tokens": 2}


def test_detailed_lists() -> None:
    r = compute(config(detailed=True))
    assert r["output_lens"] == [3, 5, 0, 2]
    assert r["ttfts"][1] == pytest.approx(0.3) and r["ttfts"][2] == 0.0
    assert r["errors"][2].startswith("http_500") and r["errors"][0] == ""
    assert len(r["itls"]) == 4 and r["itls"][2] == []


def test_embeddings_metrics() -> None:
    outs = [outcome(0, 0.0, 0.1, [], 0.1), outcome(1, 0.0, 0.3, [], 0.3)]
    r = metrics.compute(outs, [5, 7], [0, 0], [None, None], 1.0, config(embeddings=True))
    assert r["total_input_tokens"] == 12 and r["mean_e2el_ms"] == pytest.approx(200.0)
    assert "mean_ttft_ms" not in r and "total_output_tokens" not in r


def test_client_report_warns_on_lag_and_cpu() -> None:
    outs = sample_outcomes()
    outs[1].t_send += 0.02  # 20 ms late
    report, warns = metrics.client_report(outs, [ProcStats(cpu_s=0.95, wall_s=1.0)], 1024)
    assert report["cpu_percent_max"] == pytest.approx(95.0)
    assert report["send_lag_ms"]["max"] == pytest.approx(20.0)
    assert any("CPU" in w for w in warns) and any("send lag" in w for w in warns)
    calm, none = metrics.client_report(sample_outcomes(), [ProcStats(0.1, 1.0)], 1024)
    assert none == [] and calm["send_lag_ms"]["p99"] == 0.0


def test_save_reload_csv_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = compute(config())
    a.update({"date": "20250101-000000", "smg_client": {"cpu_percent_max": 10.0}})
    b = dict(a, request_throughput=a["request_throughput"] * 2, mean_ttft_ms=100.0)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    results.save(a, str(pa))
    csv_path = results.save(b, str(pb))
    assert results.load(str(pa))["completed"] == 3
    with open(csv_path, newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["request_throughput"]) == pytest.approx(3.0)
    assert row["smg_client.cpu_percent_max"] == "10.0"
    rows = {
        k: (va, vb, r)
        for k, va, vb, r in compare_rows(results.load(str(pa)), results.load(str(pb)))
    }
    assert rows["request_throughput"][2] == pytest.approx(2.0)
    assert rows["mean_ttft_ms"][2] == pytest.approx(0.5)
    table = format_table(compare_rows(a, b), "A", "B")
    assert table.index("completed") < table.index("mean_ttft_ms") < table.index("mean_e2el_ms")
    assert compare_main([str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "request_throughput" in out and "2.000" in out
    assert compare_main([str(pa), str(tmp_path / "missing.json")]) == 2


def test_append_result_and_inf_are_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    results.save({"completed": 1, "request_rate": float("inf")}, str(path))
    results.save({"completed": 2}, str(path), append=True)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["request_rate"] == "inf"
    assert results.load(str(path))["completed"] == 2


def test_result_filename_like_vllm() -> None:
    name = results.result_filename("openai", 10.0, 8, "org/model-x", "20250101-000000")
    assert name == "openai-10.0qps-concurrency8-model-x-20250101-000000.json"


def test_redact_argv() -> None:
    argv = ["--header", "Authorization=Bearer sk-1", "x-trace=1"]
    assert results.redact_argv(argv) == ["--header", "Authorization=<redacted>", "x-trace=1"]
