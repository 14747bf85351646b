"""Anthropic Messages client, OpenAI chat worker: the request goes out as a chat
completion request, the answer (whole or streamed) comes back as a Message.

Facts: Anthropic's Messages API reference; the mapping follows vLLM's own /v1/messages
(vllm/entrypoints/anthropic) and the Rust SMG's gRPC Messages stage (tool_choice any ->
required, tool_use -> tool_calls with ids kept, thinking -> reasoning_content), with the
differences noted where they are made.
"""

from __future__ import annotations

from typing import Any

import orjson

from smg.translate.common import (
    CHAT_TO_STOP_REASON,
    ChatStream,
    TranslateError,
    anthropic_error,
    chat_base,
    chat_function,
    first_choice,
    loads_object,
    message_id,
    obj,
    reasoning_of,
    seq,
    text,
    usage_to_messages,
)

CHAT_PATH = b"/v1/chat/completions"
# A chat answer has no thinking signature; the block still needs one (the SDK's type
# requires it). A constant, so a client that echoes it back is recognisable.
SIGNATURE_PLACEHOLDER = "smg-translated-no-signature"
# thinking.budget_tokens -> reasoning_effort: the chat side's only reasoning knob. The
# edges are LiteLLM's effort -> budget defaults (low 1024, medium 2048, high 4096).
_EFFORT_EDGES = ((2048, "low"), (4096, "medium"))
# Messages request fields that need Anthropic's servers (remote MCP tool calls, code
# execution containers): refused, since the answer would silently lack what they add.
_REFUSED = ("mcp_servers", "container")


def _effort(budget: Any) -> str:
    if isinstance(budget, int):
        for edge, name in _EFFORT_EDGES:
            if budget < edge:
                return name
    return "high"


def _reasoning_effort(body: dict[str, Any]) -> str | None:
    """What the chat side can say of `thinking`: an effort. output_config.effort names one
    directly (vLLM maps it the same way); an enabled budget picks one by size; adaptive
    thinking (the model decides) is OpenAI's default effort, medium."""
    named = obj(body.get("output_config")).get("effort")
    if named in ("low", "medium", "high"):
        return named
    thinking = obj(body.get("thinking"))
    if thinking.get("type") == "enabled":
        return _effort(thinking.get("budget_tokens"))
    if thinking.get("type") == "adaptive":
        return "medium"
    return None


def _text_of(blocks: Any, where: str) -> str:
    """The text of a string or a list of text blocks (system, tool results)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise TranslateError(f"{where} must be a string or a list of content blocks")
    parts = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text":
            raise TranslateError(f"{where}: only text blocks can be sent to this model")
        value = block.get("text")
        if not isinstance(value, str):
            raise TranslateError(f"{where}: a text block needs a string 'text'")
        parts.append(value)
    return "\n".join(parts)


def _image_url(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise TranslateError("image block: 'source' is required")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise TranslateError("image block: base64 source needs 'media_type' and 'data'")
        url = f"data:{media};base64,{data}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise TranslateError(f"image block: source type {kind!r} cannot be sent to this model")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A tool_result block -> a `tool` message (appended to out); the images it carries
    (a tool message holds text only) are returned for the user message that follows."""
    tool_id = block.get("tool_use_id")
    if not isinstance(tool_id, str):
        raise TranslateError("tool_result block: 'tool_use_id' is required")
    content = block.get("content", "")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif kind == "image":
                images.append(_image_url(item))
            else:
                raise TranslateError(f"tool_result block: content type {kind!r} cannot be sent")
        content = "\n".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise TranslateError("tool_result block: 'content' must be a string or a list")
    out.append({"role": "tool", "tool_call_id": tool_id, "content": content})
    return images


def _user(content: list[Any], out: list[dict[str, Any]]) -> None:
    # Tool results first: a chat `tool` message must follow the assistant's tool_calls
    # directly (the Rust gRPC stage puts them after the user's text, which a chat
    # template accepts but OpenAI's API does not).
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise TranslateError("text block: 'text' must be a string")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_url(block))
        elif kind == "tool_result":
            parts.extend(_tool_result(block, out))
        else:
            raise TranslateError(f"user content block type {kind!r} cannot be sent to this model")
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})


