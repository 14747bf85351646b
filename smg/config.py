"""The configuration model of `smg launch`: one struct, one loader, one validator.

Layers, lowest to highest: field defaults < `--config FILE` (YAML or TOML) < `SMG_*`
environment variables < command-line flags. Only values a layer actually names override
the layer below (argparse defaults are SUPPRESS), so a flag left off never resets a file
setting. Every layer goes through the same conversion and `validate_config`, so a bad
value is refused the same way wherever it came from, with a `ConfigError` naming the key,
the reason and the layer.

Environment rule: a variable `SMG_<NAME>` is a setting when `<name>` (lower-cased) is a
GatewayConfig field (`SMG_HEALTH_CHECK_INTERVAL_SECS=5`). `SMG__*` (double underscore) is
reserved for smg's own process plumbing and never read as a setting; the variables the
Rust SMG reads for its engines (`RUST_SMG_ENV`) are ignored; any other `SMG_*` name is
refused as an unknown setting, so a typo cannot silently do nothing.

`processes: None` means "use default_processes()": it stays None in the struct (a written-out
config stays portable between machines); call `cfg_processes(cfg)` for the number.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import shlex
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import yaml

from smg.cpus import PROCESS_CAP, default_processes
from smg.parsers.registry import REASONING_PARSERS, TOOL_PARSERS
from smg.policies.registry import POLICY_NAMES, PREFILL_POLICY_NAMES, RUST_POLICY_NAMES
from smg.worker_url import WorkerUrlError, parse_worker_url, valid_host

__all__ = [
    "CHOICES",
    "DEFAULTS",
    "IMPLEMENTED_POLICIES",
    "RUST_SMG_ENV",
    "ConfigError",
    "GatewayConfig",
    "PdWorker",
    "build_parser",
    "cfg_processes",
    "discovery_provider",
    "is_secret_key",
    "load_config",
    "mask_secret",
    "mask_secret_args",
    "mask_url",
    "model_aliases",
    "normalize_worker_url",
    "pd_workers",
    "prefill_admission",
    "prometheus_bind_host",
    "remove_unhealthy",
    "render_config",
    "selector_map",
    "tenant_keys",
    "validate_config",
]


class ConfigError(Exception):
    """A refused setting: `key` is the setting (or JSON field) name, `reason` says why,
    `source` says which layer supplied it (flag, environment variable, config file)."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        suffix = f" (from {source})" if source else ""
        super().__init__(f"{key}: {reason}{suffix}")


class GatewayConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One field per `smg launch` flag, named after the flag (`-` -> `_`)."""

    # Worker configuration
    host: str = "0.0.0.0"
    port: int = 30000
    worker_urls: list[str] = []
    upstream_pool_idle_timeout_secs: int = 3
    health_check_port: int | None = None
    # Routing policy
    policy: str = "cache_aware"
    power_of_two_load_metric: str = "expected_wait"
    least_load_kv_pressure_weight: float = 0.15
    least_load_default_throughput: float = 2000.0
    least_load_mean_prefill_tokens: int = 1024
    least_load_max_waiting_requests: int = 0
    # Cache-aware routing (one prefix index for the whole gateway)
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    balance_token_usage_threshold: float = 1.0
    overload_token_usage_threshold: float = 1.0
    eviction_interval_secs: int = 60
    max_tree_size: int = 67108864
    # prefix_hash, consistent_hashing, manual, sticky routing keys
    prefix_token_count: int = 256
    prefix_hash_load_factor: float = 1.25
    prefix_hash_balance_abs_threshold: int = 10
    routing_key_override: bool = False
    routing_key_headers: list[str] | None = None
    assignment_mode: str | None = None
    max_idle_secs: int = 14400
    max_payload_size: int = 536870912
    enable_igw: bool = False
    # PD (prefill/decode) disaggregation, as the Rust SMG 1.13's flags. `prefill` holds
    # [URL] or [URL, BOOTSTRAP_PORT|none] per flag; validate_config normalises the URLs.
    pd_disaggregation: bool = False
    epd_disaggregation: bool = False
    prefill: list[list[str]] | None = None
    decode: list[str] | None = None
    prefill_policy: str | None = None
    decode_policy: str | None = None
    prefill_max_inflight_requests_per_worker: int = -1
    prefill_queue_size: int | None = None
    prefill_queue_timeout_secs: int | None = None
    pd_admission_wait_secs: int = 30
    bucket_adjust_interval_secs: int = 5
    dp_aware: bool = False
    # Worker start-up and load monitoring
    worker_startup_timeout_secs: int = 1800
    worker_startup_check_interval: int = 30
    load_monitor_interval: int = 10
    disable_load_monitoring: bool = False
    # Request handling
    request_timeout_secs: int = 1800
    shutdown_grace_period_secs: int = 180
    header_read_timeout_secs: int = 30
    idle_connection_timeout_secs: int = 90
    stream_body_stall_timeout_secs: int = 300
    sse_keepalive_secs: int = 15
    max_buffered_request_bytes: int = 1048576
    request_id_headers: list[str] | None = None
    cors_allowed_origins: list[str] = []
    # Admission control (global: one limit for every data-plane process together)
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: int = 60
    rate_limit_tokens_per_second: int | None = None
    # Retries
    retry_max_retries: int = 5
    retry_initial_backoff_ms: int = 50
    retry_max_backoff_ms: int = 30000
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False
    # Circuit breaker (one per worker for the whole gateway)
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: int = 60
    cb_window_duration_secs: int = 120
    disable_circuit_breaker: bool = False
    # Worker overload protection and stalls
    worker_overload_waiting_requests: int = 8
    worker_overload_token_usage: float = 0.8
    worker_overload_protection: bool | None = None
    disable_worker_overload_protection: bool | None = None
    worker_overload_shed: bool = False
    worker_stall_secs: int = 2
    # Health checks
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_timeout_secs: int = 5
    health_check_interval_secs: int = 60
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False
    remove_unhealthy_workers: bool | None = None
    # Models and tokenizer
    model_alias: list[str] = []
    model_path: str | None = None
    tokenizer_path: str | None = None
    chat_template: str | None = None
    disable_tokenizer_autoload: bool = False
    # Gateway-side tokenizer caches (gRPC mode), as the Rust SMG 1.13's flags.
    tokenizer_cache_enable_l0: bool = False
    tokenizer_cache_l0_max_entries: int = 10000
    tokenizer_cache_l0_max_memory: int = 268435456
    tokenizer_cache_enable_l1: bool = False
    tokenizer_cache_l1_max_memory: int = 52428800
    backend: str = "sglang"
    # Output parsers (gRPC mode): None chooses by the model's name, as the Rust SMG.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # MCP servers for the Responses API's tools of type mcp (smg/mcp/config.py reads the file)
    mcp_config_path: str | None = None
    # Logging and metrics
    log_level: str = "info"
    log_json: bool = False
    log_dir: str | None = None
    prometheus_port: int = 29000
    prometheus_host: str | None = None
    # Authentication
    api_key: str | None = None
    tenant_api_key: list[str] = []
    trust_tenant_header: bool = False
    tenant_header_name: str = "x-smg-tenant-id"
    control_plane_api_keys: list[str] = []
    control_plane_audit_enabled: bool = False
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_uri: str | None = None
    jwt_role_mapping: list[str] = []
    # TLS: the listener, and mutual TLS to https:// workers
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    ca_cert_paths: list[str] = []
    # Tracing (OpenTelemetry)
    enable_trace: bool = False
    otlp_traces_endpoint: str = "localhost:4317"
    # WASM plugins (POST /wasm on the admin API; smg.wasm)
    enable_wasm: bool = False
    # History storage (Responses and Conversations), as the Rust SMG 1.13's flags
    history_backend: str = "memory"
    history_memory_max_responses: int = 10000
    history_memory_max_items: int = 100000
    history_memory_retention_secs: int = 86400
    redis_url: str | None = None
    redis_pool_max: int = 16
    redis_retention_days: int = 30
    redis_op_timeout_secs: float = 5.0
    postgres_db_url: str | None = None
    postgres_pool_max: int = 16
    postgres_op_timeout_secs: float = 5.0
    # smg-only (see docs/flags.md)
    config: str | None = None
    print_config: bool = False
    processes: int | None = None
    listen_mode: str = "reuseport"
    worker_table_capacity: int = 1024
    upstream_connect_timeout_secs: float = 10.0
    upstream_pool_max_per_worker: int = 256
    dataplane_heartbeat_timeout_secs: float = 10.0
    mock_workers: int = 0
    mock_worker_engine: str = "sglang"
    mock_worker_args: str = ""
    access_log: bool = False
    log_max_bytes: int = 100 * 1024 * 1024
    log_backup_count: int = 5
    mcp_tool_timeout_secs: float = 60.0
    # Service discovery (smg.discovery), as the Rust SMG 1.13's flags
    service_discovery: bool = False
    discovery_provider: str | None = None
    discovery_file: str | None = None
    discovery_check_interval_secs: int | None = None
    selector: list[str] | None = None
    service_discovery_port: int = 80
    service_discovery_namespace: str | None = None
    kv_connector_annotation: str = "smg.ai/kv-connector"
    kv_engine_id_annotation: str = "smg.ai/kv-engine-id"
    encode_selector: list[str] | None = None
    prefill_selector: list[str] | None = None
    decode_selector: list[str] | None = None
    router_selector: list[str] | None = None
    model_id_from: str | None = None


DEFAULTS: dict[str, Any] = msgspec.structs.asdict(GatewayConfig())
_FIELDS: tuple[str, ...] = GatewayConfig.__struct_fields__
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(GatewayConfig)

# Rust SMG's --policy names (the policy registry's list, less the prefill-only `bucket`);
# only IMPLEMENTED_POLICIES route today, the rest are refused with a clear message rather
# than by argparse, so a Rust command line gets an explanation.
RUST_POLICIES: tuple[str, ...] = tuple(name for name in RUST_POLICY_NAMES if name != "bucket")
IMPLEMENTED_POLICIES: tuple[str, ...] = POLICY_NAMES

CHOICES: dict[str, tuple[str, ...]] = {
    "policy": RUST_POLICIES,
    # `bucket` is a prefill-only policy in 1.13 (its --decode-policy choices leave it out).
    "prefill_policy": RUST_POLICY_NAMES,
    "decode_policy": RUST_POLICIES,
    "power_of_two_load_metric": ("expected_wait", "requests", "least_requests"),
    "log_level": ("debug", "info", "warn", "error"),
    "backend": ("sglang", "openai", "anthropic", "vllm", "tokenspeed"),
    "listen_mode": ("reuseport", "inherit"),
    "mock_worker_engine": ("sglang", "vllm"),
    "assignment_mode": ("random", "min_load", "min_group", "delegate"),
    "tool_call_parser": tuple(TOOL_PARSERS),
    "reasoning_parser": tuple(REASONING_PARSERS),
    # oracle is listed (a Rust command line parses) and refused by validate_config.
    "history_backend": ("memory", "none", "oracle", "postgres", "redis"),
    "discovery_provider": ("kubernetes", "file"),
}

# Environment variables the Rust SMG reads for its engines and media paths; a deployment
# moved over from the Rust gateway may still set them, and they are not smg settings.
RUST_SMG_ENV: frozenset[str] = frozenset(
    {
        "SMG_AUDIO_DECODE_BACKEND",
        "SMG_AUDIO_MAX_DECODED_BYTES",
        "SMG_AUDIO_MAX_INPUT_BYTES",
        "SMG_AUDIO_PROCESS_TIMEOUT_SECS",
        "SMG_BUILD_WITH_RUST",
        "SMG_DEFAULT_BACKEND",
        "SMG_IMAGE_MAX_INPUT_BYTES",
        "SMG_LOG_MM_TIMING",
        "SMG_MM_ALLOW_PRIVATE_MEDIA_HOSTS",
        "SMG_MM_PIXEL_CACHE_MB",
        "SMG_MM_PIXEL_RDMA",
        "SMG_MM_PROCESSING",
        "SMG_MM_SHM_MIN_BYTES",
        "SMG_MM_TENSOR_TRANSPORT",
        "SMG_RDMA_LANDING_WAIT_S",
        "SMG_RDMA_LISTEN_IP",
        "SMG_RDMA_LISTEN_PORT",
        "SMG_RDMA_POOL_SLOTS",
        "SMG_RDMA_READ_TIMEOUT_S",
        "SMG_RDMA_SLOT_BYTES",
        "SMG_RDMA_SLOT_TTL_S",
        "SMG_TOKENSPEED_AUDIO_ENCODER_INPUT_DTYPE",
        "SMG_TOKENSPEED_ENCODER_INPUT_DTYPE",
        "SMG_TOKENSPEED_IMAGE_ENCODER_INPUT_DTYPE",
        "SMG_TOKENSPEED_MM_SHM_MIN_BYTES",
        "SMG_TOKENSPEED_MM_TENSOR_TRANSPORT",
        "SMG_TOKENSPEED_VIDEO_ENCODER_INPUT_DTYPE",
        "SMG_VIDEO_DECODE_BACKEND",
        "SMG_VIDEO_MAX_DECODED_BYTES",
        "SMG_VIDEO_MAX_INPUT_BYTES",
        "SMG_VIDEO_PROCESS_TIMEOUT_SECS",
        "SMG_ZMQ_SOCKET_DIR",
    }
)
ENV_PREFIX = "SMG_"
ENV_RESERVED_PREFIX = "SMG__"

_MAX_EXPLICIT_PROCESSES = 256
_MAX_MOCK_WORKERS = 256
_MAX_WORKER_TABLE_CAPACITY = 1 << 20


# ---------------------------------------------------------------------------------------
# Secrets


_SECRET_WORDS = frozenset({"key", "keys", "secret", "secrets", "password", "passwords", "token"})


def is_secret_key(name: str) -> bool:
    """A credential by name: its last `_`/`-` word is key/secret/password/token.

    Matching the last word only keeps `tokenizer_path` and `mean_prefill_tokens` visible.
    """
    words = re.split(r"[_\-.]", name.lower())
    return bool(words) and words[-1] in _SECRET_WORDS


def mask_secret(value: str | None) -> str | None:
    """Mask a credential for logs and `--print-config`.

    Keys of 16+ characters keep their first 3 (a vendor prefix such as `sk-`, enough to
    tell two keys apart, at most a fifth of the key); shorter ones are masked whole.
    """
    if value is None:
        return None
    if value == "":
        return ""
    if len(value) >= 16:
        return value[:3] + "***"
    return "***"


def mask_secret_args(args: str) -> str:
    """Mask the values of credential flags in a command line (`--mock-worker-args`).

    `--api-key VALUE` and `--api-key=VALUE` (any flag whose name `is_secret_key`) get
    their value masked; everything else is kept. Text that does not split as shell words
    is masked whole: it cannot be parsed, so it cannot be shown safely.
    """
    try:
        words = shlex.split(args)
    except ValueError:
        return mask_secret(args) or ""
    out: list[str] = []
    mask_next = False
    for word in words:
        if mask_next:
            out.append(mask_secret(word) or "")
            mask_next = False
            continue
        name, eq, value = word.partition("=")
        secret_flag = name.startswith("-") and is_secret_key(name.lstrip("-"))
        if secret_flag and eq:
            out.append(f"{name}={mask_secret(value)}")
        else:
            out.append(word)
            mask_next = secret_flag
    return shlex.join(out)


# ---------------------------------------------------------------------------------------
# Worker URLs (the rules live in smg.worker_url) and processes (smg.cpus)


def normalize_worker_url(url: object, key: str = "url", source: str | None = None) -> str:
    """The canonical form of a worker URL (see smg.worker_url), or ConfigError naming `key`."""
    try:
        return parse_worker_url(url).url
    except WorkerUrlError as exc:
        raise ConfigError(key, str(exc), source) from None


def prometheus_bind_host(cfg: GatewayConfig) -> str:
    """Where the metrics server listens.

    `--prometheus-host` when given. Otherwise a gateway bound to loopback keeps its
    metrics (which name every worker's address) on loopback too: `--host` itself. Any
    other `--host` gets the unspecified address of its family, as in the Rust SMG (whose
    default is that address even for a loopback `--host`).
    """
    if cfg.prometheus_host:
        return cfg.prometheus_host
    if _is_loopback(cfg.host):
        return cfg.host
    return "::" if ":" in cfg.host else "0.0.0.0"


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def cfg_processes(cfg: GatewayConfig) -> int:
    """The number of data-plane processes `cfg` asks for (None -> default_processes())."""
    return cfg.processes if cfg.processes is not None else default_processes()


# ---------------------------------------------------------------------------------------
# Field kinds and conversion


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(base type, optional?) of a field annotation."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _is_list(field: str) -> bool:
    return typing.get_origin(_unwrap(_FIELD_TYPES[field])[0]) is list


_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


def _from_text(field: str, text: str, source: str) -> Any:
    """Convert a string (environment or flag argument) to the field's type."""
    base, optional = _unwrap(_FIELD_TYPES[field])
    if optional and text.strip() == "":
        return None
    if field == "prefill":
        # SMG_PREFILL="URL [PORT], URL [PORT]": entries by comma, URL and port by space.
        return [entry.split() for entry in text.split(",") if entry.strip()]
    if typing.get_origin(base) is list:
        return [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if base is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(field, f"expected a boolean (true/false/1/0), got {text!r}", source)
    if base is int:
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise ConfigError(field, f"expected an integer, got {text!r}", source) from None
    if base is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(field, f"expected a number, got {text!r}", source) from None
    return text


def _convert(field: str, value: Any, source: str) -> Any:
    """Type-check a value already parsed (config file, flags) against the field."""
    if field == "model_alias" and isinstance(value, Mapping):
        # A file may write aliases as a mapping; the flag form is a list of alias=canonical.
        value = [f"{k}={v}" for k, v in value.items()]
    if field == "prefill" and isinstance(value, list):
        # A file may write an entry as "URL PORT" or [URL, PORT] with PORT a number.
        value = [
            item.split()
            if isinstance(item, str)
            else [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in item]
            if isinstance(item, list)
            else item
            for item in value
        ]
    try:
        return msgspec.convert(value, _FIELD_TYPES[field])
    except msgspec.ValidationError as exc:
        reason = re.sub(r" - at `\$[^`]*`$", "", str(exc))
        raise ConfigError(field, f"{reason}, got {value!r}", source) from None


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, _FIELDS, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------------------------
# Layers


def _file_layer(path_s: str, source_of_path: str) -> dict[str, tuple[Any, str]]:
    path = Path(path_s)
    src = f"config file {path_s}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            "config", f"cannot read {path_s!r}: {exc.strerror}", source_of_path
        ) from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)
        except _DuplicateKey as exc:
            raise ConfigError(exc.key, "set twice in the file", src) from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "config", f"{path_s} is not valid YAML: {exc}", source_of_path
            ) from None
    elif suffix == ".toml":
        data = _load_toml(raw, path_s, source_of_path)
    else:
        raise ConfigError(
            "config",
            f"{path_s!r}: config file must end in .yaml, .yml or .toml",
            source_of_path,
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path_s} must hold a mapping of settings", source_of_path)
    layer: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"{src} key {key!r}"
        if name == "config":
            raise ConfigError(str(key), "a config file cannot name another config file", src)
        if name not in _FIELDS:
            raise ConfigError(str(key), "unknown setting" + _suggest(name), src)
        if name in layer:
            raise ConfigError(str(key), "set twice (with '-' and '_' spellings)", src)
        layer[name] = (_convert(name, value, where), where)
    return layer


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(str(key))
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_toml(raw: bytes, path_s: str, source_of_path: str) -> Any:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path_s} is not valid TOML: {exc}", source_of_path) from None


