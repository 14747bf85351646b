#!/usr/bin/env python3
"""CPU per streamed message of the data plane's gRPC clients: smg.grpc.h2client's
H2EngineClient vs smg.grpc.client's EngineClient (grpc.aio), both through `generate` as
the front end calls them (request built, messages decoded and normalised), on uvloop.

Starts one mock engine (`smg mock-worker --grpc`, no pacing), then per client: `--streams`
concurrent Generate calls of `--tokens` tokens each (ignore_eos, one token per message),
`--rounds` times; CPU = this process's user+system time (every thread: grpc.aio's poller
included) over the run, divided by the messages received.

    .venv/bin/python native_bench/grpc_client_cpu.py --streams 64 --tokens 256 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpc_bench  # noqa: E402  (the model dir and the mock starter)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(client: Any, streams: int, tokens: int, rounds: int) -> dict[str, float]:
    from smg.grpc.types import GenerateInput, SamplingParams

    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True)
    prompt = list(range(1000, 2024))
    messages = 0

    async def one(rid: str) -> None:
        nonlocal messages
        req = GenerateInput(request_id=rid, input_ids=prompt, sampling=sampling, stream=True)
        async for _ in client.generate(req, timeout=60.0):
            messages += 1

    await asyncio.gather(*(one(f"warm-{i}") for i in range(streams)))
    messages = 0
    cpu, wall = _cpu(), time.monotonic()
    for r in range(rounds):
        await asyncio.gather(*(one(f"r{r}-{i}") for i in range(streams)))
    cpu, wall = _cpu() - cpu, time.monotonic() - wall
    return {
        "messages": messages,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "us_per_message": round(cpu / messages * 1e6, 2),
        "messages_per_s": round(messages / wall),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--mock-processes", type=int, default=1)
    p.add_argument("--clients", nargs="+", default=["h2", "aio"], choices=("h2", "aio"))
    args = p.parse_args()
    import uvloop

    from smg.grpc.client import EngineClient
    from smg.grpc.h2client import H2EngineClient

    with tempfile.TemporaryDirectory() as tmp:
        model = grpc_bench.make_model_dir(Path(tmp) / "model")
        mock = grpc_bench.start_mock(model, args.backend, processes=args.mock_processes)
        try:
            for name in args.clients:
                cls = H2EngineClient if name == "h2" else EngineClient

                async def run(cls: Any = cls) -> dict[str, float]:
                    client = cls(mock.target, args.backend)
                    try:
                        return await _drive(client, args.streams, args.tokens, args.rounds)
                    finally:
                        await client.close()

                print(name, uvloop.run(run()), flush=True)
        finally:
            mock.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
