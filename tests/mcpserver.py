"""A real MCP server for the tests, built with the SDK's `mcp.server.mcpserver`.

Tools: `add(a, b)` returns the sum, `fail()` raises (the client sees an error result with the message
"deliberate failure"), `sleep(seconds)` sleeps that long then returns "slept", `pid()` returns the
server's process id (to tell a reconnected server from the first).

    python tests/mcpserver.py stdio
    python tests/mcpserver.py http --port P      # streamable HTTP at http://127.0.0.1:P/mcp

Over HTTP it prints `MCP_READY http://127.0.0.1:P/mcp` on stdout once it accepts connections, and
`--require-header NAME:VALUE` makes every request without that header answer 401 (to prove headers/token
reach the server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

FAIL_MESSAGE = "deliberate failure"

# WARNING: the SDK logs every failed call at INFO, which would fill the tests' stderr.
server: MCPServer = MCPServer("smg-test-mcp", log_level="WARNING")


@server.tool()
def add(a: float, b: float) -> float | int:
    """Add two numbers."""
    total = a + b
    return int(total) if float(total).is_integer() else total  # "5", not "5.0", for 2 + 3


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError(FAIL_MESSAGE)  # a ToolError's message reaches the client (others are masked)


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep for `seconds`, then answer "slept"."""
    await asyncio.sleep(seconds)
    return "slept"


@server.tool()
def pid() -> int:
    """The server process's id."""
    return os.getpid()


async def _serve_http(port: int, required: tuple[str, str] | None) -> None:
    import uvicorn

    app = server.streamable_http_app(host="127.0.0.1")
    if required is not None:
        app = _RequireHeader(app, required[0].lower().encode(), required[1].encode())
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)

    async def announce() -> None:
        # Bounded: uvicorn is up in well under a second on loopback.
        for _ in range(500):
            if uv.started:
                print(f"MCP_READY http://127.0.0.1:{port}/mcp", flush=True)
                return
            await asyncio.sleep(0.01)

    await asyncio.gather(uv.serve(), announce())


class _RequireHeader:
    """ASGI wrapper: 401 for a request without the header (the lifespan scope passes)."""

    def __init__(self, app: object, name: bytes, value: bytes) -> None:
        self.app = app
        self.name = name
        self.value = value

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http" and (self.name, self.value) not in scope["headers"]:
            await send({"type": "http.response.start", "status": 401, "headers": []})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": b"missing header"})  # type: ignore[operator]
            return
        await self.app(scope, receive, send)  # type: ignore[operator]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--require-header", default=None, help="NAME:VALUE every HTTP request must carry"
    )
    args = parser.parse_args(argv)
    if args.transport == "stdio":
        server.run("stdio")
        return
    if args.port <= 0:
        parser.error("http needs --port P (a free port)")
    required = None
    if args.require_header:
        name, _, value = args.require_header.partition(":")
        required = (name.strip(), value.strip())
    try:
        asyncio.run(_serve_http(args.port, required))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
