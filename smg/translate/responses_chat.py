"""OpenAI Responses client, chat-completions pipeline: a POST /v1/responses goes out as a
chat completion request, and the chat answer (whole or streamed) comes back as a Response
object or the Responses API's event stream. Used for models served by gRPC workers, where
smg renders and parses itself (the chat path does templates, tool and reasoning parsers).

Facts: OpenAI's Responses API reference, and the Rust SMG's gRPC conversion
(model_gateway/src/routers/grpc/regular/responses/conversions.rs): instructions -> a system
message; function_call -> an assistant tool call; function_call_output -> a tool message;
a reasoning item -> assistant reasoning_content; max_output_tokens ->
max_completion_tokens; text.format -> response_format; reasoning.effort ->
reasoning_effort; stream_options.include_usage defaults to true. Where smg differs from it
(each on purpose, for OpenAI's shape):
- one assistant turn's items (reasoning, message, function calls) become ONE assistant
  message, so a template renders the turn as the model produced it;
- input parts and item types that cannot be sent (images, files, hosted tool items) and
  unknown roles are refused (400) rather than dropped or read as a user message; an
  earlier turn's mcp_call becomes a tool call and its answer, mcp_list_tools is skipped
  (the Rust conversion refuses both, so no turn could follow an MCP turn);
- output order is OpenAI's: reasoning, message, function calls; a `length` finish is
  status "incomplete" with incomplete_details {"reason": "max_output_tokens"};
- the stream carries every item's events (reasoning_text, function_call_arguments), and,
  as OpenAI's, no `data: [DONE]` (1.13's gRPC path appends one).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from smg.translate.common import (
    ChatStream,
    TranslateError,
    chat_base,
    chat_function,
    first_choice,
    int_of,
    obj,
    reasoning_of,
    seq,
    text,
)

CHAT_PATH = b"/v1/chat/completions"
ROUTE = "/v1/responses"

# Request fields echoed in the response as OpenAI does (None when not given), and defaults.
_ECHOED = (
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "previous_response_id",
    "prompt_cache_key",
    "safety_identifier",
    "temperature",
    "top_p",
    "user",
)
_ECHO_DEFAULTS: dict[str, Any] = {
    "truncation": "disabled",
    "tool_choice": "auto",
    "service_tier": "default",
}
# Input content parts that are text in a chat message.
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_EFFORTS = ("minimal", "low", "medium", "high")
# Sampling fields the chat path takes as they are: OpenAI's, and the engine-side ones the
# Rust SMG 1.13 accepts on /v1/responses (frequency/presence_penalty, stop, top_k, min_p,
# repetition_penalty; tried on its binary). chat_template_kwargs is smg's extension (e.g.
# Qwen3's enable_thinking; 1.13 refuses it as an unknown field).
_FORWARDED = (
    "temperature",
    "top_p",
    "top_logprobs",
    "parallel_tool_calls",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "top_k",
    "min_p",
    "repetition_penalty",
    "chat_template_kwargs",
)


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


# --- the request --------------------------------------------------------------------------


def _part_text(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
    if key is None:
        raise TranslateError(f"{where}: content part type {kind!r} cannot be sent to this model")
    value = part.get(key)
    if not isinstance(value, str):
        raise TranslateError(f"{where}: a {kind} part needs a string '{key}'")
    return value


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslateError(f"{where}: 'content' must be a string or a list of parts")
    return "".join(_part_text(part, where) for part in content)


def _assistant(out: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message an assistant-side item joins: the last message when it is
    the assistant's turn, else a new one."""
    if out and out[-1]["role"] == "assistant":
        return out[-1]
    message: dict[str, Any] = {"role": "assistant", "content": None}
    out.append(message)
    return message


