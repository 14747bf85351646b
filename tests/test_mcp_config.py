"""smg.mcp.config (pure: the --mcp-config-path file in 1.13's format) and `smg launch`'s check of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smg.config import ConfigError
from smg.config import load_config as load_gateway_config
from smg.mcp.config import (
    McpConfig,
    McpConfigError,
    McpServerConfig,
    load_config,
    parse_config,
)
from tests.gatewayutil import free_port, run_launch, running_gateway

FULL = """
# 1.13's own example (crates/mcp/src/core/config.rs test_yaml_full_config), plus a streamable server
proxy:
  http: "http://global-proxy:8080"
  no_proxy: "localhost,127.0.0.1,*.internal"
pool:
  max_connections: 50
  idle_timeout: 600
inventory:
  enable_refresh: true
  tool_ttl: 600
policy:
  default: allow
  tools:
    "dangerous_server:delete_all": deny
warmup:
  - url: "http://localhost:3000/sse"
    label: "local-dev"
servers:
  - name: "required-server"
    protocol: sse
    url: "https://api.example.com/sse"
    token: "secret-token"
    required: true
  - name: "optional-server"
    protocol: stdio
    command: "mcp-server"
    args: ["--port", "3000"]
    envs: {MODE: fast}
    required: false
    proxy:
      http: "http://server-specific-proxy:9090"
  - name: remote
    protocol: streamable
    url: http://127.0.0.1:8000/mcp
    headers: {X-Api-Key: k1}
    builtin_type: web_search_preview
    builtin_tool_name: search
