"""The exchange state machine (smg/dataplane/lifecycle.py), pure: no sockets, no loop."""

from __future__ import annotations

import pytest

from smg.dataplane.lifecycle import EVENT_COUNT, FLAT, TRANSITIONS, Action, Event, State, step

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


def test_fresh_connection_path() -> None:
    state, actions = run(Event.SLOT, Event.CONNECTION, Event.HEAD, Event.COMPLETE, Event.FLUSHED)
    assert state == State.DONE
    assert actions[:2] == [Action.OPEN, Action.WRITE]


def test_no_edge_ever_leads_back_to_getting_a_connection_once_written() -> None:
    """Once the request is written, nothing re-sends it: a lost connection is a failure."""
    written = {State.AWAITING_HEAD, State.RELAYING, State.COMPLETE, State.DONE}
    for (state, _event), (next_state, action) in TRANSITIONS.items():
        if state in written:
            assert next_state in written
            assert action not in (Action.OPEN, Action.WRITE)


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
