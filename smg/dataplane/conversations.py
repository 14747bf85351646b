"""The Conversations API (/v1/conversations...) on the history store, in the data plane.

The shaping (routes, query and body checks, item normalisation, the answers' JSON, the
request's tenant) is pure and tested directly; `serve` is the only part that awaits the
store. Shapes, limits and error words follow the Rust SMG 1.13 (its conversations
handlers, and what the 1.13 binary answers to the same bytes), except where noted:
- list `limit` is 1-100 (default 20) and `order` asc|desc, as OpenAI documents them (1.13
  takes any limit, defaults to 100, and reads any other order as desc);
- metadata values are strings (OpenAI's API, and the store's record type; 1.13 takes any);
- items given on create are stored (OpenAI's API; 1.13 drops them);
- an item is scoped to its conversation: an item_reference finds only this conversation's
  items (1.13 looks ids up across every conversation, of every tenant);
- deleting an item the conversation does not hold answers 404 (1.13 answers 200).
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import orjson

from smg.history.records import Conversation, Item
from smg.history.store import make_item_id, new_conversation_id
from smg.httpwire import invalid_url

if TYPE_CHECKING:
    from smg.history.store import HistoryStore, Order

PREFIX = "/v1/conversations"
MAX_METADATA_PROPERTIES = 16
MAX_ITEMS_PER_REQUEST = 20
DEFAULT_LIMIT = 20
MAX_LIMIT = 100

SUPPORTED_ITEM_TYPES: tuple[str, ...] = (
    "message",
    "reasoning",
    "mcp_list_tools",
    "mcp_call",
    "item_reference",
    "function_call",
    "function_call_output",
    "file_search_call",
    "computer_call",
    "computer_call_output",
    "web_search_call",
    "image_generation_call",
    "code_interpreter_call",
    "local_shell_call",
    "local_shell_call_output",
    "mcp_approval_request",
    "mcp_approval_response",
    "custom_tool_call",
    "custom_tool_call_output",
)
IMPLEMENTED_ITEM_TYPES = frozenset(
    {"message", "reasoning", "mcp_list_tools", "mcp_call", "item_reference"}
)

# The methods each route answers (the 405's `allow` line, as 1.13 writes it).
ALLOW = {
    "collection": "POST",
    "conversation": "GET,HEAD,POST,DELETE",
    "items": "GET,HEAD,POST",
    "item": "GET,HEAD,DELETE",
}

# The metrics' path label of each route (ids would make one series per conversation).
METRIC_PATHS = {
    "collection": PREFIX,
    "conversation": PREFIX + "/{id}",
    "items": PREFIX + "/{id}/items",
    "item": PREFIX + "/{id}/items/{item_id}",
}

NOT_FOUND = "Conversation not found"
ITEM_NOT_FOUND = "Item not found in this conversation"
DISABLED = "Conversations need a history store: this gateway runs with --history-backend none"


class ConvError(Exception):
    """An answer in OpenAI's error shape: status, code, message (and the 405's allow)."""

    def __init__(self, status: int, code: str, message: str, allow: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.allow = allow


def bad_request(message: str, code: str = "invalid_request") -> ConvError:
    return ConvError(400, code, message)


def not_found(message: str = NOT_FOUND) -> ConvError:
    return ConvError(404, "not_found", message)


# --- routes -----------------------------------------------------------------------------------


def match_route(path: str) -> tuple[str, str, str] | None:
    """(route, conversation id, item id) for a /v1/conversations path, None for any other
    path under it. route: collection | conversation | items | item."""
    if path == PREFIX:
        return "collection", "", ""
    if not path.startswith(PREFIX + "/"):
        return None
    parts = path[len(PREFIX) + 1 :].split("/")
    if not all(parts):
        return None
    conv_id = unquote(parts[0])
    if len(parts) == 1:
        return "conversation", conv_id, ""
    if parts[1] != "items" or len(parts) > 3:
        return None
    if len(parts) == 2:
        return "items", conv_id, ""
    return "item", conv_id, unquote(parts[2])


# --- tenancy ----------------------------------------------------------------------------------


def tenant_keys_by_secret(api_key: str | None, tenant_keys: dict[str, str]) -> dict[bytes, str]:
    """Each serving key -> the tenant it stands for, as the Rust SMG names them: a
    --tenant-api-key is "auth:<tenant id>", the shared --api-key "auth:<sha256 of it>"."""
    table: dict[bytes, str] = {}
    if api_key:
        table[api_key.encode("latin-1")] = "auth:" + hashlib.sha256(api_key.encode()).hexdigest()
    for key, tenant in tenant_keys.items():
        table[key.encode("latin-1")] = "auth:" + tenant
    return table


def resolve_tenant(
    presented: bytes | None, by_key: dict[bytes, str], trusted_header: bytes | None
) -> str:
    """The tenant a request's records belong to: its gateway key's, else (with
    --trust-tenant-header) the header's trimmed value as "header:<value>", else "" (no
    tenant). `presented` has already passed the serving-key check."""
    if presented is not None and by_key:
        tenant = by_key.get(presented)
        if tenant is not None:
            return tenant
    if trusted_header is not None:
        value = trusted_header.strip()
        if value:
            return "header:" + value.decode("latin-1")
    return ""


# --- request checks ---------------------------------------------------------------------------


def parse_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON object of a POST; an empty body reads as {}."""
    raw = bytes(body)
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid JSON body: {exc}", "invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("the request body must be a JSON object")
    return value


