"""`smg launch`: read the configuration, start mock workers if asked, run the supervisor."""

from __future__ import annotations

import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time

from smg.config import (
    ConfigError,
    GatewayConfig,
    cfg_processes,
    load_config,
    pd_workers,
    render_config,
)
from smg.logs import setup_logging
from smg.workers_spec import WorkerSpec, validate_worker_spec

MOCK_URL_PREFIX = "MOCK_WORKER_URL "


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv, os.environ)
    except ConfigError as exc:
        print(f"smg launch: {exc}", file=sys.stderr)
        return 2
    if cfg.print_config:
        print(render_config(cfg))
        return 0
    if cfg.mcp_config_path:
        from smg.mcp.config import McpConfigError
        from smg.mcp.config import load_config as load_mcp_config

        try:  # as the Rust SMG 1.13: an unreadable or invalid MCP file stops the start (exit 1)
            mcp_config = load_mcp_config(cfg.mcp_config_path)
        except McpConfigError as exc:
            print(f"smg launch: {exc}", file=sys.stderr)
            return 1
        from smg import mcp

        mcp.remember_config(cfg.mcp_config_path, mcp_config)  # the data planes fork with it
    try:
        setup_logging(
            cfg.log_level,
            cfg.log_json,
            cfg.log_dir,
            max_bytes=cfg.log_max_bytes,
            backup_count=cfg.log_backup_count,
        )
    except OSError as exc:  # --log-dir cannot be created or written: say so, no traceback
        print(f"smg launch: --log-dir {cfg.log_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for message in inert_settings(cfg):
        logging.getLogger("smg").warning(message)
    if cfg.enable_igw:
        # The Rust SMG prints its mode in the start-up banner: "IGW (Inference Gateway)".
        logging.getLogger("smg").info(
            "IGW (multi-model) mode: workers of every kind may be added through POST /workers; "
            "/generate must name a model"
        )
    # Read (and removed from the environment before any child is started) what systemd
    # passed: the notify socket, the watchdog, a socket to serve (smg.systemd).
    from smg import systemd

    try:
        sd_env = systemd.take_environ(os.environ, os.getpid())
        activated = systemd.adopt_listener(sd_env.listen) if sd_env.listen else None
    except ValueError as exc:
        print(f"smg launch: {exc}", file=sys.stderr)
        return 2
    from smg.history import preflight

    try:
        preflight(cfg)  # an unreachable Redis / PostgreSQL history backend: no start (as Rust)
    except RuntimeError as exc:
        print(f"smg launch: {exc}", file=sys.stderr)
        return 1
    mock_process = None
    urls = list(cfg.worker_urls)
    if cfg.mock_workers:
        try:
            mock_process, mock_urls = start_mock_workers(cfg)
        except RuntimeError as exc:
            print(f"smg launch: {exc}", file=sys.stderr)
            return 1
        urls.extend(mock_urls)
    from smg.control.registry import unsupported_reason
    from smg.supervisor import Supervisor

    specs = [validate_worker_spec(WorkerSpec(url=url)) for url in urls]
    specs.extend(  # --prefill / --decode (validate_config refused them without PD mode)
        validate_worker_spec(
            WorkerSpec(url=pd.url, worker_type=pd.worker_type, bootstrap_port=pd.bootstrap_port)
        )
        for pd in pd_workers(cfg)
    )
    for spec in specs:
        reason = unsupported_reason(spec)
        if reason:
            print(f"smg launch: worker {spec.url}: {reason}", file=sys.stderr)
            return 2
    supervisor = Supervisor(
        cfg,
        cfg_processes(cfg),
        specs,
        mock_process,
        argv=list(argv),
        systemd=sd_env,
        activated=activated,
    )
    return supervisor.run()


# Accepted so Rust SMG command lines keep working, but the feature arrives in a later issue
# (none at present: the mechanism stays for the next such flag).
_INERT: dict[str, str] = {}


def inert_settings(cfg: GatewayConfig) -> list[str]:
    """One warning per setting given a non-default value that has no effect yet."""
    defaults = GatewayConfig()
    return [
        f"--{name.replace('_', '-')} is accepted but has no effect yet ({feature} is not implemented)"
        for name, feature in _INERT.items()
        if getattr(cfg, name) != getattr(defaults, name)
    ]


def start_mock_workers(cfg: GatewayConfig) -> tuple[subprocess.Popen[bytes], list[str]]:
    """One child process hosting `--mock-workers` mock engines on free loopback ports."""
    from smg.supervisor import die_with_parent

    command = [
        sys.executable,
        "-m",
        "smg",
        "mock-worker",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--count",
        str(cfg.mock_workers),
        "--engine",
        cfg.mock_worker_engine,
        *shlex.split(cfg.mock_worker_args or ""),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        preexec_fn=lambda: (
            die_with_parent(signal.SIGTERM),
            signal.signal(signal.SIGINT, signal.SIG_IGN),
        ),
    )
    assert process.stdout is not None
    urls: list[str] = []
    deadline = time.monotonic() + 30.0
    buffered = b""
    while len(urls) < cfg.mock_workers:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            process.kill()
            raise RuntimeError(
                f"mock workers did not start (got {len(urls)} of {cfg.mock_workers} URLs)"
            )
        ready, _, _ = select.select([process.stdout], [], [], min(remaining, 0.5))
        if not ready:
            continue
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            continue
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace").strip()
            if text.startswith(MOCK_URL_PREFIX):
                urls.append(text[len(MOCK_URL_PREFIX) :].strip())
    return process, urls
