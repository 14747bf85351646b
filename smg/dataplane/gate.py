"""Which workers may take a request now: circuit breakers, overload protection, stalls.

Per request, in the data plane:

    rows = gate.filter(candidate_rows)       # None: shed (503 worker_overload_protection_shed)
    row = policy.select(rows, ...)
    if not gate.claim(row): ...              # half-open trial slots taken: choose again
    ... one attempt ...
    gate.record(row, generation, status)     # after each attempt: status 0 = transport failure

Everything the gate decides from lives in the workers' health blocks in the shared table
(`smg.shm.health`), so every data-plane process sees the same breakers and flags. The
gate does not read them per request: it keeps a local view, rebuilt when
``G_HEALTH_EPOCH`` moves (every breaker transition, stall and overload change bumps it).
When nothing is left out (the normal case) `filter` is one load and one compare and
returns its argument, `claim` one truth test, and `record` of a success a clock read and
one load; contact is stored at most every 100 ms per worker and process.

Routing rules (SMG 1.13, `worker/overload.rs`, `worker/liveness.rs`): an open breaker,
a half-open one with no trial slot left, a stalled worker and an overloaded worker are
left out while another candidate is free of all of them. When every candidate is vetoed
by overload or stall, the request goes to the least-loaded (in flight, gateway-wide)
candidate whose breaker lets it through, overloaded-only ones first; with
``--worker-overload-shed`` a pool that is all overloaded is refused instead (None), and an
overloaded worker is never the fallback. An empty list means none can take it (every
breaker open): the caller answers 503 ``no_available_workers``.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from smg.dataplane.breaker import CLOSED, FAILURE_STATUSES, HALF_OPEN, OPEN, STATE_NAMES
from smg.promtext import Family, Sample
from smg.shm.health import FLAG_OVERLOADED, FLAG_STALLED, Transition, blocks_for
from smg.shm.layout import G_HEALTH_EPOCH, H_CB_FAILURES, H_CB_STATE, H_FLAGS

# The outcome `record` gets when the client left before the worker answered (the status
# smg logs for it, as nginx does).
CLIENT_LEFT = 499

if TYPE_CHECKING:
    from collections.abc import Mapping

    from smg.config import GatewayConfig
    from smg.shm.directory import DirectoryEntry
    from smg.shm.table import WorkerTable

CONTACT_EVERY_NS = 100_000_000  # store a worker's last contact at most this often


class WorkerGate:
    __slots__ = (
        "bases",
        "blocked",
        "blocks",
        "breaker_on",
        "cache",
        "cb_blocked",
        "cfg",
        "contact_stamps",
        "deadline_ms",
        "epoch_load",
        "failure_cells",
        "failures",
        "fallbacks",
        "half_open",
        "overloaded",
        "pd_shed_count",
        "seen_epoch",
        "shed",
        "shed_count",
        "slot",
        "stalled",
        "successes",
        "table",
        "transitions",
        "trials",
        "vetoed",
    )

    def __init__(self, cfg: GatewayConfig, table: WorkerTable, slot: int) -> None:
        self.cfg = cfg
        self.table = table
        self.slot = slot
        self.blocks = blocks_for(table, cfg)
        self.breaker_on = not cfg.disable_circuit_breaker
        self.shed = bool(cfg.worker_overload_shed)
        atomic = table.atomic
        self.epoch_load = atomic.cell_u64(table.global_offset(G_HEALTH_EPOCH)).load
        # Loads of each row's consecutive-failure word, bound once (a success reads it).
        self.failure_cells = [
            atomic.cell_u64(table.health_offset(row, H_CB_FAILURES)).load
            for row in range(table.capacity)
        ]
        self.bases = [table.health_offset(row) for row in range(table.capacity)]
        self.seen_epoch = -1
        self.vetoed = False  # anything left out or half-open: the slow paths run
        self.blocked: frozenset[int] = frozenset()  # left out while others are free
        self.cb_blocked: frozenset[int] = frozenset()  # breaker lets nothing through
        self.stalled: frozenset[int] = frozenset()
        self.overloaded: frozenset[int] = frozenset()
        self.half_open: dict[int, int] = {}  # row -> epoch of its half-open state
        self.deadline_ms = 0  # earliest timed breaker event due (0: none)
        self.cache: dict[int, tuple[list[int], list[int]]] = {}  # id(rows) -> (rows, kept)
        self.trials: dict[int, tuple[int, int]] = {}  # row -> (epoch, trials this process holds)
        self.contact_stamps = [0] * table.capacity
        # Metrics, this process's share (the exporter adds the processes up).
        # Outcomes per row, successes and failures: lists, so counting one allocates nothing.
        self.successes = [0] * table.capacity
        self.failures = [0] * table.capacity
        self.transitions: dict[tuple[int, int, int], int] = {}  # (row, from, to) -> count
        self.fallbacks = {"overload": 0, "liveness": 0}
        self.shed_count = 0
        # PD mode only (smg.dataplane.pd_window, else None): dispatches shed for want of a
        # decode running-window slot, 1.13's stage "pd_admission" of the same counter.
        self.pd_shed_count: int | None = None

    # --- the three calls ----------------------------------------------------------------------

    def filter(self, rows: list[int]) -> list[int] | None:
        """The rows a request may go to now (the same list when none is left out), or None
        when the request must be shed (every candidate overloaded and shedding is on)."""
        if self.epoch_load() != self.seen_epoch:
            self._refresh()
        if not self.vetoed:
            return rows
        return self._filter_vetoed(rows)

    def claim(self, row: int) -> bool:
        """After the policy chose `row`: False when it may not take this request after all
        (its half-open breaker has no trial slot left); the caller chooses again without it."""
        if not self.half_open:
            return True
        epoch = self.half_open.get(row)
        if epoch is None:
            return True
        if self.blocks.take_trial(row, epoch):
            held = self.trials.get(row)
            count = held[1] + 1 if held is not None and held[0] == epoch else 1
            self.trials[row] = (epoch, count)
            return True
        # Every trial slot of this half-open is taken (here or elsewhere): leave the row
        # out until its state changes (the change bumps the epoch and rebuilds the view).
        self._block(row)
        return False

    def record(self, row: int, generation: int, status: int) -> None:
        """The outcome of one attempt on `row`: the final upstream status, 0 for a
        transport failure (refused, reset, timed out before the response head), or
        CLIENT_LEFT (499) when the client went away before any answer."""
        if status in FAILURE_STATUSES:
            self._record_failure(row, generation, status)
            return
        if status == CLIENT_LEFT:
            # The client left before any answer: it says nothing of the worker (no contact,
            # no success). A trial it held is not given back: the half-open that misses an
            # outcome reopens after another timeout (see smg.shm.health).
            self._drop_trial(row)
            return
        self.successes[row] += 1
        now = time.monotonic_ns()
        if now - self.contact_stamps[row] >= CONTACT_EVERY_NS:
            self._contact(row, generation, now)
        if self.failure_cells[row]() & 0xFFFFFFFF:
            self.blocks.clear_failures(row)
        if self.trials:
            self._trial_outcome(row, True, now)

    # --- slow paths --------------------------------------------------------------------------

    def _record_failure(self, row: int, generation: int, status: int) -> None:
        self.failures[row] += 1
        if self.table.read_row(row).generation != generation:
            return  # the row belongs to another worker now: this outcome is not its own
        now = time.monotonic_ns()
        blocks = self.blocks
        if status == 0:
            blocks.transport_failure(row, now)
        else:
            self._contact(row, generation, now)  # it answered, with an error
        if not self.breaker_on:
            return
        held = self.trials.get(row)
        if held is not None:
            self._trial_outcome(row, False, now)
            return
        self._count(row, blocks.failure(row, now // 1_000_000))

    def _contact(self, row: int, generation: int, now: int) -> None:
        self.contact_stamps[row] = now
        if self.stalled and row in self.stalled:
            if self.table.read_row(row).generation != generation:
                return
            self._count(row, self.blocks.contact(row, now))
        else:
            self.blocks.note_contact(row, now)

    def _drop_trial(self, row: int) -> int | None:
        """Forget one trial this process holds on `row`; its epoch, or None if none."""
        held = self.trials.get(row)
        if held is None:
            return None
        epoch, count = held
        if count <= 1:
            del self.trials[row]
        else:
            self.trials[row] = (epoch, count - 1)
        return epoch

    def _trial_outcome(self, row: int, ok: bool, now: int) -> None:
        epoch = self._drop_trial(row)
        if epoch is None:
            return
        if self.breaker_on:
            self._count(row, self.blocks.trial_outcome(row, epoch, ok, now // 1_000_000))

    def _count(self, row: int, transition: Transition | None) -> None:
        if transition is None:
            return
        key = (row, transition[0], transition[1])
        self.transitions[key] = self.transitions.get(key, 0) + 1

    def _block(self, row: int) -> None:
        self.blocked = self.blocked | {row}
        self.cb_blocked = self.cb_blocked | {row}
        self.cache.clear()

    def _refresh(self) -> None:
        """Rebuild the local view from the health blocks. The epoch is read first: a change
        made during the scan bumps it again, and the next request rescans."""
        self.seen_epoch = self.epoch_load()
        table = self.table
        load = table.atomic.load_u64
        breaker_on = self.breaker_on
        cb_blocked: set[int] = set()
        stalled: set[int] = set()
        overloaded: set[int] = set()
        half_open: dict[int, int] = {}
        deadline = 0
        timeout_ms = self.blocks.timeout_ms
        for row, base in enumerate(self.bases):
            flags = load(base + H_FLAGS)
            if flags & FLAG_STALLED:
                stalled.add(row)
            if flags & FLAG_OVERLOADED:
                overloaded.add(row)
            if not breaker_on:
                continue
            word = load(base + H_CB_STATE)
            state = word & 3
            if state == CLOSED:
                continue
            due = (word >> 26) + timeout_ms
            deadline = due if not deadline else min(deadline, due)
            if state == OPEN:
                cb_blocked.add(row)
            elif state == HALF_OPEN:
                half_open[row] = (word >> 2) & 0xFFFFFF
        self.cb_blocked = frozenset(cb_blocked)
        self.stalled = frozenset(stalled)
        self.overloaded = frozenset(overloaded)
        self.blocked = self.cb_blocked | self.stalled | self.overloaded
        self.half_open = half_open
        self.deadline_ms = deadline
        self.vetoed = bool(self.blocked or half_open)
        self.cache.clear()
        # Trials this process held in a half-open that is over will never count.
        for row, (epoch, _count) in list(self.trials.items()):
            if half_open.get(row) != epoch:
                del self.trials[row]

    def _tick(self, now_ms: int) -> None:
        """Timed breaker events that are due (open -> half-open, stuck half-open -> open);
        the control plane does the same every 100 ms, whoever comes first wins."""
        blocks = self.blocks
        upcoming = 0
        for row in self.cb_blocked | self.half_open.keys():
            transition = blocks.tick(row, now_ms)
            self._count(row, transition)
            if transition is None:
                due = blocks.open_until_ms(row)
                if due > now_ms:
                    upcoming = due if not upcoming else min(upcoming, due)
        self.deadline_ms = upcoming
        if self.epoch_load() != self.seen_epoch:
            self._refresh()

    def _filter_vetoed(self, rows: list[int]) -> list[int] | None:
        if self.deadline_ms and time.monotonic_ns() // 1_000_000 >= self.deadline_ms:
            self._tick(time.monotonic_ns() // 1_000_000)
            if not self.vetoed:
                return rows
        cached = self.cache.get(id(rows))
        if cached is not None and cached[0] is rows:
            return cached[1]
        blocked = self.blocked
        kept = [row for row in rows if row not in blocked]
        if kept or not rows:
            # Keyed by identity: routing hands out the same list objects until it rebuilds
            # them, and the entry holds the list so its id cannot be reused meanwhile.
            if len(self.cache) >= 256:
                self.cache.clear()  # lists of rebuilt routing states pile up otherwise
            self.cache[id(rows)] = (rows, kept if len(kept) < len(rows) else rows)
            return self.cache[id(rows)][1]
        return self._fallback(rows)

    def _fallback(self, rows: list[int]) -> list[int] | None:
        overloaded = self.overloaded
        if self.shed and all(row in overloaded for row in rows):
            self.shed_count += 1
            return None
        cb_blocked = self.cb_blocked
        usable = [row for row in rows if row not in cb_blocked]
        first = [] if self.shed else [row for row in usable if row not in self.stalled]
        if first:
            self.fallbacks["overload"] += 1
            return [self._least_loaded(first)]
        second = [row for row in usable if not (self.shed and row in overloaded)]
        if second:
            self.fallbacks["liveness"] += 1
            return [self._least_loaded(second)]
        return []

    def _least_loaded(self, rows: list[int]) -> int:
        in_flight = self.table.in_flight
        loads = [in_flight(row) for row in rows]
        low = min(loads)
        return random.choice([row for row, load in zip(rows, loads) if load == low])

    # --- metrics -------------------------------------------------------------------------------

    def families(self, entries: Mapping[int, DirectoryEntry], process: int) -> list[Family]:
        """This process's breaker and overload series (SMG's names), `process` labelled."""
        proc = ("process", str(process))

        def worker(row: int) -> str:
            entry = entries.get(row)
            return entry.url if entry is not None else f"row-{row}"

        outcomes = [
            Sample("", [proc, ("worker", worker(row)), ("outcome", outcome)], counts[row])
            for outcome, counts in (("success", self.successes), ("failure", self.failures))
            for row in range(len(counts))
            if counts[row]
        ]
        transitions = [
            Sample(
                "",
                [
                    proc,
                    ("worker", worker(row)),
                    ("from", STATE_NAMES[old]),
                    ("to", STATE_NAMES[new]),
                ],
                value,
            )
            for (row, old, new), value in sorted(self.transitions.items())
        ]
        return [
            Family("smg_worker_cb_outcomes_total", "counter", HELP_OUTCOMES, outcomes),
            Family("smg_worker_cb_transitions_total", "counter", HELP_TRANSITIONS, transitions),
            Family(
                "smg_worker_overload_shed_total",
                "counter",
                HELP_SHED,
                [Sample("", [proc, ("stage", "selection")], self.shed_count)]
                + (
                    []
                    if self.pd_shed_count is None
                    else [Sample("", [proc, ("stage", "pd_admission")], self.pd_shed_count)]
                ),
            ),
            Family(
                "smg_worker_overload_fallback_total",
                "counter",
                HELP_OVERLOAD_FALLBACK,
                [Sample("", [proc, ("stage", "selection")], self.fallbacks["overload"])],
            ),
            Family(
                "smg_worker_liveness_fallback_total",
                "counter",
                HELP_LIVENESS_FALLBACK,
                [Sample("", [proc, ("stage", "selection")], self.fallbacks["liveness"])],
            ),
        ]


HELP_OUTCOMES = "Circuit breaker outcomes by worker and outcome (success/failure)"
HELP_TRANSITIONS = "Circuit breaker state transitions by worker, from, to"
HELP_SHED = (
    "Requests shed because every worker for the model is overloaded, by stage (selection, dispatch)"
)
HELP_OVERLOAD_FALLBACK = (
    "Requests routed to the least-loaded ready worker because every worker for the model "
    "is overloaded, by stage"
)
HELP_LIVENESS_FALLBACK = (
    "Requests routed to the least-loaded ready worker because every worker for the model is "
    "vetoed and the ready ones are vetoed by the liveness tracker, by stage"
)
