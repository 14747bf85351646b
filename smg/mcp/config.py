"""The MCP server configuration file (`--mcp-config-path`), in the Rust SMG 1.13's format. Pure.

The file is YAML (JSON is YAML too, so a JSON file reads as 1.13 reads it):

    servers:
      - name: tools                 # the label requests use ({"type": "mcp", "server_label": ...})
        protocol: stdio             # stdio | sse | streamable (1.13's names)
        command: python
        args: [server.py]
        envs: {KEY: value}          # 1.13 spells it `envs`
      - name: remote
        protocol: streamable
        url: http://127.0.0.1:8000/mcp
        token: secret               # sent as "Authorization: Bearer secret"
        headers: {X-Api-Key: k}

1.13 also reads `pool`, `proxy`, `warmup`, `inventory`, `policy` (top level) and `proxy`, `required`,
`tools`, `builtin_type`, `builtin_tool_name`, `internal` (per server); smg accepts them so a 1.13 file
loads, checks their shape, and does not act on them yet (docs/flags.md). Where 1.13 silently ignores an
unknown key, smg refuses it: a misspelt key (`env` for `envs`) would otherwise drop settings unnoticed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

PROTOCOLS: tuple[str, ...] = ("stdio", "sse", "streamable")
BUILTIN_TYPES: tuple[str, ...] = (
    "web_search_preview",
    "code_interpreter",
    "file_search",
    "image_generation",
)
_TOP_KEYS: frozenset[str] = frozenset({"servers", "pool", "proxy", "warmup", "inventory", "policy"})
_COMMON_KEYS: frozenset[str] = frozenset(
    {
        "name",
        "protocol",
        "proxy",
        "required",
        "tools",
        "builtin_type",
        "builtin_tool_name",
        "internal",
    }
)
_TRANSPORT_KEYS: dict[str, frozenset[str]] = {
    "stdio": frozenset({"command", "args", "envs"}),
    "sse": frozenset({"url", "token", "headers"}),
    "streamable": frozenset({"url", "token", "headers"}),
}


class McpConfigError(ValueError):
    """The file cannot be read or is not a valid MCP configuration; the message says where and why."""


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    protocol: str  # one of PROTOCOLS
    command: str | None = None  # stdio
    args: tuple[str, ...] = ()  # stdio
    envs: Mapping[str, str] = field(
        default_factory=dict
    )  # stdio: added to the inherited environment
    url: str | None = None  # sse / streamable
    token: str | None = None  # sse / streamable: "Authorization: Bearer <token>"
    headers: Mapping[str, str] = field(default_factory=dict)  # sse / streamable
    required: bool = False  # read, not acted on (servers connect lazily, per data-plane process)
    internal: bool = False
    builtin_type: str | None = None
    builtin_tool_name: str | None = None

    def http_headers(self) -> dict[str, str]:
        """The headers every HTTP request to this server carries (token as a bearer credential)."""
        headers = dict(self.headers)
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def __repr__(self) -> str:
        # Tokens, header values and environment values may be credentials: never in a log line.
        where = self.command if self.protocol == "stdio" else self.url
        return f"McpServerConfig(name={self.name!r}, protocol={self.protocol!r}, target={where!r})"


@dataclass(frozen=True)
class McpConfig:
    servers: tuple[McpServerConfig, ...] = ()

    def server(self, name: str) -> McpServerConfig | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None

    @property
    def labels(self) -> list[str]:
        return [server.name for server in self.servers]


def load_config(path: str) -> McpConfig:
    """Read and check the file; McpConfigError with 1.13's message shape when it cannot be used."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise McpConfigError(f"Failed to read MCP config from {path}: {reason}") from None
    try:
        return parse_config(text)
    except McpConfigError as exc:
        raise McpConfigError(f"Failed to parse MCP config from {path}: {exc}") from None


