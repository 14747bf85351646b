"""`mistral`: both forms Mistral's templates render after the `[TOOL_CALLS]` token.

- The list (Mistral-7B-Instruct-v0.3, Nemo; the Rust SMG 1.13's only form):
  `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]` (a single object is read too).
- Per call (tokenizer v11+: Mistral-Small-3.2, Ministral-3, Devstral-2, Magistral):
  `[TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}`, with `[CALL_ID]id` before `[ARGS]`
  in some versions (the id is kept) and `f{...}` without `[ARGS]` in others (vLLM
  reads all three).
Content before the first `[TOOL_CALLS]` is verbatim; what follows a `[TOOL_CALLS]` and is
neither form comes back as content with the token. The token must reach the parser: the
detokenizer keeps special tokens for it, as vLLM does for this parser.
"""

from __future__ import annotations

from typing import Any

from smg.parsers.toolcalls._json import arguments_text, known
from smg.parsers.toolcalls.json_calls import FAIL, WAIT, JsonCallsParser
from smg.parsers.types import ToolCall

_ARGS = "[ARGS]"
_CALL_ID = "[CALL_ID]"
_NAME_MAX = 256


def _name_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_-.:"


class MistralToolParser(JsonCallsParser):
    name = "mistral"
    opener = "[TOOL_CALLS]"
    arg_keys = ("arguments", "parameters")

    def __init__(self, tools: Any = ()) -> None:
        super().__init__(tools)
        self._call_id: str | None = None

    def bare_after(self) -> str:
        return ""  # the next call needs its own [TOOL_CALLS]

    def call_start(self, buf: str, k: int, final: bool) -> tuple[int, str | None]:
        self._call_id = None
        if buf[k] in "[{":
            return k, None
        n = len(buf)
        j = k
        while j < n and j - k <= _NAME_MAX and _name_char(buf[j]):
            j += 1
        if j == k or j - k > _NAME_MAX:
            return FAIL, None
        if j == n:
            return WAIT, None
        name = buf[k:j]
        if buf[j] == "{":
            return j, name
        call_id = None
        if buf.startswith(_CALL_ID, j):
            i = j + len(_CALL_ID)
            j = i
            while j < n and j - i <= _NAME_MAX and buf[j].isalnum():
                j += 1
            if j - i > _NAME_MAX:
                return FAIL, None
            if j == n:
                return WAIT, None
            call_id = buf[i:j] or None
        elif n - j < len(_CALL_ID) and _CALL_ID.startswith(buf[j:]):
            return WAIT, None
        if not buf.startswith(_ARGS, j):
            if n - j < len(_ARGS) and _ARGS.startswith(buf[j:]):
                return WAIT, None
            return FAIL, None
        j += len(_ARGS)
        while j < n and buf[j].isspace():
            j += 1
        if j == n:
            return WAIT, None
        if buf[j] != "{":
            return FAIL, None
        self._call_id = call_id
        return j, name

    def calls(self, value: Any, name: str | None) -> list[ToolCall] | None:
        if name is None:
            return super().calls(value, None)
        arguments = arguments_text(value) if isinstance(value, dict) else None
        if arguments is None or not known(name, self.names):
            return None
        return [ToolCall(name, arguments, self._call_id)]
