"""Prepare: an OpenAI / SGLang request body -> `Prepared` (pure; no I/O).

Validation follows vLLM's OpenAI server (the engine people compare against) for what is
accepted and the wording, and the Rust SMG 1.13 for the error body's `type`
("invalid_request_error", not vLLM's "BadRequestError") and where its gRPC router is
stricter (at most 4 stop strings, no empty stop string). Every failure is a
`RequestError` the data plane turns into the OpenAI error shape.

Sampling defaults: a field the request leaves out takes the model's default
(generation_config.json, as vLLM's `--generation-config auto` reads it, over the engine's
advertised `default_sampling_params_json`), else the neutral value; `max_new_tokens`
caps max_tokens as vLLM's `get_max_tokens` does (the minimum of all bounds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from smg.grpc.types import SamplingParams

_MAX_STOPS = 4  # the Rust SMG's `validate_stop` and vLLM's VLLM_MAX_STOP_STRINGS default
_MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default --max-logprobs
_INT_MAX = 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_MAX_N = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default
_SAMPLING_EPS = 1e-5  # vLLM: a temperature below this is greedy
# /v1/completions with a list of prompts: one engine request per prompt, all at once.
# Neither vLLM nor the Rust SMG bounds the list; smg does, so that one request cannot
# open an unbounded number of engine streams.
MAX_BATCH_PROMPTS = 256
# Error codes: the Rust SMG 1.13's own (its validator's and cross-field check's names,
# read off its answers; the body's `type` is "invalid_request_error" as there, where
# vLLM writes type "BadRequestError" and code 400). Messages are vLLM's.
INVALID = "invalid_value"
INVALID_TYPE = "invalid_type"
ABOVE_DECIMAL, BELOW_DECIMAL = "decimal_above_max_value", "decimal_below_min_value"
ABOVE_INTEGER, BELOW_INTEGER = "integer_above_max_value", "integer_below_min_value"
CONTEXT_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a prompt that does not fit


class RequestError(Exception):
    """A request the gateway refuses before dispatch: HTTP status, OpenAI error code,
    message, and the offending parameter (`param`, as vLLM and OpenAI name it)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def body(self) -> bytes:
        """The OpenAI error body with `param` (httpwire.error_body writes param null)."""
        kind = "invalid_request_error" if 400 <= self.status < 500 else "api_error"
        return orjson.dumps(
            {
                "error": {
                    "type": kind,
                    "code": self.code,
                    "message": self.message,
                    "param": self.param,
                }
            }
        )


def _bad(message: str, param: str | None = None, code: str = INVALID) -> RequestError:
    """A 400 (the only status prepare answers with); `code` as the Rust SMG names it."""
    return RequestError(400, code, message, param)


