"""The MCP tool loop of POST /v1/responses, as pure state (no I/O): the driver
(smg.dataplane.mcp_responses) calls the model and the MCP servers and feeds the answers in.

The request's `{"type": "mcp", "server_label": ...}` tools become function tools for the
model; each function call the model makes to one of them is run on its MCP server, and
the model is called again with the call and its output appended to the input, until it
answers without an MCP call. The client sees one response: `mcp_list_tools` items first
(one per server), then the model's items in order with each MCP function call replaced by
an `mcp_call` item (output or error), usage summed over every model call.

Limits, as the Rust SMG 1.13 (routers/openai/mcp/tool_loop.rs): at most
min(max_tool_calls, 10) MCP calls (DEFAULT_MAX_ITERATIONS); a call past the limit is not
run: it is an `mcp_call` item with status "failed" and 1.13's error text, and the response
gets `incomplete_details: {"reason": "max_tool_calls"}` with status "completed" (1.13's
"partial success"). A function call to a tool that is not an MCP tool ends the loop: it
goes to the client as a function_call item (the client runs it).

Streaming: the model is streamed too; its events are relayed with the client's
sequence_number and output_index (the model's own restart at 0 on every call), its text
deltas live; MCP function calls are announced as `mcp_call` items with
`response.mcp_call_arguments.delta/done`, then `response.mcp_call.in_progress`,
`response.mcp_call.completed|failed` and `response.output_item.done` around the run.
The model's own response.created/in_progress/completed are replaced by the loop's, which
open and close the client's stream.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

DEFAULT_MAX_ITERATIONS = 10  # 1.13's mcp_utils::DEFAULT_MAX_ITERATIONS
NOT_EXECUTED = "Not executed - response stopped due to limit"  # 1.13's words
MAX_EVENT_BYTES = 1 << 24  # an upstream SSE event longer than this is a broken stream
DONE = b"data: [DONE]\n\n"
_NAME_OK = re.compile(r"[^a-zA-Z0-9_-]")


class LoopError(Exception):
    """The request cannot run the loop (400), or the model's answer cannot go on (502)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Tool(Protocol):
    """What the loop reads of smg.mcp.manager.McpTool."""

    server_label: str
    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None


@dataclass
class Call:
    """One MCP function call of the model, and where its mcp_call item goes."""

    item_id: str  # the client's mcp_call id (1.13: the function call's id, fc_ -> mcp_)
    call_id: str
    exposed: str  # the function name the model called
    server_label: str
    tool: str  # the tool's name on its server
    arguments: str
    output_index: int  # the client's
    run: bool = True  # False: past the limit, answered "not executed"


def mcp_labels(body: dict[str, Any]) -> list[str] | None:
    """The server labels of a request's MCP tools, in order, each once; None when it has
    none (the plain Responses path). An MCP tool without a label -> LoopError."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None
    labels: list[str] = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "mcp":
            label = tool.get("server_label")
            if not isinstance(label, str) or not label:
                raise LoopError(400, "invalid_request", "an mcp tool needs a 'server_label'")
            if label not in labels:
                labels.append(label)
    return labels or None


def mcp_tool_entries(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [t for t in tools if isinstance(t, dict) and t.get("type") == "mcp"]


def allowed(entry: dict[str, Any], name: str) -> bool:
    """The entry's `allowed_tools` (a list of names, or {tool_names}) admits `name`."""
    value = entry.get("allowed_tools")
    if value is None:
        return True
    if isinstance(value, dict):
        if value.get("read_only") is not None:
            return False  # 1.13 fails closed: no readOnlyHint filter
        value = value.get("tool_names")
        if value is None:
            return True
    return isinstance(value, list) and name in value


def exposed_names(listed: dict[str, list[Tool]], taken: set[str]) -> dict[str, tuple[str, Tool]]:
    """function name -> (server label, tool): a tool's own name when no other MCP tool or
    client function has it, else `mcp_<label>_<name>` (1.13's disambiguated form), numbered
    when even that is taken."""
    counts: dict[str, int] = {}
    for tools in listed.values():
        for tool in tools:
            counts[tool.name] = counts.get(tool.name, 0) + 1
    names: dict[str, tuple[str, Tool]] = {}
    used = set(taken)
    for label, tools in listed.items():
        for tool in tools:
            name = tool.name
            if counts[name] > 1 or name in used:
                name = _NAME_OK.sub("_", f"mcp_{label}_{tool.name}")
                base, n = name, 2
                while name in used:
                    name, n = f"{base}_{n}", n + 1
            used.add(name)
            names[name] = (label, tool)
    return names


