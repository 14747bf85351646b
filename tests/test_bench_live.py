"""The live display: shared counters and histograms (pure), the rendered text from a fixed
snapshot, and the real `smg bench` against the stub as a person sees it (tmux) or a log
sees it (a pipe)."""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from smg.bench import metrics
from smg.bench.board import (
    EDGES,
    NBUCKETS,
    Board,
    Snapshot,
    bucket_of,
    bucket_value,
    cause_index,
    hist_percentile,
    snapshot,
)
from smg.bench.calibrate import start_stub
from smg.bench.live import plain_line, render, view, wants_plain
from smg.bench.runner import Outcome

# -- the board (pure) -----------------------------------------------------------------


def test_buckets_are_log_spaced_and_percentiles_land_in_the_right_bucket() -> None:
    assert EDGES[0] == 1e-6 and EDGES[-1] == pytest.approx(1e4)
    assert EDGES[40] == pytest.approx(1e-5)  # 40 buckets per decade
    assert bucket_of(0.0) == 0 and bucket_of(-0.001) == 0  # negative lag: underflow
    assert bucket_value(0) == 0.0  # below 1 us (tokens that came in one read) reads 0
    assert bucket_of(1e5) == NBUCKETS - 1
    b = bucket_of(0.051)
    assert EDGES[b - 1] <= 0.051 < EDGES[b]
    assert bucket_value(b) == pytest.approx((EDGES[b - 1] * EDGES[b]) ** 0.5)
    # 1..100 ms: p50 is the 51st smallest (rank 49.5 rounded half up), p99 the 99th.
    counts = [0] * NBUCKETS
    for i in range(1, 101):
        counts[bucket_of(i / 1000)] += 1
    assert hist_percentile(counts, 50.0) == bucket_value(bucket_of(0.051))
    assert hist_percentile(counts, 99.0) == bucket_value(bucket_of(0.099))
    assert hist_percentile(counts, 0.0) == bucket_value(bucket_of(0.001))
    assert hist_percentile(counts, 100.0) == bucket_value(bucket_of(0.100))
    for p, exact in ((50.0, 0.051), (99.0, 0.099)):
        got = hist_percentile(counts, p)
        assert got is not None and abs(got / exact - 1) < 0.03  # half a bucket: 2.9 %
    assert hist_percentile([0] * NBUCKETS, 50.0) is None


def test_causes_fold_http_statuses_into_classes() -> None:
    from smg.bench.board import CAUSES

    assert CAUSES[cause_index("timeout")] == "timeout"
    assert CAUSES[cause_index("http_429")] == "http_429"
    assert CAUSES[cause_index("http_404")] == "http_4xx"
    assert CAUSES[cause_index("http_503")] == "http_5xx"
    assert CAUSES[cause_index("weird")] == "other"
    assert CAUSES[cause_index(None)] == "other"


def _outcome(i: int, ok: bool) -> Outcome:
    # Sent 0.2 ms after it was due; first token at 50 ms, 9 more 10 ms apart, end at 250 ms.
    return Outcome(
        index=i,
        target=0,
        success=ok,
        error=None if ok else "http_503",
        status=200 if ok else 503,
        t_sched=1.0,
        t_eligible=1.0,
        t_send=1.0002,
        t_first=1.0502 if ok else None,
        t_done=1.2502 if ok else 1.0012,
        itl=[0.010] * 9 if ok else [],
        first_tokens=1,
        tokens_seen=10 if ok else 0,
        usage_in=8,
        usage_out=None,
        text="",
    )


def _record_sample(board: Board, k: int, n_ok: int, n_fail: int) -> None:
    slot = board.slot(k)
    slot.begin(100.0)
    outcomes = [_outcome(i, True) for i in range(n_ok)]
    slot.absorb(outcomes, in_flight=1, queued=1)
    # The list only grows: a later tick bins only what is new.
    outcomes += [_outcome(n_ok + i, False) for i in range(n_fail)]
    slot.absorb(outcomes, in_flight=1, queued=1)
    slot.publish()


def test_slots_are_summed_by_the_reader() -> None:
    board = Board(2)
    _record_sample(board, 0, 30, 1)
    _record_sample(board, 1, 20, 2)
    snap = snapshot(board.read(), now=102.0)
    assert (snap.ok, snap.failed, snap.done) == (50, 3, 53)
    assert (snap.in_flight, snap.queued) == (2, 2)
    assert snap.out_tokens == 500
    assert snap.causes == {"http_5xx": 3}
    assert sum(snap.hists["itl"]) == 50 * 9 and snap.hists["itl"][bucket_of(0.010)] == 450
    assert snap.hists["ttft"][bucket_of(0.050)] == 50
    assert snap.hists["e2el"][bucket_of(0.250)] == 50
    assert sum(snap.hists["lag"]) == 53  # failures have a send lag too
    assert sum(snap.hists["ttft"]) == 50 and sum(snap.hists["e2el"]) == 50
    assert snap.start == 100.0 and snap.elapsed == 2.0
    assert len(snap.procs) == 2


