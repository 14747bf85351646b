"""`smg bench calibrate`: how fast is this client on this machine?

Starts `smg bench stub` in a child process (its own core, if there is one), then runs
one client process against it: non-streamed requests (requests/s) and streamed
responses (SSE chunks/s), each at a fixed concurrency with no pacing. Prints the
client's throughput and CPU use. With a client CPU near 100 % the number is the
client's ceiling; well below it, the stub or the machine was the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from smg.bench.backends import BodyOptions, base_headers, build_body
from smg.bench.http import build_request, parse_url
from smg.bench.runner import Prepared, RunSpec, run_in_process


def start_stub(
    extra: list[str] | None = None, timeout: float = 10.0
) -> tuple[subprocess.Popen[str], int]:
    """Starts the stub on a free port; returns (process, port). Caller must stop it."""
    cmd = [sys.executable, "-m", "smg", "bench", "stub", "--port", "0", *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return proc, int(line.rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError("stub did not start")


def measure(
    port: int, backend_path: str, n: int, concurrency: int, output_len: int, stream: bool
) -> dict[str, Any]:
    target = parse_url(f"http://127.0.0.1:{port}")
    backend = "openai-chat" if backend_path.endswith("chat/completions") else "openai"
    kind = "chat" if backend == "openai-chat" else "completions"
    opts = BodyOptions(model="stub-model", stream=stream)
    headers = base_headers()
    data = build_request(
        "POST", target, backend_path, headers, build_body(backend, "hi", output_len, opts)
    )
    preps = [Prepared(i, 0, data, kind, stream) for i in range(n)]
    spec = RunSpec([target], preps, [0.0] * n, concurrency, 60.0)
    outcomes, stats, start = run_in_process(spec)
    wall = max(o.t_done for o in outcomes) - start
    ok = sum(1 for o in outcomes if o.success)
    chunks = sum(o.tokens_seen for o in outcomes if o.success)
    st = stats[0]
    return {
        "requests": n,
        "succeeded": ok,
        "concurrency": concurrency,
        "stream": stream,
        "wall_s": wall,
        "requests_per_s": ok / wall,
        "chunks_per_s": chunks / wall if stream else 0.0,
        "client_cpu_percent": 100.0 * st.cpu_s / st.wall_s if st.wall_s else 0.0,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="smg bench calibrate", description=__doc__)
    p.add_argument("--requests", type=int, default=20000, help="non-streamed requests")
    p.add_argument("--stream-requests", type=int, default=1000)
    p.add_argument("--stream-tokens", type=int, default=200, help="chunks per stream")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--paced-concurrency", type=int, default=500)
    p.add_argument("--paced-itl-ms", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)

    def with_stub(extra: list[str], fn: Any) -> dict[str, Any]:
        proc, port = start_stub(extra)
        try:
            if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                # Keep the client and the stub on different cores when we can.
                os.sched_setaffinity(proc.pid, {0})
                os.sched_setaffinity(0, {1})
            return dict(fn(port))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    plain = with_stub(
        [], lambda port: measure(port, "/v1/completions", args.requests, args.concurrency, 1, False)
    )
    streamed = with_stub(
        [],
        lambda port: measure(
            port,
            "/v1/chat/completions",
            args.stream_requests,
            args.concurrency,
            args.stream_tokens,
            True,
        ),
    )
    itl = str(args.paced_itl_ms)
    paced = with_stub(
        ["--ttft-ms", itl, "--itl-ms", itl],
        lambda port: measure(
            port,
            "/v1/chat/completions",
            args.paced_concurrency,
            args.paced_concurrency,
            args.stream_tokens,
            True,
        ),
    )
    report = {"non_streaming": plain, "streaming": streamed, "streaming_paced": paced}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"non-streaming: {plain['requests_per_s']:,.0f} req/s "
            f"(client CPU {plain['client_cpu_percent']:.0f}%, {plain['succeeded']}/{plain['requests']} ok)"
        )
        print(
            f"streaming:     {streamed['chunks_per_s']:,.0f} SSE chunks/s, "
            f"{streamed['requests_per_s']:,.0f} req/s (client CPU "
            f"{streamed['client_cpu_percent']:.0f}%, {streamed['succeeded']}/{streamed['requests']} ok)"
        )
        print(
            f"paced stream:  {paced['chunks_per_s']:,.0f} SSE chunks/s, chunks written one by one "
            f"(client CPU {paced['client_cpu_percent']:.0f}%, "
            f"{paced['succeeded']}/{paced['requests']} ok; {args.paced_concurrency} streams, "
            f"ITL {args.paced_itl_ms} ms)"
        )
    return 0
