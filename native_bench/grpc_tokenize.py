#!/usr/bin/env python3
"""Prompt tokenization alone, on grpc_bench.py's prompts (issues 10/11): `tokenizers`'
encode variants against smg.tokenizer.fastpath, CPU ms per prompt.

The prompts are grpc_bench's: `smg bench`'s random dataset (seed, --input-len tokens)
through the Llama 3.1 chat template, with the real Llama-3 tokenizer. Each way encodes
its own half of the prompts once ("cold": every prompt is new to it, as in the benchmark,
where no prompt repeats), then all of them again ("warm"); the halves swap each round so
that neither profits from the other's BPE cache more than the other. Every fast-path
answer is checked against the library's ids first. The fast path three times: its misses
merged by the library's `model.tokenize`, by smg.tokenizer._bpe (C), and with that the
split and lookup by smg.tokenizer._pieces (C) as well.

    .venv/bin/python native_bench/grpc_tokenize.py --prompts 400 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # grpcmockutil

from grpcmockutil import llama3_dir  # noqa: E402

from smg.bench.datasets import random_dataset  # noqa: E402
from smg.bench.tokenizer import load_tokenizer as bench_tokenizer  # noqa: E402
from smg.chat import ChatTemplate  # noqa: E402
from smg.tokenizer import load_tokenizer  # noqa: E402
from smg.tokenizer.fastpath import FastEncoder  # noqa: E402


def prompts(model_dir: Path, count: int, input_len: int, seed: int) -> list[str]:
    tok = load_tokenizer(str(model_dir))
    samples, _ = random_dataset(bench_tokenizer(str(model_dir)), count, input_len, 16, seed=seed)
    template = ChatTemplate(
        tok.chat_template or "", bos_token=tok.bos_token, eos_token=tok.eos_token
    )
    return [template.render([{"role": "user", "content": s.prompt}]) for s in samples]


def cpu_ms_per_call(fn: Callable[[str], Any], texts: Sequence[str]) -> float:
    start = time.process_time()
    for text in texts:
        fn(text)
    return (time.process_time() - start) / len(texts) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = llama3_dir(Path(tmp) / "llama3")
        texts = prompts(model_dir, args.prompts, args.input_len, args.seed)
        tok = load_tokenizer(str(model_dir))
    inner = tok.inner
    start = time.process_time()
    fast_library = FastEncoder.build(inner)
    if fast_library is None:
        raise SystemExit("the fast path does not apply to this tokenizer")
    print(f"fast path set-up: {time.process_time() - start:.2f} s CPU")
    fast = FastEncoder.build(inner)
    start = time.process_time()
    if fast is None or not fast.build_native():
        raise SystemExit("smg.tokenizer._bpe is not built (python setup.py build_ext --inplace)")
    print(f"C merges and pieces set-up: {time.process_time() - start:.2f} s CPU")
    if fast._pieces is None:
        raise SystemExit("smg.tokenizer._pieces is not built")
    fast_merges = FastEncoder.build(inner)
    if fast_merges is None or not fast_merges.build_native():
        raise SystemExit("smg.tokenizer._bpe is not built")
    fast_merges._pieces = None  # the regex module's split, the dict's lookup
    ways: dict[str, Callable[[str], Any]] = {
        "library encode": lambda t: inner.encode(t, add_special_tokens=False),
        "library encode_batch_fast": lambda t: inner.encode_batch_fast(
            [t], add_special_tokens=False
        ),
        "library pre_tokenize_str only": inner.pre_tokenizer.pre_tokenize_str,
        "smg fastpath, library merges": fast_library.encode,
        "smg fastpath, C merges": fast_merges.encode,
        "smg fastpath, C pieces and merges": fast.encode,
    }
    chars = sum(map(len, texts)) / len(texts)
    print(f"{len(texts)} prompts of {args.input_len} tokens, {chars:,.0f} characters on average")
    # The fast path gets fresh prompts each round (new seeds) for its cold figure; the
    # library keeps its own BPE cache across rounds as a process would.
    cold: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        batch = texts if r == 0 else prompts_again(args, r)
        for text in batch[:20]:
            ids = inner.encode(text, add_special_tokens=False).ids
            assert fast.encode(text) == ids and fast_library.encode(text) == ids
            assert fast_merges.encode(text) == ids
        half = len(batch) // len(ways)
        for k, (name, fn) in enumerate(ways.items()):
            share = batch[((k + r) % len(ways)) * half :][:half]
            cold[name].append(cpu_ms_per_call(fn, share))
    print("| way | cold ms/prompt (each round) | warm ms/prompt |")
    print("|---|---|---|")
    for name, fn in ways.items():
        warm = cpu_ms_per_call(fn, texts)
        rounds = ", ".join(f"{v:.3f}" for v in cold[name])
        print(f"| {name} | {rounds} | {warm:.3f} |")
    return 0


def prompts_again(args: argparse.Namespace, round_no: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        return prompts(
            llama3_dir(Path(tmp) / "llama3"), args.prompts, args.input_len, args.seed + round_no
        )


if __name__ == "__main__":
    raise SystemExit(main())
