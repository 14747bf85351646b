"""POST /v1/responses with MCP tools: the I/O around smg.mcp.loop.

The history the request names (previous_response_id, conversation) is loaded as for any
Responses request; then the model is called through this gateway itself
(smg.dataplane.loopback: routing, auth, gRPC workers, external providers apply), each MCP
call the model makes is run on its server (smg.mcp.manager, one manager per data-plane
process, made on first use), until the loop ends. The final response is stored (`store`,
default true) BEFORE the answer's last bytes go out, so a client that reads it back right
away finds it. A tool that fails or hangs past the tool timeout is an `mcp_call` item with
its error, and the loop goes on; a model or worker error ends the request with that error
(streams: an `error` event).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

import orjson

from smg.dataplane import loopback, responses
from smg.httpwire import status_line
from smg.mcp.loop import LoopError, ToolLoop, mcp_labels, mcp_tool_entries

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request
    from smg.history.store import HistoryStore
    from smg.mcp.manager import McpManager

log = logging.getLogger("smg.mcp")

_managers: weakref.WeakKeyDictionary[DataPlane, McpManager] = weakref.WeakKeyDictionary()


def wanted(body: dict[str, Any]) -> bool:
    """The request has MCP tools (the tool loop runs instead of a relay)."""
    try:
        return mcp_labels(body) is not None
    except LoopError:
        return True  # answered by serve() with its 400


def manager(app: DataPlane) -> McpManager:
    """This process's MCP manager (smg.mcp.process_manager, made on first use after the
    fork); without --mcp-config-path, one with no configured server, for requests that
    name their own (`server_url`)."""
    from smg import mcp

    made = mcp.process_manager(app.cfg)
    if made is None:
        made = _managers.get(app)
        if made is None:
            from smg.mcp.config import McpConfig
            from smg.mcp.manager import McpManager

            made = _managers[app] = McpManager(McpConfig(), app.cfg.mcp_tool_timeout_secs)
    return made


class _Watch:
    """Sits in `conn.exchange` while the loop runs, so that a client disconnect
    (`ClientConnection.connection_lost` calls `client_gone()`) cancels it; `upstream` is
    None like an exchange's that has no worker (the admission Waiter's pattern)."""

    __slots__ = ("task",)
    upstream = None

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task

    def client_gone(self) -> None:
        if self.task is not None:
            self.task.cancel()


class _Sse:
    """The client's event stream: head once, then chunked frames, then the last chunk."""

    def __init__(self, app: DataPlane, conn: ClientConnection, request: Request) -> None:
        self.app = app
        self.conn = conn
        self.request = request
        self.started = False
        self.chunked = request.version != "1.0"
        self.keep_alive = self.chunked and request.keep_alive and not app.draining

    def write(self, data: bytes) -> None:
        if not data or self.conn.closed:
            return
        if not self.started:
            self.started = True
            extra = b""
            if self.app.cors is not None:
                extra = self.app.cors.response(self.request.header(b"origin"))
            self.conn.write(
                b"".join(
                    (
                        status_line(200),
                        b"content-type: text/event-stream\r\ncache-control: no-cache\r\n",
                        b"transfer-encoding: chunked\r\n" if self.chunked else b"",
                        b"x-request-id: %b\r\n" % self.request.request_id,
                        self.app.process_header,
                        extra,
                        b"" if self.keep_alive else b"connection: close\r\n",
                        b"\r\n",
                    )
                )
            )
        self.conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def end(self) -> None:
        if self.conn.closed:
            return
        if self.chunked:
            self.conn.write(b"0\r\n\r\n")
        self.app._count(self.request, 200, "", self.conn)
        self.conn.response_done(self.keep_alive)


def _sub_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The caller's headers for the model calls (auth, tenant, routing keys, request id);
    the body is new, so its own type."""
    kept = [(k, v) for k, v in request.headers if k != b"content-type"]
    kept.append((b"content-type", b"application/json"))
    return kept


def _error_of(status: int, body: bytes) -> tuple[str, str]:
    """(code, message) of an error answer in the OpenAI shape (else generic)."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        return str(error.get("code") or "upstream_error"), str(error.get("message") or "")
    return "upstream_error", f"the model's request failed with status {status}"


