"""cache_aware: the shared prefix index (pure), the policy's decisions over an in-memory
LoadView, the prompt-text extraction, and end to end through `smg launch` with two
data-plane processes sharing what they learn."""

from __future__ import annotations

import itertools
import random
import time
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
import xxhash

from smg.dataplane.app import _text_decoder, prompt_text
from smg.policies.base import BackendLoad, RouteRequest
from smg.policies.cache_aware import CacheAwarePolicy
from smg.policies.registry import make_policy
from smg.policies.shared import SharedRouting
from smg.shm.prefix import (
    BLOCK,
    GEN_MASK,
    WAYS,
    PrefixIndex,
    boundaries,
    chain,
    entries_for,
)
from tests import mockutil
from tests.gatewayutil import Gateway, pinned_clients, wait_until


class FakeView:
    """In-memory LoadView: in-flight counts, backend loads and row generations."""

    def __init__(self) -> None:
        self.flight: dict[int, int] = {}
        self.loads: dict[int, BackendLoad] = {}
        self.generations: dict[int, int] = {}

    def in_flight(self, row: int) -> int:
        return self.flight.get(row, 0)

    def backend_load(self, row: int) -> BackendLoad:
        return self.loads.get(row, BackendLoad())

    def generation(self, row: int) -> int:
        return self.generations.get(row, 1)


def policy(index: PrefixIndex | None = None, slot: int = 0, **kw: Any) -> CacheAwarePolicy:
    return CacheAwarePolicy(index, slot, rng=random.Random(7), **kw)


SYSTEM = "system: You are a careful assistant. " * 40  # ~1.5 KB shared prefix


# --- the index ---------------------------------------------------------------------------


def test_chain_is_stable_and_model_scoped() -> None:
    hashes, ends = chain("abc" * 400, "m")
    assert ends == boundaries(1200) == [64, 128, 192, 256, 320, 400, 500, 625, 781, 976, 1200]
    # Stable across processes and restarts: plain xxh3 with the previous hash as seed.
    seed = xxhash.xxh3_64_intdigest(b"m")
    assert hashes[0] == xxhash.xxh3_64_intdigest(("abc" * 400).encode()[:64], seed)
    assert chain("abc" * 400, "m") == (hashes, ends)
    assert chain("abc" * 400, "other")[0][0] != hashes[0]
    # A shared prefix shares its leading hashes; the first differing block differs.
    other, _ = chain("abc" * 300 + "x" * 300, "m")
    assert other[:9] == hashes[:9] and other[9] != hashes[9]  # they differ from byte 900
    assert chain("", "m") == ([], [])


