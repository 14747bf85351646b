"""The worker status state machine: the whole table, threshold counting, timeouts."""

from __future__ import annotations

import itertools
import random

import pytest

from smg.control.worker_state import (
    TRANSITIONS,
    Event,
    HealthCounters,
    HealthThresholds,
    WorkerStatus,
    initial_status,
    is_terminal,
    on_event,
)

S = WorkerStatus
E = Event
ZERO = HealthCounters()
DEFAULT = HealthThresholds()  # success 2, failure 3
ONE = HealthThresholds(success_threshold=1, failure_threshold=1)

# Next status after ONE event from fresh counters with thresholds (1, 1), so every threshold
# transition fires at once. Written out by hand for all 5 x 4 pairs.
EXPECTED_ONE = {
    (S.PENDING, E.PROBE_OK): S.READY,
    (S.PENDING, E.PROBE_FAILED): S.PENDING,  # 1 pending probe < cap of 10
    (S.PENDING, E.STARTUP_TIMEOUT): S.FAILED,
    (S.PENDING, E.CONNECTED): S.READY,
    (S.READY, E.PROBE_OK): S.READY,
    (S.READY, E.PROBE_FAILED): S.NOT_READY,
    (S.READY, E.STARTUP_TIMEOUT): S.READY,
    (S.READY, E.CONNECTED): S.READY,
    (S.NOT_READY, E.PROBE_OK): S.READY,
    (S.NOT_READY, E.PROBE_FAILED): S.NOT_READY,  # 1 failure < liveness threshold 3
    (S.NOT_READY, E.STARTUP_TIMEOUT): S.NOT_READY,
    (S.NOT_READY, E.CONNECTED): S.READY,
    **{(S.FAILED, e): S.FAILED for e in E},
    **{(S.DRAINING, e): S.DRAINING for e in E},
}

# The same with the default thresholds (2, 3): no probe transition fires on the first probe.
EXPECTED_DEFAULT = {
    **EXPECTED_ONE,
    (S.PENDING, E.PROBE_OK): S.PENDING,
    (S.READY, E.PROBE_FAILED): S.READY,
    (S.NOT_READY, E.PROBE_OK): S.NOT_READY,
}

# Pairs that change nothing at all (status and counters), i.e. ignored events.
IGNORED = {
    (s, e)
    for s, e in itertools.product(S, E)
    if (s, e)
    not in {
        (S.PENDING, E.PROBE_OK),
        (S.PENDING, E.PROBE_FAILED),
        (S.PENDING, E.STARTUP_TIMEOUT),
        (S.PENDING, E.CONNECTED),
        (S.READY, E.PROBE_OK),
        (S.READY, E.PROBE_FAILED),
        (S.NOT_READY, E.PROBE_OK),
        (S.NOT_READY, E.PROBE_FAILED),
        (S.NOT_READY, E.CONNECTED),
    }
}


def run(status: S, events: list[E], t: HealthThresholds = DEFAULT) -> tuple[S, HealthCounters]:
    counters = ZERO
    for e in events:
        status, counters = on_event(status, counters, e, t)
    return status, counters


def test_expected_tables_cover_every_pair() -> None:
    pairs = set(itertools.product(S, E))
    assert set(EXPECTED_ONE) == pairs
    assert set(EXPECTED_DEFAULT) == pairs
    assert len(pairs) == 20
    # The module's table defines exactly the pairs that are not ignored.
    assert set(TRANSITIONS) == pairs - IGNORED


@pytest.mark.parametrize(("status", "event"), sorted(EXPECTED_ONE, key=str))
def test_every_pair_thresholds_one(status: S, event: E) -> None:
    nxt, counters = on_event(status, ZERO, event, ONE)
    assert nxt is EXPECTED_ONE[(status, event)]
    assert isinstance(nxt, WorkerStatus)
    assert counters.consecutive_successes >= 0 and counters.consecutive_failures >= 0


@pytest.mark.parametrize(("status", "event"), sorted(EXPECTED_DEFAULT, key=str))
def test_every_pair_default_thresholds(status: S, event: E) -> None:
    nxt, _ = on_event(status, ZERO, event, DEFAULT)
    assert nxt is EXPECTED_DEFAULT[(status, event)]


@pytest.mark.parametrize(("status", "event"), sorted(IGNORED, key=str))
def test_ignored_pairs_change_nothing(status: S, event: E) -> None:
    counters = HealthCounters(consecutive_successes=1, consecutive_failures=0, pending_probes=4)
    assert on_event(status, counters, event, DEFAULT) == (status, counters)


def test_status_bytes_match_rust_repr_u8() -> None:
    assert [(s.name, int(s)) for s in S] == [
        ("PENDING", 0),
        ("READY", 1),
        ("NOT_READY", 2),
        ("FAILED", 3),
        ("DRAINING", 4),
    ]
    assert [str(s) for s in S] == ["pending", "ready", "not_ready", "failed", "draining"]


def test_failed_and_draining_are_terminal() -> None:
    assert [s for s in S if is_terminal(s)] == [S.FAILED, S.DRAINING]


