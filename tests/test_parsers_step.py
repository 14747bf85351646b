"""The streaming per-token fast paths of the parsed chat stream give exactly what the
general paths give.

- `ChoiceParser.step` (the tuple the gRPC ParsingChoiceState reads per token, no `Parsed`
  made, no tool parser run while the reasoning parser keeps a piece whole), with the
  parsers' own fast paths on (the framed tool parser's in-call append with its clear-tail
  flag included), against `ChoiceParser.feed` with every fast path shut, piece by piece,
  over random splits of real model outputs (the Qwen3 chat template's rendering of a turn
  with reasoning, content and calls), with every tag also cut at its inner positions.
- ChatStreamWriter's one-orjson-call chunk for a lone content or reasoning piece against
  the general chunk builder (`_parsed_chunks`), byte for byte, over random token groupings.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import pytest
from parserutil import assistant_text, both, random_pieces, reasoning_parser, tool_parser

from smg.grpc.prepare import Defaults, prepare_chat
from smg.grpc.respond import ChatStreamWriter, Usage, parser_plan
from smg.grpc.types import EngineOutput
from smg.parsers import ChoiceParser
from smg.parsers.reasoning.tags import TagReasoningParser
from smg.parsers.toolcalls._framed import FramedToolParser
from smg.tokenizer import Tokenizer, load_tokenizer
from tests.test_grpc_parsers_e2e import EOT, TOOLS
from tests.tokenizer_data import llama31_dir, needs_llama3

SEED = 20261129
SPLITS = 150
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
CALLS = [("get_weather", {"city": 'Paris "<x>"', "days": 3}), ("get_time", {})]


def qwen3_turn(content: str, reasoning: str, calls: int) -> str:
    """A Qwen3 assistant turn as the model writes it (the template's rendering, the
    end-of-turn marker the engine stops on removed)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(CALLS[:calls])
        ]
    user = {"role": "user", "content": "Weather in Paris?"}
    text = assistant_text("Qwen-Qwen3-0.6B.jinja", [user, message], tools=TOOLS)
    end = "<|im_end|>\n"
    assert text.endswith(end), text[-40:]
    return text[: -len(end)]


TEXTS = [
    qwen3_turn("Let me check.", "The user wants <b>weather</b> in Paris.", 2),
    qwen3_turn("", "Only a call; a < sign and </thin in the reasoning.", 1),
    qwen3_turn("It is sunny <think>not a tag here</think>.", "Short.", 0),
    # The model writes the reasoning block itself (the toggle left it to the model).
    '<think>\nr < s\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
]
PARSERS = {
    "qwen3+qwen": lambda: both("qwen3", "qwen", TOOLS),
    "qwen3 in reasoning+qwen": lambda: both("qwen3", "qwen", TOOLS, in_reasoning=True),
    "qwen3_thinking+qwen": lambda: both("qwen3_thinking", "qwen", TOOLS),
    "qwen3 only": lambda: reasoning_parser("qwen3"),
    "qwen only": lambda: tool_parser("qwen", TOOLS),
}


def tag_cut_pieces(text: str, rng: random.Random) -> list[str]:
    """A random split with one more cut inside every tag occurrence (at a random inner
    position): a tag always arrives in two or more pieces."""
    bounds, at = set(), 0
    for piece in random_pieces(text, rng):
        at += len(piece)
        bounds.add(at)
    for tag in TAGS:
        start = text.find(tag)
        while start >= 0:
            bounds.add(start + rng.randint(1, len(tag) - 1))
            start = text.find(tag, start + 1)
    edges = [0, *sorted(b for b in bounds if 0 < b < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def splits(text: str, rng: random.Random) -> list[list[str]]:
    out = [[text], list(text)]
    out += [random_pieces(text, rng) for _ in range(SPLITS)]
    out += [tag_cut_pieces(text, rng) for _ in range(SPLITS)]
    # Every tag cut at every inner position, one piece boundary at a time.
    for tag in TAGS:
        at = text.find(tag)
        if at >= 0:
            out += [[text[: at + k], text[at + k :]] for k in range(1, len(tag))]
    return out


def general(parser: ChoiceParser) -> ChoiceParser:
    """The same parser with every fast path shut: each piece goes through the full scan
    (the reasoning parser's and the framed tool parser's lead-character checks, the
    framed parser's in-call append)."""
    reasoning, tools = parser._reasoning, parser._tools
    if isinstance(reasoning, TagReasoningParser):
        reasoning._lead = ""  # `"" not in text` is False: always _scan
    if isinstance(tools, FramedToolParser):
        tools._lead = tools._call_lead = ""
        tools._idle = False
    return parser


def events(parser: ChoiceParser, pieces: list[str], *, fast: bool) -> list[Any]:
    got: list[Any] = []
    for piece in pieces:
        if fast:
            reasoning, content, calls = parser.step(piece)
            got.append((reasoning, content, list(calls)))
        else:
            p = parser.feed(piece)
            got.append((p.reasoning, p.content, p.calls))
    end = parser.finish()
    got.append((end.reasoning, end.content, end.calls))
    return got


@pytest.mark.parametrize("family", sorted(PARSERS))
@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_step_gives_feeds_events_for_any_split(family: str, index: int) -> None:
    make = PARSERS[family]
    text = TEXTS[index]
    rng = random.Random(SEED + index)
    for pieces in splits(text, rng):
        assert "".join(pieces) == text
        fast = events(make(), pieces, fast=True)
        assert fast == events(general(make()), pieces, fast=False), pieces


def test_the_texts_exercise_every_state() -> None:
    """The real outputs reach reasoning, content and calls through the fast path."""
    reasoning = content = ""
    calls = 0
    for text in TEXTS:
        for r, c, found in events(PARSERS["qwen3+qwen"](), list(text), fast=True):
            reasoning += r
            content += c
            calls += len(found)
    assert "<b>weather</b>" in reasoning and "Let me check." in content
    assert "<think>not a tag here</think>" in content
    assert calls == 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(str(llama31_dir(tmp_path_factory.mktemp("llama31"))))


def stream(tok: Tokenizer, text: str, groups: list[int], *, fast: bool) -> bytes:
    p = prepare_chat(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
         "stream": True},
        Defaults(),
    )  # fmt: skip
    plan = parser_plan(p, "qwen", "qwen3", None)
    assert plan is not None
    state = plan.choice(0, tok, p.sampling)
    w = ChatStreamWriter(p, "abc", "m", 1, tok)
    w.use_parsers()
    if not fast:
        w._parsed_plain = None  # every chunk through the general builder
    ids = tok.encode(text)
    data = w.start()
    at = 0
    for size in groups:
        if at >= len(ids):
            break
        data += w.delta(state.on_output(EngineOutput(index=0, token_ids=ids[at : at + size])))
        at += size
    last = EngineOutput(index=0, token_ids=[EOT], finished=True, finish_reason="stop")
    data += w.delta(state.on_output(last)) + w.end(Usage(1, 1, 0))
    assert state.done()
    # Call ids are random (uuid4): masked so that two streams compare.
    return re.sub(rb"chatcmpl-tool-[0-9a-f]{32}", b"chatcmpl-tool-X", data)


@needs_llama3
@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_lone_piece_chunks_are_the_general_chunks_bytes(tok: Tokenizer, index: int) -> None:
    rng = random.Random(SEED * 7 + index)
    text = TEXTS[index]
    for _ in range(20):
        groups = [rng.choice((1, 1, 1, 2, 3)) for _ in range(len(text))]
        fast = stream(tok, text, groups, fast=True)
        assert fast == stream(tok, text, groups, fast=False)
        assert b'"reasoning_content"' in fast
