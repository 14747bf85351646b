"""The one registry of output parsers: names (the Rust SMG 1.13's `--tool-call-parser` and
`--reasoning-parser` names and aliases), the classes behind them, and the model-name
patterns that choose one when no flag or worker label names it.

Classes are imported on first use, so `smg.config` can read the names without importing
any parser. The model patterns are the Rust SMG's (crates/tool_parser/src/factory.rs,
crates/reasoning_parser/src/factory.rs): facts, kept in one place here.
"""

from __future__ import annotations

import importlib
from functools import cache

from smg.parsers.types import ReasoningParser, ToolParser

_T = "smg.parsers.toolcalls."
_R = "smg.parsers.reasoning."

# name -> "module:Class". Aliases are extra names for one class (as in 1.13).
TOOL_PARSERS: dict[str, str] = {
    "passthrough": _T + "passthrough:PassthroughToolParser",
    "json": _T + "json_calls:JsonToolParser",
    "llama": _T + "json_calls:LlamaToolParser",
    "pythonic": _T + "pythonic:PythonicToolParser",
    "qwen": _T + "hermes:QwenToolParser",
    "qwen_xml": _T + "qwen_xml:QwenXmlToolParser",
    "qwen_coder": _T + "qwen_xml:QwenXmlToolParser",
    "mistral": _T + "mistral:MistralToolParser",
    "deepseek": _T + "deepseek:DeepSeekV3ToolParser",
    "deepseek31": _T + "deepseek:DeepSeekV31ToolParser",
    "deepseek32": _T + "deepseek_dsml:DeepSeekV32ToolParser",
    "kimik2": _T + "kimik2:KimiK2ToolParser",
    "glm45_moe": _T + "glm:Glm45ToolParser",
    "glm47_moe": _T + "glm:Glm47ToolParser",
    "minimax_m2": _T + "minimax_m2:MinimaxM2ToolParser",
    "step3": _T + "step3:Step3ToolParser",
}

REASONING_PARSERS: dict[str, str] = {
    "passthrough": _R + "tags:PassthroughReasoningParser",
    "base": _R + "tags:BaseReasoningParser",
    "deepseek_r1": _R + "tags:DeepSeekR1ReasoningParser",
    "deepseek_v31": _R + "tags:DeepSeekV31ReasoningParser",
    "qwen3": _R + "tags:Qwen3ReasoningParser",
    "qwen3_thinking": _R + "tags:Qwen3ThinkingReasoningParser",
    "kimi": _R + "tags:KimiReasoningParser",
    "kimi_k25": _R + "tags:KimiK25ReasoningParser",
    "kimi_thinking": _R + "tags:KimiThinkingReasoningParser",
    "glm45": _R + "tags:Glm45ReasoningParser",
    "step3": _R + "tags:Step3ReasoningParser",
    "minimax": _R + "tags:MinimaxReasoningParser",
    "minimax_m2": _R + "tags:MinimaxReasoningParser",
}

