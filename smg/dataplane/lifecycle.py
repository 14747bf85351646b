"""One proxied request's life, all its attempts included, as a transition table (pure: no
I/O, no clock).

The socket callbacks in `exchange.py` and `upstream.py` turn what happens on the wire into
an `Event`; `step` answers the next `State` and the `Action` the exchange performs. Every
rule about when a request may be retried, relayed, failed or finished lives here.

    WAITING      --slot------------->  CONNECTING     (a pool slot freed: open a connection)
    WAITING      --connection------->  AWAITING_HEAD  (a pooled connection handed over: write)
    CONNECTING   --connection------->  AWAITING_HEAD  (connected: write the request)
    CONNECTING   --connect_failed--->  DONE           502 upstream_connect_failed
    AWAITING_HEAD --head------------>  RELAYING       relay the final head (1xx never get here)
    RELAYING     --sse-------------->  STREAMING      the head was an SSE stream in chunked framing
    RELAYING / STREAMING --complete->  COMPLETE       end the client message
    COMPLETE     --flushed---------->  DONE           release the connection, next request
    AWAITING_HEAD --lost------------>  DONE           502 upstream_connection_closed
    AWAITING_HEAD --invalid--------->  DONE           502 upstream_invalid_response
    RELAYING     --lost / invalid--->  DONE           close the client (the head is out)
    STREAMING    --lost / invalid--->  DONE           end the stream with an SSE error event
    WAITING / CONNECTING / AWAITING_HEAD --timeout-->  DONE  504 upstream_timeout
    RELAYING     --timeout---------->  DONE           close the client (the head is out)
    STREAMING    --timeout---------->  DONE           close the client (a stall: no clean end)
    any but DONE --client_gone------>  DONE           drop the upstream connection (499)

A translated answer whose record must be stored first (/v1/responses with history: the
Translation's `settle()` gives a write still running) waits for it before its last bytes:

    COMPLETE     --settle----------->  SETTLING       hold the last bytes; the upstream is done
    SETTLING     --settled---------->  COMPLETE       the write ended (stored or failed): emit
    SETTLING     --client_gone------>  DONE           drop the upstream connection (499)

SETTLING ignores the request timeout: the worker answered in time, and the write is
bounded by the store's own op timeout.

Retry edges. The exchange sends the `*_retry` flavour of a failure when another attempt is
allowed (attempts left, and the request body still held: `--max-buffered-request-bytes`);
they only matter before the response head, when nothing reached the client:

    CONNECTING    --connect_failed_retry-->  BACKOFF     nothing was sent: try elsewhere
    AWAITING_HEAD --lost_retry / invalid_retry-->  BACKOFF
    AWAITING_HEAD --retry_head------->  DISCARDING   a retryable status (408 429 500 502-504):
                                                     read its body, relay nothing
    DISCARDING   --complete--------->  DRAINED       read in full: the connection may be reused
    DRAINED      --flushed---------->  BACKOFF       end the attempt, wait, then try again
    DISCARDING   --lost / invalid--->  BACKOFF       (a close-delimited body ends this way too)
    BACKOFF      --backoff_over----->  WAITING       choose a worker again and start
    WAITING      --no_worker-------->  DONE          503: no worker left to try
    DISCARDING / DRAINED / BACKOFF --timeout--> DONE  504 upstream_timeout

Once the head is relayed there is no way back: RELAYING and STREAMING take the retry
flavours exactly as the plain ones. A request written upstream is sent again only from
the retry edges above, i.e. only while the gateway still holds its body and the worker
answered nothing the client saw. A POST is not idempotent, and a worker that reset the
connection may have run the request: SMG retries it all the same (its retry loop wraps
the whole send), and so does this gateway; `--disable-retries` turns that off. A pooled
connection whose peer is provably gone before anything was written is never handed to an
exchange in the first place (`WorkerPool.take_idle` checks for the peer's close at reuse),
so that case costs no attempt.

A close-delimited response ends with the connection: the exchange turns that `lost` into
`complete` itself, since only it knows how the response was framed.

Pairs missing from the table are ignored (`IGNORE`, state unchanged): callbacks arrive late
by nature (a connect that finishes after the client left, a timeout racing a completion, a
backoff timer firing after the client left). Body chunks are not events: they can only
follow a head from the same parser, so the hot path skips the table for them.
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
    STREAMING = 6  # an SSE head relayed in chunked framing: the gateway can end it cleanly
    DISCARDING = 7  # a retryable answer is being read and dropped (the client sees nothing)
    DRAINED = 8  # that answer was read in full; the flush at the end of the read retries
    BACKOFF = 9  # between attempts: waiting out the backoff, no worker chosen
    SETTLING = 10  # complete, its last bytes held until the answer's store write ends


class Event(enum.IntEnum):
    SLOT = 0  # the pool grants a slot to a waiting exchange
    CONNECTION = 1  # a live connection is bound to the exchange
    CONNECT_FAILED = 2  # opening a connection failed or timed out
    HEAD = 3  # a final (>= 200) response head arrived
    COMPLETE = 4  # the upstream response message is complete
    FLUSHED = 5  # buffered output was handed to the client
    LOST = 6  # the upstream connection closed
    INVALID = 7  # the upstream sent bytes that are not a valid response
    TIMEOUT = 8  # --request-timeout-secs expired (the whole request, every attempt)
    CLIENT_GONE = 9  # the client connection closed
    RETRY_HEAD = 10  # a final head with a retryable status, and another attempt is allowed
    CONNECT_FAILED_RETRY = 11  # CONNECT_FAILED, and another attempt is allowed
    LOST_RETRY = 12  # LOST, and another attempt is allowed
    INVALID_RETRY = 13  # INVALID, and another attempt is allowed
    SSE = 14  # the relayed head is an event stream the gateway frames in chunks
    BACKOFF_OVER = 15  # the backoff before the next attempt has passed
    NO_WORKER = 16  # the next attempt found no worker to go to
    SETTLE = 17  # the complete answer's store write is still running
    SETTLED = 18  # that write ended


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
    DISCARD = 13  # read the retryable answer without relaying it
    DRAINED = 14  # the discarded answer is complete: note whether its connection is reusable
    RETRY = 15  # end this attempt (release or drop its connection), back off, try again
    ATTEMPT = 16  # choose a worker again (leaving out those that failed) and start
    FAIL_NO_WORKER = 17  # 503: the retry found no worker
    WATCH = 18  # an SSE stream: keep-alive frames on silence, an error event if it breaks
    END_STREAM_ERROR = 19  # the worker broke the stream: error event, [DONE], chunked end
    HOLD = 20  # keep the answer's last bytes until the store write ends
    EMIT = 21  # write the held last bytes; the flush then finishes as COMPLETE does


S, E, A = State, Event, Action

TRANSITIONS: dict[tuple[State, Event], tuple[State, Action]] = {
    (S.WAITING, E.SLOT): (S.CONNECTING, A.OPEN),
    (S.WAITING, E.CONNECTION): (S.AWAITING_HEAD, A.WRITE),
    (S.WAITING, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.WAITING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.WAITING, E.NO_WORKER): (S.DONE, A.FAIL_NO_WORKER),
    (S.CONNECTING, E.CONNECTION): (S.AWAITING_HEAD, A.WRITE),
    (S.CONNECTING, E.CONNECT_FAILED): (S.DONE, A.FAIL_CONNECT),
    (S.CONNECTING, E.CONNECT_FAILED_RETRY): (S.BACKOFF, A.RETRY),
    (S.CONNECTING, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.CONNECTING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.AWAITING_HEAD, E.HEAD): (S.RELAYING, A.RELAY_HEAD),
    (S.AWAITING_HEAD, E.RETRY_HEAD): (S.DISCARDING, A.DISCARD),
    (S.AWAITING_HEAD, E.LOST): (S.DONE, A.FAIL_CLOSED),
    (S.AWAITING_HEAD, E.LOST_RETRY): (S.BACKOFF, A.RETRY),
    (S.AWAITING_HEAD, E.INVALID): (S.DONE, A.FAIL_INVALID),
    (S.AWAITING_HEAD, E.INVALID_RETRY): (S.BACKOFF, A.RETRY),
    (S.AWAITING_HEAD, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.AWAITING_HEAD, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.RELAYING, E.SSE): (S.STREAMING, A.WATCH),
    (S.RELAYING, E.COMPLETE): (S.COMPLETE, A.END_MESSAGE),
    (S.RELAYING, E.LOST): (S.DONE, A.ABORT),
    (S.RELAYING, E.LOST_RETRY): (S.DONE, A.ABORT),
    (S.RELAYING, E.INVALID): (S.DONE, A.ABORT),
    (S.RELAYING, E.INVALID_RETRY): (S.DONE, A.ABORT),
    (S.RELAYING, E.TIMEOUT): (S.DONE, A.ABORT_TIMEOUT),
    (S.RELAYING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.STREAMING, E.COMPLETE): (S.COMPLETE, A.END_MESSAGE),
    (S.STREAMING, E.LOST): (S.DONE, A.END_STREAM_ERROR),
    (S.STREAMING, E.LOST_RETRY): (S.DONE, A.END_STREAM_ERROR),
    (S.STREAMING, E.INVALID): (S.DONE, A.END_STREAM_ERROR),
    (S.STREAMING, E.INVALID_RETRY): (S.DONE, A.END_STREAM_ERROR),
    (S.STREAMING, E.TIMEOUT): (S.DONE, A.ABORT_TIMEOUT),
    (S.STREAMING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.COMPLETE, E.FLUSHED): (S.DONE, A.FINISH),
    (S.COMPLETE, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.COMPLETE, E.SETTLE): (S.SETTLING, A.HOLD),
    (S.SETTLING, E.SETTLED): (S.COMPLETE, A.EMIT),
    (S.SETTLING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.DISCARDING, E.COMPLETE): (S.DRAINED, A.DRAINED),
    (S.DISCARDING, E.LOST): (S.BACKOFF, A.RETRY),
    (S.DISCARDING, E.LOST_RETRY): (S.BACKOFF, A.RETRY),
    (S.DISCARDING, E.INVALID): (S.BACKOFF, A.RETRY),
    (S.DISCARDING, E.INVALID_RETRY): (S.BACKOFF, A.RETRY),
    (S.DISCARDING, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.DISCARDING, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.DRAINED, E.FLUSHED): (S.BACKOFF, A.RETRY),
    (S.DRAINED, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.DRAINED, E.CLIENT_GONE): (S.DONE, A.DROP),
    (S.BACKOFF, E.BACKOFF_OVER): (S.WAITING, A.ATTEMPT),
    (S.BACKOFF, E.TIMEOUT): (S.DONE, A.FAIL_TIMEOUT),
    (S.BACKOFF, E.CLIENT_GONE): (S.DONE, A.DROP),
}

# States in which the client has seen nothing of the answer yet (a retry is still honest).
BEFORE_HEAD = frozenset(
    {S.WAITING, S.CONNECTING, S.AWAITING_HEAD, S.DISCARDING, S.DRAINED, S.BACKOFF}
)

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
