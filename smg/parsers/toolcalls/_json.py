"""Shared helpers for the tool parsers whose calls are JSON (pure; no I/O).

`JsonEnd` finds where one JSON object or array ends in text that arrives in pieces,
string-aware and without re-reading what it has seen. The others turn a parsed value
into a `ToolCall` the one way every JSON format does: a string name, arguments an
object (or the JSON text of one), written back as `json.dumps(..., ensure_ascii=False)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from smg.parsers.types import ToolCall

_OPEN = frozenset("{[")
_IN_STRING = re.compile(r'["\\]')
_OUTSIDE = re.compile(r'[{}\[\]"]')


class JsonEnd:
    """Where a JSON object/array that starts at a given position ends.

    Counts brackets outside strings (a `}` closes a `[` too: a mismatched value ends
    early and then fails `json.loads`, which is all a caller needs to know). State is
    kept between calls, so each character is read once however the text is split."""

    __slots__ = ("depth", "end", "escape", "in_string", "pos")

    def __init__(self, pos: int) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.pos = pos  # the next character to read
        self.end = -1  # once found, where the value ends (asking again returns it)

    def scan(self, text: str) -> int:
        """The index just past the value's last character, or -1 if it has not ended
        in `text` yet (the next call goes on from where this one stopped)."""
        if self.end >= 0:
            return self.end
        depth = self.depth
        in_string = self.in_string
        escape = self.escape
        i = self.pos
        n = len(text)
        # Jump between the characters that matter (a regex search runs in C): long
        # strings and long runs of plain values cost one search, not a loop per char.
        while i < n:
            if in_string:
                if escape:
                    escape = False
                    i += 1
                    continue
                m = _IN_STRING.search(text, i)
                if m is None:
                    i = n
                    break
                i = m.end()
                if m.group() == "\\":
                    escape = True
                else:
                    in_string = False
                continue
            m = _OUTSIDE.search(text, i)
            if m is None:
                i = n
                break
            i = m.end()
            ch = m.group()
            if ch == '"':
                in_string = True
            elif ch in _OPEN:
                depth += 1
            else:
                depth -= 1
                if depth <= 0:
                    self.depth, self.pos, self.end = 0, i, i
                    return i
        self.depth, self.in_string, self.escape, self.pos = depth, in_string, escape, i
        return -1

    def shift(self, by: int) -> None:
        """The caller dropped `by` characters from the front of its buffer."""
        self.pos -= by
        if self.end >= 0:
            self.end -= by


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads and json.dumps with any option build a decoder (its scanner) or
# an encoder on every call, a measurable part of a call's parse.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def strict_loads(text: str) -> Any:
    """`json.loads` that refuses NaN/Infinity (ValueError): Python reads them, but no
    JSON encoder may write them back, so arguments holding one are not JSON."""
    if not isinstance(text, str) or text.startswith("\ufeff"):
        return json.loads(text, parse_constant=_no_constant)  # its BOM error and bytes
    return _DECODER.decode(text)


def load(text: str) -> Any:
    """`strict_loads`, or None for anything that is not strict JSON (a nesting too deep
    for the decoder is not an error either)."""
    try:
        return strict_loads(text)
    except (ValueError, RecursionError):
        return None


def dumps(value: Any) -> str:
    """`json.dumps(value, ensure_ascii=False, allow_nan=False)`."""
    return _ENCODER.encode(value)


def arguments_text(value: Any) -> str | None:
    """A call's arguments as the JSON text of an object: an object, or a string that
    holds one (some models quote their arguments); absent or null means none."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        value = load(value)
    if isinstance(value, dict):
        try:
            return dumps(value)
        except (ValueError, RecursionError):
            return None
    return None


def tool_names(tools: Sequence[dict]) -> frozenset[str]:
    """The function names a request offers (empty: the request named none, so any name
    goes)."""
    names = set()
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


def known(name: str, names: frozenset[str]) -> bool:
    """Whether a call to `name` is one the client can execute. The Rust SMG drops a
    call to a function the request did not offer; here it comes back as content text
    instead, so nothing the model wrote is lost."""
    return not names or name in names


def call_from_object(
    obj: Any, arg_keys: Iterable[str], names: frozenset[str], name_keys: Iterable[str] = ("name",)
) -> ToolCall | None:
    """{"name": ..., "arguments"|...: {...}} -> ToolCall; None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = None
    for key in name_keys:
        if isinstance(obj.get(key), str):
            name = obj[key]
            break
    if not name or not known(name, names):
        return None
    raw = None
    for key in arg_keys:
        if key in obj:
            raw = obj[key]
            break
    arguments = arguments_text(raw)
    return None if arguments is None else ToolCall(name, arguments)


def calls_from_value(
    value: Any,
    arg_keys: Iterable[str],
    names: frozenset[str],
    *,
    allow_list: bool = True,
    name_keys: Iterable[str] = ("name",),
) -> list[ToolCall] | None:
    """One call object, or (allow_list) a non-empty list of them -> calls; None when
    the value (or any element of the list) is not a call: then it is content."""
    keys = tuple(arg_keys)
    name_keys = tuple(name_keys)
    if isinstance(value, list):
        if not allow_list or not value:
            return None
        calls = []
        for item in value:
            call = call_from_object(item, keys, names, name_keys)
            if call is None:
                return None
            calls.append(call)
        return calls
    call = call_from_object(value, keys, names, name_keys)
    return None if call is None else [call]
