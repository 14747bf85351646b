"""The bucket prefill policy (issue 17): 1.13's algorithm checked with the Rust source's own
test vectors (model_gateway/src/policies/bucket.rs tests), and the one-writer sharing:
data-plane rings -> control-plane adjuster -> one published snapshot every process reads."""

from __future__ import annotations

import random

import pytest

from smg.config import ConfigError, load_config
from smg.policies.base import BackendLoad, RouteRequest
from smg.policies.bucket import (
    MAX,
    RING_RECORDS,
    Boundary,
    Bucket,
    BucketAdjuster,
    BucketPolicy,
    BucketShare,
    PrefillWorker,
    Snapshot,
    choose,
    imbalanced,
)
from smg.policies.registry import make_policy

W = ["http://w1:8000", "http://w2:8000", "http://w3:8000"]


def _ranges(bucket: Bucket) -> list[tuple[str, int, int]]:
    return [(b.url, b.lo, b.hi) for b in bucket.boundary]


def _bucket(period: float) -> Bucket:
    """A Bucket of the three workers W, `period` s window."""
    bucket = Bucket(period=period)
    bucket.init_workers(W)
    return bucket


def _feed(bucket: Bucket, now: float, *sizes: int) -> None:
    """Route requests of `sizes` chars at `now` with balancing off (Rust's abs 300, rel
    1.0001), so each goes by the boundary."""
    for chars in sizes:
        _route(bucket, chars, now, 300, 1.0001)


def _route(bucket: Bucket, chars: int, now: float, abs_t: int, rel_t: float) -> str:
    """Rust's select_worker for one process: choose from the loads as they are, then count
    the request (post_process expires the window)."""
    url = choose(bucket.boundary, dict(bucket.chars_per_url), chars, abs_t, rel_t)
    assert url is not None
    bucket.post_process(chars, url, now)
    return url


def test_initial_ranges_split_4096_then_usize_max() -> None:
    bucket = _bucket(3.0)
    # Rust test_adjust_boundary_1's initial boundary: 1364 and 2729.
    assert _ranges(bucket) == [(W[0], 0, 1364), (W[1], 1365, 2729), (W[2], 2730, MAX)]
    bucket.add_worker("http://w4:8000")  # 1.13: later inits split usize::MAX
    gap = MAX // 4
    assert [b.hi for b in bucket.boundary] == [gap - 1, 2 * gap - 1, 3 * gap - 1, MAX]
    bucket.remove_worker(W[1])
    assert [b.url for b in bucket.boundary] == [W[0], W[2], "http://w4:8000"]
    assert bucket.chars_per_url == {W[0]: 0, W[2]: 0, "http://w4:8000": 0}


def test_load_balancing_conditions() -> None:
    # Rust test 1: abs 32, rel 1.0001, interval 10.
    bucket = _bucket(10.0)
    assert _route(bucket, 33, 0.0, 32, 1.0001) == W[0]
    assert _route(bucket, 34, 0.1, 32, 1.0001) == W[1]  # imbalanced: least loaded
    assert _route(bucket, 34, 0.2, 32, 1.0001) == W[2]
    assert bucket.adjust_boundary()
    assert _ranges(bucket) == [(W[0], 0, 33), (W[1], 34, 67), (W[2], 68, MAX)]
    first = _route(bucket, 33, 11.0, 32, 1.0001)  # the loads before expiry: balanced
    second = _route(bucket, 33, 11.1, 32, 1.0001)
    third = _route(bucket, 33, 11.2, 32, 1.0001)
    assert first == W[0] and second != third and W[0] not in (second, third)
    # Rust test 2: abs 30, rel 2.0: 20 + 8 = 28 < 30, no balancing.
    bucket = _bucket(5.0)
    assert [_route(bucket, n, 0.0, 30, 2.0) for n in (20, 8, len("request"))] == [W[0]] * 3
    # Rust test 3: abs 5, rel 3.0: 15 / 5 = 3.0 is not above the relative threshold.
    bucket = _bucket(5.0)
    assert [_route(bucket, n, 0.0, 5, 3.0) for n in (15, 5, 10)] == W
    assert _route(bucket, len("request"), 0.0, 5, 3.0) == W[0]


def test_adjust_boundary_follows_the_window() -> None:
    # Rust test_adjust_boundary_1 (abs 300 keeps balancing off; interval 3).
    bucket = _bucket(3.0)
    _feed(bucket, 0.0, 5, 10, 15, 20, 24, 26)
    assert bucket.adjust_boundary()
    assert _ranges(bucket) == [(W[0], 0, 20), (W[1], 21, 26), (W[2], 27, MAX)]
    _feed(bucket, 4.0, 10, 20, 30, 40, 45, 57)  # 4 s later: the first six have left the window
    assert (bucket.load_total, bucket.adjust_boundary()) == (202, True)
    assert _ranges(bucket) == [(W[0], 0, 40), (W[1], 41, 57), (W[2], 58, MAX)]


