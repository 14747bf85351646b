"""Turn an inference request body into a generation plan (pure: no sockets, no clocks).

Token accounting is deliberately simple and documented: a prompt's token count is its
number of whitespace-separated words (chat: summed over every message's text content;
token-id prompts: the list length). Output length is exactly
min(max_tokens, output_len) unless `eos_prob` > 0 and the request did not set
`ignore_eos`, in which case each token after the first ends the output with that
probability. finish_reason is "length" when the request's own limit was reached and
"stop" otherwise (the mock "model" chose to stop, as an engine reports an EOS).
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from typing import Any

import orjson

from smg.mock_worker.options import MAX_OUTPUT_LEN


class ApiError(Exception):
    """A request error answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


@dataclasses.dataclass(slots=True)
class Timing:
    """Per-request delays and default length (runtime config, maybe overridden by headers)."""

    ttft_s: float
    itl_s: float
    output_len: int
    eos_prob: float


@dataclasses.dataclass(slots=True)
class Plan:
    kind: str  # "chat" | "completion" | "generate"
    stream: bool
    include_usage: bool
    model: str | None  # as the request named it
    prompt_tokens: list[int]  # one entry per prompt
    batch: bool  # the request held a list of prompts
    n_tokens: int  # output tokens per prompt
    finish_reason: str  # "length" | "stop"
    max_tokens: int | None
    rid: str | None = None
    # Tokens of each prompt served from the simulated prefix cache; None when the worker
    # has no cache, so answers carry no prompt_tokens_details.
    cached: list[int] | None = None
    # vLLM (--enable-prompt-tokens-details) reports cached_tokens 0; SGLang's usage
    # processor leaves prompt_tokens_details out when nothing was cached.
    report_zero_cached: bool = True
    # /generate with return_logprob: each prompt's token ids (text prompts: one id per
    # word, see word_id), so meta_info carries input/output_token_logprobs; else None.
    logprob_ids: list[list[int]] | None = None
    # False in a PD decode engine: the prefill computed the prompt's logprobs, the decode
    # reports an empty input_token_logprobs list (a PD router merges the prefill's in).
    input_logprobs: bool = True

    @property
    def total_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens)

    @property
    def cached_tokens(self) -> int | None:
        """What usage.prompt_tokens_details.cached_tokens says; None: no such field."""
        if self.cached is None:
            return None
        total = sum(self.cached)
        return total if total or self.report_zero_cached else None

    @property
    def total_completion_tokens(self) -> int:
        return self.n_tokens * len(self.prompt_tokens)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object")
    return obj


def count_words(text: str) -> int:
    return len(text.split())


