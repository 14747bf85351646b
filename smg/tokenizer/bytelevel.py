"""The bytes of each token id of a byte-level BPE tokenizer (GPT-2's `ByteLevel`
decoder: Llama 3, Qwen, DeepSeek, GPT-OSS), for detok.py's fast path.

`tokenizers`' decode(ids) is: each id's token string (the added vocabulary first, then
the model's; unknown ids dropped; with skip_special_tokens, strings that are special
added tokens dropped), then the ByteLevel decoder maps each token's characters back to
bytes (GPT-2's bytes_to_unicode inverted; a token with any character outside that map
is taken as its own UTF-8 instead), joins all the bytes and decodes them lossily
(`String::from_utf8_lossy`, one U+FFFD per maximal invalid subpart, as Python's "utf-8"
codec with errors="replace"). ByteLevel's `add_prefix_space`/`trim_offsets`/`use_regex`
only act on encoding and offsets, never on decode. So decode(ids) is
`b"".join(table[i] for i in ids).decode("utf-8", "replace")`, and the table is built
once per Tokenizer here. tests/test_detok.py checks this against `tokenizers` itself
for every id and for random id sequences.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smg.tokenizer.load import Tokenizer

# Cached on the Tokenizer object (lazily: only gRPC mode streams text).
_ATTR = "_smg_bytelevel_tables"


def _byte_of_char() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for U+0100 onwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in keep:
            out[chr(0x100 + n)] = b
            n += 1
    return out


_BYTE_OF_CHAR = _byte_of_char()
# To latin-1 chars of the bytes; the characters below U+0100 that the map lacks (space,
# controls, U+00AD...) go to U+FFFF so that encoding to latin-1 fails for them too.
_TRANSLATE = {ord(c): b for c, b in _BYTE_OF_CHAR.items()}
_TRANSLATE.update({c: 0xFFFF for c in range(0x100) if chr(c) not in _BYTE_OF_CHAR})


def token_bytes(token: str) -> bytes:
    """The ByteLevel decoder's bytes for one token string."""
    try:
        return token.translate(_TRANSLATE).encode("latin-1")
    except UnicodeEncodeError:
        # A character outside the map: decode takes the whole token as its UTF-8.
        return token.encode("utf-8")


def is_byte_level(decoder_json: object) -> bool:
    """True for a ByteLevel decoder, or a Sequence of exactly one ByteLevel. Anything
    else (Replace, ByteFallback, Strip, Metaspace, two ByteLevels...) keeps the window
    method: conservative on purpose."""
    if not isinstance(decoder_json, dict):
        return False
    kind = decoder_json.get("type")
    if kind == "ByteLevel":
        return True
    if kind == "Sequence":
        steps = decoder_json.get("decoders")
        return isinstance(steps, list) and len(steps) == 1 and is_byte_level(steps[0])
    return False


class ByteTables:
    """Per id, its bytes in decode(): `keep` with special tokens, `skip` without them
    (b"" for a special token's id). Ids the vocabulary lacks below `len(keep)` are b""
    (decode drops them); ids at or past it are left to the caller (the window method)."""

    __slots__ = ("keep", "skip")

    def __init__(self, keep: list[bytes], skip: list[bytes]) -> None:
        self.keep = keep
        self.skip = skip


def byte_tables(tokenizer: Tokenizer) -> ByteTables | None:
    """The tables for a byte-level tokenizer (built once, cached on it), None otherwise."""
    cached = tokenizer.__dict__.get(_ATTR, False)
    if cached is not False:
        return cached
    tables = _build(tokenizer)
    setattr(tokenizer, _ATTR, tables)
    return tables


def _build(tokenizer: Tokenizer) -> ByteTables | None:
    inner = tokenizer.inner
    decoder = inner.decoder
    if decoder is None:
        return None
    try:
        config = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return None
    if not is_byte_level(config):
        return None
    vocab = inner.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    special = {t.content for t in inner.get_added_tokens_decoder().values() if t.special}
    keep: list[bytes] = [b""] * size
    skip: list[bytes] = [b""] * size
    id_to_token = inner.id_to_token
    for i in range(size):
        # id_to_token looks up as decode does: added vocabulary first, then the model.
        token = id_to_token(i)
        if token is None:
            continue
        data = token_bytes(token)
        keep[i] = data
        # decode's skip test is on the token string (is_special_token(token)).
        if token not in special:
            skip[i] = data
    return ByteTables(keep, skip)
