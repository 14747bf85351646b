"""Output parsers on the gRPC chat path (issue 11): the model's reasoning and tool-call
syntax -> `reasoning_content` and `tool_calls`.

Pure part: respond.py's ParsingChoiceState, parser_plan, the stream writer's parsed
chunks and the parsed chat message, fed engine outputs made with the real Llama-3
tokenizer. End-to-end part (below): `smg launch` with gRPC mocks answering each family's
syntax (`--reply-file` / `GrpcMock.reply`), token by token, read with the openai client.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from smg.grpc.prepare import Defaults, RequestError, prepare_chat, prepare_completion
from smg.grpc.respond import (
    ChatStreamWriter,
    Delta,
    ParsedDelta,
    ParserPlan,
    Usage,
    chat_body,
    parser_plan,
)
from smg.grpc.types import EngineOutput
from smg.parsers.registry import REASONING_PARSERS, TOOL_PARSERS
from smg.tokenizer import Tokenizer, load_tokenizer
from tests.tokenizer_data import llama31_dir, needs_llama3

pytestmark = needs_llama3

EOT = 128009
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, TIME]
QWEN_REPLY = (
    "<think>The user wants weather.</think>\n\n"
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(str(llama31_dir(tmp_path_factory.mktemp("llama31"))))


def chat(**fields: Any) -> Any:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return prepare_chat(body, Defaults())


def outputs(tok: Tokenizer, text: str, reason: str = "stop") -> list[EngineOutput]:
    """The text one token per output, the EOS last (finish `reason`)."""
    ids = tok.encode(text)
    outs = [EngineOutput(index=0, token_ids=[t]) for t in ids]
    last = [EOT] if reason == "stop" else []
    outs.append(EngineOutput(index=0, token_ids=last, finished=True, finish_reason=reason))
    return outs


def run_choice(tok: Tokenizer, plan: ParserPlan, p: Any, text: str, **kw: Any) -> list[Delta]:
    state = plan.choice(0, tok, p.sampling)
    deltas = [state.on_output(o) for o in outputs(tok, text, **kw)]
    assert state.done()
    return deltas


def calls(deltas: list[Delta]) -> list[tuple[int, str, Any]]:
    return [(c.index, c.name, json.loads(c.arguments)) for d in deltas for c in d.calls]


def test_parser_plan_follows_1_13s_rules() -> None:
    auto = chat(tools=TOOLS)
    assert parser_plan(auto, "qwen", "qwen3", True) == ParserPlan(
        "qwen", "qwen3", True, TOOLS, True
    )
    # tool_choice none: no tool parsing; required / named: the JSON-constraint path.
    assert parser_plan(chat(tools=TOOLS, tool_choice="none"), "qwen", None, None) is None
    assert parser_plan(chat(tools=TOOLS, tool_choice="required"), "qwen", "qwen3", None) is None
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert parser_plan(named, "qwen", "qwen3", None) is None
    # No tools: reasoning only; separate_reasoning false: none.
    assert parser_plan(chat(), "qwen", "qwen3", None) == ParserPlan(None, "qwen3", None, (), True)
    assert parser_plan(chat(separate_reasoning=False), "qwen", "qwen3", None) is None
    assert parser_plan(chat(tools=TOOLS, parallel_tool_calls=False), "qwen", None, None) == (
        ParserPlan("qwen", None, None, TOOLS, False)
    )
    # Completions never parse.
    completion = prepare_completion({"model": "m", "prompt": "x"}, Defaults())
    assert parser_plan(completion, "qwen", "qwen3", None) is None


def test_prepare_keeps_special_tokens_when_tools_are_parsed() -> None:
    assert chat().sampling.skip_special_tokens is True
    assert chat(tools=TOOLS).sampling.skip_special_tokens is False
    assert chat(tools=TOOLS, tool_choice="auto").sampling.skip_special_tokens is False
    assert chat(tools=TOOLS, tool_choice="none").sampling.skip_special_tokens is True
    assert chat(tools=TOOLS, tool_choice="required").sampling.skip_special_tokens is True
    p = chat(reasoning_effort="low", separate_reasoning=False, stream_reasoning=False)
    assert (p.reasoning_effort, p.separate_reasoning) == ("low", False)
    for field, value in (
        ("separate_reasoning", "yes"),
        ("stream_reasoning", 1),
        ("reasoning_effort", 3),
        ("parallel_tool_calls", "no"),
    ):
        with pytest.raises(RequestError) as err:
            chat(**{field: value})
        assert (err.value.status, err.value.param) == (400, field)


def test_streamed_stop_token_is_held_until_the_engine_says_it_stopped(tok: Tokenizer) -> None:
    """Special tokens kept (tools parsed): the EOS a chunk ends on is not text when the
    complete then says the engine stopped; it is text when more tokens follow."""
    from smg.grpc.respond import ChoiceState

    p = chat(tools=TOOLS)
    hi = tok.encode("Hi")
    state = ChoiceState(0, tok, p.sampling)
    texts = [
        state.on_output(EngineOutput(index=0, token_ids=[*hi, EOT])).text,
        state.on_output(
            EngineOutput(index=0, token_ids=[], finished=True, finish_reason="stop")
        ).text,
    ]
    assert texts == ["Hi", ""]
    state = ChoiceState(0, tok, p.sampling)  # ignore_eos: the engine went on
    texts = [
        state.on_output(EngineOutput(index=0, token_ids=[*hi, EOT])).text,
        state.on_output(EngineOutput(index=0, token_ids=hi)).text,
        state.on_output(
            EngineOutput(index=0, token_ids=[], finished=True, finish_reason="length")
        ).text,
    ]
    assert "".join(texts) == "Hi<|eot_id|>Hi" and texts[0] == "Hi"


def test_choice_splits_reasoning_content_and_whole_calls(tok: Tokenizer) -> None:
    p = chat(tools=TOOLS)
    plan = parser_plan(p, "qwen", "qwen3", None)
    assert plan is not None
    deltas = run_choice(tok, plan, p, QWEN_REPLY)
    assert all(isinstance(d, ParsedDelta) for d in deltas)
    assert "".join(d.reasoning for d in deltas) == "The user wants weather."
    assert "".join(d.text for d in deltas) == "\n\nLet me check.\n"
    assert calls(deltas) == [
        (0, "get_weather", {"city": "Paris", "days": 2}),
        (1, "get_time", {}),
    ]
    # Each call arrives whole, on the output that closed it.
    assert [len(d.calls) for d in deltas if d.calls] == [1, 1]
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "tool_calls"
    ids = [c.id for d in deltas for c in d.calls]
    assert all(i.startswith("chatcmpl-tool-") for i in ids) and len(set(ids)) == 2


def test_parallel_false_keeps_the_first_call_and_length_stays_length(tok: Tokenizer) -> None:
    p = chat(tools=TOOLS, parallel_tool_calls=False)
    plan = parser_plan(p, "qwen", None, None)
    assert plan is not None
    deltas = run_choice(tok, plan, p, QWEN_REPLY)
    assert calls(deltas) == [(0, "get_weather", {"city": "Paris", "days": 2})]
    assert deltas[-1].finish_reason == "tool_calls"
    # Cut off by max_tokens: the complete call stays a call, the reason stays "length".
    deltas = run_choice(
        tok, plan, p, QWEN_REPLY[: QWEN_REPLY.index("</tool_call>") + 12], reason="length"
    )
    assert deltas[-1].finish_reason == "length"
    assert len(calls(deltas)) == 1


def test_truncated_call_comes_back_as_content(tok: Tokenizer) -> None:
    p = chat(tools=TOOLS)
    plan = parser_plan(p, "qwen", None, None)
    assert plan is not None
    text = 'Sure.<tool_call>\n{"name": "get_weather", "argum'
    deltas = run_choice(tok, plan, p, text, reason="length")
    assert calls(deltas) == []
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason == "length"


PIECES = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", '{"name": "get_time", ',
    '"arguments": {}}', "[get_time()]", "<|python_tag|>", "\n", "Hi", "{", "}", "<", "|",
    "<\uff5ctool\u2581calls\u2581begin\uff5c>", "<|tool_calls_section_begin|>", "\u00e9",
]  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=25),
    tool=st.sampled_from(sorted(TOOL_PARSERS)),
    reasoning=st.sampled_from(sorted(REASONING_PARSERS)),
    in_reasoning=st.sampled_from([None, True, False]),
    reason=st.sampled_from(["stop", "length"]),
)
def test_any_output_through_any_parsers_never_raises(
    tok: Tokenizer, pieces: list[str], tool: str, reasoning: str, in_reasoning: Any, reason: str
) -> None:
    p = chat(tools=TOOLS, stream=True)
    plan = parser_plan(p, tool, reasoning, in_reasoning)
    assert plan is not None
    state = plan.choice(0, tok, p.sampling)
    w = ChatStreamWriter(p, "abc", "m", 1, tok)
    w.use_parsers()
    data = w.start()
    deltas = []
    for o in outputs(tok, "".join(pieces), reason):
        deltas.append(state.on_output(o))
        data += w.delta(deltas[-1])
    assert state.done()
    finish = deltas[-1].finish_reason
    assert finish == ("tool_calls" if reason == "stop" and calls(deltas) else reason)
    body = orjson.loads(chat_body(p, "abc", "m", 1, tok, [deltas], Usage(1, 1, 0)))
    ChatCompletion.model_validate(body)


def test_parsed_chat_body_parses_with_openai(tok: Tokenizer) -> None:
    p = chat(tools=TOOLS)
    plan = parser_plan(p, "qwen", "qwen3", None)
    assert plan is not None
    deltas = run_choice(tok, plan, p, QWEN_REPLY)
    body = orjson.loads(chat_body(p, "abc", "m", 1, tok, [deltas], Usage(3, 4, 0)))
    ChatCompletion.model_validate(body)
    (choice,) = body["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] == "\n\nLet me check.\n"
    assert message["reasoning_content"] == "The user wants weather."
    assert [
        (c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ] == [("function", "get_weather", {"city": "Paris", "days": 2}), ("function", "get_time", {})]
    # Only whitespace left besides the calls: content null (1.13's normalisation).
    only = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    deltas = run_choice(tok, plan, p, only)
    body = orjson.loads(chat_body(p, "abc", "m", 1, tok, [deltas], Usage(3, 4, 0)))
    message = body["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (None, None)
    assert len(message["tool_calls"]) == 1


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A choice's message from its stream, the way a client assembles it."""
    content = reasoning = ""
    tool_calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        for c in chunk["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            reasoning += d.get("reasoning_content") or ""
            for t in d.get("tool_calls") or []:
                slot = tool_calls.setdefault(t["index"], {"name": "", "arguments": "", "id": None})
                if t.get("id"):
                    slot["id"] = t["id"]
                fn = t.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            finish = c["finish_reason"] or finish
    return {
        "content": content,
        "reasoning": reasoning,
        "calls": [tool_calls[i] for i in sorted(tool_calls)],
        "finish": finish,
    }


def test_parsed_stream_chunks(tok: Tokenizer) -> None:
    p = chat(tools=TOOLS, stream=True)
    plan = parser_plan(p, "qwen", "qwen3", None)
    assert plan is not None
    w = ChatStreamWriter(p, "abc", "m", 1, tok)
    w.use_parsers()
    state = plan.choice(0, tok, p.sampling)
    data = w.start()
    for o in outputs(tok, QWEN_REPLY):
        data += w.delta(state.on_output(o))
    data += w.end(Usage(1, 1, 0))
    events = [
        orjson.loads(block[6:]) for block in data.split(b"\n\n")[:-1] if block != b"data: [DONE]"
    ]
    for e in events:
        ChatCompletionChunk.model_validate(e)
    whole = assemble(events)
    assert whole["content"] == "\n\nLet me check.\n"
    assert whole["reasoning"] == "The user wants weather."
    assert [(c["name"], json.loads(c["arguments"])) for c in whole["calls"]] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {}),
    ]
    assert whole["finish"] == "tool_calls"
    # Each call: a delta with id, type and name (arguments ""), then one with the arguments.
    tool_deltas = [
        e["choices"][0]["delta"]["tool_calls"][0]
        for e in events
        if e["choices"] and "tool_calls" in e["choices"][0]["delta"]
    ]
    assert [sorted(t) for t in tool_deltas] == [
        ["function", "id", "index", "type"],
        ["function", "index"],
    ] * 2
    assert [t["index"] for t in tool_deltas] == [0, 0, 1, 1]
    assert tool_deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ----------------------------------------------------------------------------- end to end
