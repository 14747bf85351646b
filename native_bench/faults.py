"""Worker faults under steady load, this repo's gateway next to the Rust SMG 1.13.

Three mock workers (`smg mock-worker`, one process each, so one can be killed), a gateway
in front of them (round robin), and a closed-loop client of `--connections` keep-alive
connections (threads, http.client) that records every request's time and outcome. At
`--fault-at` seconds one worker is hurt, at `--heal-at` it is healed, and the run ends at
`--duration`. Faults:

- `kill`: SIGKILL the worker; restart it on the same port at heal time;
- `errors`: the worker answers 500 to every inference request (its `/mock/config`);
- `overload`: the worker reports 20 waiting requests on its load endpoints.

Per gateway and fault it prints: requests sent, failed (by status or error), the failure
window, when the hurt worker stopped getting requests after the fault (detect) and when it
got them again after healing (recover), both from the workers' own counters polled every
50 ms, and the gateway's view of the worker (GET /workers) over time.

    .venv/bin/python native_bench/faults.py --gateways smg,rust --faults kill,errors,overload

Standard library only (plus this repo's mock worker).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# tests/gatewayutil.free_port: the one port picker (no port handed out twice lately).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gatewayutil import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
BODY = json.dumps(
    {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
).encode()


def http_json(port: int, method: str, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        return json.loads(conn.getresponse().read() or b"null")
    finally:
        conn.close()


class Worker:
    def __init__(self, python: str, port: int) -> None:
        self.python = python
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.python, "-m", "smg", "mock-worker", "--host", HOST, "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                http_json(self.port, "GET", "/health")
                return
            time.sleep(0.05)
        raise RuntimeError(f"mock worker on {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def served(self) -> int | None:
        try:
            return int(http_json(self.port, "GET", "/mock/stats")["inference_answered"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (time sent, time answered, "200" / status / error name)
    records: list[tuple[float, float, str]] = field(default_factory=list)


def client_loop(port: int, stop: threading.Event, out: Outcomes, t0: float) -> None:
    conn: http.client.HTTPConnection | None = None
    local: list[tuple[float, float, str]] = []
    while not stop.is_set():
        sent = time.monotonic() - t0
        try:
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
            conn.request("POST", "/v1/chat/completions", BODY, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            local.append((sent, time.monotonic() - t0, str(resp.status)))
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            local.append((sent, time.monotonic() - t0, type(exc).__name__))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    with out.lock:
        out.records.extend(local)


def start_gateway(kind: str, args: argparse.Namespace, urls: list[str], port: int) -> Any:
    prom = free_port()
    if kind == "smg":
        argv = [args.smg_python, "-m", "smg", "launch", "--processes", str(args.processes)]
        cwd: Path | None = REPO
    else:
        argv = [str(HERE / ".venv-rust" / "bin" / "smg"), "launch"]
        cwd = HERE / "build"
    argv += ["--host", HOST, "--port", str(port), "--worker-urls", *urls]
    argv += ["--policy", "round_robin", "--prometheus-port", str(prom), "--log-level", "warn"]
    argv += ["--health-check-interval-secs", str(args.health_interval)]
    argv += (args.smg_args if kind == "smg" else args.rust_args).split()
    cwd_path = cwd if cwd is not None and cwd.exists() else None
    proc = subprocess.Popen(
        argv,
        cwd=cwd_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    good = 0
    while time.monotonic() < deadline and good < 3:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("POST", "/v1/chat/completions", BODY, {"content-type": "application/json"})
            good = good + 1 if conn.getresponse().status == 200 else 0
            conn.close()
        except OSError:
            time.sleep(0.1)
    if good < 3:
        stop_gateway(proc)
        raise RuntimeError(f"{kind} gateway did not become ready")
    proc.prometheus_port = prom  # type: ignore[attr-defined]
    return proc


def retries_counted(prom_port: int) -> dict[str, float]:
    """The gateway's own retry and breaker-transition counters (both gateways use SMG's
    metric names), summed over their labels."""
    conn = http.client.HTTPConnection(HOST, prom_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return {}
    finally:
        conn.close()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("smg_worker_retries_total", "smg_worker_cb_transitions_total"):
            with contextlib.suppress(ValueError):
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def stop_gateway(proc: Any) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def worker_view(port: int, url: str) -> str:
    """The gateway's own words about one worker (health and breaker fields of GET /workers)."""
    try:
        data = http_json(port, "GET", "/workers")
    except (OSError, ValueError):
        return "?"
    for worker in data.get("workers", []) if isinstance(data, dict) else []:
        if worker.get("url") == url:
            keys = ("is_healthy", "status", "circuit_breaker", "circuit_breaker_state", "cb_state")
            return json.dumps({k: worker[k] for k in keys if k in worker}, sort_keys=True)
    return "absent"


