"""Tokenizers for building prompts and counting tokens; never fetched from a hub.

`--tokenizer PATH` loads a Hugging Face `tokenizer.json` (a file, or a directory holding
one) with the `tokenizers` package. Without it, `WordTokenizer` is used: a token is a
whitespace-separated word, the vocabulary is 32,768 deterministic pseudo-words, so
`encode(decode(ids)) == ids` for any ids and prompt lengths are exact. Its counts are
only as good as "words"; pass the server's tokenizer for real token counts.
"""

from __future__ import annotations

import os
import zlib
from typing import Protocol


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def allowed_ids(self) -> list[int]: ...

    def count(self, text: str) -> int: ...


_SYLLABLES = [c + v for c in "bdfghjklmnprstvz" for v in "aeiou"]  # 80 syllables


class WordTokenizer:
    """One token per whitespace-separated word; see the module docstring."""

    VOCAB_SIZE = 32768

    def __init__(self) -> None:
        self.name = "word"
        self._words = [self._word(i) for i in range(self.VOCAB_SIZE)]
        self._ids = {w: i for i, w in enumerate(self._words)}

    @staticmethod
    def _word(i: int) -> str:
        # Three base-80 syllables cover 512,000 distinct words; every word is unique.
        n = len(_SYLLABLES)
        return _SYLLABLES[i % n] + _SYLLABLES[(i // n) % n] + _SYLLABLES[(i // (n * n)) % n]

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(w, zlib.crc32(w.encode()) % self.VOCAB_SIZE) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        words = self._words
        return " ".join(words[i % self.VOCAB_SIZE] for i in ids)

    def allowed_ids(self) -> list[int]:
        return list(range(self.VOCAB_SIZE))

    def count(self, text: str) -> int:
        return len(text.split())


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` package; special tokens excluded."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "--tokenizer needs the 'tokenizers' package (pip install tokenizers)"
            ) from exc
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"no tokenizer.json at {path!r} (give a local file or a directory holding one;"
                " nothing is downloaded)"
            )
        self.name = path
        self._tok = _Tok.from_file(file)
        special = {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        size = self._tok.get_vocab_size(with_added_tokens=False)
        self._allowed = [i for i in range(size) if i not in special]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def allowed_ids(self) -> list[int]:
        return self._allowed

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_batch(self, texts: list[str]) -> list[int]:
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [len(e.ids) for e in encs]


def load_tokenizer(path: str | None) -> Tokenizer:
    return HFTokenizer(path) if path else WordTokenizer()


def count_many(tok: Tokenizer, texts: list[str]) -> list[int]:
    batch = getattr(tok, "count_batch", None)
    if batch is not None and texts:
        return list(batch(texts))
    return [tok.count(t) for t in texts]
