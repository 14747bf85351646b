"""Incremental detokenization: the text of each streamed chunk of token ids.

The prefix-offset / read-offset method of vLLM and HF TGI: decode a short window of
ids, from `prefix` (a few tokens already emitted, so decoders that look at context,
e.g. SentencePiece's leading-space rule, see some) to the end, and emit what the window
adds beyond its already-emitted part `[prefix, read)`. A window that ends in U+FFFD is
an incomplete UTF-8 sequence (byte-level BPE splits multi-byte characters across
tokens): nothing is emitted and the window grows until the character completes. Only
the window is decoded per token, never the whole output (about 1.5 us per token with
the Llama-3 tokenizer, tests/test_detok.py::test_per_token_cost).

Byte-level BPE tokenizers (a ByteLevel decoder: Llama 3, Qwen, DeepSeek, GPT-OSS) take a
fast path instead: decode(ids) is the ids' bytes joined and decoded as UTF-8 with
errors="replace" (smg/tokenizer/bytelevel.py), so each chunk's bytes go through the
UTF-8 codec's incremental step, which holds back exactly a multi-byte character split across
tokens. No window and no `tokenizers` call per token.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from smg.tokenizer.bytelevel import byte_tables
from smg.tokenizer.load import Tokenizer

_REPLACEMENT = "\ufffd"
_MAX_EMPTY_RUN = 1024
_utf8_decode = codecs.utf_8_decode


def _byte_of_id(table: list[bytes], i: int) -> bytes:
    """An id past the vocabulary decodes to nothing (as in `tokenizers`); one that does
    not fit u32 is its OverflowError."""
    if 0 <= i < len(table):
        return table[i]
    if i < 0 or i >= 1 << 32:
        raise OverflowError(f"token id out of range: {i}")
    return b""


class IncrementalDetokenizer:
    """One per choice. `add` returns the new text of each chunk; `finish` what is still
    held back (an incomplete UTF-8 sequence) when the stream ends.

    Concatenated, the returned texts equal `tokenizer.decode(all ids)`. With
    `prompt_ids` (its last few tokens prime the window, as vLLM primes with the prompt),
    they equal what the ids add after the prompt, e.g. the leading space of a first
    SentencePiece "▁word" token.

    `spaces_between_special_tokens` is accepted for the API: it only ever changed the
    slow (Python) tokenizers of transformers; the `tokenizers` decoders of tokenizer.json
    put no spaces between added tokens, and transformers' fast tokenizers ignore it.
    """

    __slots__ = (
        "_decode",
        "_held",
        "_ids",
        "_pending",
        "_prefix",
        "_prefix_text",
        "_read",
        "_skip",
        "_table",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
        fast_path: bool = True,
    ) -> None:
        """`fast_path=False` forces the window method (tests compare the two)."""
        self._decode = tokenizer.inner.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        # Byte-level fast path: the id -> bytes table, and the bytes of an incomplete
        # UTF-8 sequence not decoded yet.
        # Priming is moot there: bytes of a cleanly decoding prompt tail end on a
        # character boundary, so they change nothing in what the output ids decode to.
        tables = byte_tables(tokenizer) if fast_path else None
        self._table: list[bytes] | None = None
        self._pending = b""
        self._held = ""
        if tables is not None:
            self._table = tables.skip if skip_special_tokens else tables.keep
            return
        if prompt_ids:
            # vLLM's priming: the shortest prompt tail (4..23 tokens) that decodes cleanly.
            tail = list(prompt_ids[-4:])
            for n in range(4, min(len(prompt_ids), 23) + 1):
                cand = list(prompt_ids[-n:])
                if _REPLACEMENT not in self._decode(cand, skip_special_tokens=self._skip):
                    tail = cand
                    break
            self._ids = tail
            self._read = len(tail)
            self._prefix_text = self._decode(tail, skip_special_tokens=self._skip)

    def add(self, ids: Sequence[int]) -> str:
        """The text the new ids complete; "" while a character is incomplete."""
        if not ids:
            return ""
        table = self._table
        if table is not None:
            try:
                if len(ids) == 1:
                    i = ids[0]
                    data = table[i]
                    negative = i < 0
                else:
                    data = b"".join([table[i] for i in ids])
                    negative = min(ids) < 0
            except IndexError:
                data = b"".join([_byte_of_id(table, i) for i in ids])
                negative = False
            if negative:  # table[-1] would not raise
                raise OverflowError("token id out of range: negative")
            if self._pending:
                data = self._pending + data
            # The codec's own step (what codecs' incremental decoder calls, minus its
            # Python-level wrapper): an incomplete UTF-8 sequence at the end is not
            # consumed and waits for the next chunk's bytes.
            text, used = _utf8_decode(data, "replace", False)
            self._pending = data[used:] if used < len(data) else b""
            if self._held:
                text = self._held + text
                self._held = ""
            if text and text[-1] == _REPLACEMENT:
                # Invalid bytes (incomplete ones are not decoded yet): keep the U+FFFD
                # run for the next chunk, as the window method does, so that no chunk
                # but the last ends in U+FFFD.
                cut = len(text.rstrip(_REPLACEMENT))
                self._held = text[cut:]
                text = text[:cut]
            return text
        self._ids.extend(ids)
        out = self._step()
        if out is None and len(ids) > 1:
            # The chunk's last token is a partial character: emit what the earlier ones
            # completed by replaying the chunk one token at a time.
            del self._ids[len(self._ids) - len(ids) :]
            parts = []
            for i in ids:
                self._ids.append(i)
                s = self._step()
                if s:
                    parts.append(s)
            return "".join(parts)
        return out or ""

    def _step(self) -> str | None:
        ids = self._ids
        text = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        n = len(self._prefix_text)
        if len(text) <= n or text[-1] == _REPLACEMENT:
            if text == self._prefix_text:
                # The new ids decode to nothing (skipped special tokens): nothing is
                # pending, so read moves on; and a long run of them must not grow the
                # window without bound (each step decodes it). Past _MAX_EMPTY_RUN the
                # window restarts after them, losing only a SentencePiece leading-space
                # context that 1,024 empty tokens made moot.
                self._read = len(ids)
                if self._read - self._prefix > _MAX_EMPTY_RUN:
                    self._prefix = self._read
                    self._prefix_text = ""
            return None
        new = text[n:]
        self._prefix = self._read
        self._read = len(ids)
        self._prefix_text = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        # Keep the id list short: everything before the window is done with.
        if self._prefix > 64:
            del ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new

    def finish(self) -> str:
        """What is held back (an incomplete character, decoded as U+FFFD as decode()
        does), once, at the end of the stream."""
        if self._table is not None:
            text = self._held + _utf8_decode(self._pending, "replace", True)[0]
            self._held = ""
            self._pending = b""
            return text
        if self._read >= len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        new = text[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return new
