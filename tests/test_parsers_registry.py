"""The parser registry: every name builds a parser, and model names choose as the Rust SMG."""

from __future__ import annotations

import pytest

from smg.parsers import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    ReasoningParser,
    ToolParser,
    reasoning_parser_class,
    reasoning_parser_for_model,
    tool_parser_class,
    tool_parser_for_model,
)


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_every_tool_parser_name_builds_a_parser(name: str) -> None:
    parser = tool_parser_class(name)([])
    assert isinstance(parser, ToolParser)
    assert parser.feed("plain words") == ("plain words", [])
    assert parser.finish() == ("", [])


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
def test_every_reasoning_parser_name_builds_a_parser(name: str) -> None:
    parser = reasoning_parser_class(name)(in_reasoning=False)
    assert isinstance(parser, ReasoningParser)
    assert parser.feed("plain words") == ("", "plain words")
    assert parser.finish() == ("", "")


def test_aliases_share_a_class() -> None:
    assert tool_parser_class("qwen_coder") is tool_parser_class("qwen_xml")
    assert reasoning_parser_class("minimax_m2") is reasoning_parser_class("minimax")


@pytest.mark.parametrize(
    ("model", "tool", "reasoning"),
    [
        ("Qwen/Qwen3-8B", "qwen", "qwen3"),
        ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen_xml", "qwen3"),
        (
            "Qwen/Qwen3-4B-Thinking-2507",
            "qwen",
            "qwen3",
        ),  # 1.13: "qwen3-thinking" is not a substring
        ("meta-llama/Llama-3.2-3B-Instruct", "llama", None),
        ("meta-llama/Llama-3.1-8B-Instruct", "json", None),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "pythonic", None),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", None),
        ("deepseek-ai/DeepSeek-V3-0324", "deepseek", None),
        ("deepseek-ai/DeepSeek-V3.1", "deepseek31", "deepseek_v31"),
        ("deepseek-ai/DeepSeek-V3.2-Exp", "deepseek31", None),
        ("deepseek-ai/DeepSeek-V3.2", "deepseek32", None),
        ("deepseek-ai/DeepSeek-R1", "pythonic", "deepseek_r1"),
        ("moonshotai/Kimi-K2-Instruct", "kimik2", "kimi"),
        ("moonshotai/Kimi-K2-Thinking", "kimik2", "kimi_thinking"),
        ("moonshotai/Kimi-K2.5", "kimik2", "kimi_k25"),
        ("zai-org/GLM-4.5-Air", "glm45_moe", None),
        ("zai-org/GLM-4.7", "glm47_moe", None),
        ("MiniMaxAI/MiniMax-M2", "minimax_m2", "minimax"),
        ("stepfun-ai/step3", "step3", "step3"),
        ("stepfun-ai/Step-3.5-Flash", "qwen_xml", "step3"),
        ("mock-model", None, None),
    ],
)
def test_model_names_choose_as_the_rust_smg(
    model: str, tool: str | None, reasoning: str | None
) -> None:
    assert tool_parser_for_model(model) == tool
    assert reasoning_parser_for_model(model) == reasoning
