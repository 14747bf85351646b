"""Process the response: engine outputs -> text deltas -> OpenAI / SGLang bodies and SSE.

Pure (no I/O). `ChoiceState` turns one choice's `EngineOutput`s into `Delta`s with the
tokenizer's incremental detokenizer and a stop-string matcher (the engine is sent the
stop strings too, but only the gateway sees the text, so it matches them itself across
token boundaries and hides them unless include_stop_str_in_output, as vLLM's output
processor does). The writers and `*_body` functions produce vLLM's OpenAI shapes
(`chat.completion`, `chat.completion.chunk`, `text_completion`) and SGLang's /generate
shape; every body parses with the openai client's models unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from smg.grpc.types import EngineOutput, SamplingParams, TokenLogprob
from smg.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer

if TYPE_CHECKING:
    from smg.grpc.prepare import Prepared
    from smg.parsers import ChoiceParser

_DONE = b"data: [DONE]\n\n"
# The end of a chat chunk whose choice is still open (no logprobs, no finish_reason).
_OPEN_CHUNK_END = b'},"logprobs":null,"finish_reason":null}]}\n\n'
# vLLM clamps -inf logprobs to this so the JSON stays valid
_MIN_LOGPROB = -9999.0


@dataclass(slots=True)
class Delta:
    """What one engine output added to one choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # set once, on the choice's last delta
    # vLLM's stop_reason: the stop string, or the stop token id (None for the model's EOS)
    matched_stop: int | str | None
    token_ids: list[int] = field(default_factory=list)
    # SGLang's prompt logprobs (logprob or None, token id), on a finished delta when asked
    input_logprobs: list[tuple[float | None, int]] | None = None


@dataclass(slots=True)
class ParsedDelta(Delta):
    """A delta of a parsed choice (ParsingChoiceState): `text` is the content that is
    certain so far, beside the reasoning and the whole tool calls this output completed."""

    reasoning: str = ""
    calls: Sequence[CallOut] = ()


@dataclass(frozen=True, slots=True)
class CallOut:
    """One whole tool call as the answer carries it: its position among the choice's
    calls (the stream's `index`), its id, name and arguments (JSON text)."""

    index: int
    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def finish_reason_of(engine_reason: str | None) -> str:
    """The engine's words -> the client's. vLLM's OpenAI server passes "stop", "length"
    and "abort" through and reads a missing reason as "stop"; anything else (an engine
    "error") becomes "abort" rather than a "stop" that would hide a failure."""
    if engine_reason in ("stop", "length", "abort"):
        return engine_reason
    return "stop" if not engine_reason else "abort"


class ChoiceState:
    """One choice: B's IncrementalDetokenizer + StopMatcher, the finish reason.

    The engine was sent the stop strings too and may already have stopped on one, but
    only the gateway sees text: it matches them itself across token boundaries (from
    the token after min_tokens on, as vLLM), hides them unless
    include_stop_str_in_output, and then ends the choice with finish "stop" (later
    outputs give empty deltas; the caller aborts the engine). A stop token (EOS or one
    of stop_token_ids) is not detokenized unless include_stop_str_in_output, as vLLM's
    detokenizer skips a stop-terminated sequence's last token; with it, a special token
    still shows only when skip_special_tokens is off."""

    __slots__ = (
        "_detok",
        "_done",
        "_hold",
        "_include_stop",
        "_min_tokens",
        "_pending",
        "_primary_eos",
        "_stop_ids",
        "_stops",
        "_tokens",
        "index",
    )

    # What a live choice's outputs become (a parsing choice's: ParsedDelta, made at once
    # rather than copied from a Delta per token).
    _delta_class: type[Delta] = Delta

    def __init__(self, index: int, tokenizer: Tokenizer, sampling: SamplingParams) -> None:
        self.index = index
        self._detok = IncrementalDetokenizer(
            tokenizer,
            skip_special_tokens=sampling.skip_special_tokens,
            spaces_between_special_tokens=sampling.spaces_between_special_tokens,
        )
        self._stops = (
            StopMatcher(sampling.stop, include_stop=sampling.include_stop_str_in_output)
            if sampling.stop
            else None
        )
        self._include_stop = sampling.include_stop_str_in_output
        # A finished "stop" whose last token is one of these ended on a stop token (vLLM
        # reports stop_reason None for EOS, the id for stop_token_ids).
        self._stop_ids = frozenset(sampling.stop_token_ids) | frozenset(tokenizer.eos_token_ids)
        self._primary_eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self._min_tokens = sampling.min_tokens
        self._tokens = 0
        self._done = False
        self._pending: list[int] | None = None
        # Only a stop token that decodes to text needs holding: special tokens kept, or
        # stop_token_ids (which may be ordinary tokens).
        self._hold = not self._include_stop and (
            not sampling.skip_special_tokens or bool(sampling.stop_token_ids)
        )

    def done(self) -> bool:
        return self._done

    def on_output(self, out: EngineOutput) -> Delta:
        if self._done:
            return Delta(self.index, "", None, None, None, [])
        ids = out.token_ids
        finished = out.finished
        text_ids = ids
        if self._hold:
            # A streamed chunk may end on a stop token before the complete says the
            # engine stopped on it: hold it until then (it is text only if more follows).
            if self._pending is not None:
                text_ids = self._pending + ids
                self._pending = None
            if not finished and text_ids and text_ids[-1] in self._stop_ids:
                self._pending = [text_ids[-1]]
                text_ids = text_ids[:-1]
        if not finished and self._stops is None:
            # The common streamed token: text out, nothing to match or end.
            self._tokens += len(ids)
            return self._delta_class(
                self.index,
                self._detok.add(text_ids) if text_ids else "",
                out.logprobs,
                None,
                None,
                ids,
                out.input_logprobs,
            )
        if finished:
            last = text_ids[-1] if text_ids else None  # the choice's last token
            if (
                text_ids
                and not self._include_stop
                and out.finish_reason == "stop"
                and not isinstance(out.matched_stop, str)
                and (last == out.matched_stop or last in self._stop_ids)
            ):
                text_ids = text_ids[:-1]
        self._tokens += len(ids)
        text = self._detok.add(text_ids) if text_ids else ""
        if out.finished:
            text += self._detok.finish()
        stops = self._stops
        if stops is not None and self._tokens > self._min_tokens:
            safe, hit = stops.feed(text)
            if hit is not None:
                self._done = True
                return self._delta_class(
                    self.index, safe, out.logprobs, "stop", hit, ids, out.input_logprobs
                )
            if out.finished:
                safe += stops.finish()
            text = safe
        if out.finished:
            self._done = True
            reason = finish_reason_of(out.finish_reason)
            matched = out.matched_stop if reason == "stop" else None
            if reason == "stop" and not isinstance(matched, str):
                # vLLM's stop_reason whatever the engine reported: None for the model's
                # EOS, the id for another stop token (stop_token_ids and the extra EOS ids
                # of generation_config.json, which vLLM adds to them)
                if matched is None and last in self._stop_ids:
                    matched = last
                if matched == self._primary_eos:
                    matched = None
            return self._delta_class(
                self.index, text, out.logprobs, reason, matched, ids, out.input_logprobs
            )
        return self._delta_class(
            self.index, text, out.logprobs, None, None, ids, out.input_logprobs
        )


