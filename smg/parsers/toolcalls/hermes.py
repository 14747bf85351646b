"""`qwen`: Hermes-style calls, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(Qwen2.5 / Qwen3 chat templates render exactly this, one block per call, "\\n" between).

`TaggedToolParser` is the machine for every format that wraps each call in an opening
and a closing tag (qwen_xml reuses it with another body syntax):
- text outside a call is content, verbatim up to the opening tag (as the Rust SMG and
  vLLM: "Let me check.\\n<tool_call>..." gives content "Let me check.\\n");
- a call is the text between the opening tag and the first closing tag after it (the
  Rust SMG's and vLLM's non-greedy match); a body that does not parse into a call, or
  an opening tag never closed, comes back as content text, tags included;
- whitespace between two calls and after the last one is call syntax (dropped); other
  text after a call is content, with the whitespace in front of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from smg.parsers.toolcalls._json import call_from_object, load, tool_names
from smg.parsers.types import ToolCall, ToolParser, held_suffix

_CONTENT, _CALL, _AFTER = 0, 1, 2


class TaggedToolParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"

    def __init__(self, tools: Sequence[dict] = ()) -> None:
        super().__init__(tools)
        self.names = tool_names(tools)
        self._buf = ""  # text not yet decided: a possible tag prefix, a call, held whitespace
        self._state = _CONTENT
        self._scan = 0  # in a call: where in _buf to look for the closing tag next
        self._lead = ""  # whitespace between two calls: content if the second fails

    def parse_body(self, body: str) -> ToolCall | None:
        """The text between the tags -> a call, or None (then it is content)."""
        raise NotImplementedError

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if not text:
            return "", []
        state = self._state
        if state == _CONTENT:
            if not self._buf and self.start[0] not in text:
                return text, []
        elif state == _CALL:
            # Inside a call, a piece that cannot begin or finish the closing tag only
            # grows the call (the tag's first character is in neither it nor the tail).
            buf, end = self._buf, self.end
            if end[0] not in text and end[0] not in buf[1 - len(end) :]:
                self._buf = buf = buf + text
                self._scan = len(buf) - len(end) + 1
                return "", []
        return self._run(self._buf + text, final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._run(self._buf, final=True)

    def _run(self, buf: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        start, end = self.start, self.end
        out: list[str] = []
        calls: list[ToolCall] = []
        n = len(buf)
        pos = 0
        state = self._state
        scan = self._scan
        while pos < n:
            if state == _CONTENT:
                i = buf.find(start, pos)
                if i < 0:
                    keep = 0 if final else min(held_suffix(buf, start), n - pos)
                    out.append(buf[pos : n - keep])
                    pos = n - keep
                    break
                out.append(buf[pos:i])
                pos, state, scan = i, _CALL, i + len(start)
            elif state == _CALL:
                j = buf.find(end, scan)
                if j < 0:
                    if final:  # an unclosed call: content
                        out.append(self._lead + buf[pos:])
                        pos, state = n, _CONTENT
                    else:
                        scan = max(scan, n - len(end) + 1)
                    break
                stop = j + len(end)
                call = self.parse_body(buf[pos + len(start) : j])
                if call is None:
                    out.append(self._lead + buf[pos:stop])
                    state = _CONTENT
                else:
                    calls.append(call)
                    state = _AFTER
                pos, self._lead = stop, ""
            else:  # _AFTER: whitespace after a call is held until what follows is known
                k = pos
                while k < n and buf[k].isspace():
                    k += 1
                if k == n:
                    if final:
                        pos = n
                    break
                if buf.startswith(start, k):
                    self._lead, pos, state, scan = buf[pos:k], k, _CALL, k + len(start)
                elif not final and n - k < len(start) and start.startswith(buf[k:]):
                    break
                else:
                    state = _CONTENT
        self._buf = buf[pos:]
        self._state = state
        self._scan = scan - pos
        return "".join(out), calls


class QwenToolParser(TaggedToolParser):
    name = "qwen"

    def parse_body(self, body: str) -> ToolCall | None:
        return call_from_object(load(body.strip()), ("arguments", "parameters"), self.names)