def run_one(kind: str, fault: str, args: argparse.Namespace) -> dict[str, Any]:
    ports = [free_port() for _ in range(3)]
    workers = [Worker(args.smg_python, p) for p in ports]
    for w in workers:
        w.start()
    urls = [f"http://{HOST}:{p}" for p in ports]
    victim = workers[1]
    gw_port = free_port()
    gateway = start_gateway(kind, args, urls, gw_port)
    out = Outcomes()
    stop = threading.Event()
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=client_loop, args=(gw_port, stop, out, t0), daemon=True)
        for _ in range(args.connections)
    ]
    for t in threads:
        t.start()
    served: list[tuple[float, int | None]] = []
    views: list[tuple[float, str]] = []
    faulted = healed = False
    last_view = ""
    try:
        while (now := time.monotonic() - t0) < args.duration:
            if not faulted and now >= args.fault_at:
                faulted = True
                if fault == "kill":
                    victim.kill()
                elif fault == "errors":
                    http_json(victim.port, "POST", "/mock/config", {"error_rate": 1.0})
                else:
                    http_json(victim.port, "POST", "/mock/config", {"waiting": 20})
            if faulted and not healed and now >= args.heal_at:
                healed = True
                if fault == "kill":
                    victim.start()
                elif fault == "errors":
                    http_json(victim.port, "POST", "/mock/config", {"error_rate": 0.0})
                else:
                    http_json(victim.port, "POST", "/mock/config", {"waiting": 0})
            served.append((now, victim.served()))
            view = worker_view(gw_port, urls[1])
            if view != last_view:
                views.append((round(now, 2), view))
                last_view = view
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(35)
        counters = retries_counted(gateway.prometheus_port)
        stop_gateway(gateway)
        for w in workers:
            w.kill()
    return {**summarize(kind, fault, args, out.records, served, views), "counters": counters}


def summarize(
    kind: str,
    fault: str,
    args: argparse.Namespace,
    records: list[tuple[float, float, str]],
    served: list[tuple[float, int | None]],
    views: list[tuple[float, str]],
) -> dict[str, Any]:
    failed = sorted((t, done, what) for t, done, what in records if what != "200")
    by_kind: dict[str, int] = {}
    for _t, _done, what in failed:
        by_kind[what] = by_kind.get(what, 0) + 1
    slowest = max((done - t, t) for t, done, _what in records) if records else (0.0, 0.0)
    # Detect: first poll after the fault from which the victim's counter stops moving until
    # heal time (for a killed worker: it cannot count, so this is not measured from it).
    detect = None
    if fault != "kill":
        window = [(t, n) for t, n in served if args.fault_at <= t < args.heal_at and n is not None]
        for i, (t, n) in enumerate(window):
            if all(m == n for _t, m in window[i:]):
                detect = round(t - args.fault_at, 2)
                break
    recover = None
    after = [(t, n) for t, n in served if t >= args.heal_at and n is not None]
    if after:
        base = after[0][1] if fault != "kill" else 0
        for t, n in after:
            if n is not None and n > base:
                recover = round(t - args.heal_at, 2)
                break
    return {
        "gateway": kind,
        "fault": fault,
        "sent": len(records),
        "failed": len(failed),
        "failed_by": by_kind,
        # From the first failed request's send to the last failed request's answer.
        "failure_window_s": (
            [round(failed[0][0], 2), round(max(f[1] for f in failed), 2)] if failed else None
        ),
        "slowest_request_s": [round(slowest[0], 2), "sent at", round(slowest[1], 2)],
        "detect_s": detect,
        "recover_s": recover,
        "gateway_view": views,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateways", default="smg,rust")
    ap.add_argument("--faults", default="kill,errors,overload")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--fault-at", type=float, default=5.0)
    ap.add_argument("--heal-at", type=float, default=15.0)
    ap.add_argument("--health-interval", type=int, default=5)
    ap.add_argument("--smg-python", default=sys.executable)
    ap.add_argument("--smg-args", default="", help="extra arguments for this repo's gateway")
    ap.add_argument("--rust-args", default="", help="extra arguments for the Rust SMG")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    for fault in args.faults.split(","):
        for kind in args.gateways.split(","):
            result = run_one(kind, fault, args)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
