"""HTTP or gRPC? The connection mode of a discovered worker given as a bare host:port.

The Rust SMG 1.13 hands discovery's workers to its registration workflow as a bare
`host:port` (Kubernetes pods always; a file manifest's `url` without a scheme), and its
DetectConnectionModeStep (workflow/steps/local/detect_connection.rs) probes both at once:
`GET http://host:port/health` answering 2xx, and a gRPC HealthCheck answered by any
engine service. HTTP wins when both answer; neither: the registration fails and the next
reconcile pass tries again. Seen on the 1.13 binary: a file manifest listing a gRPC
engine's bare host:port registers it as `grpc://host:port`, connection_mode grpc.

smg asks the services it speaks (SGLang's and vLLM's HealthCheck, as smg.grpc.client's
detect_backend); no API key is sent (1.13 sends none in this step).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import aiohttp

__all__ = ["Mode", "detect_connection_mode"]

log = logging.getLogger("smg.discovery")

Mode = Literal["http", "grpc"]


async def _http_ok(host_port: str, timeout: float) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://{host_port}/health",
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp,
        ):
            return 200 <= resp.status < 300
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a probe never takes the reconciler down
        log.debug("HTTP probe of %s failed: %s: %s", host_port, type(exc).__name__, exc)
        return False


async def _grpc_ok(host_port: str, timeout: float) -> bool:
    from smg.grpc.client import detect_backend  # grpc loads only once a probe needs it

    try:
        await detect_backend(f"grpc://{host_port}", timeout=timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # EngineError, or a channel that could not be made
        log.debug("gRPC probe of %s failed: %s: %s", host_port, type(exc).__name__, exc)
        return False
    return True


async def detect_connection_mode(host_port: str, timeout: float) -> Mode | None:
    """ "http" if `GET /health` answers 2xx, else "grpc" if an engine's HealthCheck answers,
    else None (both probed at once, each within `timeout` seconds)."""
    http, grpc = await asyncio.gather(_http_ok(host_port, timeout), _grpc_ok(host_port, timeout))
    if http:
        return "http"
    return "grpc" if grpc else None
