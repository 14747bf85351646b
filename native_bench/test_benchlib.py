"""Tests of the runner's pure parts: summary parsing, schedules, core layouts, statistics."""

from __future__ import annotations

import pytest
from benchlib import (
    Measurement,
    ParseError,
    core_layout,
    cpu_delta,
    fixed_rate_for,
    format_cpu_list,
    markdown_report,
    paired_ratios,
    parse_cpu_list,
    parse_loadgen_summary,
    parse_wrk_summary,
    rotation,
    void_reasons,
)

WRK_OUT = """Running 5s test @ http://127.0.0.1:1234/v1/chat/completions
  1 threads and 64 connections
Requests/sec:  20000.00
WRK_SUMMARY {"requests":100000,"duration_us":5000000,"bytes":1,"non2xx":0,"checked":100000,\
"status_ge_400":0,"connect_errors":0,"read_errors":0,"write_errors":0,"timeouts":0,\
"latency_us":{"mean":1.0,"max":9,"p50":1,"p90":2,"p99":3,"p99_9":4}}
"""


def test_parse_wrk_summary_derives_rate_from_wrk_duration() -> None:
    s = parse_wrk_summary(WRK_OUT)
    assert s["requests"] == 100000
    assert s["duration_s"] == pytest.approx(5.0)
    assert s["rps"] == pytest.approx(20000.0)
    assert s["latency_us"]["p99_9"] == 4


def test_parse_wrk_summary_without_line_is_an_error() -> None:
    with pytest.raises(ParseError):
        parse_wrk_summary("Requests/sec: 1\n")
    with pytest.raises(ParseError):
        parse_wrk_summary("WRK_SUMMARY {not json\n")


def test_parse_loadgen_closed_loop_rate() -> None:
    text = (
        'LOADGEN_SUMMARY {"mode":"closed","duration_s":2.0,"recorded":500,"completed":510,'
        '"achieved_rate":250.0,"latency_us":{"p50":10.0}}'
    )
    s = parse_loadgen_summary(text)
    assert s["rps"] == pytest.approx(250.0)
    assert s["requests"] == 500


def test_void_reasons_clean_run() -> None:
    assert void_reasons({"requests": 10, "non2xx": 0, "read_errors": 0}, stub_delta=10) == []


@pytest.mark.parametrize(
    ("result", "stub_delta", "needle"),
    [
        ({"requests": 10, "non2xx": 1}, None, "non-2xx"),
        ({"requests": 10, "status_ge_400": 2}, None, "2 non-2xx"),
        ({"requests": 10, "read_errors": 3}, None, "read errors"),
        ({"requests": 10, "timeouts": 1}, None, "timeouts"),
        ({"requests": 10, "connect_errors": 1}, None, "connect errors"),
        ({"requests": 10, "unsent": 4}, None, "unsent"),
        ({"requests": 0}, None, "only 0 requests"),
        ({"requests": 10}, 9, "stub saw 9 of 10"),
    ],
)
def test_void_reasons_flag_every_failure(
    result: dict[str, int], stub_delta: int | None, needle: str
) -> None:
    reasons = void_reasons(result, stub_delta)
    assert any(needle in r for r in reasons), reasons


def test_rotation_puts_each_system_first_in_turn() -> None:
    gws = ["direct", "smg", "rust"]
    assert rotation(gws, 0) == ["direct", "smg", "rust"]
    assert rotation(gws, 1) == ["smg", "rust", "direct"]
    assert rotation(gws, 2) == ["rust", "direct", "smg"]
    assert rotation(gws, 3) == gws
    assert rotation([], 4) == []


