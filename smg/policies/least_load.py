"""`least_load`: route to the lowest expected wait (token-work drain time + KV barrier).

Rust source: model_gateway/src/policies/least_load.rs, as of smg-project/smg main
(f8daa8835, 2026-08-22, with #1647 expected-wait, #2096 random ties, #2154 queue estimate,
#2187 candidate-scoped scoring, #2193 waiting-queue cap); defaults and flag texts match
the 1.13 `smg launch --help`. The 1.13 wheel's symbols name a few more terms (running
work, completion reconciliation) whose source is not public; they are not reproduced.

For every candidate with a valid backend load::

    score = (queued_tokens + since_poll_tokens) / throughput
            + kv_pressure_weight * k / (1 - k)          k = clamp(token_usage, 0, 0.999)

- ``queued_tokens``: ``waiting_tokens`` when > 0, else ``max(waiting, 0) * mean_prefill``
  (#2154: a backend reporting a queue depth but no token count is not read as idle).
- ``since_poll_tokens``: token-work this process routed to the worker since its last
  poll; the winner is credited ``request.prompt_tokens`` or, unknown (HTTP), the mean
  prefill. It restarts at 0 when the worker's ``updated`` stamp changes (a fresh poll).
- ``throughput``: the reported generation rate, or ``default_throughput`` when <= 0.

A candidate without a valid load, while another candidate has one, scores
``in_flight * mean_prefill / nominal`` where ``nominal`` is the mean positive throughput
of the (post-veto) candidates, else ``default_throughput``. When no candidate has a load
(cold start, a backend that never reports), the score is the in-flight count
(join-shortest-queue). Lowest score wins; exact ties are broken uniformly at random
(reservoir sampling over the scan, #2096).

``max_waiting_requests`` > 0 first drops candidates with a valid load whose
``max(waiting, 0)`` plus requests this process sent since the poll has reached the cap;
candidates without a load stay eligible. If none is left select() raises
NoEligibleWorker (Rust returns no worker; the request goes to the admission queue).
With one row and no cap the row is returned without scoring or credit, as in Rust.

Differences forced by this design: the since-poll tally is per data-plane process (Rust:
per gateway), and a poll is recognised by the ``updated`` stamp rather than by a push
from the monitor. A NaN token usage is treated as 0 rather than producing a NaN score.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from smg.policies.base import LoadView, NoEligibleWorker, Policy, RouteRequest

DEFAULT_KV_PRESSURE_WEIGHT = 0.15  # seconds
DEFAULT_MEAN_PREFILL_TOKENS = 1024
DEFAULT_THROUGHPUT = 2000.0  # tokens/s
DEFAULT_MAX_WAITING_REQUESTS = 0  # 0 = no cap
KV_USAGE_CLAMP = 0.999  # keeps k / (1 - k) finite at a full cache

# Slots of a since-poll tally: [poll stamp, tokens, requests].
STAMP = 0
TOKENS = 1
REQUESTS = 2


class SincePoll:
    """Per-row tally of this process's dispatches since the worker's last load poll."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: dict[int, list[float]] = {}

    def get(self, row: int, stamp: float) -> list[float]:
        """The row's tally, restarted from zero if `stamp` shows a newer poll."""
        tally = self.rows.get(row)
        if tally is None or tally[STAMP] != stamp:
            tally = [stamp, 0, 0]
            self.rows[row] = tally
        return tally


def check_params(
    kv_pressure_weight: float,
    mean_prefill_tokens: int,
    default_throughput: float,
    max_waiting_requests: int,
) -> None:
    """Reject what Rust's config validation rejects (validation.rs, PolicyConfig::LeastLoad)."""
    if not (math.isfinite(kv_pressure_weight) and kv_pressure_weight >= 0.0):
        raise ValueError(
            f"least_load_kv_pressure_weight must be finite and >= 0.0, got {kv_pressure_weight}"
        )
    if mean_prefill_tokens <= 0:
        raise ValueError(f"least_load_mean_prefill_tokens must be > 0, got {mean_prefill_tokens}")
    if not (math.isfinite(default_throughput) and default_throughput > 0.0):
        raise ValueError(
            f"least_load_default_throughput must be finite and > 0.0, got {default_throughput}"
        )
    if max_waiting_requests < 0:
        raise ValueError(
            f"least_load_max_waiting_requests must be >= 0 (0 disables), got {max_waiting_requests}"
        )


