"""Retry rules (smg/dataplane/retry.py), pure: statuses, attempt count, backoff with jitter.

Expected numbers are the Rust SMG's (`routers/common/retry.rs`, its own tests included)."""

from __future__ import annotations

import pytest

from smg.config import GatewayConfig
from smg.dataplane.metrics import DataPlaneMetrics
from smg.dataplane.retry import (
    RETRYABLE_MIN,
    RETRYABLE_STATUSES,
    RetryPolicy,
    endpoint_label,
    is_retryable_status,
    round_half_away,
)
from smg.promtext import render


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_smg_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 401, 403, 404, 409, 422, 501, 505])
def test_other_statuses_are_final(status: int) -> None:
    assert not is_retryable_status(status)


def test_hot_path_guard_is_below_every_retryable_status() -> None:
    assert all(status >= RETRYABLE_MIN for status in RETRYABLE_STATUSES)
    assert RETRYABLE_MIN > 299  # a 2xx never reaches the set lookup


def test_backoff_progression_and_cap_without_jitter() -> None:
    # SMG's test_backoff_no_jitter_progression_and_cap.
    policy = RetryPolicy(
        max_attempts=10, initial_backoff_ms=100, max_backoff_ms=250, multiplier=2.0, jitter=0.0
    )
    assert [policy.base_delay_ms(n) for n in (0, 1, 2, 10)] == [100, 200, 250, 250]
    assert policy.delay_seconds(1, 0.9) == 0.2  # no jitter: the draw does not matter


def test_default_backoff_truncates_like_smg() -> None:
    """50 ms x 1.5: SMG casts the product to an integer (112.5 -> 112, 168.75 -> 168)."""
    policy = RetryPolicy()
    assert [policy.base_delay_ms(n) for n in range(5)] == [50, 75, 112, 168, 253]
    assert policy.base_delay_ms(40) == 30000  # capped by --retry-max-backoff-ms


def test_huge_exponent_is_capped_not_an_error() -> None:
    policy = RetryPolicy(multiplier=10.0, max_backoff_ms=1234)
    assert policy.base_delay_ms(100_000) == 1234


@pytest.mark.parametrize(
    ("unit", "expected_ms"),
    [(0.0, 80), (0.5, 100), (1.0, 120), (0.25, 90), (0.75, 110)],
)
def test_jitter_spans_the_factor_either_way(unit: float, expected_ms: int) -> None:
    policy = RetryPolicy(initial_backoff_ms=100, multiplier=2.0, jitter=0.2)
    assert policy.delay_seconds(0, unit) == pytest.approx(expected_ms / 1000)


def test_jitter_bounds_over_many_draws() -> None:
    # SMG's test_backoff_with_jitter_within_bounds: 400 ms +- 50 %.
    policy = RetryPolicy(initial_backoff_ms=100, max_backoff_ms=10_000, multiplier=2.0, jitter=0.5)
    for step in range(101):
        delay = policy.delay_seconds(2, step / 100) * 1000
        assert 200 - 1 <= delay <= 600 + 1


def test_full_jitter_never_goes_below_zero() -> None:
    policy = RetryPolicy(initial_backoff_ms=10, jitter=1.0)
    assert policy.delay_seconds(0, 0.0) == 0.0
    assert policy.delay_seconds(0, 1.0) == 0.02


def test_jitter_rounds_half_away_from_zero() -> None:
    assert [round_half_away(x) for x in (0.5, 1.5, 2.5, -0.5, -2.5, 2.4, -2.4)] == [
        1,
        2,
        3,
        -1,
        -3,
        2,
        -2,
    ]
    # 75 ms with +-0.2 at the extremes: 75 * 0.2 = 15 exactly; 112 * 0.2 = 22.4 -> 22.
    policy = RetryPolicy(jitter=0.2)
    assert policy.delay_seconds(1, 1.0) == 0.09
    assert policy.delay_seconds(2, 0.0) == 0.09


def test_attempts_count_the_first_one() -> None:
    assert RetryPolicy.from_config(GatewayConfig()).max_attempts == 5
    assert RetryPolicy.from_config(GatewayConfig(retry_max_retries=3)).max_attempts == 3
    assert RetryPolicy.from_config(GatewayConfig(retry_max_retries=1)).max_attempts == 1
    assert RetryPolicy.from_config(GatewayConfig(disable_retries=True)).max_attempts == 1


def test_flags_reach_the_policy() -> None:
    cfg = GatewayConfig(
        retry_initial_backoff_ms=7,
        retry_max_backoff_ms=9,
        retry_backoff_multiplier=3.0,
        retry_jitter_factor=0.5,
    )
    assert RetryPolicy.from_config(cfg) == RetryPolicy(
        max_attempts=5, initial_backoff_ms=7, max_backoff_ms=9, multiplier=3.0, jitter=0.5
    )


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/generate", "generate"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/rerank", "rerank"),
        ("/v1/responses", "responses"),
        ("/v1/messages", "messages"),
        ("/get_model_info", "other"),
    ],
)
def test_endpoint_labels_are_smgs(path: str, label: str) -> None:
    assert endpoint_label(path) == label


def test_retry_metrics_render_under_smgs_names() -> None:
    metrics = DataPlaneMetrics(buckets=(0.01, 0.1))
    metrics.retry("/v1/chat/completions", 1, 0.05)
    metrics.retry("/v1/chat/completions", 2, 0.0)
    metrics.retry("/v1/messages", 1, 0.2)
    metrics.retries_exhausted("/v1/chat/completions")
    lines = render(metrics.families(3)).splitlines()
    proc = 'process="3"'
    assert f'smg_worker_retries_total{{{proc},worker_type="regular",endpoint="chat"}} 2' in lines
    assert (
        f'smg_worker_retries_total{{{proc},worker_type="regular",endpoint="messages"}} 1' in lines
    )
    assert (
        f'smg_worker_retries_exhausted_total{{{proc},worker_type="regular",endpoint="chat"}} 1'
        in lines
    )
    assert "# TYPE smg_worker_retry_backoff_seconds histogram" in lines
    assert f'smg_worker_retry_backoff_seconds_bucket{{{proc},attempt="1",le="0.1"}} 1' in lines
    assert f'smg_worker_retry_backoff_seconds_bucket{{{proc},attempt="1",le="+Inf"}} 2' in lines
    assert f'smg_worker_retry_backoff_seconds_bucket{{{proc},attempt="2",le="0.01"}} 1' in lines
    assert f'smg_worker_retry_backoff_seconds_count{{{proc},attempt="2"}} 1' in lines
