"""The exchange state machine (smg/dataplane/lifecycle.py), pure: no sockets, no loop.

Retry edges included: a request is sent again only before its head reached the client."""

from __future__ import annotations

import pytest

from smg.dataplane.lifecycle import (
    BEFORE_HEAD,
    EVENT_COUNT,
    FLAT,
    TRANSITIONS,
    Action,
    Event,
    State,
    step,
)

LIVE = [s for s in State if s != State.DONE]


def run(*events: Event, state: State = State.WAITING) -> tuple[State, list[Action]]:
    actions = []
    for event in events:
        next_state, action = step(state, event)
        state = State(next_state)
        actions.append(Action(action))
    return state, actions


def test_pooled_connection_happy_path() -> None:
    state, actions = run(Event.CONNECTION, Event.HEAD, Event.COMPLETE, Event.FLUSHED)
    assert state == State.DONE
    assert actions == [Action.WRITE, Action.RELAY_HEAD, Action.END_MESSAGE, Action.FINISH]


def test_settling_holds_the_last_bytes_until_the_write_ends() -> None:
    """A translated answer whose record is being written: COMPLETE -> SETTLING -> COMPLETE,
    then the flush finishes it; the client may leave meanwhile; the request timeout and a
    late upstream close do not end it (the write is bounded by the store's op timeout)."""
    events = (Event.CONNECTION, Event.HEAD, Event.COMPLETE, Event.SETTLE)
    state, actions = run(*events)
    assert state == State.SETTLING and actions[-1] == Action.HOLD
    for event in (Event.TIMEOUT, Event.LOST, Event.FLUSHED, Event.COMPLETE):
        assert step(State.SETTLING, event) == (State.SETTLING, Action.IGNORE)
    assert step(State.SETTLING, Event.SETTLED) == (State.COMPLETE, Action.EMIT)
    assert step(State.SETTLING, Event.CLIENT_GONE) == (State.DONE, Action.DROP)
    state, actions = run(Event.SETTLED, Event.FLUSHED, state=State.SETTLING)
    assert state == State.DONE and actions == [Action.EMIT, Action.FINISH]


def test_fresh_connection_path() -> None:
    state, actions = run(Event.SLOT, Event.CONNECTION, Event.HEAD, Event.COMPLETE, Event.FLUSHED)
    assert state == State.DONE
    assert actions[:2] == [Action.OPEN, Action.WRITE]


RELAYED = {State.RELAYING, State.STREAMING, State.COMPLETE, State.SETTLING, State.DONE}


def test_no_edge_leads_back_once_the_head_is_relayed() -> None:
    """Once the client saw the head, nothing re-sends the request: a failure ends it."""
    for (state, _event), (next_state, action) in TRANSITIONS.items():
        if state in RELAYED:
            assert next_state in RELAYED, (state, _event)
            assert action not in (
                Action.OPEN,
                Action.WRITE,
                Action.RETRY,
                Action.ATTEMPT,
                Action.DISCARD,
            ), (state, _event)


def test_retries_start_only_before_the_head() -> None:
    retrying = [key for key, (_s, action) in TRANSITIONS.items() if action == Action.RETRY]
    assert retrying
    for state, event in retrying:
        assert state in BEFORE_HEAD
        assert TRANSITIONS[(state, event)][0] == State.BACKOFF


def test_the_only_way_back_to_a_new_attempt_is_the_backoff() -> None:
    """A written request goes out again only through BACKOFF --backoff_over--> WAITING."""
    into_waiting = [key for key, (nxt, _a) in TRANSITIONS.items() if nxt == State.WAITING]
    assert into_waiting == [(State.BACKOFF, Event.BACKOFF_OVER)]
    assert step(State.BACKOFF, Event.BACKOFF_OVER) == (State.WAITING, Action.ATTEMPT)
    assert [k for k, (_n, a) in TRANSITIONS.items() if a == Action.ATTEMPT] == into_waiting


def test_plain_failures_never_retry() -> None:
    """Without the retry flavour (no attempt left, or the body was not kept), a failure
    before the head is answered at once, as before retries existed."""
    for state in BEFORE_HEAD:
        for event in (Event.CONNECT_FAILED, Event.LOST, Event.INVALID, Event.HEAD):
            if state in (State.DISCARDING, State.DRAINED):
                continue  # a retryable answer already being read: see the test below
            assert step(state, event)[1] not in (Action.RETRY, Action.DISCARD)


def test_connect_failure_then_retry_on_another_worker() -> None:
    state, actions = run(
        Event.SLOT,
        Event.CONNECT_FAILED_RETRY,
        Event.BACKOFF_OVER,
        Event.CONNECTION,
        Event.HEAD,
        Event.COMPLETE,
        Event.FLUSHED,
    )
    assert state == State.DONE
    assert actions == [
        Action.OPEN,
        Action.RETRY,
        Action.ATTEMPT,
        Action.WRITE,
        Action.RELAY_HEAD,
        Action.END_MESSAGE,
        Action.FINISH,
    ]


def test_retryable_status_is_read_dropped_then_retried() -> None:
    state, actions = run(
        Event.CONNECTION, Event.RETRY_HEAD, Event.COMPLETE, Event.FLUSHED, Event.BACKOFF_OVER
    )
    assert state == State.WAITING
    assert actions == [
        Action.WRITE,
        Action.DISCARD,
        Action.DRAINED,
        Action.RETRY,
        Action.ATTEMPT,
    ]
    # A close-delimited (or cut) retryable answer ends with its connection: retried too.
    for event in (Event.LOST, Event.LOST_RETRY, Event.INVALID, Event.INVALID_RETRY):
        assert step(State.DISCARDING, event) == (State.BACKOFF, Action.RETRY)