class LeastLoadPolicy(Policy):
    name = "least_load"
    needs_backend_loads = True

    def __init__(
        self,
        kv_pressure_weight: float = DEFAULT_KV_PRESSURE_WEIGHT,
        mean_prefill_tokens: int = DEFAULT_MEAN_PREFILL_TOKENS,
        default_throughput: float = DEFAULT_THROUGHPUT,
        max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
        rng: random.Random | None = None,
    ) -> None:
        check_params(
            kv_pressure_weight, mean_prefill_tokens, default_throughput, max_waiting_requests
        )
        self.kv_pressure_weight = float(kv_pressure_weight)
        self.mean_prefill_tokens = int(mean_prefill_tokens)
        self.default_throughput = float(default_throughput)
        self.max_waiting_requests = int(max_waiting_requests)
        self.since = SincePoll()
        self._random = (rng if rng is not None else random.Random()).random

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        if len(rows) == 1 and not self.max_waiting_requests:
            return rows[0]
        return self.select_min_expected_wait(rows, view, request)

    def select_min_expected_wait(
        self, candidates: Sequence[int], view: LoadView, request: RouteRequest
    ) -> int:
        """Argmin of the expected wait over `candidates`, crediting the winner.

        The nominal throughput and the dark-fleet fallback are scoped to `candidates`, so
        power_of_two scoring a sampled pair gets a self-consistent comparison (#2187).
        """
        cap = self.max_waiting_requests
        mean_prefill = self.mean_prefill_tokens
        default_tp = self.default_throughput
        weight = self.kv_pressure_weight
        tallies_by_row = self.since.rows
        rows: list[int] = []
        scores: list[float] = []
        tallies: list[list[float] | None] = []
        dark: list[int] = []  # positions of candidates without a valid load
        tp_sum = 0.0
        tp_count = 0
        for row in candidates:
            load = view.backend_load(row)
            if load.valid:
                # SincePoll.get inlined: this loop runs once per worker per request.
                tally = tallies_by_row.get(row)
                if tally is None or tally[STAMP] != load.updated:
                    tally = [load.updated, 0, 0]
                    tallies_by_row[row] = tally
                if cap and max(load.waiting, 0) + tally[REQUESTS] >= cap:
                    continue
                queued: float = load.waiting_tokens
                if queued <= 0:
                    queued = max(load.waiting, 0) * mean_prefill
                throughput = load.throughput
                if throughput > 0.0:
                    tp_sum += throughput
                    tp_count += 1
                else:
                    throughput = default_tp
                k = load.token_usage
                if k > KV_USAGE_CLAMP:
                    k = KV_USAGE_CLAMP
                elif not k > 0.0:
                    k = 0.0
                scores.append((queued + tally[TOKENS]) / throughput + weight * k / (1.0 - k))
                tallies.append(tally)
            else:
                dark.append(len(rows))
                scores.append(0.0)
                tallies.append(None)
            rows.append(row)
        if not rows:
            raise NoEligibleWorker(
                f"every worker has reached the least_load waiting-queue cap ({cap})"
            )
        if dark:
            if len(dark) < len(rows):
                # Peers report: put this worker's live in-flight into the same time units.
                nominal = tp_sum / tp_count if tp_count else default_tp
                for i in dark:
                    scores[i] = view.in_flight(rows[i]) * mean_prefill / nominal
            else:
                for i in dark:
                    scores[i] = view.in_flight(rows[i])

        rnd = self._random
        best = 0
        best_score = scores[0]
        tied = 1
        for i in range(1, len(scores)):
            score = scores[i]
            if score < best_score:
                best = i
                best_score = score
                tied = 1
            elif score == best_score:
                # Keep the i-th of k tying candidates with probability 1/k: uniform over
                # the ties without collecting them.
                tied += 1
                if rnd() * tied < 1.0:
                    best = i

        # A worker without a load has no tally to credit; its first poll would reset it.
        tally = tallies[best]
        if tally is not None:
            tokens = request.prompt_tokens
            tally[TOKENS] += mean_prefill if tokens is None else tokens
            tally[REQUESTS] += 1
        return rows[best]
