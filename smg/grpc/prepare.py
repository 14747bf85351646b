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
from dataclasses import dataclass, field
from typing import Any

import orjson

from smg.grpc.types import SamplingParams

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_MAX_STOPS = 4  # the Rust SMG's `validate_stop` (vLLM has no limit)
_MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default --max-logprobs
_INT_MAX = 2**63 - 1
# The error code of a refused request (the body's `type` is "invalid_request_error" too,
# as the Rust SMG writes it; vLLM writes type "BadRequestError" and code 400).
INVALID = "invalid_request_error"
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
    """A 400 (the only status prepare answers with)."""
    return RequestError(400, code, message, param)


@dataclass
class Defaults:
    """The model's sampling defaults; None: the field has none (neutral value applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config.json max_new_tokens: a cap

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
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
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
    max_tokens_cap: int | None = None  # the model's max_new_tokens (Defaults.max_tokens)
    # SGLang /generate: return_logprob's extras and the text's offset for logprobs.
    return_text_in_logprobs: bool = False


# --------------------------------------------------------------------------- helpers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, got {_show(value)}.", param=name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pydantic's lax mode (vLLM) takes 16.0 for 16
    if not _is_int(value):
        raise _bad(f"'{name}' must be an integer, got {_show(value)}.", param=name)
    if abs(value) > _INT_MAX:
        raise _bad(f"'{name}' is out of range: {value}.", param=name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean, got {_show(value)}.", param=name)
    return value


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"'{name}' must be a string, got {_show(value)}.", param=name)
    return value


def _show(value: object) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 80 else text[:77] + "..."


def _in_range(
    name: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False
) -> None:
    if value is None:
        return
    if value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise _bad(
            f"{name} must be in {left}{_fmt(lo)}, {_fmt(hi)}], got {_fmt(value)}.", param=name
        )


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# --------------------------------------------------------------------------- sampling


def _sampling(
    body: dict, defaults: Defaults, *, max_tokens_names: tuple[str, ...]
) -> tuple[SamplingParams, bool]:
    """The sampling fields shared by chat and completions (vLLM's names and checks)."""
    s = SamplingParams()
    temperature = _number(body, "temperature")
    _in_range("temperature", temperature, 0.0, 2.0)
    s.temperature = _first(temperature, defaults.temperature, 1.0)
    top_p = _number(body, "top_p")
    _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    s.top_p = _first(top_p, defaults.top_p, 1.0)
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise _bad(f"top_k must be -1 (disable), or at least 1, got {top_k}.", param="top_k")
    if top_k is not None:
        s.top_k = -1 if top_k in (0, -1) else top_k  # vLLM: 0 is off too
    else:
        s.top_k = defaults.top_k if defaults.top_k is not None else -1
    min_p = _number(body, "min_p")
    _in_range("min_p", min_p, 0.0, 1.0)
    s.min_p = _first(min_p, defaults.min_p, 0.0)
    for name in ("frequency_penalty", "presence_penalty"):
        value = _number(body, name)
        _in_range(name, value, -2.0, 2.0)
        setattr(s, name, value if value is not None else 0.0)
    repetition = _number(body, "repetition_penalty")
    if repetition is not None and not 0.0 < repetition <= 2.0:
        raise _bad(
            f"repetition_penalty must be in (0, 2], got {_fmt(repetition)}.",
            param="repetition_penalty",
        )
    s.repetition_penalty = _first(repetition, defaults.repetition_penalty, 1.0)

    # max_completion_tokens wins over max_tokens (vLLM's `max_completion_tokens or max_tokens`)
    explicit: int | None = None
    for name in max_tokens_names:
        value = _integer(body, name)
        if value is not None and value < 1:
            raise _bad(f"{name} must be at least 1, got {value}.", param=name)
        if explicit is None and value is not None:
            explicit = value
    s.max_tokens = explicit
    min_tokens = _integer(body, "min_tokens")
    if min_tokens is not None:
        if min_tokens < 0:
            raise _bad(
                f"min_tokens must be greater than or equal to 0, got {min_tokens}.",
                param="min_tokens",
            )
        if explicit is not None and min_tokens > explicit:
            raise _bad(
                f"min_tokens must be less than or equal to max_tokens={explicit}, got {min_tokens}.",
                param="min_tokens",
            )
        s.min_tokens = min_tokens

    n = _integer(body, "n")
    if n is not None:
        if n < 1:
            raise _bad(f"n must be at least 1, got {n}.", param="n")
        s.n = n
    seed = _integer(body, "seed")
    if seed is not None:
        if not -(2**63) <= seed < 2**64:
            raise _bad(f"seed is out of range: {seed}.", param="seed")
        s.seed = seed

    s.stop = _stops(body.get("stop"))
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise _bad(
                "stop_token_ids must be a list of non-negative token ids.", param="stop_token_ids"
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
        raise _bad("stop must be a string or a list of strings.", param="stop")
    if len(stops) > _MAX_STOPS:
        raise _bad(f"stop may hold at most {_MAX_STOPS} sequences, got {len(stops)}.", param="stop")
    if any(s == "" for s in stops):
        raise _bad("stop sequences cannot be empty.", param="stop")
    return list(stops)


def _logit_bias(value: object) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("logit_bias must be an object of token id to bias.", param="logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad(
                f"logit_bias keys must be token ids, got {_show(key)}.", param="logit_bias"
            ) from None
        if token < 0:
            raise _bad(f"logit_bias token id {token} is negative.", param="logit_bias")
        if not _is_number(bias) or not math.isfinite(bias):
            raise _bad(f"logit_bias values must be numbers, got {_show(bias)}.", param="logit_bias")
        if not -100 <= bias <= 100:
            raise _bad(
                f"logit_bias values must be in [-100, 100], got {_fmt(bias)} for token {token}.",
                param="logit_bias",
            )
        out[token] = float(bias)
    return out


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        # vLLM's wording
        raise _bad("Stream options can only be defined when `stream=True`.", param="stream_options")
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object.", param="stream_options")
    include = _boolean(options, "include_usage", False)
    continuous = _boolean(options, "continuous_usage_stats", False)
    return include, continuous


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", param="model")
    return model


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
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
        raise _bad(
            "only one structured output constraint (response_format, regex, ebnf, "
            "structured_outputs, guided_*) can be active at a time, got "
            + ", ".join(p for p, _, _ in found)
            + ".",
            param=found[1][0],
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
        if not isinstance(spec, dict):
            raise _bad(
                "response_format.json_schema must be an object with 'name' and 'schema'.",
                param="response_format.json_schema",
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(
                "JSON schema name cannot be empty.", param="response_format.json_schema.name"
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
        raise _bad("tools must be a list.", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"tools[{i}] must be a function tool.", param=f"tools[{i}]")
        function = tool.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise _bad(f"tools[{i}].function.name is required.", param=f"tools[{i}].function")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(
                f"tools[{i}].function.parameters must be an object.",
                param=f"tools[{i}].function.parameters",
            )
    return tools


def _tool_choice(body: dict, tools: list[dict] | None) -> str | None:
    """ "none" / "auto" / absent -> None; "required" -> "required"; a named function ->
    its name. vLLM's checks and wording."""
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        return None
    if choice == "required":
        if not tools:
            raise _bad("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return "required"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str) or not name:
            raise _bad(
                "tool_choice must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
            )
        if not tools:
            raise _bad("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if not any(t["function"]["name"] == name for t in tools):
            raise _bad(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
        return name
    raise _bad(
        f"Invalid value for `tool_choice`: {_show(choice)}. It must be 'none', 'auto', "
        "'required' or a named function.",
        param="tool_choice",
    )


def tool_schema(tools: list[dict], choice: str) -> dict:
    """The JSON schema the output must follow for tool_choice "required" or a named
    function, built as vLLM's `_get_json_schema_from_tool` builds it: a named function's
    output is its parameters object; "required" is a non-empty array of
    {"name", "parameters"} objects, one anyOf branch per tool, with every tool's `$defs`
    hoisted to the top (conflicting definitions -> 400)."""
    if choice != "required":
        for tool in tools:
            if tool["function"]["name"] == choice:
                return tool["function"].get("parameters") or {"type": "object", "properties": {}}
        raise _bad(f"Tool '{choice}' has not been passed in `tools`.", param="tool_choice")
    branches: list[dict] = []
    defs: dict[str, Any] = {}
    for tool in tools:
        function = tool["function"]
        params = function.get("parameters")
        if params:
            params = dict(params)
            for name, schema in (params.pop("$defs", None) or {}).items():
                if name in defs and defs[name] != schema:
                    raise _bad(
                        f"Tool definition '{name}' has multiple schemas, which is not supported.",
                        param="tools",
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
    if defs:
        schema["$defs"] = defs
    return schema


# --------------------------------------------------------------------------- messages


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is a required property.", param="messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list.", param="messages")
    if not messages:
        raise _bad("messages cannot be empty.", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object.", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(
                f"{where}.role must be one of 'system', 'developer', 'user', 'assistant', "
                f"'tool', got {_show(role)}.",
                param=f"{where}.role",
            )
        content = message.get("content")
        if content is None:
            if role == "assistant" or role == "tool":
                continue  # an assistant turn may carry only tool_calls
            raise _bad(f"{where}.content is required.", param=f"{where}.content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(
                f"{where}.content must be a string or a list of content parts.",
                param=f"{where}.content",
            )
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{pwhere} must be an object.", param=pwhere)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pwhere}.text must be a string.", param=f"{pwhere}.text")
            elif kind in (
                "image_url",
                "input_audio",
                "video_url",
                "audio_url",
                "image",
                "file",
                "input_image",
            ):
                raise _bad(
                    f"{pwhere}: content of type '{kind}' is not supported: this gateway serves "
                    "text-only models over gRPC.",
                    param=pwhere,
                )
            else:
                raise _bad(
                    f"{pwhere}.type must be 'text', got {_show(kind)}.", param=f"{pwhere}.type"
                )
    return messages


def _logprobs_chat(body: dict) -> tuple[bool, int]:
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs")
    if top is not None:
        if not logprobs:
            # vLLM's wording
            raise _bad(
                "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs"
            )
        if not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise _bad(
                f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {top}.",
                param="top_logprobs",
            )
    return logprobs, top or 0


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
                "tool_choice 'required' or a named function cannot be combined with another "
                "structured output constraint.",
                param="tool_choice",
            )
        assert tools is not None
        constraint = ("json_schema", orjson.dumps(tool_schema(tools, choice)).decode())
    sampling.constraint = constraint
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
    if continue_final and messages[-1].get("role") != "assistant":
        raise _bad(
            "continue_final_message requires the last message to be an assistant message.",
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
        request_id_hint=_string(body, "rid") or _string(body, "request_id"),
        max_tokens_explicit=explicit,
        max_tokens_cap=defaults.max_tokens,
        tool_choice=choice,
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
    prompt = _prompt(body["prompt"], "prompt")
    if prompt == "" or prompt == []:
        raise _bad("Prompt cannot be empty.", param="prompt")
    if body.get("suffix") is not None:
        raise _bad("suffix is not supported.", param="suffix")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n", 1):
        raise _bad("best_of is not supported.", param="best_of")
    sampling, explicit = _sampling(body, defaults, max_tokens_names=("max_tokens",))
    if "max_tokens" not in body:
        # the legacy completions API: max_tokens defaults to 16 (OpenAI and vLLM)
        sampling.max_tokens = 16
        explicit = True
    stream = _boolean(body, "stream", False)
    include_usage, continuous = _stream_options(body, stream)
    logprobs = _integer(body, "logprobs")
    if logprobs is not None:
        if not 0 <= logprobs <= _MAX_TOP_LOGPROBS:
            raise _bad(
                f"logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {logprobs}.", param="logprobs"
            )
        sampling.logprobs = logprobs
    sampling.constraint = _constraint(body)
    echo = _boolean(body, "echo", False)
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
        max_tokens_cap=defaults.max_tokens,
    )


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
    sampling, explicit = _sampling(params, defaults, max_tokens_names=("max_new_tokens",))
    if params.get("max_new_tokens") is None:
        sampling.max_tokens = 128  # SGLang's SamplingParams default
        explicit = True
    if "no_stop_trim" in params:
        sampling.include_stop_str_in_output = _boolean(params, "no_stop_trim", False)
    constraint_src = {
        k: params[k] for k in ("regex", "ebnf", "structural_tag") if params.get(k) is not None
    }
    if params.get("json_schema") is not None:
        constraint_src["guided_json"] = params["json_schema"]
    sampling.constraint = _constraint(constraint_src)
    stream = _boolean(body, "stream", False)
    return_logprob = _boolean(body, "return_logprob", False)
    top = _integer(body, "top_logprobs_num") or 0
    if not 0 <= top <= _MAX_TOP_LOGPROBS:
        raise _bad(
            f"top_logprobs_num must be in [0, {_MAX_TOP_LOGPROBS}], got {top}.",
            param="top_logprobs_num",
        )
    if return_logprob:
        sampling.logprobs = top
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise _bad("rid must be a string (batched requests are not supported).", param="rid")
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
        max_tokens_cap=defaults.max_tokens,
        return_text_in_logprobs=_boolean(body, "return_text_in_logprobs", False),
    )


def apply_limits(p: Prepared, prompt_len: int, context_length: int | None) -> None:
    """Fix max_tokens once the prompt is tokenized (vLLM's `get_max_tokens`): the
    minimum of the request's value, the context left and the model's max_new_tokens.
    A prompt that fills the context, or an explicit max_tokens that does not fit next to
    it, is a 400 before dispatch (vLLM's wording)."""
    s = p.sampling
    cap = p.max_tokens_cap
    if context_length is None or context_length <= 0:
        if s.max_tokens is None:
            s.max_tokens = cap
        elif cap is not None:
            s.max_tokens = min(s.max_tokens, cap)
        return
    requested = s.max_tokens if p.max_tokens_explicit else None
    if prompt_len >= context_length:
        if requested is None:
            message = (
                f"This model's maximum context length is {context_length} tokens. However, "
                f"your request has {prompt_len} input tokens. Please reduce the length of the "
                "input messages."
            )
        else:
            message = (
                f"This model's maximum context length is {context_length} tokens. However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the messages, "
                f"{requested} in the completion). Please reduce the length of the messages or "
                "completion."
            )
        raise _bad(
            message, param="messages" if p.kind == "chat" else "prompt", code=CONTEXT_EXCEEDED
        )
    left = context_length - prompt_len
    if requested is not None and requested > left:
        raise _bad(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
            f"maximum context length is {context_length} tokens and your request has "
            f"{prompt_len} input tokens ({requested} > {context_length} - {prompt_len}).",
            param="max_completion_tokens" if p.kind == "chat" else "max_tokens",
            code=CONTEXT_EXCEEDED,
        )
    bounds = [left] + [v for v in (requested, cap) if v is not None]
    s.max_tokens = min(bounds)