def _assistant(content: list[Any], out: list[dict[str, Any]]) -> None:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_id, name = block.get("id"), block.get("name")
            if not isinstance(tool_id, str) or not isinstance(name, str):
                raise TranslateError("tool_use block: 'id' and 'name' are required")
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": tool_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            # Chat requests have no field for earlier reasoning (OpenAI has none; DeepSeek
            # refuses reasoning_content in input): dropped, as the model need not see it.
            continue
        else:
            raise TranslateError(
                f"assistant content block type {kind!r} cannot be sent to this model"
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    if texts or calls:
        out.append(message)


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise TranslateError("'tools' must be a list")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise TranslateError("each tool needs a 'name'")
        if tool.get("type") not in (None, "custom"):
            raise TranslateError(
                f"tool {tool['name']!r}: server tool type {tool.get('type')!r} cannot be sent to this model"
            )
        out.append({"type": "function", "function": chat_function(tool, "input_schema")})
    return out


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise TranslateError("'tool_choice' must be auto, any, none or tool (with a name)")


def chat_request(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A Messages request -> a chat completion request (raises TranslateError)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslateError("'messages' must be a non-empty list")
    for name in _REFUSED:
        if body.get(name):
            raise TranslateError(f"'{name}' cannot be sent to this model (it speaks OpenAI chat)")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise TranslateError("'max_tokens' is required and must be a positive integer")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        prompt = _text_of(system, "system")
        if prompt:
            out.append({"role": "system", "content": prompt})
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise TranslateError("each message's 'role' must be 'user' or 'assistant'")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            (_user if role == "user" else _assistant)(content, out)
        else:
            raise TranslateError("each message's 'content' must be a string or a list of blocks")
    chat = chat_base(body, model, out, "'messages' needs at least one message with content")
    # max_completion_tokens: OpenAI's current name (its reasoning models refuse max_tokens);
    # vLLM and SGLang take it too.
    chat["max_completion_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    stops = body.get("stop_sequences")
    if stops:
        chat["stop"] = stops
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is not None:
        converted = _tool_choice(choice)
        # OpenAI refuses tool_choice (and parallel_tool_calls) without tools.
        if "tools" in chat:
            chat["tool_choice"] = converted
            if choice.get("disable_parallel_tool_use") is True:
                chat["parallel_tool_calls"] = False
    effort = _reasoning_effort(body)
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("stream") is True:
        chat["stream"] = True
        # Anthropic's message_delta carries usage; a chat stream has it only when asked.
        chat["stream_options"] = {"include_usage": True}
    return chat


def _stop(choice: dict[str, Any], stops: list[str]) -> tuple[str, str | None]:
    """stop_reason and stop_sequence of a finished choice. "stop" is stop_sequence when
    the worker names the matched sequence (vLLM and SGLang put it in `stop_reason`)."""
    finish = text(choice.get("finish_reason"))
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return CHAT_TO_STOP_REASON.get(finish, "end_turn"), None


def _tool_input(arguments: Any) -> dict[str, Any]:
    # A model's malformed arguments cannot become the object `input` must be: {} (the
    # client sees the tool call, and its own validation reports the missing fields).
    if isinstance(arguments, str):
        parsed = loads_object(arguments.encode())
        if parsed is not None:
            return parsed
    return {}


class MessagesOverChat(ChatStream):
    """The Translation for /v1/messages served by an OpenAI-chat-only worker."""

    upstream_path = CHAT_PATH
    _CUT_SHORT = "the worker's stream ended before the answer was complete"

    def __init__(self, body: dict[str, Any], model: str | None) -> None:
        super().__init__()
        chat = chat_request(body, model)
        self.upstream_body: bytes = orjson.dumps(chat)
        self.stream: bool = chat.get("stream") is True
        self._model = chat["model"] if isinstance(chat["model"], str) else ""
        stops = body.get("stop_sequences")
        self._stops: list[str] = (
            [s for s in stops if isinstance(s, str)] if isinstance(stops, list) else []
        )
        # stream state
        self._block = -1  # index of the open content block, -1 none
        self._kind = ""  # its type
        self._next = 0  # index the next block gets
        self._tools: dict[int, int] = {}  # chat tool_call index -> block index

    # --- whole answers ----------------------------------------------------------------

    def response(self, status: int, body: bytes) -> bytes:
        if not 200 <= status < 300:
            return anthropic_error(status, body)
        found = first_choice(body)
        if found is None:
            return anthropic_error(502, b"the worker's chat answer has no choices")
        answer, choice = found
        message = choice["message"]
        content: list[dict[str, Any]] = []
        reasoning = reasoning_of(message)
        if reasoning:
            content.append(
                {"type": "thinking", "thinking": reasoning, "signature": SIGNATURE_PLACEHOLDER}
            )
        answer_text = text(message.get("content"))
        if answer_text:
            content.append({"type": "text", "text": answer_text})
        refusal = text(message.get("refusal"))
        if refusal:
            content.append({"type": "text", "text": refusal})
        calls = [obj(call) for call in seq(message.get("tool_calls"))]
        for call in calls:
            function = obj(call.get("function"))
            content.append(
                {
                    "type": "tool_use",
                    "id": text(call.get("id")),
                    "name": text(function.get("name")),
                    "input": _tool_input(function.get("arguments")),
                }
            )
        stop_reason, stop_sequence = _stop(choice, self._stops)
        if calls and stop_reason == "end_turn":
            stop_reason = "tool_use"  # some servers finish a tool call with "stop"
        elif refusal and not answer_text:
            stop_reason = "refusal"
        return orjson.dumps(
            {
                "id": message_id(answer.get("id")),
                "type": "message",
                "role": "assistant",
                "model": text(answer.get("model")) or self._model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": usage_to_messages(answer.get("usage")),
            }
        )

    # --- streams ------------------------------------------------------------------------

    def abort(self, code: str, message: str) -> bytes:
        # An error event even after message_stop (as before the shared ChatStream).
        out: list[bytes] = []
        self._fail(out, code, message)
        return b"".join(out)

    def _fail(self, out: list[bytes], code: str, message: str) -> None:
        # Anthropic's error event: the type follows the status (502: api_error), the
        # message is the worker's; Anthropic's shape has no code.
        self._done = True
        body = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        out.append(b"event: error\ndata: %b\n\n" % body)

    def _event(self, out: list[bytes], name: bytes, body: dict[str, Any]) -> None:
        out.append(b"event: %b\ndata: %b\n\n" % (name, orjson.dumps(body)))

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._started = True
        self._model = text(chunk.get("model")) or self._model
        usage = usage_to_messages(chunk.get("usage"))
        usage["output_tokens"] = 0
        message = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        self._event(out, b"message_start", {"type": "message_start", "message": message})

    def _stop_block(self, out: list[bytes]) -> None:
        if self._block < 0:
            return
        if self._kind == "thinking":
            delta = {"type": "signature_delta", "signature": SIGNATURE_PLACEHOLDER}
            self._event(
                out,
                b"content_block_delta",
                {"type": "content_block_delta", "index": self._block, "delta": delta},
            )
        self._event(
            out, b"content_block_stop", {"type": "content_block_stop", "index": self._block}
        )
        self._block = -1
        self._kind = ""

    def _open(self, out: list[bytes], block: dict[str, Any]) -> int:
        self._stop_block(out)
        self._block = index = self._next
        self._next += 1
        self._kind = block["type"]
        self._event(
            out,
            b"content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )
        return index

    def _delta(self, out: list[bytes], index: int, delta: dict[str, Any]) -> None:
        self._event(
            out,
            b"content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": delta},
        )

    def _content(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning = reasoning_of(delta)
        if reasoning:
            if self._kind != "thinking":
                self._open(out, {"type": "thinking", "thinking": "", "signature": ""})
            self._delta(out, self._block, {"type": "thinking_delta", "thinking": reasoning})
        content = text(delta.get("content"))
        if content:
            if self._kind != "text":
                self._open(out, {"type": "text", "text": ""})
            self._delta(out, self._block, {"type": "text_delta", "text": content})

    def _tool_delta(
        self, position: int, call: dict[str, Any], function: dict[str, Any], out: list[bytes]
    ) -> None:
        index = self._tools.get(position)
        if index is None:
            block = {
                "type": "tool_use",
                "id": text(call.get("id")),
                "name": text(function.get("name")),
                "input": {},
            }
            index = self._tools[position] = self._open(out, block)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            # Interleaved parallel calls: a delta for an earlier call keeps its own index
            # (the SDK accumulates by index).
            self._delta(out, index, {"type": "input_json_delta", "partial_json": arguments})

    def _close(self, out: list[bytes]) -> None:
        """message_delta and message_stop, once."""
        if self._done:
            return
        self._done = True
        if not self._started:
            self._start({}, out)
        self._stop_block(out)
        finish = self._finish or {"finish_reason": "stop"}
        stop_reason, stop_sequence = _stop(finish, self._stops)
        if self._tools and stop_reason == "end_turn":
            stop_reason = "tool_use"  # as in response(); a cut call stays max_tokens
        usage = usage_to_messages(self._usage)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": usage,
        }
        self._event(out, b"message_delta", delta)
        self._event(out, b"message_stop", {"type": "message_stop"})
