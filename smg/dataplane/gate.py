"""Which workers may take a request now: circuit breakers, overload protection, stalls.

INTERFACE STUB (issue 7 foundation): every worker passes. The breaker/overload work fills
this in; the retry work in `app.py` / `exchange.py` calls it exactly as below.

Per request, in the data plane:

    rows = gate.filter(candidate_rows)       # None: shed (503 worker_overload_protection_shed)
    row = policy.select(rows, ...)
    if not gate.claim(row): ...              # half-open trial slots taken: choose again
    ... one attempt ...
    gate.record(row, generation, status)     # after each attempt: status 0 = transport failure
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.shm.table import WorkerTable


class WorkerGate:
    __slots__ = ("cfg", "slot", "table")

    def __init__(self, cfg: GatewayConfig, table: WorkerTable, slot: int) -> None:
        self.cfg = cfg
        self.table = table
        self.slot = slot

    def filter(self, rows: list[int]) -> list[int] | None:
        """The rows a request may go to now (the same list when none is left out), or None
        when the request must be shed (every candidate overloaded and shedding is on)."""
        return rows

    def claim(self, row: int) -> bool:
        """After the policy chose `row`: False when it may not take this request after all
        (its half-open breaker has no trial slot left); the caller chooses again without it."""
        return True

    def record(self, row: int, generation: int, status: int) -> None:
        """The outcome of one attempt on `row`: the final upstream status, or 0 for a
        transport failure (refused, reset, timed out before the response head)."""
        return None
