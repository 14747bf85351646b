"""`qwen`: Hermes-style calls, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(Qwen2.5 / Qwen3 chat templates render exactly this, one block per call, "\\n" between).

`TaggedToolParser` frames each call in `<tool_call>`...`</tool_call>` with no section
around the run (qwen_xml reuses it with another body syntax); the framing rules are
`FramedToolParser`'s, as for every marker-framed family: text outside a call is content,
verbatim up to the opening tag (as the Rust SMG and vLLM: "Let me check.\\n<tool_call>..."
gives content "Let me check.\\n"); a body that does not parse, or a call never closed, is
content, tags included; whitespace between calls and after the last one is layout.
"""

from __future__ import annotations

from smg.parsers.toolcalls._framed import FramedToolParser
from smg.parsers.toolcalls._json import call_from_object, load
from smg.parsers.types import ToolCall


class TaggedToolParser(FramedToolParser):
    """Each call wrapped in `<tool_call>` ... `</tool_call>`, no section around the run."""

    call_begin = "<tool_call>"
    call_end = "</tool_call>"


class QwenToolParser(TaggedToolParser):
    name = "qwen"

    def parse_call(self, body: str) -> ToolCall | None:
        return call_from_object(load(body.strip()), ("arguments", "parameters"), self.names)
