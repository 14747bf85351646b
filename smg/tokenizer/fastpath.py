"""A faster exact encode for tiktoken-style byte-level BPE tokenizers (Llama 3, GPT-4's
cl100k pattern, Qwen2's), used by `Tokenizer.encode` for chat prompts.

Why: `tokenizers` 0.23 spends most of a random 1,024-token prompt's encode (1.9-2.5 ms on
the dev box) in its pre-tokenization machinery, not in the regex or the BPE: every piece
becomes a `NormalizedString` with per-byte alignments (a `WhitespaceSplit` alone over the
same pieces costs 1.4 ms). The Rust SMG 1.13 calls the same library (`tokenizers` 0.23,
default features: onig) with `encode`, so its tokenizer costs the same per token; smg's
gap there is Python around it, and this path takes the library's overhead out instead.

What it does, the library's steps for these tokenizers, in the same order:
  1. added tokens are cut out first, leftmost-longest (the library's aho-corasick);
  2. each remaining part is split by the Split pre-tokenizer's regex (`regex` module here,
     onig there), every match a piece (Isolated; the pattern matches every character);
  3. a piece is looked up by its text in the vocabulary re-keyed by each entry's UTF-8
     text: the same hits as mapping its bytes through GPT-2's bytes_to_unicode
     (ByteLevel) and looking that up, as UTF-8 is one-to-one; with `ignore_merges` a
     piece that is an entry is that id (the library does the same). Steps 2 and 3 are
     one C pass where smg.tokenizer._pieces is built (build_native): its split follows
     the pattern's alternatives on a class table made with `regex` itself
     (_char_classes), and its lookup keeps short keys inline in the hash slot (one
     cache miss a piece, where the dict takes three): the whole path then takes
     0.9-1.3 ms of CPU per random 1,024-token prompt instead of 1.7-2.1 (cold,
     native_bench/grpc_tokenize.py);
  4. other pieces are merged by smg.tokenizer._bpe (C: the library's BPE on ids, ~4x
     less per piece than `model.tokenize`, whose binding makes a `Token` per id; its
     table is built from the model's merges by build_native, ~1-1.5 s; without the
     extension, the library's `model.tokenize` on the ByteLevel-mapped piece),
     memoized per piece in a bounded dict (the library keeps a 10,000-word cache), and
     short parts between added tokens (the template's own text) are memoized whole.

Exactness: the two regex engines must classify characters alike (\\p{L}, \\p{N}, \\s, the
case-insensitive contractions). `_unsafe_chars` checks that against the tokenizer's own
Split pre-tokenizer once per pattern and process (~0.4 s), over every assigned code
point (each class in runs, bisected where the splits differ), and a text holding any
character where they disagree, or one unassigned in `regex`'s Unicode, goes to the
library (with tokenizers 0.23.3 and regex 2026.11: 17,480 characters, those of Unicode
16/17 that onig does not know yet). tests/test_tokenizer_fastpath.py compares the
ids with the library's on random and real texts.

Not taken (the library is used): add_special_tokens=True (the post-processor), any
normalizer, added tokens with lstrip/rstrip/single_word, BPE dropout/byte_fallback/
prefixes/suffixes, truncation or padding, a Split pattern not in `_PATTERNS`, a text
that is not valid Unicode.

On smg.grpc.offload's pool it serves too, though it holds the GIL where the library's
encode_batch_fast lets go of it: it is plain Python and C calls of a few ms at most, so
the interpreter switches to the event loop every 5 ms, and it costs half the CPU.
native_bench/grpc_offload_bench.py (32 streams, 10 ms apart, one long prompt each 50 ms /
500 ms): p99 gap at 8,192 tokens 15.9-17.4 ms (library 15.9-20.2), at 32,768 tokens
13.6-14.4 ms (library 15.0-16.0); CPU per prompt 4.6-5.6 vs 11.0-11.9 ms and 30-34 vs
64-73 ms.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import threading
import time
from array import array
from collections.abc import Iterable
from typing import Any

import orjson
import regex

log = logging.getLogger("smg.tokenizer")

# smg.tokenizer._bpe's and _pieces' API constants this code is written for (a stale
# in-place build of an older checkout is not used).
BPE_API = 1
PIECES_API = 1

# The Split patterns this path reproduces (their classes are \p{L}, \p{N}, \s, \r, \n and
# literal characters, which _unsafe_chars checks): cl100k / Llama 3, and Qwen2's (whose
# tokenizers carry an NFC normalizer, refused for now).
# The value: the most digits a piece takes (smg.tokenizer._pieces splits by it).
_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": 3,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": 1,
}
# Memoized BPE results (pieces that are not vocabulary entries); cleared when full.
_MEMO_MAX = 1 << 16
# Parts between added tokens up to this many characters are memoized whole (up to
# _SHORT_MAX of them): the chat template's constant text.
_SHORT = 128
_SHORT_MAX = 4096


def _byte_chars() -> dict[int, str]:
    """GPT-2's bytes_to_unicode as a str.translate table over the Latin-1 characters
    that stand for bytes: printable ones map to themselves, the other 68 to U+0100 on."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in keep:
            table[b] = chr(0x100 + n)
            n += 1
    return table