# One gateway, four gRPC mocks (the box has 2 cores): each mock serves a model whose name
# picks the parsers by 1.13's patterns, with that family's real chat template (the
# gateway fetches each worker's tokenizer bundle, so each worker has its own template and
# thinking toggle); a fifth model's parsers come from worker labels. Each test sets the
# reply its mock sends (plain-text tokens of the real Llama-3 tokenizer, one per message).

QWEN = "Qwen/Qwen3-8B"  # qwen + qwen3; Qwen3's template: thinking on unless enable_thinking false
DEEPSEEK = "deepseek-ai/DeepSeek-V3.1"  # deepseek31 + deepseek_v31; thinking off by default
KIMI = "moonshotai/Kimi-K2-Instruct"  # kimik2 + kimi
CUSTOM = "house-model"  # no pattern: labels tool_call_parser=llama, reasoning_parser=deepseek_r1
FAMILIES = {
    QWEN: "Qwen-Qwen3-0.6B.jinja",
    DEEPSEEK: "deepseek-ai-DeepSeek-V3.1.jinja",
    KIMI: "moonshotai-Kimi-K2-Instruct.jinja",
    CUSTOM: "meta-llama-Llama-3.1-8B-Instruct.jinja",
}
ASK = [{"role": "user", "content": "Weather in Paris for 2 days?"}]