class ParsingChoiceState(ChoiceState):
    """A choice whose text goes through output parsers (smg.parsers.ChoiceParser):
    reasoning first, then tool calls. Each delta's text becomes the content that is
    certain so far, with the reasoning and the whole calls beside it; the parser is
    finished on the choice's last delta. A choice that stopped normally after emitting
    calls ends with finish_reason "tool_calls" (1.13 streaming and vLLM). `parallel`
    False keeps only the first call (parallel_tool_calls: false). A call's id is the
    one the model wrote where its format has one (Kimi-K2's `functions.NAME:IDX`, read
    back by its template), otherwise `tool_call_id()`."""

    __slots__ = ("_calls", "_parallel", "_parser")
    _delta_class = ParsedDelta

    def __init__(
        self,
        index: int,
        tokenizer: Tokenizer,
        sampling: SamplingParams,
        parser: ChoiceParser,
        *,
        parallel: bool = True,
    ) -> None:
        super().__init__(index, tokenizer, sampling)
        self._parser = parser
        self._parallel = parallel
        self._calls = 0

    def on_output(self, out: EngineOutput) -> Delta:
        was_done = self._done
        d: Any = ChoiceState.on_output(self, out)  # a ParsedDelta (_delta_class)
        if was_done:
            return d
        d.input_logprobs = None  # as the copy made before: chat has no prompt logprobs
        final = d.finish_reason is not None
        if not d.text and not final:
            return d
        parser = self._parser
        if final:
            parsed = parser.feed(d.text)
            parsed.extend(parser.finish())
            d.reasoning, d.text, calls = parsed.reasoning, parsed.content, parsed.calls
        else:
            # The per-token path: a tuple, no Parsed (most pieces complete no call).
            d.reasoning, d.text, calls = parser.step(d.text)
        if calls:
            if not self._parallel:
                calls = calls[: max(0, 1 - self._calls)]
            out_calls = []
            for call in calls:
                i = self._calls
                self._calls += 1
                call_id = call.id or tool_call_id()
                out_calls.append(CallOut(i, call_id, call.name, call.arguments))
            d.calls = out_calls
        if final and d.finish_reason == "stop" and self._calls:
            d.finish_reason = "tool_calls"
        return d


@dataclass(frozen=True, slots=True)
class ParserPlan:
    """Which parsers one attempt's choices get (chosen per worker by smg.parsers.select,
    switched per request by `parser_plan`); `choice` makes a fresh state per choice."""

    tool: str | None
    reasoning: str | None
    in_reasoning: bool | None
    tools: Sequence[dict]
    parallel: bool

    def choice(self, index: int, tokenizer: Tokenizer, sampling: SamplingParams) -> ChoiceState:
        from smg.parsers import ChoiceParser, reasoning_parser_class, tool_parser_class

        reasoning = (
            reasoning_parser_class(self.reasoning)(in_reasoning=self.in_reasoning)
            if self.reasoning is not None
            else None
        )
        tools = tool_parser_class(self.tool)(self.tools) if self.tool is not None else None
        return ParsingChoiceState(
            index,
            tokenizer,
            sampling,
            ChoiceParser(reasoning, tools),
            parallel=self.parallel,
        )