_BYTE_TABLE = _byte_chars()
# The inverse, for vocabulary entries; a character outside the 256 maps to U+FFFF, which
# encoding to Latin-1 refuses (such an entry is no byte string).
_CHAR_BYTES = {ord(c): b for b, c in ((b, chr(b).translate(_BYTE_TABLE)) for b in range(256))}
_CHAR_BYTES.update({c: 0xFFFF for c in range(0x100) if c not in _CHAR_BYTES})

# Per (pattern, tokenizers version) and process: the characters where onig and `regex`
# disagree (computing it takes ~0.1-0.3 s).
_UNSAFE: dict[str, frozenset[str]] = {}
_UNSAFE_LOCK = threading.Lock()


def _onig_pieces(split: Any, text: str) -> list[str]:
    return [piece for piece, _ in split.pre_tokenize_str(text)]


def _bad_in(split: Any, pattern: regex.Pattern[str], prefix: str, chars: str) -> list[str]:
    """The characters of `chars` that make the two engines split `prefix + run` apart
    (the run checked whole, then halves where it differs)."""
    bad: list[str] = []
    stack = [chars]
    while stack:
        run = stack.pop()
        text = prefix + run
        if _onig_pieces(split, text) == pattern.findall(text):
            continue
        if len(run) == 1:
            bad.append(run[0])
        else:
            mid = len(run) // 2
            stack += [run[:mid], run[mid:]]
    return bad


def _bad_between(
    split: Any, pattern: regex.Pattern[str], chars: str, *, letters: bool
) -> list[str]:
    """Letters (or numbers) as `regex` sees them, each between two "a"s. A letter onig
    classes otherwise starts a new onig piece; a number it classes otherwise is no
    longer a piece of its own. One call finds them; the rest is then checked again as a
    run (bisected should anything still differ)."""
    text = "a" + "a".join(chars) + "a"
    got = _onig_pieces(split, text)
    if got == pattern.findall(text):
        return []
    if letters:
        bad = {piece[0] for piece in got[1:]} - {"a"}
    else:
        alone = set(got)
        bad = {c for c in chars if c not in alone}
    rest = "".join(c for c in chars if c not in bad)
    return [*bad, *_bad_in(split, pattern, "a", rest)]