def function_tool(name: str, tool: Tool) -> dict[str, Any]:
    schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
    return {
        "type": "function",
        "name": name,
        "description": tool.description or "",
        "parameters": schema or {"type": "object", "properties": {}},
    }


def list_tools_item(label: str, tools: list[Tool]) -> dict[str, Any]:
    return {
        "id": "mcpl_" + secrets.token_hex(24),
        "type": "mcp_list_tools",
        "server_label": label,
        "tools": [
            {
                "name": t.name,
                "description": t.description,
                "input_schema": t.input_schema,
                "annotations": t.annotations,
            }
            for t in tools
        ],
        "error": None,
    }


def mcp_item_id(source: str) -> str:
    """1.13's mcp_response_item_id: fc_x / call_x -> mcp_x; mcp_ ids kept."""
    if source.startswith("mcp_"):
        return source
    for prefix in ("call_", "fc_"):
        if source.startswith(prefix):
            return "mcp_" + source[len(prefix) :]
    return "mcp_" + source


def history_as_functions(items: list[Any]) -> list[Any]:
    """Earlier turns' MCP items as the model understands them: an mcp_call becomes its
    function_call and function_call_output; an mcp_list_tools item is left out."""
    out: list[Any] = []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "mcp_list_tools":
            continue
        if kind == "mcp_call":
            call_id = str(item.get("id") or "")
            out.append(
                {
                    "type": "function_call",
                    "call_id": call_id,
                    "name": item.get("name", ""),
                    "arguments": item.get("arguments") or "{}",
                }
            )
            error = item.get("error")
            output = orjson.dumps({"error": error}).decode() if error else item.get("output")
            out.append({"type": "function_call_output", "call_id": call_id, "output": output or ""})
            continue
        out.append(item)
    return out


def add_usage(total: dict[str, Any] | None, usage: Any) -> dict[str, Any] | None:
    """Token counts summed field by field (nested details too)."""
    if not isinstance(usage, dict):
        return total
    if total is None:
        return orjson.loads(orjson.dumps(usage))
    for key, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            prior = total.get(key)
            total[key] = (prior if isinstance(prior, int) else 0) + value
        elif isinstance(value, dict):
            prior = total.get(key)
            total[key] = add_usage(prior if isinstance(prior, dict) else None, value)
    return total


def sse(event: dict[str, Any]) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (event["type"].encode(), orjson.dumps(event))


