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
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from smg.grpc.prepare import Defaults, RequestError, prepare_chat, prepare_completion
from smg.grpc.respond import (
    ChatStreamWriter,
    Delta,
    ParserPlan,
    Usage,
    chat_body,
    parser_plan,
)
from smg.grpc.types import EngineOutput
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
    assert parser_plan(chat(tools=TOOLS, tool_choice="required"), "qwen", None, None) is None
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert parser_plan(named, "qwen", "qwen3", None) == ParserPlan(None, "qwen3", None, TOOLS, True)
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


def test_choice_splits_reasoning_content_and_whole_calls(tok: Tokenizer) -> None:
    p = chat(tools=TOOLS)
    plan = parser_plan(p, "qwen", "qwen3", None)
    assert plan is not None
    deltas = run_choice(tok, plan, p, QWEN_REPLY)
    assert all(d.parsed for d in deltas)
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
