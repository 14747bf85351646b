"""`cache_aware`: send a request to the worker that already holds its prompt's prefix.

Rust source: model_gateway/src/policies/cache_aware.rs (lightseekorg/smg; the HTTP path,
``select_worker_with_text``) and the 1.13 ``smg launch --help`` texts of the flags, which
describe the 1.13 spill gate (the public source still has the older min/max gate).

Decision, for a request with prompt text (HTTP: see DataPlane.proxy's extraction) or, in
gRPC mode, the prompt's token ids (`RouteRequest.token_ids`, hashed as bytes the same way):

1. match = the longest prefix of the prompt some process routed before (the shared
   index, smg.shm.prefix; block granular), ``rate = matched bytes / prompt bytes``.
   Owners are the workers that index names for that prefix, if still routable and of
   the same generation (a replaced or removed worker never matches).
2. ``rate >= --cache-threshold`` and an owner exists: the least-loaded owner, unless
   - the spill gate: its load > mean + margin AND > mean * --balance-rel-threshold,
     where mean is the candidates' mean load and margin = --balance-abs-threshold capped
     at the in-flight count's natural swing at that mean (2 * sqrt(mean), never under
     min(4, --balance-abs-threshold)) as the 1.13 help says, so a small pool can spill;
   - the token-usage gates (backends that report token_usage): the spread hottest -
     coldest > --balance-token-usage-threshold, or the owner's usage >
     --overload-token-usage-threshold; each is off at >= 1.0 (its default).
   Then, or on a miss (rate below the threshold, no owner, no text): the least-loaded
   candidate (never "the smallest tree"), ties broken uniformly at random so an idle
   fleet does not send every new prefix to the first worker.
3. The chosen worker becomes the owner of every block of the prompt in this process's
   region of the index (misses and spills too, as Rust inserts on both paths).

Load = the gateway-wide in-flight count (all processes, summed from the table), as Rust's
cache_aware uses ``worker.load()`` (the gateway's in-flight count). The backend's reported
running/waiting is not added: it counts the same requests again, is up to one poll old,
and reading it for every candidate costs about 2 us a worker in Python (half the 50 us
decision budget at 8 candidates). Backend loads are read only by the token-usage gates,
and only when one is enabled and an owner is about to be chosen.

Candidates: every row up to SAMPLE_ALL rows; above that SAMPLE random rows plus the prefix
owners, so a decision's cost does not grow with the fleet (mean and least-loaded are
then the sample's).

Differences from Rust: the match is block granular (BLOCK bytes of UTF-8) rather than per
character; ``>=`` the threshold (the help's "minimum share"; the public source has ``>``);
--max-tree-size bounds one index shared by all models, per process region (see
smg.shm.prefix); a worker's tree is not pre-seeded with "" (an empty prompt is a miss).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

from smg.policies.base import LoadView, Policy, RouteRequest
from smg.shm.prefix import (
    GEN_MASK,
    ROW_BITS,
    ROW_MASK,
    TICKS_PER_SEC,
    TIME_SHIFT,
    PrefixIndex,
    chain,
    now_ticks,
    row_generation_reader,
)

DEFAULT_CACHE_THRESHOLD = 0.3
DEFAULT_BALANCE_ABS = 64
DEFAULT_BALANCE_REL = 1.5
DEFAULT_EVICTION_INTERVAL = 60
SAMPLE_ALL = 16  # pools up to this size are scanned whole
SAMPLE = 8  # random candidates drawn from a larger pool (plus the owners)
SWEEP_BUCKETS = 16  # index buckets swept per decision while a sweep is due
REFRESH_TICKS = TICKS_PER_SEC  # rewrite a repeated prompt's chain at most once a second
TTL_INTERVALS = 10  # an entry unused for this many eviction intervals is dropped


class CacheAwarePolicy(Policy):
    name = "cache_aware"
    needs_text = True

    def __init__(
        self,
        index: PrefixIndex | None,
        slot: int = 0,
        *,
        cache_threshold: float = DEFAULT_CACHE_THRESHOLD,
        balance_abs_threshold: int = DEFAULT_BALANCE_ABS,
        balance_rel_threshold: float = DEFAULT_BALANCE_REL,
        balance_token_usage_threshold: float = 1.0,
        overload_token_usage_threshold: float = 1.0,
        eviction_interval_secs: int = DEFAULT_EVICTION_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        # Without a shared index (tests, a policy built outside a gateway) the policy keeps
        # a private one: affinity then holds within this process only.
        self.index = index if index is not None else PrefixIndex.create(1, 1 << 14)
        self.slot = slot if index is not None else 0
        self.cache_threshold = float(cache_threshold)
        self.balance_abs = int(balance_abs_threshold)
        self.balance_rel = float(balance_rel_threshold)
        self.spread_limit = float(balance_token_usage_threshold)
        self.overload_limit = float(overload_token_usage_threshold)
        self.token_gates = self.spread_limit < 1.0 or self.overload_limit < 1.0
        self.eviction_interval = float(eviction_interval_secs)
        self.ttl_ticks = int(TTL_INTERVALS * self.eviction_interval * TICKS_PER_SEC)
        self._next_sweep = time.monotonic() + self.eviction_interval
        self._sweeping = False
        rng = rng if rng is not None else random.Random()
        self._random = rng.random
        self._rows_seen: Sequence[int] | None = None
        self._row_set: frozenset[int] = frozenset()
        self._view_seen: LoadView | None = None
        self._generation: Callable[[int], int] = _no_generation

    def use_shared(self, shared: object) -> None:
        """Route with the gateway's shared index (make_policy calls this)."""
        index = getattr(shared, "prefix_index", None)
        if index is not None:
            self.index = index
            self.slot = int(getattr(shared, "slot", 0))

    # --- helpers -----------------------------------------------------------------------------

    def _bind_view(self, view: LoadView) -> None:
        self._view_seen = view
        table = getattr(view, "table", None)
        if table is not None:
            self._generation = row_generation_reader(table)
        else:
            self._generation = getattr(view, "generation", _no_generation)

    def _least_loaded(self, candidates: Sequence[int], loads: list[int]) -> int:
        best = 0
        best_load = loads[0]
        tied = 1
        rnd = self._random
        for i in range(1, len(loads)):
            load = loads[i]
            if load < best_load:
                best, best_load, tied = i, load, 1
            elif load == best_load:
                tied += 1
                if rnd() * tied < 1.0:
                    best = i
        return candidates[best]

    def spills(self, load: int, mean: float) -> bool:
        """The 1.13 spill gate for an owner with `load` in a pool of mean load `mean`."""
        margin = min(self.balance_abs, max(2.0 * math.sqrt(mean), min(4, self.balance_abs)))
        return load > mean + margin and load > mean * self.balance_rel

    def _token_gate(self, view: LoadView, candidates: Sequence[int], owner: int) -> bool:
        usages = []
        owner_usage = -1.0
        for row in candidates:
            backend = view.backend_load(row)
            if backend.valid:
                usages.append(backend.token_usage)
                if row == owner:
                    owner_usage = backend.token_usage
        if not usages:
            return False
        if self.spread_limit < 1.0 and max(usages) - min(usages) > self.spread_limit:
            return True
        return self.overload_limit < 1.0 and owner_usage > self.overload_limit

    # --- the decision ---------------------------------------------------------------------------

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        if view is not self._view_seen:
            self._bind_view(view)
        index = self.index
        # gRPC mode: the prompt's token ids (4 bytes a token) when present, else the text.
        text: str | bytes | None = request.token_ids or request.text
        hashes: list[int] = []
        owners: list[int] = []
        rate = 0.0
        matched = 0
        if text:
            hashes, ends = chain(text, request.model)
            matched = index.longest(hashes)
            if matched:
                if rows is not self._rows_seen:
                    self._rows_seen = rows
                    self._row_set = frozenset(rows)
                row_set = self._row_set
                generation = self._generation
                for row, gen in index.owners(hashes[matched - 1]):
                    if row in row_set and gen == generation(row) & GEN_MASK and row not in owners:
                        owners.append(row)
                if owners:
                    rate = ends[matched - 1] / ends[-1]

        if len(rows) <= SAMPLE_ALL:
            candidates: Sequence[int] = rows
        else:
            # Draws with replacement (a repeat only narrows the sample): random.sample
            # costs ~5 us over a large pool, these eight draws ~1 us.
            rnd = self._random
            n = len(rows)
            sampled = [rows[int(rnd() * n)] for _ in range(SAMPLE)]
            candidates = sampled + [row for row in owners if row not in sampled]
        in_flight = view.in_flight
        loads = [in_flight(row) for row in candidates]

        chosen = -1
        if owners and rate >= self.cache_threshold:
            by_row = dict(zip(candidates, loads, strict=True))
            best = owners[0]
            best_load = by_row[best]
            for row in owners[1:]:
                if by_row[row] < best_load:
                    best, best_load = row, by_row[row]
            mean = sum(loads) / len(loads)
            if not self.spills(best_load, mean) and not (
                self.token_gates and self._token_gate(view, candidates, best)
            ):
                chosen = best
        if chosen < 0:
            chosen = self._least_loaded(candidates, loads)

        if hashes:
            generation = self._generation(chosen)
            # Blocks up to a prefix this process already gave the same worker within
            # REFRESH_TICKS are not written again (a chain is written whole, so they are
            # at least that fresh): a hit writes only its new tail, a repeat nothing.
            start = 0
            if matched:
                value = index.own_value(self.slot, hashes[matched - 1])
                if (
                    value
                    and value & ROW_MASK == chosen
                    and (value >> ROW_BITS) & GEN_MASK == generation & GEN_MASK
                    and (now_ticks() - (value >> TIME_SHIFT)) & 0xFFFFFFFF <= REFRESH_TICKS
                ):
                    start = matched
            if start < len(hashes):
                index.insert(self.slot, hashes[start:] if start else hashes, chosen, generation)
        self._maybe_sweep()
        return chosen

    def _maybe_sweep(self) -> None:
        """A slice of the periodic sweep of this process's region (see PrefixIndex)."""
        if not self._sweeping:
            if time.monotonic() < self._next_sweep:
                return
            self._sweeping = True
        generation = self._generation
        if generation is _no_generation:
            stale = None
        else:

            def stale(row: int, gen: int) -> bool:
                return generation(row) & GEN_MASK != gen

        if self.index.evict_step(self.slot, SWEEP_BUCKETS, self.ttl_ticks, stale):
            self._sweeping = False
            self._next_sweep = time.monotonic() + self.eviction_interval


def _no_generation(row: int) -> int:
    return 0
