"""Pieces both translation directions share: an incremental SSE reader, the stop-reason,
id and usage mappings, and error bodies in either API's shape. Pure code, no I/O."""

from __future__ import annotations

from typing import Any

import orjson

from smg.httpwire import REASONS, anthropic_error_type, error_type


class TranslateError(ValueError):
    """The request cannot be expressed for the worker's API: the gateway answers 400."""


class SseReader:
    """Server-sent events from bytes split at any point (h11 style: bytes in, events out).

    Lines end in LF or CRLF (what OpenAI- and Anthropic-style servers write); a CR at the
    end of a piece is kept until the next piece says whether LF follows. Comment lines
    (`:` keep-alives) are skipped; an event is dispatched at its blank line.
    """

    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The (event name, data) pairs completed by `data`."""
        buf = self._buf
        buf += data
        events: list[tuple[bytes, bytes]] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                self._event = b""
                self._data = []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
        del buf[:start]
        return events


def loads_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object, or None when `data` is not one."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# Chat finish_reason -> Messages stop_reason ("stop" becomes stop_sequence when the worker
# names the matched sequence: see MessagesOverChat). content_filter -> refusal: the
# model declined, which is what Anthropic's `refusal` says.
CHAT_TO_STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Messages stop_reason -> chat finish_reason. pause_turn (a server tool paused the turn)
# has no chat counterpart; the turn did end, so "stop".
STOP_REASON_TO_CHAT = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}

_CHAT_ID_PREFIX = "chatcmpl-"
_MESSAGE_ID_PREFIX = "msg_"


def message_id(chat_id: Any) -> str:
    """A Messages id (`msg_...`) from a chat completion's id (`chatcmpl-...`): the same
    suffix, so one answer can be found under either name in logs."""
    text = chat_id if isinstance(chat_id, str) else ""
    return _MESSAGE_ID_PREFIX + text.removeprefix(_CHAT_ID_PREFIX)


def chat_id(msg_id: Any) -> str:
    """A chat completion id (`chatcmpl-...`) from a Messages id (`msg_...`)."""
    text = msg_id if isinstance(msg_id, str) else ""
    return _CHAT_ID_PREFIX + text.removeprefix(_MESSAGE_ID_PREFIX)


def int_of(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_to_messages(usage: Any) -> dict[str, int]:
    """Chat usage -> Messages usage. OpenAI's prompt_tokens include the cached ones
    (prompt_tokens_details.cached_tokens); Anthropic's input_tokens do not (they are
    cache_read_input_tokens), so the cached count moves over."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = int_of(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = int_of(details.get("cached_tokens")) if isinstance(details, dict) else 0
    out = {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": int_of(usage.get("completion_tokens")),
    }
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def usage_to_chat(usage: dict[str, Any]) -> dict[str, Any]:
    """Messages usage -> chat usage: prompt_tokens count every input token (plain, cache
    reads and cache writes), cached_tokens the cache reads."""
    cache_read = int_of(usage.get("cache_read_input_tokens"))
    prompt = (
        int_of(usage.get("input_tokens"))
        + cache_read
        + int_of(usage.get("cache_creation_input_tokens"))
    )
    completion = int_of(usage.get("output_tokens"))
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cache_read:
        out["prompt_tokens_details"] = {"cached_tokens": cache_read}
    return out


def error_message(status: int, body: bytes) -> tuple[str, str | None]:
    """An error answer's message and its own type/code (either API's shape, a bare string
    `error`, a top-level `message`, else the body's text or the status phrase)."""
    parsed = loads_object(body)
    if parsed is not None:
        err = parsed.get("error")
        if isinstance(err, dict):
            message = err.get("message")
            kind = err.get("type") or err.get("code")
            return (
                message if isinstance(message, str) else orjson.dumps(err).decode(),
                kind if isinstance(kind, str) else None,
            )
        if isinstance(err, str):
            return err, None
        message = parsed.get("message")
        if isinstance(message, str):
            return message, None
    text = body.decode("utf-8", "replace").strip()
    return text or REASONS.get(status, "error"), None


