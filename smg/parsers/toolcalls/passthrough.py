"""`passthrough`: no tool-call parsing; the text is the answer's content."""

from __future__ import annotations

from smg.parsers.types import ToolCall, ToolParser


class PassthroughToolParser(ToolParser):
    name = "passthrough"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        return text, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        return "", []
