"""smg.mcp.manager against the real MCP server of tests/mcpserver.py, over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from smg.mcp.config import McpConfig, McpServerConfig
from smg.mcp.manager import McpError, McpManager, ToolResult, flatten_output, request_key
from tests.gatewayutil import free_port
from tests.mcputil import SERVER, http_server, stdio_server

TOOLS = ["add", "fail", "sleep", "env", "pid"]

pytestmark = pytest.mark.timeout(60)


def run(body: Callable[[], Awaitable[Any]], limit: float = 45.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(body(), limit)

    return asyncio.run(bounded())


def manager(*servers: McpServerConfig, timeout: float = 10.0) -> McpManager:
    return McpManager(McpConfig(servers=servers), timeout)


def http_config(url: str, name: str = "tools", **kw: Any) -> McpServerConfig:
    return McpServerConfig(name=name, protocol="streamable", url=url, **kw)


@contextlib.contextmanager
def transport(kind: str) -> Iterator[McpServerConfig]:
    if kind == "stdio":
        yield stdio_server()
    elif kind == "sse":
        with http_server(kind="sse") as (url, _proc):
            yield McpServerConfig(name="tools", protocol="sse", url=url)
    else:
        with http_server() as (url, _proc):
            yield http_config(url)


def mcp_children() -> list[psutil.Process]:
    """This test process's live tests/mcpserver.py children (stdio servers the manager started)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = child.cmdline()
            if cmdline[-2:] == [SERVER, "stdio"] and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
    return out


# ---------------------------------------------------------------------------------------------


