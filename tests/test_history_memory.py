"""MemoryStore, the memory history backend, as a pure class: every method, the count bounds,
retention on an injected clock, and tenancy (another tenant's id is a missing one)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from typing import Any, TypeVar

from smg.history.memory import MemoryStore
from smg.history.records import Conversation, Item, ItemPage, ResponseRecord
from smg.history.store import item_id_of, make_item_id, new_conversation_id

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def conv(cid: str = "conv_a", metadata: dict[str, str] | None = None) -> Conversation:
    return Conversation(id=cid, created_at=1, metadata=metadata or {})


def msg(text: str, item_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "message", "role": "user", "content": text}
    if item_id is not None:
        body["id"] = item_id
    return body


def response(rid: str, status: str = "completed") -> ResponseRecord:
    return ResponseRecord(
        id=rid,
        created_at=5,
        model="m",
        previous_response_id=None,
        conversation_id=None,
        input_items=[msg("in")],
        output_items=[msg("out")],
        body={"id": rid, "status": status},
    )


def ids(page: ItemPage | None) -> list[str]:
    assert page is not None
    return [item.id for item in page.items]


def test_ids_follow_the_rust_shapes() -> None:
    assert re.fullmatch(r"conv_[0-9a-f]{50}", new_conversation_id())
    assert re.fullmatch(r"msg_[0-9a-f]{50}", make_item_id("message"))
    assert re.fullmatch(r"fc_[0-9a-f]{50}", make_item_id("function_call"))
    assert re.fullmatch(r"mcpl_[0-9a-f]{50}", make_item_id("mcp_list_tools"))
    assert re.fullmatch(r"cus_[0-9a-f]{50}", make_item_id("custom_tool_call"))
    assert re.fullmatch(r"itm_[0-9a-f]{50}", make_item_id(None))
    assert re.fullmatch(r"itm_[0-9a-f]{50}", make_item_id(""))
    assert item_id_of({"id": "msg_given", "type": "message"}) == "msg_given"
    assert item_id_of({"id": "", "type": "reasoning"}).startswith("rs_")


def test_responses_put_get_delete() -> None:
    store = MemoryStore(clock=Clock())
    record = response("resp_1")
    run(store.put_response("", record))
    assert run(store.get_response("", "resp_1")) == record
    assert run(store.get_response("", "resp_2")) is None
    assert run(store.delete_response("", "resp_1")) is True
    assert run(store.delete_response("", "resp_1")) is False
    assert run(store.get_response("", "resp_1")) is None


def test_conversation_lifecycle() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    added = run(store.create_conversation("", conv(metadata={"k": "v"}), [msg("a"), msg("b", "x")]))
    assert [(item.seq, item.conversation_id, item.created_at) for item in added] == [
        (1, "conv_a", 1000),
        (2, "conv_a", 1000),
    ]
    assert added[0].id.startswith("msg_") and added[0].body["id"] == added[0].id
    assert added[1] == Item(
        id="x",
        conversation_id="conv_a",
        seq=2,
        created_at=1000,
        body={"type": "message", "role": "user", "content": "b", "id": "x"},
    )
    assert run(store.get_conversation("", "conv_a")) == conv(metadata={"k": "v"})
    updated = run(store.update_conversation("", "conv_a", {"n": "1"}))
    assert updated == conv(metadata={"n": "1"})
    assert run(store.get_conversation("", "conv_a")) == updated
    assert run(store.update_conversation("", "conv_zz", {})) is None
    assert run(store.get_item("", "conv_a", "x")) == added[1]
    assert run(store.get_item("", "conv_a", "nope")) is None
    assert run(store.delete_conversation("", "conv_a")) is True
    assert run(store.delete_conversation("", "conv_a")) is False
    assert run(store.get_conversation("", "conv_a")) is None
    assert run(store.get_item("", "conv_a", "x")) is None
    assert store.counts() == {"responses": 0, "conversations": 0, "items": 0}


def test_add_items_and_seq_strictly_increasing() -> None:
    store = MemoryStore(clock=Clock())
    run(store.create_conversation("", conv(), [msg("a", "i1")]))
    more = run(store.add_items("", "conv_a", [msg("b", "i2"), msg("c", "i3")]))
    assert more is not None and [(i.id, i.seq) for i in more] == [("i2", 2), ("i3", 3)]
    assert run(store.add_items("", "conv_missing", [msg("d")])) is None
    # A deleted item's seq is never reused; the same id again moves to the end.
    assert run(store.delete_item("", "conv_a", "i3")) is True
    assert run(store.delete_item("", "conv_a", "i3")) is False
    again = run(store.add_items("", "conv_a", [msg("e", "i1")]))
    assert again is not None and [(i.id, i.seq) for i in again] == [("i1", 4)]
    assert ids(run(store.list_items("", "conv_a", 10, "asc", None))) == ["i2", "i1"]
    assert store.counts()["items"] == 2


def test_list_items_order_limit_after() -> None:
    store = MemoryStore(clock=Clock())
    run(store.create_conversation("", conv(), [msg(str(n), f"i{n}") for n in range(1, 6)]))
    asc = run(store.list_items("", "conv_a", 2, "asc", None))
    assert asc is not None and ids(asc) == ["i1", "i2"] and asc.has_more is True
    assert ids(run(store.list_items("", "conv_a", 2, "asc", "i2"))) == ["i3", "i4"]
    last = run(store.list_items("", "conv_a", 2, "asc", "i4"))
    assert last is not None and ids(last) == ["i5"] and last.has_more is False
    desc = run(store.list_items("", "conv_a", 3, "desc", None))
    assert desc is not None and ids(desc) == ["i5", "i4", "i3"] and desc.has_more is True
    tail = run(store.list_items("", "conv_a", 3, "desc", "i3"))
    assert tail is not None and ids(tail) == ["i2", "i1"] and tail.has_more is False
    exact = run(store.list_items("", "conv_a", 5, "asc", None))
    assert exact is not None and exact.has_more is False
    # An unknown cursor is ignored (the Rust SMG's memory store does the same).
    assert ids(run(store.list_items("", "conv_a", 1, "asc", "nope"))) == ["i1"]
    assert run(store.list_items("", "conv_missing", 5, "asc", None)) is None
    empty = run(store.list_items("", "conv_a", 5, "asc", "i5"))
    assert empty == ItemPage(items=[], has_more=False)


def test_tenancy_another_tenants_id_is_missing() -> None:
    store = MemoryStore(clock=Clock())
    run(store.create_conversation("t1", conv(), [msg("a", "i1")]))
    run(store.put_response("t1", response("resp_1")))
    for tenant in ("t2", ""):
        assert run(store.get_conversation(tenant, "conv_a")) is None
        assert run(store.update_conversation(tenant, "conv_a", {"x": "y"})) is None
        assert run(store.add_items(tenant, "conv_a", [msg("b")])) is None
        assert run(store.list_items(tenant, "conv_a", 10, "asc", None)) is None
        assert run(store.get_item(tenant, "conv_a", "i1")) is None
        assert run(store.delete_item(tenant, "conv_a", "i1")) is False
        assert run(store.delete_conversation(tenant, "conv_a")) is False
        assert run(store.get_response(tenant, "resp_1")) is None
        assert run(store.delete_response(tenant, "resp_1")) is False
    # The owner's records are untouched by all that.
    assert run(store.get_conversation("t1", "conv_a")) == conv()
    assert ids(run(store.list_items("t1", "conv_a", 10, "asc", None))) == ["i1"]
    assert run(store.get_response("t1", "resp_1")) == response("resp_1")
    # The same id under two tenants: two records.
    run(store.create_conversation("t2", conv(metadata={"who": "t2"}), []))
    assert run(store.get_conversation("t1", "conv_a")) == conv()
    assert run(store.get_conversation("t2", "conv_a")) == conv(metadata={"who": "t2"})


def test_max_responses_evicts_oldest_but_not_a_running_one() -> None:
    store = MemoryStore(max_responses=2, clock=Clock())
    run(store.put_response("", response("r1", status="in_progress")))
    run(store.put_response("", response("r2")))
    run(store.put_response("", response("r3")))
    # r1 is the oldest but still running: r2 goes.
    assert run(store.get_response("", "r1")) is not None
    assert run(store.get_response("", "r2")) is None
    assert run(store.get_response("", "r3")) is not None
    run(store.put_response("", response("r1")))  # r1 done: rewritten, now the newest
    run(store.put_response("", response("r4")))
    assert [run(store.get_response("", r)) is not None for r in ("r1", "r3", "r4")] == [
        True,
        False,
        True,
    ]
    assert store.counts()["responses"] == 2


def test_max_items_evicts_oldest_items_from_their_conversations() -> None:
    store = MemoryStore(max_items=3, clock=Clock())
    run(store.create_conversation("", conv("conv_a"), [msg("a", "a1"), msg("a", "a2")]))
    run(store.create_conversation("", conv("conv_b"), [msg("b", "b1"), msg("b", "b2")]))
    assert store.counts()["items"] == 3
    assert ids(run(store.list_items("", "conv_a", 10, "asc", None))) == ["a2"]
    assert run(store.get_item("", "conv_a", "a1")) is None
    run(store.add_items("", "conv_b", [msg("b", "b3")]))
    assert ids(run(store.list_items("", "conv_a", 10, "asc", None))) == []
    assert ids(run(store.list_items("", "conv_b", 10, "asc", None))) == ["b1", "b2", "b3"]
    # The conversation itself stays (an item bound drops items, not conversations).
    assert run(store.get_conversation("", "conv_a")) is not None


def test_retention_drops_expired_records_on_write_and_read() -> None:
    clock = Clock()
    store = MemoryStore(retention_secs=100, clock=clock)
    run(store.put_response("", response("r_old")))
    run(store.create_conversation("", conv("conv_old"), [msg("x", "o1")]))
    run(store.create_conversation("", conv("conv_used"), [msg("y", "u1")]))
    clock.now += 60
    assert run(store.get_conversation("", "conv_used")) is not None  # a read is a use
    clock.now += 60  # r_old and conv_old are 120 s old; conv_used was used 60 s ago
    assert run(store.get_response("", "r_old")) is None  # expired, dropped on read
    run(store.put_response("", response("r_new")))  # a write sweeps the rest
    assert store.counts() == {"responses": 1, "conversations": 1, "items": 1}
    assert run(store.get_conversation("", "conv_old")) is None
    assert ids(run(store.list_items("", "conv_used", 10, "asc", None))) == ["u1"]
    clock.now += 101
    assert run(store.get_item("", "conv_used", "u1")) is None
    assert store.counts()["conversations"] == 0 and store.counts()["items"] == 0


def test_retention_zero_keeps_records() -> None:
    clock = Clock()
    store = MemoryStore(retention_secs=0, clock=clock)
    run(store.put_response("", response("r1")))
    run(store.create_conversation("", conv(), [msg("a")]))
    clock.now += 10**9
    run(store.put_response("", response("r2")))
    assert run(store.get_response("", "r1")) is not None
    assert run(store.get_conversation("", "conv_a")) is not None


def test_recreating_a_conversation_id_replaces_it() -> None:
    store = MemoryStore(clock=Clock())
    run(store.create_conversation("", conv(metadata={"v": "1"}), [msg("a", "i1")]))
    run(store.create_conversation("", conv(metadata={"v": "2"}), [msg("b", "i2")]))
    assert run(store.get_conversation("", "conv_a")) == conv(metadata={"v": "2"})
    page = run(store.list_items("", "conv_a", 10, "asc", None))
    assert page is not None and [(i.id, i.seq) for i in page.items] == [("i2", 1)]
    assert store.counts()["items"] == 1
