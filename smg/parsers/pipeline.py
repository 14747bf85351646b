"""One choice's output parsing: reasoning first, then tool calls in what is left.

Pure. The response stage makes one `ChoiceParser` per choice and feeds it the text
deltas the detokenizer and stop matcher produce; the result of every feed is what the
stream writer sends (a `reasoning_content` delta, a `content` delta, whole tool calls),
and a complete answer is the concatenation of them (`parse_all`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from smg.parsers.types import ReasoningParser, ToolCall, ToolParser

# `step`'s calls when a piece completed none: one shared empty tuple, nothing made per token.
_NO_CALLS: tuple[ToolCall, ...] = ()


@dataclass(slots=True)
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def extend(self, other: Parsed) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls.extend(other.calls)


class ChoiceParser:
    __slots__ = ("_reasoning", "_reasoning_feed", "_tools", "_tools_feed")

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self._reasoning = reasoning
        self._tools = tools
        # Bound once: `step` runs per token, and a bound method per call is measurable.
        self._reasoning_feed = reasoning.feed if reasoning is not None else None
        self._tools_feed = tools.feed if tools is not None else None

    def feed(self, text: str) -> Parsed:
        reasoning, content, calls = self.step(text)
        return Parsed(reasoning, content, list(calls))

    def step(self, text: str) -> tuple[str, str, Sequence[ToolCall]]:
        """`feed` as a (reasoning, content, calls) tuple: the streaming per-token path,
        which makes no `Parsed`, and no list while a piece completes no call. A piece the
        reasoning parser keeps whole (inside `<think>`) never reaches the tool parser."""
        if not text:
            return "", "", _NO_CALLS
        feed = self._reasoning_feed
        if feed is None:
            reasoning = ""
        else:
            reasoning, text = feed(text)
        feed = self._tools_feed
        if feed is None or not text:
            return reasoning, text, _NO_CALLS
        content, calls = feed(text)
        return reasoning, content, calls

    def finish(self) -> Parsed:
        reasoning, text = self._reasoning.finish() if self._reasoning is not None else ("", "")
        tools = self._tools
        if tools is None:
            return Parsed(reasoning, text)
        content, calls = tools.feed(text) if text else ("", [])
        more, more_calls = tools.finish()
        return Parsed(reasoning, content + more, calls + more_calls)


def parse_all(parser: ChoiceParser, text: str) -> Parsed:
    """The complete-answer parse: the whole text, then the end."""
    result = parser.feed(text)
    result.extend(parser.finish())
    return result
