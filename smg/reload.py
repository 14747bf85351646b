"""What a live reload (SIGHUP) may change, as pure code: old and new configuration in,
the configuration to run and what was kept out.

The supervisor re-reads the configuration (`load_config` on the same argv, the
`--config` file, the environment), and this module decides. Settings bound to things
created once at start-up (sockets, the shared table's size, the number of processes, the
mock workers, the log files) keep their running value and are reported; everything else
applies: data-plane processes are replaced one at a time with the new configuration and
the control plane takes it over IPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec

from smg.config import GatewayConfig

# Need a restart of `smg launch`: each names something created once at start-up.
RESTART_ONLY: tuple[str, ...] = (
    "host",  # the listening sockets
    "port",
    "listen_mode",
    "processes",  # one listener per process, table slots
    "worker_table_capacity",  # the shared mapping's size
    "prometheus_port",  # the exporter's listener
    "prometheus_host",
    "health_check_port",  # the probe listener
    "load_monitor_interval",  # read once when the control plane's load loop starts
    "log_json",  # the log handlers
    "log_dir",
    "log_max_bytes",  # the supervisor's and control plane's file handlers are open
    "log_backup_count",
    "mock_workers",  # the mock worker process
    "mock_worker_engine",
    "mock_worker_args",
    # PD mode: its workers are registered at start-up (a reload moves --worker-urls only),
    # and the bucket policy's adjuster is started once by the control plane.
    "pd_disaggregation",
    "prefill",
    "decode",
    "prefill_policy",
    "bucket_adjust_interval_secs",
    "config",  # where the file is; its contents are re-read
    "mcp_config_path",  # read and checked once by `smg launch`; the data planes fork with it
    "print_config",
    # Towards https:// workers: read once by the supervisor before it forks; the control
    # plane's HTTP session (health checks, load polls) is made once with them.
    "client_cert_path",
    "client_key_path",
    "ca_cert_paths",
)

# Whether --port speaks TLS at all is fixed at start-up (clients and load balancers use one
# scheme); which certificate it serves may change on a reload, file content included.
TLS_LISTENER: tuple[str, ...] = ("tls_cert_path", "tls_key_path")


class ReloadPlan(NamedTuple):
    cfg: GatewayConfig  # the configuration to run: `new` with RESTART_ONLY fields kept
    changed: list[str]  # fields that apply now
    kept: list[tuple[str, Any, Any]]  # (field, running value, refused new value)


def plan_reload(
    old: GatewayConfig, new: GatewayConfig, content_changed: Sequence[str] = ()
) -> ReloadPlan:
    """`content_changed`: fields naming files whose content differs from what runs although
    the path may not (the listener's certificate re-read on SIGHUP); they count as changed
    unless the field is kept."""
    kept: list[tuple[str, Any, Any]] = []
    keep: dict[str, Any] = {}
    fixed = list(RESTART_ONLY)
    if (old.tls_cert_path is None) != (new.tls_cert_path is None):
        fixed.extend(TLS_LISTENER)  # TLS switched on or off: needs a restart
    for name in fixed:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            kept.append((name, before, after))
            keep[name] = before
    cfg = msgspec.structs.replace(new, **keep) if keep else new
    changed = [
        name
        for name in GatewayConfig.__struct_fields__
        if name not in fixed
        and (getattr(old, name) != getattr(cfg, name) or name in content_changed)
    ]
    return ReloadPlan(cfg, changed, kept)


def worker_list_changes(old_urls: list[str], new_urls: list[str]) -> tuple[list[str], list[str]]:
    """(added, removed) between two `--worker-urls` lists, in their order. Only these move:
    workers added through the admin API are not in either list and are left alone."""
    old_set, new_set = set(old_urls), set(new_urls)
    added = [url for url in dict.fromkeys(new_urls) if url not in old_set]
    removed = [url for url in dict.fromkeys(old_urls) if url not in new_set]
    return added, removed


# The data plane reads nothing else of the configuration; a reload that changes only
# these leaves the data-plane processes running.
CONTROL_ONLY: frozenset[str] = frozenset(
    {
        "worker_urls",
        "worker_startup_timeout_secs",
        "worker_startup_check_interval",
        "health_failure_threshold",
        "health_success_threshold",
        "health_check_timeout_secs",
        "health_check_interval_secs",
        "health_check_endpoint",
        "dataplane_heartbeat_timeout_secs",
        # Judged by the control plane alone (smg.control.cpauth), rebuilt on each reload.
        "control_plane_api_keys",
        "control_plane_audit_enabled",
        "jwt_issuer",
        "jwt_audience",
        "jwt_jwks_uri",
        "jwt_role_mapping",
    }
)


def needs_rollout(changed: list[str]) -> bool:
    """Whether the data-plane processes must be replaced for `changed` to apply."""
    return any(name not in CONTROL_ONLY for name in changed)