def may_parse(p: Prepared) -> bool:
    """Whether any output parser can apply (checked before choosing parsers). Not with
    tool_choice required / a named function: the engine's JSON constraint shapes the
    output from its first token, so there is no reasoning block or call syntax to
    parse; the tool_choice path reads the JSON (issue 10, unchanged)."""
    return p.kind == "chat" and p.tool_choice is None and (p.parse_tools or p.separate_reasoning)


def parser_plan(
    p: Prepared, tool: str | None, reasoning: str | None, in_reasoning: bool | None
) -> ParserPlan | None:
    """The Rust SMG 1.13's rules for which requests parse: chat only; tool calls when
    `tools` are given and tool_choice is auto/absent (none: no tool parsing; required
    / a named function keep the JSON-constraint path, with no parsing at all: 1.13
    would run the reasoning parser over the constrained JSON); reasoning when
    separate_reasoning (default true). None: no parsing (the plain path, unchanged)."""
    if not may_parse(p):
        return None
    tool = tool if p.parse_tools else None
    reasoning = reasoning if p.separate_reasoning else None
    if tool is None and reasoning is None:
        return None
    return ParserPlan(tool, reasoning, in_reasoning, p.tools or (), p.parallel_tool_calls)


# --------------------------------------------------------------------------- logprobs


def _token_text(tokenizer: Any, token_id: int, cache: dict[int, str]) -> str:
    """vLLM's `convert_ids_list_to_tokens` for a byte-level vocabulary: the token's own
    decode with special tokens kept; a piece of a multi-byte character is U+FFFD."""
    text = cache.get(token_id)
    if text is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        cache[token_id] = text
    return text


def _lp(value: float) -> float:
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB  # also maps NaN to the floor