def _content_words(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_words(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += count_words(text)
            elif isinstance(part, str):
                total += count_words(part)
        return total
    raise ApiError(400, "message content must be a string, a list of parts or null")


def chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    total = 0
    for m in messages:
        if not isinstance(m, dict):
            raise ApiError(400, "each message must be an object")
        total += _content_words(m.get("content"))
    return total


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v)


def _prompt_list(value: Any, field: str) -> tuple[list[int], bool]:
    """Token counts of a string / list of strings / token ids / list of token-id lists."""
    if isinstance(value, str):
        return [count_words(value)], False
    if isinstance(value, list) and value:
        if _token_ids(value):
            return [len(value)], False
        if all(isinstance(p, str) for p in value):
            return [count_words(p) for p in value], True
        if all(_token_ids(p) for p in value):
            return [len(p) for p in value], True
    raise ApiError(
        400,
        f"'{field}' must be a string, a non-empty list of strings, a list of token ids "
        "or a list of token-id lists",
    )


def read_limit(obj: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` that is set (not null), validated as a non-negative int."""
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 0:
            raise ApiError(400, f"'{key}' must be a non-negative integer")
        return value
    return None


def _read_bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be a boolean")
    return value


def decide_length(
    max_tokens: int | None, timing: Timing, ignore_eos: bool, rng: random.Random
) -> tuple[int, str]:
    """Output tokens per prompt and the finish reason (see the module docstring)."""
    n = timing.output_len if max_tokens is None else min(max_tokens, timing.output_len)
    if timing.eos_prob > 0.0 and not ignore_eos:
        for i in range(1, n):
            if rng.random() < timing.eos_prob:
                return i, "stop"
    if max_tokens is not None and n == max_tokens:
        return n, "length"
    return n, "stop"


def _include_usage(obj: dict[str, Any]) -> bool:
    opts = obj.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object")
    return _read_bool(opts, "include_usage")


def _model(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string")
    return model


def plan_chat(obj: dict[str, Any], timing: Timing, rng: random.Random) -> Plan:
    prompt = chat_prompt_tokens(obj.get("messages"))
    limit = read_limit(obj, "max_completion_tokens", "max_tokens")
    n, finish = decide_length(limit, timing, _read_bool(obj, "ignore_eos"), rng)
    stream = _read_bool(obj, "stream")
    return Plan(
        kind="chat",
        stream=stream,
        include_usage=stream and _include_usage(obj),
        model=_model(obj),
        prompt_tokens=[prompt],
        batch=False,
        n_tokens=n,
        finish_reason=finish,
        max_tokens=limit,
    )


def plan_completion(obj: dict[str, Any], timing: Timing, rng: random.Random) -> Plan:
    if "prompt" not in obj:
        raise ApiError(400, "'prompt' is required")
    prompts, batch = _prompt_list(obj["prompt"], "prompt")
    limit = read_limit(obj, "max_tokens")
    n, finish = decide_length(limit, timing, _read_bool(obj, "ignore_eos"), rng)
    stream = _read_bool(obj, "stream")
    return Plan(
        kind="completion",
        stream=stream,
        include_usage=stream and _include_usage(obj),
        model=_model(obj),
        prompt_tokens=prompts,
        batch=batch,
        n_tokens=n,
        finish_reason=finish,
        max_tokens=limit,
    )


def plan_generate(obj: dict[str, Any], timing: Timing, rng: random.Random) -> Plan:
    """SGLang native /generate: `text` or `input_ids`, `sampling_params`, `stream`."""
    if obj.get("text") is not None:
        prompts, batch = _prompt_list(obj["text"], "text")
    elif obj.get("input_ids") is not None:
        prompts, batch = _prompt_list(obj["input_ids"], "input_ids")
    else:
        raise ApiError(400, "Either text or input_ids should be provided.")
    params = obj.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'sampling_params' must be an object")
    limit = read_limit(params, "max_new_tokens")
    n, finish = decide_length(limit, timing, _read_bool(params, "ignore_eos"), rng)
    stream = _read_bool(obj, "stream")
    if stream and batch:
        raise ApiError(400, "the mock does not stream batched /generate requests")
    rid = obj.get("rid")
    logprob_ids = None
    if _read_bool(obj, "return_logprob"):
        logprob_ids = _prompt_ids(obj["text"] if obj.get("text") is not None else obj["input_ids"])
    return Plan(
        kind="generate",
        stream=stream,
        include_usage=False,
        model=None,
        prompt_tokens=prompts,
        batch=batch,
        n_tokens=n,
        finish_reason=finish,
        max_tokens=limit,
        rid=rid if isinstance(rid, str) else None,
        logprob_ids=logprob_ids,
    )


def word_id(word: str) -> int:
    """The mock tokenizer's id of a prompt word (stable across processes)."""
    return zlib.crc32(word.encode()) % 32000


def _prompt_ids(value: Any) -> list[list[int]]:
    """Token ids of each prompt of an accepted `text` / `input_ids` value."""
    if isinstance(value, str):
        return [[word_id(w) for w in value.split()]]
    if _token_ids(value):
        return [list(value)]
    return [[word_id(w) for w in p.split()] if isinstance(p, str) else list(p) for p in value]


PLANNERS = {"chat": plan_chat, "completion": plan_completion, "generate": plan_generate}


def _header_number(raw: bytes, name: str, integer: bool) -> float:
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ApiError(400, f"header {name} must be a number") from None
    if not (0 <= value <= (MAX_OUTPUT_LEN if integer else 3_600_000)):
        raise ApiError(400, f"header {name} is out of range")
    return value


def apply_header_overrides(
    timing: Timing, ttft: bytes | None, itl: bytes | None, output_len: bytes | None
) -> None:
    """x-mock-ttft-ms / x-mock-itl-ms / x-mock-output-len override the worker's config."""
    if ttft is not None:
        timing.ttft_s = _header_number(ttft, "x-mock-ttft-ms", False) / 1000.0
    if itl is not None:
        timing.itl_s = _header_number(itl, "x-mock-itl-ms", False) / 1000.0
    if output_len is not None:
        timing.output_len = int(_header_number(output_len, "x-mock-output-len", True))


def parse_status_override(raw: bytes) -> int:
    """x-mock-status: answer this error status (OpenAI error body) instead of generating."""
    try:
        status = int(raw)
    except ValueError:
        raise ApiError(400, "header x-mock-status must be an integer") from None
    if not 400 <= status <= 599:
        raise ApiError(400, "header x-mock-status must be in [400, 599]")
    return status


# --- prompt tokens for the prefix cache ---------------------------------------------------


def _content_tokens(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.extend(content.split())
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.extend(text.split())
            elif isinstance(part, str):
                out.extend(part.split())


def _prompt_tokens_of(value: Any) -> list[list[str]]:
    if isinstance(value, str):
        return [value.split()]
    if _token_ids(value):
        return [[str(t) for t in value]]
    return [p.split() if isinstance(p, str) else [str(t) for t in p] for p in value]


def prompt_token_lists(kind: str, obj: dict[str, Any]) -> list[list[str]]:
    """The tokens of each prompt, in the order `Plan.prompt_tokens` counts them.

    Only called for a request its planner accepted, so the shapes are already valid.
    Chat: every message's text, in order (roles and the chat template are not tokens
    here, matching how the mock counts prompt tokens).
    """
    if kind == "chat":
        out: list[str] = []
        for m in obj["messages"]:
            _content_tokens(m.get("content"), out)
        return [out]
    if kind == "completion":
        return _prompt_tokens_of(obj["prompt"])
    value = obj["text"] if obj.get("text") is not None else obj["input_ids"]
    return _prompt_tokens_of(value)
