"""smg.dataplane.responses' pure parts: routes, the input as items, the upstream body from a
stored chain, the record of an answer, the Observer's pass-through and SSE scan, and the
GET/DELETE/input_items answers over a MemoryStore."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from smg.dataplane import responses
from smg.dataplane.conversations import ConvError
from smg.history.memory import MemoryStore
from smg.history.records import ResponseRecord


def test_match_route() -> None:
    assert responses.match_route("/v1/responses/resp_1") == ("response", "resp_1")
    assert responses.match_route("/v1/responses/resp_1/input_items") == ("input_items", "resp_1")
    assert responses.match_route("/v1/responses/") is None
    assert responses.match_route("/v1/responses/a/b") is None
    assert responses.match_route("/v1/responses/a/input_items/x") is None


def test_input_items_shapes_strings_and_keeps_ids() -> None:
    items = responses.input_items("hi")
    assert len(items) == 1 and items[0]["id"].startswith("msg_")
    assert {k: v for k, v in items[0].items() if k != "id"} == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "hi"}],
        "status": "completed",
    }
    given = responses.input_items(
        [
            {"role": "assistant", "content": "a", "id": "msg_keep"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "reasoning", "summary": []},
        ]
    )
    assert given[0] == {
        "role": "assistant",
        "content": [{"type": "output_text", "text": "a", "annotations": []}],
        "id": "msg_keep",
        "type": "message",
        "status": "completed",
    }
    # New ids as 1.13's extract_input_items: fc_ for both function items, item_ otherwise.
    assert [g["id"][: g["id"].index("_")] for g in given[1:]] == ["fc", "fc", "item"]
    assert all(len(g["id"].split("_", 1)[1]) == 50 for g in given[1:])
    assert given[1]["output"] == "42"
    with pytest.raises(ConvError):
        responses.input_items(5)
    with pytest.raises(ConvError):
        responses.input_items(["x"])


def test_history_fields() -> None:
    assert responses.conversation_id({"conversation": {"id": "conv_1"}}) == "conv_1"
    assert responses.conversation_id({"conversation": "conv_2"}) == "conv_2"
    assert responses.conversation_id({}) is None
    with pytest.raises(ConvError):
        responses.conversation_id({"conversation": 3})
    assert responses.previous_id({"previous_response_id": "resp_1"}) == "resp_1"
    with pytest.raises(ConvError):
        responses.previous_id({"previous_response_id": ""})


def _record(rid: str, prev: str | None, said: str, answered: str) -> ResponseRecord:
    return ResponseRecord(
        id=rid,
        created_at=1,
        model="m",
        previous_response_id=prev,
        input_items=[{"id": f"msg_in_{rid}", "type": "message", "role": "user", "content": said}],
        output_items=[
            {"id": f"msg_out_{rid}", "type": "message", "role": "assistant", "content": answered}
        ],
        body={"id": rid, "object": "response"},
    )


def test_upstream_body_from_chain() -> None:
    chain = [_record("r1", None, "one", "1"), _record("r2", "r1", "two", "2")]
    new = [{"id": "msg_new", "type": "message", "role": "user", "content": "three"}]
    body = {
        "model": "m",
        "input": "three",
        "previous_response_id": "r2",
        "conversation": "conv_x",
        "instructions": "now",
        "stream": True,
    }
    out = responses.upstream_body(body, responses.chain_items(chain), new)
    assert out == {
        "model": "m",
        "instructions": "now",
        "stream": True,
        "store": False,
        "input": [
            {"id": "msg_in_r1", "type": "message", "role": "user", "content": "one"},
            {"id": "msg_out_r1", "type": "message", "role": "assistant", "content": "1"},
            {"id": "msg_in_r2", "type": "message", "role": "user", "content": "two"},
            {"id": "msg_out_r2", "type": "message", "role": "assistant", "content": "2"},
            {"id": "msg_new", "type": "message", "role": "user", "content": "three"},
        ],
    }


def test_record_of_answer() -> None:
    answer = {
        "id": "resp_9",
        "created_at": 7,
        "model": "m",
        "previous_response_id": None,
        "output": [{"id": "msg_o", "type": "message"}, "junk"],
    }
    new = [{"id": "msg_i", "type": "message"}]
    record = responses.record_of(answer, new, "resp_8", "conv_1")
    assert record is not None
    assert (record.id, record.created_at, record.previous_response_id) == ("resp_9", 7, "resp_8")
    assert record.conversation_id == "conv_1"
    assert record.input_items == new
    assert record.output_items == [{"id": "msg_o", "type": "message"}]
    assert record.body["previous_response_id"] == "resp_8"
    assert record.body["conversation"] == {"id": "conv_1"}
    assert responses.record_of({"output": []}, new, None, None) is None


class _Writes:
    """`done` for an Observer: notes the answer and returns its write (a plain Future
    the test resolves), as DataPlane's store task."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()

    def __call__(self, answer: dict[str, Any]) -> asyncio.Future[None]:
        self.got.append(answer)
        return self.loop.create_future()