@dataclass
class Defaults:
    """The model's sampling defaults; None: the field has none (neutral value applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config.json max_new_tokens: a default
    # vLLM 0.32's get_diff_sampling_param takes these two as well
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @classmethod
    def from_sources(cls, generation_defaults: dict[str, Any] | None, engine_json: str) -> Defaults:
        """generation_config.json (the gateway's tokenizer directory) over the engine's
        `default_sampling_params_json`; malformed values are ignored (a model's file
        never fails a request)."""
        merged: dict[str, Any] = {}
        if engine_json:
            try:
                parsed = orjson.loads(engine_json)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                merged.update(parsed)
        for key, value in (generation_defaults or {}).items():
            if value is not None:
                merged[key] = value
        if "max_new_tokens" in merged and "max_tokens" not in merged:
            merged["max_tokens"] = merged["max_new_tokens"]
        out = cls()
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = merged.get(name)
            if _is_number(value) and math.isfinite(value):
                setattr(out, name, float(value))
        top_k = merged.get("top_k")
        if _is_int(top_k):
            out.top_k = top_k if top_k > 0 else -1
        max_tokens = merged.get("max_tokens")
        if _is_int(max_tokens) and max_tokens > 0:
            out.max_tokens = max_tokens
        return out


@dataclass
class Prepared:
    kind: str  # "chat" | "completion" | "generate"
    model: str | None
    messages: list[dict] | None = None  # raw OpenAI messages (the template stage normalizes)
    tools: list[dict] | None = None
    documents: list[dict] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    prompt: str | list[int] | None = None  # completions / generate: text or token ids
    # /v1/completions with several prompts: each one (prompt is the first); None for one
    prompts: list[str | list[int]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    request_id_hint: str | None = None  # SGLang `rid`
    # True when the request set max_tokens itself (apply_limits: an explicit value that
    # does not fit is a 400; the default is the context left).
    max_tokens_explicit: bool = False
    # tool_choice "required" / a named function: the output is a JSON constraint and the
    # answer carries tool calls (respond.py); None otherwise.
    tool_choice: str | None = None  # "required" | the function's name
    # Output parsing (smg.parsers, chat only): parse_tools when `tools` are given and
    # tool_choice is auto/absent (the chosen tool parser turns the model's syntax into
    # tool_calls); separate_reasoning: the reasoning parser, when one is chosen, splits
    # reasoning_content off; reasoning_effort feeds the thinking toggle (1.13's rules).
    parse_tools: bool = False
    parallel_tool_calls: bool = True
    separate_reasoning: bool = True
    reasoning_effort: str | None = None
    # max_tokens when the request has none: the model's max_new_tokens (chat), the
    # legacy API's 16 (completions), SGLang's 128 (/generate)
    max_tokens_default: int | None = None
    # SGLang /generate: return_logprob's extras and the text's offset for logprobs.
    return_text_in_logprobs: bool = False


# --------------------------------------------------------------------------- helpers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


def _field(body: dict, name: str, ok: Callable[[object], bool], what: str) -> Any:
    """body[name] (None when absent or null); 400 "'name' must be <what>" when `ok`
    refuses it."""
    value = body.get(name)
    if value is not None and not ok(value):
        raise _bad(f"'{name}' must be {what}, got {_show(value)}.", name, INVALID_TYPE)
    return value


def _number(body: dict, name: str) -> float | None:
    value = _field(body, name, _is_finite, "a number")
    return None if value is None else float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pydantic's lax mode (vLLM) takes 16.0 for 16
    if not _is_int(value):
        raise _bad(f"'{name}' must be an integer, got {_show(value)}.", name, INVALID_TYPE)
    if abs(value) > _INT_MAX:
        raise _bad(
            f"'{name}' is out of range: {value}.",
            name,
            ABOVE_INTEGER if value > 0 else BELOW_INTEGER,
        )
    return value


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = _field(body, name, _is_bool, "a boolean")
    return default if value is None else value


def _string(body: dict, name: str) -> str | None:
    return _field(body, name, _is_str, "a string")


def _show(value: object) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- sampling


def _sampling(
    body: dict, defaults: Defaults, *, max_tokens_names: tuple[str, ...]
) -> tuple[SamplingParams, bool]:
    """The sampling fields shared by chat and completions: vLLM's names, checks and
    wording (vllm/sampling_params.py `_verify_args`, 0.32)."""
    s = SamplingParams()
    temperature = _number(body, "temperature")
    if temperature is not None:
        if temperature < 0.0:
            raise _bad(
                f"temperature must be non-negative, got {temperature}.",
                "temperature",
                BELOW_DECIMAL,
            )
        if temperature > 2.0:
            raise _bad(
                f"temperature must be in [0, 2], got {temperature}.", "temperature", ABOVE_DECIMAL
            )
    s.temperature = _first(temperature, defaults.temperature, 1.0)
    top_p = _number(body, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise _bad(
            f"top_p must be in (0, 1], got {top_p}.",
            "top_p",
            BELOW_DECIMAL if top_p <= 0 else ABOVE_DECIMAL,
        )
    s.top_p = _first(top_p, defaults.top_p, 1.0)
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise _bad(f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k")
    if top_k is not None:
        s.top_k = -1 if top_k in (0, -1) else top_k  # vLLM: 0 and -1 are both off
    else:
        s.top_k = defaults.top_k if defaults.top_k is not None else -1
    min_p = _number(body, "min_p")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise _bad(
            f"min_p must be in [0, 1], got {min_p}.",
            "min_p",
            BELOW_DECIMAL if min_p < 0 else ABOVE_DECIMAL,
        )
    s.min_p = _first(min_p, defaults.min_p, 0.0)
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise _bad(
                f"{name} must be in [-2, 2], got {value}.",
                name,
                BELOW_DECIMAL if value < 0 else ABOVE_DECIMAL,
            )
        setattr(s, name, _first(value, getattr(defaults, name, None), 0.0))
    repetition = _number(body, "repetition_penalty")
    if repetition is not None and repetition <= 0.0:
        raise _bad(
            f"repetition_penalty must be greater than zero, got {repetition}.",
            "repetition_penalty",
            BELOW_DECIMAL,
        )
    s.repetition_penalty = _first(repetition, defaults.repetition_penalty, 1.0)

    # max_completion_tokens wins over max_tokens (vLLM: `max_completion_tokens if not
    # None else max_tokens`); the message names max_tokens as vLLM's SamplingParams does
    explicit: int | None = None
    for name in max_tokens_names:
        value = _integer(body, name)
        if value is not None and value < 1:
            raise _bad(f"max_tokens must be at least 1, got {value}.", name, BELOW_INTEGER)
        if explicit is None and value is not None:
            explicit = value
    s.max_tokens = explicit
    min_tokens = _integer(body, "min_tokens")
    if min_tokens is not None:
        if min_tokens < 0:
            raise _bad(
                f"min_tokens must be greater than or equal to 0, got {min_tokens}.",
                "min_tokens",
                BELOW_INTEGER,
            )
        if explicit is not None and min_tokens > explicit:
            raise _bad(
                f"min_tokens must be less than or equal to max_tokens={explicit}, "
                f"got {min_tokens}.",
                "min_tokens",
                "min_tokens_exceeds_max",
            )
        s.min_tokens = min_tokens

    n = _integer(body, "n")
    if n is not None:
        if n < 1:
            raise _bad(f"n must be at least 1, got {n}.", "n", BELOW_INTEGER)
        if n > _MAX_N:
            raise _bad(f"n must be at most {_MAX_N}, got {n}.", "n", ABOVE_INTEGER)
        s.n = n
    if s.n > 1 and s.temperature < _SAMPLING_EPS:
        # vLLM's `_verify_greedy_sampling`: n identical greedy answers are refused
        raise _bad(f"n must be 1 when using greedy sampling, got {s.n}.", "n")
    seed = _integer(body, "seed")
    if seed is not None and seed != -1:  # vLLM: -1 is no seed
        if not _INT32_MIN <= seed <= _INT32_MAX:
            # the engines' gRPC field is an int32 (vLLM's HTTP server takes an int64)
            raise _bad(
                f"seed must be in [{_INT32_MIN}, {_INT32_MAX}], got {seed}.",
                "seed",
                ABOVE_INTEGER if seed > 0 else BELOW_INTEGER,
            )
        s.seed = seed

    s.stop = _stops(body.get("stop"))
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise _bad(
                f"stop_token_ids must contain only non-negative integers, got {_show(stop_ids)}.",
                "stop_token_ids",
            )
        s.stop_token_ids = list(stop_ids)
    s.ignore_eos = _boolean(body, "ignore_eos", False)
    s.include_stop_str_in_output = _boolean(body, "include_stop_str_in_output", False)
    s.skip_special_tokens = _boolean(body, "skip_special_tokens", True)
    s.spaces_between_special_tokens = _boolean(body, "spaces_between_special_tokens", True)
    s.logit_bias = _logit_bias(body.get("logit_bias"))
    return s, explicit is not None


def _first(*values: float | None) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _stops(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings.", "stop", INVALID_TYPE)
    if len(stops) > _MAX_STOPS:
        raise _bad(
            f"stop may hold at most {_MAX_STOPS} sequences, got {len(stops)}.",
            "stop",
            "array_above_max_length",
        )
    if any(s == "" for s in stops):
        raise _bad("stop cannot contain an empty string.", "stop")
    return list(stops)


def _logit_bias(value: object) -> dict[int, float]:
    """vLLM's conversion: keys to int token ids, values clamped to [-100, 100] (OpenAI
    refuses values outside; vLLM clamps). Out-of-vocabulary ids are the engine's to
    refuse (the gateway does not know the vocabulary here)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("logit_bias must be an object of token id to bias.", "logit_bias", INVALID_TYPE)
    out: dict[int, float] = {}
    invalid = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            invalid.append(key)
            continue
        if not _is_number(bias) or not math.isfinite(bias):
            raise _bad(
                f"logit_bias values must be numbers, got {_show(bias)}.", "logit_bias", INVALID_TYPE
            )
        out[token] = min(100.0, max(-100.0, float(bias)))
    if invalid:
        raise _bad(
            "logit_bias contains key(s) that cannot be converted to integer token IDs: "
            f"{invalid!r}",
            "logit_bias",
            "logit_bias_invalid_key",
        )
    negative = [t for t in out if t < 0]
    if negative:
        raise _bad(
            f"token_id(s) {negative} in logit_bias contain out-of-vocab token ids.",
            "logit_bias",
            "logit_bias_invalid_key",
        )
    return out


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        # vLLM's wording
        raise _bad(
            "Stream options can only be defined when `stream=True`.",
            "stream_options",
            "stream_options_requires_stream",
        )
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object.", "stream_options", INVALID_TYPE)
    include = _boolean(options, "include_usage", False)
    continuous = _boolean(options, "continuous_usage_stats", False)
    return include, continuous


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model", INVALID_TYPE)
    return model


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, INVALID_TYPE)
    return body


