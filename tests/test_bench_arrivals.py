"""Arrival generators match their distributions (fixed seeds, Kolmogorov-Smirnov)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from smg.bench import arrivals

# KS critical value at alpha = 0.01 is about 1.63 / sqrt(n).
N = 4000
KS_CRIT = 1.63 / math.sqrt(N)


def ks_statistic(sample: list[float], cdf) -> float:  # type: ignore[no-untyped-def]
    xs = sorted(sample)
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        f = cdf(x)
        d = max(d, f - i / n, (i + 1) / n - f)
    return d


def gamma_cdf(x: float, shape: float, scale: float) -> float:
    """Regularized lower incomplete gamma P(shape, x/scale) by its power series."""
    if x <= 0:
        return 0.0
    z = x / scale
    term = 1.0 / shape
    total = term
    k = 1
    while term > 1e-15 * total and k < 10000:
        term *= z / (shape + k)
        total += term
        k += 1
    return min(1.0, total * math.exp(-z + shape * math.log(z) - math.lgamma(shape)))


def test_gamma_cdf_helper_is_right_for_exponential() -> None:
    assert gamma_cdf(1.0, 1.0, 1.0) == pytest.approx(1 - math.exp(-1.0))
    assert gamma_cdf(2.0, 1.0, 0.5) == pytest.approx(1 - math.exp(-4.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_gaps_are_exponential(seed: int) -> None:
    rate = 50.0
    gaps = arrivals.gamma_gaps(N, rate, 1.0, random.Random(seed))
    d = ks_statistic(gaps, lambda x: 1 - math.exp(-rate * x))
    assert d < KS_CRIT
    assert sum(gaps) / N == pytest.approx(1 / rate, rel=0.06)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 3.0])
def test_gamma_gaps_match_gamma(burstiness: float) -> None:
    rate = 20.0
    gaps = arrivals.gamma_gaps(N, rate, burstiness, random.Random(7))
    scale = 1.0 / (rate * burstiness)
    d = ks_statistic(gaps, lambda x: gamma_cdf(x, burstiness, scale))
    assert d < KS_CRIT
    mean = sum(gaps) / N
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / N) / mean
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_wrong_distribution_is_rejected_by_the_test() -> None:
    # The KS check has teeth: gamma(0.25) gaps are not exponential at the same mean.
    gaps = arrivals.gamma_gaps(N, 20.0, 0.25, random.Random(7))
    assert ks_statistic(gaps, lambda x: 1 - math.exp(-20.0 * x)) > KS_CRIT


def test_schedule_is_normalized_to_n_over_rate_and_seeded() -> None:
    offsets, rates = arrivals.schedule(500, 100.0, 1.0, seed=3)
    assert offsets[-1] == pytest.approx(5.0)
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    assert rates == [100.0] * 500
    assert arrivals.schedule(500, 100.0, 1.0, seed=3)[0] == offsets
    assert arrivals.schedule(500, 100.0, 1.0, seed=4)[0] != offsets


def test_schedule_inf_rate_and_uniform() -> None:
    offsets, _ = arrivals.schedule(10, math.inf)
    assert offsets == [0.0] * 10
    even, _ = arrivals.schedule(4, 2.0, math.inf)
    assert even == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_ramp_up_rates() -> None:
    assert arrivals.ramp_rate("linear", 10, 30, 0, 5) == 10
    assert arrivals.ramp_rate("linear", 10, 30, 2, 5) == 20
    assert arrivals.ramp_rate("linear", 10, 30, 4, 5) == 30
    assert arrivals.ramp_rate("exponential", 1, 100, 2, 5) == pytest.approx(10.0)
    _, rates = arrivals.schedule(5, math.inf, 1.0, 0, ramp=("linear", 10, 30))
    assert rates == [10, 15, 20, 25, 30]
    with pytest.raises(ValueError):
        arrivals.ramp_rate("exponential", 0, 10, 1, 5)


def test_trace_offsets_relative_to_first() -> None:
    assert arrivals.trace_offsets([1000.0, 1500.0, 1200.0], 0.001) == pytest.approx([0.0, 0.5, 0.2])


def test_invalid_rates() -> None:
    with pytest.raises(ValueError):
        arrivals.schedule(3, 0.0)
    with pytest.raises(ValueError):
        arrivals.schedule(3, 1.0, burstiness=0.0)