def _best_first(top: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(top, key=lambda p: -p[1])


def chat_logprobs(
    entries: Sequence[TokenLogprob], top: int, tokenizer: Any, cache: dict[int, str]
) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` items: token, logprob, bytes (the UTF-8 of the token's
    text, as vLLM), top_logprobs: the `top` best, best first (OpenAI's order; vLLM puts
    the sampled token first, the same thing for greedy decoding)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        token = _token_text(tokenizer, entry.token_id, cache)
        alternatives = []
        if top > 0:
            for alt_id, alt_lp in _best_first(entry.top)[:top]:
                alt = _token_text(tokenizer, alt_id, cache)
                alternatives.append(
                    {
                        "token": alt,
                        "logprob": _lp(alt_lp),
                        "bytes": list(alt.encode("utf-8", "replace")),
                    }
                )
        out.append(
            {
                "token": token,
                "logprob": _lp(entry.logprob),
                "bytes": list(token.encode("utf-8", "replace")),
                "top_logprobs": alternatives,
            }
        )
    return out


def completion_logprobs(
    entries: Sequence[TokenLogprob],
    top: int,
    tokenizer: Any,
    cache: dict[int, str],
    offset: int,
) -> tuple[dict[str, Any], int]:
    """Completions' logprobs as vLLM writes them: tokens, token_logprobs, text_offset
    (characters of the tokens' own texts from `offset`) and per token a dict of the
    sampled token then the `top` best (at most top + 1 entries, the legacy API's rule);
    returns the offset after them."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for entry in entries:
        token = _token_text(tokenizer, entry.token_id, cache)
        tokens.append(token)
        token_logprobs.append(_lp(entry.logprob))
        alternatives = {token: _lp(entry.logprob)}
        if top > 0:
            for alt_id, alt_lp in _best_first(entry.top)[:top]:
                alternatives.setdefault(_token_text(tokenizer, alt_id, cache), _lp(alt_lp))
        tops.append(alternatives)
        offsets.append(offset)
        offset += len(token)
    body = {
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": tops,
    }
    return body, offset


# --------------------------------------------------------------------------- tool calls


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's make_tool_call_id


def tool_calls_from(text: str, choice: str) -> list[dict[str, Any]]:
    """vLLM's non-streaming tool calls for tool_choice "required" (the output is a JSON
    array of {name, parameters}; arguments re-serialised with json.dumps as vLLM does;
    an unparsable array gives none) and a named function (the output is its arguments;
    a blank output gives none)."""
    if choice != "required":
        if not text.strip():
            return []
        return [_tool_call(choice, text)]
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list) or not all(
        isinstance(i, dict)
        and isinstance(i.get("name"), str)
        and isinstance(i.get("parameters", {}), (dict, type(None)))
        for i in items
    ):
        return []
    return [
        _tool_call(i["name"], json.dumps(i.get("parameters"), ensure_ascii=False)) for i in items
    ]


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": tool_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class _RequiredCall:
    __slots__ = ("args_end", "args_start", "name", "name_end")

    def __init__(self) -> None:
        self.name: str | None = None
        self.name_end = -1
        self.args_start = -1
        self.args_end = -1  # -1: still open


def scan_required_calls(text: str) -> list[_RequiredCall]:
    """Where each element of a (possibly partial) `[{"name": ..., "parameters": ...},
    ...]` array sits in `text`: its name once the string is closed, and the span of its
    parameters value. Prefix-stable (a prefix of the text gives the same spans cut
    short), so what an earlier, shorter text revealed is read off the same scan."""
    calls: list[_RequiredCall] = []
    depth = 0
    in_str = escaped = False
    str_start = 0
    cur: _RequiredCall | None = None
    key: str | None = None
    state = "key"  # key | colon | value | string | container | scalar | after
    value_start = 0

    def close_value(end: int) -> None:
        nonlocal state
        assert cur is not None
        if key == "parameters":
            cur.args_end = end
        elif key == "name" and state == "string":
            try:
                name = json.loads(text[value_start:end])
            except ValueError:
                name = None
            if isinstance(name, str):
                cur.name, cur.name_end = name, end
        state = "after"

    for i, ch in enumerate(text):
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
                if depth == 2 and cur is not None:
                    if state == "key":
                        key, state = text[str_start + 1 : i], "colon"
                    elif state == "string":
                        close_value(i + 1)
            continue
        if ch == '"':
            in_str, str_start = True, i
            if depth == 2 and cur is not None and state == "value":
                value_start, state = i, "string"
                if key == "parameters":
                    cur.args_start = i
            continue
        if ch in "{[":
            if (depth == 0 and ch != "[") or (depth == 1 and ch != "{"):
                return calls
            if depth == 1:
                cur, key, state = _RequiredCall(), None, "key"
                calls.append(cur)
            elif depth == 2 and cur is not None and state == "value":
                value_start, state = i, "container"
                if key == "parameters":
                    cur.args_start = i
            depth += 1
            continue
        if ch in "}]":
            if depth == 2 and cur is not None and state == "scalar":
                close_value(i)
            depth -= 1
            if depth == 2 and cur is not None and state == "container":
                close_value(i + 1)
            elif depth == 1:
                cur = None
            elif depth <= 0:
                return calls
            continue
        if depth != 2 or cur is None:
            continue
        if ch == ":":
            if state == "colon":
                state = "value"
        elif ch == ",":
            if state == "scalar":
                close_value(i)
            key, state = None, "key"
        elif ch.isspace():
            if state == "scalar":
                close_value(i)
        elif state == "value":
            value_start, state = i, "scalar"
            if key == "parameters":
                cur.args_start = i
    return calls


def required_tool_deltas(previous: str, current: str) -> list[dict[str, Any]]:
    """The tool-call deltas `current` adds to `previous` (its prefix) for tool_choice
    "required", as vLLM streams them: a call is announced (id, type, name, the
    arguments so far) once its name is closed and its parameters have started; later
    chunks carry only new argument text."""
    out: list[dict[str, Any]] = []
    sent = len(previous)
    for index, call in enumerate(scan_required_calls(current)):
        if call.name is None or call.args_start < 0:
            break  # elements come in order: nothing later is ready
        end = call.args_end if call.args_end >= 0 else len(current)
        if call.name_end <= sent and call.args_start < sent:
            new = current[min(end, sent) : end]
            if new:
                out.append({"index": index, "function": {"arguments": new}})
            continue
        out.append(
            {
                "id": tool_call_id(),
                "type": "function",
                "index": index,
                "function": {"name": call.name, "arguments": current[call.args_start : end]},
            }
        )
    return out


# --------------------------------------------------------------------------- chat role, echo


def chat_role(p: Prepared) -> str:
    """vLLM's response role: "assistant", or with add_generation_prompt off the last
    message's role (the answer continues it)."""
    if p.add_generation_prompt or not p.messages:
        return "assistant"
    role = p.messages[-1].get("role")
    return role if isinstance(role, str) else "assistant"


def chat_echo(p: Prepared, role: str) -> str:
    """vLLM's chat `echo`: the last message's content leads the answer when it has the
    answer's role (text parts joined with newlines)."""
    if not p.echo or not p.messages or p.messages[-1].get("role") != role:
        return ""
    content = p.messages[-1].get("content")
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


# --------------------------------------------------------------------------- SSE writers


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Writer:
    _head: bytes  # a chunk's bytes up to its choices list (the chat and completion writers)

    def __init__(
        self,
        prepared: Prepared,
        request_id: str,
        model: str,
        created: int,
        tokenizer: Any,
        *,
        prompt_tokens: int = 0,
    ) -> None:
        self.p = prepared
        self.request_id = request_id
        self.model = model
        self.created = created
        self.tokenizer = tokenizer
        self.n = max(1, prepared.sampling.n)
        # For continuous_usage_stats (the frontend may set it once the prompt is known).
        self.prompt_tokens = prompt_tokens
        self.completion = [0] * self.n
        self._cache: dict[int, str] = {}
        self._continuous = prepared.include_usage and prepared.continuous_usage
        # A batched completion's prompt i: its choices are numbered from batch_index(i, n, 0)
        self.index_offset = 0

    def end(self, usage: Usage) -> bytes:
        """The usage chunk when asked (choices empty), then [DONE]."""
        if not self.p.include_usage:
            return _DONE
        return (
            b"data: "
            + self._head
            + b'],"usage":'
            + orjson.dumps(usage.as_dict())
            + b"}\n\n"
            + _DONE
        )

    def _usage_now(self, index: int) -> dict[str, Any]:
        done = self.completion[index] if 0 <= index < self.n else 0
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def _index(self, d: Delta) -> int:
        return d.index if 0 <= d.index < self.n else 0


class ChatStreamWriter(_Writer):
    """vLLM's chat stream: a role chunk per choice (`{"role": "assistant", "content":
    ""}`), then a chunk per engine output that brought tokens (content "" while the
    detokenizer or the stop matcher holds text back, as vLLM), the choice's last chunk
    with finish_reason and stop_reason, the usage chunk (choices []) with include_usage,
    `data: [DONE]`. tool_choice "required" / named: tool_calls deltas as vLLM streams
    them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = chat_id(self.request_id)
        self._texts = [""] * self.n  # tool_choice: each choice's text so far
        self._named_started = [False] * self.n
        self._parsed_plain: dict[str, list[bytes]] | None = None
        self._tools_streamed = [False] * self.n
        self._head = (
            b'{"id":'
            + orjson.dumps(self.id)
            + b',"object":"chat.completion.chunk","created":'
            + str(self.created).encode()
            + b',"model":'
            + orjson.dumps(self.model)
            + b',"choices":['
        )
        # The common chunk (plain content, no logprobs, not the last) is written from
        # these pieces: one orjson call per token instead of a dict per chunk.
        self._plain = (
            None
            if self.p.tool_choice is not None or self.p.logprobs or self._continuous
            else [
                b"data: " + self._head + b'{"index":%d,"delta":{"content":' % i
                for i in range(self.n)
            ]
        )

    def _chunk(self, choice: dict[str, Any], index: int) -> bytes:
        tail = b"]"
        if self._continuous:
            tail += b',"usage":' + orjson.dumps(self._usage_now(index))
        return b"data: " + self._head + orjson.dumps(choice) + tail + b"}\n\n"

    def start(self) -> bytes:
        role = chat_role(self.p)
        out = [
            self._chunk(
                {
                    "index": i,
                    "delta": {"role": role, "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                },
                i,
            )
            for i in range(self.n)
        ]
        echo = chat_echo(self.p, role)
        if echo:
            out.extend(
                self._chunk(
                    {
                        "index": i,
                        "delta": {"content": echo},
                        "logprobs": None,
                        "finish_reason": None,
                    },
                    i,
                )
                for i in range(self.n)
            )
        return b"".join(out)

    def use_parsers(self) -> None:
        """The choices' deltas come parsed (ParsingChoiceState): the plain-chunk shortcut
        becomes one for a lone content or reasoning_content piece."""
        self._plain = None
        if self.p.logprobs or self._continuous:
            return
        self._parsed_plain = {
            key: [
                b"data: " + self._head + b'{"index":%d,"delta":{"%s":' % (i, key.encode())
                for i in range(self.n)
            ]
            for key in ("content", "reasoning_content")
        }

    def _parsed_chunks(self, d: ParsedDelta, i: int, logprobs: dict[str, Any] | None) -> bytes:
        """A parsed delta as chunks: its reasoning_content, its content, then each whole
        call as two deltas (id, type, name with arguments "", then the arguments), the
        way OpenAI streams calls; logprobs ride on the first chunk, finish_reason and
        stop_reason on the last (an empty delta when nothing else is left to say)."""
        deltas: list[dict[str, Any]] = []
        if d.reasoning:
            deltas.append({"reasoning_content": d.reasoning})
        if d.text:
            deltas.append({"content": d.text})
        for call in d.calls:
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": call.index,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
            deltas.append(
                {"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]}
            )
        if not deltas:
            if d.finish_reason is None and logprobs is None:
                return b""  # held back (a possible marker): nothing certain yet
            deltas.append({"content": ""} if d.finish_reason is None else {})
        out = []
        last = len(deltas) - 1
        for n, message in enumerate(deltas):
            choice: dict[str, Any] = {
                "index": i,
                "delta": message,
                "logprobs": logprobs if n == 0 else None,
                "finish_reason": d.finish_reason if n == last else None,
            }
            if n == last and d.finish_reason is not None:
                choice["stop_reason"] = d.matched_stop
            out.append(self._chunk(choice, i))
        return b"".join(out)

    def _tool_delta(self, i: int, text: str) -> dict[str, Any] | None:
        choice = self.p.tool_choice
        if choice == "required":
            previous = self._texts[i]
            self._texts[i] = current = previous + text
            calls = required_tool_deltas(previous, current) if text else []
        elif text:
            if self._named_started[i]:
                calls = [{"index": 0, "function": {"arguments": text}}]
            else:
                self._named_started[i] = True
                calls = [
                    {
                        "id": tool_call_id(),
                        "type": "function",
                        "index": 0,
                        "function": {"name": choice, "arguments": text},
                    }
                ]
        else:
            calls = []
        if not calls:
            return None
        self._tools_streamed[i] = True
        return {"tool_calls": calls}

    def delta(self, d: Delta) -> bytes:
        if not d.token_ids and not d.text and d.finish_reason is None:
            return b""
        i = self._index(d)
        self.completion[i] += len(d.token_ids)
        if d.finish_reason is None:
            if self._plain is not None:
                return self._plain[i] + orjson.dumps(d.text) + _OPEN_CHUNK_END
            fast = self._parsed_plain
            if fast is not None and type(d) is ParsedDelta and not d.calls:
                # The common parsed chunk (no logprobs: use_parsers leaves fast None with
                # them): one piece of content or of reasoning, one orjson call; or
                # nothing while the parsers hold the piece (a call being read).
                if not d.reasoning:
                    if d.text:
                        return fast["content"][i] + orjson.dumps(d.text) + _OPEN_CHUNK_END
                    return b""
                if not d.text:
                    return (
                        fast["reasoning_content"][i] + orjson.dumps(d.reasoning) + _OPEN_CHUNK_END
                    )
        logprobs = None
        if self.p.logprobs and d.logprobs is not None:
            logprobs = {
                "content": chat_logprobs(
                    d.logprobs, self.p.top_logprobs, self.tokenizer, self._cache
                )
            }
        if isinstance(d, ParsedDelta):
            return self._parsed_chunks(d, i, logprobs)
        if self.p.tool_choice is None:
            message: dict[str, Any] = {"content": d.text}
        else:
            tool = self._tool_delta(i, d.text)
            if tool is None and d.finish_reason is None and logprobs is None:
                return b""
            message = tool or {}
        choice: dict[str, Any] = {"index": i, "delta": message, "logprobs": logprobs}
        if d.finish_reason is None:
            choice["finish_reason"] = None
        else:
            reason = d.finish_reason
            if reason == "stop" and self.p.tool_choice == "required" and self._tools_streamed[i]:
                reason = "tool_calls"  # vLLM: "required" tool calls end as tool_calls
            choice["finish_reason"] = reason
            choice["stop_reason"] = d.matched_stop
        return self._chunk(choice, i)


class CompletionStreamWriter(_Writer):
    """vLLM's completions stream: `text_completion` chunks with finish_reason and
    stop_reason on each (null until the end); echo puts the prompt before the choice's
    first text, in the same chunk, as vLLM does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = completion_id(self.request_id)
        self._offsets = [0] * self.n
        self._echo: str | None = _prompt_text(self.p, self.tokenizer) if self.p.echo else None
        self._echoed = [False] * self.n
        self._head = (
            b'{"id":'
            + orjson.dumps(self.id)
            + b',"object":"text_completion","created":'
            + str(self.created).encode()
            + b',"model":'
            + orjson.dumps(self.model)
            + b',"choices":['
        )

    def _chunk(self, choice: dict[str, Any], index: int) -> bytes:
        tail = b"]"
        if self._continuous:
            tail += b',"usage":' + orjson.dumps(self._usage_now(index))
        return b"data: " + self._head + orjson.dumps(choice) + tail + b"}\n\n"

    def start(self) -> bytes:
        return b""

    def delta(self, d: Delta) -> bytes:
        i = self._index(d)
        text = d.text
        if self._echo is not None and not self._echoed[i]:
            self._echoed[i] = True
            text = self._echo + text
            self._offsets[i] = len(self._echo)
        elif not d.token_ids and not text and d.finish_reason is None:
            return b""
        self.completion[i] += len(d.token_ids)
        logprobs = None
        if self.p.logprobs and d.logprobs is not None:
            logprobs, self._offsets[i] = completion_logprobs(
                d.logprobs, self.p.top_logprobs, self.tokenizer, self._cache, self._offsets[i]
            )
        choice = {
            "index": d.index + self.index_offset,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": d.finish_reason,
            "stop_reason": d.matched_stop,
        }
        return self._chunk(choice, i)


class GenerateStreamWriter(_Writer):
    """SGLang's /generate stream: per delta `data: {text, output_ids, meta_info}` with
    the choice's text and ids so far (SGLang's default, not incremental; "index" with
    n > 1), then `data: [DONE]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._text = [""] * self.n
        self._ids: list[list[int]] = [[] for _ in range(self.n)]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]
        # The prompt logprobs once the engine sent them (SGLang: its stream's first chunk;
        # PD: the prefill's), then in every chunk's meta_info as SGLang's HTTP stream
        # repeats them (not incremental) and 1.13's PD stream does.
        self._inputs: list[list[tuple[float | None, int]] | None] = [None] * self.n

    def start(self) -> bytes:
        return b""

    def delta(self, d: Delta) -> bytes:
        i = self._index(d)
        if d.input_logprobs is not None:
            self._inputs[i] = d.input_logprobs
        if not d.text and not d.token_ids and d.finish_reason is None:
            return b""
        self._text[i] += d.text
        self._ids[i].extend(d.token_ids)
        if d.logprobs:
            self._logprobs[i].extend(d.logprobs)
        self.completion[i] = len(self._ids[i])
        usage = Usage(self.prompt_tokens, len(self._ids[i]), 0)
        obj = _generate_item(
            self.p,
            _generate_id(self.request_id, i, self.n),
            self._text[i],
            self._ids[i],
            self._logprobs[i],
            d.finish_reason,
            d.matched_stop,
            usage,
            self.tokenizer,
            self._cache,
            self._inputs[i],
        )
        if self.n > 1:
            obj["index"] = i
        return _event(obj)

    def end(self, usage: Usage) -> bytes:
        return _DONE