# --------------------------------------------------------------------------- constraints


def _constraint(body: dict) -> tuple[str, object] | None:
    """One structured-output constraint from every spelling vLLM and SGLang accept:
    response_format, SGLang's `regex` / `ebnf`, vLLM's `structured_outputs` and the older
    `guided_*` fields. More than one -> 400 (the Rust SMG's rule)."""
    found: list[tuple[str, str, object]] = []  # (param, kind, value)
    response_format = body.get("response_format")
    if response_format is not None:
        rf = _response_format(response_format)
        if rf is not None:
            found.append(("response_format", *rf))
    for name, kind in (
        ("regex", "regex"),
        ("ebnf", "ebnf"),
        ("guided_regex", "regex"),
        ("guided_grammar", "ebnf"),
    ):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise _bad(f"'{name}' must be a non-empty string.", param=name)
        found.append((name, kind, value))
    guided_json = body.get("guided_json")
    if guided_json is not None:
        found.append(("guided_json", "json_schema", _schema_text(guided_json, "guided_json")))
    guided_choice = body.get("guided_choice")
    if guided_choice is not None:
        found.append(("guided_choice", "choice", _choices(guided_choice, "guided_choice")))
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise _bad("structured_outputs must be an object.", param="structured_outputs")
        if sum(structured.get(k) is not None for k in ("json", "regex", "choice")) > 1:
            raise _bad(
                "You can only use one kind of constraints for structured outputs "
                "('json', 'regex' or 'choice').",
                "structured_outputs",
                "multiple_constraints",
            )
        for key, kind in (
            ("json", "json_schema"),
            ("regex", "regex"),
            ("grammar", "ebnf"),
            ("choice", "choice"),
            ("json_object", "json_object"),
        ):
            value = structured.get(key)
            if value is None or value is False:
                continue
            param = f"structured_outputs.{key}"
            if kind == "json_schema":
                found.append((param, kind, _schema_text(value, param)))
            elif kind == "choice":
                found.append((param, kind, _choices(value, param)))
            elif kind == "json_object":
                found.append((param, kind, '{"type":"object"}'))
            else:
                if not isinstance(value, str) or not value:
                    raise _bad(f"'{param}' must be a non-empty string.", param=param)
                found.append((param, kind, value))
    if len(found) > 1:
        kinds = {kind for _, kind, _ in found}
        json_format = any(p == "response_format" for p, _, _ in found)
        code = (
            "regex_conflicts_with_json"
            if json_format and "regex" in kinds
            else "ebnf_conflicts_with_json"
            if json_format and "ebnf" in kinds
            else "multiple_constraints"
        )
        raise _bad(
            "only one structured output constraint (response_format, regex, ebnf, "
            "structured_outputs, guided_*) can be active at a time, got "
            + ", ".join(p for p, _, _ in found)
            + ".",
            found[1][0],
            code,
        )
    return (found[0][1], found[0][2]) if found else None


