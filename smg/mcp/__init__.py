"""MCP (Model Context Protocol) client side: the `--mcp-config-path` file (config.py, pure) and the
per-process client (manager.py). Importing this package does not import the MCP SDK: a gateway without
`--mcp-config-path` never loads it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.mcp.manager import McpManager

# The managers made in this process (normally one), closed when the data plane drains.
_MANAGERS: list[McpManager] = []
_PROCESS: McpManager | None = None


def register_manager(manager: McpManager) -> None:
    _MANAGERS.append(manager)


def process_manager(cfg: GatewayConfig) -> McpManager | None:
    """This data-plane process's MCP client, made on first use (inside the running loop, after the
    fork); None when no --mcp-config-path is set. The file was checked by `smg launch`; one that has
    become unreadable since raises McpConfigError (a ValueError)."""
    global _PROCESS
    if _PROCESS is None and cfg.mcp_config_path:
        from smg.mcp.config import load_config
        from smg.mcp.manager import McpManager

        _PROCESS = McpManager(load_config(cfg.mcp_config_path), cfg.mcp_tool_timeout_secs)
    return _PROCESS


async def close_managers(timeout: float = 10.0) -> None:
    """Stop every MCP session of this process (stdio servers' processes end), bounded."""
    global _PROCESS
    managers = list(_MANAGERS)
    _MANAGERS.clear()
    _PROCESS = None
    if managers:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(m.close() for m in managers), return_exceptions=True), timeout
            )
