# ruff: noqa: RUF001, RUF002 - the markers are the model's own fullwidth tokens
"""Step3 (`step3`) tool calls: StepFun's steptml form (stepfun-ai/step3's template; 1.13
crates/tool_parser/src/parsers/step3.rs):

    <｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="NAME">
    <steptml:parameter name="p">v</steptml:parameter>...</steptml:invoke><｜tool_call_end｜>
    <｜tool_calls_end｜>

Values are bare text, trimmed, typed from the request's tool schema (`_schema`; 1.13's
step3 reads no schema, its other XML parsers do), else inferred as 1.13 does (JSON, then
literals, then numbers, else the text). Step-3.5-Flash writes Qwen3-Coder's
`<tool_call><function=...>` form instead (its template): that is `qwen_xml`'s format.
"""

from __future__ import annotations

import re

from smg.parsers.toolcalls._framed import FramedToolParser
from smg.parsers.toolcalls._json import dumps
from smg.parsers.toolcalls._schema import param_types, tagged_arguments
from smg.parsers.types import ToolCall

SEP = "<｜tool_sep｜>"
_INVOKE = re.compile(r'\s*<steptml:invoke name="([^"]+)">(.*)</steptml:invoke>\s*', re.DOTALL)
_PARAM = re.compile(r'<steptml:parameter name="([^"]+)">(.*?)</steptml:parameter>', re.DOTALL)


class Step3ToolParser(FramedToolParser):
    name = "step3"
    section_begin = "<｜tool_calls_begin｜>"
    section_end = "<｜tool_calls_end｜>"
    call_begin = "<｜tool_call_begin｜>"
    call_end = "<｜tool_call_end｜>"

    def parse_call(self, body: str) -> ToolCall | None:
        kind, sep, rest = body.partition(SEP)
        invoke = _INVOKE.fullmatch(rest)
        if not sep or kind.strip() != "function" or invoke is None:
            return None
        name = invoke.group(1).strip()
        arguments = tagged_arguments(_PARAM, invoke.group(2), param_types(self.tools, name))
        if not name or arguments is None:
            return None
        return ToolCall(name, dumps(arguments))
