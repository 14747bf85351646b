"""One trivial OnRequest WASM module against none, side by side in one run (issue 16's performance).

One `smg launch --enable-wasm` gateway in front of the C stub; each round measures it twice with wrk (the
same payload, connections and duration): with no module, and with examples/wasm/testing/noop.wat added
through `POST /wasm` (removed again after). The order alternates by round; the ratio is paired per round.
Reported: requests/s, the gateway's CPU per request (all its processes), the added CPU per request, and the
module's own time per call from the gateway's `smg_wasm_execution_seconds_total`. `--micro` also times one
module call in this process, split into store+instance and call, to say where the time goes.

    .venv/bin/python native_bench/wasm_bench.py --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (native_bench's runner: stub, wrk client, process helpers)
from benchlib import PAYLOADS, core_layout, cpu_delta, paired_ratios, rotation, void_reasons  # noqa: E402

NOOP_WAT = HERE.parent / "examples" / "wasm" / "testing" / "noop.wat"


def noop_wat(pages: int) -> str:
    """noop.wat, with an N-page memory for N > 1: a Rust-shaped module (17 pages: a 1 MiB shadow
    stack below the data) whose call's data lies near the top of the first MiB, for the cost
    of resetting a larger memory per call (smg.wasm.runtime.POOL_KEEP_RESIDENT)."""
    wat = NOOP_WAT.read_text()
    if pages <= 1:
        return wat
    one, bump = '(memory (export "memory") 1)', "(i32.const 4096)"
    if wat.count(one) != 1 or wat.count(bump) != 2:
        raise ValueError("noop.wat's memory or bump start moved")
    top = min(pages * 65536, 1024 * 1024) - 8192
    return wat.replace(one, f'(memory (export "memory") {pages})').replace(
        bump, f"(i32.const {top})"
    )


PHASES = ("none", "wasm")


@dataclass(frozen=True)
class Sample:
    phase: str
    round: int
    requests: int
    rps: float
    cpu_s: float
    bad: (
        int  # the kinds of trouble wrk reported (non-2xx answers, socket errors): 0 for a clean run
    )

    @property
    def cpu_us_per_request(self) -> float | None:
        return self.cpu_s / self.requests * 1e6 if self.requests else None


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians per phase, the paired throughput ratio wasm/none and the added CPU per request."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        mine = [s for s in samples if s.phase == phase]
        cpu = [c for s in mine if (c := s.cpu_us_per_request) is not None]
        out[phase] = {
            "rps_median": statistics.median(s.rps for s in mine) if mine else None,
            "cpu_us_per_request_median": statistics.median(cpu) if cpu else None,
            "bad": sum(s.bad for s in mine),
        }
    by_round = {p: {s.round: s.rps for s in samples if s.phase == p} for p in PHASES}
    ratio = paired_ratios(by_round["wasm"], by_round["none"])
    out["rps_ratio_wasm_over_none"] = None if ratio is None else dataclasses.asdict(ratio)
    none_cpu, wasm_cpu = (
        out["none"]["cpu_us_per_request_median"],
        out["wasm"]["cpu_us_per_request_median"],
    )
    out["added_cpu_us_per_request"] = (
        None if none_cpu is None or wasm_cpu is None else wasm_cpu - none_cpu
    )
    return out


def markdown(summary: dict[str, Any], config: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"wasm_bench: {config['processes']} data-plane process(es), {config['connections']} connections, "
        f"{config['rounds']} rounds x {config['duration']} s, payload {config['payload']}",
        "",
        "| module | req/s (median) | gateway CPU us/request | unclean runs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for phase, label in (("none", "none"), ("wasm", "noop (OnRequest)")):
        row = summary[phase]
        lines.append(
            f"| {label} | {num(row['rps_median'], ',.0f')} | "
            f"{num(row['cpu_us_per_request_median'], '.0f')} | {row['bad']} |"
        )
    ratio = summary["rps_ratio_wasm_over_none"]
    if ratio is not None:
        lines.append(
            f"\nthroughput with the module / without: {ratio['median']:.3f} "
            f"(paired per round, range {ratio['low']:.3f}..{ratio['high']:.3f})"
        )
    added = summary["added_cpu_us_per_request"]
    if added is not None:
        lines.append(f"added gateway CPU per request: {added:.0f} us")
    module = summary.get("module_us_per_call")
    if module is not None:
        lines.append(
            f"the module's own time per call (smg_wasm_execution_seconds_total): {module:.0f} us"
        )
    micro = summary.get("micro")
    if micro:
        lines.append(
            f"in-process, per call: store+instance {micro['instantiate_us']:.0f} us, whole on_request "
            f"{micro['on_request_us']:.0f} us ({micro['calls']} calls, a {micro['body_bytes']}-byte body)"
        )
    return "\n".join(lines)


def micro(calls: int, body: bytes, wat: str) -> dict[str, Any]:
    """Where a call's time goes: a fresh store + instance (what every call pays) against the whole
    on_request (lowering the request, the call, lifting the action)."""
    import wasmtime
    from wasmtime import component as wc

    from smg.wasm.runtime import ModuleRunner, compile_component
    from smg.wasm.types import Limits, WasmRequest

    limits = Limits()
    runner = ModuleRunner(None, compile_component(wat.encode(), limits), limits)
    request = WasmRequest(
        "POST", "/v1/chat/completions", "", [("content-type", "application/json")] * 4, body, "r", 0
    )
    for _ in range(50):
        runner.on_request(request)
    start = time.perf_counter()
    for _ in range(calls):
        runner.on_request(request)
    whole = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    for _ in range(calls):
        store = wasmtime.Store(runner.engine)
        store.set_limits(memory_size=limits.max_memory_bytes)
        store.set_epoch_deadline(10)
        runner.linker.instantiate(store, runner.component)
    inst = (time.perf_counter() - start) / calls
    del wc
    return {
        "calls": calls,
        "body_bytes": len(body),
        "instantiate_us": inst * 1e6,
        "on_request_us": whole * 1e6,
    }


def module_seconds(metrics_port: int) -> tuple[float, float]:
    """(invocations, seconds) of every WASM module, all processes, from the gateway's /metrics."""
    _, body = run.http_call(metrics_port, "GET", "/metrics", timeout=10.0)
    calls = seconds = 0.0
    for line in body.decode().splitlines():
        if line.startswith("smg_wasm_invocations_total{"):
            calls += float(line.rsplit(" ", 1)[1])
        elif line.startswith("smg_wasm_execution_seconds_total{"):
            seconds += float(line.rsplit(" ", 1)[1])
    return calls, seconds


