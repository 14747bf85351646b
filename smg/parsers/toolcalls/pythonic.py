"""`pythonic`: calls as a Python list of keyword calls, `[get_weather(city="Paris"), now()]`
(Llama-3.2 pythonic and Llama 4 templates; Llama 4 wraps it in <|python_start|> ...
<|python_end|>).

As the Rust SMG: the two Llama 4 tokens are call syntax wherever they stand (dropped);
a list is a call list when "[" is followed by a name and "(" (its end found by bracket
depth, outside Python strings); it is parsed with `ast` (never evaluated): each element
must be a call to a plain name with keyword arguments only; values are literals (str,
numbers, True/False/None, lists, tuples, dicts, unary +/-), and a bare name is its own
text (`city=Paris` -> "Paris": the pythonic template prints strings unquoted). A list
that does not parse so, or names a function the request does not offer, is content.
Whitespace between call lists and after the last is dropped, as in the other parsers.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Any

from smg.parsers.toolcalls._json import dumps, known, tool_names
from smg.parsers.types import ToolCall, ToolParser, held_suffix_any

_TOKENS = ("<|python_start|>", "<|python_end|>")
_CONTENT, _CAND, _CALL, _AFTER = range(4)
_OPEN = frozenset("([{")
_CLOSE = frozenset(")]}")


class _DropTokens:
    """Removes the Llama 4 python tokens from a text stream, left to right, holding
    only a possible start of one."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str, final: bool) -> str:
        if not self.held and "<" not in text:
            return text
        s = self.held + text
        out = []
        pos = 0
        while True:
            hits = [(i, t) for t in _TOKENS if (i := s.find(t, pos)) >= 0]
            if not hits:
                break
            i, token = min(hits)
            out.append(s[pos:i])
            pos = i + len(token)
        keep = 0 if final else min(held_suffix_any(s, _TOKENS), len(s) - pos)
        out.append(s[pos : len(s) - keep])
        self.held = s[len(s) - keep :]
        return "".join(out)


class _NotACall(Exception):
    pass


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, bool | int | str):
            return v
        if isinstance(v, float) and math.isfinite(v):
            return v
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        raise _NotACall
    if isinstance(node, ast.List | ast.Tuple):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                raise _NotACall  # **spread
            out[_key(_value(k))] = _value(v)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _value(node.operand)
        if isinstance(inner, bool) or not isinstance(inner, int | float):
            raise _NotACall
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Name):
        return node.id
    raise _NotACall


def _key(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float) or value is None:
        return dumps(value)
    raise _NotACall


def parse_call_list(source: str, names: frozenset[str]) -> list[ToolCall] | None:
    """`[f(a=1), g()]` -> calls; None when it is not a list of calls the client can run."""
    try:
        tree = ast.parse(source, mode="eval")
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
                return None
            name = node.func.id
            if not known(name, names):
                return None
            arguments = {}
            for kw in node.keywords:
                if kw.arg is None:
                    return None
                arguments[kw.arg] = _value(kw.value)
            calls.append(ToolCall(name, dumps(arguments)))
        return calls
    except Exception:  # SyntaxError, _NotACall, RecursionError, MemoryError, ...: content
        return None


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def __init__(self, tools: Sequence[dict] = ()) -> None:
        super().__init__(tools)
        self.names = tool_names(tools)
        self._tokens = _DropTokens()
        self._buf = ""
        self._state = _CONTENT
        self._prefix = ""  # whitespace between two lists: content if the second is not one
        # bracket scan of the current list: position, depth, open quote ("" none), escape
        self._scan = (0, 0, "", False)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if not text:
            return "", []
        text = self._tokens.feed(text, False)
        if self._state == _CONTENT and not self._buf and "[" not in text:
            return text, []
        return self._run(self._buf + text, final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._run(self._buf + self._tokens.feed("", True), final=True)

    def _list_end(self, buf: str) -> int:
        """Index past the "]" that closes the list at the scan's start; -1: not yet."""
        i, depth, quote, escape = self._scan
        n = len(buf)
        while i < n:
            ch = buf[i]
            i += 1
            if quote:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == quote:
                    quote = ""
            elif ch == '"' or ch == "'":
                quote = ch
            elif ch in _OPEN:
                depth += 1
            elif ch in _CLOSE:
                depth -= 1
                if depth <= 0:
                    self._scan = (i, 0, "", False)
                    return i
        self._scan = (i, depth, quote, escape)
        return -1

    @staticmethod
    def _candidate(buf: str, i: int) -> int:
        """After "[" at i: 1 if a name and "(" follow, 0 if not, -1 if not known yet."""
        n = len(buf)
        k = i + 1
        while k < n and buf[k].isspace():
            k += 1
        if k == n:
            return -1
        if not (buf[k].isalpha() or buf[k] == "_"):
            return 0
        while k < n and (buf[k].isalnum() or buf[k] == "_"):
            k += 1
        while k < n and buf[k].isspace():
            k += 1
        if k == n:
            return -1
        return 1 if buf[k] == "(" else 0

    def _run(self, buf: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        n = len(buf)
        pos = 0
        state = self._state
        while pos < n:
            if state == _CONTENT:
                i = buf.find("[", pos)
                if i < 0:
                    out.append(buf[pos:])
                    pos = n
                    break
                out.append(buf[pos:i])
                pos, state = i, _CAND
            elif state == _CAND:
                verdict = self._candidate(buf, pos)
                if verdict < 0 and not final:
                    break
                if verdict == 1:
                    state, self._scan = _CALL, (pos, 0, "", False)
                else:
                    out.append(self._prefix + "[")
                    pos, state, self._prefix = pos + 1, _CONTENT, ""
            elif state == _CALL:
                e = self._list_end(buf)
                if e < 0:
                    if final:
                        out.append(self._prefix + buf[pos:])
                        pos, state = n, _CONTENT
                    break
                got = parse_call_list(buf[pos:e], self.names)
                if got:
                    calls.extend(got)
                    state = _AFTER
                else:
                    out.append(self._prefix + buf[pos:e])
                    state = _CONTENT
                pos, self._prefix = e, ""
            else:  # _AFTER
                k = pos
                while k < n and buf[k].isspace():
                    k += 1
                if k == n:
                    if final:
                        pos = n
                    break
                if buf[k] == "[":
                    pos, state, self._prefix = k, _CAND, buf[pos:k]
                else:
                    state = _CONTENT
        self._buf = buf[pos:]
        self._state = state
        if state == _CALL:
            i, depth, quote, escape = self._scan
            self._scan = (i - pos, depth, quote, escape)
        return "".join(out), calls
