"""`power_of_two`: sample two distinct routable workers, route to the less loaded one.

Rust source: model_gateway/src/policies/power_of_two.rs, as of smg-project/smg main
(f8daa8835, 2026-08-22; #2187 "score power-of-two pairs with the least-load expected
wait"). Sampling: ``i = uniform(0..n)``, ``j = (i + 1 + uniform(0..n-1)) % n`` (a
distinct second pick in O(1)); one row is returned as is. Only the two sampled rows are
read.

``--power-of-two-load-metric`` (1.13 flag; its Rust source is not public, the meanings
of ``requests`` and ``least_requests`` below are inferred from the flag name, the
pre-#2187 policy and the 1.13 binary's ``fewest_in_flight`` symbol):

- ``expected_wait`` (default): the pair is scored by least_load's expected wait (see
  least_load.py), restricted to the pair: nominal throughput and the dark-pair
  join-shortest-queue fallback are computed over the two, the winner is credited with
  the request's token-work since the poll, exact ties go uniformly at random. As in
  Rust the scorer uses least_load's built-in defaults (0.15 s, 1024 tokens, 2000 tok/s,
  no waiting cap); the --least-load-* flags are for the least_load policy.
- ``requests``: backend-reported requests, ``running + waiting`` plus the requests this
  process sent since the worker's last poll, when both sampled workers have a valid
  load; if either lacks one, both fall back to the gateway in-flight count (the rule
  Rust's power_of_two always had: mixed metrics are never compared).
- ``least_requests``: the gateway-wide in-flight count only.

For ``requests`` and ``least_requests`` a tie goes to the first sampled worker, which is
itself uniform over the pair, so ties are broken uniformly at random without a draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from smg.policies.base import BackendLoad, LoadView, Policy, RouteRequest
from smg.policies.least_load import (
    DEFAULT_KV_PRESSURE_WEIGHT,
    DEFAULT_MEAN_PREFILL_TOKENS,
    DEFAULT_THROUGHPUT,
    KV_USAGE_CLAMP,
    REQUESTS,
    STAMP,
    TOKENS,
    LeastLoadPolicy,
)

# smg.shm.layout.FLAG_LOAD_VALID (importing layout here would be circular: it imports the
# config, which imports the policy registry); tests/test_decision_fastpaths.py checks it.
FLAG_LOAD_VALID = 2

LOAD_METRICS = ("expected_wait", "requests", "least_requests")
DEFAULT_LOAD_METRIC = "expected_wait"


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"
    needs_backend_loads = True

    def __init__(
        self,
        load_metric: str = DEFAULT_LOAD_METRIC,
        rng: random.Random | None = None,
        kv_pressure_weight: float = DEFAULT_KV_PRESSURE_WEIGHT,
        mean_prefill_tokens: int = DEFAULT_MEAN_PREFILL_TOKENS,
        default_throughput: float = DEFAULT_THROUGHPUT,
    ) -> None:
        if load_metric not in LOAD_METRICS:
            raise ValueError(
                "power_of_two_load_metric: expected expected_wait, requests or "
                f"least_requests, got {load_metric!r}"
            )
        rng = rng if rng is not None else random.Random()
        self.load_metric = load_metric
        self._random = rng.random
        self._scorer = LeastLoadPolicy(
            kv_pressure_weight, mean_prefill_tokens, default_throughput, 0, rng=rng
        )
        pickers: dict[str, Callable[[int, int, LoadView, RouteRequest], int]] = {
            "expected_wait": self._expected_wait,
            "requests": self._requests,
            "least_requests": self._least_requests,
        }
        self._pick = pickers[load_metric]

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        n = len(rows)
        if n == 1:
            return rows[0]
        rnd = self._random
        i = int(rnd() * n)
        j = (i + 1 + int(rnd() * (n - 1))) % n
        return self._pick(rows[i], rows[j], view, request)

    def _expected_wait(self, a: int, b: int, view: LoadView, request: RouteRequest) -> int:
        """`LeastLoadPolicy.select_min_expected_wait((a, b), ...)` unrolled for a pair: the
        same arithmetic in the same order, the same tallies and the same draw on a tie,
        without the per-candidate lists and loop (about half the decision's cost). Each
        worker's expected wait (least_load's) is written out inline, and the shared
        table's rows are read as tuples (ShmLoadView.load_fields) rather than as two
        BackendLoads: a call, a `max()` and a struct per worker were ~0.6 us of ~2.4."""
        read = getattr(view, "load_fields", None)
        fields_a = fields_b = None
        if read is not None:
            fields_a = read(a)
            fields_b = read(b)
        if fields_a is None or fields_b is None:  # another view, or a write in progress
            fields_a = _fields(view.backend_load(a))
            fields_b = _fields(view.backend_load(b))
        _, _, flags_a, _, _, waiting_a, wtok_a, usage_a, tput_a, updated_a, _ = fields_a
        _, _, flags_b, _, _, waiting_b, wtok_b, usage_b, tput_b, updated_b, _ = fields_b
        scorer = self._scorer
        mean_prefill = scorer.mean_prefill_tokens
        tally_a: list[float] | None = None
        tally_b: list[float] | None = None
        if (flags_a | flags_b) & FLAG_LOAD_VALID:
            tallies = scorer.since.rows
            default_tp = scorer.default_throughput
            weight = scorer.kv_pressure_weight
            if flags_a & FLAG_LOAD_VALID:
                tally_a = tallies.get(a)
                if tally_a is None or tally_a[STAMP] != updated_a:
                    tally_a = [updated_a, 0, 0]
                    tallies[a] = tally_a
                # least_load's expected wait, its operations in its order.
                queued: float = wtok_a
                if queued <= 0:
                    queued = (waiting_a if waiting_a > 0 else 0) * mean_prefill
                throughput = tput_a if tput_a > 0.0 else default_tp
                k = usage_a
                if k > KV_USAGE_CLAMP:
                    k = KV_USAGE_CLAMP
                elif not k > 0.0:
                    k = 0.0
                score_a = (queued + tally_a[TOKENS]) / throughput + weight * k / (1.0 - k)
            if flags_b & FLAG_LOAD_VALID:
                tally_b = tallies.get(b)
                if tally_b is None or tally_b[STAMP] != updated_b:
                    tally_b = [updated_b, 0, 0]
                    tallies[b] = tally_b
                queued = wtok_b
                if queued <= 0:
                    queued = (waiting_b if waiting_b > 0 else 0) * mean_prefill
                throughput = tput_b if tput_b > 0.0 else default_tp
                k = usage_b
                if k > KV_USAGE_CLAMP:
                    k = KV_USAGE_CLAMP
                elif not k > 0.0:
                    k = 0.0
                score_b = (queued + tally_b[TOKENS]) / throughput + weight * k / (1.0 - k)
            # A dark worker: least_load's fallback, scoped to the pair.
            if tally_a is None:
                nominal = tput_b if tput_b > 0.0 else default_tp
                score_a = view.in_flight(a) * mean_prefill / nominal
            elif tally_b is None:
                nominal = tput_a if tput_a > 0.0 else default_tp
                score_b = view.in_flight(b) * mean_prefill / nominal
        else:
            score_a = view.in_flight(a)
            score_b = view.in_flight(b)
        if score_b < score_a or (score_b == score_a and self._random() * 2 < 1.0):
            chosen, tally = b, tally_b
        else:
            chosen, tally = a, tally_a
        # A worker without a load has no tally to credit; its first poll would reset it.
        if tally is not None:
            tokens = request.prompt_tokens
            tally[TOKENS] += mean_prefill if tokens is None else tokens
            tally[REQUESTS] += 1
        return chosen

    def _requests(self, a: int, b: int, view: LoadView, request: RouteRequest) -> int:
        load_a = view.backend_load(a)
        load_b = view.backend_load(b)
        if not (load_a.valid and load_b.valid):
            return a if view.in_flight(a) <= view.in_flight(b) else b
        since = self._scorer.since
        tally_a = since.get(a, load_a.updated)
        tally_b = since.get(b, load_b.updated)
        count_a = max(load_a.running, 0) + max(load_a.waiting, 0) + tally_a[REQUESTS]
        count_b = max(load_b.running, 0) + max(load_b.waiting, 0) + tally_b[REQUESTS]
        # The credit keeps a burst between two polls from herding onto one worker.
        if count_a <= count_b:
            tally_a[REQUESTS] += 1
            return a
        tally_b[REQUESTS] += 1
        return b

    def _least_requests(self, a: int, b: int, view: LoadView, request: RouteRequest) -> int:
        return a if view.in_flight(a) <= view.in_flight(b) else b


def _fields(load: BackendLoad) -> tuple[Any, ...]:
    """A BackendLoad as ShmLoadView.load_fields lays a row out (the fields the pair
    scorer reads; the others zero)."""
    flags = FLAG_LOAD_VALID if load.valid else 0
    return (
        0, 0, flags, 0, load.running, load.waiting, load.waiting_tokens,
        load.token_usage, load.throughput, load.updated, 0.0,
    )  # fmt: skip
