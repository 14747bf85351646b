"""A model's tokenizer as the gateway uses it in gRPC mode: `tokenizer.json` (the
`tokenizers` package, Rust) plus what the model directory says around it.

Everything is read from a local directory (never a hub download): `tokenizer.json`,
and optionally `tokenizer_config.json` (BOS/EOS, chat template, model_max_length),
`special_tokens_map.json`, `generation_config.json` (EOS ids, sampling defaults),
`config.json` (EOS ids, context length), `chat_template.jinja` / `chat_template.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as _RustTokenizer

from smg.chat.template import TemplateError, load_template_file, select_template

if TYPE_CHECKING:
    from smg.tokenizer.cache import TokenizerCacheConfig

log = logging.getLogger("smg.tokenizer")


class TokenizerLoadError(ValueError):
    """The directory (or bundle) does not hold a usable tokenizer."""


# transformers' `special_tokens_map` keys: the template sees each as a variable.
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# The generation_config.json fields vLLM takes as request defaults (get_diff_sampling_param).
_GENERATION_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)
# vLLM's _get_and_verify_max_len reads these config.json keys and takes the smallest.
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# transformers stores int(1e30) as model_max_length when the model did not say.
_SANE_MODEL_MAX_LENGTH = 10_000_000


def _read_json(path: Path) -> dict[str, Any]:
    """The file's JSON object, {} when absent; a broken file is an error, not silence."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def named_templates(value: Any) -> dict[str, str]:
    """Every template tokenizer_config names ({"default": ...} for a plain string)."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            t["name"]: t["template"]
            for t in value
            if isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
        }
    return {}


def _template_file(path: Path) -> str:
    """A .jinja / .json template file (A's load_template_file), as a load error."""
    try:
        return load_template_file(str(path))
    except TemplateError as exc:
        raise TokenizerLoadError(str(exc)) from exc


class Tokenizer:
    """The Rust `tokenizers` tokenizer with the model's special tokens, EOS ids, chat
    template, generation defaults and context length (see `load_tokenizer`)."""

    def __init__(
        self,
        inner: _RustTokenizer,
        *,
        source: str,
        tokenizer_config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        chat_templates: dict[str, str] | None = None,
    ) -> None:
        tc = tokenizer_config or {}
        stm = special_tokens_map or {}
        gc = generation_config or {}
        mc = model_config or {}
        self._inner = inner
        self.source = source
        self.vocab_size: int = inner.get_vocab_size(with_added_tokens=True)
        self.added_tokens: dict[int, str] = {
            i: t.content for i, t in inner.get_added_tokens_decoder().items()
        }
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in inner.get_added_tokens_decoder().items() if t.special
        )
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            text = _token_text(tc.get(key))
            if text is None:
                text = _token_text(stm.get(key))
            if text is not None:
                self.special_tokens[key] = text
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")

        eos: list[int] = []
        if self.eos_token is not None:
            eos_id = inner.token_to_id(self.eos_token)
            if eos_id is not None:
                eos.append(eos_id)
        eos += _int_list(gc.get("eos_token_id"))
        eos += _int_list(mc.get("eos_token_id"))
        text_config = mc.get("text_config")
        if isinstance(text_config, dict):
            eos += _int_list(text_config.get("eos_token_id"))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

        # Every value the file sets (transformers 5's GenerationConfig has no defaults
        # of its own, so vLLM's "diff" is every field present).
        self.generation_defaults: dict[str, Any] = {
            k: gc[k]
            for k in _GENERATION_KEYS
            if isinstance(gc.get(k), int | float) and not isinstance(gc.get(k), bool)
        }
        self.context_length: int | None = _context_length(mc, tc)
        self.chat_template: str | None = chat_template
        # Every named template ("default", "tool_use", ...) for callers that pick by tools.
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self._encode_cached: Any = None  # set by smg.tokenizer.cache.attach_cache
        self._fast: Any = None  # set by enable_fast_path

    def enable_fast_path(self, *, native: bool = True) -> bool:
        """Use smg.tokenizer.fastpath for chat prompts where it reproduces this tokenizer
        exactly (Llama 3 and its kin); ~0.4 s once per process, so the gateway calls it
        on its loader thread, and with `native` its C merge table and C split and
        lookup too (~1.3-1.8 s: the model's state is read whole, holding the GIL for
        ~0.4 s at a time, which belongs before readiness rather than beside served
        requests). True when the path applies."""
        from smg.tokenizer.fastpath import FastEncoder

        self._fast = FastEncoder.build(self._inner)
        if self._fast is not None:
            log.info(
                "tokenizer %s: fast encode on (%d characters left to the library)",
                self.source,
                len(self._fast.unsafe),
            )
            if native:
                self._fast.build_native()
        return self._fast is not None

    @property
    def inner(self) -> _RustTokenizer:
        return self._inner

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Chat prompts: add_special_tokens False (the template
        wrote BOS); completions: True (the tokenizer's post-processor decides)."""
        try:
            if self._encode_cached is not None:
                return self._encode_cached(text, add_special_tokens)
            if self._fast is not None and not add_special_tokens:
                ids = self._fast.encode(text)
                if ids is not None:
                    return ids
            # encode_batch_fast releases the GIL (encode does not, tokenizers 0.23): a long
            # prompt tokenized on smg.grpc.offload's pool then leaves the event loop free.
            # The same ids as encode_batch without the offsets nobody reads: ~20% less CPU
            # for a 1,024-token prompt (2.36 -> 1.90 ms), ~40% for 32K tokens.
            batch = self._inner.encode_batch_fast([text], add_special_tokens=add_special_tokens)
            return batch[0].ids
        except TypeError as exc:
            # The Rust side refuses a str with lone surrogates ("\ud800" in JSON).
            if isinstance(text, str):
                raise ValueError("text is not valid Unicode (a lone surrogate)") from exc
            raise

    def encode_uncached(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if self._fast is not None and not add_special_tokens:
            ids = self._fast.encode(text)
            if ids is not None:
                return ids
        return self._inner.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Ids the vocabulary does not have decode to nothing (as in `tokenizers`); an
        id outside 0..2**32-1 is a ValueError (a client's /v1/detokenize)."""
        try:
            return self._inner.decode(
                ids if isinstance(ids, list) else list(ids),
                skip_special_tokens=skip_special_tokens,
            )
        except OverflowError as exc:
            raise ValueError(f"token id out of range: {exc}") from exc

    def id_to_token(self, id: int) -> str | None:
        return self._inner.id_to_token(id)

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)


def _context_length(mc: dict[str, Any], tc: dict[str, Any]) -> int | None:
    found: list[int] = []
    for cfg in (mc, mc.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in _CONTEXT_KEYS:
            v = cfg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append(v)
        if found:
            break
    if found:
        return min(found)
    mml = tc.get("model_max_length")
    if isinstance(mml, int | float) and 0 < mml < _SANE_MODEL_MAX_LENGTH:
        return int(mml)
    return None


def load_tokenizer(
    path: str,
    *,
    chat_template_path: str | None = None,
    cache: TokenizerCacheConfig | None = None,
) -> Tokenizer:
    """Load the tokenizer of a local model directory (or a tokenizer.json file, whose
    directory then supplies the config files). Raises TokenizerLoadError.

    Chat template, first found: `chat_template_path` (--chat-template), the directory's
    chat_template.jinja, its chat_template.json, tokenizer_config.json's chat_template
    (a string, or the named list's "default"). A standalone file wins over the config
    entry as in transformers and the Rust SMG 1.13."""
    p = Path(path)
    if p.is_dir():
        directory, tok_file = p, p / "tokenizer.json"
    elif p.is_file():
        directory, tok_file = p.parent, p
    else:
        raise TokenizerLoadError(f"tokenizer path {path!r} does not exist")
    if not tok_file.is_file():
        raise TokenizerLoadError(
            f"no tokenizer.json in {str(directory)!r} (only Hugging Face tokenizer.json is supported)"
        )
    try:
        inner = _RustTokenizer.from_file(str(tok_file))
    except Exception as exc:  # the Rust loader raises a bare Exception
        raise TokenizerLoadError(f"cannot load {tok_file}: {exc}") from exc

    tc = _read_json(directory / "tokenizer_config.json")
    templates = named_templates(tc.get("chat_template"))
    template: str | None = None
    if chat_template_path:
        template = _template_file(Path(chat_template_path))
    elif (directory / "chat_template.jinja").is_file():
        template = _template_file(directory / "chat_template.jinja")
    elif (directory / "chat_template.json").is_file():
        template = _template_file(directory / "chat_template.json")
    else:
        try:
            template = select_template(tc, tools=False)
        except TemplateError as exc:
            # A named list without "default": no template unless a request picks one
            # by name (chat_templates keeps them all), as transformers fails at render.
            log.warning("%s: %s", directory / "tokenizer_config.json", exc)
            template = None
    if template is not None:
        templates["default"] = template

    tok = Tokenizer(
        inner,
        source=str(p),
        tokenizer_config=tc,
        special_tokens_map=_read_json(directory / "special_tokens_map.json"),
        generation_config=_read_json(directory / "generation_config.json"),
        model_config=_read_json(directory / "config.json"),
        chat_template=template,
        chat_templates=templates,
    )
    if cache is not None:
        from smg.tokenizer.cache import attach_cache

        attach_cache(tok, cache)
    return tok
