"""`qwen_xml` / `qwen_coder`: Qwen3-Coder's XML calls (its chat template renders them):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

The call framing is the Hermes one (`hermes.TaggedToolParser`). Inside, as the Rust SMG
1.13: the first `<function=NAME>` names the call, every `<parameter=KEY>value</parameter>`
is an argument; a value is trimmed, then typed by the request's tool schema where it
declares a type the text fits (`_schema`: "3" is 3 for an integer, "3" for a string),
else inferred (JSON, True/False/None, numbers, else the text).
"""

from __future__ import annotations

import re

from smg.parsers.toolcalls._json import dumps
from smg.parsers.toolcalls._schema import param_types, typed_value
from smg.parsers.toolcalls.hermes import TaggedToolParser
from smg.parsers.types import ToolCall

_FUNCTION = re.compile(r"<function=([^>]+)>")
_PARAMETER = re.compile(r"<parameter=([^>]+)>(.*?)</parameter>", re.DOTALL)


class QwenXmlToolParser(TaggedToolParser):
    name = "qwen_xml"

    def parse_call(self, body: str) -> ToolCall | None:
        function = _FUNCTION.search(body)
        if function is None:
            return None
        name = function.group(1).strip()
        if not name:
            return None
        types = param_types(self.tools or (), name)
        arguments = {}
        for match in _PARAMETER.finditer(body, function.end()):
            key = match.group(1).strip()
            arguments[key] = typed_value(match.group(2).strip(), types.get(key))
        return ToolCall(name, dumps(arguments))
