"""OpenAI chat client, Anthropic Messages worker: the chat request goes out as a
Messages request, the answer (whole or streamed) comes back as a chat completion
(chunks).

Facts: Anthropic's Messages API reference and OpenAI's chat reference; LiteLLM's
Anthropic adapter for the conventions a chat client expects (max_tokens default,
reasoning_effort <-> thinking budget, consecutive tool results merged into one user turn).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from smg.translate.common import (
    STOP_REASON_TO_CHAT,
    SseReader,
    TranslateError,
    chat_id,
    loads_object,
    obj,
    openai_error,
    text,
    usage_to_chat,
)

MESSAGES_PATH = b"/v1/messages"
# Anthropic requires max_tokens; chat does not. LiteLLM's default for Anthropic models.
DEFAULT_MAX_TOKENS = 4096
# reasoning_effort -> thinking.budget_tokens (LiteLLM's mapping; 1024 is Anthropic's
# minimum budget). "minimal"/"none" ask for no thinking.
EFFORT_BUDGET = {"low": 1024, "medium": 2048, "high": 4096}
_NO_EFFORT = ("none", "minimal")
# Chat request fields with no Messages counterpart that change what the answer holds:
# refused rather than silently dropped. Sampling hints with no counterpart (seed,
# penalties, logit_bias) are dropped: the answer keeps its shape without them.
_REFUSED = ("functions", "function_call", "audio", "prediction")


def _text_parts(content: Any, where: str) -> str:
    """System, developer and tool message content: a string or text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise TranslateError(
                    f"{where} message content: only text parts can be sent to this model"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    if content is None:
        return ""
    raise TranslateError(f"{where} message 'content' must be a string or a list of parts")


def _image(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise TranslateError("image_url part: 'image_url.url' is required")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media:
            raise TranslateError("image_url part: a data URL must be base64 with a media type")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise TranslateError("user message 'content' must be a string or a list of parts")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part))
        else:
            raise TranslateError(f"user content part type {kind!r} cannot be sent to this model")
    return blocks


def _assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "refusal"):
                said = text(part.get(kind))
                if said:
                    blocks.append({"type": "text", "text": said})
            else:
                raise TranslateError(
                    f"assistant content part type {kind!r} cannot be sent to this model"
                )
    elif isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif content is not None:
        raise TranslateError(
            "assistant message 'content' must be a string, a list of parts or null"
        )
    # Earlier reasoning (reasoning_content) is not sent: Anthropic takes thinking blocks
    # back only with their signature, which a chat history does not carry.
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise TranslateError("assistant 'tool_calls' must be a list")
    for call in calls or ():
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
        ):
            raise TranslateError("assistant tool_calls need an 'id' and a function 'name'")
        arguments = function.get("arguments") or "{}"
        parsed = loads_object(arguments.encode()) if isinstance(arguments, str) else None
        if parsed is None:
            raise TranslateError(f"tool call {call['id']!r}: 'arguments' must be a JSON object")
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": function["name"], "input": parsed}
        )
    return blocks