class Family:
    def __init__(self, gw: Any, mocks: dict[str, Any]) -> None:
        self.gw = gw
        self.mocks = mocks

    def client(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.gw.url + "/v1", api_key="unused", max_retries=0, timeout=30.0
        )


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import contextlib

    import grpcmockutil

    from tests.gatewayutil import Gateway, wait_until

    root = tmp_path_factory.mktemp("families")
    mocks: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for i, (model, template) in enumerate(FAMILIES.items()):
            model_dir = grpcmockutil.llama3_dir(root / f"m{i}", template=template)
            reply = root / f"reply{i}.txt"
            reply.write_text("Hello.", "utf-8")
            mock = grpcmockutil.start_grpc_mock(
                model_dir, model=model, args=["--reply-file", str(reply)]
            )
            stack.callback(mock.stop)
            mocks[model] = mock
        urls = [mocks[m].url for m in (QWEN, DEEPSEEK, KIMI)]
        gw = Gateway(["--worker-urls", *urls], env={"XDG_CACHE_HOME": str(root / "cache")})
        stack.callback(gw.close_log)
        stack.callback(gw.stop)
        gw.start(timeout=60.0)
        gw.wait_ready(60.0)
        labels = {"tool_call_parser": "llama", "reasoning_parser": "deepseek_r1"}
        added = gw.admin("POST", "/workers", json={"url": mocks[CUSTOM].url, "labels": labels})
        assert added.status_code == 202, added.text
        family = Family(gw, mocks)

        def serves_all() -> bool:
            for model in FAMILIES:
                try:
                    family.client().chat.completions.create(model=model, messages=ASK)
                except Exception:
                    return False
            return True

        wait_until(serves_all, 60.0, "every family's model served")
        yield family


