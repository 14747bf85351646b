"""The circuit breaker of one worker, as pure code: states, events, the transition table,
the encoding of the shared state word, and which outcomes count as failures.

Semantics follow the Rust SMG 1.13 (`model_gateway/src/worker/circuit_breaker.rs`,
`worker.rs::record_outcome`, `resilience.rs`):

- Closed counts *consecutive* failures; any success resets the count. At
  `--cb-failure-threshold` failures the breaker opens. `--cb-window-duration-secs` is
  accepted and validated, but SMG never reads it when counting, and neither does smg.
- A failure is an attempt whose status is one of SMG's default retryable statuses (408,
  429, 500, 502, 503, 504) or a transport failure (no response head: refused, reset, timed
  out; SMG records those as the 502/504 it answers). Every other status, 4xx included,
  counts as a success.
- Open lets nothing through for `--cb-timeout-duration-secs`, then becomes HalfOpen.
- HalfOpen: a failed trial reopens at once; `--cb-success-threshold` successful trials
  close it. SMG's HalfOpen admits every request; smg admits at most
  `--cb-success-threshold` trial requests across the whole gateway (issue 7), and a
  HalfOpen whose trials all went out but never all came back reopens after another
  timeout (`TRIALS_EXPIRED`), so a lost outcome cannot hold a worker out for good.
- A worker re-admitted by liveness after it was unreachable has its breaker reset
  (`RESET`), as SMG's `liveness.rs` does: the outage's connection failures opened it, and
  the contact that ended the veto says the worker is back.

The state lives in one 64-bit word per worker in the shared table, changed only by
compare-and-swap: ``changed_ms << 26 | epoch << 2 | state``. The epoch moves on every
transition, so a transition happens once (the CAS winner's) and the counters, which carry
the epoch they belong to in their top half, restart from zero with each new state.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

CLOSED = 0
OPEN = 1
HALF_OPEN = 2
STATE_NAMES = ("closed", "open", "half_open")


class Event(IntEnum):
    TRIPPED = 1  # consecutive failures reached --cb-failure-threshold
    TIMED_OUT = 2  # open for --cb-timeout-duration-secs
    TRIAL_FAILED = 3  # a half-open trial failed
    TRIALS_SUCCEEDED = 4  # --cb-success-threshold trials succeeded
    TRIALS_EXPIRED = 5  # half-open for a timeout with its trials out and no verdict
    RESET = 6  # the worker answered again after a stall (liveness re-admission)


# (state, event) -> next state; a pair not listed leaves the state as it is.
TRANSITIONS: dict[tuple[int, Event], int] = {
    (CLOSED, Event.TRIPPED): OPEN,
    (OPEN, Event.TIMED_OUT): HALF_OPEN,
    (HALF_OPEN, Event.TRIAL_FAILED): OPEN,
    (HALF_OPEN, Event.TRIALS_SUCCEEDED): CLOSED,
    (HALF_OPEN, Event.TRIALS_EXPIRED): OPEN,
    (OPEN, Event.RESET): CLOSED,
    (HALF_OPEN, Event.RESET): CLOSED,
}


def next_state(state: int, event: Event) -> int | None:
    """The state after `event`, or None when `event` changes nothing in `state`."""
    return TRANSITIONS.get((state, event))


# Statuses SMG counts as failures (its DEFAULT_RETRYABLE_STATUS_CODES); 0 = no response.
FAILURE_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})


def is_failure(status: int) -> bool:
    return status in FAILURE_STATUSES


# --- the shared state word ------------------------------------------------------------------

STATE_BITS = 2
EPOCH_BITS = 24
EPOCH_MASK = (1 << EPOCH_BITS) - 1
TIME_SHIFT = STATE_BITS + EPOCH_BITS
TIME_MASK = (1 << (64 - TIME_SHIFT)) - 1  # 38 bits of milliseconds: 8.7 years of uptime


class Word(NamedTuple):
    state: int
    epoch: int
    changed_ms: int  # monotonic milliseconds of the transition that set this word


def pack(state: int, epoch: int, changed_ms: int) -> int:
    return (changed_ms & TIME_MASK) << TIME_SHIFT | (epoch & EPOCH_MASK) << STATE_BITS | state & 3


def unpack(word: int) -> Word:
    return Word(word & 3, (word >> STATE_BITS) & EPOCH_MASK, word >> TIME_SHIFT)


def successor(word: int, event: Event, now_ms: int) -> int | None:
    """The word after `event` (next epoch, stamped `now_ms`), or None if nothing changes."""
    state, epoch, _changed = unpack(word)
    new = next_state(state, event)
    if new is None:
        return None
    return pack(new, epoch + 1, now_ms)


def timed_event(word: int, now_ms: int, timeout_ms: int, trials_out: bool) -> Event | None:
    """The event time alone brings to `word`: an open breaker's timeout, or an expired
    half-open whose trials are all out (`trials_out`) without a verdict."""
    state, _epoch, changed = unpack(word)
    if now_ms - changed < timeout_ms:
        return None
    if state == OPEN:
        return Event.TIMED_OUT
    if state == HALF_OPEN and trials_out:
        return Event.TRIALS_EXPIRED
    return None


# --- epoch-tagged counters --------------------------------------------------------------------
# Each counter word is ``epoch << 32 | count``: a count whose tag is not the current epoch
# belongs to an earlier state and reads as zero.

COUNT_MASK = (1 << 32) - 1


def count_in(word: int, epoch: int) -> int:
    return word & COUNT_MASK if word >> 32 == epoch else 0


def counter(epoch: int, count: int) -> int:
    return epoch << 32 | count
