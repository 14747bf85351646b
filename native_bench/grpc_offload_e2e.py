"""Inter-token latency through `smg launch` (gRPC mode, one data-plane process) while
32K-token chat prompts arrive: render+tokenize inline (SMG__GRPC_OFFLOAD_BYTES huge) vs
on smg.grpc.offload's pool (the default threshold).

32 streaming chats (ignore_eos, --itl-ms apart from the gRPC mock) are timed client-side;
meanwhile one 32K-token chat prompt (max_tokens 1) arrives every --every-ms. Prints the
p50/p99/max gap between SSE chunks of the 32 streams.

    .venv/bin/python native_bench/grpc_offload_e2e.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # test_grpc_e2e imports grpcmockutil top-level

from tests.gatewayutil import free_port  # noqa: E402
from tests.test_grpc_e2e import make_tokenizer_dir  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "token", "prompt", "cache", "latency", "stream"]


def start(
    command: list[str], prefix: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if line.startswith(prefix):
            return proc, line[len(prefix) :].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{command[:5]} did not start")


async def measure(
    url: str, seconds: float, streams: int, every: float, tokens: int
) -> dict[str, float]:
    rng = random.Random(5)
    per = tokens // 8
    long_messages = [
        [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(per))}
            for _ in range(8)
        ]
        for _ in range(4)
    ]
    gaps: list[float] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=streams + 64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def stream() -> None:
            while time.monotonic() < stop:
                body = {
                    "model": "llama-mock",
                    "messages": [{"role": "user", "content": "tell me a story"}],
                    "stream": True,
                    "max_tokens": 100,
                    "ignore_eos": True,
                }
                async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    last = None
                    async for line in answer.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.monotonic()
                        if last is not None and now < stop:
                            gaps.append(now - last)
                        last = now

        async def arrivals() -> int:
            sent = []
            i = 0
            while time.monotonic() < stop:
                body = {"model": "llama-mock", "messages": long_messages[i % 4], "max_tokens": 1}
                sent.append(asyncio.ensure_future(client.post("/v1/chat/completions", json=body)))
                i += 1
                await asyncio.sleep(every)
            answers = await asyncio.gather(*sent)
            assert all(a.status_code == 200 for a in answers), [
                a.text[:200] for a in answers if a.status_code != 200
            ]
            return len(answers)

        results = await asyncio.gather(arrivals(), *(stream() for _ in range(streams)))
    gaps.sort()
    return {
        "p50": 1000 * statistics.median(gaps),
        "p99": 1000 * gaps[int(0.99 * len(gaps))],
        "max": 1000 * gaps[-1],
        "gaps": len(gaps),
        "long": results[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--every-ms", type=float, default=500.0)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tokdir = make_tokenizer_dir(Path(tmp) / "tok")
        mock, worker = start(
            [
                python,
                "-m",
                "smg",
                "mock-worker",
                "--grpc",
                "--port",
                "0",
                "--tokenizer-path",
                str(tokdir),
                "--model",
                "llama-mock",
                "--max-context-length",
                "131072",
                "--itl-ms",
                str(args.itl_ms),
                "--output-mode",
                "random",
            ],
            "MOCK_WORKER_URL ",
        )
        try:
            for mode, threshold in (
                ("inline", str(1 << 62)),
                ("offload", ""),
                ("inline", str(1 << 62)),
                ("offload", ""),
            ):
                env = {**os.environ, "SMG__GRPC_OFFLOAD_BYTES": threshold}
                port = str(free_port())  # checked free, not a random guess
                gw, url = start(
                    [
                        python,
                        "-m",
                        "smg",
                        "launch",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        port,
                        "--processes",
                        "1",
                        "--worker-urls",
                        worker,
                        "--model-path",
                        str(tokdir),
                        "--prometheus-port",
                        str(free_port()),
                    ],
                    "SMG_READY ",
                    env,
                )
                try:
                    time.sleep(2)
                    r = asyncio.run(
                        measure(url, args.seconds, args.streams, args.every_ms / 1000, args.tokens)
                    )
                finally:
                    gw.terminate()
                    gw.wait(30)
                print(
                    f"{mode:8s} ITL p50 {r['p50']:.1f} ms  p99 {r['p99']:.1f} ms  max {r['max']:.1f} ms "
                    f"({r['gaps']:.0f} gaps, {r['long']:.0f} long prompts)",
                    flush=True,
                )
        finally:
            mock.terminate()
            mock.wait(10)


if __name__ == "__main__":
    main()