def ask(family: Family, model: str, reply: str, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """The complete answer and the stream's assembled message for one request."""
    family.mocks[model].reply(reply)
    client = family.client()
    whole = client.chat.completions.create(model=model, messages=ASK, **kw)
    chunks = [
        c.model_dump(exclude_unset=True)
        for c in client.chat.completions.create(model=model, messages=ASK, stream=True, **kw)
    ]
    return whole, assemble(chunks)


def message_view(whole: Any) -> dict[str, Any]:
    """The complete answer in `assemble`'s terms (to compare with the stream)."""
    (choice,) = whole.choices
    m = choice.message
    return {
        "content": m.content or "",
        "reasoning": getattr(m, "reasoning_content", None) or "",
        "calls": [
            {"name": c.function.name, "arguments": c.function.arguments, "id": c.id}
            for c in m.tool_calls or []
        ],
        "finish": choice.finish_reason,
    }


def same_but_ids(whole: Any, streamed: dict[str, Any]) -> dict[str, Any]:
    view = message_view(whole)
    ids = [c.pop("id") for c in view["calls"]]
    streamed_ids = [c.pop("id") for c in streamed["calls"]]
    assert len(ids) == len(streamed_ids)
    assert view == streamed
    return view


def args_of(view: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["name"], json.loads(c["arguments"])) for c in view["calls"]]


def test_qwen_reasoning_and_calls(families: Family) -> None:
    whole, streamed = ask(families, QWEN, QWEN_REPLY, tools=TOOLS)
    ids = [c.id for c in whole.choices[0].message.tool_calls or []]
    assert all(i.startswith("chatcmpl-tool-") for i in ids) and len(ids) == 2
    view = same_but_ids(whole, streamed)
    assert view["reasoning"] == "The user wants weather."
    assert view["content"] == "\n\nLet me check.\n"
    assert args_of(view) == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]
    assert view["finish"] == "tool_calls"


