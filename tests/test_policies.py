"""Routing policies (random, round_robin, power_of_two, least_load) and their registry.

Expected scores are worked out by hand in the comments from the Rust formulas:
    score = (queued + since_poll_tokens) / throughput + w * k / (1 - k)
with w = 0.15, mean prefill 1024 and default throughput 2000 unless a test says otherwise.
"""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import msgspec
import pytest

from smg.policies import (
    POLICY_NAMES,
    BackendLoad,
    NoEligibleWorker,
    RouteRequest,
    make_policy,
    needs_backend_loads,
)
from smg.policies.least_load import LeastLoadPolicy
from smg.policies.power_of_two import PowerOfTwoPolicy
from smg.policies.random_policy import RandomPolicy
from smg.policies.round_robin import MAX_ROTATIONS, RoundRobinPolicy

REQ = RouteRequest()
DARK = BackendLoad()


class FakeView:
    """In-memory LoadView that records which rows a policy read."""

    def __init__(
        self,
        in_flight: dict[int, int] | None = None,
        loads: dict[int, BackendLoad] | None = None,
    ) -> None:
        self.counts = dict(in_flight or {})
        self.loads = dict(loads or {})
        self.reads: list[int] = []

    def in_flight(self, row: int) -> int:
        self.reads.append(row)
        return self.counts.get(row, 0)

    def backend_load(self, row: int) -> BackendLoad:
        self.reads.append(row)
        return self.loads.get(row, DARK)


class NoReadView:
    def in_flight(self, row: int) -> int:
        raise AssertionError("policy read the in-flight count")

    def backend_load(self, row: int) -> BackendLoad:
        raise AssertionError("policy read the backend load")


def load(
    *,
    waiting_tokens: int = 0,
    usage: float = 0.0,
    tp: float = 0.0,
    waiting: int = 0,
    running: int = 0,
    poll: float = 1.0,
) -> BackendLoad:
    return BackendLoad(
        running=running,
        waiting=waiting,
        token_usage=usage,
        throughput=tp,
        valid=True,
        waiting_tokens=waiting_tokens,
        updated=poll,
    )


def picks(policy: object, rows: list[int], view: object, count: int, request=REQ) -> list[int]:
    return [policy.select(rows, view, request) for _ in range(count)]  # type: ignore[attr-defined]


# --- round_robin ---------------------------------------------------------------------


def test_round_robin_cycles_in_order_and_evenly() -> None:
    policy = RoundRobinPolicy()
    rows = [10, 11, 12]
    assert picks(policy, rows, NoReadView(), 7) == [10, 11, 12, 10, 11, 12, 10]
    counts = Counter(picks(policy, rows, NoReadView(), 299))  # 306 picks in all
    assert counts[10] + 3 == counts[11] + 2 == counts[12] + 2 == 102


def test_round_robin_keeps_counting_when_rows_change() -> None:
    # Rust: healthy[count % healthy.len()] with one counter; a removed worker just
    # leaves the list, and the rotation carries on over the new list.
    policy = RoundRobinPolicy()
    assert picks(policy, [0, 1, 2], NoReadView(), 2) == [0, 1]
    assert picks(policy, [0, 2], NoReadView(), 4) == [0, 2, 0, 2]  # counter 2..5
    assert picks(policy, [0, 1, 2, 3], NoReadView(), 4) == [2, 3, 0, 1]  # counter 6..9
    assert Counter(picks(policy, [5, 6, 7], NoReadView(), 300)) == {5: 100, 6: 100, 7: 100}


def test_round_robin_rotates_per_model() -> None:
    # Workers A1, A2 serve model a, B1, B2 model b; requests alternate a, b. One shared
    # counter gave A1 and B2 every request (20/0/0/20); one rotation per model is even.
    policy = RoundRobinPolicy()
    a, b = RouteRequest(model="a"), RouteRequest(model="b")
    got: Counter[int] = Counter()
    for _ in range(20):
        got[policy.select([0, 1], NoReadView(), a)] += 1
        got[policy.select([2, 3], NoReadView(), b)] += 1
    assert got == {0: 10, 1: 10, 2: 10, 3: 10}


