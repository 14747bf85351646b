"""Fake external providers for the tests: an OpenAI-only and an Anthropic-only upstream.

No external network exists here, so a provider's own behaviour is imitated by a small
server written from the providers' published API references (OpenAI's Chat Completions
and Models; Anthropic's Messages, streaming events, count_tokens, Models and error
shapes). Answers are deterministic and small; every one parses with the official SDKs'
types (tests/test_providerfakes.py checks that). Each request is recorded (method, path,
headers, body) so a test can check what reached the provider: keys above all.

`FakeProvider` runs this file as a subprocess on 127.0.0.1 (a checked free port) and
stops it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CREATED = 1_700_000_000


# --- the answers (pure) --------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """A message's text: a string, or its text parts/blocks in order."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
                elif part.get("type") == "tool_result":
                    parts.append(_text_of(part.get("content", "")))
        return " ".join(parts)
    return ""


def _first_argument(schema: Any) -> dict[str, Any]:
    """Arguments for a tool call: its schema's first property set to "Paris"."""
    if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
        for name in schema["properties"]:
            return {name: "Paris"}
    return {}


class Plan:
    """What the fake answers to one request, whichever API: thinking, text, a tool call,
    the stop reason (OpenAI's words; `anthropic_stop` has Anthropic's) and token counts."""

    def __init__(
        self,
        model: str,
        prompt_text: str,
        last_role: str,
        last_text: str,
        tool: tuple[str, dict[str, Any]] | None,
        max_tokens: int | None,
        stops: list[str],
        thinking: bool,
    ) -> None:
        self.model = model
        self.thinking = "Let me think about it." if thinking else ""
        self.tool: tuple[str, dict[str, Any]] | None = None
        self.stop_sequence: str | None = None
        if last_role == "tool":
            text = f"The tool said: {last_text}"
        elif tool is not None:
            self.tool = tool
            text = "Let me call a tool."
        else:
            text = f"Hello from {model}." + (f" You said: {last_text}" if last_text else "")
        self.finish = "tool_calls" if self.tool else "stop"
        for stop in stops:
            if stop and stop in text:
                text = text[: text.index(stop)]
                self.stop_sequence = stop
                self.finish = "stop"
                self.tool = None
                break
        if max_tokens is not None and max_tokens <= 1:
            text = text.split(" ")[0]
            self.finish = "length"
            self.tool = None
        self.text = text
        self.prompt_tokens = max(1, _words(prompt_text))
        arguments = json.dumps(self.tool[1]) if self.tool else ""
        self.completion_tokens = max(
            1, _words(text) + _words(self.thinking) + (_words(arguments) if self.tool else 0)
        )

    @property
    def anthropic_stop(self) -> str:
        if self.finish == "length":
            return "max_tokens"
        if self.finish == "tool_calls":
            return "tool_use"
        return "stop_sequence" if self.stop_sequence else "end_turn"


def plan_chat(body: dict[str, Any]) -> Plan:
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    tools = body.get("tools") or []
    tool = None
    if tools and last.get("role") == "user" and body.get("tool_choice") != "none":
        function = tools[0].get("function", {})
        tool = (str(function.get("name", "tool")), _first_argument(function.get("parameters")))
    stops = body.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    model = str(body.get("model", ""))
    return Plan(
        model,
        " ".join(_text_of(m.get("content")) for m in messages),
        str(last.get("role", "")),
        _text_of(last.get("content")),
        tool,
        max_tokens,
        list(stops),
        "reason" in model or bool(body.get("reasoning_effort")),
    )


def plan_messages(body: dict[str, Any]) -> Plan:
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    content = last.get("content")
    has_result = isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {}
    tool = None
    if tools and not has_result and choice.get("type") != "none":
        tool = (str(tools[0].get("name", "tool")), _first_argument(tools[0].get("input_schema")))
    system = body.get("system")
    prompt = " ".join([_text_of(system)] + [_text_of(m.get("content")) for m in messages])
    thinking = body.get("thinking") or {}
    return Plan(
        str(body.get("model", "")),
        prompt,
        "tool" if has_result else str(last.get("role", "")),
        _text_of(content),
        tool,
        body.get("max_tokens"),
        list(body.get("stop_sequences") or []),
        thinking.get("type") == "enabled",
    )