def _env_layer(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    layer: dict[str, tuple[Any, str]] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_RESERVED_PREFIX):
            continue
        if name in RUST_SMG_ENV:
            continue
        field = name[len(ENV_PREFIX) :].lower()
        src = f"environment variable {name}"
        if field not in _FIELDS:
            close = difflib.get_close_matches(field, _FIELDS, n=1, cutoff=0.75)
            hint = f"; did you mean {ENV_PREFIX + close[0].upper()}?" if close else ""
            raise ConfigError(
                name,
                "unknown setting (SMG_* variables name smg launch settings; use SMG__* "
                "for anything else)" + hint,
                src,
            )
        layer[field] = (_from_text(field, env[name], src), src)
    return layer


# ---------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class _Flag:
    field: str
    help: str
    aliases: tuple[str, ...] = ()
    metavar: str | tuple[str, ...] | None = None


def _flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


_GROUPS: tuple[tuple[str, tuple[_Flag, ...]], ...] = (
    (
        "Worker Configuration",
        (
            _Flag("host", "Host address to bind the gateway (IPv4, IPv6 or a hostname)"),
            _Flag("port", "Port to bind the gateway; 0 lets the OS pick one"),
            _Flag("worker_urls", "Worker URLs (http://, https://, grpc:// with host:port)"),
            _Flag(
                "upstream_pool_idle_timeout_secs",
                "Idle timeout in seconds for pooled upstream connections; keep it below the "
                "workers' keep-alive timeout. 0 keeps idle connections forever",
            ),
            _Flag(
                "health_check_port",
                "Dedicated port for liveness/readiness probes; unset = probes only on --port",
            ),
        ),
    ),
    (
        "Routing Policy",
        (
            _Flag(
                "policy",
                "Load balancing policy. smg implements "
                + ", ".join(IMPLEMENTED_POLICIES)
                + "; the other Rust SMG policies are refused until implemented",
            ),
            _Flag("power_of_two_load_metric", "What power_of_two compares"),
            _Flag(
                "least_load_kv_pressure_weight",
                "KV-pressure weight (seconds) for the least_load policy",
            ),
            _Flag(
                "least_load_default_throughput",
                "Fallback generation throughput (tokens/s) for least_load",
            ),
            _Flag(
                "least_load_mean_prefill_tokens",
                "Mean prefill tokens for least_load when a request's token count is unknown",
            ),
            _Flag(
                "least_load_max_waiting_requests",
                "Per-worker waiting-queue cap for least_load; 0 disables",
            ),
            _Flag(
                "cache_threshold",
                "Minimum matched-prefix share (0.0-1.0) before cache_aware pins a request to "
                "a worker already holding that prefix",
                aliases=("--cache-match-threshold",),
            ),
            _Flag(
                "balance_abs_threshold",
                "Spill gate, absolute part: a matched worker is skipped for the least-loaded "
                "one when its load exceeds the healthy-fleet mean by this many requests AND "
                "by the relative threshold",
                aliases=("--spill-abs-threshold",),
            ),
            _Flag(
                "balance_rel_threshold",
                "Spill gate, relative part: a multiple of the healthy-fleet mean (>= 1.0)",
                aliases=("--spill-rel-threshold",),
            ),
            _Flag(
                "balance_token_usage_threshold",
                "cache_aware abandons affinity when the hottest minus coldest backend KV "
                "usage exceeds this (needs token_usage from the workers; >= 1.0 disables)",
            ),
            _Flag(
                "overload_token_usage_threshold",
                "cache_aware sheds load off a backend whose KV usage exceeds this "
                "(>= 1.0 disables)",
            ),
            _Flag("eviction_interval_secs", "Seconds between prefix-index evictions"),
            _Flag(
                "max_tree_size",
                "Maximum size of each model's prefix index (characters over HTTP), shared by "
                "its workers; eviction keeps it at or under this bound",
            ),
            _Flag(
                "prefix_token_count",
                "Prefix tokens hashed by prefix_hash (untokenized requests: four times as many "
                "characters)",
            ),
            _Flag(
                "prefix_hash_load_factor",
                "Load factor above which prefix_hash walks the ring (multiple of the mean "
                "load, >= 1.0)",
            ),
            _Flag(
                "prefix_hash_balance_abs_threshold",
                "Absolute load over the mean a worker must also exceed before prefix_hash "
                "treats it as overloaded",
            ),
            _Flag(
                "routing_key_override",
                "Sticky sessions: route every request with the same routing key to the same "
                "worker, on any policy",
                aliases=("--sticky-sessions",),
            ),
            _Flag(
                "routing_key_headers",
                "Ordered header names checked for the routing key (after X-SMG-Routing-Key)",
            ),
            _Flag(
                "assignment_mode",
                "How new routing keys are assigned: random, min_load, min_group, delegate; "
                "unset = random for manual, delegate for --routing-key-override",
            ),
            _Flag(
                "max_idle_secs",
                "Seconds an unused sticky routing key stays pinned",
                aliases=("--sticky-key-idle-secs",),
            ),
            _Flag("max_payload_size", "Maximum request payload size in bytes"),
            _Flag("enable_igw", "Enable IGW (multi-model) mode"),
        ),
    ),
    (
        "PD Disaggregation",
        (
            _Flag("pd_disaggregation", "Enable PD (prefill-decode) disaggregated mode"),
            _Flag(
                "epd_disaggregation",
                "Encode-prefill-decode mode of the Rust SMG: refused, smg does not implement it",
            ),
            _Flag(
                "prefill",
                "Prefill server URL and optional bootstrap port (a number, or 'none' = "
                "omitted); repeat for more",
                metavar=("URL", "BOOTSTRAP_PORT"),
            ),
            _Flag("decode", "Decode server URL; repeat for more", metavar="URL"),
            _Flag(
                "prefill_policy",
                "Policy for prefill workers in PD mode; unset = --policy. bucket is prefill-only",
            ),
            _Flag("decode_policy", "Policy for decode workers in PD mode; unset = --policy"),
            _Flag(
                "prefill_max_inflight_requests_per_worker",
                "Maximum in-flight prefill requests per worker, for the whole gateway; "
                "a non-positive value disables the limit",
            ),
            _Flag(
                "prefill_queue_size",
                "Requests that may wait for prefill admission; unset = 100 when the "
                "per-worker limit is on, 0 answers at once",
            ),
            _Flag(
                "prefill_queue_timeout_secs",
                "Maximum seconds a request waits for prefill admission; unset = 60 when the "
                "per-worker limit is on",
            ),
            _Flag(
                "pd_admission_wait_secs",
                "Seconds a PD dispatch waits for a free slot in the decode engine's running "
                "window before shedding with 503 worker_overload_protection_shed; 0 sheds "
                "at once",
            ),
            _Flag(
                "bucket_adjust_interval_secs",
                "Seconds between bucket boundary adjustments (bucket prefill policy)",
            ),
            _Flag(
                "dp_aware",
                "Data-parallelism-aware scheduling (regular mode, HTTP workers): each worker "
                "becomes url@rank workers from its /server_info dp_size; data_parallel_rank "
                "is injected",
            ),
        ),
    ),
    (
        "Worker Start-up and Load Monitoring",
        (
            _Flag(
                "worker_startup_timeout_secs",
                "Timeout in seconds for worker start-up and registration",
            ),
            _Flag(
                "worker_startup_check_interval",
                "Interval in seconds between worker start-up checks",
            ),
            _Flag("load_monitor_interval", "Interval in seconds between worker load polls"),
            _Flag(
                "disable_load_monitoring",
                "Only poll worker loads when a load-aware policy needs them",
            ),
        ),
    ),
    (
        "Request Handling",
        (
            _Flag("request_timeout_secs", "Request timeout in seconds"),
            _Flag(
                "shutdown_grace_period_secs",
                "Seconds to wait for in-flight requests during shutdown",
            ),
            _Flag(
                "header_read_timeout_secs",
                "Close a connection that sends no complete request head within this many "
                "seconds; 0 disables",
            ),
            _Flag(
                "idle_connection_timeout_secs",
                "Close a keep-alive connection idle this many seconds; 0 disables",
            ),
            _Flag(
                "stream_body_stall_timeout_secs",
                "Answer 408 when a request body stalls this many seconds; 0 disables",
            ),
            _Flag(
                "sse_keepalive_secs",
                "Send an SSE comment on a stream after this many seconds of upstream silence; "
                "nothing is sent while frames flow. 0 sends none",
            ),
            _Flag(
                "max_buffered_request_bytes",
                "Request bodies up to this size are kept to be retried on another worker; "
                "larger ones are sent once. 0 never keeps a body for a retry",
            ),
            _Flag(
                "request_id_headers",
                "Headers checked, in order, for a request id; unset uses common defaults",
            ),
            _Flag(
                "cors_allowed_origins",
                "Origins a browser may call the gateway from, or '*' alone for any",
            ),
        ),
    ),
    (
        "Rate Limiting (global across data-plane processes)",
        (
            _Flag(
                "max_concurrent_requests",
                "Maximum concurrent requests for the whole gateway; each permit is held for the "
                "full response, streams included. -1 derives it from the host (1024 per core, "
                "at least 4096), 0 disables",
            ),
            _Flag(
                "queue_size",
                "Requests that may wait when the concurrency limit is reached; 0 answers 429 "
                "at once",
            ),
            _Flag("queue_timeout_secs", "Maximum seconds a request may wait in the queue"),
            _Flag(
                "rate_limit_tokens_per_second",
                "Sustained admission rate in requests per second for the whole gateway, "
                "bursting up to --max-concurrent-requests; unset or 0 = no rate limit",
            ),
        ),
    ),
    (
        "Retries",
        (
            _Flag(
                "retry_max_retries",
                "Maximum attempts per request, the first included",
            ),
            _Flag("retry_initial_backoff_ms", "Backoff in milliseconds before the first retry"),
            _Flag("retry_max_backoff_ms", "Maximum backoff in milliseconds between retries"),
            _Flag(
                "retry_backoff_multiplier",
                "Multiplier for exponential backoff between retries (finite, at least 1.0)",
            ),
            _Flag("retry_jitter_factor", "Jitter factor (0.0-1.0) applied to retry delays"),
            _Flag("disable_retries", "Disable retries (one attempt per request)"),
        ),
    ),
    (
        "Circuit Breaker",
        (
            _Flag("cb_failure_threshold", "Failures before a worker's circuit breaker opens"),
            _Flag(
                "cb_success_threshold",
                "Successes in half-open state before the circuit closes; also the most trial "
                "requests half-open admits across the gateway",
            ),
            _Flag(
                "cb_timeout_duration_secs",
                "Seconds an open circuit waits before letting trial requests through",
            ),
            _Flag(
                "cb_window_duration_secs",
                "Sliding window in seconds over which failures are counted",
            ),
            _Flag("disable_circuit_breaker", "Disable the circuit breakers"),
        ),
    ),
    (
        "Worker Overload Protection",
        (
            _Flag(
                "worker_overload_waiting_requests",
                "Reported waiting requests at or above which a worker is left out of routing "
                "while another worker is under the thresholds (>= 1)",
            ),
            _Flag(
                "worker_overload_token_usage",
                "Reported KV-cache usage at or above which a worker is left out of routing "
                "while another worker is under the thresholds (0-1]",
            ),
            _Flag(
                "worker_overload_protection",
                "Accepted for older command lines: protection is on unless "
                "--disable-worker-overload-protection",
            ),
            _Flag(
                "disable_worker_overload_protection",
                "Switch worker overload protection off",
            ),
            _Flag(
                "worker_overload_shed",
                "Answer 503 worker_overload_protection_shed when every worker a request "
                "could use is overloaded, instead of routing it to the least-loaded one",
            ),
            _Flag(
                "worker_stall_secs",
                "Seconds without contact from a worker after which a transport failure "
                "leaves it out of routing until it answers again",
            ),
        ),
    ),
    (
        "Health Checks",
        (
            _Flag(
                "health_failure_threshold",
                "Consecutive failed checks before a worker is unhealthy (at least 1)",
            ),
            _Flag(
                "health_success_threshold",
                "Consecutive good checks before a worker is healthy (at least 1)",
            ),
            _Flag("health_check_timeout_secs", "Health check timeout in seconds (at least 1)"),
            _Flag(
                "health_check_interval_secs",
                "Seconds between runtime health checks (at least 1)",
            ),
            _Flag("health_check_endpoint", "Health check endpoint path"),
            _Flag("disable_health_check", "Disable all worker health checks"),
        ),
    ),
    (
        "Models and Tokenizer",
        (
            _Flag(
                "model_alias",
                "Extra client-facing model name, <alias>=<canonical>; repeat for more",
            ),
            _Flag(
                "model_path",
                "Model path or HuggingFace id for the tokenizer",
                aliases=("--model",),
                metavar="MODEL_PATH",
            ),
            _Flag("tokenizer_path", "Explicit tokenizer path (overrides --model-path)"),
            _Flag("chat_template", "Chat template path"),
            _Flag("disable_tokenizer_autoload", "Do not load a tokenizer at start-up"),
            _Flag(
                "tokenizer_cache_enable_l0",
                "Enable the L0 tokenizer cache (whole-string exact match)",
            ),
            _Flag("tokenizer_cache_l0_max_entries", "Maximum entries in the L0 tokenizer cache"),
            _Flag(
                "tokenizer_cache_l0_max_memory",
                "Maximum memory of the L0 tokenizer cache in bytes (texts, ids, overhead)",
            ),
            _Flag(
                "tokenizer_cache_enable_l1",
                "Enable the L1 tokenizer cache (prefix matching)",
            ),
            _Flag(
                "tokenizer_cache_l1_max_memory", "Maximum memory of the L1 tokenizer cache in bytes"
            ),
            _Flag("backend", "Backend runtime the workers run"),
            _Flag(
                "tool_call_parser",
                "Tool-call parser for gRPC workers (a worker's `tool_call_parser` label "
                "overrides it); unset: chosen from the model's name",
            ),
            _Flag(
                "reasoning_parser",
                "Reasoning parser for gRPC workers (a worker's `reasoning_parser` label "
                "overrides it); unset: chosen from the model's name",
            ),
            _Flag(
                "mcp_config_path",
                "Path to MCP (Model Context Protocol) server configuration file (YAML, the Rust "
                "SMG 1.13's format); checked at start, servers connected on first use in each "
                "data-plane process",
            ),
        ),
    ),
    (
        "Logging and Metrics",
        (
            _Flag("log_level", "Logging level"),
            _Flag("log_json", "Output logs in JSON format"),
            _Flag("log_dir", "Directory for log files; unset logs to the console only"),
            _Flag("prometheus_port", "Port for Prometheus metrics; 0 lets the OS pick one"),
            _Flag(
                "prometheus_host",
                "Host for the metrics server; unset = --host when it is a loopback address, "
                "else the unspecified address of --host's family",
            ),
        ),
    ),
    (
        "Authentication",
        (
            _Flag(
                "api_key",
                "Key clients must present on the serving and admin routes (Authorization: "
                "Bearer, or x-api-key); also sent to workers that have no key of their own",
            ),
            _Flag(
                "tenant_api_key",
                "Per-tenant key for the serving routes, TENANT_ID:KEY, repeatable (never opens "
                "the admin routes, never sent to workers)",
                metavar="TENANT_ID:KEY",
            ),
            _Flag(
                "trust_tenant_header",
                "Take the tenant of a request without a gateway key from --tenant-header-name "
                "(stored conversations and responses are scoped to their tenant)",
            ),
            _Flag("tenant_header_name", "The tenant header read with --trust-tenant-header"),
            _Flag(
                "control_plane_api_keys",
                "Keys for the admin routes, ID:NAME:ROLE:KEY with ROLE admin (may change "
                "workers) or user (may only read; changes get 403)",
                metavar="ID:NAME:ROLE:KEY",
            ),
            _Flag(
                "control_plane_audit_enabled",
                "Log one structured line per admin-route call (who, what, outcome)",
            ),
            _Flag("jwt_issuer", "OIDC issuer whose JWT bearer tokens open the admin routes"),
            _Flag("jwt_audience", "Audience the JWT tokens must name"),
            _Flag(
                "jwt_jwks_uri",
                "JWKS URI; unset = discovered from the issuer's .well-known/openid-configuration",
            ),
            _Flag(
                "jwt_role_mapping",
                "IDP role or group to gateway role, IDP_ROLE=admin|user, repeatable",
                metavar="IDP_ROLE=ROLE",
            ),
        ),
    ),
    (
        "TLS/mTLS Security",
        (
            _Flag(
                "client_cert_path",
                "Client certificate (PEM) presented to https:// workers (mutual TLS)",
            ),
            _Flag("client_key_path", "Private key (PEM) of --client-cert-path"),
            _Flag(
                "ca_cert_paths",
                "CA certificates (PEM) that https:// workers' certificates must chain to; "
                "unset = the system's trust store",
            ),
            _Flag(
                "tls_cert_path",
                "Serve TLS (only TLS) on --port with this certificate chain (PEM); re-read "
                "on SIGHUP",
            ),
            _Flag("tls_key_path", "Private key (PEM) of --tls-cert-path"),
        ),
    ),
    (
        "Tracing (OpenTelemetry)",
        (
            _Flag("enable_trace", "Export OpenTelemetry spans for each request"),
            _Flag(
                "otlp_traces_endpoint",
                "OTLP collector: host:port for OTLP/gRPC, or an http(s):// URL for "
                "OTLP/HTTP (protobuf)",
            ),
        ),
    ),
    (
        "WASM plugins",
        (
            _Flag(
                "enable_wasm",
                "Run the WASM middleware modules added with POST /wasm (OnRequest and "
                "OnResponse) on the serving routes",
            ),
        ),
    ),
    (
        "History Storage (Responses and Conversations)",
        (
            _Flag(
                "history_backend",
                "Where responses and conversations are stored: memory (one store in the "
                "supervisor, shared by every data-plane process, lost on restart), redis, "
                "postgres, or none (the Conversations API answers 501). oracle is refused: "
                "smg has no Oracle backend",
            ),
            _Flag(
                "history_memory_max_responses",
                "Most stored responses the memory backend keeps; the oldest go first, on "
                "every write",
            ),
            _Flag(
                "history_memory_max_items",
                "Most conversation items the memory backend keeps; the oldest go first and "
                "leave the conversation that listed them",
            ),
            _Flag(
                "history_memory_retention_secs",
                "Seconds the memory backend keeps a response after it was stored and a "
                "conversation (with its items) after its last use; 0 keeps them until a "
                "count bound drops them",
            ),
            _Flag("redis_url", "Redis URL for --history-backend redis (redis:// or rediss://)"),
            _Flag("redis_pool_max", "Most Redis connections per data-plane process"),
            _Flag(
                "redis_retention_days",
                "Days Redis keeps a record (at least 1; -1 keeps it for good)",
            ),
            _Flag(
                "redis_op_timeout_secs",
                "Bound in seconds on each Redis call (pool wait, connect, command); a call "
                "past it is answered 503 storage_unavailable",
            ),
            _Flag(
                "postgres_db_url",
                "PostgreSQL URL for --history-backend postgres (postgresql://...)",
            ),
            _Flag("postgres_pool_max", "Most PostgreSQL connections per data-plane process"),
            _Flag(
                "postgres_op_timeout_secs",
                "Bound in seconds on each PostgreSQL call (pool wait, connect, statement); a "
                "call past it is answered 503 storage_unavailable",
            ),
        ),
    ),
    (
        "smg only (see docs/flags.md)",
        (
            _Flag(
                "config",
                "Read settings from a YAML (.yaml/.yml) or TOML (.toml) file; "
                "environment variables and flags override it",
                metavar="FILE",
            ),
            _Flag(
                "print_config",
                "Print the effective configuration (secrets masked) and exit",
            ),
            _Flag(
                "processes",
                "Data-plane processes; unset = usable CPUs (affinity and cgroup quota, "
                f"at most {PROCESS_CAP})",
                metavar="N",
            ),
            _Flag("listen_mode", "How data-plane processes share the listening port"),
            _Flag(
                "worker_table_capacity",
                "Slots in the shared worker table (workers the gateway can hold)",
            ),
            _Flag(
                "upstream_connect_timeout_secs",
                "Timeout in seconds to open a connection to a worker",
            ),
            _Flag(
                "dataplane_heartbeat_timeout_secs",
                "A data-plane process whose event loop has not beaten for this long has its "
                "stack dumped to the log and is replaced",
            ),
            _Flag(
                "upstream_pool_max_per_worker",
                "Maximum keep-alive connections per worker in each data-plane process",
            ),
            _Flag("mock_workers", "Start N mock workers and route to them (0 = none)", metavar="N"),
            _Flag("mock_worker_engine", "Which engine the mock workers imitate"),
            _Flag(
                "mock_worker_args",
                "Extra arguments passed through to the mock workers (one shell-quoted string)",
                metavar="ARGS",
            ),
            _Flag(
                "access_log",
                "Log one line per answered request (method, path, status, worker, duration, "
                "request id)",
            ),
            _Flag(
                "log_max_bytes",
                "With --log-dir: a process's log file is rotated once it reaches this size "
                "(0 = never)",
                metavar="BYTES",
            ),
            _Flag(
                "log_backup_count",
                "With --log-dir: rotated files kept per process (<file>.1 ... <file>.N; 0 = "
                "the file is truncated instead)",
                metavar="N",
            ),
            _Flag(
                "mcp_tool_timeout_secs",
                "Bound in seconds on one MCP tool call (connecting included); a call past it "
                "becomes the mcp_call's error and the response goes on. The Rust SMG 1.13 has "
                "no such bound",
            ),
        ),
    ),
    (
        "Service Discovery",
        (
            _Flag(
                "service_discovery",
                "Enable Kubernetes service discovery (the legacy spelling of "
                "--discovery-provider kubernetes)",
            ),
            _Flag(
                "discovery_provider",
                "Worker discovery provider. Give this or --service-discovery, not both",
            ),
            _Flag(
                "discovery_file",
                "JSON manifest listing the workers, for --discovery-provider file "
                '({"version": 1, "workers": [...]}, docs/flags.md). It may be created '
                "after startup",
            ),
            _Flag(
                "discovery_check_interval_secs",
                "Seconds between periodic rereads of the --discovery-file manifest, which is "
                "also reread as soon as it changes (unset: 30)",
            ),
            _Flag(
                "selector",
                "Label selector for Kubernetes service discovery (format: key1=value1 key2=value2)",
            ),
            _Flag("service_discovery_port", "Port to use for discovered worker pods"),
            _Flag(
                "service_discovery_namespace",
                "Kubernetes namespace to watch for pods (unset: all namespaces, which needs "
                "cluster-wide permissions)",
            ),
            _Flag(
                "kv_connector_annotation",
                "vLLM KV connector Pod annotation (smg reads no KV connector: only the "
                "default is accepted)",
            ),
            _Flag(
                "kv_engine_id_annotation",
                "Per-worker KV engine ID Pod annotation (smg reads none: only the default "
                "is accepted)",
            ),
            _Flag(
                "encode_selector",
                "Label selector for encode server pods in EPD mode (refused: smg has no EPD mode)",
            ),
            _Flag("prefill_selector", "Label selector for prefill server pods in PD mode"),
            _Flag("decode_selector", "Label selector for decode server pods in PD mode"),
            _Flag(
                "router_selector",
                "Label selector for router pod discovery in HA mesh mode (refused: smg has no "
                "mesh)",
            ),
            _Flag(
                "model_id_from",
                "Override each worker's model ID from pod metadata: namespace, "
                "label:<key> or annotation:<key>",
            ),
        ),
    ),
)

