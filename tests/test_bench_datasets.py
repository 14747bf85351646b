"""Prompt sets and tokenizers of `smg bench`."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from smg.bench import datasets
from smg.bench.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from tests.tokenizer_data import package_file


def packaged_tokenizer() -> str | None:
    """A real BPE tokenizer.json shipped inside an installed package (read in place).

    anthropic<=0.38 ships `anthropic/tokenizer.json` (test dependency `anthropic==0.38.0`);
    litellm ships the same file under litellm_core_utils/tokenizers.
    """
    candidates = [
        ("anthropic", "tokenizer.json"),
        ("litellm", os.path.join("litellm_core_utils", "tokenizers", "anthropic_tokenizer.json")),
    ]
    for package, rel in candidates:
        path = package_file(package, rel)
        if path is not None:
            return path
    return None


TOKENIZER_JSON = packaged_tokenizer()
needs_hf = pytest.mark.skipif(
    TOKENIZER_JSON is None or importlib.util.find_spec("tokenizers") is None,
    reason="needs `tokenizers` and a packaged tokenizer.json (pip install anthropic==0.38.0)",
)


def test_word_tokenizer_round_trips_exactly() -> None:
    tok = WordTokenizer()
    ids = [0, 5, 79, 80, 6400, 32767]
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.count("a b  c\nd") == 4
    assert len(set(tok.decode(list(range(tok.VOCAB_SIZE))).split())) == tok.VOCAB_SIZE


def test_random_dataset_exact_lengths_with_word_tokenizer() -> None:
    tok = WordTokenizer()
    reqs, info = datasets.random_dataset(tok, 20, 50, 7, 0.0, 0, seed=1)
    assert [r.prompt_len for r in reqs] == [50] * 20
    assert [tok.count(r.prompt) for r in reqs] == [50] * 20
    assert [r.expected_output_len for r in reqs] == [7] * 20
    assert info.mismatch == 0
    again, _ = datasets.random_dataset(tok, 20, 50, 7, 0.0, 0, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    other, _ = datasets.random_dataset(tok, 20, 50, 7, 0.0, 0, seed=2)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]


def test_random_dataset_range_ratio_and_prefix() -> None:
    tok = WordTokenizer()
    reqs, _ = datasets.random_dataset(tok, 200, 100, 10, 0.5, prefix_len=5, seed=0)
    ins = [r.prompt_len - 5 for r in reqs]
    outs = [r.expected_output_len for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 20
    assert min(outs) >= 5 and max(outs) <= 15
    prefixes = {" ".join(r.prompt.split()[:5]) for r in reqs}
    assert len(prefixes) == 1
    with pytest.raises(ValueError):
        datasets.random_dataset(tok, 1, 10, 1, 1.0)


def test_prefix_repetition_dataset() -> None:
    tok = WordTokenizer()
    reqs, _ = datasets.prefix_repetition_dataset(tok, 12, 8, 4, 3, 5, seed=0)
    assert len(reqs) == 12
    assert all(r.prompt_len == 12 and r.expected_output_len == 5 for r in reqs)
    prefixes = [" ".join(r.prompt.split()[:8]) for r in reqs]
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [4, 4, 4]
    with pytest.raises(ValueError):
        datasets.prefix_repetition_dataset(tok, 2, num_prefixes=3)


def test_shared_prefix_dataset() -> None:
    tok = WordTokenizer()
    reqs, _ = datasets.shared_prefix_dataset(tok, 3, 4, 20, 6, 9, seed=0)
    assert len(reqs) == 12
    systems = [r.prompt.split("\n\n")[0] for r in reqs]
    assert sorted(systems.count(s) for s in set(systems)) == [4, 4, 4]
    assert all(r.prompt_len == 26 and r.expected_output_len == 9 for r in reqs)


def test_sharegpt_dataset(tmp_path: Path) -> None:
    tok = WordTokenizer()
    convs = [
        {"conversations": [{"value": "one two three four five"}, {"value": "a b c d e f"}]},
        {"conversations": [{"value": "too short"}, {"value": "a b c d"}]},
        {"conversations": [{"value": "only one turn here ok"}]},
        {"conversations": [{"value": "w x y z q"}, {"value": "1 2 3 4"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    reqs, _ = datasets.sharegpt_dataset(tok, str(path), 2, None, seed=0)
    assert sorted((r.prompt_len, r.expected_output_len) for r in reqs) == [(5, 4), (5, 6)]
    fixed, _ = datasets.sharegpt_dataset(tok, str(path), 5, output_len=2, seed=0)
    assert len(fixed) == 5 and {r.expected_output_len for r in fixed} == {2}


def test_timed_trace_shares_prefixes_and_scales_time(tmp_path: Path) -> None:
    tok = WordTokenizer()
    rows = [
        {"timestamp": 1000, "input_length": 10, "output_length": 3, "hash_ids": [1, 2]},
        {"timestamp": 1500, "input_length": 6, "output_length": 4, "hash_ids": [1, 3]},
        {"timestamp": 3000, "input_length": 5, "output_length": 2},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs, _ = datasets.timed_trace_dataset(tok, str(path), 10, chunk_size=4, sec_multiplier=0.001)
    assert [r.prompt_len for r in reqs] == [10, 6, 5]
    assert [r.expected_output_len for r in reqs] == [3, 4, 2]
    assert [r.timestamp for r in reqs] == pytest.approx([1.0, 1.5, 3.0])
    assert reqs[0].prompt.split()[:4] == reqs[1].prompt.split()[:4]
    assert reqs[0].prompt.split()[4:8] != reqs[1].prompt.split()[4:8]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad trace row"):
        datasets.timed_trace_dataset(tok, str(bad), 1)


def test_missing_tokenizer_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer(str(tmp_path / "nope"))


@needs_hf
def test_hf_tokenizer_random_prompts_hit_lengths() -> None:
    assert TOKENIZER_JSON is not None
    tok = HFTokenizer(TOKENIZER_JSON)
    reqs, info = datasets.random_dataset(tok, 30, 64, 8, 0.0, prefix_len=16, seed=0)
    counts = [tok.count(r.prompt) for r in reqs]
    assert counts == [r.prompt_len for r in reqs]
    assert sum(abs(c - 80) for c in counts) <= 30  # decode/re-encode drift stays small
    assert abs(info.mismatch) <= 30
    if os.path.basename(TOKENIZER_JSON) == "tokenizer.json":  # directory form
        assert HFTokenizer(os.path.dirname(TOKENIZER_JSON)).count("hello world") >= 2
