"""Microbenchmark of the admission step alone (no sockets, no event loop work).

    python native_bench/admission_micro.py [--ops 200000] [--repeat 5]

Prints ns per operation (best of --repeat runs) for:
- the atomic operation itself (`fetch_add_u64` on the shared mapping), and a plain store;
- `AdmissionWords.try_acquire` + `release` with the limit not binding, rate limit off/on
  (on: a rate far above the offered load, so every request conforms);
- the data plane's whole admission step per request: `Admission.enter` (fast path) plus
  what `proxy_admitted` and `exchange_finished` add (the permit-holder set) and `release`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smg.dataplane.admission import Admission, AdmissionWords
from smg.shm import layout
from smg.shm.table import WorkerTable


def best_ns(body: Callable[[int], None], ops: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        body(ops)
        best = min(best, (time.perf_counter_ns() - started) / ops)
    return best


class _Conn:
    __slots__ = ("closed", "exchange")

    def __init__(self) -> None:
        self.closed = False
        self.exchange: Any = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ops, repeat = args.ops, args.repeat

    table = WorkerTable.create(16, 4, os.getpid())
    atomic = table.atomic
    g = table.global_offset(layout.G_ADMIT_IN_FLIGHT)

    def loop_only(n: int) -> None:
        for _ in range(n):
            pass

    def fetch_add(n: int) -> None:
        add = atomic.fetch_add_u64
        for _ in range(n):
            add(g, 1)

    def store(n: int) -> None:
        put = atomic.store_u64
        for i in range(n):
            put(g, i)

    results: dict[str, float] = {}
    base = best_ns(loop_only, ops, repeat)
    results["empty loop (subtracted below)"] = base
    results["atomic fetch_add_u64"] = best_ns(fetch_add, ops, repeat) - base
    results["atomic store_u64"] = best_ns(store, ops, repeat) - base
    atomic.store_u64(g, 0)

    for label, rate in (("rate limit off", None), ("rate limit on", 10**9)):
        words = AdmissionWords.for_table(table, 0, 1_000_000, 100, rate)

        def acquire_release(n: int, words: AdmissionWords = words) -> None:
            clock = time.monotonic_ns
            acquire = words.try_acquire
            release = words.release
            timed = bool(words.interval)  # as Admission.enter: the clock only for the rate
            for _ in range(n):
                acquire(clock() if timed else 0)
                release()

        results[f"try_acquire + release, {label}"] = best_ns(acquire_release, ops, repeat) - base

    loop = asyncio.new_event_loop()
    try:
        for label, rate in (("rate limit off", None), ("rate limit on", 10**9)):
            words = AdmissionWords.for_table(table, 1, 1_000_000, 100, rate)
            adm = Admission(words, None, loop, 60.0)  # type: ignore[arg-type]
            conn = _Conn()
            holders: set[object] = set()

            def request_step(
                n: int, adm: Admission = adm, conn: _Conn = conn, holders: set[object] = holders
            ) -> None:
                enter = adm.enter
                release = adm.release
                token = object()
                for _ in range(n):
                    if enter(conn, None):  # type: ignore[arg-type]
                        # proxy_admitted: the Exchange becomes a permit holder ...
                        if token not in holders:
                            holders.add(token)
                        # ... and exchange_finished gives the permit back.
                        if token in holders:
                            holders.discard(token)
                            release()

            results[f"data-plane admission step per request, {label}"] = (
                best_ns(request_step, ops, repeat) - base
            )
    finally:
        loop.close()

    width = max(len(k) for k in results)
    print(f"admission microbenchmark: {ops} ops, best of {repeat}, python {sys.version.split()[0]}")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:7.1f} ns")


if __name__ == "__main__":
    main()