class _Failed(Exception):
    """A model call's error answer: relayed to the client as it is (whole) or as an error
    event (stream)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


async def serve(
    app: DataPlane, conn: ClientConnection, request: Request, body: dict[str, Any]
) -> None:
    """Answer one POST /v1/responses that has MCP tools."""
    stream = body.get("stream") is True
    sse = _Sse(app, conn, request)
    conn.exchange = _Watch(asyncio.current_task())  # type: ignore[assignment]  # see _Watch
    try:
        try:
            prepared = await _prepare(app, request, body)
        except Exception as exc:  # a request must never take the process down
            conn.exchange = None
            _answer_failure(app, conn, request, exc)
            return
        tool_loop, stored = prepared
        try:
            await _run(app, conn, request, tool_loop, sse if stream else None)
        except _ClientGone:
            return  # nobody to answer; nothing stored (1.13 stores only finished answers)
        except Exception as exc:
            conn.exchange = None
            if stream and sse.started:
                code, message = _failure_text(exc)
                tool_loop.failed(code, message)
                sse.write(tool_loop.events())
                sse.end()
            else:
                _answer_failure(app, conn, request, exc)
            return
        assert tool_loop.patch is not None
        final = tool_loop.patch(tool_loop.response())
        # Before the answer: a read right after finds it.
        saved = await stored.save(app, final)
        conn.exchange = None
        if conn.closed:
            return
        if stream:  # a stream goes out whole even when the write failed, as 1.13's
            tool_loop.closing(final)
            sse.write(tool_loop.events())
            sse.end()
        elif not saved:  # 503, as the relayed Responses path and the 1.13 binary answer
            app._send_error(conn, request, 503, "storage_unavailable", responses.STORE_FAILED)
        else:
            app._send(conn, request, 200, orjson.dumps(final))
    finally:
        if conn.exchange is not None and isinstance(conn.exchange, _Watch):
            conn.exchange = None


def _failure_text(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, _Failed):
        return _error_of(exc.status, exc.body)
    if isinstance(exc, LoopError):
        return exc.code, exc.message
    if isinstance(exc, loopback.LoopbackError):
        return "upstream_error", str(exc)
    log.error("MCP tool loop failed: %r", exc, exc_info=exc)
    return "internal_error", "internal gateway error"


def _answer_failure(
    app: DataPlane, conn: ClientConnection, request: Request, exc: Exception
) -> None:
    if conn.closed:
        return
    if isinstance(exc, _Failed):
        app._send(
            conn, request, exc.status, exc.body, error_code=_error_of(exc.status, exc.body)[0]
        )
    elif isinstance(exc, LoopError):
        app._send_error(conn, request, exc.status, exc.code, exc.message)
    elif isinstance(exc, loopback.LoopbackError):
        app._send_error(conn, request, 502, "upstream_error", str(exc))
    else:
        app._history_failed(conn, request, "responses", exc)


class _Stored:
    """Where the final response is stored, and the history fields put back into it."""

    def __init__(
        self,
        store: HistoryStore | None,
        tenant: str,
        conv_tenant: str,
        new_input: list[dict[str, Any]],
        previous: str | None,
        conversation: str | None,
        keep: bool,
    ) -> None:
        self.store = store
        self.tenant = tenant
        self.conv_tenant = conv_tenant
        self.new_input = new_input
        self.previous = previous
        self.conversation = conversation
        self.keep = keep

    async def save(self, app: DataPlane, final: dict[str, Any]) -> bool:
        """False: the record was to be stored and its write failed."""
        if self.store is None or not self.keep:
            return True
        record = responses.record_of(final, self.new_input, self.previous, self.conversation)
        if record is None:
            return True
        return await app._responses_store(self.store, self.tenant, self.conv_tenant, record)


async def _prepare(
    app: DataPlane, request: Request, body: dict[str, Any]
) -> tuple[ToolLoop, _Stored]:
    """The history expanded into the input (responses.expand, as DataPlane._responses_post
    does), the MCP servers' tools listed, the loop made."""
    mcp_labels(body)  # LoopError 400 for an mcp tool without a label
    backend_on = app.cfg.history_backend != "none"
    expansion = await responses.expand(body, backend_on, lambda: app._history(request))
    previous, conv_id, keep = expansion.previous, expansion.conversation, expansion.keep
    upstream = expansion.upstream(body)
    listed = await _list_tools(app, body)
    stored = _Stored(
        expansion.store,
        expansion.tenant,
        expansion.conv_tenant,
        expansion.new_input,
        previous,
        conv_id,
        keep,
    )
    tool_loop = ToolLoop(upstream, listed)

    def patch(response: dict[str, Any]) -> dict[str, Any]:
        # The request's fields the model was not sent, back as for any Responses answer.
        return responses.patch_answer(response, body, previous, conv_id, keep)

    tool_loop.patch = patch
    return tool_loop, stored