def test_observer_whole_answer() -> None:
    writes = _Writes()
    request = {"model": "m", "instructions": "be brief", "metadata": {"k": "v"}, "user": "u1"}
    obs = responses.Observer(b"{}", False, writes, "resp_0", "conv_1", True, request)
    assert obs.settle() is None
    out = obs.response(
        200,
        b'{"id":"resp_1","previous_response_id":null,"instructions":null,"model":"m-2",'
        b'"safety_identifier":null,"store":false}',
    )
    patched = {  # 1.13's patch_response_with_request_metadata
        "id": "resp_1",
        "previous_response_id": "resp_0",
        "instructions": "be brief",
        "model": "m-2",  # the answer's own model is kept
        "safety_identifier": "u1",
        "store": True,
        "metadata": {"k": "v"},
        "conversation": {"id": "conv_1"},
    }
    assert orjson.loads(out) == patched
    assert writes.got == [patched]  # stored as answered
    write = obs.settle()
    assert write is not None and not write.done()  # the exchange holds the answer for it
    assert obs.response(400, b'{"error":{}}') == b'{"error":{}}'  # errors pass untouched
    assert len(writes.got) == 1
    writes.loop.close()


def test_observer_whole_answer_store_false() -> None:
    """store=false: nothing stored, `store` says so; no previous_response_id added where the
    request had none; a missing model filled from the request (1.13)."""
    writes = _Writes()
    obs = responses.Observer(b"{}", False, lambda _a: None, None, None, False, {"model": "m"})
    assert orjson.loads(obs.response(200, b'{"id":"r","store":true}')) == {
        "id": "r",
        "store": False,
        "model": "m",
    }
    assert obs.settle() is None
    writes.loop.close()


CREATED = b'event: response.created\ndata: {"type":"response.created","response":{"id":"r"}}\n\n'
DELTA = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
COMPLETED = (
    b'event: response.completed\ndata: {"type":"response.completed",'
    b'"response":{"id":"r","output":[],"store":false}}\n\n'
)


def _event(kind: str, response: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "response": response})
    return b"event: %b\ndata: %b\n\n" % (kind.encode(), data)


@pytest.mark.parametrize("step", [1, 7, 50, 10_000])
def test_observer_stream_withholds_completed_until_finish(step: int) -> None:
    """Complete events go out as they come (a partial one waits for its end), the
    response.* ones patched as 1.13's rewrite_streaming_block (store, previous_response_id,
    conversation); from the response.completed event's first line on, nothing goes out
    before finish(), which starts the write that settle() hands the exchange."""
    writes = _Writes()
    obs = responses.Observer(b"{}", True, writes, "resp_0", "conv_1", True, {"model": "m"})
    stream = CREATED + DELTA + COMPLETED + b"data: [DONE]\n\n"
    relayed = b"".join(obs.feed(stream[i : i + step]) for i in range(0, len(stream), step))
    history = {"store": True, "previous_response_id": "resp_0", "conversation": {"id": "conv_1"}}
    assert relayed == _event("response.created", {"id": "r", **history}) + DELTA
    assert writes.got == [] and obs.settle() is None  # not stored before the stream ends
    completed = {"id": "r", "output": [], **history}
    assert obs.finish() == _event("response.completed", completed) + b"data: [DONE]\n\n"
    assert writes.got == [{**completed, "model": "m"}]
    assert obs.settle() is not None
    writes.loop.close()


def test_observer_stream_partial_event_waits_and_crlf() -> None:
    writes = _Writes()
    obs = responses.Observer(b"{}", True, writes, None, None)
    assert obs.feed(b'data: {"type":"x"}\r\n') == b""  # its end not seen yet
    assert obs.feed(b"\r\ndata: {") == b'data: {"type":"x"}\r\n\r\n'
    assert obs.finish() == b"data: {"  # a stream without response.completed: all goes out
    assert writes.got == [] and obs.settle() is None
    writes.loop.close()


def test_observer_stream_broken_after_completed_stores_nothing() -> None:
    """The worker broke the stream after response.completed: 1.13 stores nothing then,
    and the client gets the error event, not the withheld completed event."""
    writes = _Writes()
    obs = responses.Observer(b"{}", True, writes, None, None, False)
    assert obs.feed(DELTA + COMPLETED) == DELTA
    aborted = obs.abort("upstream_connection_closed", "gone")
    assert b"response.completed" not in aborted and aborted.endswith(b"data: [DONE]\n\n")
    assert writes.got == [] and obs.settle() is None
    writes.loop.close()


def test_observer_gives_up_on_an_endless_event() -> None:
    writes = _Writes()
    obs = responses.Observer(b"{}", True, writes, None, None)
    big = b"data: " + b"x" * responses.MAX_EVENT_BYTES
    assert obs.feed(big) == big  # no event is that long: relayed, unwatched from here on
    assert obs.feed(COMPLETED) == COMPLETED
    assert obs.finish() == b"" and writes.got == []
    writes.loop.close()


