"""Whether a request's output starts inside the reasoning block (pure).

A chat template with a thinking toggle (Qwen3's `enable_thinking`, DeepSeek-V3.1's and
Kimi-K2.5's `thinking`) decides per request whether the model reasons first; the
reasoning parser must then start inside the block even though the model may never write
the start tag. The rules are the Rust SMG 1.13's: `detect_thinking_toggle`
(crates/tokenizer/src/chat_template.rs), `should_mark_reasoning_started` and
`resolve_user_thinking` (model_gateway/src/routers/grpc/utils/parsers.rs), and
`thinking_from_reasoning_effort` (crates/protocols/src/chat.rs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NONE = "none"
DEFAULT_ON = "default_on"
DEFAULT_OFF = "default_off"

# Substrings that show the template reads a `thinking` variable; the trailing space or
# operator keeps `thinking_mode`, `thinking_budget` and the like from matching (1.13's list).
_THINKING_VAR = ("if thinking ", "thinking is ", "thinking ==", "set thinking ")


def detect_thinking_toggle(template_source: str) -> tuple[str, str | None]:
    """(toggle, key): "none" with no key when the template has no thinking switch;
    otherwise whether thinking is on unless the request says otherwise, and the kwarg
    name the template reads ("enable_thinking" wins when both appear)."""
    has_enable = "enable_thinking" in template_source
    has_thinking = any(s in template_source for s in _THINKING_VAR)
    if not has_enable and not has_thinking:
        return NONE, None
    key = "enable_thinking" if has_enable else "thinking"
    # DeepSeek-V3.1: {% if not thinking is defined %}{% set thinking = false %}. Either
    # variable's explicit false default turns the toggle off by default (1.13 checks both
    # spellings whatever the key).
    for off in (
        "set thinking = false",
        "set thinking=false",
        "set enable_thinking = false",
        "set enable_thinking=false",
    ):
        if off in template_source:
            return DEFAULT_OFF, key
    return DEFAULT_ON, key


def thinking_from_reasoning_effort(reasoning_effort: str | None) -> bool | None:
    """OpenAI's `reasoning_effort` as a thinking switch: "none" and "minimal" turn it
    off (a boolean toggle cannot reason "a little"); a level has no say."""
    if reasoning_effort in ("none", "minimal"):
        return False
    return None


def user_thinking(
    key: str | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    reasoning_effort: str | None,
) -> bool | None:
    """The request's wish: a JSON boolean under the template's own key wins (another key
    is ignored, as the template ignores it), then `reasoning_effort`; None: no wish."""
    if key is not None and chat_template_kwargs:
        value = chat_template_kwargs.get(key)
        if isinstance(value, bool):
            return value
    return thinking_from_reasoning_effort(reasoning_effort)


def starts_in_reasoning(
    toggle: str,
    key: str | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    reasoning_effort: str | None,
) -> bool | None:
    """The parser's `in_reasoning`: None when the template has no toggle (the family's
    own default decides), else whether thinking is effectively on for this request.

    1.13 only ever marks a parser started; when thinking is off it leaves the family's
    default, so a family that starts inside reasoning would read the answer of a
    thinking-off request as reasoning. Here off is False: the template closed (or never
    opened) the block, so the output is content."""
    if toggle == NONE:
        return None
    wish = user_thinking(key, chat_template_kwargs, reasoning_effort)
    if toggle == DEFAULT_ON:
        return wish is not False
    return wish is True
