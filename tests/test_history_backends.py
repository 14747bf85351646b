"""The history store's behaviour, the same suite against memory, Redis and PostgreSQL.

Redis and PostgreSQL are real servers on loopback ports (tests/historyutil.py), one of each
per module, emptied before each test. Beyond the shared suite: a new client reads what a
closed one wrote; a killed or frozen server gives StorageUnavailable within the op timeout
and the same client works again once it is back; 200 concurrent appends over two clients
leave exactly 200 items with distinct seqs, counted in the database itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import gatewayutil
import historyutil
import msgspec
import psutil
import pytest

from smg.config import load_config
from smg.history import open_store
from smg.history.memory import MemoryStore
from smg.history.postgres_store import MIGRATIONS, VERSIONS_TABLE, PostgresStore, migrate
from smg.history.records import Conversation, ResponseRecord
from smg.history.redis_store import RedisStore
from smg.history.store import HistoryStore, StorageUnavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[historyutil.RedisServer]:
    with historyutil.running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def pg_srv() -> Iterator[historyutil.PostgresServer]:
    with historyutil.running_postgres() as server:
        yield server


async def _flush_redis(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


async def _truncate_pg(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute(
            "TRUNCATE smg_conversations, smg_conversation_items, smg_responses CASCADE"
        )
    finally:
        await conn.close()


class Backend:
    """Makes fresh clients of one backend (each client belongs to the loop that first uses it)."""

    def __init__(self, name: str, make: Callable[..., HistoryStore]) -> None:
        self.name = name
        self.make = make


def _make_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    if name == "memory":
        shared = MemoryStore()
        return Backend("memory", lambda **_: shared)
    if name == "redis":
        srv: Any = request.getfixturevalue("redis_srv")
        asyncio.run(_flush_redis(srv.url))
        return Backend(
            "redis",
            lambda op_timeout_secs=5.0: RedisStore(srv.url, op_timeout_secs=op_timeout_secs),
        )
    srv = request.getfixturevalue("pg_srv")
    asyncio.run(_truncate_pg(srv.url))
    return Backend(
        "postgres",
        lambda op_timeout_secs=5.0: PostgresStore(srv.url, op_timeout_secs=op_timeout_secs),
    )


@pytest.fixture(params=["memory", "redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return _make_backend(request.param, request)


@pytest.fixture(params=["redis", "postgres"])
def db_backend(request: pytest.FixtureRequest) -> Backend:
    return _make_backend(request.param, request)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 60))


def conv(conv_id: str = "conv_" + "a" * 50, metadata: dict[str, str] | None = None) -> Conversation:
    return Conversation(id=conv_id, created_at=1_700_000_000, metadata=metadata or {})


def msg(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    } | extra


# --- the shared behaviour suite ------------------------------------------------------------------


def test_conversation_lifecycle(backend: Backend) -> None:
    async def body() -> None:
        store = backend.make()
        try:
            c = conv(metadata={"topic": "demo", "ü": "ß"})
            items = await store.create_conversation("", c, [msg("one"), msg("two")])
            assert [i.seq for i in items] == [1, 2]
            assert await store.get_conversation("", c.id) == c
            updated = await store.update_conversation("", c.id, {"k": "v"})
            assert updated == Conversation(id=c.id, created_at=c.created_at, metadata={"k": "v"})
            assert await store.get_conversation("", c.id) == updated
            assert await store.delete_conversation("", c.id) is True
            assert await store.get_conversation("", c.id) is None
            assert await store.get_item("", c.id, items[0].id) is None
            assert await store.list_items("", c.id, 20, "asc", None) is None
            assert await store.add_items("", c.id, [msg("late")]) is None
            assert await store.update_conversation("", c.id, {}) is None
            assert await store.delete_conversation("", c.id) is False
        finally:
            await store.close()

    run(body)


def test_items_ids_bodies_and_seq(backend: Backend) -> None:
    async def body() -> None:
        store = backend.make()
        try:
            c = conv()
            await store.create_conversation("", c, [])
            given = {
                "id": "msg_given",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "héllo \u2603", "x": 1.5}],
            }
            call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
            added = await store.add_items("", c.id, [given, call, {"type": "reasoning"}])
            assert added is not None
            assert [i.seq for i in added] == [1, 2, 3]
            assert added[0].id == "msg_given" and added[0].body == given
            assert added[1].id.startswith("fc_") and len(added[1].id) == 3 + 50
            assert added[1].body == call | {"id": added[1].id}
            assert added[2].id.startswith("rs_")
            assert all(i.conversation_id == c.id for i in added)
            again = await store.add_items("", c.id, [msg("four")])
            assert again is not None and again[0].seq == 4
            got = await store.get_item("", c.id, "msg_given")
            assert got == added[0]
            # the body comes back key for key, in order
            assert list(got.body) == list(given)
            assert msgspec.json.encode(got.body) == msgspec.json.encode(given)
            assert await store.get_item("", c.id, "msg_nope") is None
            assert await store.delete_item("", c.id, added[1].id) is True
            assert await store.delete_item("", c.id, added[1].id) is False
            assert await store.get_item("", c.id, added[1].id) is None
            page = await store.list_items("", c.id, 100, "asc", None)
            assert page is not None
            assert [i.id for i in page.items] == ["msg_given", added[2].id, again[0].id]
            assert await store.add_items("", "conv_missing", [msg("x")]) is None
        finally:
            await store.close()

    run(body)


def test_same_item_id_again_replaces_it_at_the_end(backend: Backend) -> None:
    async def body() -> None:
        store = backend.make()
        try:
            c = conv()
            await store.create_conversation("", c, [msg("a", id="msg_a"), msg("b", id="msg_b")])
            added = await store.add_items("", c.id, [msg("a2", id="msg_a"), msg("a3", id="msg_a")])
            assert added is not None and [i.seq for i in added] == [3, 4]
            page = await store.list_items("", c.id, 10, "asc", None)
            assert page is not None
            assert [(i.id, i.seq) for i in page.items] == [("msg_b", 2), ("msg_a", 4)]
            assert page.items[1].body["content"][0]["text"] == "a3"
        finally:
            await store.close()

    run(body)


def test_list_items_pages(backend: Backend) -> None:
    async def body() -> None:
        store = backend.make()
        try:
            c = conv()
            await store.create_conversation("", c, [msg(str(n), id=f"msg_{n}") for n in range(7)])
            ids = [f"msg_{n}" for n in range(7)]
            for order, expect in (("asc", ids), ("desc", ids[::-1])):
                seen: list[str] = []
                after = None
                for _ in range(10):  # bounded: 7 items in pages of 3
                    page = await store.list_items("", c.id, 3, order, after)  # type: ignore[arg-type]
                    assert page is not None
                    seen += [i.id for i in page.items]
                    if not page.has_more:
                        break
                    assert len(page.items) == 3
                    after = page.items[-1].id
                assert seen == expect
            page = await store.list_items("", c.id, 7, "asc", None)
            assert page is not None and len(page.items) == 7 and page.has_more is False
            page = await store.list_items("", c.id, 6, "desc", None)
            assert page is not None and page.items[0].id == "msg_6" and page.has_more is True
            # an unknown `after` is ignored: the page starts at the beginning
            page = await store.list_items("", c.id, 2, "asc", "msg_unknown")
            assert page is not None and [i.id for i in page.items] == ["msg_0", "msg_1"]
            page = await store.list_items("", c.id, 5, "desc", "msg_0")
            assert page is not None and page.items == [] and page.has_more is False
            empty = conv("conv_" + "b" * 50)
            await store.create_conversation("", empty, [])
            page = await store.list_items("", empty.id, 20, "desc", None)
            assert page is not None and page.items == [] and page.has_more is False
        finally:
            await store.close()

    run(body)


def test_tenants_see_only_their_own(backend: Backend) -> None:
    async def body() -> None:
        store = backend.make()
        try:
            c = conv()
            items = await store.create_conversation("tenant-a", c, [msg("secret", id="msg_s")])
            record = ResponseRecord(id="resp_1", created_at=1, model="m", body={"status": "x"})
            await store.put_response("tenant-a", record)
            for other in ("", "tenant-b", "tenant-a:x"):
                assert await store.get_conversation(other, c.id) is None
                assert await store.update_conversation(other, c.id, {"k": "v"}) is None
                assert await store.add_items(other, c.id, [msg("x")]) is None
                assert await store.list_items(other, c.id, 20, "desc", None) is None
                assert await store.get_item(other, c.id, "msg_s") is None
                assert await store.delete_item(other, c.id, "msg_s") is False
                assert await store.delete_conversation(other, c.id) is False
                assert await store.get_response(other, "resp_1") is None
                assert await store.delete_response(other, "resp_1") is False
            # the same id in another tenant is another record
            other_conv = await store.create_conversation("tenant-b", c, [])
            assert other_conv == []
            assert await store.get_conversation("tenant-a", c.id) == c
            assert await store.get_item("tenant-a", c.id, "msg_s") == items[0]
            assert await store.get_response("tenant-a", "resp_1") == record
        finally:
            await store.close()

    run(body)


def test_responses(backend: Backend) -> None:
    async def body() -> None:
        store = backend.make()
        try:
            record = ResponseRecord(
                id="resp_abc",
                created_at=1_700_000_001,
                model="gpt-x",
                previous_response_id="resp_prev",
                conversation_id="conv_1",
                input_items=[msg("hi")],
                output_items=[{"type": "message", "role": "assistant", "content": []}],
                body={"id": "resp_abc", "object": "response", "status": "completed", "n": 1.25},
            )
            assert await store.get_response("", record.id) is None
            await store.put_response("", record)
            assert await store.get_response("", record.id) == record
            replaced = msgspec.structs.replace(record, model="gpt-y")
            await store.put_response("", replaced)
            assert await store.get_response("", record.id) == replaced
            assert await store.delete_response("", record.id) is True
            assert await store.delete_response("", record.id) is False
            assert await store.get_response("", record.id) is None
        finally:
            await store.close()

    run(body)


def test_ids_no_record_can_have_are_not_found(backend: Backend) -> None:
    """A NUL in an id (PostgreSQL text cannot hold one) is "not found", never a storage error."""

    async def body() -> None:
        store = backend.make()
        try:
            c = conv()
            await store.create_conversation("", c, [msg("a", id="msg_a"), msg("b", id="msg_b")])
            nul = c.id + "\x00"
            assert await store.get_conversation("", nul) is None
            assert await store.get_conversation("\x00", c.id) is None
            assert await store.update_conversation("", nul, {}) is None
            assert await store.add_items("", nul, [msg("x")]) is None
            assert await store.list_items("", nul, 20, "asc", None) is None
            assert await store.get_item("", c.id, "msg_a\x00") is None
            assert await store.delete_item("", c.id, "msg_a\x00") is False
            assert await store.delete_conversation("", nul) is False
            assert await store.get_response("", "resp_\x00") is None
            assert await store.delete_response("", "resp_\x00") is False
            page = await store.list_items("", c.id, 1, "asc", "msg_a\x00")
            assert page is not None and [i.id for i in page.items] == ["msg_a"]
        finally:
            await store.close()

    run(body)


# --- the database backends only --------------------------------------------------------------


def test_a_new_client_reads_what_a_closed_one_wrote(db_backend: Backend) -> None:
    c = conv(metadata={"a": "b"})
    record = ResponseRecord(id="resp_keep", created_at=5, model="m")

    async def write() -> None:
        store = db_backend.make()
        await store.create_conversation("t", c, [msg("kept", id="msg_k")])
        await store.put_response("t", record)
        await store.close()

    async def read() -> None:
        store = db_backend.make()
        try:
            assert await store.get_conversation("t", c.id) == c
            page = await store.list_items("t", c.id, 20, "asc", None)
            assert page is not None and [i.id for i in page.items] == ["msg_k"]
            assert await store.get_response("t", "resp_keep") == record
        finally:
            await store.close()

    run(write)
    run(read)  # another event loop, another client, another connection pool


def test_concurrent_appends_over_two_clients(
    db_backend: Backend, request: pytest.FixtureRequest
) -> None:
    c = conv()

    async def body() -> list[int]:
        one, two = db_backend.make(), db_backend.make()
        try:
            await one.create_conversation("", c, [])
            calls = [
                (one if n % 2 else two).add_items("", c.id, [msg(str(n), id=f"msg_{n}")])
                for n in range(200)
            ]
            results = await asyncio.gather(*calls)
            return [r[0].seq for r in results if r]
        finally:
            await one.close()
            await two.close()

    seqs = run(body)
    assert sorted(seqs) == list(range(1, 201))
    counted = run(lambda: _count_in_db(db_backend.name, request, c.id))
    assert counted == {"items": 200, "distinct_ids": 200, "distinct_seqs": 200, "max_seq": 200}


async def _count_in_db(name: str, request: pytest.FixtureRequest, conv_id: str) -> dict[str, int]:
    if name == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(request.getfixturevalue("redis_srv").url)
        try:
            tag = "{:" + conv_id + "}"
            scored = await client.zrange("smg:order:" + tag, 0, -1, withscores=True)
            return {
                "items": await client.hlen("smg:items:" + tag),
                "distinct_ids": len({m for m, _ in scored}),
                "distinct_seqs": len({s for _, s in scored}),
                "max_seq": int(max(s for _, s in scored)),
            }
        finally:
            await client.aclose()
    import asyncpg

    conn = await asyncpg.connect(request.getfixturevalue("pg_srv").url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT id), count(DISTINCT seq), max(seq)"
            " FROM smg_conversation_items WHERE tenant = '' AND conversation_id = $1",
            conv_id,
        )
        return dict(zip(["items", "distinct_ids", "distinct_seqs", "max_seq"], map(int, row)))
    finally:
        await conn.close()


def _server(name: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("redis_srv" if name == "redis" else "pg_srv")


def test_killed_server_is_storage_unavailable_then_back(
    db_backend: Backend, request: pytest.FixtureRequest
) -> None:
    server = _server(db_backend.name, request)
    c = conv()

    async def body() -> None:
        store = db_backend.make(op_timeout_secs=2.0)
        try:
            await store.create_conversation("", c, [msg("before")])
            server.kill()
            for call in (
                lambda: store.get_conversation("", c.id),
                lambda: store.add_items("", c.id, [msg("during")]),
                lambda: store.list_items("", c.id, 20, "asc", None),
            ):
                started = time.monotonic()
                with pytest.raises(StorageUnavailable):
                    await call()
                assert time.monotonic() - started < 2.0 + 1.0
            await asyncio.to_thread(server.start)
            # the same client works again (Redis here keeps nothing across a restart)
            await store.create_conversation("", c, [msg("after", id="msg_after")])
            page = await store.list_items("", c.id, 20, "asc", None)
            assert page is not None and page.items[-1].id == "msg_after"
        finally:
            if server.proc.poll() is not None:
                server.start()
            await store.close()

    run(body)


def test_redis_connection_stale_across_a_restart_is_replaced_before_a_write(
    redis_srv: historyutil.RedisServer,
) -> None:
    """A pooled connection left unused while Redis restarted is found dead at check-out and
    replaced before anything is sent (redis-py 8 skipped that test with RESP3 maintenance
    notifications on: the first call after the restart failed). The append after it runs
    exactly once: one new item, seq one past the first."""
    c = conv("conv_" + "b" * 50)

    async def body() -> None:
        store = RedisStore(redis_srv.url, op_timeout_secs=2.0)
        try:
            await store.create_conversation("", c, [msg("before")])
            redis_srv.kill()
            await asyncio.to_thread(redis_srv.start)
            await asyncio.sleep(0.1)  # the old connection's EOF is read by the loop
            created = await store.create_conversation("", c, [msg("one", id="msg_one")])
            added = await store.add_items("", c.id, [msg("two", id="msg_two")])
            assert [(i.id, i.seq) for i in created + added] == [("msg_one", 1), ("msg_two", 2)]
            page = await store.list_items("", c.id, 20, "asc", None)
            assert page is not None and [i.id for i in page.items] == ["msg_one", "msg_two"]
        finally:
            if redis_srv.proc is None or redis_srv.proc.poll() is not None:
                redis_srv.start()
            await store.close()

    run(body)


def _freeze(server: Any, sig: int) -> None:
    procs = [psutil.Process(server.proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        os.kill(p.pid, sig)


def test_frozen_server_times_out_within_the_op_timeout(
    db_backend: Backend, request: pytest.FixtureRequest
) -> None:
    server = _server(db_backend.name, request)
    c = conv()

    async def body() -> None:
        store = db_backend.make(op_timeout_secs=1.0)
        try:
            await store.create_conversation("", c, [msg("before", id="msg_b")])
            _freeze(server, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StorageUnavailable, match="within 1s"):
                    await store.get_item("", c.id, "msg_b")
                elapsed = time.monotonic() - started
                assert 0.9 < elapsed < 2.5, elapsed
            finally:
                _freeze(server, signal.SIGCONT)
            for _ in range(50):  # bounded: a connection cut by the timeout is replaced
                try:
                    got = await store.get_item("", c.id, "msg_b")
                    break
                except StorageUnavailable:
                    await asyncio.sleep(0.1)
            assert got is not None and got.id == "msg_b"
        finally:
            await store.close()

    run(body)


# --- backend specifics --------------------------------------------------------------------------


def test_redis_ttl_follows_retention_days(redis_srv: historyutil.RedisServer) -> None:
    import redis.asyncio as aioredis

    async def body() -> None:
        await _flush_redis(redis_srv.url)
        kept = RedisStore(redis_srv.url, retention_days=-1)
        dated = RedisStore(redis_srv.url, retention_days=2)
        probe = aioredis.Redis.from_url(redis_srv.url)
        try:
            await kept.create_conversation("", conv("conv_kept"), [msg("x")])
            await kept.put_response("", ResponseRecord(id="resp_k", created_at=1, model="m"))
            await dated.create_conversation("", conv("conv_dated"), [msg("x")])
            await dated.put_response("", ResponseRecord(id="resp_d", created_at=1, model="m"))
            for kind in ("conv", "items", "order"):
                assert await probe.ttl(f"smg:{kind}:{{:conv_kept}}") == -1
                ttl = await probe.ttl(f"smg:{kind}:{{:conv_dated}}")
                assert 2 * 86400 - 60 < ttl <= 2 * 86400
            assert await probe.ttl("smg:resp:{:resp_k}") == -1
            assert 2 * 86400 - 60 < await probe.ttl("smg:resp:{:resp_d}") <= 2 * 86400
        finally:
            await kept.close()
            await dated.close()
            await probe.aclose()

    run(body)


def test_postgres_schema_is_versioned_and_migrates_once(pg_srv: historyutil.PostgresServer) -> None:
    import asyncpg

    async def body() -> None:
        conns = [await asyncpg.connect(pg_srv.url) for _ in range(3)]
        try:
            await conns[0].execute(f"DROP TABLE IF EXISTS {VERSIONS_TABLE}")
            await conns[0].execute(
                "DROP TABLE IF EXISTS smg_conversation_items, smg_conversations, smg_responses"
            )
            # three processes starting together: each migrates, the lock makes it once
            versions = await asyncio.gather(*(migrate(c) for c in conns))
            latest = MIGRATIONS[-1][0]
            assert versions == [latest] * 3
            rows = await conns[0].fetch(f"SELECT version FROM {VERSIONS_TABLE} ORDER BY version")
            assert [r[0] for r in rows] == [m[0] for m in MIGRATIONS]
            assert await migrate(conns[0]) == latest  # idempotent
        finally:
            for c in conns:
                await c.close()

    run(body)


def test_postgres_down_at_first_call_then_up(pg_srv: historyutil.PostgresServer) -> None:
    async def body() -> None:
        pg_srv.stop()
        store = PostgresStore(pg_srv.url, op_timeout_secs=2.0)
        try:
            with pytest.raises(StorageUnavailable):
                await store.get_conversation("", "conv_x")
            await asyncio.to_thread(pg_srv.start)
            assert await store.get_conversation("", "conv_x") is None
        finally:
            if pg_srv.proc is not None and pg_srv.proc.poll() is not None:
                pg_srv.start()
            await store.close()

    run(body)


def test_open_store_picks_the_backend() -> None:
    cfg = load_config(
        [
            "--history-backend",
            "redis",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--redis-op-timeout-secs",
            "1.5",
            "--redis-retention-days",
            "-1",
        ]
    )
    store = open_store(cfg, in_control_plane=False)
    assert isinstance(store, RedisStore)
    assert (store.url, store.op_timeout, store.ttl, store.pool_max) == (
        "redis://127.0.0.1:1/0",
        1.5,
        0,
        16,
    )
    cfg = load_config(
        [
            "--history-backend",
            "postgres",
            "--postgres-db-url",
            "postgresql://u@127.0.0.1:1/db",
            "--postgres-pool-max",
            "4",
        ]
    )
    store = open_store(cfg, in_control_plane=False)
    assert isinstance(store, PostgresStore)
    assert (store.url, store.op_timeout, store.pool_max) == (
        "postgresql://u@127.0.0.1:1/db",
        5.0,
        4,
    )


# --- start-up through `smg launch` --------------------------------------------------------------


@pytest.mark.parametrize("name", ["redis", "postgres"])
def test_launch_refuses_an_unreachable_backend(name: str) -> None:
    dead = gatewayutil.free_port()
    password = gatewayutil.secret("s2-history-db-pw-7f3a")
    if name == "redis":
        url = f"redis://:{password}@127.0.0.1:{dead}/0"
        args = ["--history-backend", "redis", "--redis-url", url]
        shown = f"the Redis history backend at redis://:***@127.0.0.1:{dead}/0"
    else:
        url = f"postgresql://u:{password}@127.0.0.1:{dead}/db"
        args = ["--history-backend", "postgres", "--postgres-db-url", url]
        shown = f"the Postgres history backend at postgresql://u:***@127.0.0.1:{dead}/db"
    rc, err, elapsed = gatewayutil.run_launch(
        ["--host", "127.0.0.1", "--port", "0", "--worker-urls", "http://127.0.0.1:1", *args]
    )
    assert rc == 1, err
    assert f"smg launch: {shown} is unreachable at start-up: " in err, err
    assert password not in err
    assert elapsed < 20


def test_launch_migrates_postgres_before_serving(pg_srv: historyutil.PostgresServer) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(pg_srv.url)
        try:
            await conn.execute(
                f"DROP TABLE IF EXISTS {VERSIONS_TABLE}, smg_conversation_items,"
                " smg_conversations, smg_responses"
            )
        finally:
            await conn.close()

    async def versions() -> list[int]:
        conn = await asyncpg.connect(pg_srv.url)
        try:
            rows = await conn.fetch(f"SELECT version FROM {VERSIONS_TABLE} ORDER BY version")
            return [r[0] for r in rows]
        finally:
            await conn.close()

    run(drop)
    args = ["--mock-workers", "1", "--history-backend", "postgres", "--postgres-db-url", pg_srv.url]
    with gatewayutil.running_gateway(args, processes=2):
        assert run(versions) == [m[0] for m in MIGRATIONS]