def test_a_busy_tick_is_sampled_but_the_counters_stay_exact() -> None:
    from smg.bench.board import SAMPLE_CAP

    board = Board(1)
    slot = board.slot(0)
    slot.begin(100.0)
    outs = [_outcome(i, True) for i in range(6 * SAMPLE_CAP)]
    for i, o in enumerate(outs):  # half the requests take 250 ms, half 2.5 s
        if i % 2:
            o.t_done = o.t_send + 2.5
    outs[7] = _outcome(7, False)
    slot.absorb(outs, in_flight=0, queued=0)
    slot.publish()
    snap = snapshot(board.read(), now=101.0)
    assert (snap.ok, snap.failed, snap.out_tokens) == (
        6 * SAMPLE_CAP - 1,
        1,
        10 * (6 * SAMPLE_CAP - 1),
    )
    e2el = snap.hists["e2el"]
    # A sample of 512 stands for 3,072 requests: totals are right to rounding, and the
    # two halves stay about even.
    assert abs(sum(e2el) - 6 * SAMPLE_CAP) <= 12
    assert set(i for i, c in enumerate(e2el) if c) == {bucket_of(0.250), bucket_of(2.5)}
    assert abs(e2el[bucket_of(0.250)] - e2el[bucket_of(2.5)]) < 0.25 * sum(e2el)
    assert hist_percentile(e2el, 10.0) == bucket_value(bucket_of(0.250))
    assert hist_percentile(e2el, 90.0) == bucket_value(bucket_of(2.5))
    assert abs(sum(snap.hists["itl"]) - 9 * (6 * SAMPLE_CAP - 1)) <= 0.01 * 9 * 6 * SAMPLE_CAP


def _child_writes(board: Board) -> None:
    _record_sample(board, 1, 7, 0)


def test_a_forked_child_writes_its_slot_into_the_parents_mapping() -> None:
    board = Board(2)
    _record_sample(board, 0, 5, 0)
    proc = mp.get_context("fork").Process(target=_child_writes, args=(board,))
    proc.start()
    try:
        proc.join(timeout=20)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    snap = snapshot(board.read(), now=101.0)
    assert snap.ok == 12 and snap.out_tokens == 120
    assert {p.pid for p in snap.procs} == {board.read()[0][0], proc.pid}


# -- the view and its text, from a fixed snapshot (pure) -------------------------------


def _hist(values_s: list[float]) -> list[int]:
    counts = [0] * NBUCKETS
    for v in values_s:
        counts[bucket_of(v)] += 1
    return counts


def _fixed(now: float, ok: int, tokens: int, cpu_ns: int, lag_s: float) -> Snapshot:
    from smg.bench.board import ProcView

    return Snapshot(
        now=now,
        start=10.0,
        in_flight=64,
        queued=3,
        ok=ok,
        failed=2,
        out_tokens=tokens,
        causes={"timeout": 2},
        hists={
            "ttft": _hist([0.050] * 90 + [0.080] * 10),
            "itl": _hist([0.010] * 99 + [0.030]),
            "e2el": _hist([0.400] * 100),
            "lag": _hist([0.0003] * 100 if lag_s == 0 else [lag_s] * 100),
        },
        procs=[ProcView(pid=4242, cpu_ns=cpu_ns, wall_ns=int((now - 10.0) * 1e9))],
    )


def test_view_rates_cpu_and_percentiles_from_a_fixed_snapshot() -> None:
    base = _fixed(now=16.0, ok=300, tokens=30_000, cpu_ns=2_400_000_000, lag_s=0)
    snap = _fixed(now=18.0, ok=400, tokens=40_000, cpu_ns=3_300_000_000, lag_s=0)
    v = view(snap, base, total=1000)
    assert v.clock_started and v.elapsed == 8.0 and v.window_s == 2.0
    assert (v.done, v.in_flight, v.queued) == (402, 64, 3)
    assert v.req_rate == 50.0 and v.tok_rate == 5000.0  # over the last two seconds
    assert v.req_rate_avg == 50.0 and v.tok_rate_avg == 5000.0
    assert v.cpu_percent == [pytest.approx(45.0)]  # 0.9 s of CPU in 2 s
    ttft = v.percentiles_ms["ttft"]
    assert ttft == [bucket_value(bucket_of(0.050)) * 1000] * 2 + [
        bucket_value(bucket_of(0.080)) * 1000
    ]
    assert v.warnings == []
    final = view(snap, base, total=1000, final=True)
    assert final.window_s == 8.0 and final.cpu_percent == [pytest.approx(3.3 / 8 * 100)]
    # Drawn a second after the processes' last tick: the run still lasted 8 s.
    snap.now = 19.0
    late = view(snap, base, total=1000, final=True)
    assert late.elapsed == 8.0 and late.req_rate == 400 / 8.0


