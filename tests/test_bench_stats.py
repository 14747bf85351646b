"""Pure statistics of `smg bench`, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from smg.bench import stats


def test_mean_median_std_population() -> None:
    xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    assert stats.mean(xs) == 5.0
    assert stats.std(xs) == 2.0  # the textbook population example
    assert stats.median(xs) == 4.5
    assert stats.mean([]) == 0.0 and stats.std([]) == 0.0 and stats.median([]) == 0.0


def test_percentile_linear_interpolation_like_numpy() -> None:
    xs = [10.0, 20.0, 30.0, 40.0]
    # rank = (n-1) * p/100: p99 -> 2.97 -> 30 + 0.97 * 10
    assert stats.percentile(xs, 99) == pytest.approx(39.7)
    assert stats.percentile(xs, 50) == pytest.approx(25.0)
    assert stats.percentile(xs, 0) == 10.0
    assert stats.percentile(xs, 100) == 40.0
    assert stats.percentile([3.0, 1.0, 2.0], 25) == pytest.approx(1.5)  # unsorted input
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        stats.percentile(xs, 101)


def test_summarize_labels_and_values() -> None:
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0], [50, 90, 99.9])
    assert s["mean"] == 3.0 and s["median"] == 3.0
    assert s["min"] == 1.0 and s["max"] == 5.0
    assert s["p50"] == 3.0
    assert s["p90"] == pytest.approx(4.6)
    assert s["p99.9"] == pytest.approx(4.996)
    assert stats.percentile_label(99.0) == "99" and stats.percentile_label(99.9) == "99.9"


def test_tpot_definition() -> None:
    # E2E 1.0 s, TTFT 0.1 s, 10 tokens: (1.0 - 0.1) / 9 = 0.1 s
    assert stats.tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert stats.tpot(1.0, 0.1, 1) is None
    assert stats.tpot(1.0, 0.1, 0) is None


def test_split_gap_accounts_tokens() -> None:
    assert stats.split_gap(0.03, 3) == pytest.approx([0.01, 0.01, 0.01])
    assert stats.split_gap(0.02, 1) == [0.02]
    assert stats.split_gap(0.02, 0) == []


def test_peak_concurrency_half_open() -> None:
    assert stats.peak_concurrency([(0, 1), (1, 2)]) == 1  # touching intervals don't overlap
    assert stats.peak_concurrency([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3
    assert stats.peak_concurrency([]) == 0


def test_max_tokens_per_second_buckets() -> None:
    times = [10.0, 10.2, 10.9, 11.0, 11.5, 12.99]
    assert stats.max_tokens_per_second(times, origin=10.0) == 3.0
    assert stats.max_tokens_per_second([], origin=0.0) == 0.0


def test_goodput_count_all_slos_must_hold() -> None:
    ttfts = [0.1, 0.3, 0.1, 0.1]
    tpots = [0.01, 0.01, 0.05, 0.0]
    e2els = [1.0, 1.0, 1.0, 3.0]
    assert stats.goodput_count({"ttft": 200}, ttfts, tpots, e2els) == 3
    assert stats.goodput_count({"ttft": 200, "tpot": 20}, ttfts, tpots, e2els) == 2
    assert stats.goodput_count({"ttft": 200, "tpot": 20, "e2el": 2000}, ttfts, tpots, e2els) == 1
    assert stats.goodput_count({}, ttfts, tpots, e2els) == 0


def test_paired_differences_and_fairness() -> None:
    assert stats.paired_differences([1.0, 2.0, 3.0], [1.5, 2.0, 2.0]) == [0.5, 0.0, -1.0]
    even = stats.fairness([10, 10, 10])
    assert even["jain_index"] == pytest.approx(1.0) and even["cv"] == 0.0
    assert even["max_over_min"] == 1.0
    skew = stats.fairness([30, 0, 0])
    assert skew["jain_index"] == pytest.approx(1 / 3)
    assert math.isinf(skew["max_over_min"])
