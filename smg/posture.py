"""The start-up security posture line: every surface that answers without a credential,
and how to close it (as the Rust SMG 1.13 logs one `SECURITY POSTURE` warning). Pure code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from smg.config import prometheus_bind_host

if TYPE_CHECKING:
    from smg.config import GatewayConfig

HEADLINE_OPEN = (
    "SECURITY POSTURE: this gateway runs without authentication; every surface named here "
    "answers any caller that can reach it"
)
HEADLINE_KEYED = (
    "SECURITY POSTURE: client keys guard the serving routes (the admin routes take the "
    "control-plane keys or JWT when configured, else --api-key); the surface named here "
    "answers without one"
)
HEADLINE_PARTLY = (
    "SECURITY POSTURE: credentials guard some surfaces; every surface named here answers "
    "without one"
)
CONTROL_PLANE_LOOPBACK = (
    "LOOPBACK ONLY: POST /workers and PUT/PATCH/DELETE /workers/{id} (register or remove "
    "backends by URL), GET /workers and GET /get_loads (the backends' addresses), POST "
    "/flush_cache answer any client on loopback, including whatever a local reverse proxy "
    "forwards; protect them with --control-plane-api-keys id:name:admin:<key> or "
    "--jwt-issuer/--jwt-audience (the shared --api-key gates them too)"
)
DATA_PLANE_OPEN = (
    "OPEN: /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/messages "
    "and the other serving routes need no credential; protect them with --api-key <key> or "
    "--tenant-api-key tenant:<key>"
)


def posture_warning(cfg: GatewayConfig) -> str:
    """The one warning line for `cfg` (there is always at least the metrics listener).

    As the Rust SMG 1.13: the admin routes are guarded by control-plane keys or JWT, else by
    --api-key, and shut by tenant keys alone; the serving routes by --api-key or tenant keys.
    """
    port = str(cfg.prometheus_port) if cfg.prometheus_port else "an OS-chosen port"
    metrics = (
        f"{prometheus_bind_host(cfg)}:{port} serves /metrics (per-worker series named by "
        "backend address) with no authentication; bind it to a private address with "
        "--prometheus-host and fence the port with a network policy"
    )
    serving_guarded = bool(cfg.api_key or cfg.tenant_api_key)
    admin_guarded = serving_guarded or bool(cfg.control_plane_api_keys or cfg.jwt_issuer)
    if serving_guarded:
        return f'{HEADLINE_KEYED} metrics_listener="{metrics}"'
    if admin_guarded:
        return f'{HEADLINE_PARTLY} data_plane="{DATA_PLANE_OPEN}" metrics_listener="{metrics}"'
    return (
        f'{HEADLINE_OPEN} control_plane="{CONTROL_PLANE_LOOPBACK}" '
        f'data_plane="{DATA_PLANE_OPEN}" metrics_listener="{metrics}"'
    )