def test_flatten_output_matches_1_13() -> None:
    # Text parts joined with newlines; no text part: the content as compact JSON (1.13's transformer).
    assert flatten_output([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    image = [{"type": "image", "data": "AA==", "mimeType": "image/png"}]
    assert flatten_output(image) == '[{"type":"image","data":"AA==","mimeType":"image/png"}]'
    assert flatten_output([]) == "[]"


@pytest.mark.parametrize("kind", ["stdio", "http", "sse"])
def test_lists_tools_and_calls_them(kind: str) -> None:
    with transport(kind) as server:

        async def body() -> None:
            mgr = manager(server)
            try:
                assert mgr.labels() == ["tools"]
                tools = await mgr.list_tools("tools")
                assert [t.name for t in tools] == TOOLS
                add = tools[0]
                assert add.server_label == "tools"
                assert add.description == "Add two numbers."
                assert add.input_schema["required"] == ["a", "b"]
                assert sorted(add.input_schema["properties"]) == ["a", "b"]
                assert await mgr.list_tools("tools") is tools  # cached for the session
                first_pid = (await mgr.call_tool("tools", "pid", {})).output
                assert await mgr.call_tool("tools", "add", {"a": 2, "b": 3}) == ToolResult(
                    "5", None
                )
                assert await mgr.call_tool("tools", "add", {"a": 0.5, "b": 1}) == ToolResult(
                    "1.5", None
                )
                failed = await mgr.call_tool("tools", "fail", {})
                assert failed == ToolResult("", "Error executing tool fail: deliberate failure")
                unknown = await mgr.call_tool("tools", "nope", {})
                assert unknown == ToolResult("", "Unknown tool: nope")
                not_object = await mgr.call_tool("tools", "add", [1, 2])  # type: ignore[arg-type]
                assert not_object == ToolResult("", "tool 'add': arguments must be a JSON object")
                bad_args = await mgr.call_tool("tools", "add", {"a": "x"})
                assert bad_args.output == "" and bad_args.error and "add" in bad_args.error
                # The failures left the session usable (the same server process answers).
                assert (await mgr.call_tool("tools", "pid", {})).output == first_pid
                assert await mgr.call_tool("tools", "add", {"a": 1, "b": 1}) == ToolResult(
                    "2", None
                )
            finally:
                await mgr.close()

        run(body)


@pytest.mark.parametrize("kind", ["stdio", "http"])
def test_call_timeout_is_bounded_and_session_stays(kind: str) -> None:
    with transport(kind) as server:

        async def body() -> None:
            mgr = manager(server)
            try:
                before = await mgr.call_tool("tools", "pid", {})
                assert before.error is None
                mgr.timeout = 1.0  # once connected: a stdio server's start may take over 1 s here
                started = time.monotonic()
                result = await mgr.call_tool("tools", "sleep", {"seconds": 30})
                took = time.monotonic() - started
                assert result == ToolResult(
                    "", "tool 'sleep' on MCP server 'tools' timed out after 1 s"
                )
                assert 0.9 <= took < 3.0, took
                # Same session (the same server process answers), still working.
                assert await mgr.call_tool("tools", "pid", {}) == before
                assert await mgr.call_tool("tools", "add", {"a": 1, "b": 2}) == ToolResult(
                    "3", None
                )
            finally:
                await mgr.close()

        run(body)


@pytest.mark.parametrize("kind", ["stdio", "http"])
def test_concurrent_calls_share_one_session(kind: str) -> None:
    with transport(kind) as server:

        async def body() -> None:
            mgr = manager(server)
            try:
                # Every caller races to connect: one session is made, every call lands on it.
                pids = await asyncio.gather(*(mgr.call_tool("tools", "pid", {}) for _ in range(6)))
                assert len({p.output for p in pids}) == 1 and pids[0].error is None
                started = time.monotonic()
                sums, sleeps = await asyncio.gather(
                    asyncio.gather(
                        *(mgr.call_tool("tools", "add", {"a": i, "b": 1}) for i in range(8))
                    ),
                    asyncio.gather(
                        *(mgr.call_tool("tools", "sleep", {"seconds": 1}) for _ in range(4))
                    ),
                )
                took = time.monotonic() - started
                assert [r.output for r in sums] == [str(i + 1) for i in range(8)]
                assert [r.output for r in sleeps] == ["slept"] * 4
                assert took < 3.5, f"four 1 s sleeps took {took:.2f} s: not concurrent"
            finally:
                await mgr.close()

        run(body)


def test_stdio_is_lazy_and_closed() -> None:
    async def body() -> None:
        mgr = manager(stdio_server())
        try:
            assert mcp_children() == []  # nothing started by construction
            await mgr.list_tools("tools")
            assert len(mcp_children()) == 1
            await mgr.call_tool("tools", "add", {"a": 1, "b": 1})
            assert len(mcp_children()) == 1  # one process per server, reused
        finally:
            await mgr.close()
        deadline = time.monotonic() + 10
        while mcp_children() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert mcp_children() == []
        with pytest.raises(McpError, match="closed"):
            await mgr.list_tools("tools")
        assert (await mgr.call_tool("tools", "add", {"a": 1, "b": 1})).error is not None

    run(body)


def test_stdio_server_that_exits_is_restarted() -> None:
    async def body() -> None:
        mgr = manager(stdio_server())
        try:
            first = int((await mgr.call_tool("tools", "pid", {})).output)
            tools = await mgr.list_tools("tools")
            os.kill(first, signal.SIGKILL)
            await asyncio.sleep(0.3)
            # Died while idle: the next call starts a new server and is answered by it.
            second = await mgr.call_tool("tools", "pid", {})
            assert second.error is None and int(second.output) != first
            relisted = await mgr.list_tools("tools")
            assert relisted is not tools and [t.name for t in relisted] == TOOLS

            # Died during a call: that call fails at once, the next reconnects.
            async def kill_soon() -> None:
                await asyncio.sleep(0.5)
                os.kill(int(second.output), signal.SIGKILL)

            started = time.monotonic()
            failed, _ = await asyncio.gather(
                mgr.call_tool("tools", "sleep", {"seconds": 20}), kill_soon()
            )
            assert time.monotonic() - started < 5
            assert failed.output == "" and failed.error is not None
            assert failed.error.startswith("MCP server 'tools' failed during tool 'sleep'")
            third = await mgr.call_tool("tools", "pid", {})
            assert third.error is None and int(third.output) not in (first, int(second.output))
        finally:
            await mgr.close()

    run(body)


def test_http_server_down_then_back() -> None:
    port = free_port()

    async def body() -> None:
        mgr = manager(http_config(f"http://127.0.0.1:{port}/mcp"), timeout=5.0)
        try:
            # Nothing listening: listing says so (McpError), a call says so (ToolResult.error).
            with pytest.raises(McpError, match="'tools' is unreachable"):
                await mgr.list_tools("tools")
            down = await mgr.call_tool("tools", "add", {"a": 1, "b": 1})
            assert down.output == "" and down.error is not None
            assert down.error.startswith("MCP server 'tools' is unreachable")
            with http_server(port) as (_url, proc):
                assert await mgr.call_tool("tools", "pid", {}) == ToolResult(str(proc.pid), None)

                async def kill_soon() -> None:
                    await asyncio.sleep(0.5)
                    proc.kill()

                failed, _ = await asyncio.gather(
                    mgr.call_tool("tools", "sleep", {"seconds": 20}), kill_soon()
                )
                assert failed.error is not None and "failed during tool 'sleep'" in failed.error
                proc.wait(10)
                gone = await mgr.call_tool("tools", "pid", {})
                assert gone.error is not None and "unreachable" in gone.error
            with http_server(port) as (_url, proc):
                back = await mgr.call_tool("tools", "pid", {})
                assert back == ToolResult(str(proc.pid), None)
        finally:
            await mgr.close()

    run(body)


def test_unknown_server() -> None:
    async def body() -> None:
        mgr = manager(stdio_server())
        try:
            with pytest.raises(McpError, match="unknown MCP server 'other'"):
                await mgr.list_tools("other")
            assert await mgr.call_tool("other", "add", {}) == ToolResult(
                "", "unknown MCP server 'other'"
            )
            assert mcp_children() == []
        finally:
            await mgr.close()

    run(body)


def test_stdio_command_that_cannot_start() -> None:
    async def body() -> None:
        broken = McpServerConfig(name="gone", protocol="stdio", command="/nonexistent/mcp-server")
        mgr = manager(broken, timeout=5.0)
        try:
            started = time.monotonic()
            with pytest.raises(McpError, match="'gone' is unreachable"):
                await mgr.list_tools("gone")
            result = await mgr.call_tool("gone", "add", {})
            assert result.error is not None and result.error.startswith(
                "MCP server 'gone' is unreachable"
            )
            assert time.monotonic() - started < 5
        finally:
            await mgr.close()

    run(body)


def test_request_server_with_headers() -> None:
    with http_server(None, "--require-header", "X-Test:yes") as (url, proc):

        async def body() -> None:
            mgr = manager(stdio_server("configured"), timeout=5.0)
            try:
                good = await mgr.add_request_server("req", url, {"X-Test": "yes"})
                assert good == request_key("req", url, {"X-Test": "yes"})
                assert good.startswith("req#") and "yes" not in good
                assert mgr.labels() == ["configured", "req"]
                tools = await mgr.list_tools(good)
                assert [t.name for t in tools] == TOOLS
                assert {t.server_label for t in tools} == {"req"}  # the label, not the key
                assert await mgr.call_tool(good, "add", {"a": 4, "b": 5}) == ToolResult("9", None)
                # The label alone names the latest added.
                assert await mgr.call_tool("req", "pid", {}) == ToolResult(str(proc.pid), None)
                # Another request gives the same label without the header: its own server, which
                # the server refuses; the first request's key still reaches its own, with its
                # header, on the same session.
                bad = await mgr.add_request_server("req", url, {})
                assert bad != good
                with pytest.raises(McpError, match="'req' is unreachable"):
                    await mgr.list_tools(bad)
                with pytest.raises(McpError, match="'req' is unreachable"):
                    await mgr.list_tools("req")
                assert await mgr.list_tools(good) is tools
                assert await mgr.call_tool(good, "add", {"a": 1, "b": 5}) == ToolResult("6", None)
                # Adding the same label, URL and headers again gives the same key (one session).
                assert await mgr.add_request_server("req", url, {"X-Test": "yes"}) == good
                assert await mgr.list_tools("req") is tools
                with pytest.raises(McpError, match="names a configured MCP server"):
                    await mgr.add_request_server("configured", url, {})
                with pytest.raises(McpError, match="server_url must be an http"):
                    await mgr.add_request_server("x", "ftp://127.0.0.1/mcp", {})
                assert mcp_children() == []  # the configured stdio server was never used
            finally:
                await mgr.close()

        run(body)


def test_request_servers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from smg.mcp import manager as manager_module

    monkeypatch.setattr(manager_module, "MAX_REQUEST_SERVERS", 2)

    async def body() -> None:
        mgr = manager()
        try:
            keys = [
                await mgr.add_request_server(f"s{i}", f"http://127.0.0.1:1/mcp{i}", {})
                for i in range(3)
            ]
            assert mgr.labels() == ["s1", "s2"]  # the oldest went
            with pytest.raises(McpError, match="unknown MCP server 's0#"):
                await mgr.list_tools(keys[0])
            # Adding one again makes it the most recent: the other old one goes.
            assert await mgr.add_request_server("s1", "http://127.0.0.1:1/mcp1", {}) == keys[1]
            await mgr.add_request_server("s3", "http://127.0.0.1:1/mcp3", {})
            assert mgr.labels() == ["s1", "s3"]
        finally:
            await mgr.close()

    run(body)


def test_token_is_a_bearer_credential() -> None:
    with http_server(None, "--require-header", "Authorization:Bearer tok-1") as (url, _proc):

        async def body() -> None:
            good = http_config(url, name="good", token="tok-1")
            bad = http_config(url, name="bad", token="tok-2")
            mgr = manager(good, bad, timeout=5.0)
            try:
                assert await mgr.call_tool("good", "add", {"a": 1, "b": 2}) == ToolResult("3", None)
                with pytest.raises(McpError, match="'bad' is unreachable"):
                    await mgr.list_tools("bad")
            finally:
                await mgr.close()

        run(body)


def test_process_manager_under_uvloop_and_closed_on_drain(tmp_path: Path) -> None:
    """The data plane's path: smg.mcp.process_manager(cfg) made lazily inside a uvloop loop (the data
    planes run uvloop), and smg.mcp.close_managers() (called by the data plane's drain) stopping the
    stdio server it started."""
    import uvloop

    from smg import mcp
    from smg.config import load_config as load_gateway_config

    path = tmp_path / "mcp.yaml"
    path.write_text(
        "servers:\n"
        f"  - {{name: tools, protocol: stdio, command: {sys.executable!r}, args: [{SERVER!r}, stdio]}}\n"
    )
    cfg = load_gateway_config(["--mcp-config-path", str(path), "--mcp-tool-timeout-secs", "7"], {})
    assert mcp.process_manager(load_gateway_config([], {})) is None  # no file: no MCP client

    async def body() -> None:
        mgr = mcp.process_manager(cfg)
        assert mgr is not None and mcp.process_manager(cfg) is mgr and mgr.timeout == 7.0
        assert mcp_children() == []
        assert await mgr.call_tool("tools", "add", {"a": 1, "b": 2}) == ToolResult("3", None)
        assert len(mcp_children()) == 1
        await mcp.close_managers()
        deadline = time.monotonic() + 10
        while mcp_children() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert mcp_children() == []
        assert mcp.process_manager(cfg) is not mgr  # a later use starts afresh

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(body(), 45))
        runner.run(mcp.close_managers())


def test_stdio_server_ends_with_a_killed_client() -> None:
    """A data-plane process killed outright (no drain) leaves no stdio server behind: the server
    sees its stdin close and exits."""
    script = (
        "import asyncio, sys\n"
        "from smg.mcp.config import McpConfig, McpServerConfig\n"
        "from smg.mcp.manager import McpManager\n"
        "async def main():\n"
        f"    s = McpServerConfig(name='t', protocol='stdio', command=sys.executable, args=({SERVER!r}, 'stdio'))\n"
        "    m = McpManager(McpConfig(servers=(s,)), 20.0)\n"
        "    print((await m.call_tool('t', 'pid', {})).output, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert client.stdout is not None
        ready, _, _ = select.select([client.stdout], [], [], 30.0)
        line = client.stdout.readline().decode().strip() if ready else ""
        assert line.isdigit(), f"no pid from the client: {line!r}"
        server = psutil.Process(int(line))
        client.kill()
        client.wait(10)
        server.wait(10)  # raises psutil.TimeoutExpired if it outlives its client
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)


def test_stdio_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`envs` reach the server; the gateway's own environment (credentials) does not, past the SDK's
    safe variables."""
    monkeypatch.setenv("SMG_MCP_TEST_PARENT", "parent-secret")
    server = McpServerConfig(
        name="tools",
        protocol="stdio",
        command=sys.executable,
        args=(SERVER, "stdio"),
        envs={"SMG_MCP_TEST_ENV": "v1"},
    )

    async def body() -> None:
        mgr = manager(server)
        try:
            got = await mgr.call_tool("tools", "env", {"name": "SMG_MCP_TEST_ENV"})
            assert got == ToolResult("v1", None)
            hidden = await mgr.call_tool("tools", "env", {"name": "SMG_MCP_TEST_PARENT"})
            assert hidden == ToolResult("", None)
            path = await mgr.call_tool("tools", "env", {"name": "PATH"})
            assert path == ToolResult(os.environ["PATH"], None)
        finally:
            await mgr.close()

    run(body)
