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
MOCK_BOOTSTRAP_PREFIX = "MOCK_WORKER_BOOTSTRAP "  # smg.mock_worker.runner's line


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
    mock_process: subprocess.Popen[bytes] | MockProcesses | None = None
    urls = list(cfg.worker_urls)
    mock_pd: list[WorkerSpec] = []
    if cfg.mock_workers:
        try:
            if cfg.pd_disaggregation:
                mock_process, mock_pd = start_pd_mock_workers(cfg)
            else:
                mock_process, mock_urls, _ = start_mock_workers(cfg)
                urls.extend(mock_urls)
        except RuntimeError as exc:
            print(f"smg launch: {exc}", file=sys.stderr)
            return 1
    from smg.control.registry import unsupported_reason
    from smg.supervisor import Supervisor

    specs = [validate_worker_spec(WorkerSpec(url=url)) for url in urls]
    specs.extend(validate_worker_spec(spec) for spec in mock_pd)
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


class MockProcesses:
    """The PD mock processes (one per role) as the supervisor sees its mock process:
    poll / terminate / wait / kill over all of them."""

    def __init__(self, processes: list[subprocess.Popen[bytes]]) -> None:
        self.processes = processes

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.processes]
        return None if any(code is None for code in codes) else codes[0]

    def terminate(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.processes:
            p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.processes[0].returncode

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()


def start_pd_mock_workers(cfg: GatewayConfig) -> tuple[MockProcesses, list[WorkerSpec]]:
    """`--pd-disaggregation --mock-workers N`: N SGLang-style prefill mocks (each with its
    bootstrap server on an ephemeral loopback port) and N decode mocks, one process per
    role; the specs are prefill/decode workers as --prefill URL PORT / --decode URL."""
    prefill, p_urls, ports = start_mock_workers(
        cfg, ["--pd-role", "prefill", "--bootstrap-port", "0"], bootstrap=True
    )
    try:
        decode, d_urls, _ = start_mock_workers(cfg, ["--pd-role", "decode"])
    except RuntimeError:
        prefill.kill()
        prefill.wait()
        raise
    specs = [
        WorkerSpec(url=url, worker_type="prefill", bootstrap_port=ports.get(url)) for url in p_urls
    ]
    specs.extend(WorkerSpec(url=url, worker_type="decode") for url in d_urls)
    return MockProcesses([prefill, decode]), specs


def start_mock_workers(
    cfg: GatewayConfig, extra: list[str] | None = None, bootstrap: bool = False
) -> tuple[subprocess.Popen[bytes], list[str], dict[str, int]]:
    """One child process hosting `--mock-workers` mock engines on free loopback ports
    (`extra`: more mock-worker flags; `bootstrap`: also wait for each prefill's bootstrap
    port line)."""
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
        *(extra or ()),
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
    ports: dict[str, int] = {}
    while len(urls) < cfg.mock_workers or (bootstrap and len(ports) < cfg.mock_workers):
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
            elif text.startswith(MOCK_BOOTSTRAP_PREFIX):  # "<prefix> <url> <port>"
                url, port = text[len(MOCK_BOOTSTRAP_PREFIX) :].split()
                ports[url] = int(port)
    return process, urls, ports
