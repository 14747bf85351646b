"""MiniMax M2 (`minimax_m2`) tool calls (MiniMaxAI/MiniMax-M2's template; 1.13
crates/tool_parser/src/parsers/minimax_m2.rs):

    <minimax:tool_call>
    <invoke name="NAME">
    <parameter name="p">v</parameter>
    </invoke>
    </minimax:tool_call>

Several `<invoke>` blocks may share one wrapper (parallel calls). Values are bare text:
XML entities decoded, then typed from the request's tool schema (`_schema`), else
inferred as 1.13 does (literals, then numbers, else the text). An `<invoke>` outside the
wrapper is text.
"""

from __future__ import annotations

import re

from smg.parsers.toolcalls._framed import FramedToolParser, invoke_head
from smg.parsers.toolcalls._json import dumps
from smg.parsers.toolcalls._schema import (
    infer_scalar,
    param_types,
    tagged_arguments,
)
from smg.parsers.types import ToolCall

_PARAM = re.compile(r'<parameter\s+name="([^"]+)"\s*>(.*?)</parameter>', re.DOTALL)
_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&"))


def decode_entities(text: str) -> str:
    if "&" not in text:
        return text
    for entity, char in _ENTITIES:  # &amp; last: "&amp;lt;" is the text "&lt;"
        text = text.replace(entity, char)
    return text


class MinimaxM2ToolParser(FramedToolParser):
    name = "minimax_m2"
    section_begin = "<minimax:tool_call>"
    section_end = "</minimax:tool_call>"
    call_begin = "<invoke name="
    call_end = "</invoke>"
    bare_calls = False

    def parse_call(self, body: str) -> ToolCall | None:
        head = invoke_head(body)
        if head is None:
            return None
        name, params = head
        arguments = tagged_arguments(
            _PARAM,
            params,
            param_types(self.tools, name),
            value=decode_entities,
            infer=infer_scalar,
        )
        if not name or arguments is None:
            return None
        return ToolCall(name, dumps(arguments))
