"""The memory history backend across processes: the control plane of a running `smg launch`
holds the one MemoryStore, and IpcStores in separate OS processes (as the data planes hold
them) write and read the same history through it. Plus the IPC handler's refusals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from gatewayutil import Gateway, running_gateway

from smg import ipc
from smg.history import open_store
from smg.history.ipc import IpcStore, handle
from smg.history.memory import MemoryStore
from smg.history.records import Conversation, ResponseRecord
from smg.history.store import StorageUnavailable

# Run in a second OS process: reads what the test process wrote, adds an item, and prints
# what it saw, so both processes are shown to share one store.
_OTHER_PROCESS = """
import asyncio, sys
import msgspec
from smg import ipc
from smg.history.ipc import IpcStore

async def main() -> None:
    store = IpcStore(ipc.control_plane_address(int(sys.argv[1])), timeout=10.0)
    conv = await store.get_conversation("t1", "conv_shared")
    other = await store.get_conversation("t2", "conv_shared")
    added = await store.add_items("t1", "conv_shared", [{"type": "message", "id": "from_b"}])
    page = await store.list_items("t1", "conv_shared", 10, "asc", None)
    resp = await store.get_response("t1", "resp_shared")
    print(msgspec.json.encode([conv, other, added, page, resp]).decode())

asyncio.run(main())
"""


def _address(gateway: Gateway) -> str:
    assert gateway.process is not None
    return ipc.control_plane_address(gateway.process.pid)


def test_two_processes_share_one_history() -> None:
    with running_gateway(["--history-memory-max-items", "3"]) as gateway:
        assert gateway.process is not None
        store = IpcStore(_address(gateway), timeout=10.0)

        async def write() -> list[Any]:
            items = await store.create_conversation(
                "t1",
                Conversation(id="conv_shared", created_at=7, metadata={"k": "v"}),
                [{"type": "message", "role": "user", "content": "hi", "id": "from_a"}],
            )
            await store.put_response(
                "t1", ResponseRecord(id="resp_shared", created_at=8, model="m", body={"x": 1})
            )
            return items

        items = asyncio.run(write())
        assert [(i.id, i.seq, i.conversation_id) for i in items] == [("from_a", 1, "conv_shared")]
        other = subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS, str(gateway.process.pid)],
            capture_output=True,
            timeout=30,
            check=True,
        )
        conv, foreign, added, page, resp = json.loads(other.stdout)
        assert conv == {"id": "conv_shared", "created_at": 7, "metadata": {"k": "v"}}
        assert foreign is None  # another tenant's id is a missing one, over IPC too
        assert [(i["id"], i["seq"]) for i in added] == [("from_b", 2)]
        assert [i["id"] for i in page["items"]] == ["from_a", "from_b"]
        assert resp["id"] == "resp_shared" and resp["body"] == {"x": 1}

        async def read_back() -> tuple[Any, ...]:
            page = await store.list_items("t1", "conv_shared", 10, "desc", None)
            # --history-memory-max-items 3 reaches the control plane's store: two more
            # items push the oldest out.
            await store.add_items("t1", "conv_shared", [{"id": "c1"}, {"id": "c2"}])
            bounded = await store.list_items("t1", "conv_shared", 10, "asc", None)
            deleted = await store.delete_conversation("t1", "conv_shared")
            gone = await store.get_conversation("t1", "conv_shared")
            return page, bounded, deleted, gone

        page_b, bounded, deleted, gone = asyncio.run(read_back())
        assert page_b is not None and [i.id for i in page_b.items] == ["from_b", "from_a"]
        assert bounded is not None and [i.id for i in bounded.items] == ["from_b", "c1", "c2"]
        assert (deleted, gone) == (True, None)


def test_history_backend_none_refuses_over_ipc() -> None:
    with running_gateway(["--history-backend", "none"], processes=1) as gateway:
        store = IpcStore(_address(gateway), timeout=10.0)
        with pytest.raises(StorageUnavailable, match="not enabled"):
            asyncio.run(store.get_conversation("", "conv_x"))


def test_unreachable_control_plane_is_storage_unavailable() -> None:
    # No process serves this name: connection refused, at once.
    store = IpcStore(ipc.control_plane_address(2**22 + 12345), timeout=2.0)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        asyncio.run(store.get_response("", "resp_x"))
    assert time.monotonic() - started < 2.0


def test_a_store_that_does_not_answer_times_out() -> None:
    """A control plane that accepts the call and never answers: StorageUnavailable once the
    timeout has passed, not a hung request."""
    address = f"\0smg-test-history-{os.getpid()}"

    async def scenario() -> float:
        async def never(_message: Any) -> Any:
            await asyncio.sleep(30)

        server = await ipc.serve(address, never)
        try:
            store = IpcStore(address, timeout=0.3)
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="did not answer"):
                await store.list_items("", "conv_x", 5, "asc", None)
            return time.monotonic() - started
        finally:
            server.close()

    took = asyncio.run(scenario())
    assert 0.25 <= took < 2.0


def test_handle_refuses_bad_calls() -> None:
    store = MemoryStore()
    assert asyncio.run(handle(store, {"kind": "history", "op": "drop_all", "args": {}})) == {
        "error": "unknown history op 'drop_all'"
    }
    bad = asyncio.run(
        handle(store, {"kind": "history", "op": "get_item", "tenant": "", "args": {"conv_id": 1}})
    )
    assert bad["error"].startswith("malformed history call")
    assert asyncio.run(handle(store, {"kind": "history", "op": "get_item", "tenant": 3})) == {
        "error": "malformed history call"
    }
    assert asyncio.run(handle(None, {"kind": "history", "op": "get_item"})) == {
        "error": "the memory history backend is not enabled"
    }
    ok = asyncio.run(
        handle(
            store,
            {"op": "get_conversation", "tenant": "", "args": {"conv_id": "conv_none"}},
        )
    )
    assert ok == {"ok": None}


def test_open_store_picks_the_backend() -> None:
    from smg.config import load_config

    memory = load_config(["--history-memory-max-responses", "7"], env={})
    in_cp = open_store(memory, in_control_plane=True)
    assert isinstance(in_cp, MemoryStore) and in_cp.max_responses == 7
    in_dp = open_store(memory, in_control_plane=False, root_pid=4242)
    assert isinstance(in_dp, IpcStore) and in_dp.address == ipc.control_plane_address(4242)
    with pytest.raises(ValueError, match="root pid"):
        open_store(memory, in_control_plane=False)
    none = load_config(["--history-backend", "none"], env={})
    assert open_store(none, in_control_plane=False, root_pid=1) is None
