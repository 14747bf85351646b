"""Output parsers for gRPC mode: the model's reasoning and tool-call syntax -> OpenAI's
`reasoning_content` and `tool_calls`. Pure code, text in and events out.

Public API: the vocabulary (`ToolCall`, `ToolParser`, `ReasoningParser`), one choice's
pipeline (`ChoiceParser`, `Parsed`, `parse_all`), and the registry's lookups."""

from smg.parsers.pipeline import ChoiceParser, Parsed, parse_all
from smg.parsers.registry import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    reasoning_parser_class,
    reasoning_parser_for_model,
    tool_parser_class,
    tool_parser_for_model,
)
from smg.parsers.types import ReasoningParser, ToolCall, ToolParser

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ChoiceParser",
    "Parsed",
    "ReasoningParser",
    "ToolCall",
    "ToolParser",
    "parse_all",
    "reasoning_parser_class",
    "reasoning_parser_for_model",
    "tool_parser_class",
    "tool_parser_for_model",
]