def test_round_robin_rotations_are_bounded() -> None:
    # Client-chosen names (served by wildcard workers) cannot grow the counters without
    # bound: past MAX_ROTATIONS they share the rotation of model-less requests.
    policy = RoundRobinPolicy()
    for i in range(MAX_ROTATIONS + 50):
        policy.select([0, 1], NoReadView(), RouteRequest(model=f"m{i}"))
    assert len(policy._counters) == MAX_ROTATIONS + 1
    shared = [policy.select([0, 1], NoReadView(), RouteRequest(model=f"x{i}")) for i in range(4)]
    assert shared in ([0, 1, 0, 1], [1, 0, 1, 0])


def test_round_robin_starts_each_process_at_its_own_offset() -> None:
    # One request per process at the start of a burst: without an offset every process
    # sent its first request to row 10.
    first = [
        make_policy("round_robin", SimpleNamespace(), index=i).select(
            [10, 11, 12], NoReadView(), REQ
        )
        for i in range(4)
    ]
    assert first == [10, 11, 12, 10]


def test_round_robin_instances_are_independent() -> None:
    # Separate pools (e.g. prefill and decode) each get even coverage from their own counter.
    prefill, decode = RoundRobinPolicy(), RoundRobinPolicy()
    got_p: Counter[int] = Counter()
    got_d: Counter[int] = Counter()
    for _ in range(40):
        got_p[prefill.select([0, 1, 2, 3], NoReadView(), REQ)] += 1
        got_d[decode.select([4, 5, 6, 7], NoReadView(), REQ)] += 1
    assert got_p == {0: 10, 1: 10, 2: 10, 3: 10}
    assert got_d == {4: 10, 5: 10, 6: 10, 7: 10}


# --- random --------------------------------------------------------------------------


def test_random_is_uniform_with_a_seeded_rng() -> None:
    rows = [3, 9, 27, 81, 100, 101, 102, 103]
    counts = Counter(picks(RandomPolicy(random.Random(1234)), rows, NoReadView(), 8000))
    assert set(counts) == set(rows)
    assert all(850 <= c <= 1150 for c in counts.values()), counts


def test_random_is_reproducible_and_handles_one_row() -> None:
    rows = list(range(50))
    first = picks(RandomPolicy(random.Random(7)), rows, NoReadView(), 100)
    assert first == picks(RandomPolicy(random.Random(7)), rows, NoReadView(), 100)
    assert first != picks(RandomPolicy(random.Random(8)), rows, NoReadView(), 100)
    assert picks(RandomPolicy(random.Random(7)), [42], NoReadView(), 5) == [42] * 5


# --- power_of_two: sampling ----------------------------------------------------------


@pytest.mark.parametrize("metric", ["expected_wait", "requests", "least_requests"])
def test_power_of_two_reads_only_two_distinct_rows(metric: str) -> None:
    policy = PowerOfTwoPolicy(metric, random.Random(5))
    rows = [20, 21, 22, 23, 24, 25, 26, 27]
    view = FakeView(loads={r: load(waiting_tokens=100 * r, tp=100.0) for r in rows})
    pairs: Counter[frozenset[int]] = Counter()
    for _ in range(2800):
        view.reads.clear()
        chosen = policy.select(rows, view, REQ)
        read = set(view.reads)
        assert len(read) == 2 and chosen in read
        pairs[frozenset(read)] += 1
    # All 28 unordered pairs are sampled, each about 100 times.
    assert len(pairs) == 28
    assert all(60 <= c <= 140 for c in pairs.values()), pairs


def test_power_of_two_single_row_reads_nothing() -> None:
    for metric in ("expected_wait", "requests", "least_requests"):
        assert PowerOfTwoPolicy(metric, random.Random(1)).select([9], NoReadView(), REQ) == 9


def test_power_of_two_rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="expected_wait, requests or least_requests"):
        PowerOfTwoPolicy("tokens")


# --- power_of_two: expected_wait -----------------------------------------------------


def test_power_of_two_expected_wait_prefers_shorter_token_queue() -> None:
    # a: 8000/100 + 0.15*0.2/0.8 = 80.0375 s; b: 1000/100 + 0.0375 = 10.0375 s.
    view = FakeView(
        loads={
            0: load(waiting_tokens=8000, usage=0.2, tp=100.0),
            1: load(waiting_tokens=1000, usage=0.2, tp=100.0),
        }
    )
    assert picks(PowerOfTwoPolicy(rng=random.Random(3)), [0, 1], view, 1) == [1]


