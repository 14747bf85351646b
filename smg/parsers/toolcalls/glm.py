"""GLM-4.5/4.6 (`glm45_moe`) and GLM-4.7 (`glm47_moe`) tool calls (zai-org's templates;
1.13 crates/tool_parser/src/parsers/glm4_moe.rs):

    4.5/4.6: <tool_call>NAME\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n...</tool_call>
    4.7:     <tool_call>NAME<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>

Values are bare text, typed from the request's tool schema (`_schema`), else inferred
(JSON, then literals, then numbers, else the text), trimmed as 1.13 does. The 4.5 name
is the first line (1.13's regex needs the newline); the 4.7 name runs to the first tag
or whitespace. Text inside a call that is not an argument pair makes the call malformed
(1.13 ignores it; here the call comes back as content, never half-read).
"""

from __future__ import annotations

import re

from smg.parsers.toolcalls._framed import FramedToolParser
from smg.parsers.toolcalls._json import dumps
from smg.parsers.toolcalls._schema import param_types, tagged_arguments
from smg.parsers.types import ToolCall

_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_NAME_47 = re.compile(r"\s*([^<\s]+)", re.DOTALL)


class _GlmToolParser(FramedToolParser):
    call_begin = "<tool_call>"
    call_end = "</tool_call>"

    def split_name(self, body: str) -> tuple[str, str] | None:
        raise NotImplementedError

    def parse_call(self, body: str) -> ToolCall | None:
        split = self.split_name(body)
        if split is None:
            return None
        name, args = split
        arguments = tagged_arguments(_PAIR, args, param_types(self.tools, name))
        return None if arguments is None else ToolCall(name, dumps(arguments))


class Glm45ToolParser(_GlmToolParser):
    name = "glm45_moe"

    def split_name(self, body: str) -> tuple[str, str] | None:
        name, newline, args = body.partition("\n")
        name = name.strip()
        return (name, args) if newline and name else None


class Glm47ToolParser(_GlmToolParser):
    name = "glm47_moe"

    def split_name(self, body: str) -> tuple[str, str] | None:
        match = _NAME_47.match(body)
        return (match.group(1), body[match.end() :]) if match else None