def test_plain_line_text() -> None:
    # Each value is its bucket's geometric middle: 50 ms reads 48.7, 10 ms reads 10.3.
    base = _fixed(now=16.0, ok=300, tokens=30_000, cpu_ns=2_400_000_000, lag_s=0)
    snap = _fixed(now=18.0, ok=400, tokens=40_000, cpu_ns=3_300_000_000, lag_s=0)
    assert plain_line(view(snap, base, total=1000)) == (
        "smg bench: 8.0 s, 402/1000 done (40%), in flight 64, queued 3, failed 2 (timeout 2),"
        " 50.0 req/s, 5000 tok/s, TTFT p50/p90/p99 48.7/48.7/81.8 ms,"
        " ITL p50/p90/p99 10.3/10.3/10.3 ms, E2E p50/p90/p99 410/410/410 ms,"
        " client CPU 45%, send lag p99 0.307 ms"
    )


def _text(renderable: object, width: int = 120) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_rendered_display_text() -> None:
    base = _fixed(now=16.0, ok=300, tokens=30_000, cpu_ns=2_400_000_000, lag_s=0)
    snap = _fixed(now=18.0, ok=400, tokens=40_000, cpu_ns=3_300_000_000, lag_s=0)
    lines = [line.rstrip() for line in _text(render(view(snap, base, total=1000))).splitlines()]
    assert lines[0].startswith("smg bench running ")
    assert lines[0].endswith(" 402/1000  40%  8.0 s")
    assert lines[1] == "in flight 64   queued 3   completed 400   failed 2 (timeout 2)"
    assert lines[2] == (
        "throughput 50.0 req/s  5000 tok/s (last 2 s)   average 50.0 req/s  5000 tok/s"
    )
    assert re.split(r"\s+", lines[3].strip()) == ["ms", "p50", "p90", "p99"]
    assert re.split(r"\s+", lines[4].strip()) == ["TTFT", "48.7", "48.7", "81.8"]
    assert re.split(r"\s+", lines[5].strip()) == ["ITL", "10.3", "10.3", "10.3"]
    assert re.split(r"\s+", lines[6].strip()) == ["E2E", "410", "410", "410"]
    assert lines[7] == "client CPU 45%   send lag p99 0.307 ms"
    assert len(lines) == 8  # no warning
    final = _text(render(view(snap, base, total=1000, final=True)))
    assert final.startswith("smg bench stopped ")  # 402 of 1000: interrupted
    snap.ok, snap.failed = 1000, 0
    assert _text(render(view(snap, base, total=1000, final=True))).startswith("smg bench done ")


def test_saturation_warning_uses_the_end_of_run_rule() -> None:
    base = _fixed(now=16.0, ok=300, tokens=30_000, cpu_ns=2_400_000_000, lag_s=0.008)
    snap = _fixed(now=18.0, ok=400, tokens=40_000, cpu_ns=4_300_000_000, lag_s=0.008)
    v = view(snap, base, total=1000)
    lag_ms = bucket_value(bucket_of(0.008)) * 1000
    assert v.warnings == metrics.saturation_warnings([(95.0, 2.0)], lag_ms)
    assert len(v.warnings) == 2 and "client CPU at 95%" in v.warnings[0]
    assert "p99 send lag 8.2 ms" in v.warnings[1]  # 8 ms reads 8.2
    text = _text(render(v))
    assert "WARNING: client CPU at 95% of a core" in text
    assert "; WARNING: p99 send lag 8.2 ms" in plain_line(v)
    # The end-of-run report applies the same function to its own numbers.
    assert metrics.saturation_warnings([(95.0, 0.4)], 1.0) == []  # too short to judge


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_when_asked_or_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from smg.bench.args import build_parser

    monkeypatch.setenv("TERM", "xterm")
    parse = build_parser().parse_args
    assert wants_plain(parse([]), _Tty()) is False
    assert wants_plain(parse(["--no-progress"]), _Tty()) is True
    assert wants_plain(parse(["--disable-tqdm"]), _Tty()) is True  # vllm's name
    assert wants_plain(parse([]), io.StringIO()) is True  # a pipe or a file
    monkeypatch.setenv("TERM", "dumb")
    assert wants_plain(parse([]), _Tty()) is True


