#!/usr/bin/env python3
"""CPU per request that the translation path (smg.translate through the Exchange hook)
adds in the data plane, against the same request passed through to the same upstream.

Starts a fake OpenAI-only and a fake Anthropic-only provider (tests/providerfakes.py) and
`smg launch --processes 1`, registers both as external workers (POST /workers), then per
case sends `--requests` requests, one at a time on one keep-alive connection, `--rounds`
times with the cases interleaved (round by round, so drift hits every case alike). CPU =
the data-plane process's on-CPU time over the case's requests (/proc/PID/schedstat, in ns;
psutil's user+system elsewhere), divided by the requests; the median round is reported.

Cases, each non-stream and stream, same upstream, same prompt:
  OpenAI upstream:    /v1/chat/completions (passed through)  vs  /v1/messages (translated)
  Anthropic upstream: /v1/messages (passed through)          vs  /v1/chat/completions (translated)

    .venv/bin/python native_bench/xlate_bench.py --requests 500 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gatewayutil import Gateway, pid_serving, wait_until  # noqa: E402
from providerfakes import FakeProvider  # noqa: E402

GPT = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku"
PROMPT = [{"role": "user", "content": "Say something short about the weather in Paris today."}]


def _body(path: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 100, "messages": PROMPT}
    if stream:
        body["stream"] = True
        if path == "/v1/chat/completions":
            body["stream_options"] = {"include_usage": True}
    return body


# (label, upstream, client path, model, translated)
CASES = [
    ("openai upstream", "chat -> chat", "/v1/chat/completions", GPT, False),
    ("openai upstream", "messages -> chat", "/v1/messages", GPT, True),
    ("anthropic upstream", "messages -> messages", "/v1/messages", CLAUDE, False),
    ("anthropic upstream", "chat -> messages", "/v1/chat/completions", CLAUDE, True),
]


def _cpu(process: psutil.Process) -> float:
    """The process's CPU seconds: the scheduler's nanosecond count (/proc/PID/schedstat,
    every thread) where Linux has it, else psutil's tick-granular user+system."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{process.pid}/task"):
            with open(f"/proc/{process.pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        times = process.cpu_times()
        return times.user + times.system


def _run_case(
    client: httpx.Client, process: psutil.Process, path: str, body: dict[str, Any], n: int
) -> float:
    """CPU seconds per request in the data-plane process over `n` requests."""
    before = _cpu(process)
    for _ in range(n):
        answer = client.post(path, json=body)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
    return (_cpu(process) - before) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"at start; {args.requests} requests x {args.rounds} rounds per case"
    )
    with FakeProvider("openai", [GPT]) as gpt, FakeProvider("anthropic", [CLAUDE]) as claude:
        gw = Gateway([], processes=1)
        try:
            gw.start(timeout=60.0)  # no worker yet: not ready until the fakes are added
            for fake, provider in ((gpt, "openai"), (claude, "anthropic")):
                spec = {"url": fake.url, "runtime_type": "external", "provider": provider}
                # model_id: that model only, no discovery; the fakes take any key.
                spec["model_id"] = GPT if provider == "openai" else CLAUDE
                spec["api_key"] = "bench-key"
                added = gw.admin("POST", "/workers", json=spec)
                if added.status_code != 202:
                    raise RuntimeError(added.text)

            def served() -> bool:
                with httpx.Client(base_url=gw.url, timeout=10) as c:
                    return all(
                        c.post(path, json=_body(path, model, False)).status_code == 200
                        for _label, _name, path, model, _t in CASES
                    )

            wait_until(served, 30.0, "both fakes served")
            process = psutil.Process(pid_serving(gw, "0"))
            results: dict[tuple[int, bool], list[float]] = {}
            with httpx.Client(base_url=gw.url, timeout=30) as client:
                for stream in (False, True):  # warm-up: every code path once, a few times
                    for _label, _name, path, model, _t in CASES:
                        _run_case(client, process, path, _body(path, model, stream), 50)
                for _round in range(args.rounds):
                    for stream in (False, True):
                        for i, (_label, _name, path, model, _t) in enumerate(CASES):
                            cost = _run_case(
                                client, process, path, _body(path, model, stream), args.requests
                            )
                            results.setdefault((i, stream), []).append(cost)
        finally:
            gw.stop()
            gw.close_log()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    print()
    print("| upstream | mode | client -> worker API | data-plane CPU us/request | added |")
    print("|---|---|---|---:|---:|")
    for stream in (False, True):
        for i, (label, name, _path, _model, translated) in enumerate(CASES):
            cost = statistics.median(results[(i, stream)]) * 1e6
            if translated:
                base = statistics.median(results[(i - 1, stream)]) * 1e6
                added = f"+{cost - base:.0f} us ({cost / base:.2f}x)"
            else:
                added = "(passed through)"
            mode = "stream" if stream else "non-stream"
            print(f"| {label} | {mode} | {name} | {cost:.0f} | {added} |")
    sys.stdout.flush()
    time.sleep(0)


if __name__ == "__main__":
    main()