def parse_list_query(query: str) -> tuple[int, Order, str | None]:
    """limit, order, after of GET .../items."""
    params = parse_qs(query, keep_blank_values=True)

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    limit = DEFAULT_LIMIT
    raw_limit = one("limit")
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise bad_request(f"limit must be an integer between 1 and {MAX_LIMIT}")
        limit = int(raw_limit)
    order = one("order") or "desc"
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'")
    after = one("after") or None
    return limit, order, after  # type: ignore[return-value]


def _check_metadata(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request("metadata must be an object")
    return value


def _string_values(metadata: dict[str, Any]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_PROPERTIES:
        raise bad_request(f"metadata cannot have more than {MAX_METADATA_PROPERTIES} properties")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise bad_request(f"metadata value of {key!r} must be a string")
    return metadata


def create_metadata(body: dict[str, Any]) -> dict[str, str]:
    """The metadata of a new conversation ({} when not given or null)."""
    value = body.get("metadata")
    if value is None:
        return {}
    return _string_values(_check_metadata(value))


def patched_metadata(current: dict[str, str], body: dict[str, Any]) -> dict[str, str]:
    """An update's metadata, as 1.13: a key set to null is removed, others set or replaced,
    the rest kept; no metadata in the body keeps the current one."""
    value = body.get("metadata")
    if value is None:
        return dict(current)
    patch = _check_metadata(value)
    merged: dict[str, Any] = dict(current)
    for key, new in patch.items():
        if new is None:
            merged.pop(key, None)
        else:
            merged[key] = new
    return _string_values(merged)


def _text_part(role: str, text: str) -> dict[str, Any]:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def shape_item(item: object) -> tuple[dict[str, Any], str | None]:
    """One item to store (its id first, made from its type when it has none; status
    "completed" unless given; a message's string content as one text part), and the
    warning 1.13 gives for a type it accepts without implementing it."""
    if not isinstance(item, dict):
        raise bad_request("each item must be an object")
    item_type = item.get("type", "message")
    if not isinstance(item_type, str) or item_type not in SUPPORTED_ITEM_TYPES:
        raise bad_request(
            f"Unsupported item type '{item_type}'. Supported types: "
            + ", ".join(SUPPORTED_ITEM_TYPES)
        )
    given = item.get("id")
    if given is not None and (not isinstance(given, str) or not given):
        raise bad_request("an item's id must be a non-empty string")
    shaped: dict[str, Any] = {"id": given or make_item_id(item_type), "type": item_type}
    for key, value in item.items():
        if key not in ("id", "type"):
            shaped[key] = value
    if item_type == "message":
        role = item.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request("Message items require 'role' field")
        content = item.get("content", [])
        if isinstance(content, str):
            content = [_text_part(role, content)]
        elif not isinstance(content, list):
            raise bad_request("a message's content must be a string or a list of parts")
        shaped["content"] = content
    if shaped.get("status") is None:
        shaped["status"] = "completed"
    warning = (
        None
        if item_type in IMPLEMENTED_ITEM_TYPES
        else f"Item type '{item_type}' is accepted but not yet implemented. "
        "The item will be stored but may not function as expected."
    )
    return shaped, warning


def shape_items(value: object) -> tuple[list[dict[str, Any]], list[str]]:
    """The `items` of a create or an add: at most 20, each shaped; the warnings."""
    if not isinstance(value, list):
        raise bad_request("Missing or invalid 'items' field")
    if len(value) > MAX_ITEMS_PER_REQUEST:
        raise bad_request(f"Cannot add more than {MAX_ITEMS_PER_REQUEST} items at a time")
    shaped: list[dict[str, Any]] = []
    warnings: list[str] = []
    seen: set[str] = set()
    for item in value:
        if isinstance(item, dict) and item.get("type") == "item_reference":
            ref = item.get("id")
            if not isinstance(ref, str) or not ref:
                raise bad_request("item_reference requires 'id' field")
            shaped.append({"type": "item_reference", "id": ref})
            continue
        body, warning = shape_item(item)
        if body["id"] in seen:
            raise bad_request(f"Item '{body['id']}' is given twice")
        seen.add(body["id"])
        shaped.append(body)
        if warning is not None:
            warnings.append(warning)
    return shaped, warnings


# --- answers ----------------------------------------------------------------------------------


def conversation_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "object": "conversation",
        "created_at": conv.created_at,
        "metadata": conv.metadata,
    }


def deleted_json(conv_id: str) -> dict[str, Any]:
    return {"id": conv_id, "object": "conversation.deleted", "deleted": True}


def list_json(items: list[Item], has_more: bool) -> dict[str, Any]:
    """A page of items, as 1.13 lists them (the item JSON as stored)."""
    return {
        "object": "list",
        "data": [item.body for item in items],
        "has_more": has_more,
        "first_id": items[0].id if items else None,
        "last_id": items[-1].id if items else None,
    }


def added_json(items: list[dict[str, Any]], warnings: list[str]) -> dict[str, Any]:
    """The answer to an add, as 1.13 (`warnings` only when there are some)."""
    answer: dict[str, Any] = {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }
    if warnings:
        answer["warnings"] = warnings
    return answer


# --- the I/O: one request against the store ----------------------------------------------------


def check_method(route: str, method: str, path: str) -> str:
    """The method as served (HEAD reads as GET); 405 for any other, in 1.13's words."""
    allowed = ALLOW[route].split(",")
    if method not in allowed:
        raise ConvError(405, "method_not_allowed", invalid_url(method, path), allow=ALLOW[route])
    return "GET" if method == "HEAD" else method


async def _resolve_references(
    store: HistoryStore, tenant: str, conv_id: str, bodies: list[dict[str, Any]], given: set[Any]
) -> list[dict[str, Any]]:
    """Refuse ids the conversation already holds (1.13's item_already_in_conversation);
    an item_reference names one of them, so it always lands here or on a 404. Only the
    ids the client gave are looked up (a new one is 200 random bits)."""
    for body in bodies:
        if body["id"] not in given:
            continue
        held = await store.get_item(tenant, conv_id, body["id"])
        if body["type"] == "item_reference" and held is None:
            raise not_found(f"Referenced item '{body['id']}' not found")
        if held is not None:
            raise ConvError(400, "item_already_in_conversation", "Item already in conversation")
    return bodies


async def serve(
    store: HistoryStore,
    tenant: str,
    route: str,
    method: str,
    conv_id: str,
    item_id: str,
    query: str,
    body: bytes | bytearray | memoryview,
) -> dict[str, Any]:
    """One Conversations API call (the method already checked): the answer's JSON (200),
    or ConvError; the store's StorageUnavailable goes through."""
    if route == "collection":
        request = parse_body(body)
        metadata = create_metadata(request)
        items, _warnings = shape_items(request.get("items", []))
        for it in items:
            if it["type"] == "item_reference":  # a new conversation holds nothing to name
                raise not_found(f"Referenced item '{it['id']}' not found")
        conv = Conversation(
            id=new_conversation_id(), created_at=int(time.time()), metadata=metadata
        )
        await store.create_conversation(tenant, conv, items)
        return conversation_json(conv)
    request = parse_body(body) if method == "POST" else {}
    listing = parse_list_query(query) if route == "items" and method == "GET" else None
    conv, tenant = await owner(store, tenant, conv_id)
    if route == "conversation":
        if method == "GET":
            return conversation_json(conv)
        if method == "DELETE":
            if not await store.delete_conversation(tenant, conv_id):
                raise not_found()
            return deleted_json(conv_id)
        updated = await store.update_conversation(
            tenant, conv_id, patched_metadata(conv.metadata, request)
        )
        if updated is None:
            raise not_found()
        return conversation_json(updated)
    if route == "items":
        if listing is not None:
            page = await store.list_items(tenant, conv_id, *listing)
            if page is None:
                raise not_found()
            return list_json(page.items, page.has_more)
        raw = request.get("items")
        items, warnings = shape_items(raw)
        given = {item.get("id") for item in raw if isinstance(item, dict)}  # type: ignore[union-attr]
        await _resolve_references(store, tenant, conv_id, items, given)
        added = await store.add_items(tenant, conv_id, items)
        if added is None:
            raise not_found()
        return added_json([item.body for item in added], warnings)
    # route == "item"
    if method == "GET":
        item = await store.get_item(tenant, conv_id, item_id)
        if item is None:
            raise not_found(ITEM_NOT_FOUND)
        return item.body
    if not await store.delete_item(tenant, conv_id, item_id):
        raise not_found(ITEM_NOT_FOUND)
    return conversation_json(conv)


async def owner(store: HistoryStore, tenant: str, conv_id: str) -> tuple[Conversation, str]:
    """The conversation and the tenant it is stored under: the caller's, or "" (no tenant):
    as in the Rust SMG 1.13, a record stored without a tenant identity stays readable (and
    usable) by every caller, while another tenant's is a missing one (404)."""
    conv = await store.get_conversation(tenant, conv_id)
    if conv is None and tenant:
        conv = await store.get_conversation("", conv_id)
        tenant = ""
    if conv is None:
        raise not_found()
    return conv, tenant