# --------------------------------------------------------------------------- bodies


def chat_id(request_id: str) -> str:
    return request_id if request_id.startswith("chatcmpl-") else f"chatcmpl-{request_id}"


def completion_id(request_id: str) -> str:
    return request_id if request_id.startswith("cmpl-") else f"cmpl-{request_id}"


def _generate_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{index}"


def _collect(
    deltas: Sequence[Delta],
) -> tuple[str, list[int], list[TokenLogprob], str | None, int | str | None]:
    text = "".join(d.text for d in deltas)
    ids = [t for d in deltas for t in d.token_ids]
    logprobs = [e for d in deltas if d.logprobs for e in d.logprobs]
    reason = None
    matched = None
    for d in deltas:
        if d.finish_reason is not None:
            reason = d.finish_reason
            matched = d.matched_stop
    return text, ids, logprobs, reason, matched


def chat_body(
    prepared: Prepared,
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    usage: Usage,
) -> bytes:
    """The non-streaming `chat.completion` body; `choices` holds each choice's deltas."""
    cache: dict[int, str] = {}
    role = chat_role(prepared)
    echo = chat_echo(prepared, role)
    out = []
    for index, deltas in enumerate(choices):
        text, _ids, logprobs, reason, matched = _collect(deltas)
        reason = reason or "stop"
        message: dict[str, Any] = {"role": role, "content": echo + text}
        if deltas and isinstance(deltas[0], ParsedDelta):
            message = _parsed_message(role, echo + text, deltas)
        elif prepared.tool_choice is not None:
            # vLLM: content "" and the parsed calls; "required" that stopped -> tool_calls
            message = {
                "role": role,
                "content": "",
                "tool_calls": tool_calls_from(text, prepared.tool_choice),
            }
            if prepared.tool_choice == "required" and reason == "stop":
                reason = "tool_calls"
        out.append(
            {
                "index": index,
                "message": message,
                "logprobs": {
                    "content": chat_logprobs(logprobs, prepared.top_logprobs, tokenizer, cache)
                }
                if prepared.logprobs
                else None,
                "finish_reason": reason,
                "stop_reason": matched,
            }
        )
    return orjson.dumps(
        {
            "id": chat_id(request_id),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": usage.as_dict(),
        }
    )


