"""Typing untyped parameter values (XML-style formats) from the request's tool schema.

Formats such as GLM's `<arg_value>`, MiniMax's `<parameter>` or Qwen3-Coder's
`<parameter=...>` write every value as bare text, so `3` may be the integer 3 or the
string "3". As the Rust SMG 1.13 does (crates/tool_parser/src/parsers/helpers.rs
`param_types_for_function` / `coerce_by_schema_type`), the declared JSON-schema `type` of
the parameter decides; with no declared scalar type (or text that does not fit it) the
caller's inference decides (`infer_value`, 1.13's GLM `infer_value`).

Usage:
    types = param_types(tools, "get_weather")          # once per call
    value = typed_value(raw_text, types.get("city"))   # per parameter
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from smg.parsers.toolcalls._json import strict_loads

_LITERALS: dict[str, Any] = {
    "true": True,
    "True": True,
    "false": False,
    "False": False,
    "null": None,
    "None": None,
}
_MISSING = object()
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def param_types(tools: Sequence[Any], name: str) -> dict[str, str]:
    """`parameter -> declared JSON-schema type` for the named function of an OpenAI
    `tools` list; empty when the function, its `properties`, or a scalar `type` is
    absent (a union such as ["string", "null"] has no single type: inference decides)."""
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or function.get("name") != name:
            continue
        parameters = function.get("parameters")
        props = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if not isinstance(props, Mapping):
            return {}
        return {
            key: schema["type"]
            for key, schema in props.items()
            if isinstance(schema, Mapping) and isinstance(schema.get("type"), str)
        }
    return {}


def _json_or_missing(text: str) -> Any:
    try:
        return strict_loads(text)  # NaN and Infinity are not JSON: such a value stays text
    except ValueError:
        return _MISSING


def coerce(text: str, declared: str | None) -> Any:
    """The value for a declared type, or `_MISSING` when there is none or the text does
    not fit it. A `string` keeps bare text verbatim (`4`, `true` stay strings) but
    unwraps a JSON string literal (`"4"` -> `4`), as 1.13 does."""
    if declared == "string":
        if text.startswith('"'):
            value = _json_or_missing(text)
            if isinstance(value, str):
                return value
        return text
    if declared == "integer":
        stripped = text.strip()
        return int(stripped) if _INT.fullmatch(stripped) else _MISSING
    if declared == "number":
        # JSON, not float(): a large integer keeps its precision (1.13 does the same).
        value = _json_or_missing(text.strip())
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return value if ok else _MISSING
    if declared == "boolean":
        value = _LITERALS.get(text.strip(), _MISSING)
        return value if isinstance(value, bool) else _MISSING
    if declared in ("object", "array"):
        value = _json_or_missing(text)
        wanted = dict if declared == "object" else list
        return value if isinstance(value, wanted) else _MISSING
    return _MISSING


def infer_value(text: str) -> Any:
    """No usable schema type: JSON if the text is JSON, then Python/JSON literals, then
    numbers, else the text itself (1.13's GLM `infer_value`)."""
    value = _json_or_missing(text)
    if value is not _MISSING:
        return value
    if text in _LITERALS:
        return _LITERALS[text]
    return _number_or_text(text)


def infer_scalar(text: str) -> Any:
    """1.13's MiniMax/Step3 inference: literals, then numbers, else the text (a JSON
    object or array stays text unless the schema says object/array)."""
    if text in _LITERALS:
        return _LITERALS[text]
    return _number_or_text(text)


def _number_or_text(text: str) -> Any:
    # ASCII forms only, as Rust's i64/f64 parsing reads them (Python's int()/float() also
    # take "1_0", surrounding spaces and other scripts' digits); NaN/inf are no JSON.
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def tagged_arguments(
    pair: re.Pattern[str],
    text: str,
    types: Mapping[str, str],
    *,
    value: Callable[[str], str] = str.strip,
    infer: Callable[[str], Any] = infer_value,
) -> dict[str, Any] | None:
    """The arguments of an XML-style call body: every (key, value text) pair `pair`
    finds in `text`, each value through `value` then typed by the schema's `types`
    (else `infer`); None when text other than whitespace stands outside the pairs (the
    call is malformed: it comes back as content, never half-read)."""
    arguments = {}
    for match in pair.finditer(text):
        key = match.group(1).strip()
        arguments[key] = typed_value(value(match.group(2)), types.get(key), infer)
    if pair.sub("", text).strip():
        return None
    return arguments


def typed_value(text: str, declared: str | None, infer: Callable[[str], Any] = infer_value) -> Any:
    """The parameter's value: by declared type when it fits, else by `infer`."""
    value = coerce(text, declared)
    return infer(text) if value is _MISSING else value
