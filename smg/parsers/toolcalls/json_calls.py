"""Calls written as JSON values: `json` (a bare object or array of {"name", "arguments"|
"parameters"}) and `llama` (Llama 3.x: `{"name": ..., "parameters": {...}}` as the whole
answer, or after `<|python_tag|>`, several separated by ";").

`JsonCallsParser` is the machine; a subclass says where calls may begin:
- `bare`: characters that open a call at the very start of the answer (leading
  whitespace allowed and dropped when a call follows);
- `anywhere`: characters that open a call anywhere in content (json);
- `opener`: a marker that opens calls anywhere (content before it is verbatim, as the
  Rust SMG); `call_start` reads what follows it (mistral overrides that);
- `separators`: what may stand between consecutive calls besides whitespace; between
  calls and after the last one they are syntax (dropped), as the Rust SMG's separators.
A value's end is found string-aware (`_json.JsonEnd`); a value that is not a call (or
not JSON) comes back as content text together with the syntax in front of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smg.parsers.toolcalls._json import (
    JsonEnd,
    arguments_text,
    calls_from_value,
    known,
    load,
    tool_names,
)
from smg.parsers.types import ToolCall, ToolParser, held_suffix

_START, _CONTENT, _OPENED, _CALL, _AFTER, _PLAIN = range(6)
WAIT = -1  # call_start: not decidable yet
FAIL = -2  # call_start: what follows the opener is not a call


class JsonCallsParser(ToolParser):
    opener = ""
    bare = ""
    separators = ""
    arg_keys: tuple[str, ...] = ("arguments", "parameters")
    name_keys: tuple[str, ...] = ("name",)
    allow_list = True
    anywhere = ""  # characters that open a JSON value anywhere in content (json)
    # json: prose (or a value that is not a call) after the calls ends them: the rest
    # is content (the Rust SMG takes the first JSON value).
    plain_after_calls = False

    def __init__(self, tools: Sequence[dict] = ()) -> None:
        super().__init__(tools)
        self.names = tool_names(tools)
        self._buf = ""
        self._state = _START if self.bare else _CONTENT
        self._prefix = ""  # syntax in front of the current call: content if it fails
        self._called = False  # a call has been emitted
        self._lead = ""  # separators between a call and the next opener: the same
        self._end: JsonEnd | None = None
        self._name: str | None = None  # a name read before the value (mistral's [ARGS])
        self._firsts = self.anywhere + self.opener[:1]

    # What follows an opener, from index k (its first non-whitespace character):
    # (index where the JSON value starts, name read before it) or (WAIT|FAIL, None).
    def call_start(self, buf: str, k: int, final: bool) -> tuple[int, str | None]:
        return (k, None) if buf[k] in self.bare_after() else (FAIL, None)

    def bare_after(self) -> str:
        """Characters that open the next call right after a call."""
        return "{[" if self.allow_list else "{"

    def calls(self, value: Any, name: str | None) -> list[ToolCall] | None:
        if name is not None:
            arguments = arguments_text(value) if isinstance(value, dict) else None
            if arguments is None or not known(name, self.names):
                return None
            return [ToolCall(name, arguments)]
        return calls_from_value(
            value, self.arg_keys, self.names, allow_list=self.allow_list, name_keys=self.name_keys
        )

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if not text:
            return "", []
        if self._state == _CALL and self._end is not None:
            # Inside a value: the scanner goes on from where it stopped.
            buf = self._buf + text
            if self._end.scan(buf) < 0:
                self._buf = buf
                return "", []
            return self._run(buf, final=False)
        if not self._buf:
            if self._state == _PLAIN:
                return text, []
            if self._state == _CONTENT:
                for c in self._firsts:
                    if c in text:
                        break
                else:
                    return text, []
        return self._run(self._buf + text, final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._run(self._buf, final=True)

    def _find_value(self, buf: str, pos: int, stop: int) -> int:
        """The first character in buf[pos:stop] that opens a value anywhere; -1: none."""
        best = -1
        for ch in self.anywhere:
            i = buf.find(ch, pos, stop)
            if i >= 0 and (best < 0 or i < best):
                best = i
        return best

    def _skip(self, buf: str, k: int, extra: str) -> int:
        n = len(buf)
        while k < n and (buf[k].isspace() or buf[k] in extra):
            k += 1
        return k

    def _run(self, buf: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        opener = self.opener
        out: list[str] = []
        calls: list[ToolCall] = []
        n = len(buf)
        pos = 0
        state = self._state
        while pos < n:
            if state == _PLAIN:
                out.append(buf[pos:])
                pos = n
            elif state == _START:
                k = self._skip(buf, pos, "")
                if k == n:
                    if final:
                        out.append(buf[pos:])
                        pos = n
                    break
                if buf[k] in self.bare:
                    self._prefix, pos, state = buf[pos:k], k, _CALL
                    self._end, self._name = JsonEnd(k), None
                else:
                    state = _CONTENT
            elif state == _CONTENT:
                i = buf.find(opener, pos) if opener else -1
                v = self._find_value(buf, pos, n if i < 0 else i)
                if v >= 0:
                    out.append(buf[pos:v])
                    self._prefix, pos, state = "", v, _CALL
                    self._end, self._name = JsonEnd(v), None
                    continue
                if i < 0:
                    keep = 0 if final or not opener else min(held_suffix(buf, opener), n - pos)
                    out.append(buf[pos : n - keep])
                    pos = n - keep
                    break
                out.append(buf[pos:i])
                pos, state = i, _OPENED
            elif state == _OPENED:
                k = self._skip(buf, pos + len(opener), "")
                at, name = (WAIT, None) if k == n else self.call_start(buf, k, final)
                if at == WAIT and final:
                    at = FAIL
                if at == WAIT:
                    break
                if at == FAIL:  # the opener and what follows it are content
                    out.append(self._lead + buf[pos : pos + len(opener)])
                    pos, state = pos + len(opener), _CONTENT
                else:
                    self._prefix, pos, state = self._lead + buf[pos:at], at, _CALL
                    self._end, self._name = JsonEnd(at), name
                self._lead = ""
            elif state == _CALL:
                end = self._end
                assert end is not None
                e = end.scan(buf)
                if e < 0:
                    if final:  # truncated: content
                        out.append(self._prefix + buf[pos:])
                        pos, state = n, _CONTENT
                    break
                got = self.calls(load(buf[pos:e]), self._name)
                if got:
                    calls.extend(got)
                    state, self._called = _AFTER, True
                else:
                    out.append(self._prefix + buf[pos:e])
                    state = _PLAIN if self.plain_after_calls and self._called else _CONTENT
                self._prefix = ""
                pos = e
            else:  # _AFTER: separators after a call are held until what follows is known
                k = self._skip(buf, pos, self.separators)
                if k == n:
                    if final:
                        pos = n
                    break
                if buf[k] in self.bare_after():
                    self._prefix, pos, state = buf[pos:k], k, _CALL
                    self._end, self._name = JsonEnd(k), None
                elif opener and buf.startswith(opener, k):
                    self._lead, pos, state = buf[pos:k], k, _OPENED
                elif opener and not final and n - k < len(opener) and opener.startswith(buf[k:]):
                    break
                else:
                    state = _PLAIN if self.plain_after_calls else _CONTENT
        self._buf = buf[pos:]
        self._state = state
        if state == _CALL and self._end is not None:
            self._end.shift(pos)
        return "".join(out), calls


class JsonToolParser(JsonCallsParser):
    """A JSON call object or array of them, anywhere in the answer (the Rust SMG's
    complete-answer rule: the first JSON value in the text); a value that is not a call
    is content and the search goes on. Whitespace before a call that opens the answer is
    dropped; calls may follow each other separated by whitespace; prose after them is
    content, and so is any JSON in it."""

    name = "json"
    name_keys = ("name", "function")  # as the Rust SMG: {"function": "f", ...} too
    bare = "{["
    anywhere = "{["
    plain_after_calls = True


class LlamaToolParser(JsonCallsParser):
    """Llama 3.1 / 3.2 JSON calls: the answer starts with `{`, or `<|python_tag|>`
    opens them anywhere; several are separated by ";". The templates write
    "parameters"; "arguments" is read too."""

    name = "llama"
    opener = "<|python_tag|>"
    bare = "{"
    separators = ";"
    arg_keys = ("parameters", "arguments")
    allow_list = False