# --service-discovery and --discovery-provider exclude each other on the command line (as
# in the Rust SMG 1.13's argparse); validate_config refuses the pair from any other layer.
_DISCOVERY_EXCLUSIVE = frozenset({"service_discovery", "discovery_provider"})

# Every option string that sets remove_unhealthy_workers, with the value it stores.
_REMOVE_UNHEALTHY_FLAGS: tuple[tuple[str, bool], ...] = (
    ("--remove-unhealthy-workers", True),
    ("--no-remove-unhealthy-workers", False),
    ("--worker-auto-recovery", True),
    ("--no-worker-auto-recovery", False),
)


_REMOVE_UNHEALTHY_HELP: dict[str, str] = {
    "--remove-unhealthy-workers": "Remove workers from the registry once they are unhealthy "
    f"(default: {DEFAULTS['remove_unhealthy_workers']}, which is off without service "
    "discovery)",
    "--no-remove-unhealthy-workers": "Keep unhealthy workers registered",
    "--worker-auto-recovery": "Same as --remove-unhealthy-workers (the Rust SMG's newer name)",
    "--no-worker-auto-recovery": "Same as --no-remove-unhealthy-workers",
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting on a bad command line."""

    def error(self, message: str) -> typing.NoReturn:
        m = re.match(r"argument (--[\w-]+)(?:/[-\w/]+)?: (.*)", message, re.S)
        if m:
            flag = m.group(1)
            raise ConfigError(_dest_of(self, flag), m.group(2), f"flag {flag}")
        m = re.match(r"unrecognized arguments: (.*)", message, re.S)
        if m:
            first = m.group(1).split()[0]
            raise ConfigError(first, "unknown flag (see smg launch --help)", "command line")
        raise ConfigError("command line", message)


def _dest_of(parser: argparse.ArgumentParser, flag: str) -> str:
    for action in parser._actions:
        if flag in action.option_strings:
            return action.dest
    return flag


def _default_text(value: Any) -> str:
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The `smg launch` argument parser. Defaults are SUPPRESS: only given flags appear."""
    parser = _Parser(
        prog="smg launch",
        description="Start the smg gateway (supervisor and data-plane processes).",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for title, flags in _GROUPS:
        group = parser.add_argument_group(title)
        exclusive = None
        for flag in flags:
            if flag.field in _DISCOVERY_EXCLUSIVE:
                exclusive = exclusive or group.add_mutually_exclusive_group()
                _add_flag(exclusive, flag)
            else:
                _add_flag(group, flag)
        if title == "Health Checks":
            excl = group.add_mutually_exclusive_group()
            for opt, value in _REMOVE_UNHEALTHY_FLAGS:
                help_text = _REMOVE_UNHEALTHY_HELP[opt]
                excl.add_argument(
                    opt,
                    dest="remove_unhealthy_workers",
                    action="store_const",
                    const=value,
                    help=help_text,
                )
    return parser


def _add_flag(group: Any, flag: _Flag) -> None:
    field = flag.field
    names = (_flag_name(field), *flag.aliases)
    default = DEFAULTS[field]
    choices = CHOICES.get(field)
    help_text = f"{flag.help} (default: {_default_text(default)})"
    base, _ = _unwrap(_FIELD_TYPES[field])
    if base is bool:
        group.add_argument(*names, dest=field, action="store_const", const="true", help=help_text)
        return
    metavar = flag.metavar or ("{" + ",".join(choices) + "}" if choices else field.upper())
    if field == "prefill":
        # As 1.13: --prefill URL [BOOTSTRAP_PORT], repeatable (one list per flag).
        group.add_argument(
            *names, dest=field, nargs="+", action="append", metavar=metavar, help=help_text
        )
    elif field in ("model_alias", "tenant_api_key", "decode"):
        group.add_argument(*names, dest=field, action="append", metavar=metavar, help=help_text)
    elif _is_list(field):
        group.add_argument(
            *names, dest=field, nargs="*", action="extend", metavar=metavar, help=help_text
        )
    else:
        group.add_argument(*names, dest=field, metavar=metavar, help=help_text)


# ---------------------------------------------------------------------------------------
# Validation

_Check = Callable[[Any], "str | None"]


def _range(lo: float | None = None, hi: float | None = None, *, gt: bool = False) -> _Check:
    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if lo is not None and (v <= lo if gt else v < lo):
            bound = f"> {lo}" if gt else f">= {lo}"
            return f"must be {bound}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None

    return check


def _port(*, allow_zero: bool) -> _Check:
    lo = 0 if allow_zero else 1

    def check(v: int) -> str | None:
        if not lo <= v <= 65535:
            return f"must be a port number {lo}-65535, got {v}"
        return None

    return check


def _host(v: str) -> str | None:
    return None if valid_host(v) else f"must be an IP address or hostname, got {v!r}"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _header_value(v: str) -> str | None:
    # The value goes into an Authorization header: a CR/LF would inject headers.
    if not v or v != v.strip() or not all(0x21 <= ord(c) <= 0x7E for c in v):
        return "must be non-empty visible ASCII without surrounding whitespace"
    return None


_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _header_names(v: list[str]) -> str | None:
    for name in v:
        if not _TOKEN_RE.match(name):
            return f"{name!r} is not a valid HTTP header name"
    return None


def _tenant_keys(v: list[str]) -> str | None:
    tenants: set[str] = set()
    keys: set[str] = set()
    for item in v:
        tenant, sep, key = item.partition(":")
        if not sep or not tenant or not key:
            return "each entry must be TENANT_ID:KEY with both parts non-empty"
        if _header_value(key) is not None:
            return f"the key of tenant {tenant!r} must be visible ASCII without whitespace"
        if tenant in tenants:
            return f"tenant {tenant!r} is given twice"
        if key in keys:
            return f"the key of tenant {tenant!r} is also another tenant's"
        tenants.add(tenant)
        keys.add(key)
    return None


ROLES: tuple[str, ...] = ("admin", "user")


class ControlPlaneKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: str  # one of ROLES
    key: str


def _split_control_plane_key(item: str) -> ControlPlaneKey | None:
    # ID:NAME:ROLE:KEY; the key is the rest, so it may itself contain ':'.
    parts = item.split(":", 3)
    if len(parts) != 4 or not all(parts):
        return None
    return ControlPlaneKey(*parts)


def _control_plane_keys(v: list[str]) -> str | None:
    ids: set[str] = set()
    keys: set[str] = set()
    for item in v:
        entry = _split_control_plane_key(item)
        if entry is None:
            return "each entry must be ID:NAME:ROLE:KEY with every part non-empty"
        if entry.role not in ROLES:
            return f"the role of key {entry.id!r} must be admin or user, got {entry.role!r}"
        if _header_value(entry.key) is not None:
            return f"key {entry.id!r} must be visible ASCII without whitespace"
        if entry.id in ids:
            return f"key id {entry.id!r} is given twice"
        if entry.key in keys:
            return f"the key of {entry.id!r} is also another entry's"
        ids.add(entry.id)
        keys.add(entry.key)
    return None


def control_plane_keys(cfg: GatewayConfig) -> list[ControlPlaneKey]:
    """`--control-plane-api-keys` entries (validated by load_config)."""
    return [
        entry
        for entry in map(_split_control_plane_key, cfg.control_plane_api_keys)
        if entry is not None
    ]


def _role_mapping(v: list[str]) -> str | None:
    for item in v:
        idp_role, sep, role = item.partition("=")
        if not sep or not idp_role or role not in ROLES:
            return f"each entry must be IDP_ROLE=admin or IDP_ROLE=user, got {item!r}"
    return None


def jwt_role_mapping(cfg: GatewayConfig) -> dict[str, str]:
    """`--jwt-role-mapping` as {idp role: gateway role} (validated by load_config)."""
    return {idp: role for idp, _, role in (item.partition("=") for item in cfg.jwt_role_mapping)}


def _http_url(v: str) -> str | None:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s):// URL, got {v!r}"
    return None


def _otlp_endpoint(v: str) -> str | None:
    if "://" in v:
        return _http_url(v)
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be host:port (OTLP/gRPC) or an http(s):// URL (OTLP/HTTP), got {v!r}"
    return None


def _readable_file(v: str) -> str | None:
    if not v.strip():
        return "must not be empty"
    if not os.path.isfile(v):
        return f"{v!r} is not a file"
    if not os.access(v, os.R_OK):
        return f"{v!r} is not readable"
    return None


def _readable_files(v: list[str]) -> str | None:
    for path in v:
        reason = _readable_file(path)
        if reason:
            return reason
    return None


def tenant_keys(cfg: GatewayConfig) -> dict[str, str]:
    """`--tenant-api-key` entries as {key: tenant id} (validated by load_config)."""
    return {key: tenant for tenant, _, key in (item.partition(":") for item in cfg.tenant_api_key)}


def _endpoint(v: str) -> str | None:
    if not v.startswith("/") or any(c.isspace() for c in v):
        return f"must be a path starting with '/', got {v!r}"
    return None


def _origins(v: list[str]) -> str | None:
    if "*" in v:
        return None if v == ["*"] else "'*' must be the only origin when given"
    for origin in v:
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            return f"{origin!r} is not an origin (scheme://host[:port])"
    return None


def _shell_words(v: str) -> str | None:
    try:
        shlex.split(v)
    except ValueError as exc:
        return f"cannot be split into arguments: {exc}"
    return None


def _db_url(*schemes: str) -> _Check:
    def check(v: str) -> str | None:
        scheme = urlsplit(v).scheme.lower()
        if scheme not in schemes:
            return f"must be a {' or '.join(s + '://' for s in schemes)} URL, got {mask_url(v)!r}"
        return None

    return check


def _retention_days(v: int) -> str | None:
    if v == -1 or v >= 1:
        return None
    return f"must be at least 1, or -1 to keep records for good, got {v}"


def mask_url(url: str) -> str:
    """A database URL with its password masked (`redis://:***@host`), for logs and
    `--print-config`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _choice(field: str) -> _Check:
    def check(v: str) -> str | None:
        if v not in CHOICES[field]:
            return f"must be one of {', '.join(CHOICES[field])}, got {v!r}"
        return None

    return check


def _selector(v: list[str]) -> str | None:
    # One argv item may hold several space-separated pairs (as the Rust SMG's launcher
    # takes them); a token without `=` is refused here (1.13's launcher drops it silently).
    for item in v:
        for token in item.split():
            key, sep, _value = token.partition("=")
            if not sep or not key:
                return f"{token!r} is not key=value"
    return None


def _model_id_from(v: str) -> str | None:
    kind, sep, key = v.partition(":")
    if (v == "namespace") or (sep and kind in ("label", "annotation") and key):
        return None
    return (
        f"Invalid model-id-from value {v!r}. Expected: namespace, label:<key>, or annotation:<key>"
    )


_CHECKS: dict[str, tuple[_Check, ...]] = {
    "host": (_host,),
    "port": (_port(allow_zero=True),),
    "upstream_pool_idle_timeout_secs": (_range(0),),
    "health_check_port": (_port(allow_zero=False),),
    "policy": (_choice("policy"),),
    "prefill_policy": (_choice("prefill_policy"),),
    "decode_policy": (_choice("decode_policy"),),
    "prefill_queue_size": (_range(0),),
    "prefill_queue_timeout_secs": (_range(0),),
    "pd_admission_wait_secs": (_range(0),),
    "power_of_two_load_metric": (_choice("power_of_two_load_metric"),),
    "least_load_kv_pressure_weight": (_range(0.0),),
    "least_load_default_throughput": (_range(0.0, gt=True),),
    "least_load_mean_prefill_tokens": (_range(0, gt=True),),
    "least_load_max_waiting_requests": (_range(0),),
    "max_payload_size": (_range(0, gt=True),),
    "cache_threshold": (_range(0.0, 1.0),),
    "balance_abs_threshold": (_range(0),),
    "balance_rel_threshold": (_range(1.0),),
    "balance_token_usage_threshold": (_range(0.0, gt=True),),
    "overload_token_usage_threshold": (_range(0.0, gt=True),),
    "eviction_interval_secs": (_range(0, gt=True),),
    "max_tree_size": (_range(0, gt=True),),
    "prefix_token_count": (_range(0, gt=True),),
    "prefix_hash_load_factor": (_range(1.0),),
    "prefix_hash_balance_abs_threshold": (_range(0),),
    "routing_key_headers": (_header_names,),
    "assignment_mode": (_choice("assignment_mode"),),
    "max_idle_secs": (_range(0, gt=True),),
    "worker_startup_timeout_secs": (_range(0, gt=True),),
    "worker_startup_check_interval": (_range(0, gt=True),),
    "load_monitor_interval": (_range(0, gt=True),),
    "request_timeout_secs": (_range(0, gt=True),),
    "shutdown_grace_period_secs": (_range(0),),
    "header_read_timeout_secs": (_range(0),),
    "idle_connection_timeout_secs": (_range(0),),
    "stream_body_stall_timeout_secs": (_range(0),),
    "request_id_headers": (_header_names,),
    "cors_allowed_origins": (_origins,),
    "max_concurrent_requests": (_range(-1),),
    "queue_size": (_range(0),),
    "queue_timeout_secs": (_range(0),),
    "rate_limit_tokens_per_second": (_range(0),),
    "sse_keepalive_secs": (_range(0),),
    "max_buffered_request_bytes": (_range(0),),
    "retry_max_retries": (_range(1),),
    "retry_initial_backoff_ms": (_range(0),),
    "retry_max_backoff_ms": (_range(0),),
    "retry_backoff_multiplier": (_range(1.0),),
    "retry_jitter_factor": (_range(0.0, 1.0),),
    "cb_failure_threshold": (_range(1),),
    "cb_success_threshold": (_range(1),),
    "cb_timeout_duration_secs": (_range(0, gt=True),),
    "cb_window_duration_secs": (_range(0, gt=True),),
    "worker_overload_waiting_requests": (_range(1),),
    "worker_overload_token_usage": (_range(0.0, 1.0, gt=True),),
    "worker_stall_secs": (_range(0),),
    "dataplane_heartbeat_timeout_secs": (_range(0.0, gt=True),),
    "health_failure_threshold": (_range(1),),
    "health_success_threshold": (_range(1),),
    "health_check_timeout_secs": (_range(1),),
    "health_check_interval_secs": (_range(1),),
    "health_check_endpoint": (_endpoint,),
    "model_path": (_nonempty,),
    "tokenizer_path": (_nonempty,),
    "chat_template": (_nonempty,),
    "tokenizer_cache_l0_max_entries": (_range(1),),
    "tokenizer_cache_l0_max_memory": (_range(1),),
    "tokenizer_cache_l1_max_memory": (_range(1),),
    "backend": (_choice("backend"),),
    "tool_call_parser": (_choice("tool_call_parser"),),
    "reasoning_parser": (_choice("reasoning_parser"),),
    "log_level": (_choice("log_level"),),
    "log_dir": (_nonempty,),
    "prometheus_port": (_port(allow_zero=True),),
    "prometheus_host": (_host,),
    "api_key": (_header_value,),
    "tenant_api_key": (_tenant_keys,),
    "control_plane_api_keys": (_control_plane_keys,),
    "jwt_issuer": (_http_url,),
    "jwt_audience": (_nonempty,),
    "jwt_jwks_uri": (_http_url,),
    "jwt_role_mapping": (_role_mapping,),
    "tls_cert_path": (_readable_file,),
    "tls_key_path": (_readable_file,),
    "client_cert_path": (_readable_file,),
    "client_key_path": (_readable_file,),
    "ca_cert_paths": (_readable_files,),
    "otlp_traces_endpoint": (_otlp_endpoint,),
    "config": (_nonempty,),
    "processes": (_range(1, _MAX_EXPLICIT_PROCESSES),),
    "listen_mode": (_choice("listen_mode"),),
    "worker_table_capacity": (_range(1, _MAX_WORKER_TABLE_CAPACITY),),
    "upstream_connect_timeout_secs": (_range(0.0, gt=True),),
    "upstream_pool_max_per_worker": (_range(1),),
    "mock_workers": (_range(0, _MAX_MOCK_WORKERS),),
    "mock_worker_engine": (_choice("mock_worker_engine"),),
    "mock_worker_args": (_shell_words,),
    "log_max_bytes": (_range(0),),
    "log_backup_count": (_range(0, 1000),),
    "mcp_config_path": (_nonempty,),
    "mcp_tool_timeout_secs": (_range(0.0, gt=True),),
    "discovery_provider": (_choice("discovery_provider"),),
    "discovery_file": (_nonempty,),
    "discovery_check_interval_secs": (_range(0, gt=True),),
    "selector": (_selector,),
    "service_discovery_port": (_port(allow_zero=False),),
    "service_discovery_namespace": (_nonempty,),
    "kv_connector_annotation": (_nonempty,),
    "kv_engine_id_annotation": (_nonempty,),
    "encode_selector": (_selector,),
    "prefill_selector": (_selector,),
    "decode_selector": (_selector,),
    "router_selector": (_selector,),
    "model_id_from": (_model_id_from,),
    "history_backend": (_choice("history_backend"),),
    "history_memory_max_responses": (_range(1),),
    "history_memory_max_items": (_range(1),),
    "history_memory_retention_secs": (_range(0),),
    "redis_url": (_db_url("redis", "rediss", "unix"),),
    "redis_pool_max": (_range(1),),
    "redis_retention_days": (_retention_days,),
    "redis_op_timeout_secs": (_range(0.0, gt=True),),
    "postgres_db_url": (_db_url("postgres", "postgresql"),),
    "postgres_pool_max": (_range(1),),
    "postgres_op_timeout_secs": (_range(0.0, gt=True),),
}


def _parse_aliases(entries: list[str], source: str | None) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for item in entries:
        alias, sep, canonical = item.partition("=")
        if not sep:
            raise ConfigError("model_alias", f"{item!r} is not <alias>=<canonical>", source)
        if not alias or not canonical:
            raise ConfigError(
                "model_alias", f"{item!r}: alias and canonical model must be non-empty", source
            )
        if alias == canonical:
            raise ConfigError(
                "model_alias", f"{item!r}: alias must differ from the canonical model", source
            )
        previous = aliases.get(alias)
        if previous is not None and previous != canonical:
            raise ConfigError(
                "model_alias",
                f"alias {alias!r} maps to both {previous!r} and {canonical!r}",
                source,
            )
        aliases[alias] = canonical
    return aliases


def model_aliases(cfg: GatewayConfig) -> dict[str, str]:
    """`--model-alias` entries as {alias: canonical} (validated by load_config)."""
    return _parse_aliases(cfg.model_alias, None)


def validate_config(cfg: GatewayConfig, sources: Mapping[str, str] | None = None) -> GatewayConfig:
    """Check every field and cross-field rule; return `cfg` with worker URLs normalised.

    `sources` maps a field to the layer that set it, for the error message.
    """
    src = dict(sources or {})
    for field, checks in _CHECKS.items():
        value = getattr(cfg, field)
        if value is None:
            continue
        for check in checks:
            reason = check(value)
            if reason:
                raise ConfigError(field, reason, src.get(field))

    cfg = _check_pd(cfg, src)
    if cfg.policy not in IMPLEMENTED_POLICIES:
        raise ConfigError(
            "policy",
            f"{cfg.policy!r} is not implemented yet in smg "
            f"(implemented: {', '.join(IMPLEMENTED_POLICIES)})",
            src.get("policy"),
        )
    _check_history(cfg, src)
    _check_discovery(cfg, src)
    if cfg.queue_size > 0 and cfg.queue_timeout_secs == 0:
        raise ConfigError(
            "queue_timeout_secs", "must be > 0 when queue_size > 0", src.get("queue_timeout_secs")
        )
    _parse_aliases(cfg.model_alias, src.get("model_alias"))
    for first, second in (
        ("tls_cert_path", "tls_key_path"),
        ("client_cert_path", "client_key_path"),
    ):
        if (getattr(cfg, first) is None) != (getattr(cfg, second) is None):
            given, missing = (first, second) if getattr(cfg, first) else (second, first)
            raise ConfigError(given, f"needs {_flag_name(missing)} too", src.get(given))
    if cfg.jwt_issuer is None:
        for field in ("jwt_audience", "jwt_jwks_uri", "jwt_role_mapping"):
            if getattr(cfg, field):
                raise ConfigError(field, "has no effect without --jwt-issuer", src.get(field))
    elif not cfg.jwt_audience:
        # As the Rust SMG 1.13: half a JWT configuration would leave JWT auth silently off.
        raise ConfigError("jwt_issuer", "needs --jwt-audience too", src.get("jwt_issuer"))

    urls: list[str] = []
    seen: set[str] = set()
    for url in cfg.worker_urls:
        norm = normalize_worker_url(url, "worker_urls", src.get("worker_urls"))
        if norm in seen:
            raise ConfigError("worker_urls", f"{norm!r} is listed twice", src.get("worker_urls"))
        seen.add(norm)
        urls.append(norm)
    pd_count = len(cfg.prefill or ()) + len(cfg.decode or ())
    mocks = cfg.mock_workers * (2 if cfg.pd_disaggregation else 1)  # PD: prefill + decode
    if len(urls) + pd_count + mocks > cfg.worker_table_capacity:
        raise ConfigError(
            "worker_table_capacity",
            f"{cfg.worker_table_capacity} slots cannot hold {len(urls) + pd_count} worker URLs "
            f"and {mocks} mock workers",
            src.get("worker_table_capacity"),
        )

    for other in ("prometheus_port", "health_check_port"):
        value = getattr(cfg, other)
        if value and value == cfg.port:
            raise ConfigError(other, f"must differ from port ({cfg.port})", src.get(other))
    if cfg.health_check_port is not None and cfg.health_check_port == cfg.prometheus_port:
        raise ConfigError(
            "health_check_port",
            f"must differ from prometheus_port ({cfg.prometheus_port})",
            src.get("health_check_port"),
        )
    return msgspec.structs.replace(cfg, worker_urls=urls)


# Settings only PD mode reads: given without --pd-disaggregation they would do nothing.
_PD_WORKER_FIELDS = ("prefill", "decode")
DEFAULT_PREFILL_QUEUE_SIZE = 100
DEFAULT_PREFILL_QUEUE_TIMEOUT_SECS = 60


class PdWorker(msgspec.Struct, frozen=True):
    """One --prefill or --decode entry, URL normalised."""

    url: str
    worker_type: str  # "prefill" or "decode"
    bootstrap_port: int | None = None


def _bootstrap_port(text: str) -> int | None:
    """1.13's --prefill port: a number or 'none' (any case); ValueError otherwise."""
    if text.lower() == "none":
        return None
    try:
        port = int(text, 10)
    except ValueError:
        raise ValueError(f"invalid bootstrap port {text!r}: a number or 'none'") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"bootstrap port must be 1-65535, got {port}")
    return port