def _response_format(value: object) -> tuple[str, object] | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format must be an object with a 'type'.", param="response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", '{"type":"object"}')
    if kind == "json_schema":
        spec = value.get("json_schema")
        if spec is None:
            raise _bad(
                "When response_format type is 'json_schema', the 'json_schema' field must "
                "be provided.",
                "response_format",
            )
        if not isinstance(spec, dict):
            raise _bad(
                "response_format.json_schema must be an object with 'name' and 'schema'.",
                param="response_format.json_schema",
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(
                "JSON schema name cannot be empty.",
                "response_format.json_schema.name",
                "json_schema_name_empty",
            )
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            # vLLM: a json_schema without a schema is any JSON object
            return ("json_object", '{"type":"object"}')
        return ("json_schema", _schema_text(schema, "response_format.json_schema.schema"))
    if kind == "structural_tag":
        return ("structural_tag", orjson.dumps(value).decode())
    raise _bad(
        f"response_format.type must be one of 'text', 'json_object', 'json_schema', got {_show(kind)}.",
        param="response_format.type",
    )


def _schema_text(schema: object, param: str) -> str:
    if isinstance(schema, str):
        try:
            parsed = orjson.loads(schema)
        except orjson.JSONDecodeError:
            raise _bad(f"'{param}' is not valid JSON.", param=param) from None
        schema = parsed
    if not isinstance(schema, (dict, bool)):
        raise _bad(f"'{param}' must be a JSON schema object.", param=param)
    return orjson.dumps(schema).decode()


def _choices(value: object, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise _bad(f"'{param}' must be a non-empty list of strings.", param=param)
    return list(value)


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools must be a list.", "tools")
    if not tools:
        raise _bad(
            "`tools` must not be an empty array. Either provide at least one tool or omit "
            "the field entirely.",
            "tools",
        )
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"tools[{i}] must be a function tool.", f"tools[{i}]")
        function = tool.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise _bad(f"tools[{i}].function.name is required.", f"tools[{i}].function")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(
                f"tools[{i}].function.parameters must be an object.",
                f"tools[{i}].function.parameters",
            )
    return tools


_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _tool_choice(body: dict, tools: list[dict] | None) -> str | None:
    """vLLM's `check_tool_usage`: "none" / "auto" / absent -> None (free output);
    "required" -> "required"; a named function -> its name."""
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return None
    if tools is None:
        raise _bad(
            "When using `tool_choice`, `tools` must be set.",
            "tool_choice",
            "tool_choice_requires_tools",
        )
    if choice == "auto":
        return None
    if choice == "required":
        return "required"
    if not isinstance(choice, dict):
        raise _bad(
            f"Invalid value for `tool_choice`: {_show(choice)}! Only named tools, "
            '"none", "auto" or "required" are supported.',
            "tool_choice",
        )
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _bad(
            f"Invalid value for `function`: `{_show(function)}` in `tool_choice`! {_USAGE}",
            "tool_choice.function",
        )
    if "name" not in function:
        raise _bad(
            f"Expected field `name` in `function` in `tool_choice`! {_USAGE}",
            "tool_choice.function.name",
        )
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise _bad(
            f"Invalid `name` in `function`: `{_show(name)}` in `tool_choice`! {_USAGE}",
            "tool_choice.function.name",
        )
    if not any(t["function"]["name"] == name for t in tools):
        raise _bad(
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            "tool_choice",
            "tool_choice_function_not_found",
        )
    return name


def tool_schema(tools: list[dict], choice: str, *, parallel_tool_calls: object = None) -> dict:
    """The JSON schema the output must follow for tool_choice "required" or a named
    function, as vLLM builds it (`get_json_schema_from_tools`): a named function's output
    is its parameters object (an empty object schema when it has none); "required" is a
    non-empty array of {"name", "parameters"} objects, one anyOf branch per tool, every
    tool's `$defs` hoisted to the top (conflicting definitions -> 400), at most one item
    when parallel_tool_calls is false."""
    if choice != "required":
        for tool in tools:
            if tool["function"]["name"] == choice:
                return tool["function"].get("parameters") or {"type": "object", "properties": {}}
        raise _bad(f"Tool '{choice}' has not been passed in `tools`.", "tool_choice")
    branches: list[dict] = []
    defs: dict[str, Any] = {}
    for tool in tools:
        function = tool["function"]
        params = function.get("parameters")
        if params:
            params = dict(params)  # the request's own dict stays as sent (templates see it)
            own = params.pop("$defs", None) or {}
            if not isinstance(own, dict):
                raise _bad(
                    f"`$defs` in the parameters of tool '{function['name']}' must be an "
                    f"object, got {type(own).__name__}.",
                    "tools",
                )
            for name, schema in own.items():
                if name in defs and defs[name] != schema:
                    raise _bad(
                        f"Tool definition '{name}' has multiple schemas, which is not supported.",
                        "tools",
                    )
                defs[name] = schema
        branches.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "parameters": params if params else {"type": "object", "properties": {}},
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": branches},
    }
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


