"""Kimi K2 (`kimik2`) tool calls (moonshotai/Kimi-K2-Instruct's template; 1.13
crates/tool_parser/src/parsers/kimik2.rs):

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>

The id `functions.NAME:IDX` is the call's id: Kimi's template writes a message's
tool_call id back in this place and its clients expect that form, so the call carries it
(`ToolCall.id`). 1.13 reads the name from the id as `(functions.)?NAME:IDX`; arguments
must be a JSON object.
"""

from __future__ import annotations

import re

from smg.parsers.toolcalls._framed import FramedToolParser
from smg.parsers.toolcalls._json import dumps, load
from smg.parsers.types import ToolCall

ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
# 1.13's id rule; "-" is allowed in the name too (OpenAI function names may use it).
_ID = re.compile(r"(?:functions\.)?([\w.\-]+):(\d+)")


class KimiK2ToolParser(FramedToolParser):
    name = "kimik2"
    section_begin = "<|tool_calls_section_begin|>"
    section_end = "<|tool_calls_section_end|>"
    call_begin = "<|tool_call_begin|>"
    call_end = "<|tool_call_end|>"

    def parse_call(self, body: str) -> ToolCall | None:
        head, sep, args = body.partition(ARGUMENT_BEGIN)
        call_id = head.strip()
        match = _ID.fullmatch(call_id)
        if not sep or match is None:
            return None
        value = load(args)  # strict JSON: NaN/Infinity make the call malformed
        if not isinstance(value, dict):
            return None
        return ToolCall(match.group(1), dumps(value), call_id)