def pd_workers(cfg: GatewayConfig) -> list[PdWorker]:
    """The --prefill and --decode workers, prefill first, in command-line order (as
    validated by load_config)."""
    out = [
        PdWorker(entry[0], "prefill", _bootstrap_port(entry[1]) if len(entry) > 1 else None)
        for entry in cfg.prefill or ()
    ]
    out.extend(PdWorker(url, "decode") for url in cfg.decode or ())
    return out


def prefill_admission(cfg: GatewayConfig) -> tuple[int, int, int] | None:
    """(per-worker in-flight limit, queue size, queue timeout secs) of prefill admission, or
    None when it is off (--prefill-max-inflight-requests-per-worker <= 0). Unset queue
    settings take 1.13's defaults (100 and 60) when admission is on."""
    limit = cfg.prefill_max_inflight_requests_per_worker
    if limit <= 0:
        return None
    size = cfg.prefill_queue_size
    timeout = cfg.prefill_queue_timeout_secs
    return (
        limit,
        DEFAULT_PREFILL_QUEUE_SIZE if size is None else size,
        DEFAULT_PREFILL_QUEUE_TIMEOUT_SECS if timeout is None else timeout,
    )


def _check_pd(cfg: GatewayConfig, src: Mapping[str, str]) -> GatewayConfig:
    """PD rules (1.13's refusals, and refusals where 1.13 silently ignores a setting);
    returns `cfg` with the --prefill/--decode URLs normalised."""
    if cfg.epd_disaggregation:
        raise ConfigError(
            "epd_disaggregation",
            "EPD (encode-prefill-decode) disaggregation is not supported by smg "
            "(use --pd-disaggregation)",
            src.get("epd_disaggregation"),
        )
    for field, implemented in (
        ("prefill_policy", PREFILL_POLICY_NAMES),
        ("decode_policy", IMPLEMENTED_POLICIES),
    ):
        name = getattr(cfg, field)
        if name is not None and name not in implemented:
            raise ConfigError(
                field,
                f"{name!r} is not implemented yet in smg (implemented: {', '.join(implemented)})",
                src.get(field),
            )
    if cfg.prefill_policy == "bucket" and cfg.bucket_adjust_interval_secs < 1:
        # As 1.13: checked only when the bucket policy is used.
        raise ConfigError(
            "bucket_adjust_interval_secs",
            f"must be >= 1 with the bucket policy, got {cfg.bucket_adjust_interval_secs}",
            src.get("bucket_adjust_interval_secs"),
        )
    if cfg.prefill_max_inflight_requests_per_worker <= 0:
        for field in ("prefill_queue_size", "prefill_queue_timeout_secs"):
            if getattr(cfg, field) is not None:
                raise ConfigError(  # 1.13's refusal, word for word
                    field,
                    "Prefill queue options require --prefill-max-inflight-requests-per-worker "
                    "to be positive",
                    src.get(field),
                )
    admission = prefill_admission(cfg)
    if admission is not None and admission[1] > 0 and admission[2] == 0:
        raise ConfigError(  # 1.13's refusal
            "prefill_queue_timeout_secs",
            "must be > 0 when the prefill queue is enabled (1.13: Must be > 0 when the Prefill queue is enabled)",
            src.get("prefill_queue_timeout_secs"),
        )
    if not cfg.pd_disaggregation:
        for field in _PD_WORKER_FIELDS:
            if getattr(cfg, field):
                raise ConfigError(  # 1.13 starts and ignores them
                    field, "needs --pd-disaggregation", src.get(field)
                )
        return cfg
    for field, why in (
        ("worker_urls", "give PD workers with --prefill and --decode"),
        ("enable_igw", "PD with IGW (multi-model) routing is not implemented yet in smg"),
    ):
        if getattr(cfg, field):
            raise ConfigError(
                field, f"cannot be combined with --pd-disaggregation ({why})", src.get(field)
            )
    if cfg.mock_workers and cfg.mock_worker_engine != "sglang":
        raise ConfigError(  # the HTTP PD mocks are SGLang's (bootstrap rooms)
            "mock_worker_engine",
            "PD mock workers (--pd-disaggregation --mock-workers) imitate SGLang only",
            src.get("mock_worker_engine"),
        )
    if cfg.backend in ("openai", "anthropic"):
        raise ConfigError(
            "backend",
            f"--pd-disaggregation needs self-hosted engines, not --backend {cfg.backend}",
            src.get("backend"),
        )
    seen: set[str] = set()
    prefill: list[list[str]] = []
    for entry in cfg.prefill or ():
        where = src.get("prefill")
        if not 1 <= len(entry) <= 2:
            raise ConfigError(
                "prefill", f"takes URL [BOOTSTRAP_PORT], got {' '.join(entry)!r}", where
            )
        url = normalize_worker_url(entry[0], "prefill", where)
        try:
            port = _bootstrap_port(entry[1]) if len(entry) > 1 else None
        except ValueError as exc:
            raise ConfigError("prefill", f"{url}: {exc}", where) from None
        if url in seen:
            raise ConfigError("prefill", f"{url!r} is listed twice", where)
        seen.add(url)
        prefill.append([url] if port is None else [url, str(port)])
    decode: list[str] = []
    for url in cfg.decode or ():
        norm = normalize_worker_url(url, "decode", src.get("decode"))
        if norm in seen:
            # 1.13 keeps the first and drops the other silently.
            raise ConfigError(
                "decode", f"{norm!r} is listed twice (a worker has one role)", src.get("decode")
            )
        seen.add(norm)
        decode.append(norm)
    for field, workers, role in (
        ("prefill_policy", prefill, "prefill"),
        ("decode_policy", decode, "decode"),
    ):
        # --mock-workers N adds N prefill and N decode mocks (smg.launch).
        if getattr(cfg, field) == "power_of_two" and len(workers) + cfg.mock_workers < 2:
            raise ConfigError(  # 1.13's refusal (unless discovery adds workers)
                field,
                f"Power-of-two policy for {role} requires at least 2 {role} workers",
                src.get(field),
            )
    return msgspec.structs.replace(
        cfg, prefill=prefill if cfg.prefill is not None else None, decode=decode or cfg.decode
    )