def _append(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Consecutive turns of one role become one: all tool results of a turn must sit in the
    # one user message that follows the tool_use blocks.
    if not blocks:
        return
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise TranslateError("'tools' must be a list")
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            obj(tool).get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise TranslateError("each tool must be a function with a 'name'")
        converted: dict[str, Any] = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            converted["description"] = function["description"]
        converted["input_schema"] = function.get("parameters") or {
            "type": "object",
            "properties": {},
        }
        out.append(converted)
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = obj(choice.get("function")).get("name")
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    raise TranslateError("'tool_choice' must be auto, required, none or a named function")


def messages_request(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A chat completion request -> a Messages request (raises TranslateError)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslateError("'messages' must be a non-empty list")
    for name in _REFUSED:
        if body.get(name) is not None:
            raise TranslateError(
                f"'{name}' cannot be sent to this model (it speaks Anthropic Messages)"
            )
    if body.get("n") not in (None, 1):
        raise TranslateError("'n' must be 1 for this model (it speaks Anthropic Messages)")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise TranslateError(
            "'logprobs' cannot be sent to this model (it speaks Anthropic Messages)"
        )
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise TranslateError(f"response_format {fmt.get('type')!r} cannot be sent to this model")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            # Anthropic has one top-level system prompt: every system turn joins it.
            prompt = _text_parts(message.get("content"), role)
            if prompt:
                system.append(prompt)
        elif role == "user":
            _append(out, "user", _user_blocks(message.get("content")))
        elif role == "assistant":
            _append(out, "assistant", _assistant_blocks(message))
        elif role == "tool":
            tool_id = message.get("tool_call_id")
            if not isinstance(tool_id, str):
                raise TranslateError("tool message: 'tool_call_id' is required")
            result = {
                "type": "tool_result",
                "tool_use_id": tool_id,
                "content": _text_parts(message.get("content"), "tool"),
            }
            _append(out, "user", [result])
        else:
            raise TranslateError(f"message role {role!r} cannot be sent to this model")
    if not out:
        raise TranslateError("'messages' needs at least one user or assistant message")
    request: dict[str, Any] = {
        "model": model if model is not None else body.get("model"),
        "messages": out,
    }
    if system:
        request["system"] = "\n".join(system)
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    effort = body.get("reasoning_effort")
    budget = None
    if effort is not None and effort not in _NO_EFFORT:
        budget = EFFORT_BUDGET.get(effort) if isinstance(effort, str) else None
        if budget is None:
            raise TranslateError(f"reasoning_effort {effort!r} is not one of low, medium, high")
    if limit is None:
        # With thinking, max_tokens must exceed the budget: the default leaves the answer
        # its own room.
        limit = DEFAULT_MAX_TOKENS + (budget or 0)
    request["max_tokens"] = limit
    if budget is not None:
        request["thinking"] = {"type": "enabled", "budget_tokens": budget}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        request["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        request["stop_sequences"] = stop
    if isinstance(body.get("user"), str):
        request["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        request["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is not None:
        converted = _tool_choice(choice)
        if "tools" in request:  # a tool_choice without tools: nothing to choose from
            request["tool_choice"] = converted
    if body.get("parallel_tool_calls") is False and "tools" in request:
        request.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    if body.get("stream") is True:
        request["stream"] = True
    return request


def _finish_reason(stop_reason: Any) -> str:
    return STOP_REASON_TO_CHAT.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


class ChatOverMessages:
    """The Translation for /v1/chat/completions served by an Anthropic-only worker."""

    upstream_path = MESSAGES_PATH

    def __init__(self, body: dict[str, Any], model: str | None) -> None:
        request = messages_request(body, model)
        self.upstream_body: bytes = orjson.dumps(request)
        self.stream: bool = request.get("stream") is True
        self._model = request["model"] if isinstance(request["model"], str) else ""
        options = body.get("stream_options")
        self._include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self._created = int(time.time())
        # stream state
        self._sse = SseReader()
        self._id = ""
        self._done = False
        self._usage: dict[str, Any] = {}
        self._blocks: dict[int, int] = {}  # Messages block index -> chat tool_call index

    # --- whole answers ----------------------------------------------------------------

    def response(self, status: int, body: bytes) -> bytes:
        if not 200 <= status < 300:
            return openai_error(status, body)
        answer = obj(loads_object(body))
        content = answer.get("content")
        if not isinstance(content, list):
            return openai_error(502, b"the worker's Messages answer has no content")
        texts, thinking, calls = [], [], []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(text(block.get("text")))
            elif kind == "thinking":
                thinking.append(text(block.get("thinking")))
            elif kind == "tool_use":
                arguments = orjson.dumps(obj(block.get("input"))).decode()
                calls.append(
                    {
                        "id": text(block.get("id")),
                        "type": "function",
                        "function": {"name": text(block.get("name")), "arguments": arguments},
                    }
                )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
        }
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        if calls:
            message["tool_calls"] = calls
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": _finish_reason(answer.get("stop_reason")),
            "logprobs": None,
        }
        usage = answer.get("usage")
        return orjson.dumps(
            {
                "id": chat_id(answer.get("id")),
                "object": "chat.completion",
                "created": self._created,
                "model": answer.get("model") or self._model,
                "choices": [choice],
                "usage": usage_to_chat(usage if isinstance(usage, dict) else {}),
            }
        )

    # --- streams ------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        for _, payload in self._sse.feed(data):
            event = loads_object(payload)
            if event is None:
                continue
            self._event(event, payload, out)
            if self._done:
                break
        return b"".join(out)

    def finish(self) -> bytes:
        if self._done:
            return b""
        return self.abort(
            "upstream_stream_ended", "the worker's stream ended before the answer was complete"
        )

    def abort(self, code: str, message: str) -> bytes:
        # smg's own end of a broken chat stream (SMG 1.13's stream_error event, then [DONE]).
        self._done = True
        body = orjson.dumps({"error": {"message": message, "type": "stream_error", "code": code}})
        return b"data: %b\n\ndata: [DONE]\n\n" % body

    def _chunk(self, out: list[bytes], delta: dict[str, Any], finish: str | None = None) -> None:
        body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        out.append(b"data: %b\n\n" % orjson.dumps(body))

    def _event(self, event: dict[str, Any], payload: bytes, out: list[bytes]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = obj(event.get("message"))
            self._id = chat_id(message.get("id"))
            self._model = text(message.get("model")) or self._model
            self._usage = dict(obj(message.get("usage")))
            self._chunk(out, {"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            block = obj(event.get("content_block"))
            index = event.get("index")
            if block.get("type") == "tool_use" and isinstance(index, int):
                position = self._blocks[index] = len(self._blocks)
                call = {
                    "index": position,
                    "id": text(block.get("id")),
                    "type": "function",
                    "function": {"name": text(block.get("name")), "arguments": ""},
                }
                self._chunk(out, {"tool_calls": [call]})
            elif block.get("type") == "text" and text(block.get("text")):
                self._chunk(out, {"content": block["text"]})
        elif kind == "content_block_delta":
            self._delta(event.get("index"), obj(event.get("delta")), out)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._usage.update({k: v for k, v in usage.items() if v is not None})
            stop_reason = obj(event.get("delta")).get("stop_reason")
            self._chunk(out, {}, _finish_reason(stop_reason))
        elif kind == "message_stop":
            self._done = True
            if self._include_usage:
                body = {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": usage_to_chat(self._usage),
                }
                out.append(b"data: %b\n\n" % orjson.dumps(body))
            out.append(b"data: [DONE]\n\n")
        elif kind == "error":
            self._done = True
            error = obj(event.get("error"))
            message = (
                error.get("message")
                if isinstance(error.get("message"), str)
                else payload.decode("utf-8", "replace")
            )
            body = {
                "error": {
                    "message": message,
                    "type": "stream_error",
                    "code": text(error.get("type")) or None,
                }
            }
            out.append(b"data: %b\n\ndata: [DONE]\n\n" % orjson.dumps(body))
        # ping, content_block_stop and unknown events carry nothing for a chat client.

    def _delta(self, index: Any, delta: dict[str, Any], out: list[bytes]) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            self._chunk(out, {"content": text(delta.get("text"))})
        elif kind == "thinking_delta":
            self._chunk(out, {"reasoning_content": text(delta.get("thinking"))})
        elif kind == "input_json_delta":
            position = self._blocks.get(index) if isinstance(index, int) else None
            partial = text(delta.get("partial_json"))
            if position is not None and partial:
                self._chunk(
                    out, {"tool_calls": [{"index": position, "function": {"arguments": partial}}]}
                )
        # signature_delta: a chat client has nowhere to keep it.