def test_boundaries_bound_the_block_count() -> None:
    assert boundaries(10) == [10]
    assert boundaries(64) == [64]
    assert len(boundaries(8192)) == 26
    # Each block at most a quarter of what precedes it (past the first 64-byte blocks).
    ends = boundaries(32768)
    assert all(b - a <= max(64, a // 4) for a, b in itertools.pairwise(ends))
    assert all(b - a <= BLOCK for a, b in itertools.pairwise(ends))


def test_insert_then_longest_and_owners_across_regions() -> None:
    index = PrefixIndex.create(3, 1024, anonymous=False)
    first, _ = chain(SYSTEM + "question one", None)
    index.insert(0, first, row=5, generation=9)
    second, _ = chain(SYSTEM + "another question entirely", None)
    matched = index.longest(second)
    assert 0 < matched < len(second)
    assert second[:matched] == first[:matched]
    assert index.owners(second[matched - 1]) == [(5, 9 & GEN_MASK)]
    # Region 2 writes the same prefix for another worker: a reader sees both owners.
    index.insert(2, first, row=6, generation=1)
    assert sorted(index.owners(first[-1])) == [(5, 9), (6, 1)]
    assert index.longest(first) == len(first)
    assert index.size(0) == len(first) and index.size() == 2 * len(first)


def test_longest_finds_every_prefix_length() -> None:
    hashes, _ = chain("".join(chr(97 + i % 26) for i in range(9000)), "m")
    for known in (0, 1, 2, 5, len(hashes) - 2, len(hashes) - 1, len(hashes)):
        index = PrefixIndex.create(2, 1024, anonymous=False)
        index.insert(1, hashes[:known], row=3, generation=1)
        assert index.longest(hashes) == known, known


def test_full_bucket_replaces_its_least_recently_used_entry() -> None:
    index = PrefixIndex.create(1, 1024, anonymous=False)
    # Keys that all land in bucket 0 (the bucket is (key >> 7) & mask).
    keys = [(i + 1) * (index.buckets << 7) for i in range(WAYS + 1)]
    for i, key in enumerate(keys[:WAYS]):
        index.insert(0, [key], row=i, generation=0)
        # Age the entry so the first one is the oldest.
        base = 0
        slot_i = index.words[base:WAYS].tolist().index(key)
        index.words[base + WAYS + slot_i] = index.words[base + WAYS + slot_i] - ((WAYS - i) << 32)
    index.insert(0, [keys[WAYS]], row=99, generation=0)
    assert not index.contains(keys[0])  # the oldest was forgotten
    assert all(index.contains(key) for key in keys[1:])
    assert index.size() == WAYS  # bounded: the bucket never grows


def test_sweep_drops_stale_rows_and_old_entries() -> None:
    index = PrefixIndex.create(1, 1024, anonymous=False)
    a, _ = chain("a" * 700, None)
    b, _ = chain("b" * 700, None)
    index.insert(0, a, row=1, generation=1)
    index.insert(0, b, row=2, generation=1)
    # Row 2 was replaced (generation 2 now): its entries go; row 1's stay.
    wrapped = False
    for _ in range(index.buckets):
        wrapped = index.evict_step(0, 16, ttl_ticks=10**6, stale=lambda row, gen: row == 2)
        if wrapped:
            break
    assert wrapped
    assert index.longest(a) == len(a) and index.longest(b) == 0
    # ttl 0 after time passes: everything goes.
    time.sleep(0.15)
    while not index.evict_step(0, 64, ttl_ticks=0):
        pass
    assert index.size() == 0


def test_capacity_follows_max_tree_size() -> None:
    assert entries_for(67108864) == 131072  # 64 Mi chars / 512-byte blocks
    assert entries_for(1000) == 1024  # floor
    assert entries_for(10**12) == 1 << 20  # ceiling
    shared = SharedRouting.create(SimpleNamespace(policy="cache_aware", max_tree_size=2**20), 3)
    assert shared.prefix_index is not None and shared.prefix_index.entries == 2048
    # Made whatever --policy says (a worker label or a reload may ask for cache_aware later);
    # untouched pages of the anonymous mapping cost nothing.
    assert SharedRouting.create(SimpleNamespace(policy="round_robin"), 3).prefix_index is not None


# --- decisions ---------------------------------------------------------------------------


def test_same_prefix_sticks_and_miss_goes_to_least_loaded() -> None:
    view = FakeView()
    pol = policy()
    rows = [0, 1, 2, 3]
    view.flight = {0: 3, 1: 3, 2: 0, 3: 3}
    first = pol.select(rows, view, RouteRequest(text=SYSTEM + "q1"))
    assert first == 2  # a miss: the least-loaded worker
    view.flight = {0: 0, 1: 0, 2: 2, 3: 0}
    # The same prefix (~99% of the prompt) goes back to its owner though it is busier.
    assert pol.select(rows, view, RouteRequest(text=SYSTEM + "q2")) == 2
    # A new prefix: a miss, the least loaded (ties among 0, 1, 3).
    assert pol.select(rows, view, RouteRequest(text="z" * 2000)) in (0, 1, 3)
    # No text at all: least loaded.
    view.flight = {0: 1, 1: 0, 2: 1, 3: 1}
    assert pol.select(rows, view, RouteRequest()) == 1


def test_token_ids_are_hashed_when_present() -> None:
    """gRPC mode: the prompt's token ids (array("I") bytes) are the prefix, not the text."""
    from array import array

    view = FakeView()
    pol = policy()
    rows = [0, 1, 2, 3]
    shared = list(range(1000, 1400))  # 400 tokens = 1600 bytes of shared prefix
    view.flight = {0: 3, 1: 3, 2: 0, 3: 3}
    first = RouteRequest(text="unrelated a", token_ids=array("I", [*shared, 1]).tobytes())
    assert pol.select(rows, view, first) == 2
    view.flight = {0: 0, 1: 0, 2: 2, 3: 0}
    # Same token prefix, different text: back to the owner of the tokens.
    again = RouteRequest(text="unrelated b", token_ids=array("I", [*shared, 2]).tobytes())
    assert pol.select(rows, view, again) == 2
    # Same text as the first request but other tokens: a miss (least loaded, not 2).
    other = RouteRequest(text="unrelated a", token_ids=array("I", [7] * 401).tobytes())
    assert pol.select(rows, view, other) in (0, 1, 3)
    # The index holds the token bytes' chain, not the text's.
    hashes, _ends = chain(array("I", [*shared, 1]).tobytes(), None)
    assert pol.index.longest(hashes) == len(hashes)
    assert pol.index.longest(chain("unrelated a", None)[0]) == 0


def test_below_threshold_is_a_miss() -> None:
    view = FakeView()
    pol = policy(cache_threshold=0.5)
    rows = [0, 1]
    view.flight = {0: 0, 1: 5}
    assert pol.select(rows, view, RouteRequest(text="p" * 600)) == 0
    view.flight = {0: 5, 1: 0}
    # 500 of 1400 bytes match (36% < 50%): the least-loaded worker, not the owner.
    assert pol.select(rows, view, RouteRequest(text="p" * 600 + "q" * 800)) == 1
    # The same request at threshold 0.3 would have stuck.
    pol.cache_threshold = 0.3
    assert pol.select(rows, view, RouteRequest(text="p" * 600 + "r" * 800)) in (0, 1)
    assert pol.select(rows, view, RouteRequest(text="p" * 600 + "q" * 800)) == 1


def test_spill_gate_sends_an_overloaded_owner_elsewhere() -> None:
    view = FakeView()
    pol = policy(balance_abs_threshold=64, balance_rel_threshold=1.5)
    rows = [0, 1, 2, 3]
    assert pol.select(rows, view, RouteRequest(text=SYSTEM)) in rows
    owner = pol.select(rows, view, RouteRequest(text=SYSTEM))
    others = [r for r in rows if r != owner]
    # mean 3, owner 9: 9 > 3 + max(2*sqrt(3), 4) = 7 and 9 > 4.5 -> spill.
    view.flight = {owner: 9, **{r: 1 for r in others}}
    assert pol.spills(9, 3.0) and not pol.spills(6, 3.0)
    assert pol.select(rows, view, RouteRequest(text=SYSTEM)) in others
    # Under the gate (owner 6, mean 2.25: 6 < 2.25 + 4): affinity holds.
    view.flight = {owner: 6, **{r: 1 for r in others}}
    # (the spill above made a new owner of the whole prompt; use a fresh policy)
    fresh = policy()
    view.flight = {r: 0 for r in rows}
    first = fresh.select(rows, view, RouteRequest(text="k" * 3000))
    view.flight = {first: 6, **{r: 1 for r in rows if r != first}}
    assert fresh.select(rows, view, RouteRequest(text="k" * 3000)) == first
    # The margin is capped by --balance-abs-threshold when that is lower.
    low = policy(balance_abs_threshold=1, balance_rel_threshold=1.0)
    assert low.spills(3, 1.5) and not low.spills(2, 1.5)


def test_token_usage_gates() -> None:
    view = FakeView()
    pol = policy(balance_token_usage_threshold=0.3, overload_token_usage_threshold=0.9)
    rows = [0, 1]
    owner = pol.select(rows, view, RouteRequest(text=SYSTEM))
    other = 1 - owner
    view.flight = {owner: 2, other: 1}  # busier, under the spill gate
    view.loads = {
        owner: BackendLoad(token_usage=0.8, valid=True),
        other: BackendLoad(token_usage=0.2, valid=True),
    }
    assert pol.select(rows, view, RouteRequest(text=SYSTEM)) == other  # spread 0.6 > 0.3
    pol2 = policy(overload_token_usage_threshold=0.9)
    owner = pol2.select(rows, view, RouteRequest(text="o" * 2000))
    other = 1 - owner
    view.flight = {owner: 2, other: 1}  # busier, under the spill gate
    view.loads = {
        owner: BackendLoad(token_usage=0.95, valid=True),
        other: BackendLoad(token_usage=0.9, valid=True),
    }
    assert pol2.select(rows, view, RouteRequest(text="o" * 2000)) == other  # ceiling
    # The spill made `other` the prompt's owner (Rust inserts on both paths): under the
    # ceiling again, affinity follows it even though it is now the busier one.
    view.flight = {owner: 1, other: 2}
    view.loads = {r: BackendLoad(token_usage=0.5, valid=True) for r in rows}
    assert pol2.select(rows, view, RouteRequest(text="o" * 2000)) == other


def test_load_is_the_gateway_in_flight_count() -> None:
    view = FakeView()
    pol = policy()
    view.flight = {0: 1, 1: 2}
    # A backend reporting a long queue does not move the choice: in-flight decides.
    view.loads = {0: BackendLoad(running=5, waiting=2, valid=True)}
    assert pol.select([0, 1], view, RouteRequest()) == 0


def test_replaced_or_removed_worker_never_matches() -> None:
    view = FakeView()
    pol = policy()
    rows = [0, 1, 2]
    owner = pol.select(rows, view, RouteRequest(text=SYSTEM))
    # Removed: not among the routable rows, so not chosen (and the others are candidates).
    rest = [r for r in rows if r != owner]
    assert pol.select(rest, view, RouteRequest(text=SYSTEM)) in rest
    # Replaced: the row holds another worker (generation moved); busier than the rest so a
    # match could only come from the stale entry.
    other = policy(PrefixIndex.create(1, 1024, anonymous=False))
    first = other.select(rows, view, RouteRequest(text=SYSTEM))
    view.flight = {r: (1 if r == first else 0) for r in rows}
    assert other.select(rows, view, RouteRequest(text=SYSTEM)) == first  # still its owner
    view.generations[first] = 2
    for _ in range(10):
        assert other.select(rows, view, RouteRequest(text=SYSTEM)) != first


def test_large_pool_samples_and_always_includes_owners() -> None:
    view = FakeView()
    pol = policy()
    rows = list(range(1000))
    view.flight = {r: 5 for r in rows}
    view.flight[777] = 0
    owner = pol.select(rows, view, RouteRequest(text=SYSTEM))
    view.flight = {r: 0 for r in rows}
    view.flight[owner] = 3  # busier than the others, but under the spill gate
    for _ in range(50):
        assert pol.select(rows, view, RouteRequest(text=SYSTEM + "more")) == owner


def test_two_processes_share_what_they_learn() -> None:
    index = PrefixIndex.create(2, 4096, anonymous=False)
    a = policy(index, slot=0)
    b = CacheAwarePolicy(index, 1, rng=random.Random(99))
    view = FakeView()
    rows = list(range(8))
    for i in range(20):
        text = f"tenant {i}: " + SYSTEM
        chosen = a.select(rows, view, RouteRequest(text=text + "first"))
        assert b.select(rows, view, RouteRequest(text=text + "second")) == chosen


def test_make_policy_attaches_the_shared_index() -> None:
    cfg = SimpleNamespace(policy="cache_aware", max_tree_size=2**20)
    shared = SharedRouting.create(cfg, 3)
    shared.slot = 2
    pol = make_policy("cache_aware", cfg, shared=shared)
    assert isinstance(pol, CacheAwarePolicy) and pol.needs_text
    assert pol.index is shared.prefix_index and pol.slot == 2
    alone = make_policy("cache_aware", cfg)
    assert isinstance(alone, CacheAwarePolicy) and alone.index is not shared.prefix_index


# --- prompt text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
            "system: S\nuser: Q\n",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"t": 1}]}]},
            "user: a\n",
        ),
        ({"prompt": "hello"}, "hello"),
        ({"prompt": ["a", "b"]}, "ab"),
        ({"prompt": [1, 2, 3]}, None),
        ({"input": "embed me"}, "embed me"),
        ({"input": [{"role": "user", "content": "r"}]}, "r"),
        ({"model": "m"}, None),
    ],
)
def test_prompt_text(body: dict[str, Any], text: str | None) -> None:
    assert prompt_text(_text_decoder.decode(msgspec.json.encode(body))) == text


