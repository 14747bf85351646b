"""`round_robin`: rotate through the routable workers.

Rust source: model_gateway/src/policies/round_robin.rs. One counter per policy instance,
incremented on every selection; the pick is `healthy[count % healthy.len()]`. Unhealthy
workers are skipped only by being absent from the healthy list, so when that list
changes the rotation continues from the same counter over the new list (no catch-up, no
attempt to keep the previous worker's successor).

Here the counter is per data-plane process (Rust's is per gateway, shared by its
threads); N processes each rotating independently still give every worker 1/len of
the traffic in the long run.
"""

from __future__ import annotations

from collections.abc import Sequence

from smg.policies.base import LoadView, Policy, RouteRequest


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        n = self._next
        self._next = n + 1
        return rows[n % len(rows)]

    def reset(self) -> None:
        """Restart the rotation at the first row (Rust's `reset`)."""
        self._next = 0