def chat_completion(plan: Plan, number: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": plan.text}
    if plan.thinking:
        message["reasoning_content"] = plan.thinking
    if plan.tool:
        message["tool_calls"] = [
            {
                "id": f"call_fake{number}",
                "type": "function",
                "function": {"name": plan.tool[0], "arguments": json.dumps(plan.tool[1])},
            }
        ]
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": CREATED,
        "model": plan.model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": plan.finish, "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        },
    }


def chat_chunks(plan: Plan, number: int, include_usage: bool) -> list[dict[str, Any]]:
    base = {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": plan.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    if plan.thinking:
        out += [chunk({"reasoning_content": w + " "}) for w in plan.thinking.split(" ")]
    words = plan.text.split(" ")
    out += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    if plan.tool:
        arguments = json.dumps(plan.tool[1])
        half = len(arguments) // 2
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": f"call_fake{number}",
                            "type": "function",
                            "function": {"name": plan.tool[0], "arguments": ""},
                        }
                    ]
                }
            )
        )
        for piece in (arguments[:half], arguments[half:]):
            out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    out.append(chunk({}, plan.finish))
    if include_usage:
        out.append(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": plan.prompt_tokens,
                    "completion_tokens": plan.completion_tokens,
                    "total_tokens": plan.prompt_tokens + plan.completion_tokens,
                },
            }
        )
    return out


def anthropic_message(plan: Plan, number: int) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if plan.thinking:
        content.append({"type": "thinking", "thinking": plan.thinking, "signature": "fakesig"})
    if plan.text:
        content.append({"type": "text", "text": plan.text})
    if plan.tool:
        content.append(
            {
                "type": "tool_use",
                "id": f"toolu_fake{number}",
                "name": plan.tool[0],
                "input": plan.tool[1],
            }
        )
    return {
        "id": f"msg_fake{number}",
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": content,
        "stop_reason": plan.anthropic_stop,
        "stop_sequence": plan.stop_sequence,
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.completion_tokens},
    }


