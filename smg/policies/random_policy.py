"""`random`: a uniformly random routable worker.

Rust source: model_gateway/src/policies/random.rs (lightseekorg/smg, smg-project/smg main):
`healthy[rng.random_range(0..healthy.len())]`. Here `rows` already holds only routable
workers, so the healthy filter is the caller's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from smg.policies.base import LoadView, Policy, RouteRequest


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        # A process that forks after building the policy must pass its own Random, or
        # every child replays the parent's sequence.
        self._random = (rng if rng is not None else random.Random()).random

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        # int(random() * n) instead of randrange(n): one C call; its bias is below n / 2**53.
        return rows[int(self._random() * len(rows))]