def _input_item(item: Any, index: int, out: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise TranslateError(f"input[{index}] must be an object")
    kind = item.get("type", "message" if "role" in item else None)
    where = f"input[{index}]"
    if kind == "message":
        role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise TranslateError(f"{where}: 'role' must be user, assistant, system or developer")
        content = _content_text(item.get("content"), where)
        if role != "assistant":
            out.append({"role": role, "content": content})
            return
        message = _assistant(out)
        if message["content"] is not None or "tool_calls" in message:
            message = {"role": "assistant", "content": None}  # a turn of its own
            out.append(message)
        message["content"] = content
    elif kind == "function_call":
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise TranslateError(f"{where}: a function_call needs 'call_id' and 'name'")
        if not isinstance(arguments, str):
            raise TranslateError(f"{where}: a function_call's 'arguments' must be a string")
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        _assistant(out).setdefault("tool_calls", []).append(call)
    elif kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str):
            raise TranslateError(f"{where}: a function_call_output needs 'call_id'")
        if not isinstance(output, str):
            output = _content_text(output, where)
        out.append({"role": "tool", "tool_call_id": call_id, "content": output})
    elif kind == "mcp_call":
        # An earlier turn's MCP tool call (the gateway ran it): the model sees it as its
        # own tool call and the tool's answer, so a later turn can build on it.
        call_id, name, arguments = item.get("id"), item.get("name"), item.get("arguments")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise TranslateError(f"{where}: an mcp_call needs 'id' and 'name'")
        call = {
            "id": call_id,
            "type": "function",
            "function": {
                "name": name,
                "arguments": arguments if isinstance(arguments, str) else "{}",
            },
        }
        _assistant(out).setdefault("tool_calls", []).append(call)
        result = item.get("output") if item.get("error") is None else item.get("error")
        out.append({"role": "tool", "tool_call_id": call_id, "content": text(result)})
    elif kind == "mcp_list_tools":
        return  # what a server offered: the tools themselves are sent as `tools`
    elif kind == "reasoning":
        # Only the reasoning text can go back to the model (a summary is not what it
        # thought; encrypted_content is another provider's).
        parts = [
            text(obj(p).get("text"))
            for p in seq(item.get("content"))
            if obj(p).get("type") == "reasoning_text"
        ]
        reasoning = "\n".join(p for p in parts if p)
        if not reasoning:
            return
        message = _assistant(out)
        if (
            message["content"] is not None
            or "tool_calls" in message
            or message.get("reasoning_content")
        ):
            message = {"role": "assistant", "content": None}
            out.append(message)
        message["reasoning_content"] = reasoning
    else:
        raise TranslateError(f"{where}: input item type {kind!r} cannot be sent to this model")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise TranslateError("'tools' must be a list")
    out = []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise TranslateError(f"tool type {kind!r} cannot be sent to this model")
        if not isinstance(tool.get("name"), str):
            raise TranslateError("a function tool needs a 'name'")
        function = chat_function(tool, "parameters")
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("name"), str)
    ):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise TranslateError("'tool_choice' must be auto, none, required or a function with a name")


def _response_format(text_config: Any) -> dict[str, Any] | None:
    if text_config is None:
        return None
    fmt = obj(text_config).get("format")
    if fmt is None:
        return None
    kind = obj(fmt).get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: dict[str, Any] = {"name": fmt.get("name"), "schema": fmt.get("schema")}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise TranslateError("'text.format.type' must be text, json_object or json_schema")