def admin(port: int, method: str, path: str, payload: Any = None) -> Any:
    body = None if payload is None else json.dumps(payload).encode()
    status, answer = run.http_call(port, method, path, body, timeout=60.0)
    if status != 200:
        raise run.BenchError(f"{method} {path} answered {status}: {answer[:300]!r}")
    return json.loads(answer) if answer[:1] in (b"{", b"[") else answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument(
        "--processes", type=int, default=None, help="data-plane processes (default: cores)"
    )
    ap.add_argument("--payload", default="chat")
    ap.add_argument(
        "--micro", type=int, default=2000, help="in-process module calls to time (0: none)"
    )
    ap.add_argument(
        "--pages", type=int, default=1, help="the noop module's memory pages (17: Rust-shaped)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    layout = core_layout(cpus)
    processes = args.processes or len(layout.gateway)
    binaries = run.build_native()
    wrk, wrk_env = run.resolve_wrk(None)
    client = run.Client(
        "wrk",
        wrk,
        wrk_env,
        binaries["loadgen"],
        layout.client_threads,
        args.connections,
        layout.client,
    )
    stub = run.start_stub(binaries["stub"], layout)
    workdir = Path(tempfile.mkdtemp(prefix="smg-wasm-bench-"))
    import wasmtime

    module_path = workdir / "noop.wasm"
    module_path.write_bytes(wasmtime.wat2wasm(noop_wat(args.pages)))
    port, prom = run.free_port(), run.free_port()
    spec = run.GatewaySpec(
        "smg", [sys.executable, "-m", "smg"], ["--enable-wasm"], processes=processes
    )
    gw = run.start_proc(
        "smg",
        spec.argv(f"http://{run.HOST}:{stub.port}", port, prom),
        layout.gateway,
        run.LOGS / "wasm-bench-smg.log",
        cwd=run.REPO,
    )
    samples: list[Sample] = []
    module_calls = module_secs = 0.0
    try:
        probe = (run.PAYLOAD_DIR / PAYLOADS[args.payload].file).read_bytes()
        run.wait_ready(gw, port, 60.0, probe)
        descriptor = {
            "name": "noop",
            "file_path": str(module_path),
            "module_type": "Middleware",
            "attach_points": [{"Middleware": "OnRequest"}],
        }
        for r in range(args.rounds):
            for phase in rotation(list(PHASES), r):
                module_id = None
                if phase == "wasm":
                    added = admin(port, "POST", "/wasm", {"modules": [descriptor]})
                    module_id = added["modules"][0]["add_result"]["Success"]
                    time.sleep(1.5)  # every process sees the directory's generation within a second
                if args.warmup:
                    client.max_run(port, args.payload, args.warmup)
                calls0, secs0 = module_seconds(prom)
                before = run.tree_cpu(gw.pid)
                res = client.max_run(port, args.payload, args.duration)
                cpu = cpu_delta(before, run.tree_cpu(gw.pid))
                calls1, secs1 = module_seconds(prom)
                if phase == "wasm":
                    module_calls += calls1 - calls0
                    module_secs += secs1 - secs0
                bad = len(void_reasons(res))
                samples.append(Sample(phase, r, int(res["requests"]), float(res["rps"]), cpu, bad))
                run.log(f"round {r} {phase}: {res['rps']:.0f} req/s, cpu {cpu:.2f} s, bad {bad}")
                if module_id is not None:
                    admin(port, "DELETE", f"/wasm/{module_id}")
                    time.sleep(1.5)
    finally:
        gw.stop()
        stub.proc.stop()
    summary = summarize(samples)
    summary["module_us_per_call"] = module_secs / module_calls * 1e6 if module_calls else None
    if args.micro:
        summary["micro"] = micro(args.micro, probe, noop_wat(args.pages))
    config = {
        "pages": args.pages,
        "processes": processes,
        "connections": args.connections,
        "rounds": args.rounds,
        "duration": args.duration,
        "payload": args.payload,
        "cpus": len(cpus),
    }
    print(markdown(summary, config))
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {"config": config, "summary": summary, "samples": [s.__dict__ for s in samples]},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
