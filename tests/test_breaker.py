"""The circuit breaker's pure parts: transition table, state word, counters, failures."""

from __future__ import annotations

import pytest

from smg.dataplane import breaker
from smg.dataplane.breaker import CLOSED, HALF_OPEN, OPEN, Event


def test_transition_table_is_exactly_smgs_plus_trial_expiry_and_reset() -> None:
    assert breaker.TRANSITIONS == {
        (CLOSED, Event.TRIPPED): OPEN,
        (OPEN, Event.TIMED_OUT): HALF_OPEN,
        (HALF_OPEN, Event.TRIAL_FAILED): OPEN,
        (HALF_OPEN, Event.TRIALS_SUCCEEDED): CLOSED,
        (HALF_OPEN, Event.TRIALS_EXPIRED): OPEN,
        (OPEN, Event.RESET): CLOSED,
        (HALF_OPEN, Event.RESET): CLOSED,
    }


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (CLOSED, Event.TIMED_OUT),
        (CLOSED, Event.TRIAL_FAILED),
        (CLOSED, Event.TRIALS_SUCCEEDED),
        (CLOSED, Event.RESET),
        (OPEN, Event.TRIPPED),
        (OPEN, Event.TRIAL_FAILED),
        (HALF_OPEN, Event.TRIPPED),
        (HALF_OPEN, Event.TIMED_OUT),
    ],
)
def test_events_that_do_not_apply_change_nothing(state: int, event: Event) -> None:
    assert breaker.next_state(state, event) is None
    assert breaker.successor(breaker.pack(state, 5, 100), event, 200) is None


def test_word_round_trip_and_successor_moves_epoch_and_time() -> None:
    word = breaker.pack(OPEN, 41, 123_456_789)
    assert breaker.unpack(word) == breaker.Word(OPEN, 41, 123_456_789)
    after = breaker.successor(word, Event.TIMED_OUT, 123_999_000)
    assert after is not None
    assert breaker.unpack(after) == breaker.Word(HALF_OPEN, 42, 123_999_000)


def test_epoch_wraps_within_its_bits() -> None:
    word = breaker.pack(CLOSED, breaker.EPOCH_MASK, 7)
    after = breaker.successor(word, Event.TRIPPED, 8)
    assert after is not None
    assert breaker.unpack(after) == breaker.Word(OPEN, 0, 8)


def test_timed_events() -> None:
    opened = breaker.pack(OPEN, 3, 10_000)
    assert breaker.timed_event(opened, 10_999, 1000, False) is None
    assert breaker.timed_event(opened, 11_000, 1000, False) is Event.TIMED_OUT
    half = breaker.pack(HALF_OPEN, 4, 20_000)
    assert breaker.timed_event(half, 25_000, 1000, False) is None  # trials still to come
    assert breaker.timed_event(half, 20_500, 1000, True) is None
    assert breaker.timed_event(half, 21_000, 1000, True) is Event.TRIALS_EXPIRED
    assert breaker.timed_event(breaker.pack(CLOSED, 5, 0), 99_999, 1000, True) is None


def test_counters_belong_to_their_epoch() -> None:
    word = breaker.counter(7, 4)
    assert breaker.count_in(word, 7) == 4
    assert breaker.count_in(word, 8) == 0
    assert breaker.count_in(0, 0) == 0


@pytest.mark.parametrize("status", [0, 408, 429, 500, 502, 503, 504])
def test_failures_are_smgs_retryable_statuses_and_transport_failures(status: int) -> None:
    assert breaker.is_failure(status)


@pytest.mark.parametrize("status", [200, 201, 204, 400, 401, 403, 404, 413, 422, 501, 505])
def test_everything_else_is_a_success(status: int) -> None:
    assert not breaker.is_failure(status)