# --- end to end ------------------------------------------------------------------------------


def _chat(client: httpx.Client, text: str) -> tuple[int, str]:
    body = {
        "model": "mock-model",
        "messages": [{"role": "system", "content": text}, {"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    answer = client.post("/v1/chat/completions", json=body)
    return answer.status_code, answer.headers.get("x-smg-process", "")


def test_e2e_prefix_routed_by_one_process_steers_the_other() -> None:
    with mockutil.start_mock_workers(4, "--model", "mock-model") as mocks:
        gw = Gateway(
            [
                "--worker-urls",
                *mocks.urls,
                "--policy",
                "cache_aware",
                "--health-check-interval-secs",
                "1",
            ],
            processes=2,
        )
        gw.start()
        try:

            def all_healthy() -> bool:
                listed = gw.admin("GET", "/workers").json()["workers"]
                return len(listed) == 4 and all(w["is_healthy"] for w in listed)

            wait_until(all_healthy, 15, "four healthy workers")
            with pinned_clients(gw.url, 1) as pinned:  # a connection on each process
                conns = {process: clients[0] for process, clients in pinned.items()}

                def counts() -> list[int]:
                    return [mockutil.stats(url)["inference_answered"] for url in mocks.urls]

                for i in range(8):
                    first, second = ("0", "1") if i % 2 == 0 else ("1", "0")
                    prefix = f"conversation {i} " + SYSTEM
                    before = counts()
                    status, served_by = _chat(conns[first], prefix + "turn one")
                    answered = time.monotonic()
                    assert (status, served_by) == (200, first)
                    # Straight away, on a connection the other process serves.
                    sent_gap = time.monotonic() - answered
                    status, served_by = _chat(conns[second], prefix + "turn two")
                    assert (status, served_by) == (200, second)
                    assert sent_gap < 0.05
                    after = counts()
                    # Both turns on one worker: the second process routed on what the first
                    # wrote (the index write precedes the first request's forward).
                    deltas = sorted(b - a for a, b in zip(before, after, strict=True))
                    assert deltas == [0, 0, 0, 2], f"prefix {i}: {before} -> {after}"
        finally:
            gw.stop()
            gw.close_log()