def test_power_of_two_expected_wait_credit_water_fills_and_resets_on_poll() -> None:
    policy = PowerOfTwoPolicy(rng=random.Random(3))
    view = FakeView(
        loads={
            0: load(waiting_tokens=1000, usage=0.2, tp=100.0),
            1: load(waiting_tokens=2000, usage=0.2, tp=100.0),
        }
    )
    # 1: a 10.0375 vs b 20.0375 -> a, credited 1024 tokens.
    # 2: a (1000+1024)/100 + 0.0375 = 20.2775 vs b 20.0375 -> b.
    # 3: a 20.2775 vs b (2000+1024)/100 + 0.0375 = 30.2775 -> a.
    assert picks(policy, [0, 1], view, 3) == [0, 1, 0]
    # A fresh poll (new `updated` stamps) restarts both tallies, so the same sequence
    # starts over; without the reset a (30.5175 s) would lose to b (30.2775 s).
    view.loads = {r: msgspec.structs.replace(v, updated=2.0) for r, v in view.loads.items()}
    assert picks(policy, [0, 1], view, 3) == [0, 1, 0]


def test_power_of_two_expected_wait_credits_known_prompt_tokens() -> None:
    # a: 0 + 0.0375 vs b: 2048/100 + 0.0375 = 20.5175 -> a, credited 2100 tokens
    # (not the 1024 mean): a becomes 21.0375 > 20.5175 -> b.
    policy = PowerOfTwoPolicy(rng=random.Random(3))
    view = FakeView(
        loads={
            0: load(waiting_tokens=0, usage=0.2, tp=100.0),
            1: load(waiting_tokens=2048, usage=0.2, tp=100.0),
        }
    )
    assert policy.select([0, 1], view, RouteRequest(prompt_tokens=2100)) == 0
    assert policy.select([0, 1], view, REQ) == 1


def test_power_of_two_expected_wait_estimates_queue_from_waiting_requests() -> None:
    # a reports 8 waiting but no tokens: 8*1024/100 = 81.92 s; b: 0 s.
    view = FakeView(loads={0: load(waiting=8, tp=100.0), 1: load(waiting=0, tp=100.0)})
    assert PowerOfTwoPolicy(rng=random.Random(3)).select([0, 1], view, REQ) == 1


def test_power_of_two_expected_wait_missing_load_in_time_units() -> None:
    # a: queue 0, KV 0.9, no throughput -> 0.15*0.9/0.1 = 1.35 s.
    # b: no load, 5 in flight -> 5*1024/2000 (no positive rate: default) = 2.56 s -> a.
    # With 2 in flight b is 1.024 s -> b, where comparing a raw count (2 > 1.35) would not.
    view = FakeView(in_flight={1: 5}, loads={0: load(usage=0.9, tp=0.0)})
    assert PowerOfTwoPolicy(rng=random.Random(3)).select([0, 1], view, REQ) == 0
    view.counts[1] = 2
    assert PowerOfTwoPolicy(rng=random.Random(3)).select([0, 1], view, REQ) == 1


def test_power_of_two_expected_wait_dark_pair_joins_shortest_queue() -> None:
    view = FakeView(in_flight={0: 5, 1: 3})
    assert PowerOfTwoPolicy(rng=random.Random(3)).select([0, 1], view, REQ) == 1


def test_power_of_two_never_picks_the_busiest_of_three() -> None:
    policy = PowerOfTwoPolicy(rng=random.Random(11))
    view = FakeView(in_flight={0: 10, 1: 5, 2: 0})
    counts = Counter(picks(policy, [0, 1, 2], view, 300))
    # Pairs {0,1}->1, {0,2}->2, {1,2}->2: w0 never wins, w2 wins about 2/3.
    assert counts[0] == 0 and counts[2] > counts[1] > 0


# --- power_of_two: requests / least_requests -----------------------------------------


def test_power_of_two_requests_compares_backend_requests_plus_dispatches() -> None:
    policy = PowerOfTwoPolicy("requests", random.Random(3))
    view = FakeView(
        in_flight={0: 0, 1: 50},  # ignored while both loads are valid
        loads={0: load(running=3, waiting=4), 1: load(running=5, waiting=0)},
    )
    # a 7 vs b 5 -> b (6 after credit) -> b (7 after credit); a 7 vs b 7 is a tie.
    assert picks(policy, [0, 1], view, 2) == [1, 1]
    # b's next poll restarts its tally: a 7 vs b 5 again.
    view.loads[1] = load(running=5, waiting=0, poll=2.0)
    assert policy.select([0, 1], view, REQ) == 1