# (pattern, parser). A pattern ending in "*" matches a model name containing its stem,
# case-insensitively; the longest matching stem wins; an exact name match wins first.
TOOL_MODEL_PATTERNS: tuple[tuple[str, str], ...] = (
    ("gpt-4*", "json"),
    ("gpt-3.5*", "json"),
    ("gpt-4o*", "json"),
    ("claude-*", "json"),
    ("mistral-*", "mistral"),
    ("mixtral-*", "mistral"),
    ("Qwen/Qwen3.5*", "qwen_xml"),
    ("Qwen3.5*", "qwen_xml"),
    ("Qwen/Qwen3-Coder*", "qwen_xml"),
    ("Qwen3-Coder*", "qwen_xml"),
    ("qwen*", "qwen"),
    ("llama-4*", "pythonic"),
    ("meta-llama-4*", "pythonic"),
    ("llama-3.2*", "llama"),
    ("meta-llama-3.2*", "llama"),
    ("llama-*", "json"),
    ("meta-llama-*", "json"),
    ("deepseek-v3*", "deepseek"),
    ("deepseek-ai/DeepSeek-V3*", "deepseek"),
    ("deepseek-v3.1*", "deepseek31"),
    ("deepseek-ai/DeepSeek-V3.1*", "deepseek31"),
    ("deepseek-v3.2-exp*", "deepseek31"),
    ("deepseek-ai/DeepSeek-V3.2-Exp*", "deepseek31"),
    ("deepseek-v3.2*", "deepseek32"),
    ("deepseek-ai/DeepSeek-V3.2*", "deepseek32"),
    ("deepseek-*", "pythonic"),
    ("glm-4.5*", "glm45_moe"),
    ("glm-4.6*", "glm45_moe"),
    ("glm-4.7*", "glm47_moe"),
    ("glm-5*", "glm47_moe"),
    ("glm-*", "json"),
    ("step3*", "step3"),
    ("Step-3*", "step3"),
    # Not in 1.13 (which sends Step-3.5 to `step3`, whose steptml form it does not write):
    # Step-3.5-Flash's template and vLLM's step3p5 parser use Qwen3-Coder's XML calls.
    ("Step-3.5*", "qwen_xml"),
    ("kimi-k2*", "kimik2"),
    ("moonshot*/Kimi-K2*", "kimik2"),
    ("minimax*", "minimax_m2"),
    ("gemini-*", "json"),
    ("palm-*", "json"),
    ("gemma-*", "json"),
)

# (substring, parser), matched case-insensitively in this order: the first match wins.
REASONING_MODEL_PATTERNS: tuple[tuple[str, str], ...] = (
    ("deepseek-r1", "deepseek_r1"),
    ("deepseek-v3.1", "deepseek_v31"),
    ("deepseek-v3-1", "deepseek_v31"),
    ("qwen3-thinking", "qwen3_thinking"),
    ("qwen-thinking", "qwen3_thinking"),
    ("qwen3", "qwen3"),
    ("qwen", "qwen3"),
    ("glm45", "glm45"),
    ("glm47", "glm45"),
    ("glm-5", "glm45"),
    ("kimi-k2-thinking", "kimi_thinking"),
    ("kimi-k2.5", "kimi_k25"),
    ("kimi", "kimi"),
    ("step3", "step3"),
    ("step-3", "step3"),  # not in 1.13: "stepfun-ai/Step-3.5-Flash" reasons as step3
    ("minimax", "minimax"),
    ("mm-m2", "minimax"),
)


def _load(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@cache
def tool_parser_class(name: str) -> type[ToolParser]:
    return _load(TOOL_PARSERS[name])


@cache
def reasoning_parser_class(name: str) -> type[ReasoningParser]:
    return _load(REASONING_PARSERS[name])


@cache
def tool_parser_for_model(model: str) -> str | None:
    """The Rust SMG's model -> tool parser mapping; None when no pattern matches."""
    lower = model.lower()
    best: tuple[int, str] | None = None
    for pattern, parser in TOOL_MODEL_PATTERNS:
        if pattern.lower() == lower:
            return parser
        stem = pattern[:-1].lower() if pattern.endswith("*") else None
        if stem is None:
            continue
        if "*" in stem:  # "moonshot*/Kimi-K2*": both parts, in order
            head, _, tail = stem.partition("*")
            at = lower.find(head)
            hit = at >= 0 and lower.find(tail, at + len(head)) >= 0
        else:
            hit = stem in lower
        if hit and (best is None or len(stem) > best[0]):
            best = (len(stem), parser)
    return best[1] if best else None


@cache
def reasoning_parser_for_model(model: str) -> str | None:
    lower = model.lower()
    for pattern, parser in REASONING_MODEL_PATTERNS:
        if pattern in lower:
            return parser
    return None
