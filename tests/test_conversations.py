"""The Conversations API's pure shaping (smg.dataplane.conversations), with exact values,
and `serve` against the memory store directly (no processes)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import pytest

from smg.dataplane import conversations as cv
from smg.history.memory import MemoryStore
from smg.history.records import Conversation, Item


def test_match_route() -> None:
    assert cv.match_route("/v1/conversations") == ("collection", "", "")
    assert cv.match_route("/v1/conversations/conv_1") == ("conversation", "conv_1", "")
    assert cv.match_route("/v1/conversations/conv_1/items") == ("items", "conv_1", "")
    assert cv.match_route("/v1/conversations/conv_1/items/msg_2") == ("item", "conv_1", "msg_2")
    assert cv.match_route("/v1/conversations/c%2F1/items/m%20x") == ("item", "c/1", "m x")
    for path in (
        "/v1/conversations/",
        "/v1/conversationsx",
        "/v1/conversations//items",
        "/v1/conversations/c/other",
        "/v1/conversations/c/items/i/more",
        "/v1/conversations/c/items/",
    ):
        assert cv.match_route(path) is None, path


def test_check_method() -> None:
    assert cv.check_method("collection", "POST", "/p") == "POST"
    assert cv.check_method("conversation", "HEAD", "/p") == "GET"
    assert cv.check_method("item", "DELETE", "/p") == "DELETE"
    # The 405s as the Rust SMG 1.13 binary answers them (allow line and message).
    with pytest.raises(cv.ConvError) as err:
        cv.check_method("conversation", "PUT", "/v1/conversations/c")
    assert (err.value.status, err.value.code, err.value.message, err.value.allow) == (
        405,
        "method_not_allowed",
        "Invalid URL (PUT /v1/conversations/c)",
        "GET,HEAD,POST,DELETE",
    )
    with pytest.raises(cv.ConvError) as err:
        cv.check_method("collection", "GET", "/v1/conversations")
    assert err.value.allow == "POST"
    with pytest.raises(cv.ConvError) as err:
        cv.check_method("items", "DELETE", "/v1/conversations/c/items")
    assert err.value.allow == "GET,HEAD,POST"
    with pytest.raises(cv.ConvError) as err:
        cv.check_method("item", "POST", "/v1/conversations/c/items/i")
    assert err.value.allow == "GET,HEAD,DELETE"


def test_tenants() -> None:
    table = cv.tenant_keys_by_secret("shared", {"ka": "team-a", "kb": "team-b"})
    assert table == {
        b"shared": "auth:" + hashlib.sha256(b"shared").hexdigest(),
        b"ka": "auth:team-a",
        b"kb": "auth:team-b",
    }
    assert cv.resolve_tenant(b"ka", table, None) == "auth:team-a"
    # A gateway key wins over the trusted header (as the 1.13 binary answers).
    assert cv.resolve_tenant(b"kb", table, b"other") == "auth:team-b"
    assert cv.resolve_tenant(None, {}, b"  t1 ") == "header:t1"
    assert cv.resolve_tenant(None, {}, b"  ") == ""
    assert cv.resolve_tenant(None, {}, None) == ""
    # A caller's own key (not the gateway's; no serving keys set) names no tenant.
    assert cv.resolve_tenant(b"sk-own", {}, None) == ""
    assert cv.tenant_keys_by_secret(None, {}) == {}


def test_parse_list_query() -> None:
    assert cv.parse_list_query("") == (20, "desc", None)
    assert cv.parse_list_query("limit=2&order=asc&after=msg_1") == (2, "asc", "msg_1")
    assert cv.parse_list_query("limit=100&order=desc&after=") == (100, "desc", None)
    for query, message in (
        ("limit=0", "limit must be an integer between 1 and 100"),
        ("limit=101", "limit must be an integer between 1 and 100"),
        ("limit=abc", "limit must be an integer between 1 and 100"),
        ("limit=-1", "limit must be an integer between 1 and 100"),
        ("order=sideways", "order must be 'asc' or 'desc'"),
    ):
        with pytest.raises(cv.ConvError) as err:
            cv.parse_list_query(query)
        assert (err.value.status, err.value.code, err.value.message) == (
            400,
            "invalid_request",
            message,
        )


def test_parse_body() -> None:
    assert cv.parse_body(b"") == {}
    assert cv.parse_body(b' {"a": 1} ') == {"a": 1}
    with pytest.raises(cv.ConvError) as err:
        cv.parse_body(b"{bad")
    assert (err.value.status, err.value.code) == (400, "invalid_json")
    assert err.value.message.startswith("invalid JSON body: ")
    with pytest.raises(cv.ConvError) as err:
        cv.parse_body(b"[]")
    assert err.value.message == "the request body must be a JSON object"


def test_metadata() -> None:
    assert cv.create_metadata({}) == {}
    assert cv.create_metadata({"metadata": None}) == {}
    assert cv.create_metadata({"metadata": {"a": "b"}}) == {"a": "b"}
    for body, message in (
        ({"metadata": "x"}, "metadata must be an object"),
        ({"metadata": {"a": 1}}, "metadata value of 'a' must be a string"),
        (
            {"metadata": {str(i): "v" for i in range(17)}},
            "metadata cannot have more than 16 properties",
        ),
    ):
        with pytest.raises(cv.ConvError) as err:
            cv.create_metadata(body)
        assert (err.value.status, err.value.message) == (400, message)
    current = {"k1": "v1", "k2": "v2"}
    assert cv.patched_metadata(current, {"metadata": {"k1": None, "k3": "v3"}}) == {
        "k2": "v2",
        "k3": "v3",
    }
    assert cv.patched_metadata(current, {}) == current
    assert current == {"k1": "v1", "k2": "v2"}  # not changed in place
    full = {str(i): "v" for i in range(16)}
    with pytest.raises(cv.ConvError):
        cv.patched_metadata(full, {"metadata": {"new": "v"}})
    assert cv.patched_metadata(full, {"metadata": {"0": None, "new": "v"}})["new"] == "v"


def test_shape_item() -> None:
    body, warning = cv.shape_item({"role": "user", "content": "hi", "id": "msg_1"})
    assert (body, warning) == (
        {
            "id": "msg_1",
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "hi"}],
            "status": "completed",
        },
        None,
    )
    body, _ = cv.shape_item({"type": "message", "role": "assistant", "content": "yo", "id": "a"})
    assert body["content"] == [{"type": "output_text", "text": "yo", "annotations": []}]
    body, _ = cv.shape_item({"type": "message", "role": "user", "status": "in_progress"})
    assert re.fullmatch(r"msg_[0-9a-f]{50}", body["id"])
    assert (body["content"], body["status"]) == ([], "in_progress")
    body, warning = cv.shape_item({"type": "function_call", "call_id": "c", "name": "f"})
    assert re.fullmatch(r"fc_[0-9a-f]{50}", body["id"])
    assert body == {
        "id": body["id"],
        "type": "function_call",
        "call_id": "c",
        "name": "f",
        "status": "completed",
    }
    assert warning == (
        "Item type 'function_call' is accepted but not yet implemented. "
        "The item will be stored but may not function as expected."
    )
    for item, message in (
        ({"type": "bogus"}, "Unsupported item type 'bogus'. Supported types: message, "),
        ({"type": "message", "content": "x"}, "Message items require 'role' field"),
        ({"role": "user", "content": 5}, "a message's content must be a string or a list"),
        ({"role": "user", "id": ""}, "an item's id must be a non-empty string"),
        ("text", "each item must be an object"),
    ):
        with pytest.raises(cv.ConvError) as err:
            cv.shape_item(item)
        assert err.value.status == 400
        assert err.value.message.startswith(message), err.value.message


def test_shape_items() -> None:
    items, warnings = cv.shape_items(
        [{"role": "user", "content": "a", "id": "m1"}, {"type": "item_reference", "id": "m0"}]
    )
    assert items[1] == {"type": "item_reference", "id": "m0"}
    assert warnings == []
    for value, message in (
        (None, "Missing or invalid 'items' field"),
        ({"a": 1}, "Missing or invalid 'items' field"),
        ([{"role": "user"}] * 21, "Cannot add more than 20 items at a time"),
        ([{"role": "user", "id": "x"}] * 2, "Item 'x' is given twice"),
        ([{"type": "item_reference"}], "item_reference requires 'id' field"),
    ):
        with pytest.raises(cv.ConvError) as err:
            cv.shape_items(value)
        assert (err.value.status, err.value.message) == (400, message)
    assert cv.shape_items([{"role": "user"}] * 20)[0][19]["role"] == "user"


def test_answers() -> None:
    conv = Conversation(id="conv_1", created_at=7, metadata={"a": "b"})
    assert cv.conversation_json(conv) == {
        "id": "conv_1",
        "object": "conversation",
        "created_at": 7,
        "metadata": {"a": "b"},
    }
    assert cv.deleted_json("conv_1") == {
        "id": "conv_1",
        "object": "conversation.deleted",
        "deleted": True,
    }
    items = [
        Item(id=f"m{i}", conversation_id="conv_1", seq=i, created_at=7, body={"id": f"m{i}"})
        for i in (1, 2)
    ]
    assert cv.list_json(items, True) == {
        "object": "list",
        "data": [{"id": "m1"}, {"id": "m2"}],
        "has_more": True,
        "first_id": "m1",
        "last_id": "m2",
    }
    assert cv.list_json([], False) == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
    assert cv.added_json([{"id": "a"}], ["w"]) == {
        "object": "list",
        "data": [{"id": "a"}],
        "first_id": "a",
        "last_id": "a",
        "has_more": False,
        "warnings": ["w"],
    }
    assert "warnings" not in cv.added_json([], [])


def _serve(store: MemoryStore, tenant: str, method: str, path: str, body: bytes = b"") -> Any:
    route, _, query = path.partition("?")
    matched = cv.match_route(route)
    assert matched is not None
    return asyncio.run(
        cv.serve(store, tenant, matched[0], method, matched[1], matched[2], query, body)
    )


def _error(store: MemoryStore, tenant: str, method: str, path: str, body: bytes = b"") -> Any:
    with pytest.raises(cv.ConvError) as err:
        _serve(store, tenant, method, path, body)
    return err.value.status, err.value.code, err.value.message


def test_serve_on_memory_store() -> None:
    store = MemoryStore()
    conv = _serve(
        store,
        "t",
        "POST",
        "/v1/conversations",
        b'{"metadata":{"a":"b"},"items":[{"role":"user","content":"hi","id":"m1"}]}',
    )
    cid = conv["id"]
    assert re.fullmatch(r"conv_[0-9a-f]{50}", cid)
    assert conv["metadata"] == {"a": "b"}
    base = f"/v1/conversations/{cid}"
    added = _serve(
        store, "t", "POST", base + "/items", b'{"items":[{"role":"user","content":"x","id":"m2"}]}'
    )
    assert [d["id"] for d in added["data"]] == ["m2"]
    page = _serve(store, "t", "GET", base + "/items?limit=1")
    assert (page["first_id"], page["has_more"]) == ("m2", True)
    page = _serve(store, "t", "GET", base + "/items?limit=1&after=m2")
    assert (page["first_id"], page["has_more"]) == ("m1", False)
    assert _error(
        store, "t", "POST", base + "/items", b'{"items":[{"role":"user","id":"m1"}]}'
    ) == (
        400,
        "item_already_in_conversation",
        "Item already in conversation",
    )
    assert _error(
        store, "t", "POST", base + "/items", b'{"items":[{"type":"item_reference","id":"zz"}]}'
    ) == (404, "not_found", "Referenced item 'zz' not found")
    assert _serve(store, "t", "GET", base + "/items/m1")["content"][0]["text"] == "hi"
    assert _error(store, "t", "GET", base + "/items/nope") == (
        404,
        "not_found",
        "Item not found in this conversation",
    )
    # Another tenant's id is a missing one, on every route.
    for method, path in (
        ("GET", base),
        ("POST", base),
        ("DELETE", base),
        ("GET", base + "/items"),
        ("POST", base + "/items"),
        ("GET", base + "/items/m1"),
        ("DELETE", base + "/items/m1"),
    ):
        body = b'{"items":[]}' if method == "POST" else b""
        assert _error(store, "other", method, path, body) == (
            404,
            "not_found",
            "Conversation not found",
        ), (method, path)
    assert _serve(store, "t", "DELETE", base + "/items/m1")["id"] == cid
    assert _error(store, "t", "DELETE", base + "/items/m1")[0] == 404
    updated = _serve(store, "t", "POST", base, b'{"metadata":{"a":null,"c":"d"}}')
    assert updated["metadata"] == {"c": "d"}
    assert _serve(store, "t", "DELETE", base) == cv.deleted_json(cid)
    assert _error(store, "t", "GET", base) == (404, "not_found", "Conversation not found")


def test_metric_paths_name_routes_not_ids() -> None:
    from smg.dataplane.app import _metric_path

    assert _metric_path("/v1/conversations") == "/v1/conversations"
    assert _metric_path("/v1/conversations/conv_1") == "/v1/conversations/{id}"
    assert _metric_path("/v1/conversations/conv_1/items") == "/v1/conversations/{id}/items"
    assert _metric_path("/v1/conversations/c/items/i") == "/v1/conversations/{id}/items/{item_id}"
    assert _metric_path("/v1/conversations/c/x") == "other"


def test_records_without_a_tenant_serve_every_caller() -> None:
    """As the Rust SMG 1.13 (its --tenant-api-key help, and its binary): a conversation
    stored with no tenant is found by any tenant; a tenant's is not found without one."""
    store = MemoryStore()
    open_conv = _serve(store, "", "POST", "/v1/conversations", b'{"items":[{"role":"user"}]}')
    base = f"/v1/conversations/{open_conv['id']}"
    assert _serve(store, "auth:a", "GET", base)["id"] == open_conv["id"]
    added = _serve(store, "auth:a", "POST", base + "/items", b'{"items":[{"role":"user"}]}')
    assert len(_serve(store, "", "GET", base + "/items")["data"]) == 2
    assert _serve(store, "", "GET", f"{base}/items/{added['first_id']}")["role"] == "user"
    owned = _serve(store, "auth:a", "POST", "/v1/conversations", b"{}")
    assert _error(store, "", "GET", f"/v1/conversations/{owned['id']}")[0] == 404
    assert _serve(store, "auth:b", "DELETE", base)["deleted"] is True
