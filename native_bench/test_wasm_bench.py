"""wasm_bench's pure parts: the summary of paired rounds and its table."""

from __future__ import annotations

import pytest
from wasm_bench import Sample, markdown, summarize

SAMPLES = [
    Sample("none", 0, 10_000, 2_000.0, 0.5, 0),
    Sample("wasm", 0, 8_000, 1_600.0, 0.6, 0),
    Sample("wasm", 1, 9_000, 1_800.0, 0.72, 0),
    Sample("none", 1, 10_000, 2_000.0, 0.6, 1),
]


def test_summarize_pairs_rounds_and_adds_cpu() -> None:
    s = summarize(SAMPLES)
    assert s["none"] == {"rps_median": 2000.0, "cpu_us_per_request_median": 55.0, "bad": 1}
    assert s["wasm"] == {"rps_median": 1700.0, "cpu_us_per_request_median": 77.5, "bad": 0}
    ratio = s["rps_ratio_wasm_over_none"]
    assert ratio["median"] == pytest.approx(0.85) and ratio["low"] == pytest.approx(0.8)
    assert ratio["high"] == pytest.approx(0.9) and ratio["n"] == 2
    assert s["added_cpu_us_per_request"] == pytest.approx(22.5)


def test_summarize_without_wasm_rounds() -> None:
    s = summarize(SAMPLES[:1])
    assert s["rps_ratio_wasm_over_none"] is None
    assert s["added_cpu_us_per_request"] is None


def test_markdown_names_the_numbers() -> None:
    s = summarize(SAMPLES)
    s["module_us_per_call"] = 12.0
    config = {"processes": 2, "connections": 32, "rounds": 2, "duration": 5, "payload": "chat"}
    text = markdown(s, config)
    assert "| none | 2,000 | 55 | 1 |" in text
    assert "| noop (OnRequest) | 1,700 | 78 | 0 |" in text
    assert (
        "throughput with the module / without: 0.850 (paired per round, range 0.800..0.900)" in text
    )
    assert "added gateway CPU per request: 22 us" in text
    assert "module's own time per call (smg_wasm_execution_seconds_total): 12 us" in text
