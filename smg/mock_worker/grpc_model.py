"""The gRPC mock's model: a tokenizer directory read the way the engines read it.

`tokenizer.json` (the `tokenizers` library) plus, when present, `tokenizer_config.json`
(eos/bos/pad tokens), `generation_config.json` (extra EOS ids, sampling defaults) and
`config.json` (EOS ids, vocab_size, model_type, architectures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from smg.mock_worker.grpc_script import Model

# The advertised sampling defaults (both servicers filter the model's to these keys).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _ids(v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


@dataclass(frozen=True)
class ModelFiles:
    """Everything the mock reads from the tokenizer directory, once at start."""

    path: Path
    tokenizer: Tokenizer
    vocab_size: int
    special_ids: frozenset[int]
    primary_eos: int | None
    eos_ids: tuple[int, ...]  # primary first, then generation_config's, then config.json's
    bos_id: int
    pad_id: int
    model_type: str
    architectures: tuple[str, ...]
    sampling_defaults: dict[str, Any]

    def model(self, backend: str, context_length: int) -> Model:
        pool = [i for i in range(self.vocab_size) if i not in self.special_ids] or [0]
        return Model(
            backend=backend,
            vocab_size=self.vocab_size,
            primary_eos=self.primary_eos,
            eos_ids=frozenset(self.eos_ids),
            random_pool=tuple(pool),
            context_length=context_length,
        )

    def default_sampling_params_json(self) -> str:
        return (
            json.dumps(self.sampling_defaults, separators=(",", ":"))
            if self.sampling_defaults
            else ""
        )


def load_model_files(path: str) -> ModelFiles:
    root = Path(path)
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    cfg = _json(root / "tokenizer_config.json")
    gen = _json(root / "generation_config.json")
    model_cfg = _json(root / "config.json")
    special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)

    def tid(name: str) -> int | None:
        text = _token_text(cfg.get(name))
        return None if text is None else tok.token_to_id(text)

    primary = tid("eos_token")
    eos: list[int] = []
    for i in (
        ([primary] if primary is not None else [])
        + _ids(gen.get("eos_token_id"))
        + _ids(model_cfg.get("eos_token_id"))
    ):
        if i not in eos:
            eos.append(i)
    if primary is None and eos:
        primary = eos[0]
    vocab = model_cfg.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        vocab = tok.get_vocab_size(with_added_tokens=True)
    bos = tid("bos_token")
    pad = tid("pad_token")
    archs = model_cfg.get("architectures")
    return ModelFiles(
        path=root,
        tokenizer=tok,
        vocab_size=vocab,
        special_ids=special,
        primary_eos=primary,
        eos_ids=tuple(eos),
        bos_id=-1 if bos is None else bos,
        pad_id=-1 if pad is None else pad,
        model_type=str(model_cfg.get("model_type") or ""),
        architectures=tuple(a for a in archs if isinstance(a, str))
        if isinstance(archs, list)
        else (),
        sampling_defaults={k: gen[k] for k in SAMPLING_DEFAULT_KEYS if gen.get(k) is not None},
    )