def _unsafe_chars(split: Any, pattern: regex.Pattern[str]) -> frozenset[str]:
    """Every code point (surrogates aside) checked in runs of its class as `regex` sees
    it: letters and numbers each between "a"s, whitespace one by one in a few contexts,
    everything else as runs after "."; the letters that fold to the contractions'
    letters in each contraction's context."""
    bad: set[str] = set()
    spaces = ""
    folds: set[str] = set()
    # One plane (65,536 code points) at a time: the process keeps the memory it peaks at.
    for plane in range(0, 0x110000, 0x10000):
        points = array("I", (c for c in range(plane, plane + 0x10000) if not 0xD800 <= c < 0xE000))
        block = points.tobytes().decode("utf-32-le" if sys.byteorder == "little" else "utf-32-be")
        letters = regex.sub(r"\P{L}+", "", block)
        numbers = regex.sub(r"\P{N}+", "", block)
        spaces += regex.sub(r"\S+", "", block)
        # Unassigned code points (Cn in `regex`'s Unicode, the newer one) are not
        # checked: the fast path leaves every text holding one to the library
        # (FastEncoder). Private use (Co) is other in every version.
        others = regex.sub(r"[\p{L}\p{N}\s\p{Cn}\p{Co}]+", "", block)
        step = 4096
        for chars, are_letters in ((letters, True), (numbers, False)):
            for i in range(0, len(chars), step):
                bad.update(_bad_between(split, pattern, chars[i : i + step], letters=are_letters))
        for i in range(0, len(others), step * 16):
            bad.update(_bad_in(split, pattern, ".", others[i : i + step * 16]))
        folds.update(regex.findall(r"(?i)[strvemld]", block))
        folds.update(regex.findall(r"(?fi)[strvemld]", block))
    contexts = ("a{}a", "{}{}a", "{}\n", ".{}.", "{}", "a{}{}", "1{}1", "{}a")
    for c in spaces:
        if any(
            _onig_pieces(split, ctx.format(c, c)) != pattern.findall(ctx.format(c, c))
            for ctx in contexts
        ):
            bad.add(c)
    for c in sorted(folds):
        for word in ("s", "t", "re", "ve", "m", "ll", "d"):
            for k in range(len(word)):
                text = "'" + word[:k] + c + word[k + 1 :] + "a"
                if _onig_pieces(split, text) != pattern.findall(text):
                    bad.add(c)
    return frozenset(bad)


# smg.tokenizer._pieces' character classes (bits) and contraction letters (bits 4-7:
# 1 + the index in _FOLD_LETTERS): the same values as its C.
_CLASS_L, _CLASS_N, _CLASS_S = 1, 2, 4
_FOLD_LETTERS = "strevmld"
_CLASSES: list[bytes] = []  # built once per process (~0.2 s)


def _char_classes() -> bytes:
    """A byte per code point (surrogates included): which of \\p{L}, \\p{N} and \\s the
    `regex` module puts it in, and which contraction letter it matches under (?i), as
    the Split pattern's own classes do."""
    with _UNSAFE_LOCK:
        if _CLASSES:
            return _CLASSES[0]
        classes = [(r"\p{L}+", _CLASS_L), (r"\p{N}+", _CLASS_N), (r"\s+", _CLASS_S)]
        classes += [(f"(?i:{letter})+", (k + 1) << 4) for k, letter in enumerate(_FOLD_LETTERS)]
        endian = "le" if sys.byteorder == "little" else "be"
        every = array("I", range(0x110000)).tobytes().decode(f"utf-32-{endian}", "surrogatepass")
        bits = 0
        for source, bit in classes:
            # One table per class, filled by runs, then or-ed in as one integer.
            one = bytearray(0x110000)
            for match in regex.finditer(source, every):
                start, end = match.span()
                one[start:end] = bytes([bit]) * (end - start)
            bits |= int.from_bytes(one, "little")
        table = bits.to_bytes(0x110000, "little")
        # The C tests the classes one after another: no character may be in two.
        overlap = bytes(1 if (b & 7) & ((b & 7) - 1) else 0 for b in range(256))
        if any(table.translate(overlap)):
            raise ValueError("a character is in two of \\p{L}, \\p{N}, \\s")
        if any(table[ord(c)] & _CLASS_S == 0 for c in " \r\n"):
            raise ValueError("space, \\r or \\n is not \\s")
        _CLASSES.append(table)
        return _CLASSES[0]


def _extension(name: str, api: int, instead: str) -> Any:
    """The C extension smg.tokenizer.<name> when it is built and of the API this code is
    written for, else None (`instead` says what the path does without it)."""
    try:
        module = importlib.import_module(f"smg.tokenizer.{name}")
    except ImportError:
        log.debug("smg.tokenizer.%s not built: %s", name, instead)
        return None
    if getattr(module, "API", None) != api:
        log.warning(
            "smg.tokenizer.%s at %s is a stale build (API %s, this code needs %s): %s; "
            "rebuild with `python setup.py build_ext --inplace`",
            name,
            module.__file__,
            getattr(module, "API", None),
            api,
            instead,
        )
        return None
    return module


