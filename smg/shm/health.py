"""Operations on the per-worker health blocks of the shared table: circuit breaker,
liveness (stall), overload flag. Any process calls them; every change goes through an
atomic operation on the mapping (`WorkerTable.atomic`), so no lock and no single writer is
needed, and the gateway agrees on one state per worker.

Who changes what:

- the breaker state word changes only by compare-and-swap from the word read to its
  successor (`smg.dataplane.breaker.successor`); the winner is the one writer of that
  transition, counts it in its metrics and bumps ``G_HEALTH_EPOCH``, so every data-plane
  process re-filters its routing before its next request;
- counters (consecutive failures, half-open successes, half-open trials) carry the epoch
  they belong to (``epoch << 32 | count``) and are moved by a compare-and-swap loop, which
  is a fetch-add that starts from zero when the epoch has moved on;
- the flags word (stalled, overloaded) changes by fetch-or / fetch-and; whoever flips a bit
  bumps ``G_HEALTH_EPOCH``. Overload is set only by the control plane (after a load poll).
- contact and transport-failure times are plain stores of monotonic nanoseconds
  (``CLOCK_MONOTONIC`` is one clock for every process of the machine).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from smg.dataplane import breaker
from smg.dataplane.breaker import CLOSED, HALF_OPEN, OPEN, Event
from smg.shm.layout import (
    G_HEALTH_EPOCH,
    H_CB_CHANGED_NS,
    H_CB_FAILURES,
    H_CB_STATE,
    H_CB_SUCCESSES,
    H_CB_TRIALS,
    H_FLAGS,
    H_LAST_CONTACT_NS,
    H_TRANSPORT_FAILURE_NS,
)

if TYPE_CHECKING:
    from smg.shm.table import WorkerTable

FLAG_STALLED = 1
FLAG_OVERLOADED = 2

Transition = tuple[int, int]  # (from state, to state), for the winner's metrics


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class HealthBlocks:
    """The health blocks of one table, with the breaker and stall settings."""

    __slots__ = (
        "atomic",
        "epoch_offset",
        "failure_threshold",
        "stall_ns",
        "success_threshold",
        "table",
        "timeout_ms",
    )

    def __init__(
        self,
        table: WorkerTable,
        *,
        failure_threshold: int = 10,
        success_threshold: int = 3,
        timeout_secs: float = 60.0,
        stall_secs: float = 2.0,
    ) -> None:
        self.table = table
        self.atomic = table.atomic
        self.epoch_offset = table.global_offset(G_HEALTH_EPOCH)
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_ms = int(timeout_secs * 1000)
        self.stall_ns = int(stall_secs * 1e9)

    # --- reading -----------------------------------------------------------------------------

    def offset(self, row: int, word: int) -> int:
        return self.table.health_offset(row, word)

    def word(self, row: int) -> int:
        return self.atomic.load_u64(self.offset(row, H_CB_STATE))

    def state(self, row: int) -> int:
        return self.word(row) & 3

    def flags(self, row: int) -> int:
        return self.atomic.load_u64(self.offset(row, H_FLAGS))

    def counts(self, row: int) -> tuple[int, int, int]:
        """(consecutive failures, half-open successes, half-open trials) of the current state."""
        epoch = breaker.unpack(self.word(row)).epoch
        load = self.atomic.load_u64
        return (
            breaker.count_in(load(self.offset(row, H_CB_FAILURES)), epoch),
            breaker.count_in(load(self.offset(row, H_CB_SUCCESSES)), epoch),
            breaker.count_in(load(self.offset(row, H_CB_TRIALS)), epoch),
        )

    def health_epoch(self) -> int:
        return self.atomic.load_u64(self.epoch_offset)

    def bump(self) -> None:
        self.atomic.fetch_add_u64(self.epoch_offset, 1)

    # --- breaker -----------------------------------------------------------------------------

    def transition(self, row: int, word: int, event: Event, at_ms: int) -> Transition | None:
        """Apply `event` to the breaker whose state word was `word`; the (from, to) pair
        when this call won the compare-and-swap, None when nothing changed or another
        process changed the word first."""
        new = breaker.successor(word, event, at_ms)
        if new is None:
            return None
        if self.atomic.cas_u64(self.offset(row, H_CB_STATE), word, new) != word:
            return None
        self.atomic.store_u64(self.offset(row, H_CB_CHANGED_NS), at_ms * 1_000_000)
        self.bump()
        return word & 3, new & 3

    def _count_up(self, offset: int, epoch: int, limit: int = 0) -> int:
        """Add one to the counter at `offset` for `epoch`; the new count, or -1 when
        `limit` (> 0) is already reached."""
        atomic = self.atomic
        while True:
            current = atomic.load_u64(offset)
            count = breaker.count_in(current, epoch)
            if limit and count >= limit:
                return -1
            if atomic.cas_u64(offset, current, breaker.counter(epoch, count + 1)) == current:
                return count + 1

    def failure(self, row: int, at_ms: int) -> Transition | None:
        """A failure outside a half-open trial: counts toward opening a closed breaker."""
        word = self.word(row)
        state, epoch, _changed = breaker.unpack(word)
        if state != CLOSED:
            return None
        if self._count_up(self.offset(row, H_CB_FAILURES), epoch) >= self.failure_threshold:
            return self.transition(row, word, Event.TRIPPED, at_ms)
        return None

    def clear_failures(self, row: int) -> None:
        """A success: the consecutive failures start again from zero (one compare-and-swap,
        only when there is a count to clear; losing the race to a failure is fine)."""
        offset = self.offset(row, H_CB_FAILURES)
        current = self.atomic.load_u64(offset)
        if current & breaker.COUNT_MASK:
            self.atomic.cas_u64(offset, current, current & ~breaker.COUNT_MASK)

    def take_trial(self, row: int, epoch: int) -> bool:
        """One of the half-open breaker's trial slots (across the gateway), if one is left
        in `epoch`."""
        word = self.word(row)
        state, current, _changed = breaker.unpack(word)
        if state != HALF_OPEN or current != epoch:
            return state == CLOSED
        offset = self.offset(row, H_CB_TRIALS)
        return self._count_up(offset, epoch, self.success_threshold) > 0

    def trial_outcome(self, row: int, epoch: int, ok: bool, at_ms: int) -> Transition | None:
        word = self.word(row)
        state, current, _changed = breaker.unpack(word)
        if state != HALF_OPEN or current != epoch:
            return None  # the half-open this trial belonged to is over
        if not ok:
            return self.transition(row, word, Event.TRIAL_FAILED, at_ms)
        offset = self.offset(row, H_CB_SUCCESSES)
        if self._count_up(offset, epoch) >= self.success_threshold:
            return self.transition(row, word, Event.TRIALS_SUCCEEDED, at_ms)
        return None

    def tick(self, row: int, at_ms: int) -> Transition | None:
        """What time alone does: open -> half-open after the timeout; a half-open whose
        trials are all out for a timeout without a verdict reopens."""
        word = self.word(row)
        state, epoch, _changed = breaker.unpack(word)
        if state == CLOSED:
            return None
        trials = breaker.count_in(self.atomic.load_u64(self.offset(row, H_CB_TRIALS)), epoch)
        event = breaker.timed_event(word, at_ms, self.timeout_ms, trials >= self.success_threshold)
        if event is None:
            return None
        return self.transition(row, word, event, at_ms)

    def reset(self, row: int, at_ms: int) -> Transition | None:
        word = self.word(row)
        if word & 3 == CLOSED:
            return None
        return self.transition(row, word, Event.RESET, at_ms)

    def open_until_ms(self, row: int) -> int:
        """When a non-closed breaker's next timed event is due (0 when closed)."""
        state, _epoch, changed = breaker.unpack(self.word(row))
        return 0 if state == CLOSED else changed + self.timeout_ms

    # --- liveness and overload --------------------------------------------------------------------

    def note_contact(self, row: int, at_ns: int) -> None:
        self.atomic.store_u64(self.offset(row, H_LAST_CONTACT_NS), at_ns)

    def last_contact(self, row: int) -> int:
        return self.atomic.load_u64(self.offset(row, H_LAST_CONTACT_NS))

    def _set_flag(self, row: int, flag: int, on: bool) -> bool:
        """Set or clear `flag`; True (and the epoch bumped) when this call changed it."""
        offset = self.offset(row, H_FLAGS)
        if on:
            changed = not self.atomic.fetch_or_u64(offset, flag) & flag
        else:
            changed = bool(self.atomic.fetch_and_u64(offset, ~flag & 0xFFFFFFFFFFFFFFFF) & flag)
        if changed:
            self.bump()
        return changed

    def transport_failure(self, row: int, at_ns: int) -> bool:
        """No response from the worker (refused, reset, timed out before the head). It is
        stalled now when nothing was heard from it for the stall time; True when this call
        set the flag. A failure right after a contact is left to `sweep`."""
        self.atomic.store_u64(self.offset(row, H_TRANSPORT_FAILURE_NS), at_ns)
        if at_ns - self.last_contact(row) >= self.stall_ns:
            return self._set_flag(row, FLAG_STALLED, True)
        return False

    def sweep(self, row: int, at_ns: int) -> bool:
        """Stall a worker that stayed silent for the stall time since a transport failure."""
        load = self.atomic.load_u64
        contact = load(self.offset(row, H_LAST_CONTACT_NS))
        failed = load(self.offset(row, H_TRANSPORT_FAILURE_NS))
        if failed > contact and at_ns - contact >= self.stall_ns:
            return self._set_flag(row, FLAG_STALLED, True)
        return False

    def contact(self, row: int, at_ns: int) -> Transition | None:
        """The worker answered (a response, a passed probe, a load poll): it is reachable.
        Ends a stall; a worker re-admitted that way has its breaker reset too, as SMG does
        (the outage's refusals opened it). Returns the breaker transition if this call won
        it."""
        self.note_contact(row, at_ns)
        if self.flags(row) & FLAG_STALLED and self._set_flag(row, FLAG_STALLED, False):
            return self.reset(row, at_ns // 1_000_000)
        return None

    def set_overloaded(self, row: int, overloaded: bool) -> bool:
        return self._set_flag(row, FLAG_OVERLOADED, overloaded)

    # --- lifecycle -----------------------------------------------------------------------------

    def reset_block(self, row: int, at_ns: int) -> None:
        """A row (re)assigned to a worker starts closed, unflagged, just contacted: a new
        epoch, so counts of the row's previous worker no longer count."""
        offset = self.offset(row, H_CB_STATE)
        atomic = self.atomic
        at_ms = at_ns // 1_000_000
        while True:
            word = atomic.load_u64(offset)
            fresh = breaker.pack(CLOSED, breaker.unpack(word).epoch + 1, at_ms)
            if atomic.cas_u64(offset, word, fresh) == word:
                break
        for word_offset in (H_CB_FAILURES, H_CB_SUCCESSES, H_CB_TRIALS, H_FLAGS):
            atomic.store_u64(self.offset(row, word_offset), 0)
        atomic.store_u64(self.offset(row, H_CB_CHANGED_NS), at_ns)
        atomic.store_u64(self.offset(row, H_LAST_CONTACT_NS), at_ns)
        atomic.store_u64(self.offset(row, H_TRANSPORT_FAILURE_NS), 0)
        self.bump()


def blocks_for(table: WorkerTable, cfg: object) -> HealthBlocks:
    """`HealthBlocks` with the breaker and stall settings of a `GatewayConfig`."""
    return HealthBlocks(
        table,
        failure_threshold=int(getattr(cfg, "cb_failure_threshold", 10)),
        success_threshold=int(getattr(cfg, "cb_success_threshold", 3)),
        timeout_secs=float(getattr(cfg, "cb_timeout_duration_secs", 60)),
        stall_secs=float(getattr(cfg, "worker_stall_secs", 2)),
    )


__all__ = [
    "CLOSED",
    "FLAG_OVERLOADED",
    "FLAG_STALLED",
    "HALF_OPEN",
    "OPEN",
    "HealthBlocks",
    "Transition",
    "blocks_for",
    "now_ms",
]
