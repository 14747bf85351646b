"""`round_robin`: rotate through the routable workers, one rotation per model.

Rust source: model_gateway/src/policies/round_robin.rs and the per-model policy registry
(policies/registry.rs): each model gets its own policy instance, so its own counter; the
pick is `healthy[count % healthy.len()]`. Unhealthy workers are skipped only by being
absent from the healthy list, so when that list changes the rotation continues from the
same counter over the new list (no catch-up, no attempt to keep the previous worker's
successor).

Why per model: one counter shared by different candidate lists locks into a pattern.
With workers A1, A2 (model a) and B1, B2 (model b) and requests alternating a, b, a, b,
a shared counter is even on a's turns and odd on b's, so A1 and B2 got everything.

Here the counters are per data-plane process (Rust's are per gateway, shared by its
threads). Each process starts every new rotation at its own offset (its index), so the
first requests of a burst spread over the workers instead of all going to the first one
in every process; in the long run every worker gets 1/len of the traffic either way.

The model key is what the client asked for (after aliasing); a client can name models
that wildcard workers serve, so the number of counters is capped at MAX_ROTATIONS and
names beyond it share one rotation (the pre-per-model behaviour, never unbounded memory).
"""

from __future__ import annotations

from collections.abc import Sequence

from smg.policies.base import LoadView, Policy, RouteRequest

MAX_ROTATIONS = 1024


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, start: int = 0) -> None:
        self._start = start
        self._counters: dict[str | None, int] = {}

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        counters = self._counters
        key = request.model
        n = counters.get(key)
        if n is None:
            if len(counters) >= MAX_ROTATIONS:
                key = None  # the shared rotation of model-less requests and overflow names
                n = counters.get(None, self._start)
            else:
                n = self._start
        counters[key] = n + 1
        return rows[n % len(rows)]
