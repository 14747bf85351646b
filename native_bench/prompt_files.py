"""`smg bench`'s random prompts made once, in parallel, as `--dataset-name custom` files.

`smg bench --dataset-name random` fits every prompt to its length by decoding and
re-encoding it (up to 10 rounds): ~30 ms a prompt at 1,024 Llama-3 tokens and ~230 ms at
8,192 on this project's VM, in one process, before each run. grpc_bench runs it four times
per input length (two gateways, saturation and half rate), so on the device host it cost
more than the runs themselves. Here each input length's prompts are made once, split over
processes (`smg.bench.datasets.random_dataset`, one seed per chunk), and written as JSON
lines ({"prompt": ...}) that `smg bench --dataset-name custom --disable-shuffle` reads with
one encode a prompt (to count it). One file per use (saturation, half rate), so no run
repeats a prompt another run of the same gateway sent.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64  # prompts a task: small enough to spread 512 prompts over 8+ processes

_tok = None  # the worker process's tokenizer, loaded once by _init


def chunk_sizes(total: int, chunk: int = CHUNK) -> list[int]:
    """`total` split into pieces of `chunk` (the last one shorter)."""
    if total < 0 or chunk < 1:
        raise ValueError("total must be >= 0 and chunk >= 1")
    return [min(chunk, total - start) for start in range(0, total, chunk)]


def chunk_seed(seed: int, use: str, index: int) -> str:
    """The seed of one chunk: distinct per use and chunk, the same on every run."""
    return f"{seed}:{use}:{index}"


def _init(tokenizer_dir: str) -> None:
    global _tok
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from smg.bench.tokenizer import load_tokenizer

    _tok = load_tokenizer(tokenizer_dir)


def _make(n: int, input_len: int, output_len: int, seed: str) -> list[str]:
    from smg.bench.datasets import random_dataset

    assert _tok is not None
    # random.Random takes a str seed as it takes an int (random_dataset passes it on).
    samples, _ = random_dataset(_tok, n, input_len, output_len, seed=seed)  # type: ignore[arg-type]
    return [s.prompt for s in samples]


def write_prompt_files(
    tokenizer_dir: Path,
    input_len: int,
    output_len: int,
    counts: Mapping[str, int],
    seed: int,
    dest: Path,
    processes: int | None = None,
) -> dict[str, Path]:
    """One file per use in `counts` (use -> prompts), `dest/{use}-{input_len}.jsonl`."""
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [
        (use, n, chunk_seed(seed, use, i))
        for use, total in counts.items()
        for i, n in enumerate(chunk_sizes(total))
    ]
    workers = max(1, min(processes or len(os.sched_getaffinity(0)), len(jobs)))
    # spawn, not fork: a forked HF tokenizer that has run its thread pool can hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, initializer=_init, initargs=(str(tokenizer_dir),)) as ex:
        futures = [ex.submit(_make, n, input_len, output_len, s) for _, n, s in jobs]
        results = [f.result() for f in futures]
    paths: dict[str, Path] = {}
    for use in counts:
        path = dest / f"{use}-{input_len}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for (job_use, _, _), prompts in zip(jobs, results):
                if job_use == use:
                    for prompt in prompts:
                        f.write(json.dumps({"prompt": prompt}) + "\n")
        paths[use] = path
    return paths
