"""`consistent_hashing`: the same routing key always reaches the same worker.

Rust source: model_gateway/src/policies/consistent_hashing.rs (lightseekorg/smg). A hash
ring with virtual nodes, placed by hash(worker URL): a key hashes onto the ring and walks
clockwise to the first routable worker, so when a worker joins or leaves only the keys
of its arc move (~1/N). Key order: X-SMG-Routing-Key (then --routing-key-headers), else
the implicit session key (authorization, x-forwarded-for, cookie), else a random worker.

The ring is placed by URL with xxh3-64, so every process and every restart builds the
same ring from the same workers. It holds every registered worker (rebuilt on
`on_directory`); a lookup skips the ones not in `rows` (not routable, or not serving
the request's model).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Collection, Iterable, Sequence

import xxhash

from smg.policies.base import LoadView, Policy, RouteRequest

VIRTUAL_NODES = 160  # per worker: spreads each worker's share to within a few percent


def ring_hash(data: str) -> int:
    return xxhash.xxh3_64_intdigest(data.encode("utf-8", "surrogatepass"))


class HashRing:
    """Points on a 64-bit circle, each owned by a worker (row)."""

    __slots__ = ("owners", "points")

    def __init__(self, workers: Iterable[tuple[int, str]], vnodes: int = VIRTUAL_NODES) -> None:
        placed: list[tuple[int, int]] = []
        for row, url in workers:
            for v in range(vnodes):
                placed.append((ring_hash(f"{url}#{v}"), row))
        placed.sort()
        self.points = [point for point, _row in placed]
        self.owners = [row for _point, row in placed]

    def walk(self, position: int) -> Iterable[int]:
        """Rows clockwise from `position`, each once."""
        points = self.points
        if not points:
            return
        owners = self.owners
        n = len(points)
        start = bisect.bisect_left(points, position)
        seen: set[int] = set()
        for i in range(n):
            row = owners[(start + i) % n]
            if row not in seen:
                seen.add(row)
                yield row

    def find(self, position: int, allowed: Collection[int]) -> int | None:
        """The first row clockwise from `position` that is in `allowed`."""
        points = self.points
        if not points:
            return None
        owners = self.owners
        n = len(points)
        start = bisect.bisect_left(points, position)
        # Fast path: the owner of the first point (all workers routable).
        row = owners[start % n]
        if row in allowed:
            return row
        for row in self.walk(position):
            if row in allowed:
                return row
        return None


class ConsistentHashingPolicy(Policy):
    name = "consistent_hashing"
    uses_routing_key = True
    implicit_key = True

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng if rng is not None else random.Random()).random
        self.ring = HashRing(())

    def on_directory(self, workers: dict[int, tuple[int, str]]) -> None:
        self.ring = HashRing((row, url) for row, (_gen, url) in workers.items())

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        key = request.routing_key
        if key is not None:
            row = self.ring.find(ring_hash(key), rows if len(rows) < 8 else set(rows))
            if row is not None:
                return row
        # No key (an anonymous client), or the ring does not know these rows yet.
        return rows[int(self._random() * len(rows))]
