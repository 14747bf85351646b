"""smg.grpc.prepare: OpenAI / SGLang bodies -> Prepared, validated as vLLM's OpenAI server
(wording, param) with the Rust SMG's error `type`; defaults as vLLM's --generation-config auto."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from smg.grpc.prepare import (
    Defaults,
    Prepared,
    RequestError,
    apply_limits,
    prepare_chat,
    prepare_completion,
    prepare_generate,
    tool_schema,
)
from smg.grpc.types import SamplingParams

NONE = Defaults()
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> Prepared:
    return prepare_chat({"model": "m", "messages": USER, **fields}, NONE)


def refused(fn: Any, body: dict[str, Any], defaults: Defaults = NONE) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(body, defaults)
    assert info.value.status == 400
    return info.value


def chat_refused(**fields: Any) -> RequestError:
    return refused(prepare_chat, {"model": "m", "messages": USER, **fields})


# --------------------------------------------------------------------------- chat: plain


def test_chat_minimal_takes_the_neutral_defaults() -> None:
    p = chat()
    assert p.kind == "chat"
    assert p.model == "m"
    assert p.messages == USER
    assert p.sampling == SamplingParams()
    assert (p.stream, p.include_usage, p.continuous_usage) == (False, False, False)
    assert (p.logprobs, p.top_logprobs, p.echo) == (False, 0, False)
    assert (p.add_generation_prompt, p.continue_final_message) == (True, False)
    assert p.template_kwargs == {}
    assert p.tools is None and p.documents is None and p.tool_choice is None


def test_chat_copies_every_sampling_field() -> None:
    p = chat(
        temperature=0.5,
        top_p=0.25,
        top_k=7,
        min_p=0.125,
        frequency_penalty=-1.5,
        presence_penalty=2,
        repetition_penalty=1.25,
        max_tokens=9,
        min_tokens=3,
        n=2,
        seed=-5,
        stop=["x", "yy"],
        stop_token_ids=[5, 6],
        ignore_eos=True,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        logit_bias={"17": 5, "3": -100},
        logprobs=True,
        top_logprobs=4,
    )
    assert p.sampling == SamplingParams(
        temperature=0.5,
        top_p=0.25,
        top_k=7,
        min_p=0.125,
        frequency_penalty=-1.5,
        presence_penalty=2.0,
        repetition_penalty=1.25,
        max_tokens=9,
        min_tokens=3,
        stop=["x", "yy"],
        stop_token_ids=[5, 6],
        ignore_eos=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        include_stop_str_in_output=True,
        n=2,
        seed=-5,
        logprobs=4,
        logit_bias={17: 5.0, 3: -100.0},
    )
    assert (p.logprobs, p.top_logprobs, p.max_tokens_explicit) == (True, 4, True)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=7).sampling.max_tokens == 7
    assert chat(max_tokens=5).sampling.max_tokens == 5


def test_top_k_zero_and_minus_one_are_off_as_vllm() -> None:
    assert chat(top_k=0).sampling.top_k == -1
    assert chat(top_k=-1).sampling.top_k == -1


def test_stop_string_becomes_a_list_and_logprobs_zero_means_the_chosen_token() -> None:
    assert chat(stop="END").sampling.stop == ["END"]
    p = chat(logprobs=True)
    assert (p.sampling.logprobs, p.top_logprobs) == (0, 0)
    p = chat(top_logprobs=0)  # vLLM: 0 needs no logprobs
    assert (p.logprobs, p.sampling.logprobs) == (False, None)


def test_logit_bias_is_clamped_as_vllm() -> None:
    assert chat(logit_bias={"5": 101, "6": -250.5}).sampling.logit_bias == {5: 100.0, 6: -100.0}


def test_seed_minus_one_is_no_seed_and_n_with_sampling() -> None:
    assert chat(seed=-1).sampling.seed is None
    assert chat(n=3, temperature=0.7).sampling.n == 3


def test_stream_options() -> None:
    p = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert (p.stream, p.include_usage, p.continuous_usage) == (True, True, True)
    e = chat_refused(stream_options={"include_usage": True})
    assert (e.message, e.param) == (
        "Stream options can only be defined when `stream=True`.",
        "stream_options",
    )


def test_template_fields_pass_through() -> None:
    docs = [{"title": "t", "text": "d"}]
    p = chat(
        documents=docs,
        chat_template_kwargs={"enable_thinking": False},
        add_generation_prompt=False,
        rid="abc",
    )
    assert p.documents == docs
    assert p.template_kwargs == {"enable_thinking": False}
    assert p.add_generation_prompt is False
    assert p.request_id_hint == "abc"


def test_continue_final_message() -> None:
    msgs = [*USER, {"role": "assistant", "content": "Once upon"}]
    p = prepare_chat(
        {"messages": msgs, "continue_final_message": True, "add_generation_prompt": False}, NONE
    )
    assert (p.continue_final_message, p.add_generation_prompt) == (True, False)
    e = refused(prepare_chat, {"messages": msgs, "continue_final_message": True})
    assert e.message == (
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    )
    assert e.param == "continue_final_message"


# --------------------------------------------------------------------------- chat: refusals


# vLLM 0.32's wording (vllm/sampling_params.py, chat_completion/protocol.py) and the Rust
# SMG 1.13's codes (read off its answers to the same bodies)
DA, DB = "decimal_above_max_value", "decimal_below_min_value"
IA, IB = "integer_above_max_value", "integer_below_min_value"


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"),
    [
        ({"temperature": 2.5}, "temperature", DA, "temperature must be in [0, 2], got 2.5."),
        ({"temperature": 3}, "temperature", DA, "temperature must be in [0, 2], got 3.0."),
        ({"temperature": -0.1}, "temperature", DB, "temperature must be non-negative, got -0.1."),
        (
            {"temperature": "hot"},
            "temperature",
            "invalid_type",
            "'temperature' must be a number, got \"hot\".",
        ),
        (
            {"temperature": True},
            "temperature",
            "invalid_type",
            "'temperature' must be a number, got true.",
        ),
        ({"top_p": 0}, "top_p", DB, "top_p must be in (0, 1], got 0.0."),
        ({"top_p": 1.5}, "top_p", DA, "top_p must be in (0, 1], got 1.5."),
        (
            {"top_k": -2},
            "top_k",
            "invalid_value",
            "top_k must be 0 (disable), or at least 1, got -2.",
        ),
        ({"top_k": 1.5}, "top_k", "invalid_type", "'top_k' must be an integer, got 1.5."),
        ({"min_p": 1.5}, "min_p", DA, "min_p must be in [0, 1], got 1.5."),
        (
            {"frequency_penalty": 2.5},
            "frequency_penalty",
            DA,
            "frequency_penalty must be in [-2, 2], got 2.5.",
        ),
        (
            {"presence_penalty": -3},
            "presence_penalty",
            DB,
            "presence_penalty must be in [-2, 2], got -3.0.",
        ),
        (
            {"repetition_penalty": 0},
            "repetition_penalty",
            DB,
            "repetition_penalty must be greater than zero, got 0.0.",
        ),
        ({"max_tokens": 0}, "max_tokens", IB, "max_tokens must be at least 1, got 0."),
        (
            {"max_completion_tokens": -1},
            "max_completion_tokens",
            IB,
            "max_tokens must be at least 1, got -1.",
        ),
        (
            {"min_tokens": 5, "max_tokens": 4},
            "min_tokens",
            "min_tokens_exceeds_max",
            "min_tokens must be less than or equal to max_tokens=4, got 5.",
        ),
        (
            {"min_tokens": -1},
            "min_tokens",
            IB,
            "min_tokens must be greater than or equal to 0, got -1.",
        ),
        ({"n": 0}, "n", IB, "n must be at least 1, got 0."),
        ({"n": 16385}, "n", IA, "n must be at most 16384, got 16385."),
        (
            {"n": 2, "temperature": 0},
            "n",
            "invalid_value",
            "n must be 1 when using greedy sampling, got 2.",
        ),
        (
            {"seed": 2**40},
            "seed",
            IA,
            "seed must be in [-2147483648, 2147483647], got 1099511627776.",
        ),
        (
            {"stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "array_above_max_length",
            "stop may hold at most 4 sequences, got 5.",
        ),
        ({"stop": [""]}, "stop", "invalid_value", "stop cannot contain an empty string."),
        ({"stop": ""}, "stop", "invalid_value", "stop cannot contain an empty string."),
        ({"stop": 5}, "stop", "invalid_type", "stop must be a string or a list of strings."),
        (
            {"stop_token_ids": [1, -2]},
            "stop_token_ids",
            "invalid_value",
            "stop_token_ids must contain only non-negative integers, got [1,-2].",
        ),
        (
            {"logit_bias": {"x": 1}},
            "logit_bias",
            "logit_bias_invalid_key",
            "logit_bias contains key(s) that cannot be converted to integer token IDs: ['x']",
        ),
        (
            {"logit_bias": {"-3": 1}},
            "logit_bias",
            "logit_bias_invalid_key",
            "token_id(s) [-3] in logit_bias contain out-of-vocab token ids.",
        ),
        (
            {"top_logprobs": 2},
            "top_logprobs",
            "top_logprobs_requires_logprobs",
            "when using `top_logprobs`, `logprobs` must be set to true.",
        ),
        (
            {"top_logprobs": -2, "logprobs": True},
            "top_logprobs",
            IB,
            "`top_logprobs` must be a positive value or -1.",
        ),
        (
            {"logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            IA,
            "Requested sample logprobs of 21, which is greater than max allowed: 20",
        ),
        (
            {"logprobs": True, "top_logprobs": -1},
            "top_logprobs",
            IA,
            "Requested sample logprobs of the whole vocabulary (-1), which is greater than "
            "max allowed: 20",
        ),
        ({"stream": "yes"}, "stream", "invalid_type", "'stream' must be a boolean, got \"yes\"."),
        ({"model": 5}, "model", "invalid_type", "'model' must be a string"),
    ],
)
def test_chat_refusals(fields: dict[str, Any], param: str, code: str, message: str) -> None:
    e = chat_refused(**fields)
    assert (e.status, e.code, e.param, e.message) == (400, code, param, message)


def test_error_body_is_the_openai_shape_with_param() -> None:
    e = chat_refused(temperature=3)
    assert orjson.loads(e.body()) == {
        "error": {
            "type": "invalid_request_error",
            "code": "decimal_above_max_value",
            "message": "temperature must be in [0, 2], got 3.0.",
            "param": "temperature",
        }
    }


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        (None, "messages", "'messages' is a required property."),
        ([], "messages", "messages cannot be empty."),
        ("hi", "messages", "'messages' must be a list."),
        (["hi"], "messages[0]", "messages[0] must be an object."),
        (
            [{"role": 5, "content": "x"}],
            "messages[0].role",
            "messages[0].role must be a string such as 'system', 'developer', 'user', "
            "'assistant' or 'tool', got 5.",
        ),
        ([{"role": "user"}], "messages[0].content", "messages[0].content is required."),
        (
            [{"role": "user", "content": 5}],
            "messages[0].content",
            "messages[0].content must be a string or a list of content parts.",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ],
            "messages[0].content[1]",
            'messages[0].content[1]: content of type "image_url" is not supported: this '
            "gateway serves text-only models over gRPC.",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            "messages[0].content[0].text",
            "messages[0].content[0].text must be a string.",
        ),
    ],
)
def test_message_refusals(messages: Any, param: str, message: str) -> None:
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    e = refused(prepare_chat, body)
    assert (e.param, e.message) == (param, message)
    if messages == []:
        assert e.code == "empty_array"  # the Rust SMG's code


def test_every_role_and_text_parts_are_accepted() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert prepare_chat({"messages": messages}, NONE).messages == messages


def test_text_part_spellings_become_text_parts_and_custom_roles_pass() -> None:
    messages = [
        {"role": "ipython", "content": "42"},  # vLLM takes custom roles (Llama's tool role)
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "a"},
                {"text": "b"},
                {"type": "text", "text": "c"},
            ],
        },
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    ]
    p = prepare_chat({"messages": messages}, NONE)
    assert p.messages == [
        {"role": "ipython", "content": "42"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
                {"type": "text", "text": "c"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    assert messages[1]["content"][0] == {"type": "input_text", "text": "a"}  # not mutated
    plain = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert prepare_chat({"messages": plain}, NONE).messages is plain  # no copy needed


def test_body_must_be_an_object() -> None:
    e = refused(prepare_chat, [1, 2])  # type: ignore[arg-type]
    assert e.message == "the request body must be a JSON object"


# --------------------------------------------------------------------------- defaults


def test_defaults_generation_config_over_engine_json() -> None:
    d = Defaults.from_sources(
        {
            "temperature": 0.6,
            "top_p": 0.9,
            "max_new_tokens": 100,
            "do_sample": True,
            "presence_penalty": 0.5,
        },
        '{"temperature":0.7,"top_k":20,"min_p":0.05,"repetition_penalty":1.1}',
    )
    assert d == Defaults(
        temperature=0.6,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        max_tokens=100,
        presence_penalty=0.5,
    )
    s = prepare_chat({"messages": USER, "frequency_penalty": 1}, d).sampling
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, 1.0)


def test_defaults_ignore_malformed_sources() -> None:
    assert Defaults.from_sources({"temperature": "hot", "top_k": 0}, "{not json") == Defaults(
        top_k=-1
    )
    assert Defaults.from_sources({}, "") == Defaults()


def test_defaults_apply_only_to_unset_fields() -> None:
    d = Defaults(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1)
    p = prepare_chat({"messages": USER, "temperature": 0, "top_k": 0}, d)
    s = p.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (
        0.0,
        0.9,
        -1,
        0.05,
        1.1,
    )


# --------------------------------------------------------------------------- limits


def test_apply_limits_fills_the_context_left() -> None:
    p = chat()
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 90


def test_apply_limits_max_new_tokens_is_a_default_as_vllm_0_32() -> None:
    p = prepare_chat({"messages": USER, "max_tokens": 50}, Defaults(max_tokens=20))
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 50  # the request's value wins (get_max_tokens)
    p = prepare_chat({"messages": USER}, Defaults(max_tokens=20))
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 20
    p = prepare_chat({"messages": USER}, Defaults(max_tokens=200))
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 90
    p = prepare_chat({"messages": USER}, Defaults(max_tokens=20))
    apply_limits(p, 10, None)
    assert p.sampling.max_tokens == 20


def test_apply_limits_unknown_context_keeps_the_request() -> None:
    p = chat(max_tokens=7)
    apply_limits(p, 10, None)
    assert p.sampling.max_tokens == 7
    p = chat()
    apply_limits(p, 10, None)
    assert p.sampling.max_tokens is None


def test_apply_limits_prompt_over_the_context() -> None:
    p = chat()
    with pytest.raises(RequestError) as info:
        apply_limits(p, 101, 100)
    e = info.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "messages")
    assert e.message == (
        "This model's maximum context length is 100 tokens. However, your prompt contains "
        "101 input tokens, which exceeds this limit even without any output tokens. Please "
        "reduce the length of the input prompt."
    )
    with pytest.raises(RequestError) as info:
        apply_limits(p, 100, 100)
    assert info.value.message == (
        "This model's maximum context length is 100 tokens. However, your prompt contains "
        "100 input tokens, which leaves no room for output tokens. Please reduce the length "
        "of the input prompt."
    )


def test_completion_default_16_is_bounded_not_refused() -> None:
    p = prepare_completion({"prompt": "x"}, NONE)
    apply_limits(p, 95, 100)
    assert p.sampling.max_tokens == 5
    p = prepare_completion({"prompt": "x"}, NONE)
    apply_limits(p, 5, 100)
    assert p.sampling.max_tokens == 16


def test_apply_limits_cuts_max_tokens_to_the_context_left() -> None:
    """vLLM 0.32's get_max_tokens: an explicit max_tokens past the context is the context
    left (tests/vllm pins the engine doing the same)."""
    p = chat(max_tokens=95)
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 90
    p = chat(max_tokens=90)
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 90
    p = chat(max_tokens=89)
    apply_limits(p, 10, 100)
    assert p.sampling.max_tokens == 89


# --------------------------------------------------------------------------- constraints


def test_response_format() -> None:
    assert chat(response_format={"type": "text"}).sampling.constraint is None
    assert chat(response_format={"type": "json_object"}).sampling.constraint == (
        "json_object",
        '{"type":"object"}',
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    p = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert p.sampling.constraint == ("json_schema", orjson.dumps(schema).decode())
    e = chat_refused(response_format={"type": "json_schema", "json_schema": {"name": ""}})
    assert (e.param, e.message) == (
        "response_format.json_schema.name",
        "JSON schema name cannot be empty.",
    )
    e = chat_refused(response_format={"type": "yaml"})
    assert e.param == "response_format.type"


def test_sglang_and_vllm_constraint_spellings() -> None:
    assert chat(regex="[a-z]+").sampling.constraint == ("regex", "[a-z]+")
    assert chat(ebnf='root ::= "a"').sampling.constraint == ("ebnf", 'root ::= "a"')
    assert chat(guided_regex="\\d+").sampling.constraint == ("regex", "\\d+")
    assert chat(guided_grammar="g").sampling.constraint == ("ebnf", "g")
    assert chat(guided_json='{"type": "string"}').sampling.constraint == (
        "json_schema",
        '{"type":"string"}',
    )
    assert chat(guided_choice=["yes", "no"]).sampling.constraint == ("choice", ["yes", "no"])
    assert chat(structured_outputs={"json": {"type": "integer"}}).sampling.constraint == (
        "json_schema",
        '{"type":"integer"}',
    )
    assert chat(structured_outputs={"choice": ["a"]}).sampling.constraint == ("choice", ["a"])


def test_two_constraints_are_refused() -> None:
    e = chat_refused(regex="a", response_format={"type": "json_object"})
    assert (e.param, e.code) == ("regex", "regex_conflicts_with_json")
    assert e.message == (
        "only one structured output constraint (response_format, regex, ebnf, "
        "structured_outputs, guided_*) can be active at a time, got response_format, regex."
    )
    e = chat_refused(ebnf="a", response_format={"type": "json_object"})
    assert e.code == "ebnf_conflicts_with_json"
    e = chat_refused(ebnf="a", regex="b")
    assert e.code == "multiple_constraints"
    e = chat_refused(structured_outputs={"json": {}, "regex": "a"})
    assert (e.param, e.code, e.message) == (
        "structured_outputs",
        "multiple_constraints",
        "You can only use one kind of constraints for structured outputs "
        "('json', 'regex' or 'choice').",
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"$ref": "#/$defs/City"}},
                "$defs": {"City": {"type": "string"}},
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_tool_choice_required_builds_vllms_schema() -> None:
    p = chat(tools=TOOLS, tool_choice="required")
    expected = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["weather"]},
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"$ref": "#/$defs/City"}},
                        },
                    },
                    "required": ["name", "parameters"],
                },
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["now"]},
                        "parameters": {"type": "object", "properties": {}},
                    },
                    "required": ["name", "parameters"],
                },
            ],
        },
        "$defs": {"City": {"type": "string"}},
    }
    assert p.tool_choice == "required"
    assert p.sampling.constraint is not None
    assert p.sampling.constraint[0] == "json_schema"
    assert orjson.loads(str(p.sampling.constraint[1])) == expected
    assert TOOLS[0]["function"]["parameters"]["$defs"] == {"City": {"type": "string"}}  # type: ignore[index]


def test_tool_choice_named_is_the_functions_parameters() -> None:
    p = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}})
    assert p.tool_choice == "weather"
    assert p.sampling.constraint == (
        "json_schema",
        orjson.dumps(TOOLS[0]["function"]["parameters"]).decode(),  # type: ignore[index]
    )


def test_tool_choice_auto_and_none_leave_the_output_free() -> None:
    for choice in ("auto", "none", None):
        p = chat(tools=TOOLS, tool_choice=choice)
        assert (p.tool_choice, p.sampling.constraint, p.tools) == (None, None, TOOLS)


def test_tool_choice_refusals() -> None:
    e = chat_refused(tool_choice="required")
    assert (e.param, e.code, e.message) == (
        "tool_choice",
        "tool_choice_requires_tools",
        "When using `tool_choice`, `tools` must be set.",
    )
    e = chat_refused(tool_choice="auto")
    assert (e.param, e.message) == ("tool_choice", "When using `tool_choice`, `tools` must be set.")
    e = chat_refused(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert (e.param, e.code, e.message) == (
        "tool_choice",
        "tool_choice_function_not_found",
        "The tool specified in `tool_choice` does not match any of the specified `tools`",
    )
    e = chat_refused(tools=TOOLS, tool_choice="sometimes")
    assert (e.param, e.message) == (
        "tool_choice",
        'Invalid value for `tool_choice`: "sometimes"! Only named tools, "none", "auto" or '
        '"required" are supported.',
    )
    e = chat_refused(tools=TOOLS, tool_choice={"type": "function", "function": {}})
    assert (e.param, e.message) == (
        "tool_choice.function.name",
        "Expected field `name` in `function` in `tool_choice`! Correct usage: "
        '`{"type": "function", "function": {"name": "my_function"}}`',
    )
    e = chat_refused(tools=[])
    assert (e.param, e.message) == (
        "tools",
        "`tools` must not be an empty array. Either provide at least one tool or omit the "
        "field entirely.",
    )
    e = chat_refused(tools=TOOLS, tool_choice="required", regex="a")
    assert (e.param, e.message) == (
        "tool_choice",
        "You can only either use constraints for structured outputs or tools, not both.",
    )


def test_parallel_tool_calls_false_allows_one_call() -> None:
    p = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert p.sampling.constraint is not None
    assert orjson.loads(str(p.sampling.constraint[1]))["maxItems"] == 1


def test_conflicting_tool_defs_are_refused() -> None:
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"$defs": {"A": {"type": t}}}}}
        for n, t in (("a", "string"), ("b", "integer"))
    ]
    with pytest.raises(RequestError) as info:
        tool_schema(tools, "required")
    assert info.value.message == (
        "Tool definition 'A' has multiple schemas, which is not supported."
    )


# --------------------------------------------------------------------------- completions


def test_completion_prompt_forms() -> None:
    assert prepare_completion({"prompt": "hello"}, NONE).prompt == "hello"
    assert prepare_completion({"prompt": ["hello"]}, NONE).prompt == "hello"
    assert prepare_completion({"prompt": [1, 2, 3]}, NONE).prompt == [1, 2, 3]
    assert prepare_completion({"prompt": [[1, 2]]}, NONE).prompt == [1, 2]


def test_completion_fields() -> None:
    p = prepare_completion({"model": "m", "prompt": "x", "logprobs": 3, "stream": True}, NONE)
    assert (p.kind, p.echo, p.logprobs, p.top_logprobs, p.sampling.logprobs) == (
        "completion",
        False,
        True,
        3,
        3,
    )
    assert (p.sampling.max_tokens, p.max_tokens_default) == (None, 16)  # the legacy default
    assert prepare_completion({"prompt": "x", "echo": True}, NONE).echo is True
    assert prepare_completion({"prompt": "x", "max_tokens": 40}, NONE).sampling.max_tokens == 40


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "prompt", "'prompt' is a required property."),
        ({"prompt": ""}, "prompt", "Prompt cannot be empty."),
        ({"prompt": []}, "prompt", "Prompt cannot be empty."),
        ({"prompt": [1, -1]}, "prompt", "'prompt' holds a negative token id."),
        ({"prompt": "a", "suffix": "z"}, "suffix", "suffix is not supported."),
        (
            {"prompt": "a", "logprobs": 21},
            "logprobs",
            "Requested sample logprobs of 21, which is greater than max allowed: 20",
        ),
        ({"prompt": "a", "logprobs": -3}, "logprobs", "`logprobs` must be a positive value or -1."),
        (
            {"prompt": "a", "logprobs": 1, "echo": True},
            "echo",
            "`echo` with `logprobs` is not supported (no prompt logprobs).",
        ),
        (
            {"prompt": "a", "stream_options": {"include_usage": True}},
            "stream_options",
            "Stream options can only be defined when `stream=True`.",
        ),
    ],
)
def test_completion_refusals(body: dict[str, Any], param: str, message: str) -> None:
    e = refused(prepare_completion, body)
    assert (e.param, e.message) == (param, message)


# --------------------------------------------------------------------------- /generate


def test_generate_sglang_body() -> None:
    p = prepare_generate(
        {
            "text": "hello",
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": 8,
                "stop": ["\n"],
                "no_stop_trim": True,
                "regex": "[0-9]+",
                "min_new_tokens": 2,
                "sampling_seed": 7,
            },
            "stream": True,
            "return_logprob": True,
            "top_logprobs_num": 2,
            "rid": "r1",
        },
        NONE,
    )
    s = p.sampling
    assert (p.kind, p.prompt, p.stream, p.request_id_hint) == ("generate", "hello", True, "r1")
    assert (s.temperature, s.max_tokens, s.stop, s.include_stop_str_in_output) == (
        0.0,
        8,
        ["\n"],
        True,
    )
    assert s.constraint == ("regex", "[0-9]+")
    assert (s.min_tokens, s.seed) == (2, 7)  # SGLang's min_new_tokens, sampling_seed
    assert (p.logprobs, p.top_logprobs, s.logprobs) == (True, 2, 2)


def test_generate_structural_tag_and_json_schema() -> None:
    tag = {"type": "structural_tag", "structures": [], "triggers": []}
    p = prepare_generate({"text": "x", "sampling_params": {"structural_tag": tag}}, NONE)
    assert p.sampling.constraint == ("structural_tag", orjson.dumps(tag).decode())
    p = prepare_generate(
        {"text": "x", "sampling_params": {"json_schema": '{"type":"string"}'}}, NONE
    )
    assert p.sampling.constraint == ("json_schema", '{"type":"string"}')
    e = refused(
        prepare_generate, {"text": "x", "sampling_params": {"structural_tag": "{}", "regex": "a"}}
    )
    assert (e.param, e.code) == ("structural_tag", "multiple_constraints")


def test_generate_input_ids_and_default_max_new_tokens() -> None:
    p = prepare_generate({"input_ids": [5, 6]}, NONE)
    assert (p.prompt, p.sampling.max_tokens, p.max_tokens_default) == ([5, 6], None, 128)
    apply_limits(p, 2, 4096)
    assert p.sampling.max_tokens == 128


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "text", "Either text or input_ids should be provided."),
        (
            {"text": "a", "input_ids": [1]},
            "text",
            "Either text or input_ids should be provided, not both.",
        ),
        (
            {"text": "a", "sampling_params": 3},
            "sampling_params",
            "sampling_params must be an object.",
        ),
        (
            {"text": "a", "sampling_params": {"max_new_tokens": 0}},
            "max_new_tokens",
            "max_tokens must be at least 1, got 0.",
        ),
        (
            {"text": ["a", "b"]},
            "text",
            "batched prompts are not supported: send one prompt per request.",
        ),
    ],
)
def test_generate_refusals(body: dict[str, Any], param: str, message: str) -> None:
    e = refused(prepare_generate, body)
    assert (e.param, e.message) == (param, message)
