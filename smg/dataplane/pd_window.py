"""The PD decode running-window gate for the whole gateway (issue 17): 1.13's
`--pd-admission-wait-secs` ("Seconds a prefill/decode dispatch waits for a free slot in the
decode engine's running window before shedding with 503 worker_overload_protection_shed.
Keep it well under the engine's bootstrap deadline. 0 sheds immediately; engines that
report no running window are never gated").

One implementation for both PD paths (HTTP: smg.dataplane.pd, gRPC: smg.grpc.pd):

- The window of each decode row comes from the control plane in the row's directory entry
  (`DirectoryEntry.pd_window`, smg.control.registry.pd_window: a `max_num_seqs` /
  `max_running_requests` label, else /server_info's `max_running_requests`); 0: never gated.
- A decode leg in flight on a row counts in that row's per-process in-flight word (the
  words the plain path and prefill admission use: on a decode row they count exactly the
  decode legs), and a slot is taken by `claim_within`'s add-then-read, so no more than W
  decode legs ever run on a row across all processes.
- Order (what the help text's "bootstrap deadline" implies: the prefill is already waiting
  on the decode): the prefill leg is dispatched at once; when the decode policy's pick has
  no free slot the decode leg is held. The decode is picked among the decodes with a free
  slot first (any free decode worker is taken at once); only when every routable decode is
  full does the policy pick among them, and the held leg waits for a slot on that row (its
  body, head and rank fields are fixed at dispatch). A hold is retried every millisecond
  (and at once when a decode leg of this process ends), up to the wait: then the prefill
  leg is aborted and the client gets 503 worker_overload_protection_shed with Retry-After
  (the load poll interval, as --worker-overload-shed's sheds). With a wait of 0 nothing is
  dispatched: the request sheds at once. A client leaving, the prefill failing or the
  request timing out while held releases the hold (nothing was counted for the decode).
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import TYPE_CHECKING

from smg.dataplane.pd_admission import RETRY_S, claim_within
from smg.promtext import Family, Sample

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from smg.dataplane.app import DataPlane

SHED_CODE = "worker_overload_protection_shed"


# --- pure parts: a held decode leg's state machine ---------------------------------------------


class HoldState(IntEnum):
    WAITING = 0
    ADMITTED = 1  # a slot was taken: the decode leg goes
    SHED = 2  # the wait ran out: 503
    RELEASED = 3  # the request ended otherwise (client gone, prefill failed, timeout)


class HoldEvent(IntEnum):
    SLOT = 0  # a slot on the row was taken (claim_within)
    EXPIRED = 1  # the wait is over, or the worker left the row
    RELEASE = 2  # the request no longer needs the slot


class HoldAction(IntEnum):
    NONE = 0
    ADMIT = 1
    SHED = 2


_W, _A, _S, _R = HoldState  # (_A, _S, _R: final states, no edges out)
HOLD_TRANSITIONS: dict[tuple[HoldState, HoldEvent], tuple[HoldState, HoldAction]] = {
    (_W, HoldEvent.SLOT): (_A, HoldAction.ADMIT),
    (_W, HoldEvent.EXPIRED): (_S, HoldAction.SHED),
    (_W, HoldEvent.RELEASE): (_R, HoldAction.NONE),
}  # every other state is final: a late event changes nothing (the tick tries WAITING only)


def hold_step(state: HoldState, event: HoldEvent) -> tuple[HoldState, HoldAction]:
    return HOLD_TRANSITIONS.get((state, event), (state, HoldAction.NONE))


def has_room(window: int, in_flight: int) -> bool:
    """Whether a decode row may take one more leg: no window (0) is never gated."""
    return window <= 0 or in_flight < window


def shed_message(url: str, model: str | None, window: int, wait: float) -> str:
    """The 503's message. 1.13's binary holds "Decode worker '…' for model '…' could not
    admit … request(s) within its running window of …" (the rest of its format could not
    be read out of the binary); these are its words with the wait in place of the rest."""
    return (
        f"Decode worker '{url}' for model '{model or 'unknown'}' could not admit 1 "
        f"request(s) within its running window of {window} in {wait:g} s"
    )


# --- the gate -------------------------------------------------------------------------------------


class Hold:
    """One held decode leg: `admit` or `shed` is called once (from the timer), unless
    `DecodeWindow.release` ended it first."""

    __slots__ = ("admit", "deadline", "generation", "row", "shed", "state")

    def __init__(
        self,
        row: int,
        generation: int,
        deadline: float,
        admit: Callable[[], None],
        shed: Callable[[], None],
    ) -> None:
        self.row = row
        self.generation = generation
        self.deadline = deadline
        self.admit = admit
        self.shed = shed
        self.state = HoldState.WAITING


class DecodeWindow:
    """This process's side of the gateway-wide decode window gate (module docstring)."""

    def __init__(self, app: DataPlane, wait: float) -> None:
        self.app = app
        self.wait = wait
        self.holds: list[Hold] = []
        self.timer: asyncio.Handle | None = None
        # Counters by decode URL (smg_pd_admission_*_total; summed over processes).
        self.waits: dict[str, int] = {}
        self.sheds: dict[str, int] = {}
        app.gate.pd_shed_count = 0  # smg_worker_overload_shed_total{stage="pd_admission"}

    def room(self, rows: list[int]) -> list[int]:
        """The rows with a free slot now (a hint: `take` makes it exact)."""
        entries = self.app.state.entries
        in_flight = self.app.table.in_flight
        return [row for row in rows if has_room(entries[row].pd_window, in_flight(row))]

    def take(self, row: int, generation: int) -> bool:
        """Count a decode leg in flight on `row`, within its window (any count when it has
        none); False: no slot (nothing counted)."""
        app = self.app
        entry = app.state.entries.get(row)
        if entry is None or entry.generation != generation:
            return False
        window = entry.pd_window
        if window <= 0:
            app._in_flight_add(row, generation)
            return True
        return claim_within(app, row, generation, window)

    def pick(self, choose: Callable[[list[int]], int], rows: list[int]) -> tuple[int, bool]:
        """(row, admitted): `choose` (the decode policy through the gate) among the rows
        with room, taking a slot; else among the full rows, to wait on (admitted False);
        (-1, False) when `choose` finds none."""
        room = self.room(rows)
        row = choose(room) if room else -1
        if row < 0:
            full = [other for other in rows if other not in room]
            row = choose(full) if full else -1
            if row < 0:
                return -1, False
        return row, self.take(row, self.app.state.entries[row].generation)

    def hold(
        self, row: int, generation: int, admit: Callable[[], None], shed: Callable[[], None]
    ) -> Hold:
        """Wait for a slot on `row` (a wait > 0: with 0 the caller sheds at once)."""
        app = self.app
        hold = Hold(row, generation, time.monotonic() + self.wait, admit, shed)
        self.holds.append(hold)
        url = app.state.entries[row].url
        self.waits[url] = self.waits.get(url, 0) + 1
        if self.timer is None:
            self.timer = app.loop.call_later(RETRY_S, self._tick)
        return hold

    def release(self, hold: Hold) -> None:
        """The request ended while held (its slot is not wanted any more)."""
        hold.state, _action = hold_step(hold.state, HoldEvent.RELEASE)

    def freed(self) -> None:
        """A decode leg of this process ended: try the holds now rather than at the tick."""
        if self.holds and self.timer is None:
            self.timer = self.app.loop.call_soon(self._tick)

    def shed(self, row: int, model: str | None) -> tuple[int, str, str, bytes]:
        """Count a shed on `row` and give its answer: (status, code, message, headers)."""
        app = self.app
        entry = app.state.entries.get(row)
        url = entry.url if entry is not None else ""
        self.sheds[url] = self.sheds.get(url, 0) + 1
        gate = app.gate
        gate.pd_shed_count = (gate.pd_shed_count or 0) + 1
        window = entry.pd_window if entry is not None else 0
        return 503, SHED_CODE, shed_message(url, model, window, self.wait), app.poll_retry_after()

    def _tick(self) -> None:
        self.timer = None
        now = time.monotonic()
        waiting: list[Hold] = []
        for hold in self.holds:
            if hold.state != HoldState.WAITING:
                continue
            if self.take(hold.row, hold.generation):
                event = HoldEvent.SLOT
            elif hold.deadline <= now or not self._current(hold):
                event = HoldEvent.EXPIRED
            else:
                waiting.append(hold)
                continue
            hold.state, action = hold_step(hold.state, event)
            try:
                if action == HoldAction.ADMIT:
                    hold.admit()
                elif action == HoldAction.SHED:
                    hold.shed()
            except Exception as exc:  # the timer must keep running whatever happened
                self.app.log_error("PD decode admission failed", exc)
        self.holds = waiting
        if waiting and self.timer is None:
            self.timer = self.app.loop.call_later(RETRY_S, self._tick)

    def _current(self, hold: Hold) -> bool:
        """Whether the held row still belongs to the worker the hold waits for."""
        entry = self.app.state.entries.get(hold.row)
        return entry is not None and entry.generation == hold.generation

    def families(self, proc: list[tuple[str, str]]) -> list[Family]:
        return [
            Family(
                "smg_pd_admission_waits_total",
                "counter",
                "PD dispatches that waited for a decode admission slot",
                [Sample("", [*proc, ("worker", url)], n) for url, n in self.waits.items()],
            ),
            Family(
                "smg_pd_admission_sheds_total",
                "counter",
                "PD dispatches shed because no decode admission slot freed in time",
                [Sample("", [*proc, ("worker", url)], n) for url, n in self.sheds.items()],
            ),
        ]