async def _list_tools(app: DataPlane, body: dict[str, Any]) -> dict[str, list[Any]]:
    """Each MCP tool entry's server (a request's own `server_url` added first) and its
    tools. An unknown label -> 400; a server that cannot list -> 424 (OpenAI's status)."""
    from smg.mcp.manager import McpError

    mcp = manager(app)
    listed: dict[str, list[Any]] = {}
    for entry in mcp_tool_entries(body):
        label = str(entry["server_label"])
        if label in listed:
            continue
        url = entry.get("server_url")
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise LoopError(
                    400,
                    "invalid_request",
                    f"mcp tool '{label}': 'server_url' must be an http(s) URL",
                )
            headers = entry.get("headers") or {}
            if not isinstance(headers, dict):
                raise LoopError(400, "invalid_request", f"mcp tool '{label}': bad 'headers'")
            headers = {str(k): str(v) for k, v in headers.items()}
            authorization = entry.get("authorization")
            if isinstance(authorization, str) and authorization:
                headers["Authorization"] = f"Bearer {authorization}"
            try:
                await mcp.add_request_server(label, url, headers)
            except McpError as exc:
                raise LoopError(424, "mcp_server_unavailable", _unavailable(label, exc)) from None
        elif label not in mcp.labels():
            raise LoopError(400, "invalid_request", f"MCP server '{label}' is not configured")
        try:
            listed[label] = list(await mcp.list_tools(label))
        except McpError as exc:
            raise LoopError(424, "mcp_server_unavailable", _unavailable(label, exc)) from None
    return listed


def _unavailable(label: str, exc: Exception) -> str:
    return f"Error retrieving tool list from MCP server: '{label}': {exc}"


class _ClientGone(Exception):
    """The caller's connection closed: the loop stops (no further model or tool call)."""


def _check_client(conn: ClientConnection) -> None:
    # The watch cancels the task; this catches a cancellation lost in a race (3.11's
    # wait_for, here or in a library, drops one that lands as its result arrives).
    if conn.closed:
        raise _ClientGone


async def _run(
    app: DataPlane,
    conn: ClientConnection,
    request: Request,
    tool_loop: ToolLoop,
    sse: _Sse | None,
) -> None:
    """Model calls and tool calls until the loop is finished."""
    headers = _sub_headers(request)
    timeout = app.request_timeout or 3600.0
    mcp = manager(app)
    if sse is not None:
        tool_loop.opening()
        sse.write(tool_loop.events())
    while True:
        _check_client(conn)
        sub = orjson.dumps(tool_loop.request())
        answer = await loopback.request(
            app, b"POST", responses.ROUTE.encode(), headers, sub, timeout
        )
        try:
            if answer.status != 200:
                raise _Failed(answer.status, await answer.body())
            if sse is not None:
                async for chunk in answer.chunks():
                    tool_loop.feed(chunk)
                    sse.write(tool_loop.events())
                tool_loop.stream_end()
            else:
                try:
                    parsed = orjson.loads(await answer.body())
                except orjson.JSONDecodeError:
                    raise LoopError(
                        502, "bad_upstream_response", "the model's answer is not JSON"
                    ) from None
                tool_loop.take(parsed)
        finally:
            answer.close()
        for call in tool_loop.calls():
            _check_client(conn)
            try:
                arguments = orjson.loads(call.arguments or "{}")
            except orjson.JSONDecodeError as exc:
                tool_loop.result(call, "", f"Invalid tool arguments: {exc}")
            else:
                result = await mcp.call_tool(
                    call.server_label, call.tool, arguments if isinstance(arguments, dict) else {}
                )
                tool_loop.result(call, result.output, result.error)
        if sse is not None:
            sse.write(tool_loop.events())
        if tool_loop.finished:
            return