def test_qwen_tool_choice_auto_none_and_parallel_false(families: Family) -> None:
    whole, streamed = ask(families, QWEN, QWEN_REPLY, tools=TOOLS, tool_choice="auto")
    assert len(same_but_ids(whole, streamed)["calls"]) == 2
    # none: no tool parsing, the call syntax is content; the reasoning is still split.
    whole, streamed = ask(families, QWEN, QWEN_REPLY, tools=TOOLS, tool_choice="none")
    view = same_but_ids(whole, streamed)
    assert view == {
        "content": QWEN_REPLY[QWEN_REPLY.index("</think>") + 8 :],
        "reasoning": "The user wants weather.",
        "calls": [],
        "finish": "stop",
    }
    whole, streamed = ask(families, QWEN, QWEN_REPLY, tools=TOOLS, parallel_tool_calls=False)
    view = same_but_ids(whole, streamed)
    assert args_of(view) == [("get_weather", {"city": "Paris", "days": 2})]
    assert view["finish"] == "tool_calls"


def test_qwen_named_tool_choice_keeps_the_json_path(families: Family) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole, streamed = ask(
        families, QWEN, '{"city": "Paris", "days": 2}', tools=TOOLS, tool_choice=named
    )
    view = same_but_ids(whole, streamed)
    assert args_of(view) == [("get_weather", {"city": "Paris", "days": 2})]
    assert (view["reasoning"], view["content"]) == ("", "")


def test_qwen_separate_reasoning_false_and_thinking_off(families: Family) -> None:
    whole, streamed = ask(
        families, QWEN, QWEN_REPLY, tools=TOOLS, extra_body={"separate_reasoning": False}
    )
    view = same_but_ids(whole, streamed)
    assert view["reasoning"] == ""
    assert view["content"] == "<think>The user wants weather.</think>\n\nLet me check.\n"
    assert len(view["calls"]) == 2
    # Qwen3's template is thinking-on by default: the output starts inside reasoning
    # (a template that prefills <think> leaves the model only the closing tag) ...
    plain = "I think.</think>\n\nHello"
    whole, streamed = ask(families, QWEN, plain)
    view = same_but_ids(whole, streamed)
    assert (view["reasoning"], view["content"], view["finish"]) == ("I think.", "\n\nHello", "stop")
    # ... and enable_thinking false turns that off: the text is the answer.
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    whole, streamed = ask(families, QWEN, plain, extra_body=off)
    view = same_but_ids(whole, streamed)
    assert (view["reasoning"], view["content"]) == ("", plain)


BAR = "\uff5c"  # DeepSeek's markers use the fullwidth vertical line
DEEPSEEK_CALLS = (
    f"<{BAR}tool▁calls▁begin{BAR}><{BAR}tool▁call▁begin{BAR}>get_weather<{BAR}tool▁sep{BAR}>"
    f'{{"city": "Paris", "days": 2}}<{BAR}tool▁call▁end{BAR}><{BAR}tool▁calls▁end{BAR}>'
)


def test_deepseek_v31_calls_and_thinking_kwarg(families: Family) -> None:
    whole, streamed = ask(families, DEEPSEEK, "Checking." + DEEPSEEK_CALLS, tools=TOOLS)
    view = same_but_ids(whole, streamed)
    assert (view["reasoning"], view["content"]) == ("", "Checking.")
    assert args_of(view) == [("get_weather", {"city": "Paris", "days": 2})]
    assert view["finish"] == "tool_calls"
    # This DeepSeek-V3.1 template thinks only when asked; it reads `enable_thinking`
    # (and `thinking`), and 1.13's rule takes `enable_thinking` as its key.
    reply = "I should look.</think>Checking." + DEEPSEEK_CALLS
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    whole, streamed = ask(families, DEEPSEEK, reply, tools=TOOLS, extra_body=on)
    view = same_but_ids(whole, streamed)
    assert (view["reasoning"], view["content"]) == ("I should look.", "Checking.")
    assert len(view["calls"]) == 1


