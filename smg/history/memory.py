"""The memory history backend: one MemoryStore, held by the control plane, for every process.

Pure (no I/O): the data planes reach it through smg.history.ipc. Every method runs to the
end without awaiting, so on the control plane's event loop each call is atomic.

Bounds, as the Rust SMG 1.13's flags: at most `max_responses` responses and `max_items`
conversation items, the oldest going first on every write (an item leaves the conversation
that listed it); `retention_secs` (0: none) drops a response that long after it was stored
and a conversation that long after its last use (created, read, updated, items added or
listed), with its items. A response whose body says it is still running ("queued",
"in_progress") is not dropped by the count bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smg.history.records import Conversation, Item, ItemPage, ResponseRecord
from smg.history.store import Order, item_id_of

if TYPE_CHECKING:
    from smg.config import GatewayConfig

_RUNNING = frozenset({"queued", "in_progress"})


class _Conv:
    __slots__ = ("conv", "items", "next_seq", "used")

    def __init__(self, conv: Conversation, used: float) -> None:
        self.conv = conv
        self.used = used
        self.next_seq = 1
        # item id -> Item, in seq order (an item is only ever appended).
        self.items: dict[str, Item] = {}


class MemoryStore:
    def __init__(
        self,
        max_responses: int = 10000,
        max_items: int = 100000,
        retention_secs: float = 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_responses = max_responses
        self.max_items = max_items
        self.retention_secs = retention_secs
        self._clock = clock
        # (tenant, id) -> (record, stored at), oldest stored first.
        self._responses: OrderedDict[tuple[str, str], tuple[ResponseRecord, float]] = OrderedDict()
        # (tenant, id) -> conversation, least recently used first.
        self._convs: OrderedDict[tuple[str, str], _Conv] = OrderedDict()
        # every stored item, oldest first: (tenant, conversation id, item id).
        self._items: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> MemoryStore:
        return cls(
            max_responses=cfg.history_memory_max_responses,
            max_items=cfg.history_memory_max_items,
            retention_secs=cfg.history_memory_retention_secs,
        )

    # --- responses -----------------------------------------------------------------------------

    async def put_response(self, tenant: str, record: ResponseRecord) -> None:
        now = self._clock()
        key = (tenant, record.id)
        self._responses.pop(key, None)
        self._responses[key] = (record, now)
        self._evict(now)

    async def get_response(self, tenant: str, response_id: str) -> ResponseRecord | None:
        key = (tenant, response_id)
        entry = self._responses.get(key)
        if entry is None:
            return None
        if self._expired(entry[1], self._clock()):
            del self._responses[key]
            return None
        return entry[0]

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        return self._responses.pop((tenant, response_id), None) is not None

    # --- conversations -------------------------------------------------------------------------

    async def create_conversation(
        self, tenant: str, conv: Conversation, items: list[dict[str, Any]]
    ) -> list[Item]:
        now = self._clock()
        key = (tenant, conv.id)
        if key in self._convs:
            self._drop_conv(key)
        state = _Conv(conv, now)
        self._convs[key] = state
        added = self._append(tenant, state, items, now)
        self._evict(now)
        return added

    async def get_conversation(self, tenant: str, conv_id: str) -> Conversation | None:
        state = self._use(tenant, conv_id)
        return state.conv if state else None

    async def update_conversation(
        self, tenant: str, conv_id: str, metadata: dict[str, str]
    ) -> Conversation | None:
        state = self._use(tenant, conv_id)
        if state is None:
            return None
        state.conv = Conversation(
            id=state.conv.id, created_at=state.conv.created_at, metadata=dict(metadata)
        )
        self._evict(state.used)
        return state.conv

    async def delete_conversation(self, tenant: str, conv_id: str) -> bool:
        key = (tenant, conv_id)
        if key not in self._convs:
            return False
        self._drop_conv(key)
        return True

    # --- items ---------------------------------------------------------------------------------

    async def add_items(
        self, tenant: str, conv_id: str, items: list[dict[str, Any]]
    ) -> list[Item] | None:
        state = self._use(tenant, conv_id)
        if state is None:
            return None
        added = self._append(tenant, state, items, state.used)
        self._evict(state.used)
        return added

    async def list_items(
        self, tenant: str, conv_id: str, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        state = self._use(tenant, conv_id)
        if state is None:
            return None
        ordered = list(state.items.values())
        if order == "desc":
            ordered.reverse()
        start = 0
        if after is not None and after in state.items:
            start = next(i for i, it in enumerate(ordered) if it.id == after) + 1
        page = ordered[start : start + max(limit, 0)]
        return ItemPage(items=page, has_more=start + len(page) < len(ordered))

    async def get_item(self, tenant: str, conv_id: str, item_id: str) -> Item | None:
        state = self._use(tenant, conv_id)
        return state.items.get(item_id) if state else None

    async def delete_item(self, tenant: str, conv_id: str, item_id: str) -> bool:
        state = self._use(tenant, conv_id)
        if state is None or state.items.pop(item_id, None) is None:
            return False
        self._items.pop((tenant, conv_id, item_id), None)
        return True

    async def close(self) -> None:
        return None

    # --- counts, for tests and metrics ----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "responses": len(self._responses),
            "conversations": len(self._convs),
            "items": len(self._items),
        }

    # --- internals -----------------------------------------------------------------------------

    def _expired(self, at: float, now: float) -> bool:
        return self.retention_secs > 0 and at < now - self.retention_secs

    def _use(self, tenant: str, conv_id: str) -> _Conv | None:
        """The live conversation, touched (its retention counts from now), or None."""
        key = (tenant, conv_id)
        state = self._convs.get(key)
        if state is None:
            return None
        now = self._clock()
        if self._expired(state.used, now):
            self._drop_conv(key)
            return None
        state.used = now
        self._convs.move_to_end(key)
        return state

    def _append(
        self, tenant: str, state: _Conv, bodies: list[dict[str, Any]], now: float
    ) -> list[Item]:
        conv_id = state.conv.id
        added: list[Item] = []
        for body in bodies:
            item_id = item_id_of(body)
            if state.items.pop(item_id, None) is not None:
                # The same id again: the new one replaces it, at the end (no duplicates).
                self._items.pop((tenant, conv_id, item_id), None)
            stored = {**body, "id": item_id}
            item = Item(
                id=item_id,
                conversation_id=conv_id,
                seq=state.next_seq,
                created_at=int(now),
                body=stored,
            )
            state.next_seq += 1
            state.items[item_id] = item
            self._items[(tenant, conv_id, item_id)] = None
            added.append(item)
        return added

    def _drop_conv(self, key: tuple[str, str]) -> None:
        state = self._convs.pop(key)
        for item_id in state.items:
            self._items.pop((key[0], key[1], item_id), None)

    def _evict(self, now: float) -> None:
        if self.retention_secs > 0:
            limit = now - self.retention_secs
            while self._convs:
                key, state = next(iter(self._convs.items()))
                if state.used >= limit:
                    break
                self._drop_conv(key)
            while self._responses:
                key, (_, stored) = next(iter(self._responses.items()))
                if stored >= limit:
                    break
                del self._responses[key]
        excess = len(self._responses) - self.max_responses
        if excess > 0:
            victims: list[tuple[str, str]] = []
            for key, (record, _) in self._responses.items():
                if record.body.get("status") not in _RUNNING:
                    victims.append(key)
                    if len(victims) == excess:
                        break
            for key in victims:
                del self._responses[key]
        while len(self._items) > self.max_items:
            (tenant, conv_id, item_id), _ = self._items.popitem(last=False)
            state = self._convs.get((tenant, conv_id))
            if state is not None:
                state.items.pop(item_id, None)