# -- end to end: the real command against the stub ------------------------------------


@pytest.fixture
def stub_url() -> Iterator[str]:
    proc, port = start_stub(["--ttft-ms", "20", "--itl-ms", "5", "--error-rate", "0.1"])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bench_cmd(url: str, n: int, rate: float, procs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "smg",
        "bench",
        "--base-url",
        url,
        "--model",
        "stub-model",
        "--num-prompts",
        str(n),
        "--request-rate",
        str(rate),
        "--random-input-len",
        "8",
        "--random-output-len",
        "8",
        "--max-error-rate",
        "1",
        "--client-processes",
        str(procs),
        *extra,
    ]


def _pane(session: str, history: bool = False) -> str:
    cmd = ["tmux", "capture-pane", "-p", "-t", session]
    if history:  # the summary pushes the final frame up out of the visible pane
        cmd += ["-S", "-200"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("procs", [1, 2])
def test_a_person_watching_in_tmux_sees_the_run(stub_url: str, procs: int) -> None:
    session = f"smg-live-{uuid.uuid4().hex[:8]}"
    # 80 requests of 40 tokens (20 + 39 x 5 ms) four at a time: about 4.3 s.
    bench = _bench_cmd(stub_url, 80, math.inf, procs, "--max-concurrency", "4")
    bench[bench.index("--random-output-len") + 1] = "40"
    cmd = " ".join(bench) + "; sleep 30"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd],
        check=True,
        timeout=10,
    )
    try:
        mid = ""
        deadline = time.monotonic() + 30
        # Mid-run: the clock is running, some but not all requests are done.
        while time.monotonic() < deadline:
            pane = _pane(session)
            m = re.search(r"smg bench running .* (\d+)/80 ", pane)
            if m and 10 <= int(m.group(1)) <= 60 and "TTFT" in pane:
                mid = pane
                break
            time.sleep(0.2)
        assert mid, _pane(session)
        m = re.search(r"in flight (\d+)   queued (\d+)   completed (\d+)   failed (\d+)", mid)
        assert m, mid
        # Four at a time (split 2 + 2 over two processes), the rest queued behind them.
        assert 1 <= int(m.group(1)) <= 4 and int(m.group(2)) >= 1, mid
        # The stub paces the first token at 20 ms and each next one at 5 ms.
        ttft = re.search(r"TTFT\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", mid)
        itl = re.search(r"ITL\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", mid)
        assert ttft and itl, mid
        assert 18.0 <= float(ttft.group(1)) <= 80.0 and 4.0 <= float(itl.group(1)) <= 30.0
        assert re.search(r"client CPU \d+%", mid) and "send lag p99" in mid
        # At the end: the final frame stays above vllm's summary.
        end = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            pane = _pane(session, history=True)
            if "Serving Benchmark Result" in pane and "Valid run" in pane:
                end = pane
                break
            time.sleep(0.3)
        assert end, _pane(session)
        assert re.search(r"smg bench done .* 80/80 100%", end), end
        m = re.search(r"completed (\d+)   failed (\d+)", end)
        assert m and int(m.group(1)) + int(m.group(2)) == 80
        if int(m.group(2)):
            assert "(http_5xx " in end  # the stub's injected 500s, by cause
        assert "in flight 0   queued 0" in end
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)


def test_not_a_terminal_gets_a_plain_line_every_5_s(stub_url: str) -> None:
    # 100 requests at 16 req/s: about 6.3 s, so one status line at 5 s.
    proc = subprocess.Popen(
        _bench_cmd(stub_url, 100, 16.0, 2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "\x1b[" not in out  # no terminal control codes in a pipe
    lines = [ln for ln in out.splitlines() if ln.startswith("smg bench: ") and " s, " in ln]
    assert len(lines) == 1, out
    m = re.match(
        r"smg bench: ([\d.]+) s, (\d+)/100 done \(\d+%\), in flight \d+, queued \d+,", lines[0]
    )
    assert m, lines[0]
    assert 4.0 <= float(m.group(1)) <= 6.5 and 40 <= int(m.group(2)) <= 99
    assert re.search(r"TTFT p50/p90/p99 [\d.]+/[\d.]+/[\d.]+ ms", lines[0])
    assert re.search(r"client CPU \d+% \(busiest of 2 processes\)", lines[0])