def test_power_of_two_requests_falls_back_to_in_flight_for_both() -> None:
    # b has no load: both compare on in-flight (9 vs 2) even though a reports 0 requests.
    view = FakeView(in_flight={0: 9, 1: 2}, loads={0: load(running=0, waiting=0)})
    assert PowerOfTwoPolicy("requests", random.Random(3)).select([0, 1], view, REQ) == 1


def test_power_of_two_least_requests_uses_in_flight_only() -> None:
    view = FakeView(
        in_flight={0: 4, 1: 1},
        loads={0: load(running=0, waiting=0), 1: load(running=50, waiting=50)},
    )
    assert PowerOfTwoPolicy("least_requests", random.Random(3)).select([0, 1], view, REQ) == 1


def test_power_of_two_ties_split_evenly() -> None:
    view = FakeView(in_flight={0: 2, 1: 2})
    for metric in ("least_requests", "expected_wait"):
        counts = Counter(picks(PowerOfTwoPolicy(metric, random.Random(21)), [0, 1], view, 2000))
        assert 900 <= counts[0] <= 1100, (metric, counts)


# --- least_load ----------------------------------------------------------------------


def test_least_load_hand_computed_scores() -> None:
    policy = LeastLoadPolicy(rng=random.Random(1))
    view = FakeView(
        loads={
            # 4000/200 + 0.15*0.5/0.5 = 20.15 s
            0: load(waiting_tokens=4000, usage=0.5, tp=200.0),
            # 3 waiting, no token count, no rate: 3*1024/2000 = 1.536 s
            1: load(waiting=3, usage=0.0, tp=0.0),
            # 1000/1000 + 0.15*0.9/0.1 = 2.35 s
            2: load(waiting_tokens=1000, usage=0.9, tp=1000.0),
        }
    )
    # 1 -> 1 (+1024: 2.048 s) -> 1 (+1024: 2.56 s) -> 2 (+1024/1000: 3.374 s) -> 1 (2.56 s).
    assert picks(policy, [0, 1, 2], view, 4) == [1, 1, 2, 1]


def test_least_load_kv_pressure_weight_flag() -> None:
    # a: KV 0.98, empty queue: w*0.98/0.02 = 49w s; b: 5000/100 = 50 s, KV 0.
    view = FakeView(loads={0: load(usage=0.98, tp=100.0), 1: load(waiting_tokens=5000, tp=100.0)})
    assert LeastLoadPolicy(kv_pressure_weight=0.15).select([0, 1], view, REQ) == 0  # 7.35
    assert LeastLoadPolicy(kv_pressure_weight=2.0).select([0, 1], view, REQ) == 1  # 98


def test_least_load_default_throughput_flag() -> None:
    # a reports no rate: 3000/default; b: 1000/100 = 10 s.
    view = FakeView(
        loads={0: load(waiting_tokens=3000, tp=0.0), 1: load(waiting_tokens=1000, tp=100.0)}
    )
    assert LeastLoadPolicy(default_throughput=2000.0).select([0, 1], view, REQ) == 0  # 1.5 s
    assert LeastLoadPolicy(default_throughput=200.0).select([0, 1], view, REQ) == 1  # 15 s


def test_least_load_mean_prefill_tokens_flag() -> None:
    # a: 2 waiting, no token count -> 2*p/100; b: 1500/100 = 15 s.
    view = FakeView(loads={0: load(waiting=2, tp=100.0), 1: load(waiting_tokens=1500, tp=100.0)})
    assert LeastLoadPolicy(mean_prefill_tokens=1024).select([0, 1], view, REQ) == 1  # 20.48
    assert LeastLoadPolicy(mean_prefill_tokens=512).select([0, 1], view, REQ) == 0  # 10.24


def test_least_load_reported_queue_tokens_win_over_the_estimate() -> None:
    # a reports 10 waiting AND 500 queued tokens: 500/100 = 5 s (not 10*1024/100).
    view = FakeView(
        loads={
            0: load(waiting=10, waiting_tokens=500, tp=100.0),
            1: load(waiting_tokens=600, tp=100.0),
        }
    )
    assert LeastLoadPolicy().select([0, 1], view, REQ) == 0


def test_least_load_invalid_loads_fall_back_to_in_flight() -> None:
    view = FakeView(in_flight={0: 5, 1: 0, 2: 3})
    assert LeastLoadPolicy().select([0, 1, 2], view, REQ) == 1
    # No tally is credited on the in-flight path, so the pick only follows in-flight.
    assert picks(LeastLoadPolicy(), [0, 1, 2], view, 3) == [1, 1, 1]
    view.counts[1] = 4
    assert LeastLoadPolicy().select([0, 1, 2], view, REQ) == 2