def test_kimi_k2_ids_are_the_models(families: Family) -> None:
    reply = (
        "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}"
        "<|tool_call_end|><|tool_calls_section_end|>"
    )
    whole, streamed = ask(families, KIMI, reply, tools=TOOLS)
    ids = [c.id for c in whole.choices[0].message.tool_calls or []]
    assert ids == ["functions.get_weather:0", "functions.get_time:1"]
    assert [c["id"] for c in streamed["calls"]] == ids
    view = same_but_ids(whole, streamed)
    assert view["content"] == "Sure."
    assert args_of(view) == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_worker_labels_pick_the_parsers(families: Family) -> None:
    reply = 'think first</think>{"name": "get_weather", "parameters": {"city": "Paris"}}'
    whole, streamed = ask(families, CUSTOM, reply, tools=TOOLS)
    view = same_but_ids(whole, streamed)
    assert (view["reasoning"], view["content"]) == ("think first", "")
    assert whole.choices[0].message.content is None
    assert args_of(view) == [("get_weather", {"city": "Paris"})]
    assert view["finish"] == "tool_calls"
    # No tools: only the reasoning parser runs.
    whole, streamed = ask(families, CUSTOM, "hm</think>Plain answer.")
    view = same_but_ids(whole, streamed)
    assert (view["reasoning"], view["content"], view["calls"]) == ("hm", "Plain answer.", [])


# Each remaining family's syntax, read by the parser a `tool_call_parser` label names.
FAMILY_CALLS = {
    "json": '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}',
    "pythonic": '[get_weather(city="Paris", days=2)]',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
    "qwen_xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    "deepseek": f"<{BAR}tool▁calls▁begin{BAR}><{BAR}tool▁call▁begin{BAR}>function"
    f'<{BAR}tool▁sep{BAR}>get_weather\n```json\n{{"city": "Paris", "days": 2}}\n```'
    f"<{BAR}tool▁call▁end{BAR}><{BAR}tool▁calls▁end{BAR}>",
    "deepseek32": f'<{BAR}DSML{BAR}function_calls>\n<{BAR}DSML{BAR}invoke name="get_weather">\n'
    f'<{BAR}DSML{BAR}parameter name="city" string="true">Paris</{BAR}DSML{BAR}parameter>\n'
    f'<{BAR}DSML{BAR}parameter name="days" string="false">2</{BAR}DSML{BAR}parameter>\n'
    f"</{BAR}DSML{BAR}invoke>\n</{BAR}DSML{BAR}function_calls>",
    "glm45_moe": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
    "glm47_moe": "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
    "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
    "minimax_m2": '<minimax:tool_call>\n<invoke name="get_weather">\n'
    '<parameter name="city">Paris</parameter>\n<parameter name="days">2</parameter>\n'
    "</invoke>\n</minimax:tool_call>",
    "step3": f"<{BAR}tool_calls_begin{BAR}><{BAR}tool_call_begin{BAR}>function<{BAR}tool_sep{BAR}>"
    '<steptml:invoke name="get_weather"><steptml:parameter name="city">Paris</steptml:parameter>'
    '<steptml:parameter name="days">2</steptml:parameter></steptml:invoke>'
    f"<{BAR}tool_call_end{BAR}><{BAR}tool_calls_end{BAR}>",
}


def test_every_family_through_a_patched_label(families: Family) -> None:
    import time

    gw = families.gw
    (worker,) = [w for w in gw.admin("GET", "/workers").json()["workers"] if CUSTOM in str(w)]
    path = f"/workers/{worker['id']}"
    try:
        for name, syntax in FAMILY_CALLS.items():
            labels = {"tool_call_parser": name, "reasoning_parser": "passthrough"}
            patched = gw.admin("PATCH", path, json={"labels": labels})
            assert patched.status_code == 202, patched.text
            reply = "Sure. " + syntax
            deadline = time.monotonic() + 20
            while True:  # the data plane sees the republished worker within a moment
                whole, streamed = ask(families, CUSTOM, reply, tools=TOOLS)
                if whole.choices[0].message.tool_calls or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            view = same_but_ids(whole, streamed)
            assert (name, view["content"], view["reasoning"]) == (name, "Sure. ", "")
            assert args_of(view) == [("get_weather", {"city": "Paris", "days": 2})], name
            assert view["finish"] == "tool_calls"
    finally:
        labels = {"tool_call_parser": "llama", "reasoning_parser": "deepseek_r1"}
        gw.admin("PATCH", path, json={"labels": labels})