def _parsed_message(role: str, content: str, deltas: Sequence[Delta]) -> dict[str, Any]:
    """A parsed choice's message: content (null when only whitespace is left, as 1.13's
    normalize_assistant_content: the "\n\n" between reasoning and a call is not an
    answer), reasoning_content (null when none), tool_calls when the model made any."""
    parsed = [d for d in deltas if isinstance(d, ParsedDelta)]
    reasoning = "".join(d.reasoning for d in parsed)
    calls = [c.as_dict() for d in parsed for c in d.calls]
    message: dict[str, Any] = {
        "role": role,
        "content": content if content.strip() else None,
        "reasoning_content": reasoning or None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _prompt_text(prepared: Prepared, tokenizer: Any) -> str:
    prompt = prepared.prompt
    if isinstance(prompt, list):
        return tokenizer.decode(prompt, skip_special_tokens=False)
    return prompt or ""


def completion_body(
    prepared: Prepared,
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    usage: Usage,
) -> bytes:
    """The non-streaming `text_completion` body (echo: the prompt leads the text)."""
    return _completion_answer(
        request_id,
        model,
        created,
        _completion_choices(prepared, tokenizer, choices, {}, 0),
        usage,
    )


def batch_index(prompt_index: int, n: int, choice_index: int) -> int:
    """A batched completion's choice index, as vLLM numbers them: prompt i's sample j is
    choice i * n + j (prompt-major; the Rust SMG's `prompt_index * n + choice_index`)."""
    return prompt_index * n + choice_index


def summed_usage(usages: Sequence[Usage]) -> Usage:
    """A batched completion's usage: every prompt's prompt, completion and cached tokens
    added up (vLLM's and the Rust SMG's totals)."""
    return Usage(
        sum(u.prompt_tokens for u in usages),
        sum(u.completion_tokens for u in usages),
        sum(u.cached_tokens for u in usages),
    )


def completion_batch_body(
    parts: Sequence[Prepared],
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Sequence[Delta]]],
    usage: Usage,
) -> bytes:
    """A batched completion's body: `parts[i]` is prompt i's request, `choices[i]` its
    choices' deltas; one `text_completion` whose choices run prompt by prompt, indexed
    by `batch_index`, with the summed `usage`."""
    cache: dict[int, str] = {}
    out: list[dict[str, Any]] = []
    for i, (part, deltas) in enumerate(zip(parts, choices, strict=True)):
        n = max(1, part.sampling.n)
        out.extend(_completion_choices(part, tokenizer, deltas, cache, batch_index(i, n, 0)))
    return _completion_answer(request_id, model, created, out, usage)