def parse_config(text: str) -> McpConfig:
    """The configuration a file's text holds; McpConfigError naming the first problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise McpConfigError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise McpConfigError("the file must hold a mapping with a `servers` list")
    _unknown_keys(data, _TOP_KEYS, "")
    if "servers" not in data:
        raise McpConfigError("missing field `servers`")
    raw_servers = data["servers"]
    if raw_servers is None:
        raw_servers = []
    if not isinstance(raw_servers, list):
        raise McpConfigError("servers: must be a list of servers")
    for key in ("pool", "inventory", "policy"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise McpConfigError(f"{key}: must be a mapping")
    if data.get("proxy") is not None and not isinstance(data["proxy"], dict):
        raise McpConfigError("proxy: must be a mapping")
    if data.get("warmup") is not None and not isinstance(data["warmup"], list):
        raise McpConfigError("warmup: must be a list")

    servers: list[McpServerConfig] = []
    names: dict[str, int] = {}
    builtin_owner: dict[str, str] = {}
    for index, raw in enumerate(raw_servers):
        where = f"servers[{index}]"
        server = _server(raw, where)
        if server.name in names:
            raise McpConfigError(
                f"{where}: name {server.name!r} is already used by servers[{names[server.name]}]"
                " (names label the servers in requests: they must be unique)"
            )
        names[server.name] = index
        if server.builtin_type is not None:
            first = builtin_owner.get(server.builtin_type)
            if first is not None:
                # 1.13's ConfigValidationError::DuplicateBuiltinType wording.
                raise McpConfigError(
                    f"duplicate builtin_type '{server.builtin_type}': configured on both "
                    f"'{first}' and '{server.name}'"
                )
            builtin_owner[server.builtin_type] = server.name
        servers.append(server)
    return McpConfig(servers=tuple(servers))


def _server(raw: Any, where: str) -> McpServerConfig:
    if not isinstance(raw, dict):
        raise McpConfigError(f"{where}: must be a mapping (name, protocol, ...)")
    name = raw.get("name")
    if "name" not in raw:
        raise McpConfigError(f"{where}: missing field `name`")
    if not isinstance(name, str) or not name.strip():
        raise McpConfigError(f"{where}: name must be a non-empty string")
    where = f"{where} ({name})"
    if "protocol" not in raw:
        hint = " (1.13 names the transport `protocol`)" if "transport" in raw else ""
        raise McpConfigError(f"{where}: missing field `protocol`{hint}")
    protocol = raw["protocol"]
    if protocol not in PROTOCOLS:
        raise McpConfigError(
            f"{where}: unknown protocol {protocol!r}, expected one of {', '.join(PROTOCOLS)}"
        )
    _unknown_keys(raw, _COMMON_KEYS | _TRANSPORT_KEYS[protocol], f"{where}: ", protocol)
    for key in ("required", "internal"):
        if key in raw and not isinstance(raw[key], bool):
            raise McpConfigError(f"{where}: {key} must be true or false")
    if raw.get("proxy") is not None and not isinstance(raw["proxy"], dict):
        raise McpConfigError(f"{where}: proxy must be a mapping or null")
    if raw.get("tools") is not None and not isinstance(raw["tools"], dict):
        raise McpConfigError(f"{where}: tools must be a mapping of tool name to settings")
    builtin_type = _optional_str(raw, "builtin_type", where)
    builtin_tool_name = _optional_str(raw, "builtin_tool_name", where)
    if builtin_type is not None and builtin_type not in BUILTIN_TYPES:
        raise McpConfigError(
            f"{where}: unknown builtin_type {builtin_type!r}, expected one of {', '.join(BUILTIN_TYPES)}"
        )
    # 1.13's ConfigValidationError wording for a half-given builtin pair.
    if builtin_type is not None and builtin_tool_name is None:
        raise McpConfigError(
            f"server '{name}': builtin_type is set but builtin_tool_name is missing"
        )
    if builtin_type is None and builtin_tool_name is not None:
        raise McpConfigError(
            f"server '{name}': builtin_tool_name '{builtin_tool_name}' is set but builtin_type is missing"
        )
    common: dict[str, Any] = {
        "name": name,
        "protocol": protocol,
        "required": raw.get("required", False),
        "internal": raw.get("internal", False),
        "builtin_type": builtin_type,
        "builtin_tool_name": builtin_tool_name,
    }
    if protocol == "stdio":
        command = raw.get("command")
        if "command" not in raw:
            raise McpConfigError(f"{where}: missing field `command` (protocol stdio)")
        if not isinstance(command, str) or not command.strip():
            raise McpConfigError(f"{where}: command must be a non-empty string")
        args = raw.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise McpConfigError(f"{where}: args must be a list of strings")
        envs = _str_map(raw, "envs", where)
        return McpServerConfig(command=command, args=tuple(args), envs=envs, **common)
    if "url" not in raw:
        raise McpConfigError(f"{where}: missing field `url` (protocol {protocol})")
    url = raw["url"]
    reason = url_problem(url)
    if reason:
        raise McpConfigError(f"{where}: url {reason}")
    token = _optional_str(raw, "token", where)
    headers = _str_map(raw, "headers", where)
    return McpServerConfig(url=url, token=token, headers=headers, **common)


def url_problem(url: object) -> str | None:
    """Why `url` cannot name an MCP server over HTTP (None: it can). Also checks a request's server_url."""
    if not isinstance(url, str) or not url.strip():
        return "must be a non-empty string"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL, got {url!r}"
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return f"has an invalid port: {url!r}"
    return None


def _optional_str(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise McpConfigError(f"{where}: {key} must be a string")
    return value


def _str_map(raw: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise McpConfigError(f"{where}: {key} must be a mapping of names to strings")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise McpConfigError(
                f"{where}: {key} must map names to strings ({k!r} maps to {type(v).__name__}; quote it)"
            )
    return dict(value)


def _unknown_keys(
    raw: dict[Any, Any], known: frozenset[str], where: str, protocol: str | None = None
) -> None:
    for key in raw:
        if key in known:
            continue
        if protocol is not None and any(key in keys for keys in _TRANSPORT_KEYS.values()):
            raise McpConfigError(f"{where}{key} has no meaning for protocol {protocol}")
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise McpConfigError(f"{where}unknown field `{key}`{hint}")
