# ruff: noqa: RUF001, RUF002 - the markers are the models' own fullwidth tokens
"""DeepSeek V3 (`deepseek`) and V3.1 (`deepseek31`) tool calls.

V3 (the DeepSeek-V3 chat template; 1.13 crates/tool_parser/src/parsers/deepseek.rs):
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {...}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
V3.1 (deepseek-ai/DeepSeek-V3.1's template; 1.13 deepseek31.rs):
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
Arguments are JSON; a JSON value that is not an object is wrapped as {"value": v}, as
1.13 does. A call marker without the section marker is still a call (1.13 streams it).
"""

from __future__ import annotations

from smg.parsers.toolcalls._framed import FramedToolParser
from smg.parsers.toolcalls._json import dumps, strict_loads
from smg.parsers.types import ToolCall

SEP = "<｜tool▁sep｜>"


def json_arguments(raw: str) -> str | None:
    """Model-written JSON arguments -> vLLM's canonical JSON text of an object; None
    when the text is not strict JSON (NaN/Infinity included)."""
    try:
        value = strict_loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict):
        value = {"value": value}
    return dumps(value)


class _DeepSeekFrames(FramedToolParser):
    section_begin = "<｜tool▁calls▁begin｜>"
    section_end = "<｜tool▁calls▁end｜>"
    call_begin = "<｜tool▁call▁begin｜>"
    call_end = "<｜tool▁call▁end｜>"


class DeepSeekV3ToolParser(_DeepSeekFrames):
    name = "deepseek"

    def parse_call(self, body: str) -> ToolCall | None:
        kind, sep, rest = body.partition(SEP)
        if not sep or kind.strip() != "function":
            return None
        name, fence, args = rest.partition("\n```json\n")
        name = name.strip()
        args = args.rstrip()
        if not fence or not name or not args.endswith("```"):
            return None
        arguments = json_arguments(args[:-3])
        return None if arguments is None else ToolCall(name, arguments)


class DeepSeekV31ToolParser(_DeepSeekFrames):
    name = "deepseek31"

    def parse_call(self, body: str) -> ToolCall | None:
        name, sep, args = body.partition(SEP)
        name = name.strip()
        if not sep or not name:
            return None
        arguments = json_arguments(args)
        return None if arguments is None else ToolCall(name, arguments)