def _completion_answer(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]], usage: Usage
) -> bytes:
    return orjson.dumps(
        {
            "id": completion_id(request_id),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage.as_dict(),
        }
    )


def _completion_choices(
    prepared: Prepared,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    cache: dict[int, str],
    first_index: int,
) -> list[dict[str, Any]]:
    prefix = _prompt_text(prepared, tokenizer) if prepared.echo else ""
    out = []
    for index, deltas in enumerate(choices, first_index):
        text, _ids, logprobs, reason, matched = _collect(deltas)
        lp = None
        if prepared.logprobs:
            lp, _ = completion_logprobs(
                logprobs, prepared.top_logprobs, tokenizer, cache, len(prefix)
            )
        out.append(
            {
                "index": index,
                "text": prefix + text,
                "logprobs": lp,
                "finish_reason": reason or "stop",
                "stop_reason": matched,
            }
        )
    return out


def _sglang_finish(reason: str | None, matched: int | str | None, length: int) -> Any:
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": length}
    if reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": matched}


def _generate_item(
    prepared: Prepared,
    rid: str,
    text: str,
    ids: list[int],
    logprobs: list[TokenLogprob],
    reason: str | None,
    matched: int | str | None,
    usage: Usage,
    tokenizer: Any,
    cache: dict[int, str],
    inputs: list[tuple[float | None, int]] | None = None,
) -> dict[str, Any]:
    if reason == "stop" and matched is None and ids and ids[-1] in tokenizer.eos_token_ids:
        matched = ids[-1]  # SGLang names the EOS it stopped on (vLLM's stop_reason: None)
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": _sglang_finish(reason, matched, len(ids)),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
    }
    if prepared.logprobs:
        # SGLang: [logprob, token_id, text-or-None] triples; top ones per position
        with_text = prepared.return_text_in_logprobs

        def triple(token_id: int, value: float | None) -> list[Any]:
            return [value, token_id, _token_text(tokenizer, token_id, cache) if with_text else None]

        if inputs is not None:
            # the Rust SMG 1.13 renders them only when the engine sent some (an SGLang
            # request with logprob_start_len >= 0): [logprob or null, token_id, text]
            meta["input_token_logprobs"] = [triple(t, v) for v, t in inputs]
        meta["output_token_logprobs"] = [triple(e.token_id, e.logprob) for e in logprobs]
        if prepared.top_logprobs > 0:
            meta["output_top_logprobs"] = [
                [
                    triple(t, v)
                    for t, v in sorted(e.top, key=lambda p: -p[1])[: prepared.top_logprobs]
                ]
                for e in logprobs
            ]
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def generate_body(
    prepared: Prepared,
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    usage: Usage,
) -> bytes:
    """SGLang's non-streaming /generate answer: one object, or a list of them for n > 1
    (each choice's own completion tokens)."""
    cache: dict[int, str] = {}
    n = len(choices)
    items = []
    for index, deltas in enumerate(choices):
        text, ids, logprobs, reason, matched = _collect(deltas)
        own = Usage(
            usage.prompt_tokens, len(ids) if n > 1 else usage.completion_tokens, usage.cached_tokens
        )
        inputs = next((d.input_logprobs for d in deltas if d.input_logprobs is not None), None)
        items.append(
            _generate_item(
                prepared,
                _generate_id(request_id, index, n),
                text,
                ids,
                logprobs or [],
                reason or "stop",
                matched,
                own,
                tokenizer,
                cache,
                inputs,
            )
        )
    return orjson.dumps(items[0] if n == 1 else items)


