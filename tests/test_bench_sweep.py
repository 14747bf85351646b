"""Sweeps and the SLO search: the pure parts (SLO names, the search's exact walk, the
table) and end to end through `smg bench` against mock workers and a gateway."""

from __future__ import annotations

import argparse
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
    assert table_text(doc).splitlines() == [
        "request_rate  req/s  out tok/s  TTFT p50 ms  TTFT p99 ms  ITL p50 ms  ITL p99 ms"
        "  E2E p50 ms  E2E p99 ms  goodput  errors  valid  SLO met",
        "-" * 147,
        "1              1.50       96.2         10.0         12.0         5.0         6.0"
        "       100.0       120.0     1.25       0    yes      yes",
        "inf            1.50       96.2         10.0         12.0         5.0         6.0"
        "       100.0           -        -       3     NO       no",
    ]
    assert answer_text(doc) == "sweep: highest request_rate meeting e2el_p99 <= 150 ms: 1"
    assert tail_percentile([50.0, 90.0]) == "90" and tail_percentile([99.0, 99.9]) == "99"
    assert docs_valid([doc]) is False  # a plain sweep: every run must be valid
    doc["smg_sweep"]["search"] = {"result": 1.0, "high": 2.0, "start": 1.0}
    assert docs_valid([doc]) is True  # a search: its answer exists
