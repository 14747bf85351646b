"""The PostgreSQL history backend (--history-backend postgres).

Each process opens its own asyncpg pool lazily, in the event loop of its first call (after
the fork), at most --postgres-pool-max connections, and brings the schema up to date there
(idempotent: a versions table, and an advisory lock so processes starting together apply a
migration once). Every call is bounded by --postgres-op-timeout-secs (pool wait, connect,
statements) and any failure is raised as StorageUnavailable. A pool that could not be made
(the server was down) is made again on the next call.

The tables are smg's own (smg_ prefix), so they never collide with the Rust SMG's tables in a
shared database. Every row carries its tenant in the primary key. Bodies are stored as
`json` (the text as given), not `jsonb`, so an item comes back byte for byte. An append
takes the conversation row's lock (UPDATE ... next_seq) so concurrent appends from any number
of processes get distinct, strictly increasing seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from smg.history.records import Conversation, Item, ItemPage, ResponseRecord
from smg.history.store import Order, StorageUnavailable, item_id_of

if TYPE_CHECKING:
    import asyncpg

    from smg.config import GatewayConfig

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_body_decoder = msgspec.json.Decoder(dict[str, Any])
_metadata_decoder = msgspec.json.Decoder(dict[str, str])
_response_decoder = msgspec.json.Decoder(ResponseRecord)

VERSIONS_TABLE = "smg_history_schema_versions"
# Any number unique to this schema: the lock processes take while migrating it.
_MIGRATION_LOCK = 0x534D47_0015

# (version, description, statements). Append only: a released migration never changes.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "conversations, their items, responses",
        [
            """CREATE TABLE IF NOT EXISTS smg_conversations (
                tenant TEXT NOT NULL,
                id TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                metadata JSON NOT NULL,
                next_seq BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (tenant, id))""",
            """CREATE TABLE IF NOT EXISTS smg_conversation_items (
                tenant TEXT NOT NULL,
                conversation_id TEXT NOT NULL,
                id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                body JSON NOT NULL,
                PRIMARY KEY (tenant, conversation_id, id),
                FOREIGN KEY (tenant, conversation_id)
                    REFERENCES smg_conversations (tenant, id) ON DELETE CASCADE)""",
            """CREATE UNIQUE INDEX IF NOT EXISTS smg_conversation_items_seq
                ON smg_conversation_items (tenant, conversation_id, seq)""",
            """CREATE TABLE IF NOT EXISTS smg_responses (
                tenant TEXT NOT NULL,
                id TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                model TEXT NOT NULL,
                previous_response_id TEXT,
                conversation_id TEXT,
                record JSON NOT NULL,
                PRIMARY KEY (tenant, id))""",
        ],
    ),
]

_INSERT_ITEMS = """
INSERT INTO smg_conversation_items (tenant, conversation_id, id, seq, created_at, body)
SELECT $1, $2, i, s, $3, b::json FROM unnest($4::text[], $5::bigint[], $6::text[]) AS t(i, s, b)
ON CONFLICT (tenant, conversation_id, id)
DO UPDATE SET seq = EXCLUDED.seq, created_at = EXCLUDED.created_at, body = EXCLUDED.body
"""


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply the pending migrations in one transaction; returns the schema version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} ("
            "version INTEGER NOT NULL PRIMARY KEY, description TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval(f"SELECT COALESCE(MAX(version), 0) FROM {VERSIONS_TABLE}")
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {VERSIONS_TABLE} (version, description) VALUES ($1, $2)",
                version,
                description,
            )
            current = version
        return int(current)


class PostgresStore:
    def __init__(self, url: str, *, pool_max: int = 16, op_timeout_secs: float = 5.0) -> None:
        self.url = url
        self.pool_max = pool_max
        self.op_timeout = op_timeout_secs
        self._pool: asyncpg.Pool | None = None
        self._pid = 0
        self._opening: asyncio.Lock | None = None

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> PostgresStore:
        if not cfg.postgres_db_url:
            raise ValueError("--history-backend postgres needs --postgres-db-url")
        return cls(
            cfg.postgres_db_url,
            pool_max=cfg.postgres_pool_max,
            op_timeout_secs=cfg.postgres_op_timeout_secs,
        )

    # --- the pool ----------------------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pid != os.getpid():  # made before a fork: the parent's; the child makes its own
            self._pool, self._opening, self._pid = None, None, os.getpid()
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                import asyncpg

                pool = await asyncpg.create_pool(
                    self.url, min_size=0, max_size=self.pool_max, timeout=self.op_timeout
                )
                try:
                    async with pool.acquire() as conn:
                        await migrate(conn)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool
        return self._pool

    async def _call(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        import asyncpg

        held: list[Any] = []

        async def run() -> T:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                held.append(conn)
                return await op(conn)

        # Not asyncio.wait_for: cancelling asyncpg mid-statement waits for the server to
        # acknowledge, which a frozen server never does. Past the bound the connection is
        # closed (the pool replaces it) and the call is answered at once.
        task = asyncio.ensure_future(run())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.op_timeout)
        except asyncio.CancelledError:
            _abandon(task, held)
            raise
        if not done:
            _abandon(task, held)
            raise StorageUnavailable(f"postgres did not answer within {self.op_timeout:g}s")
        try:
            return task.result()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"postgres: {type(exc).__name__}: {exc}") from exc
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StorageUnavailable(f"postgres: a stored record does not decode: {exc}") from exc

    async def open(self) -> None:
        """Connect and migrate now, so a wrong URL shows at start-up rather than on a request."""
        await self._call(lambda conn: conn.fetchval("SELECT 1"))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            try:
                await asyncio.wait_for(pool.close(), self.op_timeout)
            except (TimeoutError, OSError):
                pool.terminate()

    # --- responses -----------------------------------------------------------------------------

    async def put_response(self, tenant: str, record: ResponseRecord) -> None:
        args = (
            tenant,
            record.id,
            record.created_at,
            record.model,
            record.previous_response_id,
            record.conversation_id,
            _encode(record).decode(),
        )
        await self._call(
            lambda c: c.execute(
                "INSERT INTO smg_responses (tenant, id, created_at, model, previous_response_id,"
                " conversation_id, record) VALUES ($1, $2, $3, $4, $5, $6, $7::json)"
                " ON CONFLICT (tenant, id) DO UPDATE SET created_at = EXCLUDED.created_at,"
                " model = EXCLUDED.model, previous_response_id = EXCLUDED.previous_response_id,"
                " conversation_id = EXCLUDED.conversation_id, record = EXCLUDED.record",
                *args,
            )
        )

    async def get_response(self, tenant: str, response_id: str) -> ResponseRecord | None:
        if not _storable(tenant, response_id):
            return None

        async def op(c: asyncpg.Connection) -> ResponseRecord | None:
            raw = await c.fetchval(
                "SELECT record::text FROM smg_responses WHERE tenant = $1 AND id = $2",
                tenant,
                response_id,
            )
            return None if raw is None else _response_decoder.decode(raw)

        return await self._call(op)

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        if not _storable(tenant, response_id):
            return False
        status = await self._call(
            lambda c: c.execute(
                "DELETE FROM smg_responses WHERE tenant = $1 AND id = $2", tenant, response_id
            )
        )
        return status != "DELETE 0"

    # --- conversations -------------------------------------------------------------------------

    async def create_conversation(
        self, tenant: str, conv: Conversation, items: list[dict[str, Any]]
    ) -> list[Item]:
        async def op(c: asyncpg.Connection) -> list[Item]:
            async with c.transaction():
                # The same id again replaces the conversation (its items go), as memory.
                await c.execute(
                    "DELETE FROM smg_conversations WHERE tenant = $1 AND id = $2", tenant, conv.id
                )
                await c.execute(
                    "INSERT INTO smg_conversations (tenant, id, created_at, metadata)"
                    " VALUES ($1, $2, $3, $4::json)",
                    tenant,
                    conv.id,
                    int(conv.created_at),
                    _encode(conv.metadata).decode(),
                )
                added = await self._append(c, tenant, conv.id, items)
            assert added is not None
            return added

        return await self._call(op)

    async def get_conversation(self, tenant: str, conv_id: str) -> Conversation | None:
        if not _storable(tenant, conv_id):
            return None

        async def op(c: asyncpg.Connection) -> Conversation | None:
            row = await c.fetchrow(
                "SELECT created_at, metadata::text FROM smg_conversations"
                " WHERE tenant = $1 AND id = $2",
                tenant,
                conv_id,
            )
            if row is None:
                return None
            return Conversation(
                id=conv_id, created_at=int(row[0]), metadata=_metadata_decoder.decode(row[1])
            )

        return await self._call(op)

    async def update_conversation(
        self, tenant: str, conv_id: str, metadata: dict[str, str]
    ) -> Conversation | None:
        if not _storable(tenant, conv_id):
            return None
        meta = dict(metadata)
        created_at = await self._call(
            lambda c: c.fetchval(
                "UPDATE smg_conversations SET metadata = $3::json"
                " WHERE tenant = $1 AND id = $2 RETURNING created_at",
                tenant,
                conv_id,
                _encode(meta).decode(),
            )
        )
        if created_at is None:
            return None
        return Conversation(id=conv_id, created_at=int(created_at), metadata=meta)

    async def delete_conversation(self, tenant: str, conv_id: str) -> bool:
        if not _storable(tenant, conv_id):
            return False
        status = await self._call(
            lambda c: c.execute(
                "DELETE FROM smg_conversations WHERE tenant = $1 AND id = $2", tenant, conv_id
            )
        )
        return status != "DELETE 0"

    # --- items ---------------------------------------------------------------------------------

    async def add_items(
        self, tenant: str, conv_id: str, items: list[dict[str, Any]]
    ) -> list[Item] | None:
        if not _storable(tenant, conv_id):
            return None

        async def op(c: asyncpg.Connection) -> list[Item] | None:
            async with c.transaction():
                return await self._append(c, tenant, conv_id, items)

        return await self._call(op)

    @staticmethod
    async def _append(
        c: asyncpg.Connection, tenant: str, conv_id: str, bodies: list[dict[str, Any]]
    ) -> list[Item] | None:
        """Inside the caller's transaction. None: no such conversation."""
        n = len(bodies)
        last = await c.fetchval(
            "UPDATE smg_conversations SET next_seq = next_seq + $3"
            " WHERE tenant = $1 AND id = $2 RETURNING next_seq",
            tenant,
            conv_id,
            n,
        )
        if last is None:
            return None
        now = int(time.time())
        first = int(last) - n + 1
        added: list[Item] = []
        rows: dict[str, tuple[int, str]] = {}  # the last of a repeated id is the one kept
        for i, body in enumerate(bodies):
            item_id = item_id_of(body)
            stored = {**body, "id": item_id}
            added.append(
                Item(
                    id=item_id, conversation_id=conv_id, seq=first + i, created_at=now, body=stored
                )
            )
            rows.pop(item_id, None)
            rows[item_id] = (first + i, _encode(stored).decode())
        if rows:
            await c.execute(
                _INSERT_ITEMS,
                tenant,
                conv_id,
                now,
                list(rows),
                [seq for seq, _ in rows.values()],
                [body for _, body in rows.values()],
            )
        return added

    async def list_items(
        self, tenant: str, conv_id: str, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if not _storable(tenant, conv_id):
            return None
        limit = max(limit, 0)
        desc = order == "desc"
        if after is not None and not _storable(after):
            after = None  # cannot be an item's id: unknown, so ignored

        async def op(c: asyncpg.Connection) -> ItemPage | None:
            async with c.transaction(isolation="repeatable_read", readonly=True):
                found = await c.fetchval(
                    "SELECT 1 FROM smg_conversations WHERE tenant = $1 AND id = $2",
                    tenant,
                    conv_id,
                )
                if found is None:
                    return None
                # An unknown `after` is ignored (the page starts at the beginning), as memory.
                cursor = None
                if after is not None:
                    cursor = await c.fetchval(
                        "SELECT seq FROM smg_conversation_items"
                        " WHERE tenant = $1 AND conversation_id = $2 AND id = $3",
                        tenant,
                        conv_id,
                        after,
                    )
                cmp, direction = ("<", "DESC") if desc else (">", "ASC")
                rows = await c.fetch(
                    "SELECT id, seq, created_at, body::text FROM smg_conversation_items"
                    " WHERE tenant = $1 AND conversation_id = $2"
                    f" AND ($3::bigint IS NULL OR seq {cmp} $3)"
                    f" ORDER BY seq {direction} LIMIT $4",
                    tenant,
                    conv_id,
                    cursor,
                    limit + 1,
                )
            items = [_item(conv_id, r) for r in rows[:limit]]
            return ItemPage(items=items, has_more=len(rows) > limit)

        return await self._call(op)

    async def get_item(self, tenant: str, conv_id: str, item_id: str) -> Item | None:
        if not _storable(tenant, conv_id, item_id):
            return None

        async def op(c: asyncpg.Connection) -> Item | None:
            row = await c.fetchrow(
                "SELECT id, seq, created_at, body::text FROM smg_conversation_items"
                " WHERE tenant = $1 AND conversation_id = $2 AND id = $3",
                tenant,
                conv_id,
                item_id,
            )
            return None if row is None else _item(conv_id, row)

        return await self._call(op)

    async def delete_item(self, tenant: str, conv_id: str, item_id: str) -> bool:
        if not _storable(tenant, conv_id, item_id):
            return False
        status = await self._call(
            lambda c: c.execute(
                "DELETE FROM smg_conversation_items"
                " WHERE tenant = $1 AND conversation_id = $2 AND id = $3",
                tenant,
                conv_id,
                item_id,
            )
        )
        return status != "DELETE 0"


def _storable(*texts: str) -> bool:
    """PostgreSQL text cannot hold NUL: an id with one names no stored record (a lookup
    answers "not found" rather than a database error)."""
    return not any("\x00" in t for t in texts)


def _abandon(task: asyncio.Future[Any], held: list[Any]) -> None:
    """Stop a call that ran past its bound without waiting for it: close its connection."""
    for conn in held:
        with contextlib.suppress(Exception):  # already back in the pool: nothing to close
            conn.terminate()
    task.cancel()
    # Its outcome is of no use now; retrieving it keeps asyncio from logging it.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _item(conv_id: str, row: Any) -> Item:
    return Item(
        id=row[0],
        conversation_id=conv_id,
        seq=int(row[1]),
        created_at=int(row[2]),
        body=_body_decoder.decode(row[3]),
    )