def test_initial_status() -> None:
    assert initial_status(health_check_disabled=False) is S.PENDING
    assert initial_status(health_check_disabled=True) is S.READY


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError):
        on_event(S.READY, ZERO, "probe_ok", DEFAULT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        on_event(7, ZERO, E.PROBE_OK, DEFAULT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HealthThresholds(success_threshold=0)
    with pytest.raises(ValueError):
        HealthThresholds(failure_threshold=0)


def test_status_given_as_plain_int_works() -> None:
    # Read back from a shared-memory byte.
    nxt, _ = on_event(0, ZERO, E.CONNECTED, DEFAULT)  # type: ignore[arg-type]
    assert nxt is S.READY


# --- threshold counting ---------------------------------------------------------------


def test_pending_needs_two_consecutive_successes() -> None:
    ok, fail = E.PROBE_OK, E.PROBE_FAILED
    assert run(S.PENDING, [ok])[0] is S.PENDING
    status, counters = run(S.PENDING, [ok, ok])
    assert status is S.READY and counters == ZERO
    # A failure in between resets the success count.
    assert run(S.PENDING, [ok, fail, ok])[0] is S.PENDING
    assert run(S.PENDING, [ok, fail, ok, ok])[0] is S.READY


def test_ready_needs_three_consecutive_failures() -> None:
    ok, fail = E.PROBE_OK, E.PROBE_FAILED
    status, counters = run(S.READY, [fail, fail])
    assert status is S.READY and counters.consecutive_failures == 2
    status, counters = run(S.READY, [fail, fail, fail])
    assert status is S.NOT_READY and counters == ZERO
    # A success in between resets the failure count.
    assert run(S.READY, [fail, fail, ok, fail, fail])[0] is S.READY
    assert run(S.READY, [fail, fail, ok, fail, fail, fail])[0] is S.NOT_READY


def test_not_ready_recovers_after_two_successes() -> None:
    ok, fail = E.PROBE_OK, E.PROBE_FAILED
    assert run(S.NOT_READY, [ok])[0] is S.NOT_READY
    assert run(S.NOT_READY, [ok, ok])[0] is S.READY
    assert run(S.NOT_READY, [ok, fail, ok])[0] is S.NOT_READY


def test_not_ready_fails_after_liveness_threshold() -> None:
    fail, ok = E.PROBE_FAILED, E.PROBE_OK
    # 3 x failure_threshold = 9 consecutive failures.
    assert run(S.NOT_READY, [fail] * 8)[0] is S.NOT_READY
    assert run(S.NOT_READY, [fail] * 9)[0] is S.FAILED
    assert run(S.NOT_READY, [fail] * 8 + [ok] + [fail] * 8)[0] is S.NOT_READY
    # From Ready: 3 failures to NotReady (count reset), then 9 more to Failed.
    assert run(S.READY, [fail] * 11)[0] is S.NOT_READY
    assert run(S.READY, [fail] * 12)[0] is S.FAILED


def test_pending_cap_fails_a_worker_that_never_comes_up() -> None:
    fail, ok = E.PROBE_FAILED, E.PROBE_OK
    # 10 x failure_threshold = 30 probes in Pending.
    status, counters = run(S.PENDING, [fail] * 29)
    assert status is S.PENDING and counters.pending_probes == 29
    assert run(S.PENDING, [fail] * 30)[0] is S.FAILED
    # A flapping worker never gets 2 successes in a row; the cap catches it on a success.
    flapping = [fail, ok] * 15
    assert run(S.PENDING, flapping[:-1])[0] is S.PENDING
    assert run(S.PENDING, flapping)[0] is S.FAILED


def test_custom_thresholds() -> None:
    t = HealthThresholds(success_threshold=5, failure_threshold=1)
    ok, fail = E.PROBE_OK, E.PROBE_FAILED
    assert run(S.PENDING, [ok] * 4, t)[0] is S.PENDING
    assert run(S.PENDING, [ok] * 5, t)[0] is S.READY
    assert run(S.READY, [fail], t)[0] is S.NOT_READY
    assert run(S.NOT_READY, [fail] * 3, t)[0] is S.FAILED
    assert run(S.PENDING, [fail] * 10, t)[0] is S.FAILED


# --- startup timeout, connect, drain --------------------------------------------------


def test_startup_timeout_fails_only_a_pending_worker() -> None:
    ok, timeout = E.PROBE_OK, E.STARTUP_TIMEOUT
    status, counters = run(S.PENDING, [ok, timeout])
    assert status is S.FAILED and counters == ZERO
    # Once Ready, a late timer is a no-op.
    assert run(S.PENDING, [ok, ok, timeout])[0] is S.READY
    # And Failed stays Failed even if probes succeed afterwards.
    assert run(S.PENDING, [timeout, ok, ok, ok])[0] is S.FAILED


def test_connected_promotes_but_never_revives() -> None:
    assert run(S.PENDING, [E.CONNECTED])[0] is S.READY
    assert run(S.NOT_READY, [E.CONNECTED])[0] is S.READY
    assert run(S.FAILED, [E.CONNECTED])[0] is S.FAILED
    assert run(S.DRAINING, [E.CONNECTED])[0] is S.DRAINING


def test_random_sequences_keep_invariants() -> None:
    rng = random.Random(1234)
    events = list(E)
    for _ in range(300):
        t = HealthThresholds(rng.randint(1, 4), rng.randint(1, 4))
        status, counters = rng.choice(list(S)), ZERO
        for _ in range(60):
            before = status
            status, counters = on_event(status, counters, rng.choice(events), t)
            assert isinstance(status, WorkerStatus)
            assert counters.consecutive_successes >= 0
            assert counters.consecutive_failures >= 0
            assert not (counters.consecutive_successes and counters.consecutive_failures)
            assert counters.consecutive_successes < max(t.success_threshold, 1) + 1
            if status is not S.PENDING:
                assert counters.pending_probes == 0
            if before in (S.FAILED, S.DRAINING):
                assert status is before  # terminal
            if status is not before:
                assert counters == ZERO  # every transition starts counting afresh
