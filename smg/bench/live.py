"""`smg bench`'s live display: what a run is doing while it runs.

The client processes count into a shared board (smg.bench.board); here the parent reads
it a few times a second and draws progress, requests in flight, failures by cause,
running TTFT / ITL / E2E percentiles, throughput, and the client's own CPU and send lag
with the same saturation rule as the end-of-run report (metrics.saturation_warnings).

A terminal gets a `rich` display redrawn REFRESH_PER_S times a second by our own timer
thread (rich's auto refresh is off, so the cost is bounded and measurable). Anything
else (a pipe, a file, `--no-progress`, vllm's `--disable-tqdm`) gets one plain line
every PLAIN_EVERY_S seconds.

view() and the two renderers are pure (a snapshot in, text out) and tested directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from smg.bench import metrics
from smg.bench.board import Board, Snapshot, hist_percentile, snapshot

REFRESH_PER_S = 4
PLAIN_EVERY_S = 5.0
WINDOW_S = 2.0  # "now" rates and CPU are over about the last two seconds
PERCENTILES = (50.0, 90.0, 99.0)
ROWS = (("ttft", "TTFT"), ("itl", "ITL"), ("e2el", "E2E"))


@dataclass
class View:
    total: int
    elapsed: float
    clock_started: bool
    ok: int
    failed: int
    in_flight: int
    queued: int
    causes: dict[str, int]
    req_rate: float  # completed requests per second over the window
    tok_rate: float  # output tokens per second over the window
    req_rate_avg: float
    tok_rate_avg: float
    window_s: float
    percentiles_ms: dict[str, list[float | None]]
    lag_p99_ms: float | None
    cpu_percent: list[float]  # per process, over the window
    warnings: list[str] = field(default_factory=list)
    final: bool = False

    @property
    def done(self) -> int:
        return self.ok + self.failed


def view(snap: Snapshot, base: Snapshot | None, total: int, final: bool = False) -> View:
    """What to show: snap now, rates and CPU since `base` (an older snapshot of the same
    run), or over the whole run when base is None, predates the clock, or final."""
    whole = final or base is None or not base.start or base.now >= snap.now
    elapsed = snap.elapsed
    if final and snap.procs:
        # The run ended at the processes' last tick (after their last response), not now.
        elapsed = max(p.wall_ns for p in snap.procs) / 1e9
    if whole:
        window = elapsed
        d_ok, d_tok = snap.ok, snap.out_tokens
    else:
        assert base is not None
        window = snap.now - base.now
        d_ok, d_tok = snap.ok - base.ok, snap.out_tokens - base.out_tokens
    before = {p.pid: p for p in (base.procs if base is not None and not whole else [])}
    cpu: list[float] = []
    judged: list[tuple[float, float]] = []
    for p in snap.procs:
        old = before.get(p.pid)
        cpu_ns = p.cpu_ns - (old.cpu_ns if old else 0)
        wall_ns = p.wall_ns - (old.wall_ns if old else 0)
        pct = 100.0 * cpu_ns / wall_ns if wall_ns > 0 else 0.0
        cpu.append(pct)
        judged.append((pct, wall_ns / 1e9))
    pcts = {
        name: [_ms(hist_percentile(snap.hists[name], p)) for p in PERCENTILES] for name, _ in ROWS
    }
    lag = _ms(hist_percentile(snap.hists["lag"], 99.0))
    warnings = metrics.saturation_warnings(judged, lag or 0.0) if snap.start else []
    return View(
        total=total,
        elapsed=elapsed,
        clock_started=bool(snap.start) and snap.now >= snap.start,
        ok=snap.ok,
        failed=snap.failed,
        in_flight=snap.in_flight,
        queued=snap.queued,
        causes=dict(snap.causes),
        req_rate=d_ok / window if window > 0 else 0.0,
        tok_rate=d_tok / window if window > 0 else 0.0,
        req_rate_avg=snap.ok / elapsed if elapsed > 0 else 0.0,
        tok_rate_avg=snap.out_tokens / elapsed if elapsed > 0 else 0.0,
        window_s=window,
        percentiles_ms=pcts,
        lag_p99_ms=lag,
        cpu_percent=cpu,
        warnings=warnings,
        final=final,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def fmt_ms(ms: float | None) -> str:
    """Three significant digits or so: 0.123, 5.12, 51.2, 512."""
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:.0f}"


def fmt_causes(causes: dict[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))


def _cpu_text(v: View) -> str:
    if not v.cpu_percent:
        return "-"
    top = max(v.cpu_percent)
    n = len(v.cpu_percent)
    return f"{top:.0f}%" if n == 1 else f"{top:.0f}% (busiest of {n} processes)"


def plain_line(v: View) -> str:
    """One status line for logs and pipes."""
    if not v.clock_started:
        return f"smg bench: preparing (0/{v.total})"
    pct = 100.0 * v.done / v.total if v.total else 100.0
    failed = f"failed {v.failed}" + (f" ({fmt_causes(v.causes)})" if v.failed else "")
    parts = [
        f"smg bench: {v.elapsed:.1f} s",
        f"{v.done}/{v.total} done ({pct:.0f}%)",
        f"in flight {v.in_flight}",
        f"queued {v.queued}",
        failed,
        f"{v.req_rate:.1f} req/s",
        f"{v.tok_rate:.0f} tok/s",
    ]
    for name, label in ROWS:
        values = "/".join(fmt_ms(x) for x in v.percentiles_ms[name])
        parts.append(f"{label} p50/p90/p99 {values} ms")
    parts.append(f"client CPU {_cpu_text(v)}")
    parts.append(f"send lag p99 {fmt_ms(v.lag_p99_ms)} ms")
    line = ", ".join(parts)
    for w in v.warnings:
        line += f"; WARNING: {w}"
    return line


BAR_WIDTH = 40


def render_lines(v: View) -> list[tuple[str, str]]:
    """The terminal display as (text, rich style) lines: plain fixed-width columns, since
    rich's table layout costs ten times as much per frame as these lines."""
    pct = 100.0 * v.done / v.total if v.total else 100.0
    if v.final:  # an interrupted or failed run ends short of the total
        state = "done" if v.done >= v.total else "stopped"
    else:
        state = "running" if v.clock_started else "preparing"
    filled = min(BAR_WIDTH, BAR_WIDTH * v.done // v.total) if v.total else BAR_WIDTH
    lines = [
        (f"smg bench {state:<9} ", "bold"),
        ("━" * filled, "green"),
        ("━" * (BAR_WIDTH - filled), "bright_black"),
        (f" {v.done}/{v.total} {pct:3.0f}%  {v.elapsed:.1f} s\n", ""),
        (f"in flight {v.in_flight}   queued {v.queued}   completed {v.ok}   ", ""),
        (f"failed {v.failed}", "bold red" if v.failed else ""),
        (f" ({fmt_causes(v.causes)})" if v.failed else "", "red"),
    ]
    which = "run" if v.final or v.window_s >= v.elapsed else f"last {v.window_s:.0f} s"
    text = (
        f"\nthroughput {v.req_rate:.1f} req/s  {v.tok_rate:.0f} tok/s ({which})   "
        f"average {v.req_rate_avg:.1f} req/s  {v.tok_rate_avg:.0f} tok/s\n"
    )
    text += f"{'ms':<6}" + "".join(f"{f'p{p:.0f}':>9}" for p in PERCENTILES) + "\n"
    for name, label in ROWS:
        text += f"{label:<6}" + "".join(f"{fmt_ms(x):>9}" for x in v.percentiles_ms[name]) + "\n"
    text += f"client CPU {_cpu_text(v)}   send lag p99 {fmt_ms(v.lag_p99_ms)} ms"
    lines.append((text, ""))
    lines.extend((f"\nWARNING: {w}", "bold yellow") for w in v.warnings)
    return lines


def render(v: View) -> Any:
    """The terminal display as one rich Text (rich is imported only when drawing)."""
    from rich.text import Text

    return Text.assemble(*render_lines(v))


class Display:
    """Draws a run from its board on a timer thread (runner.Watch): rich on a terminal,
    else a plain line every PLAIN_EVERY_S seconds."""

    def __init__(self, total: int, slots: int, plain: bool, out: IO[str] | None = None) -> None:
        self.board = Board(slots)
        self.total = total
        self.plain = plain
        self.out = out if out is not None else sys.stdout
        self.history: list[Snapshot] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.live: Any = None

    def snap(self) -> Snapshot:
        return snapshot(self.board.read(), time.perf_counter())

    def current(self, final: bool = False) -> View:
        snap = self.snap()
        hist = self.history
        hist.append(snap)
        # Keep the newest snapshot at least WINDOW_S old as the window's base.
        while len(hist) > 2 and snap.now - hist[1].now >= WINDOW_S:
            hist.pop(0)
        base = hist[0] if len(hist) > 1 else None
        return view(snap, base, self.total, final)

    def begin(self) -> None:
        if self.plain:
            interval = PLAIN_EVERY_S
        else:
            from rich.console import Console
            from rich.live import Live

            interval = 1.0 / REFRESH_PER_S
            # No stdout/stderr redirection: client processes fork after this and must
            # not inherit rich's proxies.
            self.live = Live(
                console=Console(file=self.out),
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()
            self.live.update(render(self.current()), refresh=True)
        self.thread = threading.Thread(
            target=self._loop, args=(interval,), name="smg-bench-live", daemon=True
        )
        self.thread.start()

    def _loop(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self.frame()

    def frame(self) -> None:
        v = self.current()
        if self.live is not None:
            self.live.update(render(v), refresh=True)
        else:
            print(plain_line(v), file=self.out, flush=True)

    def end(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None
        if self.live is not None:
            self.live.update(render(self.current(final=True)), refresh=True)
            self.live.stop()
            self.live = None


def wants_plain(args: argparse.Namespace, out: IO[str]) -> bool:
    if getattr(args, "no_progress", False) or getattr(args, "disable_tqdm", False):
        return True
    isatty = getattr(out, "isatty", None)
    return not (isatty and isatty()) or os.environ.get("TERM") == "dumb"


def display_for(args: argparse.Namespace, total: int, processes: int) -> Display:
    return Display(total, processes, wants_plain(args, sys.stdout))