def native_pieces(source: str, by_text: dict[str, int]) -> Any:
    """smg.tokenizer._pieces.Pieces for this Split pattern and vocabulary (by UTF-8 text),
    or None: no extension or a stale one, a pattern or vocabulary it does not take."""
    _pieces = _extension("_pieces", PIECES_API, "the regex module splits")
    if _pieces is None:
        return None
    digits = _PATTERNS.get(source)
    if digits is None:
        return None
    try:
        vocab = [(text.encode("utf-8"), token) for text, token in by_text.items()]
        return _pieces.Pieces(_char_classes(), digits, vocab)
    except ValueError as exc:  # a key over 255 bytes, an id over 2^32, a class overlap
        log.debug("tokenizer pieces not in C (%s): the regex module splits", exc)
        return None


class FastEncoder:
    """`encode(text)` -> the library's ids for `encode(text, add_special_tokens=False)`,
    or None where this path does not apply (the caller then asks the library)."""

    def __init__(
        self,
        pattern: regex.Pattern[str],
        added: dict[str, int],
        vocab: Iterable[tuple[str, int]],
        model: Any,
        unsafe: frozenset[str],
    ) -> None:
        self._pattern = pattern
        self._added = added
        # Added tokens, longest first: an alternation tries them in order, so at each
        # position the longest wins, and the scan takes the leftmost position first.
        names = sorted(added, key=len, reverse=True)
        self._added_re = (
            regex.compile("(" + "|".join(regex.escape(n) for n in names) + ")") if names else None
        )
        # The vocabulary by the text each entry stands for (entries whose bytes are UTF-8;
        # no text encodes to the others): a piece is looked up as it is, unmapped. The
        # same hits as mapping it to ByteLevel characters first, as UTF-8 is one-to-one.
        self._by_text: dict[str, int] = {}
        for word, token in vocab:
            try:
                self._by_text[word.translate(_CHAR_BYTES).encode("latin-1").decode("utf-8")] = token
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
        self._model = model
        # smg.tokenizer._bpe.Merges once built (build_native); None: the library merges.
        self._native: Any = None
        # smg.tokenizer._pieces.Pieces once built (build_native); None: `regex` splits
        # and the dict above looks pieces up.
        self._pieces: Any = None
        # Both memos are used by the loop and the offload pool's threads at once: each
        # dict operation is atomic under the GIL, and a key's value is always the same.
        self._memo: dict[str, tuple[int, ...]] = {}
        self._short: dict[str, tuple[int, ...]] = {}
        # Unassigned code points too: onig's Unicode may differ from `regex`'s there.
        # Checking a 6,000-character prompt against ~1,000 ranges costs `regex` 0.8 ms;
        # `re` keeps a class of BMP characters as a bitmap (17 us), so: one `re` class of
        # the BMP ones and every non-BMP character, then the rare non-BMP hits exactly.
        bmp_points = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000)
        bmp = frozenset(c for c in unsafe if c < "\U00010000")
        bmp |= frozenset(regex.findall(r"\p{Cn}", bmp_points))
        # Lone surrogates: not valid Unicode, the library's error to raise.
        bmp |= frozenset(chr(c) for c in range(0xD800, 0xE000))
        self._quick_re = re.compile("[" + _ranges(bmp) + "\\U00010000-\\U0010ffff]")
        self._unsafe_re = regex.compile("[\\p{Cn}" + _ranges(unsafe - bmp) + "]")
        self.unsafe = unsafe

    @classmethod
    def build(cls, inner: Any) -> FastEncoder | None:
        """The fast path for this `tokenizers.Tokenizer`, or None (with the reason logged
        at debug) when it is not a shape this path reproduces exactly."""
        try:
            reason = _unsupported(inner)
            if reason is None:
                return cls._build(inner)
        except (AttributeError, TypeError, IndexError, KeyError, ValueError) as exc:
            # An older `tokenizers` (pyproject allows 0.15) without what is read here.
            reason = f"this tokenizers build does not show its parts ({exc!r})"
        log.debug("tokenizer fast path not used: %s", reason)
        return None

    @classmethod
    def _build(cls, inner: Any) -> FastEncoder:
        state = json.loads(inner.pre_tokenizer.__getstate__())
        source = state["pretokenizers"][0]["pattern"]["Regex"]
        pattern = regex.compile(source)
        with _UNSAFE_LOCK:
            unsafe = _UNSAFE.get(source)
            if unsafe is None:
                unsafe = _UNSAFE[source] = _unsafe_chars(inner.pre_tokenizer[0], pattern)
        added = {t.content: i for i, t in inner.get_added_tokens_decoder().items()}
        # Id by id rather than get_vocab(): that dict would cost the process ~20 MB more.
        # An id the count misses (a vocabulary with holes) is only slower: the model's
        # BPE gives an entry its id.
        model = inner.model
        vocab = (
            (word, i)
            for i in range(inner.get_vocab_size(with_added_tokens=False))
            if (word := model.id_to_token(i)) is not None
        )
        return cls(pattern, added, vocab, model, unsafe)

    def build_native(self) -> bool:
        """Build the C merge table from the model's own merges (~1-1.5 s for Llama 3's
        280K, on the caller's thread) and the C split and vocabulary table (~0.3 s), and
        use them from then on; False (the library keeps merging) where the extension is
        missing or stale or the model is not one it reproduces. Each is used without
        the other too."""
        started = time.perf_counter()
        table = native_merges(self._model)
        merged = time.perf_counter()
        self._pieces = native_pieces(self._pattern.pattern, self._by_text)
        if self._pieces is not None:
            log.info(
                "tokenizer fast path: C pieces on (%d entries, %.1f s)",
                self._pieces.size,
                time.perf_counter() - merged,
            )
        if table is not None:
            self._native = table
            log.info(
                "tokenizer fast path: C merges on (%d merges, %.1f s)",
                table.size,
                merged - started,
            )
        return table is not None

    def encode(self, text: str) -> list[int] | None:
        if not text.isascii():
            for c in self._quick_re.findall(text):
                if c < "\U00010000" or self._unsafe_re.match(c):
                    return None
        parts = self._added_re.split(text) if self._added_re is not None else [text]
        ids: list[int] = []
        short = self._short
        for i, part in enumerate(parts):
            if i % 2:  # the split's captured separators: the added tokens
                ids.append(self._added[part])
            elif len(part) <= _SHORT:
                # The template's own text between added tokens (role names, headers,
                # a date line) comes back with every request: one lookup.
                known = short.get(part)
                if known is None:
                    known = tuple(self._encode_part(part)) if part else ()
                    if len(short) >= _SHORT_MAX:
                        short.clear()
                    short[part] = known
                ids += known
            else:
                ids += self._encode_part(part)
        return ids

    def _encode_part(self, part: str) -> list[int] | tuple[int, ...]:
        """The ids of text holding no added token."""
        if self._pieces is not None:
            # Each piece's id, or the piece itself where it is no vocabulary entry.
            items, missing = self._pieces.scan(part)
            if missing:
                return self._with_merges(items, items)
            return items  # type: ignore[no-any-return]  # ids only
        pieces = self._pattern.findall(part)
        found = list(map(self._by_text.get, pieces))
        if None in found:
            return self._with_merges(pieces, found)
        return found  # type: ignore[return-value]  # no None in it

    def _with_merges(self, pieces: list[Any], found: list[Any]) -> list[int]:
        """`found` with each piece whose entry there is no id (None, or the piece itself
        from the C scan) BPE-merged (memoized)."""
        out: list[int] = []
        memo = self._memo
        native = self._native
        for piece, token in zip(pieces, found):
            if token.__class__ is int:
                out.append(token)
                continue
            merged = memo.get(piece)
            if merged is None:
                # Tuples of ints: the collector stops tracking them (a list would add
                # up to _MEMO_MAX containers to every full collection).
                if native is not None:
                    merged = native.merge(piece.encode("utf-8"))
                if merged is None:  # no C merges here, or a piece over 512 bytes
                    word = piece.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)
                    merged = tuple([t.id for t in self._model.tokenize(word)])
                if len(memo) >= _MEMO_MAX:
                    memo.clear()
                memo[piece] = merged
            out += merged
        return out


