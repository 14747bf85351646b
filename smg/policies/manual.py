"""`manual` and --routing-key-override: sticky routing keys, pinned in shared memory.

Rust source: model_gateway/src/policies/manual.rs (lightseekorg/smg). A request with a
routing key (X-SMG-Routing-Key, then --routing-key-headers) goes to the worker the key
is pinned to; a new key is pinned by --assignment-mode:

    random     a random routable worker (manual's default)
    min_load   the fewest requests in flight (ties: random)
    min_group  the fewest pinned keys (ties: random)
    delegate   whatever the underlying policy picks (--routing-key-override's default;
               for manual, whose underlying policy is random, the same as random)

When the pinned worker is no longer routable (removed, unhealthy, breaker open,
overloaded) the key is re-pinned by the same mode (failover). Keys idle for longer than
--max-idle-secs are forgotten. A request without a key is routed by the mode (manual)
or by the underlying policy (override), unpinned.

Pins live in the shared `KeyTable` (smg/shm/keytable.py), so a key pinned by one
data-plane process sticks in all of them. min_group counts the keys this process
pinned or adopted (a per-process view of the shared table).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from smg.policies.base import LoadView, Policy, RouteRequest
from smg.shm.keytable import KeyTable, key_hash

if TYPE_CHECKING:
    from smg.policies.shared import SharedRouting

MODES = ("random", "min_load", "min_group", "delegate")
# A process trusts its own recent view of a key this long before it reads the shared
# table again (all regions) and refreshes its last-used stamp there: a pin made or moved
# by another process is seen within this delay (the data plane re-reads the fleet at the
# same cadence), and a repeated key costs a dict lookup instead of a table probe.
RECHECK_NS = 250_000_000
LOCAL_CAP = 65536  # keys remembered per process; the memo is dropped when it is full


class StickyPolicy(Policy):
    uses_routing_key = True

    def __init__(
        self,
        inner: Policy | None,
        mode: str,
        keys: KeyTable | None,
        region: int,
        max_idle_secs: float,
        rng: random.Random | None = None,
        name: str = "manual",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"assignment mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.name = name
        self.inner = inner
        self.mode = mode
        self.keys = keys if keys is not None else KeyTable.local()
        self.region = region
        self.max_idle = int(max_idle_secs * 1e9)
        self._random = (rng if rng is not None else random.Random()).random
        self.generations: dict[int, int] = {}  # row -> the low 32 bits of its generation
        self.group: dict[int, int] = {}  # row -> keys this process pinned there
        # key -> (row, generation, when this process last read or wrote its pin)
        self.recent: dict[str, tuple[int, int, int]] = {}
        self.needs_backend_loads = bool(inner and inner.needs_backend_loads)
        self.needs_text = bool(inner and inner.needs_text)
        self.clock = time.monotonic_ns  # one clock for every process (CLOCK_MONOTONIC)

    def use_shared(self, shared: SharedRouting) -> None:
        """Pin in the gateway's shared table, writing this process's region."""
        if shared.sticky_keys is not None:
            self.keys = shared.sticky_keys
            self.region = shared.slot
        use_shared = getattr(self.inner, "use_shared", None)
        if use_shared is not None:
            use_shared(shared)

    def on_directory(self, workers: dict[int, tuple[int, str]]) -> None:
        self.generations = {row: gen & 0xFFFFFFFF for row, (gen, _url) in workers.items()}
        self.group = {row: n for row, n in self.group.items() if row in workers}
        if self.inner is not None:
            self.inner.on_directory(workers)

    def on_dispatch(self, row: int) -> None:
        if self.inner is not None:
            self.inner.on_dispatch(row)

    def on_complete(self, row: int) -> None:
        if self.inner is not None:
            self.inner.on_complete(row)

    def _assign(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        mode = self.mode
        if mode == "min_load":
            return self._min_by(rows, view.in_flight)
        if mode == "min_group":
            group = self.group
            return self._min_by(rows, lambda row: group.get(row, 0))
        if mode == "delegate" and self.inner is not None:
            return self.inner.select(rows, view, request)
        return rows[int(self._random() * len(rows))]

    def _min_by(self, rows: Sequence[int], value: object) -> int:
        best: list[int] = []
        low = None
        for row in rows:
            v = value(row)  # type: ignore[operator]
            if low is None or v < low:
                low, best = v, [row]
            elif v == low:
                best.append(row)
        return best[0] if len(best) == 1 else best[int(self._random() * len(best))]

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        key = request.routing_key
        if key is None:
            if self.inner is not None:
                return self.inner.select(rows, view, request)
            return self._assign(rows, view, request)
        now = self.clock()
        recent = self.recent.get(key)
        if recent is not None and now - recent[2] < RECHECK_NS:
            row = recent[0]
            if row in rows and self.generations.get(row) == recent[1]:
                return row
        h = key_hash(key)
        keys = self.keys
        pin = keys.lookup(h, now, self.max_idle)
        if pin is not None:
            row = pin.row
            if row in rows and self.generations.get(row) == pin.generation:
                if pin.region == self.region:
                    keys.touch(self.region, h, now)
                else:
                    # Adopt another process's pin: the same pin, our own last-used stamp.
                    keys.put(
                        self.region, h, row, pin.generation, pin.epoch, pin.pinned, now,
                        self.max_idle,
                    )  # fmt: skip
                self._remember(key, row, pin.generation, now)
                return row
            if request.retry and self.generations.get(row) == pin.generation:
                # A retry after a failed attempt: another worker this once; the pin stays
                # (it moves when the worker stops being routable: unhealthy, breaker open).
                return self._assign(rows, view, request)
            epoch = pin.epoch + 1  # failover: the new pin beats the old everywhere
        else:
            epoch = 0
        row = self._assign(rows, view, request)
        generation = self.generations.get(row, 0)
        keys.put(self.region, h, row, generation, epoch, now, now, self.max_idle)
        self.group[row] = self.group.get(row, 0) + 1
        self._remember(key, row, generation, now)
        return row

    def _remember(self, key: str, row: int, generation: int, now: int) -> None:
        recent = self.recent
        if len(recent) >= LOCAL_CAP and key not in recent:
            recent.clear()
        recent[key] = (row, generation, now)
