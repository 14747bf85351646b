"""The data-plane processes as the table shows them, for the control plane's exporter.

Pure: `families` takes what the exporter read from the process slots (`ProcView`) and the
clock, so the numbers are tested without processes. The supervisor replaces a process whose
heartbeat is older than --dataplane-heartbeat-timeout-secs; exporting the age and that
timeout lets an alert (and a dashboard) see a stalling loop before it is replaced.
"""

from __future__ import annotations

from typing import NamedTuple

from smg.promtext import Family, Sample
from smg.shm import layout

# The states a live slot can be in, by their label (empty and failed slots hold no process).
STATE_LABELS = {
    layout.PROC_STARTING: "starting",
    layout.PROC_READY: "ready",
    layout.PROC_DRAINING: "draining",
}


class ProcView(NamedTuple):
    index: int  # the listener number: the `process` label of the data plane's own series
    state: int  # layout.PROC_*
    beat_ns: int  # monotonic ns of its last heartbeat (0: none yet)


def families(procs: list[ProcView], now_ns: int, timeout_secs: float) -> list[Family]:
    """smg_dataplane_processes by state, and the heartbeat age of each serving or draining
    process (the ones the supervisor watches) that has beaten at least once."""
    counts = dict.fromkeys(STATE_LABELS.values(), 0)
    ages: list[Sample] = []
    for proc in procs:
        label = STATE_LABELS.get(proc.state)
        if label is None:
            continue
        counts[label] += 1
        if proc.state != layout.PROC_STARTING and proc.beat_ns:
            # The beat may land between reading it and reading the clock: never negative.
            age = max(0, now_ns - proc.beat_ns) / 1e9
            ages.append(Sample("", [("process", str(proc.index))], age))
    return [
        Family(
            "smg_dataplane_processes",
            "gauge",
            "Data-plane processes in the table, by state (starting, ready, draining) (smg only)",
            [Sample("", [("state", state)], n) for state, n in counts.items()],
        ),
        Family(
            "smg_dataplane_heartbeat_age_seconds",
            "gauge",
            "Seconds since each serving or draining data-plane process's event loop last "
            "beat; the supervisor replaces it past smg_dataplane_heartbeat_timeout_seconds "
            "(smg only)",
            ages,
        ),
        Family(
            "smg_dataplane_heartbeat_timeout_seconds",
            "gauge",
            "--dataplane-heartbeat-timeout-secs: the heartbeat age at which the supervisor "
            "replaces a data-plane process (smg only)",
            [Sample("", [], timeout_secs)],
        ),
    ]