def test_least_load_missing_load_scored_as_drain_time_at_candidate_nominal_rate() -> None:
    # b has no load and 5 in flight; a reports 4000 tokens at 100 tok/s = 40 s.
    # b: 5*1024/100 (a's rate is the nominal) = 51.2 s -> a, not b's raw count 5.
    view = FakeView(in_flight={1: 5}, loads={0: load(waiting_tokens=4000, tp=100.0)})
    assert LeastLoadPolicy().select([0, 1], view, REQ) == 0
    # The nominal rate is the candidates' own: row 2 (100000 tok/s) outside `rows`
    # does not make b look fast.
    view.loads[2] = load(tp=100_000.0)
    assert LeastLoadPolicy().select([0, 1], view, REQ) == 0
    # Inside the candidates it does: row 2 queues 1 s of work, the nominal rate is
    # (100+100000)/2 = 50050, so b = 5*1024/50050 = 0.102 s -> b.
    view.loads[2] = load(waiting_tokens=100_000, tp=100_000.0)
    assert LeastLoadPolicy().select([0, 1, 2], view, REQ) == 1


def test_least_load_max_waiting_skips_capped_worker() -> None:
    # a would win (64*1024/100 = 655 s vs 10000 s) but reports 64 waiting >= cap 48.
    view = FakeView(
        loads={0: load(waiting=64, tp=100.0), 1: load(waiting_tokens=1_000_000, tp=100.0)}
    )
    assert LeastLoadPolicy(max_waiting_requests=48).select([0, 1], view, REQ) == 1
    assert LeastLoadPolicy(max_waiting_requests=0).select([0, 1], view, REQ) == 0
    assert LeastLoadPolicy(max_waiting_requests=65).select([0, 1], view, REQ) == 0


def test_least_load_max_waiting_counts_dispatches_since_poll() -> None:
    # Cap 2: a (1 waiting) wins, its dispatch lifts it to the cap, the next goes to b.
    policy = LeastLoadPolicy(max_waiting_requests=2)
    view = FakeView(loads={0: load(waiting=1, tp=100.0), 1: load(waiting_tokens=400_000, tp=100.0)})
    assert picks(policy, [0, 1], view, 2) == [0, 1]
    # b is now at 1 since-poll request; a fresh poll of a (still 1 waiting) reopens a.
    view.loads[0] = load(waiting=1, tp=100.0, poll=2.0)
    assert policy.select([0, 1], view, REQ) == 0


def test_least_load_max_waiting_all_capped_raises() -> None:
    view = FakeView(loads={0: load(waiting=48, tp=100.0), 1: load(waiting=50, tp=100.0)})
    with pytest.raises(NoEligibleWorker, match="cap"):
        LeastLoadPolicy(max_waiting_requests=48).select([0, 1], view, REQ)
    # The single-row shortcut does not bypass the cap.
    with pytest.raises(NoEligibleWorker):
        LeastLoadPolicy(max_waiting_requests=48).select([0], view, REQ)


def test_least_load_max_waiting_keeps_workers_without_loads() -> None:
    # No queue evidence: the dark fleet keeps routing by in-flight count.
    view = FakeView(in_flight={0: 5, 1: 0})
    assert LeastLoadPolicy(max_waiting_requests=1).select([0, 1], view, REQ) == 1


def test_least_load_single_row_without_cap_reads_nothing() -> None:
    assert LeastLoadPolicy().select([4], NoReadView(), REQ) == 4


def test_least_load_ties_are_uniform() -> None:
    # Three identical workers score exactly equal; the first row must not always win.
    # A fresh policy per draw, because the winner's credit breaks the tie afterwards.
    rng = random.Random(99)
    view = FakeView(loads={r: load(waiting_tokens=1000, usage=0.2, tp=100.0) for r in range(3)})
    counts = Counter(LeastLoadPolicy(rng=rng).select([0, 1, 2], view, REQ) for _ in range(600))
    assert all(160 <= counts[r] <= 240 for r in range(3)), counts


