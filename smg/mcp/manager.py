"""The MCP client of one data-plane process: sessions to the configured servers and to servers a request
names (`{"type": "mcp", "server_url": ...}`), tools listed and cached, tool calls bounded in time.

Nothing happens at construction: a server is connected (a stdio server's process started) on its first
use, inside the running event loop, so a forked data plane never inherits a session. Each session is
owned by one task (the SDK's transports are anyio context managers that must be entered and left by the
same task); callers share it, several calls at once. A session that fails (the server exited, the
connection broke) is dropped and the next use connects again, with a fresh tool list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from smg.mcp.config import McpConfig, McpServerConfig, url_problem

log = logging.getLogger("smg.mcp")

# Request servers (a request's server_url) kept connected at once per process; the least recently used
# goes first. 1.13's pool holds 100 (McpPoolConfig.max_connections) across tenants.
MAX_REQUEST_SERVERS = 64
# Pages of tools/list followed for one server (a server that pages forever is cut off).
MAX_TOOL_PAGES = 100
# Bound on stopping one session (the SDK terminates a stdio server: stdin closed, then SIGTERM/SIGKILL).
CLOSE_TIMEOUT_SECS = 5.0


@dataclass(frozen=True)
class McpTool:
    server_label: str
    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None


@dataclass(frozen=True)
class ToolResult:
    output: str  # the tool's text (1.13's flattening); "" when error is set
    error: str | None  # set: the tool failed, timed out, or its server is unknown or down


class McpError(Exception):
    """A server is unknown or cannot be reached (listing tools, adding a request server)."""


def flatten_output(content: list[dict[str, Any]]) -> str:
    """A tool result's content as one string, as 1.13 writes an mcp_call's `output`: the text parts
    joined with newlines, or the content as compact JSON when it has no text part."""
    texts = [
        item["text"]
        for item in content
        if item.get("type") == "text" and isinstance(item.get("text"), str)
    ]
    if texts:
        return "\n".join(texts)
    return json.dumps(content, separators=(",", ":"), ensure_ascii=False)


def _reason(exc: BaseException) -> str:
    """The innermost useful message of an exception (the SDK's task groups wrap them in groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Session:
    """One connection to one server, run by its own task; `session` is usable once `ready` resolved."""

    def __init__(self, label: str, server: McpServerConfig) -> None:
        self.label = label
        self.server = server
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.broken = False
        self.tools: list[McpTool] | None = None
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"mcp-session-{label}")

    async def _run(self) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(
                    ClientSession(read, write, message_handler=self._on_message)
                )
                await session.initialize()
                if not self.ready.done():
                    self.ready.set_result(session)
                await self._stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(McpError(_reason(exc)))
            elif not self._stop.is_set():
                log.warning("MCP server %r: session ended: %s", self.label, _reason(exc))
        finally:
            self.broken = True
            if not self.ready.done():
                self.ready.set_exception(McpError("session closed"))

    def _transport(self) -> contextlib.AbstractAsyncContextManager[Any]:
        server = self.server
        if server.protocol == "stdio":
            from mcp.client.stdio import StdioServerParameters, stdio_client

            assert server.command is not None
            params = StdioServerParameters(
                command=server.command, args=list(server.args), env=dict(server.envs) or None
            )
            return stdio_client(params)
        assert server.url is not None
        if server.protocol == "sse":
            from mcp.client.sse import sse_client

            return sse_client(server.url, headers=server.http_headers())
        return _streamable(server.url, server.http_headers())

    async def _on_message(self, message: Any) -> None:
        # The SDK hands transport failures (a POST that could not connect, a broken stream) here.
        if isinstance(message, Exception):
            log.warning("MCP server %r: transport error: %s", self.label, _reason(message))
            self.broken = True

    async def session(self, timeout: float) -> Any:
        return await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    async def close(self) -> None:
        self.broken = True
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT_SECS)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, CLOSE_TIMEOUT_SECS)
        except Exception:
            pass
        if self.ready.done() and not self.ready.cancelled():
            self.ready.exception()  # retrieved: no "exception never retrieved" noise


@contextlib.asynccontextmanager
async def _streamable(url: str, headers: dict[str, str]) -> Any:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    # The SDK's own defaults (30 s connect/write, 300 s read for held streams); calls are bounded
    # by the manager's timeout, not by these.
    client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
    async with client, streamable_http_client(url, http_client=client) as streams:
        yield streams