"""


def test_full_1_13_file() -> None:
    config = parse_config(FULL)
    assert config == McpConfig(
        servers=(
            McpServerConfig(
                name="required-server",
                protocol="sse",
                url="https://api.example.com/sse",
                token="secret-token",
                required=True,
            ),
            McpServerConfig(
                name="optional-server",
                protocol="stdio",
                command="mcp-server",
                args=("--port", "3000"),
                envs={"MODE": "fast"},
            ),
            McpServerConfig(
                name="remote",
                protocol="streamable",
                url="http://127.0.0.1:8000/mcp",
                headers={"X-Api-Key": "k1"},
                builtin_type="web_search_preview",
                builtin_tool_name="search",
            ),
        )
    )
    assert config.labels == ["required-server", "optional-server", "remote"]
    assert config.server("remote") is config.servers[2]
    assert config.server("nope") is None
    assert config.servers[0].http_headers() == {"Authorization": "Bearer secret-token"}
    assert config.servers[2].http_headers() == {"X-Api-Key": "k1"}


def test_json_reads_too() -> None:
    text = json.dumps({"servers": [{"name": "x", "protocol": "stdio", "command": "srv"}]})
    assert parse_config(text) == McpConfig(
        servers=(McpServerConfig(name="x", protocol="stdio", command="srv"),)
    )


def test_empty_server_list() -> None:
    assert parse_config("servers: []\n") == McpConfig()
    assert parse_config("servers:\n") == McpConfig()


def test_repr_hides_credentials() -> None:
    server = parse_config(FULL).servers[0]
    assert "secret-token" not in repr(server)
    assert repr(server) == (
        "McpServerConfig(name='required-server', protocol='sse', "
        "target='https://api.example.com/sse')"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n", "the file must hold a mapping with a `servers` list"),
        ("pool: {}\n", "missing field `servers`"),
        ("servers: {}\n", "servers: must be a list of servers"),
        ("servers: [\n", "not valid YAML"),
        ("servers: []\nservrs: []\n", "unknown field `servrs` (did you mean `servers`?)"),
        ("servers: []\npool: 3\n", "pool: must be a mapping"),
        ("servers: []\nwarmup: {}\n", "warmup: must be a list"),
        ("servers:\n  - 3\n", "servers[0]: must be a mapping (name, protocol, ...)"),
        ("servers:\n  - protocol: stdio\n", "servers[0]: missing field `name`"),
        (
            "servers:\n  - {name: '', protocol: stdio}\n",
            "servers[0]: name must be a non-empty string",
        ),
        ("servers:\n  - {name: x}\n", "servers[0] (x): missing field `protocol`"),
        (
            "servers:\n  - {name: x, transport: stdio}\n",
            "servers[0] (x): missing field `protocol` (1.13 names the transport `protocol`)",
        ),
        (
            "servers:\n  - {name: x, protocol: http}\n",
            "servers[0] (x): unknown protocol 'http', expected one of stdio, sse, streamable",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio}\n",
            "servers[0] (x): missing field `command` (protocol stdio)",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: srv, env: {A: b}}\n",
            "servers[0] (x): unknown field `env` (did you mean `envs`?)",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: srv, url: 'http://h/mcp'}\n",
            "servers[0] (x): url has no meaning for protocol stdio",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: srv, args: srv2}\n",
            "servers[0] (x): args must be a list of strings",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: srv, envs: {N: 1}}\n",
            "servers[0] (x): envs must map names to strings ('N' maps to int; quote it)",
        ),
        (
            "servers:\n  - {name: x, protocol: streamable}\n",
            "servers[0] (x): missing field `url` (protocol streamable)",
        ),
        (
            "servers:\n  - {name: x, protocol: streamable, url: 'ftp://h/mcp'}\n",
            "servers[0] (x): url must be an http:// or https:// URL, got 'ftp://h/mcp'",
        ),
        (
            "servers:\n  - {name: x, protocol: streamable, url: 'http://h:99999/mcp'}\n",
            "servers[0] (x): url has an invalid port: 'http://h:99999/mcp'",
        ),
        (
            "servers:\n  - {name: x, protocol: sse, url: 'http://h/sse', command: srv}\n",
            "servers[0] (x): command has no meaning for protocol sse",
        ),
        (
            "servers:\n  - {name: x, protocol: sse, url: 'http://h/sse', token: 5}\n",
            "servers[0] (x): token must be a string",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: srv, required: 'yes'}\n",
            "servers[0] (x): required must be true or false",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: a}\n  - {name: x, protocol: stdio, command: b}\n",
            "servers[1]: name 'x' is already used by servers[0] "
            "(names label the servers in requests: they must be unique)",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: a, builtin_type: web_search_preview}\n",
            "server 'x': builtin_type is set but builtin_tool_name is missing",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: a, builtin_tool_name: s}\n",
            "server 'x': builtin_tool_name 's' is set but builtin_type is missing",
        ),
        (
            "servers:\n  - {name: x, protocol: stdio, command: a, builtin_type: web_search}\n",
            "servers[0] (x): unknown builtin_type 'web_search', expected one of "
            "web_search_preview, code_interpreter, file_search, image_generation",
        ),
        (
            "servers:\n"
            "  - {name: a, protocol: stdio, command: a, builtin_type: file_search, builtin_tool_name: s}\n"
            "  - {name: b, protocol: stdio, command: b, builtin_type: file_search, builtin_tool_name: t}\n",
            "duplicate builtin_type 'file_search': configured on both 'a' and 'b'",
        ),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(McpConfigError) as info:
        parse_config(text)
    if message == "not valid YAML":
        assert str(info.value).startswith("not valid YAML: ")
    else:
        assert str(info.value) == message


def test_load_config_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    with pytest.raises(McpConfigError) as info:
        load_config(str(missing))
    # 1.13: "Failed to read MCP config from /nonexistent.yaml: No such file or directory (os error 2)"
    assert str(info.value) == f"Failed to read MCP config from {missing}: No such file or directory"
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  - name: x\n    protocol: bogus\n")
    with pytest.raises(McpConfigError) as info:
        load_config(str(bad))
    assert str(info.value) == (
        f"Failed to parse MCP config from {bad}: servers[0] (x): unknown protocol 'bogus', "
        "expected one of stdio, sse, streamable"
    )
    good = tmp_path / "good.yaml"
    good.write_text("servers:\n  - {name: x, protocol: stdio, command: srv}\n")
    assert load_config(str(good)).labels == ["x"]


def test_flags() -> None:
    cfg = load_gateway_config(["--mcp-config-path", "/etc/mcp.yaml"], {})
    assert cfg.mcp_config_path == "/etc/mcp.yaml"
    assert cfg.mcp_tool_timeout_secs == 60.0
    cfg = load_gateway_config(["--mcp-tool-timeout-secs", "2.5"], {})
    assert cfg.mcp_tool_timeout_secs == 2.5
    assert cfg.mcp_config_path is None
    with pytest.raises(ConfigError, match="mcp_tool_timeout_secs"):
        load_gateway_config(["--mcp-tool-timeout-secs", "0"], {})


def test_launch_refuses_a_bad_file_before_serving(tmp_path: Path) -> None:
    bad = tmp_path / "mcp.yaml"
    bad.write_text("servers:\n  - name: x\n    protocol: stdio\n")
    port = free_port()
    base = ["--host", "127.0.0.1", "--port", str(port), "--mock-workers", "1"]
    rc, err, _took = run_launch([*base, "--mcp-config-path", str(bad)], timeout=30)
    assert rc == 1
    assert (
        f"smg launch: Failed to parse MCP config from {bad}: servers[0] (x): missing field "
        "`command` (protocol stdio)"
    ) in err
    assert "SMG_READY" not in err
    rc, err, _took = run_launch([*base, "--mcp-config-path", str(tmp_path / "none.yaml")])
    assert rc == 1
    assert f"Failed to read MCP config from {tmp_path / 'none.yaml'}: No such file" in err


def test_launch_serves_with_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "mcp.yaml"
    # A stdio server that does not exist: servers are contacted on first use, not at start.
    good.write_text("servers:\n  - {name: x, protocol: stdio, command: /nonexistent/srv}\n")
    args = ["--mock-workers", "1", "--mcp-config-path", str(good)]
    with running_gateway(args) as gw, gw.client() as client:
        assert client.get("/health").status_code == 200


def test_data_planes_use_the_copy_launch_read(tmp_path: Path) -> None:
    from smg import mcp

    path = tmp_path / "mcp.yaml"
    path.write_text("servers:\n  - {name: first, protocol: stdio, command: srv}\n")
    cfg = load_gateway_config(["--mcp-config-path", str(path)], {})
    mcp.remember_config(str(path), load_config(str(path)))
    try:
        path.write_text("servers:\n  - {name: second, protocol: stdio, command: srv}\n")
        manager = mcp.process_manager(cfg)
        assert manager is not None and manager.labels() == ["first"]
    finally:
        mcp._LOADED = None
        mcp._PROCESS = None
        mcp._MANAGERS.clear()


def test_reload_keeps_the_mcp_file() -> None:
    from smg.reload import plan_reload

    old = load_gateway_config(["--mcp-config-path", "/a.yaml"], {})
    new = load_gateway_config(["--mcp-config-path", "/b.yaml", "--mcp-tool-timeout-secs", "5"], {})
    plan = plan_reload(old, new)
    assert plan.kept == [("mcp_config_path", "/a.yaml", "/b.yaml")]
    assert plan.cfg.mcp_config_path == "/a.yaml"
    assert plan.changed == ["mcp_tool_timeout_secs"]  # applies: the data planes are replaced