def anthropic_error(status: int, body: bytes) -> bytes:
    """An upstream (OpenAI-shape) error answer in Anthropic's shape; the status is kept by
    the caller, and Anthropic's error type follows it."""
    message, _ = error_message(status, body)
    return orjson.dumps(
        {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    )


def openai_error(status: int, body: bytes) -> bytes:
    """An upstream (Anthropic-shape) error answer in OpenAI's shape: `type` per status as
    smg writes its own errors, `code` the upstream's error type (e.g. rate_limit_error)."""
    message, kind = error_message(status, body)
    return orjson.dumps(
        {"error": {"message": message, "type": error_type(status), "code": kind, "param": None}}
    )


# Readers for parsed JSON of unknown shape: a part of the wrong type reads as empty, so a
# malformed request or answer is refused or skipped, never an exception.
def obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def reasoning_of(message: dict[str, Any]) -> str:
    """A chat message's or delta's reasoning (vLLM/SGLang name it `reasoning_content`,
    newer servers `reasoning`)."""
    return text(message.get("reasoning_content")) or text(message.get("reasoning"))


def first_choice(body: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A whole chat answer and its first choice, or None when that choice has no message."""
    answer = obj(loads_object(body))
    choices = seq(answer.get("choices"))
    if not choices or not isinstance(obj(choices[0]).get("message"), dict):
        return None
    return answer, choices[0]


# --- the request side of the X -> chat translations ----------------------------------------


def chat_function(tool: dict[str, Any], schema_key: str) -> dict[str, Any]:
    """A chat tool's `function` from a named tool: its name, a string description, and its
    JSON schema under `schema_key` (an empty object schema when it has none)."""
    function: dict[str, Any] = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    function["parameters"] = tool.get(schema_key) or {"type": "object", "properties": {}}
    return function


def chat_base(
    body: dict[str, Any], model: str | None, messages: list[dict[str, Any]], empty: str
) -> dict[str, Any]:
    """A chat request's model and messages: the route's model, else the body's. Refuses
    (with `empty`) a conversation of system text alone, which a chat model cannot answer."""
    if not any(m["role"] != "system" for m in messages):
        raise TranslateError(empty)
    return {"model": model if model is not None else body.get("model"), "messages": messages}


class ChatStream:
    """What both chat -> X stream translations share: the consumer loop over the worker's
    chat SSE (chunks, `[DONE]`, an error chunk, a stream cut short) and the walk through
    one chunk (usage, first choice, its delta, tool-call deltas, finish). A subclass writes
    its own API's events and error shape through the hooks below."""

    # the error message when the stream ends with neither [DONE] nor a finish_reason
    _CUT_SHORT = "the stream ended before the answer was complete"

    def __init__(self) -> None:
        self._sse = SseReader()
        self._started = False
        self._done = False
        self._finish: dict[str, Any] | None = None  # the choice that had a finish_reason
        self._usage: Any = None

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        for _, payload in self._sse.feed(data):
            if self._done:
                break
            if payload.strip() == b"[DONE]":
                self._close(out)
                continue
            chunk = loads_object(payload)
            if chunk is None:
                continue
            if chunk.get("error") is not None:
                message, code = error_message(502, payload)
                self._fail(out, code or "upstream_error", message)
                break
            self._chunk(chunk, out)
        return b"".join(out)

    def finish(self) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        if self._finish is None:
            # No [DONE] and no finish_reason: the worker's stream was cut short.
            self._fail(out, "upstream_stream_ended", self._CUT_SHORT)
        else:
            self._close(out)
        return b"".join(out)

    def abort(self, code: str, message: str) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        self._fail(out, code, message)
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if not self._started:
            self._start(chunk, out)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choices = seq(chunk.get("choices"))
        if not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        delta = obj(choice.get("delta"))
        self._content(delta, out)
        for raw in seq(delta.get("tool_calls")):
            call = obj(raw)
            position = call.get("index", 0)
            if isinstance(position, int):
                self._tool_delta(position, call, obj(call.get("function")), out)
        if choice.get("finish_reason"):
            self._finish = choice

    # --- hooks ------------------------------------------------------------------------

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        """The stream's opening events (the first chunk's id and model)."""
        raise NotImplementedError

    def _content(self, delta: dict[str, Any], out: list[bytes]) -> None:
        """A delta's reasoning and text."""
        raise NotImplementedError

    def _tool_delta(
        self, position: int, call: dict[str, Any], function: dict[str, Any], out: list[bytes]
    ) -> None:
        """A delta of the tool call at chat index `position`."""
        raise NotImplementedError

    def _close(self, out: list[bytes]) -> None:
        """The closing events of a finished answer, once (sets _done)."""
        raise NotImplementedError

    def _fail(self, out: list[bytes], code: str, message: str) -> None:
        """This API's error events (sets _done)."""
        raise NotImplementedError