class McpManager:
    """One per data-plane process, made after the fork; every method runs in that process's loop."""

    def __init__(self, config: McpConfig, call_timeout_secs: float) -> None:
        self.config = config
        self.timeout = float(call_timeout_secs)
        self._configured: dict[str, McpServerConfig] = {s.name: s for s in config.servers}
        self._request: OrderedDict[str, McpServerConfig] = OrderedDict()
        self._sessions: dict[str, _Session] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._closed = False
        from smg import mcp

        mcp.register_manager(self)

    def labels(self) -> list[str]:
        """The configured servers' labels, then the request servers' (most recent last)."""
        return [*self._configured, *(k for k in self._request if k not in self._configured)]

    def _server(self, label: str) -> McpServerConfig | None:
        return self._configured.get(label) or self._request.get(label)

    async def add_request_server(self, label: str, url: str, headers: dict[str, str]) -> None:
        """Make `label` name the streamable HTTP server at `url` (a request's server_url) in this
        process. A configured server's label cannot be taken; the same label with another URL or
        headers replaces the earlier one (its session is closed). Connects on first use."""
        if self._closed:
            raise McpError("the MCP client is closed (the process is draining)")
        if label in self._configured:
            raise McpError(
                f"server_label {label!r} names a configured MCP server; use another label"
            )
        reason = url_problem(url)
        if reason:
            raise McpError(f"server_url {reason}")
        server = McpServerConfig(name=label, protocol="streamable", url=url, headers=dict(headers))
        known = self._request.get(label)
        if known is not None and known.url == url and dict(known.headers) == dict(headers):
            self._request.move_to_end(label)
            return
        self._request[label] = server
        self._request.move_to_end(label)
        await self._drop(label)
        while len(self._request) > MAX_REQUEST_SERVERS:
            oldest, _ = self._request.popitem(last=False)
            await self._drop(oldest)

    async def list_tools(self, server_label: str) -> list[McpTool]:
        """The server's tools (cached for the life of its session); McpError when it is unknown or
        cannot be reached or listed within the call timeout."""
        deadline = time.monotonic() + self.timeout
        session = await self._session(server_label, deadline)
        if session.tools is not None:
            return session.tools
        client = await session.session(max(0.0, deadline - time.monotonic()))
        tools: list[McpTool] = []
        cursor: str | None = None
        try:
            for _ in range(MAX_TOOL_PAGES):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                params = None
                if cursor is not None:
                    from mcp.types import PaginatedRequestParams

                    params = PaginatedRequestParams(cursor=cursor)
                page = await asyncio.wait_for(client.list_tools(params=params), remaining)
                tools.extend(_tool(server_label, tool) for tool in page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
        except TimeoutError:
            raise McpError(
                f"MCP server {server_label!r} did not list its tools within {self.timeout:g} s"
            ) from None
        except Exception as exc:
            await self._drop(server_label, session)
            raise McpError(
                f"MCP server {server_label!r}: listing tools failed: {_reason(exc)}"
            ) from None
        session.tools = tools
        return tools

    async def call_tool(
        self, server_label: str, name: str, arguments: dict[str, Any]
    ) -> ToolResult:
        """Call one tool; never raises for the tool's or the server's failure: ToolResult.error says
        what went wrong. Bounded by the call timeout, connecting included."""
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            session = await self._session(server_label, deadline)
            client = await session.session(max(0.0, deadline - time.monotonic()))
        except McpError as exc:
            return ToolResult(output="", error=str(exc))
        except TimeoutError:
            return ToolResult(output="", error=self._timed_out(server_label, name))
        remaining = max(0.001, deadline - time.monotonic())
        try:
            # The SDK's own bound cancels the request at the server (notifications/cancelled);
            # wait_for is the backstop should the SDK's bound not fire.
            result = await asyncio.wait_for(
                client.call_tool(name, arguments, read_timeout_seconds=remaining), remaining + 1.0
            )
        except TimeoutError:
            return ToolResult(output="", error=self._timed_out(server_label, name))
        except Exception as exc:
            return await self._call_failed(server_label, name, session, exc)
        content = [block.model_dump(mode="json", exclude_none=True) for block in result.content]
        text = flatten_output(content)
        if result.is_error:
            return ToolResult(output="", error=text or f"tool {name!r} failed")
        return ToolResult(output=text, error=None)

    def _timed_out(self, label: str, name: str) -> str:
        return f"tool {name!r} on MCP server {label!r} timed out after {self.timeout:g} s"

    async def _call_failed(
        self, label: str, name: str, session: _Session, exc: Exception
    ) -> ToolResult:
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        if isinstance(exc, MCPError) and exc.code == REQUEST_TIMEOUT:
            return ToolResult(output="", error=self._timed_out(label, name))
        if isinstance(exc, MCPError) and exc.code != CONNECTION_CLOSED and not session.broken:
            # The server answered with a JSON-RPC error (an unknown tool, bad arguments): the
            # session is fine.
            return ToolResult(
                output="", error=f"tool {name!r} on MCP server {label!r}: {exc.error.message}"
            )
        await self._drop(label, session)
        return ToolResult(
            output="",
            error=f"MCP server {label!r} failed during tool {name!r}: {_reason(exc)}",
        )

    async def _session(self, label: str, deadline: float) -> _Session:
        """The label's live session, connecting (once, however many callers wait) when there is none."""
        if self._closed:
            raise McpError("the MCP client is closed (the process is draining)")
        server = self._server(label)
        if server is None:
            raise McpError(f"unknown MCP server {label!r}")
        session = self._sessions.get(label)
        if session is not None and not session.broken and session.server is server:
            return session
        lock = self._connecting.setdefault(label, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise McpError(
                f"MCP server {label!r}: not connected within {self.timeout:g} s"
            ) from None
        try:
            session = self._sessions.get(label)
            if session is None or session.broken or session.server is not server:
                if session is not None:
                    await self._drop(label, session)
                session = _Session(label, server)
                self._sessions[label] = session
            try:
                await session.session(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await self._drop(label, session)
                raise McpError(
                    f"MCP server {label!r}: not connected within {self.timeout:g} s"
                ) from None
            except McpError as exc:
                await self._drop(label, session)
                raise McpError(f"MCP server {label!r} is unreachable: {exc}") from None
            return session
        finally:
            lock.release()

    async def _drop(self, label: str, session: _Session | None = None) -> None:
        current = self._sessions.get(label)
        if session is None:
            session = current
        if session is None:
            return
        if current is session:
            del self._sessions[label]
        await session.close()

    async def close(self) -> None:
        """Stop every session (a stdio server's process ends with it). Later uses raise McpError."""
        self._closed = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


def _tool(label: str, tool: Any) -> McpTool:
    annotations = (
        tool.annotations.model_dump(mode="json", exclude_none=True) if tool.annotations else None
    )
    return McpTool(
        server_label=label,
        name=tool.name,
        description=tool.description or "",
        input_schema=dict(tool.input_schema or {}),
        annotations=annotations,
    )