class ToolLoop:
    """One request's loop. Whole answers: `request()`, `take(answer)`, `calls()`, then
    `result(call, output, error)` per call, until `finished`; `response()`. Streams: as
    well, with `opening()` first, `feed(chunk)` / `stream_end()` instead of `take`, and
    `events()` drained after every step; `closing()` last."""

    def __init__(
        self,
        body: dict[str, Any],
        listed: dict[str, list[Tool]],
        *,
        response_id: str | None = None,
        created_at: int | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        self.body = body  # the request as the worker would get it (history expanded)
        self.stream = body.get("stream") is True
        self.response_id = response_id or "resp_" + secrets.token_hex(24)
        self.created_at = created_at if created_at is not None else int(time.time())
        entries = {e["server_label"]: e for e in mcp_tool_entries(body)}
        self.listed = {
            label: [t for t in tools if allowed(entries.get(label, {}), t.name)]
            for label, tools in listed.items()
        }
        others = [
            t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") != "mcp"
        ]
        client_functions = {
            t.get("name") for t in others if t.get("type") == "function" and t.get("name")
        }
        self.client_functions: set[str] = {str(n) for n in client_functions}
        self.names = exposed_names(self.listed, self.client_functions)
        self.tools = others + [function_tool(n, t) for n, (_, t) in self.names.items()]
        limit = body.get("max_tool_calls")
        self.limit = (
            min(limit, max_iterations)
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0
            else max_iterations
        )
        self.input = history_as_functions(_input_list(body.get("input")))
        self.appended: list[dict[str, Any]] = []  # function_call + _output items, in order
        self.output: list[dict[str, Any] | None] = []  # the client's items (None: a call's slot)
        self.usage: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None  # the model's last response
        self.pending: list[Call] = []
        self.total_calls = 0
        self.model_calls = 0
        self.finished = False
        self.incomplete: str | None = None
        self._events: list[bytes] = []
        self.sequence = 0
        # The caller's patch of the response objects the stream opens with (history fields).
        self.patch: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # Streaming, per model call: its output_index -> the client's, the calls announced.
        self._index: dict[int, int] = {}
        self._stream_calls: dict[int, Call] = {}
        self._client_call = False
        self._buffer = b""
        self._completed = False
        for label, tools in self.listed.items():
            self.output.append(list_tools_item(label, tools))

    # --- the model's requests ------------------------------------------------------------

    def request(self) -> dict[str, Any]:
        """The next model call's body: MCP tools as function tools, earlier calls and their
        outputs appended to the input, no history fields, `store: false`."""
        out = {
            k: v
            for k, v in self.body.items()
            if k not in ("previous_response_id", "conversation", "max_tool_calls", "tools")
        }
        if self.tools:
            out["tools"] = self.tools
        out["input"] = self.input + self.appended
        out["store"] = False
        out["stream"] = self.stream
        if self.model_calls:
            out["tool_choice"] = "auto"  # 1.13: the call happened; let the model answer
        else:
            out["tool_choice"] = self._tool_choice(self.body.get("tool_choice"))
        if "tool_choice" in out and out["tool_choice"] is None:
            del out["tool_choice"]
        self.model_calls += 1
        return out

    def _tool_choice(self, choice: Any) -> Any:
        """1.13's remap: strings pass; {type: mcp, server_label, name} and {type: function,
        name} become the function of that name; anything else "auto"."""
        if choice is None or isinstance(choice, str):
            return choice
        if isinstance(choice, dict):
            name = choice.get("name")
            if choice.get("type") == "mcp" and isinstance(name, str):
                for exposed, (label, tool) in self.names.items():
                    if tool.name == name and label == choice.get("server_label", label):
                        return {"type": "function", "name": exposed}
            if isinstance(name, str) and (name in self.names or name in self.client_functions):
                return {"type": "function", "name": name}
        return "auto"

    # --- whole answers ---------------------------------------------------------------------

    def take(self, answer: Any) -> None:
        """A model call's whole JSON answer."""
        if not isinstance(answer, dict) or not isinstance(answer.get("output"), list):
            raise LoopError(502, "bad_upstream_response", "the model's answer has no output")
        self.last = answer
        self.usage = add_usage(self.usage, answer.get("usage"))
        client_call = False
        for item in answer["output"]:
            if not isinstance(item, dict):
                continue
            call = self._mcp_call(item, len(self.output))
            if call is None:
                if item.get("type") == "function_call":
                    client_call = True
                self.output.append(item)
            else:
                self.output.append(None)
        self._settle(client_call)

    def _mcp_call(self, item: dict[str, Any], index: int) -> Call | None:
        """The Call of an MCP function_call item (None for any other item)."""
        if item.get("type") != "function_call":
            return None
        target = self.names.get(str(item.get("name")))
        if target is None:
            return None
        call_id = str(item.get("call_id") or item.get("id") or "")
        call = Call(
            item_id=mcp_item_id(str(item.get("id") or call_id)),
            call_id=call_id,
            exposed=str(item.get("name")),
            server_label=target[0],
            tool=target[1].name,
            arguments=item.get("arguments") if isinstance(item.get("arguments"), str) else "{}",
            output_index=index,
        )
        self.pending.append(call)
        return call

    def _settle(self, client_call: bool) -> None:
        """After a model call: which calls run (within the limit) and whether it was the
        last."""
        for call in self.pending:
            self.total_calls += 1
            if self.total_calls > self.limit:
                call.run = False
                self.incomplete = "max_tool_calls"
        if not self.pending or client_call or self.incomplete is not None:
            self.finished = True

    def calls(self) -> list[Call]:
        """The calls to run now, in order; each answered with `result` (calls past the
        limit are answered here, not run)."""
        pending, self.pending = self.pending, []
        for call in pending:
            if not call.run:
                self._record(call, None, NOT_EXECUTED)
        return [c for c in pending if c.run]

    def result(self, call: Call, output: str, error: str | None) -> None:
        """A call's outcome: its mcp_call item, and the function_call + output the model
        gets next."""
        self._record(call, output, error)
        self.appended.append(
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.exposed,
                "arguments": call.arguments,
            }
        )
        self.appended.append(
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": orjson.dumps({"error": error}).decode() if error else output,
            }
        )

    def _record(self, call: Call, output: str | None, error: str | None) -> None:
        item = {
            "id": call.item_id,
            "type": "mcp_call",
            "status": "failed" if error else "completed",
            "approval_request_id": None,
            "arguments": call.arguments,
            "error": error,
            "name": call.tool,
            "output": "" if error else (output or ""),
            "server_label": call.server_label,
        }
        self.output[call.output_index] = item
        if self.stream:
            kind = "failed" if error else "completed"
            self._emit(
                {
                    "type": f"response.mcp_call.{kind}",
                    "output_index": call.output_index,
                    "item_id": call.item_id,
                }
            )
            self._emit(
                {
                    "type": "response.output_item.done",
                    "output_index": call.output_index,
                    "item": item,
                }
            )

    # --- the client's response -------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        """The client's response: the model's last answer with the loop's id, every item,
        usage summed, the client's own tools and tool_choice."""
        base = dict(self.last or {})
        base["id"] = self.response_id
        base["object"] = "response"
        base["created_at"] = self.created_at
        base["output"] = [item for item in self.output if item is not None]
        base["usage"] = self.usage
        base["tools"] = self.body.get("tools", [])
        if "tool_choice" in self.body:
            base["tool_choice"] = self.body["tool_choice"]
        if "max_tool_calls" in self.body:
            base["max_tool_calls"] = self.body["max_tool_calls"]
        if self.incomplete is not None:
            base["status"] = "completed"  # 1.13: partial success, not failed
            base["incomplete_details"] = {"reason": self.incomplete}
        return base

    # --- streams ---------------------------------------------------------------------------

    def events(self) -> bytes:
        """The client's events made since the last call."""
        out, self._events = b"".join(self._events), []
        return out

    def _emit(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        self._events.append(sse(event))

    def _skeleton(self, status: str) -> dict[str, Any]:
        skeleton = {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.body.get("model"),
            "output": [],
            "tools": self.body.get("tools", []),
            "tool_choice": self.body.get("tool_choice", "auto"),
            "usage": None,
        }
        return self.patch(skeleton) if self.patch is not None else skeleton

    def opening(self) -> None:
        """response.created, response.in_progress, then each server's mcp_list_tools."""
        self._emit({"type": "response.created", "response": self._skeleton("in_progress")})
        self._emit({"type": "response.in_progress", "response": self._skeleton("in_progress")})
        for index, item in enumerate(self.output):
            assert item is not None
            self._emit(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "tools": []},
                }
            )
            for kind in ("in_progress", "completed"):
                self._emit(
                    {
                        "type": f"response.mcp_list_tools.{kind}",
                        "output_index": index,
                        "item_id": item["id"],
                    }
                )
            self._emit({"type": "response.output_item.done", "output_index": index, "item": item})

    def feed(self, chunk: bytes) -> None:
        """Bytes of the model's event stream, split anywhere."""
        data = self._buffer + chunk
        start = 0
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            self._event(data[start:end])
            start = end + 2
        self._buffer = data[start:]
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise LoopError(502, "bad_upstream_response", "the model's event stream is malformed")

    def _event(self, block: bytes) -> None:
        lines = block.replace(b"\r\n", b"\n").split(b"\n")
        data = b"\n".join(line[5:].strip() for line in lines if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise LoopError(
                502, "bad_upstream_response", "the model's event stream is malformed"
            ) from None
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind in ("response.created", "response.in_progress", "response.queued"):
            return
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            answer = event.get("response")
            if kind == "response.failed" or not isinstance(answer, dict):
                error = answer.get("error") if isinstance(answer, dict) else None
                message = error.get("message") if isinstance(error, dict) else None
                raise LoopError(
                    502, "upstream_error", str(message or "the model's response failed")
                )
            self._completed = True
            self.last = answer
            self.usage = add_usage(self.usage, answer.get("usage"))
            return
        if kind == "error":
            message = event.get("message") or "the model's stream failed"
            raise LoopError(502, str(event.get("code") or "upstream_error"), str(message))
        index = event.get("output_index")
        if not isinstance(index, int):
            self._forward(event)
            return
        mine = self._index.get(index)
        if mine is None:
            mine = self._index[index] = len(self.output)
            self.output.append(None)
        call = self._stream_calls.get(index)
        if kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict):
                found = self._mcp_call(item, mine)
                if found is not None:
                    self.pending.pop()  # queued when its arguments are done
                    self._stream_calls[index] = found
                    self._emit(
                        {
                            "type": "response.output_item.added",
                            "output_index": mine,
                            "item": {
                                "id": found.item_id,
                                "type": "mcp_call",
                                "status": "in_progress",
                                "approval_request_id": None,
                                "arguments": "",
                                "error": None,
                                "name": found.tool,
                                "output": None,
                                "server_label": found.server_label,
                            },
                        }
                    )
                    self._emit(  # 1.13's order: in_progress right after the item is added
                        {
                            "type": "response.mcp_call.in_progress",
                            "output_index": mine,
                            "item_id": found.item_id,
                        }
                    )
                    return
                if item.get("type") == "function_call":
                    self._client_call = True
        elif call is not None:
            if kind == "response.function_call_arguments.delta":
                self._emit(
                    {
                        "type": "response.mcp_call_arguments.delta",
                        "output_index": mine,
                        "item_id": call.item_id,
                        "delta": event.get("delta", ""),
                    }
                )
            elif kind == "response.function_call_arguments.done":
                if isinstance(event.get("arguments"), str):
                    call.arguments = event["arguments"]
                self._emit(
                    {
                        "type": "response.mcp_call_arguments.done",
                        "output_index": mine,
                        "item_id": call.item_id,
                        "arguments": call.arguments,
                    }
                )
            elif kind == "response.output_item.done":
                item = event.get("item")
                if isinstance(item, dict) and isinstance(item.get("arguments"), str):
                    call.arguments = item["arguments"]
                self.pending.append(call)  # its own done comes after the run
            return
        elif kind == "response.output_item.done":
            item = event.get("item")
            if isinstance(item, dict):
                self.output[mine] = item
        event["output_index"] = mine
        self._forward(event)

    def _forward(self, event: dict[str, Any]) -> None:
        event.pop("sequence_number", None)
        self._emit(event)

    def stream_end(self) -> None:
        """The model's stream ended: its calls are settled as `take` settles a whole one."""
        if self._buffer.strip():
            self._event(self._buffer)
            self._buffer = b""
        if not self._completed:
            raise LoopError(502, "upstream_error", "the model's stream ended before it completed")
        # An announced call whose item never finished still runs with what it has.
        for call in self._stream_calls.values():
            if all(c is not call for c in self.pending):
                self.pending.append(call)
        self.pending.sort(key=lambda c: c.output_index)
        # An item the stream never closed with output_item.done: as the completed
        # response has it.
        final = self.last.get("output") if self.last is not None else None
        if isinstance(final, list):
            for upstream, mine in self._index.items():
                if (
                    self.output[mine] is None
                    and upstream not in self._stream_calls
                    and 0 <= upstream < len(final)
                    and isinstance(final[upstream], dict)
                ):
                    self.output[mine] = final[upstream]
        client_call = self._client_call
        self._index, self._stream_calls = {}, {}
        self._client_call = False
        self._completed = False
        self._settle(client_call)

    def closing(self, final: dict[str, Any] | None = None) -> None:
        """response.completed with the whole response (`final`: as the caller patched it),
        then `data: [DONE]` (as 1.13)."""
        response = final if final is not None else self.response()
        self._emit({"type": "response.completed", "response": response})
        self._events.append(DONE)

    def failed(self, code: str, message: str) -> None:
        """The loop stopped on an error mid-stream: the client's error event, the end."""
        self._emit({"type": "error", "code": code, "message": message, "param": None})
        self._events.append(DONE)


def _input_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []
