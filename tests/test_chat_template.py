"""smg.chat edge behaviour, pure: errors, the sandbox, HF's globals and filters, the
continue_final_message rule, content-format detection, message normalization, choosing and
loading templates. (Equality with transformers on real templates:
tests/test_chat_template_conformance.py.)"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smg.chat.template as template_module
from smg.chat import (
    ChatTemplate,
    TemplateError,
    detect_content_format,
    load_template_file,
    normalize_messages,
    normalize_tools,
    select_template,
)

SIMPLE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [{"role": "user", "content": "hi"}]


def render(source: str, messages: list[dict] | None = None, **kw: object) -> str:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(
        CHAT if messages is None else messages, **kw
    )


# --- errors ---------------------------------------------------------------------------------


def test_raise_exception_is_template_error_with_the_templates_message() -> None:
    t = ChatTemplate(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first!') }}{% endif %}"
    )
    with pytest.raises(TemplateError) as exc:
        t.render(CHAT)
    assert str(exc.value) == "System first!"
    assert isinstance(exc.value, ValueError)


def test_syntax_error_at_construction() -> None:
    with pytest.raises(TemplateError) as exc:
        ChatTemplate("{% for m in messages %}{{ m.content }}")
    assert str(exc.value).startswith("chat template syntax error (line 1): ")
    assert "endfor" in str(exc.value)


def test_render_failure_is_template_error() -> None:
    # A template that breaks on this input (str + list) answers 400, not a crash.
    with pytest.raises(TemplateError) as exc:
        render("{{ messages[0]['content'] + [1] }}")
    assert str(exc.value).startswith("chat template failed: TypeError: ")


def test_undefined_is_lenient_like_transformers() -> None:
    # jinja's default Undefined: a missing key renders as nothing.
    assert render("[{{ messages[0]['missing'] }}][{{ nothing }}]") == "[][]"


def test_empty_conversation_refused() -> None:
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(SIMPLE).render([])
    assert str(exc.value) == "Cannot apply chat template to an empty conversation."


def test_non_string_source_refused() -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(["not", "a", "template"])  # type: ignore[arg-type]


# --- the sandbox ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__['json'] }}",
        "{{ strftime_now.__globals__.keys() | list }}",
        "{{ (messages|first).__class__.__init__.__globals__ }}",
        "{{ dict.__call__.__globals__ }}",
    ],
)
def test_sandbox_blocks_dunder_escapes(source: str) -> None:
    with pytest.raises(TemplateError) as exc:
        render(source)
    assert "unsafe" in str(exc.value)


def test_sandbox_dunder_attribute_renders_nothing() -> None:
    # The attribute itself is an unsafe Undefined: it never yields the class object.
    assert render("[{{ ''.__class__ }}]") == "[]"


def test_immutable_sandbox_refuses_mutating_inputs() -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError) as exc:
        render("{% set _ = messages.append({'role': 'x'}) %}", messages)
    assert "unsafe" in str(exc.value)
    assert messages == [{"role": "user", "content": "hi"}]


def test_namespace_refuses_underscore_names() -> None:
    with pytest.raises(TemplateError) as exc:
        render("{% set ns = namespace(_x=1) %}")
    assert "underscore-prefixed" in str(exc.value)
    with pytest.raises(TemplateError):
        render("{% set ns = namespace() %}{% set ns.__dict__ = 1 %}")
    assert render("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}") == "2"


def test_dict_global_builds_dicts() -> None:
    assert render("{{ dict(a=1) | tojson }}|{{ dict.fromkeys(['x'], 0) | tojson }}") == (
        '{"a": 1}|{"x": 0}'
    )


# --- Hugging Face globals, filters and options ----------------------------------------------


def test_tojson_is_transformers_json_dumps() -> None:
    value = {"b": "<b>&'\"é東京", "a": [1, 2]}
    assert render("{{ v | tojson }}", kwargs={"v": value}) == json.dumps(value, ensure_ascii=False)
    assert render("{{ v | tojson(indent=2) }}", kwargs={"v": value}) == json.dumps(
        value, ensure_ascii=False, indent=2
    )
    assert render("{{ v | tojson(sort_keys=true) }}", kwargs={"v": value}) == json.dumps(
        value, ensure_ascii=False, sort_keys=True
    )
    assert render("{{ v | tojson(separators=(',', ':')) }}", kwargs={"v": value}) == json.dumps(
        value, ensure_ascii=False, separators=(",", ":")
    )
    assert render("{{ v | tojson(ensure_ascii=true) }}", kwargs={"v": value}) == json.dumps(value)


_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=4) | st.integers(0, 3) | st.booleans(), inner, max_size=4
        )
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_VALUES, min_size=1, max_size=6), st.sampled_from([None, 2, 4, "  "]))
def test_tojson_with_an_indent_is_json_dumps_memo_or_not(values: list, indent: object) -> None:
    """The indented tojson is memoized by the value's compact JSON: each value, asked
    twice and after values that differ only where compact JSON tells them apart (1, 1.0,
    True; NaN and None; key order; int and str keys, which sort differently), renders
    exactly as json.dumps, or raises as it does."""
    tricky = [1, 1.0, True, None, float("nan"), {"a": 1, "b": 2}, {2: 0, 10: 0}, {"2": 0, "10": 0}]
    tricky += [{"": None, "0": None}, {"": None, 0: None}]
    for value in [*values, *values, *tricky, *tricky]:
        for sort_keys in (False, True):
            try:
                expected = json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)
            except TypeError:  # keys of mixed types cannot be sorted
                with pytest.raises(TypeError):
                    template_module._tojson(value, indent=indent, sort_keys=sort_keys)
                continue
            got = template_module._tojson(value, indent=indent, sort_keys=sort_keys)
            assert got == expected
    assert template_module._tojson({"b": 1, "a": 2}, indent=2) == '{\n  "b": 1,\n  "a": 2\n}'
    assert template_module._tojson({"a": 2, "b": 1}, indent=2) == '{\n  "a": 2,\n  "b": 1\n}'


def test_tojson_errors_are_json_dumps_errors() -> None:
    loop: list = []
    loop.append(loop)
    for bad in (loop, {("a",): 1}, {1j}):
        with pytest.raises((TypeError, ValueError)) as want:
            json.dumps(bad, indent=4)
        with pytest.raises(want.type):
            template_module._tojson(bad, indent=4)
    # Unhashable arguments are not memoized, and still answered.
    assert template_module._tojson([1], indent=1, separators=[",", ": "]) == "[\n 1\n]"


def test_strftime_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_module, "_now", lambda: datetime(2026, 7, 4, 9, 30))
    assert render('{{ strftime_now("%d %b %Y") }}') == "04 Jul 2026"


def test_generation_tag_renders_its_body() -> None:
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "[{{ m.content }}|{{ loop.index }}]{% endgeneration %}{% else %}({{ m.content }}){% endif %}"
        "{% endfor %}"
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert render(source, msgs) == "(q)[a|2]"


def test_loopcontrols() -> None:
    source = "{% for i in [1, 2, 3, 4] %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render(source) == "13"


def test_trim_blocks_and_lstrip_blocks() -> None:
    source = "A\n    {% if true %}\nB\n    {% endif %}\nC\n"
    # lstrip_blocks removes the indentation before a block tag, trim_blocks the newline after
    # it; the file's final newline is dropped (keep_trailing_newline is off, as in HF).
    assert render(source) == "A\nB\nC"


def test_template_variables() -> None:
    source = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ tools | length if tools else 0 }}|{{ documents[0].title if documents else '-' }}"
        "|{{ add_generation_prompt }}|{{ enable_thinking }}"
    )
    t = ChatTemplate(source)
    assert t.render(CHAT) == "hi0|-|True|"
    assert (
        t.render(
            CHAT,
            tools=[{"type": "function", "function": {"name": "f"}}],
            documents=[{"title": "Doc", "text": "t"}],
            add_generation_prompt=False,
            kwargs={"enable_thinking": False},
        )
        == "hi1|Doc|False|False"
    )


def test_special_tokens_and_kwargs_override() -> None:
    source = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ bos_token is defined }}"
    t = ChatTemplate(
        source, bos_token="<s>", eos_token="</s>", special_tokens={"unk_token": "<unk>"}
    )
    assert t.render(CHAT) == "<s>|</s>|<unk>|True"
    # kwargs come after the special tokens, as {**special_tokens_map, **kwargs} in transformers.
    assert t.render(CHAT, kwargs={"bos_token": "B"}) == "B|</s>|<unk>|True"
    # A tokenizer without a BOS token: the name stays undefined.
    assert ChatTemplate(source, bos_token=None, eos_token="</s>").render(CHAT) == "|</s>||False"


def test_tools_and_documents_must_be_objects() -> None:
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(SIMPLE).render(CHAT, tools=["get_weather"])  # type: ignore[list-item]
    assert str(exc.value) == "Tools should be JSON schemas (objects)."
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(SIMPLE).render(CHAT, documents=["text"])  # type: ignore[list-item]
    assert str(exc.value) == "Documents should be a list of dicts with 'title' and 'text' keys!"


@pytest.mark.parametrize("key", ["messages", "tools", "add_generation_prompt", "chat_template"])
def test_reserved_kwargs_refused(key: str) -> None:
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(SIMPLE).render(CHAT, kwargs={key: 1})
    assert str(exc.value) == f"chat_template_kwargs may not set {key}"


def test_none_keys_dropped_and_reasoning_aliased() -> None:
    source = (
        "{% for m in messages %}{{ m.role }}:{{ 'content' in m }}:{{ m.reasoning_content }}"
        ":{{ m.thinking }};{% endfor %}"
    )
    messages = [
        {"role": "user", "content": None},
        {"role": "assistant", "content": "x", "reasoning": "r1"},
        {"role": "assistant", "content": "y", "reasoning_content": "r2", "thinking": "t2"},
    ]
    before = copy.deepcopy(messages)
    assert render(source, messages) == "user:False::;assistant:True:r1:r1;assistant:True:r2:t2;"
    assert messages == before


# --- continue_final_message -------------------------------------------------------------------


CONT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_continue_final_message_cuts_after_the_content() -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is "}]
    t = ChatTemplate(CONT)
    out = t.render(msgs, add_generation_prompt=False, continue_final_message=True)
    assert out == "<|user|>q<|end|><|assistant|>The answer is "
    assert msgs[1]["content"] == "The answer is "


def test_continue_final_message_trimmed_by_template() -> None:
    # A template that trims content loses the trailing space: the text is cut and rstripped.
    source = "{% for m in messages %}[{{ m.content | trim }}]{% endfor %}"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure "}]
    out = ChatTemplate(source).render(
        msgs, add_generation_prompt=False, continue_final_message=True
    )
    assert out == "[q][Sure"


def test_continue_final_message_list_content_uses_last_text_block() -> None:
    source = "{% for m in messages %}{% for p in m.content %}{{ p.text }}/{% endfor %}{% endfor %}"
    msgs = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        }
    ]
    out = ChatTemplate(source).render(
        msgs, add_generation_prompt=False, continue_final_message=True
    )
    assert out == "a/b"
    assert msgs[0]["content"][1]["text"] == "b"


def test_continue_final_message_with_generation_prompt_refused() -> None:
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(CONT).render(CHAT, add_generation_prompt=True, continue_final_message=True)
    assert "continue_final_message and add_generation_prompt are not compatible" in str(exc.value)


def test_continue_final_message_dropped_by_template_refused() -> None:
    source = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "dropped"}]
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(source).render(msgs, add_generation_prompt=False, continue_final_message=True)
    assert "does not appear in the chat" in str(exc.value)


def test_continue_final_message_needs_content() -> None:
    msgs = [{"role": "assistant", "content": None}]
    with pytest.raises(TemplateError) as exc:
        ChatTemplate(CONT).render(msgs, add_generation_prompt=False, continue_final_message=True)
    assert 'no "content" to continue' in str(exc.value)
    with pytest.raises(TemplateError) as exc:
        ChatTemplate("{{ messages | length }}").render(
            [{"role": "assistant", "content": "x"}],
            add_generation_prompt=False,
            continue_final_message=True,
        )
    assert "not an accepted field" in str(exc.value)


# --- content format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
        ("{% for m in messages %}{{ m.content | trim }}{% endfor %}", "string"),
        ("{% for m in messages %}{% if m.content[0] == '$' %}${% endif %}{% endfor %}", "string"),
        ("{% for m in messages %}{{ m.content[:10] }}{% endfor %}", "string"),
        (
            "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages %}{% for p in m.content | reverse %}{{ p }}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% set msgs = messages[1:] %}{% for m in msgs %}{% for p in m.content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p.text }}{% endfor %}{% endfor %}",
            "openai",
        ),
        ("{% for m in messages %}{{ m.content[0]['text'] }}{% endfor %}", "openai"),
        (
            "{% for m in messages %}{{ m.content | map(attribute='text') | join }}{% endfor %}",
            "openai",
        ),
        ("{{ messages[0]['content'] | selectattr('type', 'equalto', 'text') | list }}", "openai"),
    ],
)
def test_content_format_detection(source: str, expected: str) -> None:
    assert detect_content_format(source) == expected
    assert ChatTemplate(source).content_format == expected


# --- message normalization ------------------------------------------------------------------


def test_normalize_string_format() -> None:
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "user", "content": "q", "extra": 1, "name": "bob"},
        {"role": "assistant", "content": None},
    ]
    assert normalize_messages(messages, "string") == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": ""},
    ]


def test_normalize_openai_format() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": None}],
        },
        {"role": "assistant", "content": None},
    ]
    assert normalize_messages(messages, "openai") == [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": []},
    ]


def test_normalize_tool_calls_and_results() -> None:
    messages = [
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x": "é"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}},
                {"id": "c3", "type": "function", "function": {"name": "h", "arguments": {"y": 1}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    before = copy.deepcopy(messages)
    assert normalize_messages(messages, "string") == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": {"x": "é"}},
                },
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}},
                {"id": "c3", "type": "function", "function": {"name": "h", "arguments": {"y": 1}}},
            ],
            "reasoning": "think",
            "reasoning_content": "think",
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert messages == before


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
            "messages[0].tool_calls[].function.arguments is not valid JSON: ",
        ),
        ({"role": "assistant", "tool_calls": [{"id": "x"}]}, "must have a 'function' object"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "part type 'image_url' is not supported",
        ),
        ({"role": "user", "content": [{"text": "x"}]}, "missing 'type' field"),
        ({"role": "user", "content": 5}, "must be a string or a list of parts"),
        ({"content": "x"}, "messages[0].role must be a string"),
    ],
)
def test_normalize_refuses_bad_messages(message: dict, error: str) -> None:
    with pytest.raises(TemplateError) as exc:
        normalize_messages([message], "string")
    assert error in str(exc.value)


def test_normalize_tools_as_vllm_dumps_them() -> None:
    tools = [
        {
            "function": {"parameters": {"type": "object"}, "strict": True, "name": "f"},
            "type": "function",
        },
        {"type": "function", "function": {"name": "g", "description": "G"}, "x-extra": 1},
    ]
    before = copy.deepcopy(tools)
    out = normalize_tools(tools)
    assert out == [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": None,
                "parameters": {"type": "object"},
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {"name": "g", "description": "G", "parameters": None},
            "x-extra": 1,
        },
    ]
    assert out is not None
    # Key order is what tojson writes.
    assert list(out[0]) == ["type", "function"]
    assert list(out[0]["function"]) == ["name", "description", "parameters", "strict"]
    assert tools == before
    assert normalize_tools(None) is None
    assert normalize_tools([]) is None


@pytest.mark.parametrize(
    ("tools", "error"),
    [
        ([{"type": "retrieval"}], "tools[0].type must be 'function'"),
        ([{"type": "function"}], "tools[0].function must be an object with a string 'name'"),
        ([{"type": "function", "function": {"name": 3}}], "with a string 'name'"),
        (["f"], "tools[0] must be an object"),
    ],
)
def test_normalize_tools_refuses_bad_tools(tools: list, error: str) -> None:
    with pytest.raises(TemplateError) as exc:
        normalize_tools(tools)
    assert error in str(exc.value)


# --- choosing and loading a template ----------------------------------------------------------


def test_select_template() -> None:
    assert select_template({}, tools=False) is None
    assert select_template({"chat_template": "T"}, tools=True) == "T"
    named = {
        "chat_template": [
            {"name": "default", "template": "D"},
            {"name": "tool_use", "template": "U"},
        ]
    }
    assert select_template(named, tools=False) == "D"
    assert select_template(named, tools=True) == "U"
    only_default = {"chat_template": [{"name": "default", "template": "D"}]}
    assert select_template(only_default, tools=True) == "D"
    with pytest.raises(TemplateError) as exc:
        select_template({"chat_template": [{"name": "rag", "template": "R"}]}, tools=False)
    assert "multiple chat templates with no default" in str(exc.value)


def test_load_template_file(tmp_path: Path) -> None:
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ messages[0].content }}\n", encoding="utf-8")
    assert load_template_file(str(jinja)) == "{{ messages[0].content }}\n"
    as_json = tmp_path / "chat_template.json"
    as_json.write_text(json.dumps({"chat_template": "J"}), encoding="utf-8")
    assert load_template_file(str(as_json)) == "J"
    named = tmp_path / "named.json"
    named.write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "N"}]}), encoding="utf-8"
    )
    assert load_template_file(str(named)) == "N"
    empty = tmp_path / "empty.json"
    empty.write_text("{}", encoding="utf-8")
    with pytest.raises(TemplateError) as exc:
        load_template_file(str(empty))
    assert 'has no "chat_template" entry' in str(exc.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    with pytest.raises(TemplateError) as exc:
        load_template_file(str(broken))
    assert "is not valid JSON" in str(exc.value)
    with pytest.raises(TemplateError) as exc:
        load_template_file(str(tmp_path / "missing.jinja"))
    assert "cannot read chat template" in str(exc.value)
