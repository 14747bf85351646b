"""One proxied request's life, as a transition table (pure: no I/O, no clock).

The socket callbacks in `exchange.py` and `upstream.py` turn what happens on the wire into
an `Event`; `step` answers the next `State` and the `Action` the exchange performs. Every
rule about when a request may be retried, relayed, failed or finished lives here.

    WAITING      --slot------------->  CONNECTING     (a pool slot freed: open a connection)
    WAITING      --connection------->  AWAITING_HEAD  (a pooled connection handed over: write)
    CONNECTING   --connection------->  AWAITING_HEAD  (connected: write the request)
    CONNECTING   --connect_failed--->  DONE           502 upstream_connect_failed
    AWAITING_HEAD --head------------>  RELAYING       relay the final head (1xx never get here)
    RELAYING     --complete--------->  COMPLETE       end the client message
    COMPLETE     --flushed---------->  DONE           release the connection, next request
    AWAITING_HEAD --lost------------>  DONE           502 upstream_connection_closed
    AWAITING_HEAD --invalid--------->  DONE           502 upstream_invalid_response
    RELAYING     --lost / invalid--->  DONE           close the client (the head is out)
    WAITING / CONNECTING / AWAITING_HEAD --timeout-->  DONE  504 upstream_timeout
    RELAYING     --timeout---------->  DONE           close the client (the head is out)
    any but DONE --client_gone------>  DONE           drop the upstream connection (499)

There is no "retry" edge: once the request is written, a lost connection is a failure,
because the worker may have read and executed it (a POST is not idempotent). A pooled
connection whose peer is provably gone before anything was written is never handed to an
exchange in the first place (`WorkerPool.take_idle` checks for the peer's close at reuse),
which is the one transparent retry Go's net/http and Envoy make too.

A close-delimited response ends with the connection: the exchange turns that `lost` into
`complete` itself, since only it knows how the response was framed.

Pairs missing from the table are ignored (`IGNORE`, state unchanged): callbacks arrive late
by nature (a connect that finishes after the client left, a timeout racing a completion).
Body chunks are not events: they can only follow a relayed head from the same parser, so the
hot path skips the table for them.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    WAITING = 0  # queued for a slot in the worker's pool
    CONNECTING = 1  # a connection is being opened for this exchange (its slot is counted)
    AWAITING_HEAD = 2  # request written; no final response head yet
    RELAYING = 3  # final head relayed; body chunks flowing
    COMPLETE = 4  # the upstream message is complete; the flush at the end of the read ends it
    DONE = 5  # answered, failed or abandoned; nothing more happens


class Event(enum.IntEnum):
    SLOT = 0  # the pool grants a slot to a waiting exchange
    CONNECTION = 1  # a live connection is bound to the exchange
    CONNECT_FAILED = 2  # opening a connection failed or timed out
    HEAD = 3  # a final (>= 200) response head arrived
    COMPLETE = 4  # the upstream response message is complete
    FLUSHED = 5  # buffered output was handed to the client
    LOST = 6  # the upstream connection closed
    INVALID = 7  # the upstream sent bytes that are not a valid response
    TIMEOUT = 8  # --request-timeout-secs expired
    CLIENT_GONE = 9  # the client connection closed


class Action(enum.IntEnum):
    IGNORE = 0  # nothing to do (a late or irrelevant event)
    OPEN = 1  # open a connection (the slot is already counted)
    WRITE = 2  # write the request on the bound connection
    RELAY_HEAD = 3  # frame the head for the client
    END_MESSAGE = 4  # terminate the client message framing
    FINISH = 5  # release the connection, account, let the client go on
    FAIL_CONNECT = 6  # 502 upstream_connect_failed
    FAIL_CLOSED = 7  # 502 upstream_connection_closed
    FAIL_INVALID = 8  # 502 upstream_invalid_response
    FAIL_TIMEOUT = 9  # 504 upstream_timeout
    ABORT = 10  # head already sent: close the client connection
    ABORT_TIMEOUT = 11  # head already sent and time is up: close the client connection
    DROP = 12  # the client left: drop the upstream connection


S, E, A = State, Event, Action

TRANSITIONS: dict[tuple[State, Event], tuple[State, Action]] = {
    (S.WAITING, E.SLOT): (S.CONNECTING, A.OPEN),
    (S.WAITING, E.CONNECTION): (S.AWAITING_HEAD, A.WRITE),
    (S.WAITING, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.WAITING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.CONNECTING, E.CONNECTION): (S.AWAITING_HEAD, A.WRITE),
    (S.CONNECTING, E.CONNECT_FAILED): (S.DONE, A.FAIL_CONNECT),
    (S.CONNECTING, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.CONNECTING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.AWAITING_HEAD, E.HEAD): (S.RELAYING, A.RELAY_HEAD),
    (S.AWAITING_HEAD, E.LOST): (S.DONE, A.FAIL_CLOSED),
    (S.AWAITING_HEAD, E.INVALID): (S.DONE, A.FAIL_INVALID),
    (S.AWAITING_HEAD, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.AWAITING_HEAD, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.RELAYING, E.COMPLETE): (S.COMPLETE, A.END_MESSAGE),
    (S.RELAYING, E.LOST): (S.DONE, A.ABORT),
    (S.RELAYING, E.INVALID): (S.DONE, A.ABORT),
    (S.RELAYING, E.TIMEOUT): (S.DONE, A.ABORT_TIMEOUT),
    (S.RELAYING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.COMPLETE, E.FLUSHED): (S.DONE, A.FINISH),
    (S.COMPLETE, E.CLIENT_GONE): (S.DONE, A.DROP),
}

EVENT_COUNT = len(Event)
# The hot path indexes a flat tuple with plain ints (state * events + event): no tuple key,
# no enum hashing, and the (state, action) pairs are built once here.
FLAT: tuple[tuple[int, int], ...] = tuple(
    (int(next_state), int(action))
    for state in State
    for event in Event
    for next_state, action in (TRANSITIONS.get((state, event), (state, A.IGNORE)),)
)


def step(state: int, event: int) -> tuple[int, int]:
    """The next state and the action for `event` in `state` (unknown pairs: unchanged, IGNORE)."""
    return FLAT[state * EVENT_COUNT + event]