def anthropic_events(plan: Plan, number: int) -> list[tuple[str, dict[str, Any]]]:
    start = anthropic_message(plan, number)
    start.update(content=[], stop_reason=None, stop_sequence=None)
    start["usage"] = {"input_tokens": plan.prompt_tokens, "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    index = 0

    def block(first: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        nonlocal index
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": first},
            )
        )
        if index == 0:
            events.append(("ping", {"type": "ping"}))
        for delta in deltas:
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1

    if plan.thinking:
        block(
            {"type": "thinking", "thinking": "", "signature": ""},
            [{"type": "thinking_delta", "thinking": w + " "} for w in plan.thinking.split(" ")]
            + [{"type": "signature_delta", "signature": "fakesig"}],
        )
    if plan.text:
        words = plan.text.split(" ")
        block(
            {"type": "text", "text": ""},
            [{"type": "text_delta", "text": w if i == 0 else " " + w} for i, w in enumerate(words)],
        )
    if plan.tool:
        arguments = json.dumps(plan.tool[1])
        half = len(arguments) // 2
        block(
            {"type": "tool_use", "id": f"toolu_fake{number}", "name": plan.tool[0], "input": {}},
            [
                {"type": "input_json_delta", "partial_json": arguments[:half]},
                {"type": "input_json_delta", "partial_json": arguments[half:]},
            ],
        )
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": plan.anthropic_stop, "stop_sequence": plan.stop_sequence},
                "usage": {"output_tokens": plan.completion_tokens},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_body(api: str, status: int, message: str) -> dict[str, Any]:
    if api == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = {401: "invalid_request_error", 429: "requests"}.get(status, "invalid_request_error")
    code = {401: "invalid_api_key", 404: "unknown_url", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# --- the server (run as a subprocess) -----------------------------------------------------------


# The MCP tool loop's scripted model: a first user message "call NAME" (with a function tool
# NAME offered) gets a function call to NAME with these arguments while the input has no
# function_call_output ("call NAME forever": always), then a message with the last output.
TOOL_ARGUMENTS = {"add": '{"a":2,"b":3}', "sleep": '{"seconds":30}', "fail": "{}"}


def _first_words(body: dict[str, Any]) -> str:
    """The text of the first user message of a Responses request's input."""
    items = body.get("input")
    if isinstance(items, str):
        return items
    items = items if isinstance(items, list) else []
    first = next((i for i in items if isinstance(i, dict) and i.get("role") == "user"), None)
    content = first.get("content") if first else None
    parts = content if isinstance(content, list) else [{"text": content or ""}]
    return " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def tool_step(body: dict[str, Any], items: list[Any], number: int) -> dict[str, Any] | None:
    """The scripted model's output item for `body`, or None when the script does not apply
    ("... then break": the call after the tool's output answers 400, see serve)."""
    words = _first_words(body).split()
    offered = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    if len(words) < 2 or words[0] != "call" or words[1] not in offered:
        return None
    outputs = [i for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
    if outputs and words[-1] != "forever":
        return {
            "type": "message",
            "id": f"msg_fake{number}",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": str(outputs[-1]["output"]), "annotations": []}
            ],
        }
    return {
        "type": "function_call",
        "id": f"fc_fake{number}",
        "call_id": f"call_fake{number}",
        "name": words[1],
        "arguments": TOOL_ARGUMENTS.get(words[1], "{}"),
        "status": "completed",
    }


def responses_answer(body: dict[str, Any], number: int) -> dict[str, Any]:
    """A Responses API answer (OpenAI's reference shape) to `body`; it keeps no history: its
    text names how many input items it saw and the last one's text (or `tool_step`'s item)."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    items = items if isinstance(items, list) else []
    last = ""
    if items and isinstance(items[-1], dict):
        content = items[-1].get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        last = " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
    text = f"seen {len(items)} items; last: {last}"
    step = tool_step(body, items, number)
    if step is not None:
        text = step["content"][0]["text"] if step["type"] == "message" else ""
    return {
        "id": f"resp_fake{number}",
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "model": body.get("model", ""),
        "output": [
            step
            or {
                "type": "message",
                "id": f"msg_fake{number}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "instructions": body.get("instructions"),
        "previous_response_id": body.get("previous_response_id"),
        "usage": {
            "input_tokens": len(items),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": _words(text),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(items) + _words(text),
        },
    }


def responses_events(answer: dict[str, Any]) -> list[bytes]:
    """The event stream of `answer`: created, one text delta (or a function call's
    arguments), completed."""
    item = answer["output"][0]
    if item["type"] == "function_call":
        return _function_call_events(answer, item)
    text = item["content"][0]["text"]
    started = {**answer, "status": "in_progress", "output": [], "usage": None}
    opened = {**item, "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": opened},
        {"type": "response.content_part.added", **at, "part": part},
        {"type": "response.output_text.delta", **at, "delta": text, "logprobs": []},
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": answer},
    ]
    return [
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
        for n, e in enumerate(events)
    ]


def _function_call_events(answer: dict[str, Any], item: dict[str, Any]) -> list[bytes]:
    started = {**answer, "status": "in_progress", "output": [], "usage": None}
    at = {"item_id": item["id"], "output_index": 0}
    args = item["arguments"]
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "arguments": "", "status": "in_progress"},
        },
        {"type": "response.function_call_arguments.delta", **at, "delta": args[:3]},
        {"type": "response.function_call_arguments.delta", **at, "delta": args[3:]},
        {"type": "response.function_call_arguments.done", **at, "arguments": args},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": answer},
    ]
    return [
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
        for n, e in enumerate(events)
    ]


def serve(api: str, port: int, models: list[str], key: str | None, fail_429: int) -> None:
    from aiohttp import web

    seen: list[dict[str, Any]] = []
    counter = {"requests": 0, "failed": 0}

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(error_body(api, status, message), status=status, headers=headers)

    def presented(request: web.Request) -> str | None:
        if api == "anthropic":
            return request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_"):
            return await handler(request)
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        if key is not None and presented(request) != key:
            return error(401, "invalid x-api-key" if api == "anthropic" else "Incorrect API key")
        if api == "anthropic" and "anthropic-version" not in request.headers:
            return error(400, "anthropic-version: header is required")
        if request.method == "POST" and counter["failed"] < fail_429:
            counter["failed"] += 1
            return error(429, "Rate limit reached", {"retry-after": "1"})
        if request.method == "POST" and not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        counter["requests"] += 1
        request["body"] = body
        request["number"] = counter["requests"]
        return await handler(request)

    async def seen_handler(_request: web.Request) -> web.Response:
        return web.json_response(seen)

    async def clear_handler(_request: web.Request) -> web.Response:
        seen.clear()
        return web.json_response({"cleared": True})

    async def set_models(request: web.Request) -> web.Response:
        models[:] = list(await request.json())
        return web.json_response({"models": models})

    models_delay = [0.0]  # seconds GET /v1/models waits before answering

    async def set_models_delay(request: web.Request) -> web.Response:
        models_delay[0] = float(await request.json())
        return web.json_response({"delay": models_delay[0]})

    async def list_models(_request: web.Request) -> web.Response:
        if models_delay[0]:
            await asyncio.sleep(models_delay[0])
        if api == "anthropic":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2024-10-22T00:00:00Z"}
                for m in models
            ]
            return web.json_response(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": models[0] if models else None,
                    "last_id": models[-1] if models else None,
                }
            )
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "fake"} for m in models
        ]
        return web.json_response({"object": "list", "data": data})

    async def sse(request: web.Request, frames: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        await response.write_eof()
        return response

    async def chat(request: web.Request) -> web.StreamResponse:
        body = request["body"]
        if not body.get("messages"):
            return error(400, "'messages' is required")
        plan = plan_chat(body)
        number = request["number"]
        if body.get("stream"):
            options = body.get("stream_options") or {}
            chunks = chat_chunks(plan, number, bool(options.get("include_usage")))
            frames = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
            return await sse(request, [*frames, b"data: [DONE]\n\n"])
        return web.json_response(chat_completion(plan, number))

    async def completions(request: web.Request) -> web.Response:
        body = request["body"]
        prompt = body.get("prompt", "")
        plan = plan_chat({**body, "messages": [{"role": "user", "content": str(prompt)}]})
        return web.json_response(
            {
                "id": f"cmpl-fake{request['number']}",
                "object": "text_completion",
                "created": CREATED,
                "model": plan.model,
                "choices": [
                    {"index": 0, "text": plan.text, "logprobs": None, "finish_reason": plan.finish}
                ],
                "usage": {
                    "prompt_tokens": plan.prompt_tokens,
                    "completion_tokens": plan.completion_tokens,
                    "total_tokens": plan.prompt_tokens + plan.completion_tokens,
                },
            }
        )

    async def messages(request: web.Request) -> web.StreamResponse:
        body = request["body"]
        if not body.get("messages"):
            return error(400, "messages: field required")
        if not isinstance(body.get("max_tokens"), int):
            return error(400, "max_tokens: field required")
        plan = plan_messages(body)
        number = request["number"]
        if body.get("stream"):
            frames = [
                f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                for name, data in anthropic_events(plan, number)
            ]
            return await sse(request, frames)
        return web.json_response(anthropic_message(plan, number))

    async def count_tokens(request: web.Request) -> web.Response:
        body = request["body"]
        return web.json_response({"input_tokens": plan_messages(body).prompt_tokens})

    async def responses(request: web.Request) -> web.StreamResponse:
        answer = responses_answer(request["body"], request["number"])
        if answer["output"][0]["type"] == "message" and "then break" in _first_words(
            request["body"]
        ):
            return error(400, "the scripted model breaks after the tool call")
        if request["body"].get("stream"):
            return await sse(request, responses_events(answer))
        return web.json_response(answer)

    async def not_found(request: web.Request) -> web.Response:
        return error(404, f"Unknown request URL: {request.method} {request.path}")

    app = web.Application(middlewares=[record], client_max_size=64 * 1024 * 1024)
    app.router.add_get("/_seen", seen_handler)
    app.router.add_post("/_clear", clear_handler)
    app.router.add_post("/_models", set_models)
    app.router.add_post("/_models_delay", set_models_delay)
    app.router.add_get("/v1/models", list_models)
    if api == "anthropic":
        app.router.add_post("/v1/messages", messages)
        app.router.add_post("/v1/messages/count_tokens", count_tokens)
    else:
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/responses", responses)
    app.router.add_route("*", "/{tail:.*}", not_found)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- the test-side handles --------------------------------------------------------------------


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """An event-stream body's (event name, data) pairs, in order (frames without both an
    `event:` and a `data:` line are skipped): the reading side of `anthropic_events`."""
    out = []
    for frame in text.split("\n\n"):
        name = data = None
        for line in frame.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if name is not None and data is not None:
            out.append((name, data))
    return out


def anthropic_client(base_url: str, api_key: str | None, **kwargs: Any) -> Any:
    """An `anthropic.Anthropic` client with no retries. anthropic==0.38.0 (the main test
    env's pin) passes `proxies` to httpx, which httpx 0.28 no longer takes: it gets an
    httpx client of its own (newer SDKs accept one as well)."""
    import anthropic
    import httpx

    return anthropic.Anthropic(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        http_client=httpx.Client(timeout=kwargs.pop("timeout", 30.0)),
        **kwargs,
    )


def async_anthropic_client(base_url: str, api_key: str | None, **kwargs: Any) -> Any:
    """`anthropic_client`, asynchronous."""
    import anthropic
    import httpx

    return anthropic.AsyncAnthropic(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        http_client=httpx.AsyncClient(timeout=kwargs.pop("timeout", 30.0)),
        **kwargs,
    )


class FakeProvider:
    """A fake provider in a subprocess: `with FakeProvider("openai", ["gpt-4o"]) as fake:`."""

    def __init__(
        self,
        api: str,
        models: list[str] | None = None,
        *,
        key: str | None = None,
        fail_429: int = 0,
    ) -> None:
        if api not in ("openai", "anthropic"):
            raise ValueError(f"api must be openai or anthropic, not {api!r}")
        self.api = api
        self.models = list(models or [])
        self.key = key
        self.fail_429 = fail_429
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProvider:
        from gatewayutil import free_port

        self.port = free_port()
        command = [
            sys.executable,
            str(Path(__file__)),
            "--api",
            self.api,
            "--port",
            str(self.port),
            "--models",
            json.dumps(self.models),
            "--fail-429",
            str(self.fail_429),
        ]
        if self.key is not None:
            command += ["--key", self.key]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake provider exited with {self.process.returncode}")
            try:
                self.seen()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("fake provider did not start within 20 s")

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            body = None if payload is None else json.dumps(payload)
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def seen(self) -> list[dict[str, Any]]:
        """Every request the fake received (its own /_ routes excepted), in order."""
        return self._call("GET", "/_seen")

    def clear(self) -> None:
        self._call("POST", "/_clear", {})

    def set_models(self, models: list[str]) -> None:
        """Change what GET /v1/models lists from now on (a provider adding a model)."""
        self._call("POST", "/_models", models)

    def set_models_delay(self, seconds: float) -> None:
        """GET /v1/models answers after `seconds` from now on (a slow provider)."""
        self._call("POST", "/_models_delay", seconds)

    def stop(self) -> None:
        process = self.process
        self.process = None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", choices=("openai", "anthropic"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="[]")
    parser.add_argument("--key")
    parser.add_argument("--fail-429", type=int, default=0)
    args = parser.parse_args()
    serve(args.api, args.port, json.loads(args.models), args.key, args.fail_429)
