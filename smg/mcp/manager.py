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
import hashlib
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
# Bound on connecting to a server (starting a stdio server included), whatever the call timeout: a
# connection still being made when a call's bound passes is kept for the next call.
CONNECT_TIMEOUT_SECS = 30.0
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

    def __init__(self, key: str, server: McpServerConfig) -> None:
        self.key = key  # the manager's name for it (a request server's includes a digest)
        self.label = server.name  # what logs and messages say
        self.server = server
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # A failed connect whose callers all gave up: retrieved, so asyncio does not log it.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.broken = False
        self.tools: list[McpTool] | None = None
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"mcp-session-{self.label}")

    async def _run(self) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECS):
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
            # The SDK passes the server only a safe part of this process's environment (HOME,
            # LOGNAME, PATH, SHELL, TERM, USER) plus `envs`: the gateway's credentials (SMG_*) stay
            # out of a tool's process. 1.13 passes its whole environment (docs/flags.md).
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

    def usable(self) -> bool:
        """False once the session failed or its connection ended (a stdio server that exited while
        idle): the caller connects again before sending, so a request is not failed for a server
        that merely needs restarting. The SDK has no public "closed" flag; without the private one
        the first call after such an end fails instead, and the next reconnects."""
        if self.broken:
            return False
        if self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None:
            dispatcher = getattr(self.ready.result(), "_dispatcher", None)
            if getattr(dispatcher, "_closed", False) is True:
                self.broken = True
                return False
        return True

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
        # Request servers by key (label, URL and headers): two requests that give one label
        # different URLs or credentials never share a session.
        self._request: OrderedDict[str, McpServerConfig] = OrderedDict()
        self._latest: dict[str, str] = {}  # a request server's label -> its latest key
        self._sessions: dict[str, _Session] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._closed = False
        from smg import mcp

        mcp.register_manager(self)

    def labels(self) -> list[str]:
        """The configured servers' labels, then the request servers' (most recent last)."""
        return [*self._configured, *self._latest]

    def _resolve(self, name: str) -> tuple[str, McpServerConfig] | None:
        """(session key, server) for a configured label, a request server's key, or a request
        server's label (its latest key)."""
        server = self._configured.get(name) or self._request.get(name)
        if server is not None:
            return name, server
        key = self._latest.get(name)
        if key is not None and key in self._request:
            return key, self._request[key]
        return None

    async def add_request_server(self, label: str, url: str, headers: dict[str, str]) -> str:
        """Add the streamable HTTP server at `url` that a request names (`server_url`) under
        `label`, and return its key: pass the key, not the label, to list_tools and call_tool for
        that request, so that concurrent requests giving one label different URLs or credentials
        each reach their own (the tools still carry `label`). Requests giving the same label, URL
        and headers share one session. The label alone names the latest added. A configured
        server's label cannot be taken. Connects on first use; at most MAX_REQUEST_SERVERS are
        kept, the least recently added going first."""
        if self._closed:
            raise McpError("the MCP client is closed (the process is draining)")
        if label in self._configured:
            raise McpError(
                f"server_label {label!r} names a configured MCP server; use another label"
            )
        reason = url_problem(url)
        if reason:
            raise McpError(f"server_url {reason}")
        key = request_key(label, url, headers)
        if key not in self._request:
            self._request[key] = McpServerConfig(
                name=label, protocol="streamable", url=url, headers=dict(headers)
            )
        self._request.move_to_end(key)
        self._latest.pop(label, None)
        self._latest[label] = key
        while len(self._request) > MAX_REQUEST_SERVERS:
            oldest, server = self._request.popitem(last=False)
            if self._latest.get(server.name) == oldest:
                del self._latest[server.name]
            await self._drop(oldest)
        return key

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
                tools.extend(_tool(session.server.name, tool) for tool in page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
        except TimeoutError:
            raise McpError(
                f"MCP server {session.label!r} did not list its tools within {self.timeout:g} s"
            ) from None
        except Exception as exc:
            await self._drop(session.key, session)
            raise McpError(
                f"MCP server {session.label!r}: listing tools failed: {_reason(exc)}"
            ) from None
        session.tools = tools
        return tools

    async def call_tool(
        self, server_label: str, name: str, arguments: dict[str, Any]
    ) -> ToolResult:
        """Call one tool; never raises for the tool's or the server's failure: ToolResult.error says
        what went wrong. Bounded by the call timeout, connecting included."""
        if not isinstance(arguments, dict):
            # A model's arguments that are not a JSON object: the tool is not called.
            return ToolResult(output="", error=f"tool {name!r}: arguments must be a JSON object")
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            session = await self._session(server_label, deadline)
            client = await session.session(max(0.0, deadline - time.monotonic()))
        except McpError as exc:
            return ToolResult(output="", error=str(exc))
        except TimeoutError:  # connected, not yet initialised
            return ToolResult(output="", error=self._timed_out(session.label, name))
        remaining = max(0.001, deadline - time.monotonic())
        try:
            # The SDK's own bound cancels the request at the server (notifications/cancelled);
            # wait_for is the backstop should the SDK's bound not fire.
            result = await asyncio.wait_for(
                client.call_tool(name, arguments, read_timeout_seconds=remaining), remaining + 1.0
            )
        except TimeoutError:
            return ToolResult(output="", error=self._timed_out(session.label, name))
        except Exception as exc:
            return await self._call_failed(name, session, exc)
        content = [block.model_dump(mode="json", exclude_none=True) for block in result.content]
        text = flatten_output(content)
        if result.is_error:
            return ToolResult(output="", error=text or f"tool {name!r} failed")
        return ToolResult(output=text, error=None)

    def _timed_out(self, label: str, name: str) -> str:
        return f"tool {name!r} on MCP server {label!r} timed out after {self.timeout:g} s"

    async def _call_failed(self, name: str, session: _Session, exc: Exception) -> ToolResult:
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        label = session.label

        if isinstance(exc, MCPError) and exc.code == REQUEST_TIMEOUT:
            return ToolResult(output="", error=self._timed_out(label, name))
        if isinstance(exc, MCPError) and exc.code != CONNECTION_CLOSED and not session.broken:
            # The server answered with a JSON-RPC error (an unknown tool, bad arguments): the
            # session is fine.
            return ToolResult(
                output="", error=f"tool {name!r} on MCP server {label!r}: {exc.error.message}"
            )
        await self._drop(session.key, session)
        return ToolResult(
            output="",
            error=f"MCP server {label!r} failed during tool {name!r}: {_reason(exc)}",
        )

    async def _session(self, name: str, deadline: float) -> _Session:
        """The server's live session, connecting (once, however many callers wait) when there is none."""
        if self._closed:
            raise McpError("the MCP client is closed (the process is draining)")
        resolved = self._resolve(name)
        if resolved is None:
            raise McpError(f"unknown MCP server {name!r}")
        key, server = resolved
        label = server.name
        session = self._sessions.get(key)
        if session is not None and session.server is server and session.usable():
            return session
        lock = self._connecting.setdefault(key, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise McpError(
                f"MCP server {label!r}: not connected within {self.timeout:g} s"
            ) from None
        try:
            session = self._sessions.get(key)
            if session is None or session.server is not server or not session.usable():
                if session is not None:
                    await self._drop(key, session)
                session = _Session(key, server)
                self._sessions[key] = session
            try:
                await session.session(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # The session goes on connecting (bounded by CONNECT_TIMEOUT_SECS) for the next
                # caller: a slow-starting stdio server is not started over and over.
                raise McpError(
                    f"MCP server {label!r}: not connected within {self.timeout:g} s"
                ) from None
            except McpError as exc:
                await self._drop(key, session)
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


def request_key(label: str, url: str, headers: dict[str, str]) -> str:
    """A request server's key: its label and a digest of its URL and headers (credentials are
    hashed, never kept in the key)."""
    material = json.dumps([url, sorted(headers.items())], separators=(",", ":"))
    return f"{label}#{hashlib.sha256(material.encode()).hexdigest()[:16]}"


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