def test_serve_get_delete_input_items() -> None:
    async def run() -> None:
        store = MemoryStore()
        record = _record("r1", None, "one", "1")
        record.input_items = [
            {"id": f"msg_{n}", "type": "message", "role": "user", "content": str(n)}
            for n in range(3)
        ]
        await store.put_response("auth:a", record)
        got = await responses.serve(store, "auth:a", "response", "GET", "r1", "")
        assert got == {"id": "r1", "object": "response"}
        page = await responses.serve(
            store, "auth:a", "input_items", "GET", "r1", "limit=2&order=asc"
        )
        assert [i["id"] for i in page["data"]] == ["msg_0", "msg_1"]
        assert (page["first_id"], page["last_id"], page["has_more"]) == ("msg_0", "msg_1", True)
        rest = await responses.serve(store, "auth:a", "input_items", "GET", "r1", "after=msg_1")
        assert [i["id"] for i in rest["data"]] == ["msg_0"]  # desc by default
        with pytest.raises(ConvError) as err:  # another tenant: as missing
            await responses.serve(store, "auth:b", "response", "GET", "r1", "")
        assert err.value.status == 404
        gone = await responses.serve(store, "auth:a", "response", "DELETE", "r1", "")
        assert gone == {"id": "r1", "object": "response.deleted", "deleted": True}
        with pytest.raises(ConvError):
            await responses.serve(store, "auth:a", "response", "GET", "r1", "")

    asyncio.run(run())


def test_load_chain_oldest_first_and_unknown() -> None:
    async def run() -> None:
        store = MemoryStore()
        await store.put_response("", _record("r1", None, "one", "1"))
        await store.put_response("", _record("r2", "r1", "two", "2"))
        chain = await responses.load_chain(store, "auth:a", "r2")  # tenant-less: readable
        assert [r.id for r in chain] == ["r1", "r2"]
        with pytest.raises(ConvError) as err:
            await responses.load_chain(store, "", "nope")
        assert (err.value.status, err.value.code) == (400, "previous_response_not_found")

    asyncio.run(run())


def test_plan_history_fields_and_when_the_store_is_used() -> None:
    """`plan` (pure): active = a history backend, and history named or `store` not false."""
    got = responses.plan({"input": "x"}, True)
    assert (got.previous, got.conversation, got.keep, got.active) == (None, None, True, True)
    got = responses.plan({"input": "x", "store": False}, True)
    assert (got.keep, got.active) == (False, False)
    got = responses.plan({"store": False, "previous_response_id": "r1"}, True)
    assert (got.previous, got.keep, got.active) == ("r1", False, True)
    got = responses.plan({"conversation": {"id": "conv_1"}}, True)
    assert (got.conversation, got.active) == ("conv_1", True)
    assert responses.plan({"input": "x"}, False).active is False
    with pytest.raises(ConvError) as err:
        responses.plan({"previous_response_id": "r1"}, False)
    assert (err.value.status, err.value.code, err.value.message) == (
        400,
        "invalid_request",
        responses.DISABLED,
    )
    with pytest.raises(ConvError) as err:
        responses.plan({"previous_response_id": "r1", "conversation": "conv_1"}, True)
    assert err.value.code == "mutually_exclusive_parameters"


def test_expand_loads_the_chain_and_builds_the_upstream_body() -> None:
    """`expand` opens the store only when active; the upstream body is the chain then the
    new input, and the record of an answer puts the history field back."""

    async def run() -> None:
        store = MemoryStore()
        await store.put_response("auth:a", _record("r1", None, "one", "1"))
        opened: list[int] = []

        def open_store() -> tuple[MemoryStore, str]:
            opened.append(1)
            return store, "auth:a"

        body = {"model": "m", "input": "two", "previous_response_id": "r1"}
        got = await responses.expand(body, True, open_store)
        assert (got.store, got.tenant, got.conv_tenant, opened) == (store, "auth:a", "auth:a", [1])
        upstream = got.upstream(body)
        assert [i["id"] for i in upstream["input"][:2]] == ["msg_in_r1", "msg_out_r1"]
        assert upstream["input"][2]["content"] == [{"type": "input_text", "text": "two"}]
        assert (upstream["store"], "previous_response_id" in upstream) == (False, False)
        record = got.record({"id": "r2", "model": "m", "output": []})
        assert record is not None and record.previous_response_id == "r1"
        assert record.input_items == got.new_input

        unstored = {"model": "m", "input": "three", "store": False}
        got = await responses.expand(unstored, True, open_store)
        assert (got.active, got.store, len(opened)) == (False, None, 1)  # no store opened
        assert got.record({"id": "r3"}) is None
        assert got.upstream(unstored)["input"][0]["content"][0]["text"] == "three"

    asyncio.run(run())