@pytest.mark.parametrize("event", [Event.LOST_RETRY, Event.INVALID_RETRY])
def test_reset_before_the_head_is_retried(event: Event) -> None:
    assert step(State.AWAITING_HEAD, event) == (State.BACKOFF, Action.RETRY)


def test_exhausted_attempts_relay_the_final_status() -> None:
    """The last attempt's retryable status arrives as a plain HEAD: it is relayed."""
    state, _actions = run(
        Event.CONNECTION, Event.RETRY_HEAD, Event.COMPLETE, Event.FLUSHED, Event.BACKOFF_OVER
    )
    state, more = run(Event.CONNECTION, Event.HEAD, Event.COMPLETE, Event.FLUSHED, state=state)
    assert state == State.DONE
    assert more == [Action.WRITE, Action.RELAY_HEAD, Action.END_MESSAGE, Action.FINISH]


def test_retry_that_finds_no_worker_is_a_503() -> None:
    assert step(State.WAITING, Event.NO_WORKER) == (State.DONE, Action.FAIL_NO_WORKER)
    for state in State:
        if state != State.WAITING:
            assert step(state, Event.NO_WORKER) == (state, Action.IGNORE)


def test_sse_stream_broken_by_the_worker_ends_with_an_error_event() -> None:
    state, actions = run(Event.CONNECTION, Event.HEAD, Event.SSE)
    assert state == State.STREAMING
    assert actions[-1] == Action.WATCH
    for event in (Event.LOST, Event.LOST_RETRY, Event.INVALID, Event.INVALID_RETRY):
        assert step(State.STREAMING, event) == (State.DONE, Action.END_STREAM_ERROR)
    # A stall past the request timeout still cuts the connection (no clean end).
    assert step(State.STREAMING, Event.TIMEOUT) == (State.DONE, Action.ABORT_TIMEOUT)
    assert step(State.STREAMING, Event.COMPLETE) == (State.COMPLETE, Action.END_MESSAGE)
    # Only a relayed head can become a stream.
    for state in State:
        if state != State.RELAYING:
            assert step(state, Event.SSE) == (state, Action.IGNORE)


@pytest.mark.parametrize("state", [State.DISCARDING, State.DRAINED, State.BACKOFF])
def test_time_runs_out_between_attempts(state: State) -> None:
    assert step(state, Event.TIMEOUT) == (State.DONE, Action.FAIL_TIMEOUT)


def test_late_backoff_timer_is_ignored() -> None:
    for state in State:
        if state != State.BACKOFF:
            assert step(state, Event.BACKOFF_OVER) == (state, Action.IGNORE)


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (State.AWAITING_HEAD, Event.LOST, Action.FAIL_CLOSED),
        (State.AWAITING_HEAD, Event.INVALID, Action.FAIL_INVALID),
        (State.AWAITING_HEAD, Event.TIMEOUT, Action.FAIL_TIMEOUT),
        (State.WAITING, Event.TIMEOUT, Action.FAIL_TIMEOUT),
        (State.CONNECTING, Event.TIMEOUT, Action.FAIL_TIMEOUT),
        (State.CONNECTING, Event.CONNECT_FAILED, Action.FAIL_CONNECT),
        (State.RELAYING, Event.LOST, Action.ABORT),
        (State.RELAYING, Event.INVALID, Action.ABORT),
        (State.RELAYING, Event.TIMEOUT, Action.ABORT_TIMEOUT),
    ],
)
def test_failures_end_the_exchange(state: State, event: Event, expected: Action) -> None:
    assert step(state, event) == (State.DONE, expected)


@pytest.mark.parametrize("state", LIVE)
def test_client_gone_ends_every_live_state(state: State) -> None:
    assert step(state, Event.CLIENT_GONE) == (State.DONE, Action.DROP)


@pytest.mark.parametrize("event", list(Event))
def test_done_absorbs_every_event(event: Event) -> None:
    assert step(State.DONE, event) == (State.DONE, Action.IGNORE)


def test_late_events_are_ignored() -> None:
    # A connect finishing after a timeout, a second head, a timeout racing the final flush.
    assert step(State.DONE, Event.CONNECTION) == (State.DONE, Action.IGNORE)
    assert step(State.RELAYING, Event.HEAD) == (State.RELAYING, Action.IGNORE)
    assert step(State.COMPLETE, Event.TIMEOUT) == (State.COMPLETE, Action.IGNORE)
    assert step(State.WAITING, Event.HEAD) == (State.WAITING, Action.IGNORE)


def test_only_one_final_head_and_one_completion() -> None:
    state, actions = run(
        Event.CONNECTION, Event.HEAD, Event.HEAD, Event.COMPLETE, Event.COMPLETE, Event.FLUSHED
    )
    assert state == State.DONE
    assert actions.count(Action.RELAY_HEAD) == 1
    assert actions.count(Action.END_MESSAGE) == 1


def test_flat_table_matches_the_readable_one() -> None:
    assert len(FLAT) == len(State) * EVENT_COUNT
    for state in State:
        for event in Event:
            expected = TRANSITIONS.get((state, event), (state, Action.IGNORE))
            assert FLAT[state * EVENT_COUNT + event] == expected