def tokenize_body(
    ids: list[int], tokenizer: Any, context_length: int | None, body: dict[str, Any]
) -> bytes:
    """vLLM's /tokenize answer: count, max_model_len, tokens (+ token_strs when asked)."""
    out: dict[str, Any] = {"count": len(ids), "max_model_len": context_length or 0, "tokens": ids}
    if body.get("return_token_strs") is True:
        cache: dict[int, str] = {}
        out["token_strs"] = [
            tokenizer.id_to_token(t) or _token_text(tokenizer, t, cache) for t in ids
        ]
    else:
        out["token_strs"] = None
    return orjson.dumps(out)


def detokenize_body(body: dict[str, Any], tokenizer: Any) -> bytes:
    """vLLM's /detokenize answer: {"prompt": text} (special tokens kept, as vLLM decodes)."""
    from smg.grpc.prepare import RequestError

    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    ):
        raise RequestError(
            400, "invalid_request_error", "'tokens' must be a list of token ids", "tokens"
        )
    vocab = getattr(tokenizer, "vocab_size", 0) or 0
    if vocab and any(t >= vocab for t in tokens):
        bad = next(t for t in tokens if t >= vocab)
        raise RequestError(
            400, "invalid_request_error", f"token id {bad} is out of vocabulary", "tokens"
        )
    return orjson.dumps({"prompt": tokenizer.decode(tokens, skip_special_tokens=False)})


def embeddings_body(
    results: Sequence[tuple[list[float], int]], model: str, body: dict[str, Any]
) -> bytes:
    """The OpenAI /v1/embeddings answer; `results` are (vector, prompt tokens) per input.
    encoding_format "base64" packs little-endian float32 as OpenAI does."""
    fmt = body.get("encoding_format") or "float"
    data = []
    total = 0
    for index, (vector, tokens) in enumerate(results):
        total += tokens
        if fmt == "base64":
            import base64
            import struct

            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": index, "embedding": value})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": total, "total_tokens": total},
            "id": f"embd-{uuid.uuid4().hex}",
            "created": int(time.time()),
        }
    )
