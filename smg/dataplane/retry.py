"""Retry rules, pure: which outcomes are retried, and how long to wait before the next try.

The numbers follow the Rust SMG 1.13 (`routers/common/retry.rs`):

- `--retry-max-retries` counts every attempt, the first included (`max(1, n)` attempts:
  5 = one try and four retries); `--disable-retries` makes it one.
- Retryable statuses: 408, 429, 500, 502, 503, 504. The gateway also retries transport
  failures before a response head (connect refused or timed out, connection reset or
  closed, an invalid response): SMG turns those into 5xx answers, which it then retries.
- The backoff before retry `n` (0-based index of the attempt that failed) is
  `min(int(initial_ms * multiplier**n), max_ms)`, moved by a uniform jitter of up to
  `jitter * delay` either way (rounded half away from zero, never below 0).

Metric labels follow SMG's too: `smg_worker_retries_total{worker_type,endpoint}` with the
short endpoint names of `endpoint_label`, and `smg_worker_retry_backoff_seconds{attempt}`
where `attempt` is the number of the retry about to run (1 for the first retry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smg.config import GatewayConfig

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The lowest retryable status: the hot path tests `status >= RETRYABLE_MIN` before the set,
# so a 200 costs one integer comparison.
RETRYABLE_MIN = min(RETRYABLE_STATUSES)

_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/generate": "generate",
    "/v1/completions": "completions",
    "/v1/rerank": "rerank",
    "/rerank": "rerank",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES


def endpoint_label(path: str) -> str:
    """SMG's `endpoint` label for a route (`route_to_endpoint`); anything else is "other"."""
    return _ENDPOINTS.get(path, "other")


def round_half_away(value: float) -> int:
    """Rust's `f32::round`: halves go away from zero (Python's `round` goes to even)."""
    return math.floor(value + 0.5) if value >= 0 else -math.floor(-value + 0.5)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff_ms: int = 50
    max_backoff_ms: int = 30000
    multiplier: float = 1.5
    jitter: float = 0.2

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> RetryPolicy:
        return cls(
            max_attempts=1 if cfg.disable_retries else max(1, int(cfg.retry_max_retries)),
            initial_backoff_ms=int(cfg.retry_initial_backoff_ms),
            max_backoff_ms=int(cfg.retry_max_backoff_ms),
            multiplier=float(cfg.retry_backoff_multiplier),
            jitter=float(cfg.retry_jitter_factor),
        )

    def base_delay_ms(self, failed_attempt: int) -> int:
        """The backoff without jitter after attempt `failed_attempt` (0-based) failed."""
        try:
            raw = self.initial_backoff_ms * self.multiplier**failed_attempt
        except OverflowError:
            return self.max_backoff_ms
        return int(min(raw, float(self.max_backoff_ms)))

    def delay_seconds(self, failed_attempt: int, unit: float) -> float:
        """The backoff with jitter; `unit` is a uniform draw in [0, 1] (the caller's
        random source, so tests can pin it): 0 is the most negative jitter, 1 the most
        positive."""
        delay = self.base_delay_ms(failed_attempt)
        jitter = min(max(self.jitter, 0.0), 1.0)
        if jitter > 0.0:
            scale = -jitter + 2.0 * jitter * unit
            shift = max(round_half_away(delay * scale), -delay)
            delay = max(delay + shift, 0)
        return delay / 1000.0