def native_merges(model: Any) -> Any:
    """smg.tokenizer._bpe.Merges for this `tokenizers` BPE model (its merges by id pair,
    in rank order), or None: no extension or a stale one, a byte without its ByteLevel
    character in the vocabulary (the library would give its unknown token), merges in a
    form not read here. The caller has checked the model's shape (_unsupported)."""
    _bpe = _extension("_bpe", BPE_API, "the library merges")
    if _bpe is None:
        return None
    try:
        state = orjson.loads(model.__getstate__())
        vocab: dict[str, int] = state["vocab"]
        pairs = state["merges"]
        if pairs and isinstance(pairs[0], str):  # the older "left right" form
            split = [pair.split(" ") for pair in pairs]
            if any(len(pair) != 2 for pair in split):
                return None
            pairs = split
        lefts = [pair[0] for pair in pairs]
        rights = [pair[1] for pair in pairs]
        get = vocab.__getitem__
        columns = (map(get, lefts), map(get, rights), map(get, map(str.__add__, lefts, rights)))
        left_ids, right_ids, merged_ids = (array("I", column) for column in columns)
        byte_ids = array("I", (get(chr(b).translate(_BYTE_TABLE)) for b in range(256)))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
        log.debug("tokenizer merges not read (%r): the library merges", exc)
        return None
    rows = array("I", bytes(12 * len(left_ids)))
    rows[0::3], rows[1::3], rows[2::3] = left_ids, right_ids, merged_ids
    try:
        return _bpe.Merges(byte_ids.tobytes(), rows.tobytes())
    except ValueError:  # an id over 2^31
        return None