def test_adjust_boundary_with_few_requests() -> None:
    # Rust test_adjust_boundary_2: one request of 20, then one of 7.
    bucket = _bucket(3.0)
    _feed(bucket, 0.0, 20)
    assert bucket.adjust_boundary()
    assert _ranges(bucket) == [(W[0], 0, 20), (W[1], 21, 27), (W[2], 28, MAX)]
    _feed(bucket, 4.0, 7)
    assert bucket.adjust_boundary()
    assert _ranges(bucket) == [(W[0], 0, 7), (W[1], 8, 10), (W[2], 11, MAX)]


def test_boundary_kept_while_the_share_stays_within_a_factor_2() -> None:
    # Rust test_not_adjust_boundary: 100/3 = 33, then 192/3 = 64 <= 2 * 33.
    bucket = _bucket(3.0)
    _feed(bucket, 0.0, 5, 10, 15, 20, 24, 26)
    assert bucket.adjust_boundary()
    _feed(bucket, 4.0, 10, 20, 30, 32, 45, 55)
    assert bucket.adjust_boundary() is False
    assert _ranges(bucket) == [(W[0], 0, 20), (W[1], 21, 26), (W[2], 27, MAX)]
    assert Bucket(period=3.0).adjust_boundary() is False  # an empty window: nothing to do


def test_imbalance_rule_and_choice() -> None:
    assert imbalanced([33, 0, 0], 32, 1.0001) is True
    assert imbalanced([33, 34, 34], 32, 1.0001) is False  # max - min = 1
    assert imbalanced([15, 5, 10], 5, 3.0) is False  # 15 > 3.0 * 5 is false
    assert imbalanced([], 0, 1.0) is False
    boundary = [Boundary("a", 0, 9), Boundary("b", 10, MAX)]
    assert choose(boundary, {"a": 0, "b": 0}, 12, 32, 1.5) == "b"
    assert choose(boundary, {"a": 100, "b": 0}, 3, 32, 1.5) == "b"  # balancing wins
    assert choose([Boundary("a", 5, 9)], {"a": 0}, 3, 32, 1.5) is None


# --- sharing: one writer of the boundaries, every process reads the same ones ----------------


def _workers(*rows: int) -> list[PrefillWorker]:
    return [PrefillWorker(row, 1, W[i], "m1") for i, row in enumerate(rows)]


def _policy(share: BucketShare, slot: int, rows: tuple[int, ...]) -> BucketPolicy:
    class Shared:
        pass

    shared = Shared()
    shared.bucket = share  # type: ignore[attr-defined]
    shared.slot = slot  # type: ignore[attr-defined]
    policy = BucketPolicy(10**6, 1.0001, rng=random.Random(1))  # balancing off
    policy.use_shared(shared)
    policy.on_directory({row: (1, W[i]) for i, row in enumerate(rows)})
    return policy


class _View:
    def in_flight(self, row: int) -> int:
        return 0

    def backend_load(self, row: int) -> BackendLoad:
        return BackendLoad()


def _request(chars: int) -> RouteRequest:
    return RouteRequest(model="m1", text="a" * chars)


def test_two_processes_route_by_the_boundaries_one_writer_published() -> None:
    rows = (4, 7, 9)
    share = BucketShare(bytearray(3 * (64 + RING_RECORDS * 24) + (1 << 20)), slots=3)
    first, second = _policy(share, 1, rows), _policy(share, 2, rows)
    adjuster = BucketAdjuster(share, period=3.0)
    snapshot = adjuster.tick(100.0, _workers(*rows))  # initial ranges, published
    assert snapshot.ranges == {"m1": [(4, 1, 0, 1364), (7, 1, 1365, 2729), (9, 1, 2730, MAX)]}
    assert snapshot.models == {4: "m1", 7: "m1", 9: "m1"}
    view = _View()
    # Both processes route by the published ranges.
    for n in (5, 10, 15):
        assert first.select(rows, view, _request(n)) == 4
    for n in (20, 24, 26):
        assert second.select(rows, view, _request(n)) == 4
    assert second.select(rows, view, _request(2000)) == 7
    adjuster.tick(101.0, _workers(*rows))  # records in, no adjustment before the interval
    assert adjuster.buckets["m1"].load_total == 2100
    adjuster.tick(103.5, _workers(*rows))  # the interval passed: adjusted over 6 + 1 records
    expected = [(W[0], 0, 2000), (W[1], 2001, 2701), (W[2], 2702, MAX)]
    assert _ranges(adjuster.buckets["m1"]) == expected
    for policy in (first, second):  # the same ranges in both processes
        assert policy.select(rows, view, _request(2000)) == 4
        assert policy.select(rows, view, _request(2701)) == 7
        assert policy.select(rows, view, _request(2702)) == 9
    assert first.snap == second.snap


