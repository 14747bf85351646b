"""The vocabulary every output parser speaks (pure; no I/O).

In gRPC mode the gateway sees the model's raw text, so it turns the model's own syntax
into OpenAI fields: a reasoning parser splits `reasoning_content` from the answer, a
tool parser turns the answer's tool-call syntax into `tool_calls`. Each parser is a
small state machine fed text pieces as the detokenizer produces them; it returns what
is certain so far and holds back only what might still become a marker.

Contract (tested for every parser by `tests/parserutil.py`):
- Split invariance: feeding a text in one piece, one character at a time, or in any
  other split, then `finish()`, gives the same concatenated output.
- A tool call is emitted whole, once its closing syntax has arrived and its arguments
  parsed: a client never receives half a call it cannot execute, and a malformed or
  truncated call comes back as content text (at `finish()` at the latest). The stream
  writer still sends it the way OpenAI streams calls (name first, then arguments).
- Nothing raises on any input; nothing is lost: every character of the input is in the
  output as content, reasoning, or inside a call's syntax.
- The common case is cheap: a piece with no character that can start a marker, while
  nothing is held, is returned as it is without copying the text seen so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete call. `arguments` is the JSON text of an object (`json.dumps(value,
    ensure_ascii=False)` for formats whose arguments are not JSON text already, such as
    XML parameters or Python keyword arguments). `id`: the call id the model wrote
    itself, where its format has one (Kimi K2's `functions.NAME:IDX`, which its clients
    and chat template read back); None lets the writer make one."""

    name: str
    arguments: str
    id: str | None = None


class ToolParser:
    """Model text -> (content, complete tool calls). Subclasses set `name` and
    implement `feed` and `finish`. `tools` are the request's OpenAI `tools` (a list of
    {"type": "function", "function": {"name", "parameters", ...}}): formats whose
    arguments are untyped text (XML parameters) read the parameter types from them."""

    name: str = ""

    def __init__(self, tools: Sequence[dict] = ()) -> None:
        self.tools = tools

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content that is certain now, and the calls completed by this piece."""
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of output: whatever is still held (an unfinished call -> content text)."""
        raise NotImplementedError


class ReasoningParser:
    """Model text -> (reasoning, content). `in_reasoning`: whether the output starts
    inside the reasoning block (the prompt already opened it: the chat template wrote
    the opening tag, or the model always reasons first); None keeps the parser's own
    default for its family."""

    name: str = ""

    def __init__(self, *, in_reasoning: bool | None = None) -> None:
        self.in_reasoning_at_start = in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that is certain after this piece."""
        raise NotImplementedError

    def finish(self) -> tuple[str, str]:
        """End of output: what is still held (an unclosed reasoning block stays reasoning)."""
        raise NotImplementedError


def held_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (the
    longest proper prefix of the marker that `text` ends with): a parser holds those
    back until the next piece says whether the marker follows."""
    if not text or not marker:
        return 0
    first = marker[0]
    longest = min(len(text), len(marker) - 1)
    for size in range(longest, 0, -1):
        if text[-size] == first and marker.startswith(text[-size:]):
            return size
    return 0


def held_suffix_any(text: str, markers: Sequence[str]) -> int:
    """`held_suffix` for several markers: the longest hold any of them needs."""
    return max((held_suffix(text, m) for m in markers), default=0)
