"""Service discovery: providers observe a source (a JSON manifest, Kubernetes pods) and
hand the desired workers to the control plane's Reconciler (smg.discovery.reconcile), the
only writer of the registry."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from smg.config import GatewayConfig, discovery_provider
from smg.discovery.reconcile import Reconciler

__all__ = ["provider_coroutine"]


def provider_coroutine(
    cfg: GatewayConfig, reconciler: Reconciler
) -> Coroutine[Any, Any, None] | None:
    """The configured provider's run loop (the control plane runs it as a task), or None
    without discovery."""
    provider = discovery_provider(cfg)
    if provider == "file":
        from smg.discovery.file import FileProvider

        return FileProvider.from_config(cfg, reconciler).run()
    if provider == "kubernetes":
        from smg.discovery import kubernetes  # type: ignore[attr-defined]

        return kubernetes.run(cfg, reconciler)  # type: ignore[no-any-return]
    return None
