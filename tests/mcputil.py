"""Starting tests/mcpserver.py (the real MCP test server) for the MCP tests: its stdio
config, and the server over streamable HTTP or SSE on a free loopback port."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpcmockutil import GrpcMock, served_gateway

from smg.mcp.config import McpServerConfig
from tests.gatewayutil import Gateway, free_port
from tests.mockutil import stop_process

SERVER = str(Path(__file__).with_name("mcpserver.py"))

# The MCP tool loop on a gRPC model: the gRPC mock as Qwen3 answering every request with a
# call of tests/mcpserver.py's `add`, served as the MCP server "calc".
QWEN3 = "Qwen/Qwen3-8B"
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
CALC_TOOLS: list[Any] = [{"type": "mcp", "server_label": "calc", "require_approval": "never"}]


def stdio_server(name: str = "tools") -> McpServerConfig:
    return McpServerConfig(
        name=name, protocol="stdio", command=sys.executable, args=(SERVER, "stdio")
    )


def stdio_config_file(path: Path, name: str = "calc") -> Path:
    """An --mcp-config-path file at `path` naming tests/mcpserver.py over stdio as `name`."""
    path.write_text(
        f"servers:\n  - name: {name}\n    protocol: stdio\n"
        f"    command: {sys.executable}\n    args: [{SERVER}, stdio]\n"
    )
    return path


@contextlib.contextmanager
def grpc_calc_gateway(
    root: Path, *gateway_args: str, processes: int = 2
) -> Iterator[tuple[Gateway, GrpcMock]]:
    """`smg launch` (`--tool-call-parser qwen`, MCP server "calc" over stdio, 20 s tool
    timeout, `gateway_args`) in front of the gRPC mock as QWEN3 (its chat template)
    answering ADD_CALL; both stopped on exit."""
    config = stdio_config_file(root / "mcp.yaml", "calc")
    with served_gateway(
        root,
        model=QWEN3,
        template="Qwen-Qwen3-0.6B.jinja",
        reply=ADD_CALL,
        gateway_args=[
            "--tool-call-parser", "qwen", *gateway_args,
            "--mcp-config-path", str(config), "--mcp-tool-timeout-secs", "20",
        ],
        processes=processes,
    ) as served:  # fmt: skip
        yield served


@contextlib.contextmanager
def http_server(
    port: int | None = None, *extra: str, kind: str = "http"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """tests/mcpserver.py over streamable HTTP (or SSE) on a free loopback port; stopped on exit.
    A port taken between free_port() and the bind is retried on another (at most 3 tries)."""
    for _attempt in range(1 if port else 3):
        chosen = port or free_port()
        proc = subprocess.Popen(
            [sys.executable, SERVER, kind, "--port", str(chosen), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20.0)
            line = proc.stdout.readline().decode() if ready else ""
            if line.startswith("MCP_READY "):
                yield line.split()[1], proc
                return
        finally:
            stop_process(proc, 10)
    raise AssertionError(f"mcpserver {kind} did not start")