def test_ring_keeps_the_newest_records_when_lapped() -> None:
    share = BucketShare(bytearray(64 + RING_RECORDS * 24 + (1 << 20)), slots=1)
    for i in range(RING_RECORDS + 5):
        share.append(0, float(i), i, 1, 1)
    count, records = share.read(0, 0)
    assert count == RING_RECORDS + 5
    assert len(records) == RING_RECORDS and records[0] == (5.0, 5, 1, 1)
    assert share.read(0, count) == (count, [])


def test_snapshot_is_not_read_while_written() -> None:
    share = BucketShare(bytearray(64 + RING_RECORDS * 24 + (1 << 20)), slots=1)
    assert share.snapshot() is None
    snap = Snapshot({"m": [(1, 1, 0, MAX)]}, {"m": [(1, 1, 3)]}, {1: "m"})
    assert share.publish(snap)
    assert share.snapshot() == (2, snap)
    share.buf[share.snapshot_at] = 3  # a writer in the middle of its copy
    assert share.snapshot() is None


def test_bucket_is_a_prefill_policy_only() -> None:
    policy = make_policy("bucket", load_config([], {}))
    assert (policy.name, policy.needs_text) == ("bucket", True)
    pd = ["--pd-disaggregation", "--prefill", "http://127.0.0.1:9001"]
    cfg = load_config([*pd, "--prefill-policy", "bucket"], {})
    assert cfg.prefill_policy == "bucket"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(["--policy", "bucket"], {})
    with pytest.raises(ConfigError, match="must be >= 1 with the bucket policy"):
        load_config([*pd, "--prefill-policy", "bucket", "--bucket-adjust-interval-secs", "0"], {})


def _range_uppers(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("smg_pd_bucket_range_upper{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('worker="')[1].split('"')[0]] = value
    return out


def test_launch_runs_the_one_writer_and_publishes_its_ranges() -> None:
    import mockutil
    from gatewayutil import running_gateway, wait_until

    with mockutil.start_mock_workers(3, "--model", "m1") as mocks:
        p1, p2, d1 = mocks.urls
        args = ["--pd-disaggregation", "--prefill", p1, "--decode", d1]
        args += [
            "--prefill",
            p2,
            "--prefill-policy",
            "bucket",
            "--bucket-adjust-interval-secs",
            "1",
        ]
        with running_gateway(args) as gw:
            # 1.13's first split: 4096 characters over the two prefill workers.
            expected = {p1: "2047", p2: "+Inf"}
            wait_until(lambda: _range_uppers(gw.metrics()) == expected, 10.0, "initial ranges")
            p3 = "http://127.0.0.1:9"  # registered (never ready): it joins its model's bucket
            spec = {"url": p3, "worker_type": "prefill", "model_id": "m1"}
            assert gw.admin("POST", "/workers", json=spec).status_code == 202
            gap = MAX // 3  # 1.13: after the first split, usize::MAX is split
            later = {p1: f"{gap - 1:.16g}", p2: f"{2 * gap - 1:.16g}", p3: "+Inf"}
            got = wait_until(
                lambda: len(uppers := _range_uppers(gw.metrics())) == 3 and uppers, 10.0, "3"
            )
            assert {
                url: f"{float(v):.16g}" if v != "+Inf" else v for url, v in got.items()
            } == later


def test_pd_requests_follow_the_published_ranges_in_every_process() -> None:
    """Through the PD data plane (issue 17's other half; skipped where it is not merged):
    short prompts to the first prefill worker, long ones to the second, whichever of the two
    processes routes them."""
    pytest.importorskip("smg.dataplane.pd")
    import httpx
    import mockutil
    from gatewayutil import running_gateway, wait_until

    with mockutil.start_mock_workers(3, "--model", "m1") as mocks:
        p1, p2, d1 = mocks.urls
        args = ["--pd-disaggregation", "--prefill", p1, "--prefill", p2, "--decode", d1]
        # Ranges stay at the first split ([0, 2047], [2048, MAX]); balancing off.
        args += ["--prefill-policy", "bucket", "--bucket-adjust-interval-secs", "3600"]
        args += ["--balance-abs-threshold", "1000000000", "--policy", "round_robin"]
        with running_gateway(args) as gw:
            gw.wait_ready()
            expected = {p1: "2047", p2: "+Inf"}
            wait_until(lambda: _range_uppers(gw.metrics()) == expected, 10.0, "initial ranges")
            # Published in the tick that computed them: every data plane reads the slot's
            # sequence on each request, so the next request routes by them.
            for url in mocks.urls:
                mockutil.reset_stats(url)
            for n in [10, 3000] * 10:  # a new connection each: both processes route
                body = {"text": "a" * n, "sampling_params": {"max_new_tokens": 2}}
                answer = httpx.post(gw.url + "/generate", json=body, timeout=30.0)
                assert answer.status_code == 200, answer.text
            assert mockutil.stats(p1)["inference_answered"] == 10
            assert mockutil.stats(p2)["inference_answered"] == 10
            served = [
                line
                for line in gw.metrics().splitlines()
                if line.startswith("smg_http_requests_total{") and 'path="/generate"' in line
            ]
            assert {line.split('process="')[1].split('"')[0] for line in served} == {"0", "1"}