def chat_request(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A Responses request -> a chat completion request (raises TranslateError)."""
    if body.get("background") is True:
        raise TranslateError("'background' responses cannot be served for this model")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise TranslateError("'instructions' must be a string")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for index, item in enumerate(given):
            _input_item(item, index, messages)
    else:
        raise TranslateError("'input' must be a string or a list of items")
    chat = chat_base(body, model, messages, "'input' needs at least one item")
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise TranslateError("'max_output_tokens' must be a positive integer")
        chat["max_completion_tokens"] = limit
    for name in _FORWARDED:
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is not None:
        converted = _tool_choice(choice)
        if "tools" in chat:  # OpenAI's chat refuses tool_choice without tools
            chat["tool_choice"] = converted
    if "tools" not in chat:
        chat.pop("parallel_tool_calls", None)  # the same for parallel_tool_calls
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = obj(body.get("reasoning")).get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise TranslateError("'reasoning.effort' must be minimal, low, medium or high")
        chat["reasoning_effort"] = effort
    if body.get("stream") is True:
        chat["stream"] = True
        options = dict(obj(body.get("stream_options")))
        options.setdefault("include_usage", True)  # response.completed carries usage
        chat["stream_options"] = {"include_usage": options["include_usage"] is not False}
    return chat


# --- the answer ---------------------------------------------------------------------------


def usage_of(usage: Any) -> dict[str, Any] | None:
    """Chat usage -> Responses usage (input/output tokens with their details)."""
    if not isinstance(usage, dict):
        return None
    prompt = int_of(usage.get("prompt_tokens"))
    completion = int_of(usage.get("completion_tokens"))
    cached = int_of(obj(usage.get("prompt_tokens_details")).get("cached_tokens"))
    reasoning = int_of(obj(usage.get("completion_tokens_details")).get("reasoning_tokens"))
    return {
        "input_tokens": prompt,
        # cache_write_tokens: the openai SDK's type requires it; a chat usage has no count.
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def status_of(finish: Any) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details) of a chat finish_reason, as OpenAI reports them."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


class ResponsesOverChat(ChatStream):
    """The Translation for /v1/responses served by the chat pipeline."""

    upstream_path = CHAT_PATH

    def __init__(
        self,
        body: dict[str, Any],
        model: str | None,
        *,
        ids: Callable[[str], str] = new_id,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        chat = chat_request(body, model)
        self.chat = chat
        self.upstream_body: bytes = orjson.dumps(chat)
        self.stream: bool = chat.get("stream") is True
        self._ids = ids
        self._clock = clock
        self.id = ids("resp_")
        self.created_at = int(clock())
        self.model = chat["model"] if isinstance(chat["model"], str) else ""
        self.echo = self._echo(body)
        # stream state
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # items, in output order
        self._open: dict[str, Any] | None = None  # the item being streamed (not a call)
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_call index -> its item
        self._blank = ""  # whitespace-only content not yet sent (see _chunk)

    @staticmethod
    def _echo(body: dict[str, Any]) -> dict[str, Any]:
        """The request's fields a Response carries back, as OpenAI's does."""
        echo: dict[str, Any] = {name: body.get(name) for name in _ECHOED}
        for name, default in _ECHO_DEFAULTS.items():
            echo[name] = body.get(name, default)
        echo["parallel_tool_calls"] = body.get("parallel_tool_calls") is not False
        echo["store"] = body.get("store") is not False
        echo["tools"] = body.get("tools") or []
        echo["metadata"] = body.get("metadata") or {}
        effort = obj(body.get("reasoning")).get("effort")
        summary = obj(body.get("reasoning")).get("summary")
        echo["reasoning"] = {"effort": effort, "summary": summary}
        text_config = obj(body.get("text"))
        echo["text"] = {"format": text_config.get("format") or {"type": "text"}}
        return echo

    def response_object(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        incomplete: dict[str, str] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            # when it finished (1.13 and OpenAI); None while in progress
            "completed_at": None if status == "in_progress" else int(self._clock()),
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            **self.echo,
            "usage": usage,
        }

    # --- whole answers ----------------------------------------------------------------

    def response(self, status: int, body: bytes) -> bytes:
        if not 200 <= status < 300:
            return body  # the chat path's errors are OpenAI's shape already
        found = first_choice(body)
        if found is None:
            error = {"code": "server_error", "message": "the chat answer has no choices"}
            return orjson.dumps(self.response_object("failed", [], None, error=error))
        answer, choice = found
        message = choice["message"]
        output: list[dict[str, Any]] = []
        reasoning = reasoning_of(message)
        if reasoning:
            output.append(self._reasoning_item(reasoning, "completed"))
        parts = []
        if text(message.get("content")):
            parts.append(_text_part(message["content"]))
        if text(message.get("refusal")):
            parts.append({"type": "refusal", "refusal": message["refusal"]})
        if parts:
            output.append(self._message_item(parts, "completed"))
        for call in seq(message.get("tool_calls")):
            function = obj(obj(call).get("function"))
            item = self._call_item(text(obj(call).get("id")), text(function.get("name")))
            item["arguments"] = text(function.get("arguments"))
            item["status"] = "completed"
            output.append(item)
        self.model = text(answer.get("model")) or self.model
        state, incomplete = status_of(choice.get("finish_reason"))
        return orjson.dumps(
            self.response_object(state, output, usage_of(answer.get("usage")), incomplete)
        )

    def _reasoning_item(self, reasoning: str, status: str) -> dict[str, Any]:
        return {
            "id": self._ids("rs_"),
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": reasoning}],
            "status": status,
        }

    def _message_item(self, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
        return {
            "id": self._ids("msg_"),
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": parts,
        }

    def _call_item(self, call_id: str, name: str) -> dict[str, Any]:
        return {
            "id": self._ids("fc_"),
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": call_id,
            "name": name,
        }

    # --- streams ------------------------------------------------------------------------

    def _event(self, out: list[bytes], kind: str, body: dict[str, Any]) -> None:
        event = {"type": kind, "sequence_number": self._seq, **body}
        self._seq += 1
        out.append(b"event: %b\ndata: %b\n\n" % (kind.encode(), orjson.dumps(event)))

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._started = True
        self.model = text(chunk.get("model")) or self.model
        response = self.response_object("in_progress", [], None)
        self._event(out, "response.created", {"response": response})
        self._event(out, "response.in_progress", {"response": response})

    def _add(self, out: list[bytes], item: dict[str, Any]) -> int:
        index = len(self._output)
        self._output.append(item)
        self._event(out, "response.output_item.added", {"output_index": index, "item": item})
        return index

    def _open_item(self, out: list[bytes], kind: str) -> dict[str, Any]:
        """The reasoning or message item the next delta goes to (a new one when the open
        item is of the other kind)."""
        current = self._open
        if current is not None and current["type"] == kind:
            return current
        self._close_open(out)
        if kind == "reasoning":
            item = self._reasoning_item("", "in_progress")
            item["content"] = []
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = self._message_item([], "in_progress")
            part = _text_part("")
        index = self._add(out, dict(item, content=[]))
        item["output_index"] = index
        item["text"] = ""
        self._event(
            out,
            "response.content_part.added",
            {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part},
        )
        self._open = item
        return item

    def _close_open(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        index = item.pop("output_index")
        whole = item.pop("text")
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": whole}
            self._event(out, "response.reasoning_text.done", {**where, "text": whole})
        else:
            part = _text_part(whole)
            self._event(out, "response.output_text.done", {**where, "text": whole, "logprobs": []})
        self._event(out, "response.content_part.done", {**where, "part": part})
        item["content"] = [part]
        item["status"] = "completed"
        self._output[index] = item
        self._event(out, "response.output_item.done", {"output_index": index, "item": item})

    def _content(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning = reasoning_of(delta)
        if reasoning:
            self._text_delta(out, "reasoning", "response.reasoning_text.delta", reasoning, {})
        content = text(delta.get("content"))
        if content and (self._open is None or self._open["type"] != "message"):
            # Whitespace alone (the "\n\n" after a reasoning block, before a tool call)
            # is not an answer: held until text follows, dropped otherwise, as the whole
            # answer's content is null then (1.13's normalize_assistant_content).
            content = self._blank + content
            self._blank = content if not content.strip() else ""
            if self._blank:
                content = ""
        if content:
            self._text_delta(
                out, "message", "response.output_text.delta", content, {"logprobs": []}
            )

    def _text_delta(
        self, out: list[bytes], kind: str, event: str, delta: str, extra: dict[str, Any]
    ) -> None:
        """A reasoning or message delta: into the open item of that kind, and its event."""
        item = self._open_item(out, kind)
        item["text"] += delta
        where = {"item_id": item["id"], "output_index": item["output_index"], "content_index": 0}
        self._event(out, event, {**where, "delta": delta, **extra})

    def _tool_delta(
        self, position: int, call: dict[str, Any], function: dict[str, Any], out: list[bytes]
    ) -> None:
        item = self._calls.get(position)
        if item is None:
            self._close_open(out)
            item = self._call_item(text(call.get("id")), text(function.get("name")))
            item["output_index"] = self._add(out, dict(item))
            self._calls[position] = item
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            self._event(
                out,
                "response.function_call_arguments.delta",
                {"item_id": item["id"], "output_index": item["output_index"], "delta": arguments},
            )

    def _close_calls(self, out: list[bytes]) -> None:
        for item in self._calls.values():
            index = item.pop("output_index")
            self._event(
                out,
                "response.function_call_arguments.done",
                {
                    "item_id": item["id"],
                    "output_index": index,
                    "name": item["name"],
                    "arguments": item["arguments"],
                },
            )
            item["status"] = "completed"
            self._output[index] = item
            self._event(out, "response.output_item.done", {"output_index": index, "item": item})
        self._calls = {}

    def _close(self, out: list[bytes]) -> None:
        """The open items' closing events and response.completed, once."""
        if self._done:
            return
        self._done = True
        if not self._started:
            self._start({}, out)
        self._close_open(out)
        self._close_calls(out)
        state, incomplete = status_of(obj(self._finish).get("finish_reason"))
        response = self.response_object(state, self._output, usage_of(self._usage), incomplete)
        # response.completed for an incomplete answer too (1.13's event name; the status
        # says it), so a history observer stores it as it stores a whole answer.
        self._event(out, "response.completed", {"response": response})

    def _fail(self, out: list[bytes], code: str, message: str) -> None:
        """An error event, then response.failed with what was produced so far."""
        self._done = True
        if not self._started:
            self._start({}, out)
        self._event(out, "error", {"code": code, "message": message, "param": None})
        # response.error.code is one of OpenAI's names (server_error for a failure on the
        # serving side); the error event before it carries smg's own code.
        response = self.response_object(
            "failed",
            [i for i in self._output if i.get("status") == "completed"],
            usage_of(self._usage),
            error={"code": "server_error", "message": message},
        )
        self._event(out, "response.failed", {"response": response})


def _text_part(value: str) -> dict[str, Any]:
    return {"type": "output_text", "text": value, "annotations": []}


class Observed:
    """ResponsesOverChat with the history observer after it (smg.dataplane.responses
    Observer: it sees the Responses bytes the client gets, stores the finished response,
    and puts the client's history fields back). The worker was sent neither
    previous_response_id nor the client's `store`: the stream's events carry the client's."""

    def __init__(self, inner: ResponsesOverChat, observer: Any) -> None:
        self.inner = inner
        self.observer = observer
        self.upstream_path = inner.upstream_path
        self.upstream_body = inner.upstream_body
        self.stream = inner.stream
        echo = inner.echo
        echo["previous_response_id"] = getattr(observer, "previous", None)
        echo["store"] = getattr(observer, "store", True)
        conversation = getattr(observer, "conversation", None)
        if conversation is not None:
            echo["conversation"] = {"id": conversation}

    def response(self, status: int, body: bytes) -> bytes:
        return self.observer.response(status, self.inner.response(status, body))  # type: ignore[no-any-return]

    def feed(self, data: bytes) -> bytes:
        return self.observer.feed(self.inner.feed(data))  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self.observer.feed(self.inner.finish()) + self.observer.finish()  # type: ignore[no-any-return]

    def abort(self, code: str, message: str) -> bytes:
        # The observer's abort drops a withheld response.completed (nothing is stored from
        # a broken stream); the client gets this API's error events, not the observer's.
        self.observer.abort(code, message)
        return self.inner.abort(code, message)

    def settle(self) -> Any:
        """The observer's store write to wait for before the last bytes go out (None:
        nothing to wait for)."""
        settle = getattr(self.observer, "settle", None)
        return settle() if settle is not None else None
