"""History storage for the Responses and Conversations APIs (records, the store interface,
the backends, and open_store, which picks one from the configuration)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from smg.history.records import Conversation, Item, ItemPage, ResponseRecord
from smg.history.store import HistoryStore, StorageUnavailable

if TYPE_CHECKING:
    from smg.config import GatewayConfig

__all__ = [
    "Conversation",
    "HistoryStore",
    "Item",
    "ItemPage",
    "ResponseRecord",
    "StorageUnavailable",
    "open_store",
    "preflight",
]


def open_store(
    cfg: GatewayConfig, *, in_control_plane: bool, root_pid: int = 0
) -> HistoryStore | None:
    """The store for `cfg.history_backend`, None for "none".

    memory: the control plane holds the one MemoryStore; a data plane gets an IpcStore to it
    (`root_pid`: the root supervisor's pid, which names the control plane's socket; a data
    plane has it as DataPlane.root_pid). redis and postgres:
    the backend's own client, opened lazily in the caller's event loop (after the fork).
    """
    backend = cfg.history_backend
    if backend == "none":
        return None
    if backend == "memory":
        if in_control_plane:
            from smg.history.memory import MemoryStore

            return MemoryStore.from_config(cfg)
        from smg import ipc
        from smg.history.ipc import IpcStore

        if root_pid <= 0:
            raise ValueError("a data plane's memory history store needs the root pid")
        return IpcStore(ipc.control_plane_address(root_pid))
    if backend == "redis":
        from smg.history.redis_store import RedisStore

        return RedisStore.from_config(cfg)
    if backend == "postgres":
        from smg.history.postgres_store import PostgresStore

        return PostgresStore.from_config(cfg)
    raise ValueError(f"unknown history backend {backend!r}")


_BACKEND_NAMES = {"redis": "Redis", "postgres": "Postgres"}


def preflight(cfg: GatewayConfig) -> None:
    """At start-up, before any process is forked: reach the redis / postgres backend once
    (PostgreSQL: create or migrate its schema) and let go. Raises RuntimeError, worded as the
    Rust SMG 1.13, which refuses to start on an unreachable history backend too."""
    backend = cfg.history_backend
    if backend not in _BACKEND_NAMES:
        return
    import asyncio

    from smg.config import mask_url

    url = cfg.redis_url if backend == "redis" else cfg.postgres_db_url
    store = open_store(cfg, in_control_plane=True)

    async def reach() -> None:
        try:
            await store.open()  # type: ignore[union-attr]
        finally:
            await store.close()  # type: ignore[union-attr]

    try:
        asyncio.run(reach())
    except StorageUnavailable as exc:
        raise RuntimeError(
            f"the {_BACKEND_NAMES[backend]} history backend at {mask_url(url or '')} "
            f"is unreachable at start-up: {exc}"
        ) from None
