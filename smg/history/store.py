"""The history store interface every backend implements, and the id helpers they share.

`tenant` scopes every record: another tenant's id behaves exactly as a missing one (None or
False), so a route cannot tell "not yours" from "not there". "" is the record of requests
that carry no tenant.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal, Protocol

from smg.history.records import Conversation, Item, ItemPage, ResponseRecord

Order = Literal["asc", "desc"]

# make_item_id's prefixes, as the Rust SMG's data_connector (core.rs); any other type takes
# its first three letters, an item without a type "itm".
_ITEM_PREFIXES: dict[str, str] = {
    "message": "msg",
    "reasoning": "rs",
    "mcp_call": "mcp",
    "mcp_list_tools": "mcpl",
    "function_call": "fc",
}


class StorageUnavailable(Exception):
    """The backend is down or did not answer within its op timeout: the route answers 503
    storage_unavailable and the gateway keeps serving stateless requests."""


def random_hex() -> str:
    """50 hex characters from 25 random bytes, as the Rust SMG's random_hex_id."""
    return secrets.token_hex(25)


def new_conversation_id() -> str:
    return "conv_" + random_hex()


def make_item_id(item_type: object) -> str:
    if isinstance(item_type, str):
        prefix = _ITEM_PREFIXES.get(item_type) or item_type[:3] or "itm"
    else:
        prefix = "itm"
    return f"{prefix}_{random_hex()}"


def item_id_of(body: dict[str, Any]) -> str:
    """The item's own id when it has a non-empty string one, else a new one from its type."""
    given = body.get("id")
    if isinstance(given, str) and given:
        return given
    return make_item_id(body.get("type"))


class HistoryStore(Protocol):
    """Every method is async and may raise StorageUnavailable."""

    async def put_response(self, tenant: str, record: ResponseRecord) -> None: ...

    async def get_response(self, tenant: str, response_id: str) -> ResponseRecord | None: ...

    async def delete_response(self, tenant: str, response_id: str) -> bool: ...

    async def create_conversation(
        self, tenant: str, conv: Conversation, items: list[dict[str, Any]]
    ) -> list[Item]:
        """Store `conv` and append `items` to it in order; returns the stored items."""
        ...

    async def get_conversation(self, tenant: str, conv_id: str) -> Conversation | None: ...

    async def update_conversation(
        self, tenant: str, conv_id: str, metadata: dict[str, str]
    ) -> Conversation | None: ...

    async def delete_conversation(self, tenant: str, conv_id: str) -> bool:
        """Its items go too."""
        ...

    async def add_items(
        self, tenant: str, conv_id: str, items: list[dict[str, Any]]
    ) -> list[Item] | None:
        """None: no such conversation."""
        ...

    async def list_items(
        self, tenant: str, conv_id: str, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        """None: no such conversation. `after` is an item id of the conversation (the page
        starts past it in `order`); an unknown one is ignored, as the Rust SMG."""
        ...

    async def get_item(self, tenant: str, conv_id: str, item_id: str) -> Item | None: ...

    async def delete_item(self, tenant: str, conv_id: str, item_id: str) -> bool: ...

    async def close(self) -> None: ...
