"""cache_bench.py: its pure parts, then a tiny real run (smg only, one seed, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import cache_bench as cb
import pytest


def test_workload_numbers_of_the_issue() -> None:
    w = cb.Workload()
    assert (w.requests, w.distinct_prefix_tokens, w.cache_tokens) == (1024, 131072, 32768)
    # 15 of 16 prompts per group reuse the 2,048-token prefix of a 2,176-token prompt.
    assert w.ideal_hit_rate == pytest.approx(15 * 2048 / (16 * 2176))


def test_prompts_are_fixed_and_only_the_order_follows_the_seed() -> None:
    w = cb.Workload(groups=3, per_group=2, system_tokens=20, question_tokens=5)
    a, b = cb.make_prompts(w), cb.make_prompts(w)
    assert a == b and len(a) == 6
    assert a[0].system == a[1].system != a[2].system
    assert len(a[0].system.split()) == 20 and len(a[0].question.split()) == 5
    assert cb.shuffled(a, 1) == cb.shuffled(a, 1) != cb.shuffled(a, 2)
    assert sorted(cb.shuffled(a, 1), key=lambda p: (p.group, p.index)) == a
    body = json.loads(cb.chat_body(a[0], w))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_imbalance_percentile_and_usage_parsing() -> None:
    assert cb.imbalance([4, 4, 4, 4]) == 1.0
    assert cb.imbalance([16, 0, 0, 0]) == 4.0
    assert cb.imbalance([0, 0]) == 0.0
    assert cb.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert cb.percentile([], 0.5) is None
    tail = (
        b'data: {"choices":[],"usage":{"prompt_tokens":40,"prompt_tokens_details":'
        b'{"cached_tokens":32}}}\n\ndata: [DONE]\n\n'
    )
    assert cb.usage_cached_tokens(tail) == 32
    assert cb.usage_cached_tokens(b"data: [DONE]\n\n") == 0


def test_smoke_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    rc = cb.main(["--smoke", "--systems", "smg-p4", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["workload"]["requests"] == 16 and report["seeds"] == [1]
    (s,) = report["systems"]
    assert s["system"] == "smg-p4"
    assert s["policy"] in ("cache_aware", "round_robin")  # round_robin until smg has it
    assert (s["requests"], s["errors"]) == (16, 0)
    assert sum(s["requests_per_worker"]) == 16 and len(s["requests_per_worker"]) == 2
    # The mocks' counters and the streamed usage chunks agree on the cached tokens.
    assert s["mock_cached_tokens"] == s["client_cached_tokens"]
    assert s["mock_prompt_tokens"] == 16 * (256 + 32)
    assert 0.0 <= s["hit_rate"] <= report["workload"]["ideal_hit_rate"]
    assert s["mock_cached_tokens"] % 16 == 0
    assert 1.0 <= s["imbalance"] <= 2.0
    assert s["rps"] > 0 and s["ttft_median_ms"] > 0 and s["ttft_p90_ms"] >= s["ttft_median_ms"]
    table = out.with_suffix(".md").read_text()
    assert "| smg-p4 |" in table and "hit rate" in table