def test_least_load_credit_spreads_identical_workers() -> None:
    view = FakeView(loads={r: load(waiting_tokens=1000, usage=0.2, tp=100.0) for r in range(4)})
    assert sorted(picks(LeastLoadPolicy(rng=random.Random(2)), [0, 1, 2, 3], view, 4)) == [
        0,
        1,
        2,
        3,
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_pressure_weight": -0.1}, "kv_pressure_weight"),
        ({"kv_pressure_weight": float("inf")}, "kv_pressure_weight"),
        ({"mean_prefill_tokens": 0}, "mean_prefill_tokens"),
        ({"default_throughput": 0.0}, "default_throughput"),
        ({"default_throughput": float("nan")}, "default_throughput"),
        ({"max_waiting_requests": -1}, "max_waiting_requests"),
    ],
)
def test_least_load_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeastLoadPolicy(**kwargs)  # type: ignore[arg-type]


# --- registry ------------------------------------------------------------------------


def test_registry_names_and_defaults() -> None:
    assert POLICY_NAMES[:4] == ("random", "round_robin", "power_of_two", "least_load")
    assert {"cache_aware", "consistent_hashing", "prefix_hash", "manual"} <= set(POLICY_NAMES)
    cfg = SimpleNamespace()
    assert isinstance(make_policy("random", cfg), RandomPolicy)
    assert isinstance(make_policy("round_robin", cfg), RoundRobinPolicy)
    p2 = make_policy("power_of_two", cfg)
    assert isinstance(p2, PowerOfTwoPolicy) and p2.load_metric == "expected_wait"
    least = make_policy("least_load", cfg)
    assert isinstance(least, LeastLoadPolicy)
    assert (
        least.kv_pressure_weight,
        least.default_throughput,
        least.mean_prefill_tokens,
        least.max_waiting_requests,
    ) == (0.15, 2000.0, 1024, 0)
    assert least.needs_backend_loads and p2.needs_backend_loads
    assert not make_policy("random", cfg).needs_backend_loads


def test_registry_reads_flag_attributes() -> None:
    cfg = SimpleNamespace(
        power_of_two_load_metric="least_requests",
        least_load_kv_pressure_weight=0.5,
        least_load_default_throughput=300.0,
        least_load_mean_prefill_tokens=256,
        least_load_max_waiting_requests=8,
    )
    p2 = make_policy("power_of_two", cfg)
    assert isinstance(p2, PowerOfTwoPolicy) and p2.load_metric == "least_requests"
    least = make_policy("least_load", cfg)
    assert isinstance(least, LeastLoadPolicy)
    assert (
        least.kv_pressure_weight,
        least.default_throughput,
        least.mean_prefill_tokens,
        least.max_waiting_requests,
    ) == (0.5, 300.0, 256, 8)
    # None (an unset argparse option) means the default.
    least = make_policy("least_load", SimpleNamespace(least_load_kv_pressure_weight=None))
    assert isinstance(least, LeastLoadPolicy) and least.kv_pressure_weight == 0.15


def test_registry_answers_needs_backend_loads_without_building() -> None:
    cfg = SimpleNamespace()
    for name in POLICY_NAMES:
        assert needs_backend_loads(name) is make_policy(name, cfg).needs_backend_loads, name
    assert [n for n in POLICY_NAMES if needs_backend_loads(n)] == ["power_of_two", "least_load"]
    with pytest.raises(ValueError, match="not implemented yet"):
        needs_backend_loads("passthrough")


def test_registry_seeds_with_the_given_rng() -> None:
    rows = list(range(10))
    a = make_policy("random", SimpleNamespace(), rng=random.Random(4))
    b = make_policy("random", SimpleNamespace(), rng=random.Random(4))
    assert picks(a, rows, NoReadView(), 50) == picks(b, rows, NoReadView(), 50)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest", SimpleNamespace())
    with pytest.raises(ValueError, match="'passthrough' is not implemented yet"):
        make_policy("passthrough", SimpleNamespace())
    with pytest.raises(ValueError, match="least_requests"):
        make_policy("power_of_two", SimpleNamespace(power_of_two_load_metric="tokens"))
    with pytest.raises(ValueError, match="mean_prefill_tokens"):
        make_policy("least_load", SimpleNamespace(least_load_mean_prefill_tokens=0))
    with pytest.raises(ValueError, match="must be an integer"):
        make_policy("least_load", SimpleNamespace(least_load_max_waiting_requests=1.5))
    with pytest.raises(ValueError, match="must be a number"):
        make_policy("least_load", SimpleNamespace(least_load_kv_pressure_weight="high"))
