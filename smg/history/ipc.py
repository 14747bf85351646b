"""The memory backend seen from a data plane: IpcStore calls the control plane's MemoryStore
over smg.ipc (`{"kind": "history", "op": ..., "tenant": ..., "args": {...}}`), so every
process reads and writes one history. `handle` is the control plane's side.

An answer is `{"ok": value}` (records travel as msgpack maps, converted back here) or
`{"error": text}`. A control plane that does not answer within the timeout, or refuses the
call, is StorageUnavailable: the route answers 503 and nothing else breaks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from smg import ipc
from smg.history.memory import MemoryStore
from smg.history.records import Conversation, Item, ItemPage, ResponseRecord
from smg.history.store import Order, StorageUnavailable

log = logging.getLogger("smg.history")

IPC_TIMEOUT_SECS = 5.0

# op -> the argument names and types the control plane accepts for it (the tenant aside).
_OPS: dict[str, dict[str, Any]] = {
    "put_response": {"record": ResponseRecord},
    "get_response": {"response_id": str},
    "delete_response": {"response_id": str},
    "create_conversation": {"conv": Conversation, "items": list[dict[str, Any]]},
    "get_conversation": {"conv_id": str},
    "update_conversation": {"conv_id": str, "metadata": dict[str, str]},
    "delete_conversation": {"conv_id": str},
    "add_items": {"conv_id": str, "items": list[dict[str, Any]]},
    "list_items": {
        "conv_id": str,
        "limit": int,
        "order": Order,
        "after": str | None,
    },
    "get_item": {"conv_id": str, "item_id": str},
    "delete_item": {"conv_id": str, "item_id": str},
}


async def handle(store: MemoryStore | None, message: dict[str, Any]) -> dict[str, Any]:
    """One history call from a data plane, answered by the control plane's store."""
    if store is None:
        return {"error": "the memory history backend is not enabled"}
    op = message.get("op")
    spec = _OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        return {"error": f"unknown history op {op!r}"}
    tenant = message.get("tenant", "")
    raw = message.get("args")
    if not isinstance(tenant, str) or not isinstance(raw, dict):
        return {"error": "malformed history call"}
    try:
        args = {name: msgspec.convert(raw.get(name), tp) for name, tp in spec.items()}
    except msgspec.ValidationError as exc:
        return {"error": f"malformed history call: {exc}"}
    try:
        result = await getattr(store, op)(tenant, *args.values())
    except Exception as exc:  # a bad call must never take the control plane down
        log.exception("history %s failed", op)
        return {"error": f"history {op} failed: {exc!r}"}
    return {"ok": msgspec.to_builtins(result)}


class IpcStore:
    """A HistoryStore that forwards every call to the control plane's MemoryStore."""

    def __init__(self, address: str, timeout: float = IPC_TIMEOUT_SECS) -> None:
        self.address = address
        self.timeout = timeout

    async def _call(self, op: str, tenant: str, **args: Any) -> Any:
        message = {"kind": "history", "op": op, "tenant": tenant, "args": args}
        try:
            answer = await ipc.call(self.address, msgspec.to_builtins(message), self.timeout)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            OSError,
            ValueError,
            msgspec.DecodeError,
        ) as exc:
            raise StorageUnavailable(f"the history store did not answer: {exc!r}") from exc
        if not isinstance(answer, dict) or "ok" not in answer:
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise StorageUnavailable(f"the history store refused {op}: {error}")
        return answer["ok"]

    async def put_response(self, tenant: str, record: ResponseRecord) -> None:
        await self._call("put_response", tenant, record=record)

    async def get_response(self, tenant: str, response_id: str) -> ResponseRecord | None:
        got = await self._call("get_response", tenant, response_id=response_id)
        return msgspec.convert(got, ResponseRecord | None)

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        return bool(await self._call("delete_response", tenant, response_id=response_id))

    async def create_conversation(
        self, tenant: str, conv: Conversation, items: list[dict[str, Any]]
    ) -> list[Item]:
        got = await self._call("create_conversation", tenant, conv=conv, items=items)
        return msgspec.convert(got, list[Item])

    async def get_conversation(self, tenant: str, conv_id: str) -> Conversation | None:
        got = await self._call("get_conversation", tenant, conv_id=conv_id)
        return msgspec.convert(got, Conversation | None)

    async def update_conversation(
        self, tenant: str, conv_id: str, metadata: dict[str, str]
    ) -> Conversation | None:
        got = await self._call("update_conversation", tenant, conv_id=conv_id, metadata=metadata)
        return msgspec.convert(got, Conversation | None)

    async def delete_conversation(self, tenant: str, conv_id: str) -> bool:
        return bool(await self._call("delete_conversation", tenant, conv_id=conv_id))

    async def add_items(
        self, tenant: str, conv_id: str, items: list[dict[str, Any]]
    ) -> list[Item] | None:
        got = await self._call("add_items", tenant, conv_id=conv_id, items=items)
        return msgspec.convert(got, list[Item] | None)

    async def list_items(
        self, tenant: str, conv_id: str, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        got = await self._call(
            "list_items", tenant, conv_id=conv_id, limit=limit, order=order, after=after
        )
        return msgspec.convert(got, ItemPage | None)

    async def get_item(self, tenant: str, conv_id: str, item_id: str) -> Item | None:
        got = await self._call("get_item", tenant, conv_id=conv_id, item_id=item_id)
        return msgspec.convert(got, Item | None)

    async def delete_item(self, tenant: str, conv_id: str, item_id: str) -> bool:
        return bool(await self._call("delete_item", tenant, conv_id=conv_id, item_id=item_id))

    async def close(self) -> None:
        return None
