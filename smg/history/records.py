"""The records every history backend stores and returns (the same shapes for each backend).

msgspec Structs, so a record crosses the control-plane IPC and goes into Redis or
PostgreSQL as plain JSON/msgpack with one encode, and comes back with one convert.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Conversation(msgspec.Struct, kw_only=True):
    id: str  # "conv_" + 50 hex, as the Rust SMG's ConversationId::new
    created_at: int  # unix seconds
    metadata: dict[str, str] = {}


class Item(msgspec.Struct, kw_only=True):
    id: str  # the id the item came with, else one made from its type (make_item_id)
    conversation_id: str
    seq: int  # order within the conversation, assigned by the store, strictly increasing
    created_at: int
    body: dict[str, Any]  # the item JSON, its "id" included


class ResponseRecord(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    model: str
    previous_response_id: str | None = None
    conversation_id: str | None = None
    input_items: list[dict[str, Any]] = []
    output_items: list[dict[str, Any]] = []
    body: dict[str, Any] = {}  # the response JSON


class ItemPage(msgspec.Struct, kw_only=True):
    items: list[Item]
    has_more: bool
