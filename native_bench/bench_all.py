"""`python native_bench/run.py all`: every side-by-side scenario in one run, one table.

Scenarios (each the existing tool, run as a child process with its own JSON):

    http    run.py: chat, completion, stream; direct, smg, Rust SMG 1.13; rounds rotated
    tls     run.py --tls: both gateways serve HTTPS with one trustme certificate made at run
            time; the same wrk client (https, keep-alive); direct stays plain HTTP
    cache   cache_bench.py: cache_aware on both, shared-prefix streamed chat, seeds as rounds
    grpc    grpc_bench.py: streaming chat through each gateway to the gRPC mock engine

With 16 or more usable cores it then runs the scaling series: smg with 1, 2, 4 and 8
processes and the Rust SMG on the same cores (chat), the stub and the client each on their
own cores (alllib.scaling_plan). On a smaller machine the series is skipped with a note.

Writes into --out-dir (default native_bench/results/all-<time>/): summary.md (the table of
ratios smg/rust and smg/direct, median and min-max over rounds), summary.json (the rows and
every scenario's status; each tool's own JSON beside it), report.html (self-contained: inline
SVG bars of the ratios with their ranges). The Rust side is skipped with a note when its venv
(--rust-venv, default native_bench/.venv-rust) does not hold the Rust SMG 1.13: `run.py
--gateways rust` once installs it there.

    .venv/bin/python native_bench/run.py all                   # 3 rounds x 5 s
    .venv/bin/python native_bench/run.py all --quick           # a harness check, ~1 minute
    .venv/bin/python native_bench/run.py all --scenarios http,tls --rounds 5 --duration 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import alllib
from alllib import SCENARIOS, Row, ScenarioSpec

HERE = Path(__file__).resolve().parent
RUST_VERSION = "1.13.0"

PARSERS: dict[str, Callable[[Mapping[str, Any]], list[Row]]] = {
    "http": lambda d: alllib.rows_from_run("http", d),
    "tls": lambda d: alllib.rows_from_run("tls", d),
    "cache": alllib.rows_from_cache,
    "grpc": alllib.rows_from_grpc,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] all: {msg}", file=sys.stderr, flush=True)


def rust_status(venv: Path) -> str | None:
    """None when the venv holds the Rust SMG 1.13; otherwise why the Rust side is skipped."""
    import run  # psutil and the process helpers; only needed here

    info = run.rust_probe(venv)
    if info is None:
        return (
            f"no Rust SMG in {venv} (install it once with `run.py --gateways rust`, or pass "
            "--rust-venv); the Rust side is skipped"
        )
    if not str(info.get("version", "")).startswith("smg " + RUST_VERSION):
        return f"{venv} holds {info.get('version')}, not {RUST_VERSION}; the Rust side is skipped"
    return None


def sigint_default() -> None:
    """In the child before exec: SIGINT back to its default, so the tool gets the SIGINT a
    timeout sends. A shell without job control starts background commands with SIGINT
    ignored (`cmd &` in a script, CI runners), and an ignored SIGINT is inherited through
    exec: the tool never stopped, was killed after the grace, and left its stub and wrk."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tool(
    python: str, spec_tool: str, argv: Sequence[str], out: Path, timeout: float
) -> tuple[int, str]:
    """Runs one tool with its JSON at `out` and its output in a .log beside; (rc, log tail)."""
    cmd = [python, str(HERE / spec_tool), *argv, "--out", str(out)]
    log_path = out.with_suffix(".log")
    log("running: " + " ".join(cmd))
    out.unlink(missing_ok=True)  # never read a previous run's file as this one's
    with log_path.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent, preexec_fn=sigint_default
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT first: each tool stops the gateways, stub and mocks it started (they run
            # in their own sessions, out of reach of a kill of the tool alone).
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
        except BaseException:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            raise
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
    return rc, " / ".join(tail)


def run_scenario(
    spec: ScenarioSpec, python: str, out_dir: Path, timeout: float
) -> tuple[dict[str, Any], list[Row]]:
    out = out_dir / f"{spec.name}.json"
    t0 = time.monotonic()
    rc, tail = run_tool(python, spec.tool, spec.argv, out, timeout)
    status: dict[str, Any] = {
        "name": spec.name,
        "title": spec.title,
        "command": [spec.tool, *spec.argv],
        "rc": rc,
        "wall_s": round(time.monotonic() - t0, 1),
        "result_file": out.name,
        "status": "ok",
        "note": "",
    }
    rows: list[Row] = []
    if out.exists():
        try:
            rows = PARSERS[spec.name](json.loads(out.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            status["status"], status["note"] = "failed", f"unreadable {out.name}: {exc}"
            return status, rows
    if rc != 0 or not rows:
        status["status"] = "failed" if not rows else "partial"
        why = "timed out" if rc == 124 else f"exit {rc}"
        status["note"] = f"{why}; {tail[:300]}"
    return status, rows


def run_scaling(
    args: argparse.Namespace, rust: bool, out_dir: Path
) -> tuple[dict[str, Any], list[Row]]:
    plan = alllib.scaling_plan(sorted(os.sched_getaffinity(0)))
    doc: dict[str, Any] = {"plan": [asdict(s) for s in plan.steps], "status": "", "note": ""}
    if args.no_scaling:
        doc["status"], doc["note"] = "skipped", "--no-scaling"
        return doc, []
    if plan.skipped:
        doc["status"], doc["note"] = "skipped", plan.skipped
        return doc, []
    gateways = "smg,rust" if rust else "smg"
    timing = ["--rounds", str(args.rounds), "--duration", str(args.duration)]
    if args.quick:
        timing = ["--rounds", "1", "--duration", "1", "--warmup", "0"]
    results: dict[int, dict[str, Any]] = {}
    failed: list[str] = []
    for step in plan.steps:
        argv = [
            "--gateways",
            gateways,
            "--payloads",
            "chat",
            *timing,
            "--fixed-rate-fraction",
            "0",
            "--rust-venv",
            str(args.rust_venv),
            *step.run_args(),
        ]
        out = out_dir / f"scaling-{step.processes}.json"
        rc, tail = run_tool(args.python, "run.py", argv, out, args.scenario_timeout)
        if out.exists():
            results[step.processes] = json.loads(out.read_text())
        if rc != 0:
            failed.append(f"{step.processes}: exit {rc} ({tail[:200]})")
    doc["status"] = "ok" if not failed else "partial"
    doc["note"] = "; ".join(failed)
    return doc, alllib.rows_from_scaling(results)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="run.py all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="any of " + ",".join(SCENARIOS)
    )
    ap.add_argument("--quick", action="store_true", help="short rounds: a harness check")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per system (cache: seeds)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    ap.add_argument("--rust-venv", type=Path, default=HERE / ".venv-rust")
    ap.add_argument("--no-rust", action="store_true", help="leave the Rust SMG out")
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1/2/4/8-core series")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the tools")
    ap.add_argument("--scenario-timeout", type=float, default=1800.0, help="seconds per tool")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument(
        "--rerender",
        type=Path,
        default=None,
        metavar="DIR",
        help="rebuild DIR's summary.md, summary.json and report.html from the tools' JSON there",
    )
    args = ap.parse_args(argv)
    args.rust_venv = args.rust_venv.resolve()  # its python is probed from another cwd
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; pick from {', '.join(SCENARIOS)}")
    if args.rounds < 1 or args.duration < 1:
        ap.error("--rounds and --duration must be positive")
    return args


def rerender(out_dir: Path) -> dict[str, Any]:
    """The rows again from the tools' own JSON in out_dir (after a change to the views)."""
    doc = json.loads((out_dir / "summary.json").read_text())
    rows: list[Row] = []
    for s in doc["scenarios"]:
        path = out_dir / s["result_file"]
        if path.exists():
            rows += PARSERS[s["name"]](json.loads(path.read_text()))
    scaling = {
        int(p.stem.split("-")[1]): json.loads(p.read_text())
        for p in sorted(out_dir.glob("scaling-*.json"))
    }
    rows += alllib.rows_from_scaling(scaling)
    doc["rows"] = [asdict(r) for r in rows]
    return doc


def write_outputs(doc: Mapping[str, Any], out_dir: Path) -> str:
    table = alllib.markdown_table(doc)
    (out_dir / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "summary.md").write_text(table)
    (out_dir / "report.html").write_text(alllib.html_report(doc, table))
    print(table)
    log(f"wrote {out_dir}/summary.md, summary.json, report.html")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerender is not None:
        write_outputs(rerender(args.rerender), args.rerender)
        return 0
    now = dt.datetime.now(dt.UTC)
    out_dir = args.out_dir or HERE / "results" / f"all-{now.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    why_no_rust = "--no-rust" if args.no_rust else rust_status(args.rust_venv)
    if why_no_rust:
        notes.append(f"Rust SMG left out: {why_no_rust}")
        log(notes[-1])
    rust = why_no_rust is None
    doc: dict[str, Any] = {
        "kind": "native_bench_all",
        "started_at": now.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "settings": {
            "scenarios": args.scenarios,
            "rounds": 1 if args.quick else args.rounds,
            "duration_s": 1 if args.quick else args.duration,
            "rust": rust,
            "rust_venv": str(args.rust_venv),
        },
        "host": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
    }
    specs = alllib.plan_scenarios(
        args.scenarios,
        quick=args.quick,
        rounds=args.rounds,
        duration=args.duration,
        rust=rust,
        rust_venv=str(args.rust_venv),
    )
    scenarios: list[dict[str, Any]] = []
    rows: list[Row] = []
    for spec in specs:
        status, got = run_scenario(spec, args.python, out_dir, args.scenario_timeout)
        log(f"{spec.name}: {status['status']} in {status['wall_s']}s {status['note']}")
        scenarios.append(status)
        rows += got
    scaling, scaling_rows = run_scaling(args, rust, out_dir)
    rows += scaling_rows
    doc["host"]["loadavg_at_end"] = os.getloadavg()
    doc["scenarios"] = scenarios
    doc["scaling"] = scaling
    doc["rows"] = [asdict(r) for r in rows]
    doc["notes"] = notes
    write_outputs(doc, out_dir)
    return 0 if all(s["status"] == "ok" for s in scenarios) else 1