def test_cpu_list_round_trip() -> None:
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    for bad in ("", "3-1", "-1", "a"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_layout_shares_cores_on_a_small_machine() -> None:
    lay = core_layout([0, 1])
    assert lay.mode == "shared"
    assert lay.gateway == lay.load == (0, 1)
    assert (lay.stub_threads, lay.client_threads) == (1, 1)


def test_layout_splits_a_large_machine() -> None:
    lay = core_layout(list(range(16)))
    assert lay.mode == "split"
    assert lay.gateway == tuple(range(8))
    assert lay.load == tuple(range(8, 16))
    assert lay.stub_threads + lay.client_threads == 8


def test_layout_explicit_cores() -> None:
    lay = core_layout(list(range(16)), gateway_cores=[0, 1, 2, 3], load_cores=[8, 9])
    assert lay.mode == "split"
    assert lay.gateway == (0, 1, 2, 3)
    assert lay.load == (8, 9)
    with pytest.raises(ValueError, match="not available"):
        core_layout([0, 1], gateway_cores=[0], load_cores=[5])
    with pytest.raises(ValueError, match="go together"):
        core_layout([0, 1], gateway_cores=[0])


def test_cpu_delta_counts_new_processes_in_full() -> None:
    before = {1: 10.0, 2: 5.0}
    after = {1: 12.5, 2: 5.5, 3: 1.0}
    assert cpu_delta(before, after) == pytest.approx(4.0)


def test_paired_ratios_use_rounds_clean_for_both() -> None:
    smg = {0: 50.0, 1: 60.0, 2: None, 3: 80.0}
    rust = {0: 100.0, 1: 100.0, 2: 100.0, 3: None}
    rs = paired_ratios(smg, rust)
    assert rs is not None
    assert rs.n == 2
    assert rs.median == pytest.approx(0.55)
    assert (rs.low, rs.high) == (pytest.approx(0.5), pytest.approx(0.6))
    assert paired_ratios({0: None}, {0: 1.0}) is None


def test_fixed_rate_prefers_the_rust_median() -> None:
    assert fixed_rate_for({"direct": 100.0, "rust": 10.0, "smg": 4.0}, 0.5) == (5.0, "rust")
    assert fixed_rate_for({"direct": 100.0, "rust": None, "smg": 4.0}, 0.5) == (2.0, "smg")
    assert fixed_rate_for({"direct": 100.0}, 0.5) == (50.0, "direct")
    assert fixed_rate_for({"rust": None}, 0.5) is None


def test_markdown_report_marks_void_rounds_and_ratios() -> None:
    runs = [
        Measurement(
            "rust",
            "chat",
            0,
            1000.0,
            1000,
            gateway_cpu_s=0.5,
            stub_cpu_s=0.01,
            raw={"bytes": 500000},
        ),
        Measurement("rust", "chat", 1, 1200.0, 1200, gateway_cpu_s=0.6, stub_cpu_s=0.01),
        Measurement("smg", "chat", 0, 500.0, 500, gateway_cpu_s=1.0, stub_cpu_s=0.01),
        Measurement("smg", "chat", 1, 0.0, 0, void=["3 non-2xx"]),
    ]
    text = markdown_report(["smg", "rust"], ["chat"], 2, runs, [], {})
    assert "void: 3 non-2xx" in text
    assert "ratio smg/rust: median 0.500 (range 0.500-0.500 over 1 rounds)" in text
    assert "| Rust SMG 1.13 | 1,000 | 1,200 | 1,100 | 0.500 |" in text
    assert "headers included: Rust SMG 1.13 500" in text


def test_markdown_report_gives_the_igw_on_off_ratio() -> None:
    runs = [
        Measurement("smg", "chat", 0, 1000.0, 1000),
        Measurement("smg-igw", "chat", 0, 980.0, 980),
        Measurement("smg", "chat", 1, 1000.0, 1000),
        Measurement("smg-igw", "chat", 1, 1010.0, 1010),
    ]
    text = markdown_report(["smg", "smg-igw"], ["chat"], 2, runs, [], {})
    assert "ratio smg-igw/smg: median 0.995 (range 0.980-1.010 over 2 rounds)" in text
    assert "| smg, --enable-igw | 980 | 1,010 | 995 |" in text