# --------------------------------------------------------------------------- messages


# vLLM's text part types (renderers/chat_utils.py TEXT_PART_TYPES) and the key holding
# each one's text; a part without "type" is text. Every other type is media.
_TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


def _messages(body: dict) -> list[dict]:
    """Checked as vLLM parses them: any role string (vLLM takes custom roles, e.g.
    Llama's "ipython"; the template decides), content a string, null (assistant
    tool calls, tool) or a list of text parts; media parts are refused (text-only
    models). Text parts of the other spellings are rewritten to {"type": "text"} in a
    copy of their message, so the template stage sees one kind."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is a required property.", "messages", "missing_field")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list.", "messages", INVALID_TYPE)
    if not messages:
        raise _bad("messages cannot be empty.", "messages", "empty_array")
    out = messages
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object.", where, INVALID_TYPE)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(
                f"{where}.role must be a string such as 'system', 'developer', 'user', "
                f"'assistant' or 'tool', got {_show(role)}.",
                f"{where}.role",
                INVALID_TYPE if not isinstance(role, str) else INVALID,
            )
        content = message.get("content")
        if content is None:
            if role in ("assistant", "tool", "function"):
                continue  # an assistant turn may carry only tool_calls
            raise _bad(f"{where}.content is required.", f"{where}.content", "missing_field")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(
                f"{where}.content must be a string or a list of content parts.",
                f"{where}.content",
                INVALID_TYPE,
            )
        rewritten: list[dict] | None = None
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{pwhere} must be an object.", pwhere, INVALID_TYPE)
            kind = part.get("type", "text")
            key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
            if key is None:
                raise _bad(
                    f"{pwhere}: content of type {_show(kind)} is not supported: this gateway "
                    "serves text-only models over gRPC.",
                    pwhere,
                )
            text = part.get(key)
            if not isinstance(text, str):
                raise _bad(f"{pwhere}.{key} must be a string.", f"{pwhere}.{key}", INVALID_TYPE)
            if kind != "text" or "type" not in part:
                if rewritten is None:
                    rewritten = list(content)
                rewritten[j] = {"type": "text", "text": text}
        if rewritten is not None:
            if out is messages:
                out = list(messages)
            out[i] = {**message, "content": rewritten}
    return out


def _logprobs_chat(body: dict) -> tuple[bool, int]:
    """vLLM's `check_logprobs`: top_logprobs 0 needs nothing; -1 or > 0 needs logprobs;
    more than the engine's max_logprobs (20 by default) is refused."""
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs")
    if top is None:
        return logprobs, 0
    if top < 0 and top != -1:
        raise _bad("`top_logprobs` must be a positive value or -1.", "top_logprobs", BELOW_INTEGER)
    if top != 0 and not logprobs:
        raise _bad(
            "when using `top_logprobs`, `logprobs` must be set to true.",
            "top_logprobs",
            "top_logprobs_requires_logprobs",
        )
    _max_logprobs(top, "top_logprobs")
    return logprobs, top


