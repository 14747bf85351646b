"""Starting tests/mcpserver.py (the real MCP test server) for the MCP tests: its stdio
config, and the server over streamable HTTP or SSE on a free loopback port."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from smg.mcp.config import McpServerConfig
from tests.gatewayutil import free_port

SERVER = str(Path(__file__).with_name("mcpserver.py"))


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
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    raise AssertionError(f"mcpserver {kind} did not start")