def _check_history(cfg: GatewayConfig, src: Mapping[str, str]) -> None:
    backend = cfg.history_backend
    if backend == "oracle":
        raise ConfigError(
            "history_backend",
            "oracle is not supported by smg (use memory, redis, postgres or none)",
            src.get("history_backend"),
        )
    for name, field in (("redis", "redis_url"), ("postgres", "postgres_db_url")):
        if backend == name and not getattr(cfg, field):
            raise ConfigError(
                "history_backend", f"{name} needs {_flag_name(field)}", src.get("history_backend")
            )


# ---------------------------------------------------------------------------------------
# Loading and rendering


def load_config(argv: list[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Parse `smg launch` arguments (without the `launch` word) into a validated config.

    `env` defaults to os.environ. `--help` prints the help and raises SystemExit(0).
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    parser = build_parser()
    namespace = parser.parse_args(list(argv))
    cli_layer: dict[str, tuple[Any, str]] = {}
    for field, raw in vars(namespace).items():
        src = f"flag {_flag_name(field)}"
        if field == "remove_unhealthy_workers":
            cli_layer[field] = (raw, "flag " + _remove_unhealthy_flag(argv, raw))
        elif isinstance(raw, list):
            cli_layer[field] = (_convert(field, raw, src), src)
        else:
            cli_layer[field] = (_from_text(field, raw, src), src)

    env_layer = _env_layer(environ)
    file_layer: dict[str, tuple[Any, str]] = {}
    config_entry = cli_layer.get("config") or env_layer.get("config")
    if config_entry is not None and config_entry[0] is not None:
        file_layer = _file_layer(config_entry[0], config_entry[1])

    values = dict(DEFAULTS)
    sources: dict[str, str] = {}
    for layer in (file_layer, env_layer, cli_layer):
        for field, (value, src) in layer.items():
            values[field] = value
            sources[field] = src
    cfg = GatewayConfig(**values)
    return validate_config(cfg, sources)


def _remove_unhealthy_flag(argv: list[str], value: bool) -> str:
    for opt, stored in _REMOVE_UNHEALTHY_FLAGS:
        if stored == value and opt in argv:
            return opt
    return "--remove-unhealthy-workers"


def render_config(cfg: GatewayConfig) -> str:
    """The effective configuration as YAML (keys = flag names), credentials masked.

    `config` and `print_config` are left out (as comments) so that the output is itself a
    valid `--config` file, apart from the masked values.
    """
    data: dict[str, Any] = {}
    for field in _FIELDS:
        if field in _NOT_RENDERED:
            continue
        value = getattr(cfg, field)
        if is_secret_key(field) and isinstance(value, str):
            value = mask_secret(value)
        elif field == "tenant_api_key":
            value = [
                f"{item.partition(':')[0]}:{mask_secret(item.partition(':')[2])}" for item in value
            ]
        elif field == "control_plane_api_keys":
            value = [
                f"{e.id}:{e.name}:{e.role}:{mask_secret(e.key)}"
                for e in map(_split_control_plane_key, value)
                if e is not None
            ]
        elif field == "mock_worker_args" and value:
            value = mask_secret_args(value)
        elif field in ("redis_url", "postgres_db_url") and value:
            value = mask_url(value)
        data[field.replace("_", "-")] = value
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    notes = ["# smg launch: effective configuration (credentials masked)"]
    if cfg.config is not None:
        notes.append(f"# read from config file: {cfg.config}")
    if cfg.processes is None:
        notes.append(
            f"# processes: null = default_processes() = {default_processes()} on this machine "
            f"(CPU affinity and cgroup quota, at most {PROCESS_CAP})"
        )
    return "\n".join(notes) + "\n" + text


_NOT_RENDERED = frozenset({"config", "print_config"})


# ---------------------------------------------------------------------------------------
# Service discovery (smg.discovery)

DISCOVERY_CHECK_INTERVAL_DEFAULT = 30  # seconds, when --discovery-check-interval-secs is unset


def discovery_provider(cfg: GatewayConfig) -> str | None:
    """The discovery provider by either spelling (`--service-discovery` is kubernetes)."""
    if cfg.discovery_provider is not None:
        return cfg.discovery_provider
    return "kubernetes" if cfg.service_discovery else None


def remove_unhealthy(cfg: GatewayConfig) -> bool:
    """--remove-unhealthy-workers, whose unset value follows discovery (as in 1.13:
    recovery by removal needs discovery to add the worker back)."""
    if cfg.remove_unhealthy_workers is not None:
        return cfg.remove_unhealthy_workers
    return discovery_provider(cfg) is not None


def selector_map(items: list[str] | None) -> dict[str, str]:
    """`key=value` selector entries (validated by load_config) as {key: value}."""
    out: dict[str, str] = {}
    for item in items or ():
        for token in item.split():
            key, _, value = token.partition("=")
            out[key] = value
    return out


def _check_discovery(cfg: GatewayConfig, src: Mapping[str, str]) -> None:
    if cfg.service_discovery and cfg.discovery_provider is not None:
        raise ConfigError(
            "discovery_provider",
            "not allowed with --service-discovery (give one or the other)",
            src.get("discovery_provider"),
        )
    provider = discovery_provider(cfg)
    for field in ("discovery_file", "discovery_check_interval_secs"):
        if getattr(cfg, field) is not None and provider != "file":
            raise ConfigError(
                field,
                "--discovery-file and --discovery-check-interval-secs apply only to "
                "--discovery-provider file",
                src.get(field),
            )
    if provider == "file" and not cfg.discovery_file:
        raise ConfigError(
            "discovery_provider", "file needs --discovery-file", src.get("discovery_provider")
        )
    for field, what in (("encode_selector", "EPD mode"), ("router_selector", "HA mesh mode")):
        if getattr(cfg, field):
            raise ConfigError(field, f"smg has no {what}", src.get(field))
    for field in ("kv_connector_annotation", "kv_engine_id_annotation"):
        if getattr(cfg, field) != DEFAULTS[field]:
            raise ConfigError(
                field,
                "smg reads no vLLM KV connector annotations (only the default is accepted)",
                src.get(field),
            )
    if provider != "kubernetes":
        return
    import importlib.util

    if importlib.util.find_spec("smg.discovery.kubernetes") is None:
        raise ConfigError(
            "discovery_provider",
            "kubernetes discovery is not in this build of smg",
            src.get("discovery_provider") or src.get("service_discovery"),
        )
    if getattr(cfg, "pd_disaggregation", False):
        if not (selector_map(cfg.prefill_selector) or selector_map(cfg.decode_selector)):
            raise ConfigError(
                "prefill_selector",
                "PD mode with service discovery requires at least one non-empty selector "
                "(prefill or decode)",
                src.get("service_discovery") or src.get("discovery_provider"),
            )
    elif not selector_map(cfg.selector):
        raise ConfigError(
            "selector",
            "Regular mode with service discovery requires a non-empty selector",
            src.get("service_discovery") or src.get("discovery_provider"),
        )