def _ranges(chars: frozenset[str]) -> str:
    """A character class body (for `re` and `regex`) of `chars` as ranges: `regex`
    tests a class of single characters one by one (17,000 of them cost 36 ms per
    6,000-character prompt)."""
    out: list[str] = []
    points = sorted(map(ord, chars))
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        lo, hi = f"\\U{points[i]:08x}", f"\\U{points[j]:08x}"
        out.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "".join(out)


def _unsupported(inner: Any) -> str | None:
    """Why this tokenizer is not one the fast path reproduces (None: it is)."""
    from tokenizers import models, pre_tokenizers

    if inner.normalizer is not None:
        return "it has a normalizer"
    if inner.truncation is not None or inner.padding is not None:
        return "truncation or padding is set"
    model = inner.model
    if not isinstance(model, models.BPE):
        return "the model is not BPE"
    if not model.ignore_merges:
        return "BPE without ignore_merges"
    if model.dropout or model.byte_fallback or model.continuing_subword_prefix:
        return "BPE dropout, byte_fallback or a subword prefix"
    if model.end_of_word_suffix:
        return "BPE with an end-of-word suffix"
    pre = inner.pre_tokenizer
    if not isinstance(pre, pre_tokenizers.Sequence):
        return "the pre-tokenizer is not Split + ByteLevel"
    try:
        state = json.loads(pre.__getstate__())
    except (TypeError, ValueError):
        return "the pre-tokenizer cannot be read"
    steps = state.get("pretokenizers") or []
    if len(steps) != 2:
        return "the pre-tokenizer is not Split + ByteLevel"
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert") is not False
        or not isinstance(split.get("pattern"), dict)
        or split["pattern"].get("Regex") not in _PATTERNS
    ):
        return "the Split step is not a known pattern (Isolated)"
    if (
        byte_level.get("type") != "ByteLevel"
        or byte_level.get("add_prefix_space") is not False
        or byte_level.get("use_regex") is not False
    ):
        return "the ByteLevel step adds a prefix space or its own regex"
    if getattr(inner, "encode_special_tokens", False):
        return "encode_special_tokens is set"
    tokens = list(inner.get_added_tokens_decoder().values())
    for token in tokens:
        if token.lstrip or token.rstrip or token.single_word:
            return f"added token {token.content!r} has lstrip/rstrip/single_word"
    # The library matches non-normalized added tokens, then normalized ones: one pass
    # here is the same only when they are all of one kind.
    if len({token.normalized for token in tokens}) > 1:
        return "added tokens both normalized and not"
    return None
