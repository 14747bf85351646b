"""The bootstrap-port probe of a prefill worker at registration (the Rust SMG 1.13's).

A PD decode engine meets its prefill at `bootstrap_host:bootstrap_port` (SGLang's default
port 8998 when the worker was registered without one). 1.13 opens one TCP connection there
when a prefill worker registers; a refusal leaves the worker registered, logs a warning and
counts `smg_pd_rendezvous_failures_total{leg="prefill",phase="probe"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

from smg.workers_spec import WorkerSpec

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's, 1.13's DEFAULT_BOOTSTRAP_PORT
PROBE_TIMEOUT_SECS = 2.0

log = logging.getLogger("smg.control")


def bootstrap_address(spec: WorkerSpec) -> tuple[str, int, str]:
    """(host, port, source) the probe connects to: the worker URL's host and its
    bootstrap_port ("registered"), or SGLang's default port ("default")."""
    host = urlsplit(spec.url).hostname or ""
    if spec.bootstrap_port is not None:
        return host, spec.bootstrap_port, "registered"
    return host, DEFAULT_BOOTSTRAP_PORT, "default"


async def probe_bootstrap(spec: WorkerSpec, timeout: float = PROBE_TIMEOUT_SECS) -> bool:
    """True when the bootstrap port accepted a connection; else logs 1.13's warning."""
    host, port, source = bootstrap_address(spec)
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        log.warning(
            "Bootstrap port did not accept a connection at registration: the leg is "
            "registered, but its disaggregated partners cannot rendezvous there "
            "worker=%s worker_type=%s bootstrap_host=%s bootstrap_port=%d "
            "bootstrap_port_source=%s error=%s",
            spec.url,
            spec.worker_type,
            host,
            port,
            source,
            exc or type(exc).__name__,
        )
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
