# ruff: noqa: RUF001, RUF002 - the markers are the model's own fullwidth tokens
"""DeepSeek V3.2 (`deepseek32`) tool calls: the DSML form (deepseek-ai/DeepSeek-V3.2's
template; 1.13 crates/tool_parser/src/parsers/deepseek_dsml.rs):

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="p" string="true">text</｜DSML｜parameter>
    <｜DSML｜parameter name="q" string="false">JSON</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

The model types each value itself: string="true" is the text verbatim, string="false"
is JSON (text that is not JSON stays a string, as in 1.13). An invoke body that is one
JSON object is the arguments as they are (1.13's direct-JSON path). An invoke outside
the function_calls block is text.
"""

from __future__ import annotations

import re

from smg.parsers.toolcalls._framed import FramedToolParser, invoke_head
from smg.parsers.toolcalls._json import dumps, load, strict_loads
from smg.parsers.types import ToolCall

_PARAM = re.compile(
    r'<｜DSML｜parameter\s+name="([^"]+)"\s+string="(true|false)"\s*>(.*?)</｜DSML｜parameter>',
    re.DOTALL,
)


def _value(text: str, is_string: bool) -> object:
    if is_string:
        return text
    try:
        return strict_loads(text)
    except ValueError:  # not JSON (NaN/Infinity included): the text, as 1.13
        return text


class DeepSeekV32ToolParser(FramedToolParser):
    name = "deepseek32"
    section_begin = "<｜DSML｜function_calls>"
    section_end = "</｜DSML｜function_calls>"
    call_begin = "<｜DSML｜invoke name="
    call_end = "</｜DSML｜invoke>"
    bare_calls = False

    def parse_call(self, body: str) -> ToolCall | None:
        head = invoke_head(body)
        if head is None:
            return None
        name, params = head
        direct = params.strip()
        if direct.startswith("{") and direct.endswith("}"):
            value = load(direct)
            if isinstance(value, dict):
                return ToolCall(name, dumps(value)) if name else None
        arguments = {
            m.group(1): _value(m.group(3), m.group(2) == "true") for m in _PARAM.finditer(params)
        }
        if not name or _PARAM.sub("", params).strip():
            return None
        return ToolCall(name, dumps(arguments))