def _max_logprobs(k: int, param: str) -> None:
    if k == -1 or k > _MAX_TOP_LOGPROBS:
        shown = "the whole vocabulary (-1)" if k == -1 else str(k)
        raise _bad(
            f"Requested sample logprobs of {shown}, which is greater than max allowed: "
            f"{_MAX_TOP_LOGPROBS}",
            param,
            ABOVE_INTEGER,
        )


# --------------------------------------------------------------------------- stages


def prepare_chat(body: dict, defaults: Defaults) -> Prepared:
    """A /v1/chat/completions body -> Prepared (raises RequestError)."""
    body = _object(body)
    model = _model(body)
    messages = _messages(body)
    sampling, explicit = _sampling(
        body, defaults, max_tokens_names=("max_completion_tokens", "max_tokens")
    )
    stream = _boolean(body, "stream", False)
    include_usage, continuous = _stream_options(body, stream)
    logprobs, top = _logprobs_chat(body)
    if logprobs:
        sampling.logprobs = top
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    constraint = _constraint(body)
    if choice is not None:
        if constraint is not None:
            raise _bad(
                "You can only either use constraints for structured outputs or tools, not both.",
                "tool_choice",
                "multiple_constraints",
            )
        assert tools is not None
        schema = tool_schema(tools, choice, parallel_tool_calls=body.get("parallel_tool_calls"))
        constraint = ("json_schema", orjson.dumps(schema).decode())
    sampling.constraint = constraint
    parse_tools = tools is not None and choice is None and body.get("tool_choice") != "none"
    if parse_tools:
        # The Rust SMG 1.13 (chat preparation) decodes with special tokens kept whenever
        # tool calls are parsed (no JSON-schema constraint): a parser's markers may be
        # special tokens (Llama's <|python_tag|>, DeepSeek's and Kimi's section tokens).
        sampling.skip_special_tokens = False
    parallel = _field(body, "parallel_tool_calls", _is_bool, "a boolean")
    separate_reasoning = _boolean(body, "separate_reasoning", True)
    _boolean(body, "stream_reasoning", True)  # accepted; 1.13 streams reasoning regardless
    reasoning_effort = _string(body, "reasoning_effort")
    documents = body.get("documents")
    if documents is not None and not (
        isinstance(documents, list) and all(isinstance(d, dict) for d in documents)
    ):
        raise _bad("documents must be a list of objects.", param="documents")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs must be an object.", param="chat_template_kwargs")
    add_generation_prompt = _boolean(body, "add_generation_prompt", True)
    continue_final = _boolean(body, "continue_final_message", False)
    if add_generation_prompt and continue_final:
        # vLLM's wording
        raise _bad(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    return Prepared(
        kind="chat",
        model=model,
        messages=messages,
        tools=tools,
        documents=documents,
        template_kwargs=dict(kwargs),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        logprobs=logprobs,
        top_logprobs=top,
        echo=_boolean(body, "echo", False),  # vLLM: the last message leads the answer
        request_id_hint=_string(body, "rid") or _string(body, "request_id"),
        max_tokens_explicit=explicit,
        max_tokens_default=defaults.max_tokens,
        tool_choice=choice,
        parse_tools=parse_tools,
        parallel_tool_calls=parallel is not False,
        separate_reasoning=separate_reasoning,
        reasoning_effort=reasoning_effort,
    )


def _prompt(value: object, param: str) -> str | list[int]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if value and all(_is_int(t) for t in value):
            if any(t < 0 for t in value):
                raise _bad(f"'{param}' holds a negative token id.", param=param)
            return list(value)
        if len(value) == 1 and isinstance(value[0], (str, list)):
            return _prompt(value[0], param)
        if not value:
            raise _bad("Prompt cannot be empty.", param=param)
        if all(isinstance(p, (str, list)) for p in value):
            raise _bad(
                "batched prompts are not supported: send one prompt per request.", param=param
            )
    raise _bad(
        f"'{param}' must be a string, a list of token ids, or a list of one of them.", param=param
    )


def prepare_completion(body: dict, defaults: Defaults) -> Prepared:
    """A /v1/completions body -> Prepared (one prompt: text or token ids)."""
    body = _object(body)
    model = _model(body)
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("'prompt' is a required property.", param="prompt")
    prompts = _batch(body["prompt"])
    prompt = _prompt(body["prompt"], "prompt") if prompts is None else prompts[0]
    if prompt == "" or prompt == []:
        raise _bad("Prompt cannot be empty.", param="prompt")
    if body.get("suffix") is not None:
        raise _bad("suffix is not supported.", param="suffix")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n", 1):
        raise _bad("best_of is not supported.", param="best_of")
    sampling, explicit = _sampling(body, defaults, max_tokens_names=("max_tokens",))
    stream = _boolean(body, "stream", False)
    include_usage, continuous = _stream_options(body, stream)
    logprobs = _integer(body, "logprobs")
    if logprobs is not None:
        if logprobs < 0 and logprobs != -1:
            raise _bad("`logprobs` must be a positive value or -1.", "logprobs", BELOW_INTEGER)
        _max_logprobs(logprobs, "logprobs")
        sampling.logprobs = logprobs
    sampling.constraint = _constraint(body)
    echo = _boolean(body, "echo", False)
    if echo and logprobs is not None:
        # vLLM answers with the prompt's logprobs too; the gRPC path does not ask the
        # engine for them, so it refuses rather than answer with a short list
        raise _bad("`echo` with `logprobs` is not supported (no prompt logprobs).", "echo")
    return Prepared(
        kind="completion",
        model=model,
        prompt=prompt,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
        echo=echo,
        request_id_hint=_string(body, "rid") or _string(body, "request_id"),
        max_tokens_explicit=explicit,
        max_tokens_default=16,  # the legacy API's default (OpenAI, vLLM)
        prompts=prompts,
    )


def _batch(value: object) -> list[str | list[int]] | None:
    """Several prompts (a list of at least two strings, or of two token-id lists, as
    vLLM's `list[str] | list[list[int]]`), each checked as one prompt; None for anything
    else (one prompt, or what `_prompt` refuses)."""
    if not isinstance(value, list) or len(value) < 2:
        return None
    if all(isinstance(p, str) for p in value):
        pass
    elif all(isinstance(p, list) for p in value):
        for p in value:
            if not p:
                raise _bad("Prompt cannot be empty.", param="prompt")
            if not all(_is_int(t) for t in p):
                raise _bad("'prompt' must be a list of token-id lists.", param="prompt")
            if any(t < 0 for t in p):
                raise _bad("'prompt' holds a negative token id.", param="prompt")
    elif all(isinstance(p, (str, list)) for p in value):
        raise _bad(
            "'prompt' must be a string, a list of token ids, a list of strings or a list "
            "of token-id lists (not a mix).",
            param="prompt",
        )
    else:
        return None
    if len(value) > MAX_BATCH_PROMPTS:
        raise _bad(
            f"at most {MAX_BATCH_PROMPTS} prompts per request, got {len(value)}.",
            param="prompt",
            code=ABOVE_INTEGER,
        )
    if any(p == "" for p in value):
        raise _bad("Prompt cannot be empty.", param="prompt")
    return [p if isinstance(p, str) else list(p) for p in value]


def batch_part(p: Prepared, prompt: str | list[int]) -> Prepared:
    """One prompt of a batched completion: the request with that prompt alone (its own
    sampling copy: apply_limits sets max_tokens per prompt)."""
    return replace(p, prompt=prompt, prompts=None, sampling=replace(p.sampling))


def prepare_generate(body: dict, defaults: Defaults) -> Prepared:
    """An SGLang /generate body: text | input_ids, sampling_params{...} (SGLang's names:
    max_new_tokens, stop, stop_token_ids, ...), stream, return_logprob, top_logprobs_num,
    rid. SGLang's own defaults: max_new_tokens 128 when unset."""
    body = _object(body)
    text = body.get("text")
    ids = body.get("input_ids")
    if text is not None and ids is not None:
        raise _bad("Either text or input_ids should be provided, not both.", param="text")
    if text is None and ids is None:
        raise _bad("Either text or input_ids should be provided.", param="text")
    prompt = _prompt(text if text is not None else ids, "text" if text is not None else "input_ids")
    if prompt == "" or prompt == []:
        raise _bad("The prompt cannot be empty.", param="text")
    params = body.get("sampling_params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("sampling_params must be an object.", param="sampling_params")
    params = dict(params)
    # SGLang's names for what chat and completions call min_tokens and seed
    for sglang, ours in (("min_new_tokens", "min_tokens"), ("sampling_seed", "seed")):
        if sglang in params and ours not in params:
            params[ours] = params.pop(sglang)
    sampling, explicit = _sampling(params, defaults, max_tokens_names=("max_new_tokens",))
    if "no_stop_trim" in params:
        sampling.include_stop_str_in_output = _boolean(params, "no_stop_trim", False)
    constraint_src = {k: params[k] for k in ("regex", "ebnf") if params.get(k) is not None}
    if params.get("json_schema") is not None:
        constraint_src["guided_json"] = params["json_schema"]
    tag = params.get("structural_tag")
    if tag is not None:
        if constraint_src:
            raise _bad(
                "only one structured output constraint (json_schema, regex, ebnf, "
                "structural_tag) can be active at a time.",
                "structural_tag",
                "multiple_constraints",
            )
        text = tag if isinstance(tag, str) else orjson.dumps(tag).decode()
        sampling.constraint = ("structural_tag", text)
    else:
        sampling.constraint = _constraint(constraint_src)
    stream = _boolean(body, "stream", False)
    return_logprob = _boolean(body, "return_logprob", False)
    top = _integer(body, "top_logprobs_num") or 0
    if not 0 <= top <= _MAX_TOP_LOGPROBS:
        raise _bad(
            f"top_logprobs_num must be in [0, {_MAX_TOP_LOGPROBS}], got {top}.",
            "top_logprobs_num",
            BELOW_INTEGER if top < 0 else ABOVE_INTEGER,
        )
    if return_logprob:
        sampling.logprobs = top
    # sent as given, as the Rust SMG 1.13 (unset: -1, no prompt logprobs); SGLang answers
    # input_token_logprobs from that prompt position on
    start = _integer(body, "logprob_start_len")
    sampling.logprob_start_len = -1 if start is None else start
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise _bad(
            "rid must be a string (batched requests are not supported).", "rid", INVALID_TYPE
        )
    return Prepared(
        kind="generate",
        model=_model(body),
        prompt=prompt,
        sampling=sampling,
        stream=stream,
        logprobs=return_logprob,
        top_logprobs=top,
        request_id_hint=rid,
        max_tokens_explicit=explicit,
        max_tokens_default=128,  # SGLang's max_new_tokens default
        return_text_in_logprobs=_boolean(body, "return_text_in_logprobs", False),
    )


def apply_limits(p: Prepared, prompt_len: int, context_length: int | None) -> None:
    """Fix max_tokens once the prompt is tokenized, as vLLM 0.32's `get_max_tokens`: the
    request's value, else the model's max_new_tokens, bounded by the context left (no
    bound when the context length is unknown). A prompt that leaves no room for output
    is a 400 (vLLM's wording); an explicit max_tokens that does not fit next to the
    prompt is cut to the context left, as vLLM 0.32 does (the engine people compare
    against; older vLLM refused it)."""
    s = p.sampling
    requested = s.max_tokens if p.max_tokens_explicit else None
    wanted = requested if requested is not None else p.max_tokens_default
    if context_length is None or context_length <= 0:
        s.max_tokens = wanted
        return
    if prompt_len >= context_length:
        raise _bad(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt contains {prompt_len} input tokens, which "
            + (
                "exceeds this limit even without any output tokens."
                if prompt_len > context_length
                else "leaves no room for output tokens."
            )
            + " Please reduce the length of the input prompt.",
            "messages" if p.kind == "chat" else "prompt",
            code=CONTEXT_EXCEEDED,
        )
    left = context_length - prompt_len
    s.max_tokens = left if wanted is None else min(wanted, left)
