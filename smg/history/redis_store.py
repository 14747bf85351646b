"""The Redis history backend (--history-backend redis).

Each process opens its own client lazily, in the event loop of its first call (after the
fork): a BlockingConnectionPool of --redis-pool-max connections. Every call is bounded by
--redis-op-timeout-secs (pool wait, connect and the command) and any failure is raised as
StorageUnavailable. The client never retries a command by itself: a lost reply to an append
must not append twice.

Layout (`T:ID` is the tenant, hex-encoded so it never holds ':', then the record's id; the
braces make every key of one conversation hash to the same Redis Cluster slot):
  smg:conv:{T:ID}   hash: id, created_at, metadata (JSON), seq (last item seq given out)
  smg:items:{T:ID}  hash: item id -> JSON {id, created_at, body}
  smg:order:{T:ID}  sorted set: item id scored by its seq
  smg:resp:{T:ID}   string: the ResponseRecord's JSON
Appends, metadata updates and pages are Lua scripts, each atomic on the server, so
concurrent appends from many processes get distinct, strictly increasing seqs. Every write
(re)sets the record's TTL to --redis-retention-days (-1: no TTL).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from smg.history.records import Conversation, Item, ItemPage, ResponseRecord
from smg.history.store import Order, StorageUnavailable, item_id_of

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from smg.config import GatewayConfig

T = TypeVar("T")


class _StoredItem(msgspec.Struct):
    """An item as kept in the items hash: its seq lives in the order set only."""

    id: str
    created_at: int
    body: dict[str, Any]


_encode = msgspec.json.Encoder().encode
_item_decoder = msgspec.json.Decoder(_StoredItem)
_response_decoder = msgspec.json.Decoder(ResponseRecord)
_metadata_decoder = msgspec.json.Decoder(dict[str, str])

# KEYS: conv, items, order. ARGV: ttl seconds (<= 0: none); "1" to create the conversation
# (replacing any of that id) or "" to append to an existing one; its id, created_at and
# metadata JSON (ignored when appending); then item id / item JSON pairs. Returns the first
# new seq, or nil when appending to a conversation that does not exist.
_APPEND = """
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'id', ARGV[3], 'created_at', ARGV[4], 'metadata', ARGV[5], 'seq', 0)
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local n = (#ARGV - 5) / 2
local last = redis.call('HINCRBY', KEYS[1], 'seq', n)
local first = last - n + 1
for i = 0, n - 1 do
  local id = ARGV[6 + 2 * i]
  redis.call('HSET', KEYS[2], id, ARGV[7 + 2 * i])
  redis.call('ZADD', KEYS[3], first + i, id)
end
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
end
return first
"""

# KEYS: conv, items, order. ARGV: ttl, metadata JSON. Returns [id, created_at] or nil.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
redis.call('HSET', KEYS[1], 'metadata', ARGV[2])
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
end
return redis.call('HMGET', KEYS[1], 'id', 'created_at')
"""

# KEYS: conv, items, order. ARGV: limit, "asc"|"desc", after id or "". Returns nil (no such
# conversation) or a flat list id, seq, item JSON, ... of at most limit + 1 items (one more
# than asked says whether there are more). An unknown `after` starts at the beginning.
_PAGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local limit = tonumber(ARGV[1])
local desc = ARGV[2] == 'desc'
local start = 0
if ARGV[3] ~= '' then
  local rank
  if desc then rank = redis.call('ZREVRANK', KEYS[3], ARGV[3])
  else rank = redis.call('ZRANK', KEYS[3], ARGV[3]) end
  if rank then start = rank + 1 end
end
local ids
if desc then ids = redis.call('ZREVRANGE', KEYS[3], start, start + limit, 'WITHSCORES')
else ids = redis.call('ZRANGE', KEYS[3], start, start + limit, 'WITHSCORES') end
local out = {}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], ids[i]) or ''
end
return out
"""


def _tag(tenant: str, record_id: str) -> str:
    return "{" + tenant.encode().hex() + ":" + record_id + "}"


def _conv_keys(tenant: str, conv_id: str) -> list[str]:
    tag = _tag(tenant, conv_id)
    return ["smg:conv:" + tag, "smg:items:" + tag, "smg:order:" + tag]


def _resp_key(tenant: str, response_id: str) -> str:
    return "smg:resp:" + _tag(tenant, response_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        pool_max: int = 16,
        retention_days: int = 30,
        op_timeout_secs: float = 5.0,
    ) -> None:
        self.url = url
        self.pool_max = pool_max
        self.ttl = retention_days * 86400 if retention_days > 0 else 0
        self.op_timeout = op_timeout_secs
        self._client: aioredis.Redis | None = None
        self._pid = 0
        self._scripts: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> RedisStore:
        if not cfg.redis_url:
            raise ValueError("--history-backend redis needs --redis-url")
        return cls(
            cfg.redis_url,
            pool_max=cfg.redis_pool_max,
            retention_days=cfg.redis_retention_days,
            op_timeout_secs=cfg.redis_op_timeout_secs,
        )

    # --- the client --------------------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        # A client made before a fork belongs to the parent: the child makes its own.
        if self._client is None or self._pid != os.getpid():
            import redis.asyncio as aioredis
            from redis.backoff import NoBackoff
            from redis.maint_notifications import MaintNotificationsConfig
            from redis.retry import Retry

            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.pool_max,
                timeout=self.op_timeout,  # the wait for a free connection
                socket_connect_timeout=self.op_timeout,
                socket_timeout=self.op_timeout,
                retry=Retry(NoBackoff(), 0),
                # redis-py 8 turns maintenance notifications on ("auto") for RESP3, and with
                # them on, the pool skips its check-out test of a pooled connection (EOF or
                # unread data -> reconnect before sending). Without that test a connection
                # that went stale while Redis was down (restarted since) fails the first
                # command after the restart; with it, the reconnect happens before anything
                # is sent, so no command is ever sent twice.
                maint_notifications_config=MaintNotificationsConfig(enabled=False),
            )
            client = aioredis.Redis(connection_pool=pool)
            self._scripts = {
                "append": client.register_script(_APPEND),
                "update": client.register_script(_UPDATE),
                "page": client.register_script(_PAGE),
            }
            self._client = client
            self._pid = os.getpid()
        return self._client

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        from redis.exceptions import RedisError

        try:
            return await asyncio.wait_for(op(self._redis()), self.op_timeout)
        except TimeoutError as exc:
            raise StorageUnavailable(f"redis did not answer within {self.op_timeout:g}s") from exc
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise StorageUnavailable(f"redis: a stored record does not decode: {exc}") from exc

    async def open(self) -> None:
        """Connect now (a PING), so a wrong URL shows at start-up rather than on a request."""
        await self._call(lambda r: r.ping())

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            await client.aclose()
            await client.connection_pool.disconnect()

    # --- responses -----------------------------------------------------------------------------

    async def put_response(self, tenant: str, record: ResponseRecord) -> None:
        key, value = _resp_key(tenant, record.id), _encode(record)
        await self._call(lambda r: r.set(key, value, ex=self.ttl or None))

    async def get_response(self, tenant: str, response_id: str) -> ResponseRecord | None:
        key = _resp_key(tenant, response_id)

        async def op(r: aioredis.Redis) -> ResponseRecord | None:
            raw = await r.get(key)
            return None if raw is None else _response_decoder.decode(raw)

        return await self._call(op)

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        key = _resp_key(tenant, response_id)
        return bool(await self._call(lambda r: r.delete(key)))

    # --- conversations -------------------------------------------------------------------------

    async def create_conversation(
        self, tenant: str, conv: Conversation, items: list[dict[str, Any]]
    ) -> list[Item]:
        fields = ["1", conv.id, int(conv.created_at), _encode(conv.metadata)]
        added = await self._append(tenant, conv.id, fields, items, int(time.time()))
        assert added is not None  # creating never finds "no such conversation"
        return added

    async def get_conversation(self, tenant: str, conv_id: str) -> Conversation | None:
        key = _conv_keys(tenant, conv_id)[0]

        async def op(r: aioredis.Redis) -> Conversation | None:
            got_id, created_at, metadata = await r.hmget(key, ["id", "created_at", "metadata"])
            if got_id is None:
                return None
            return Conversation(
                id=_text(got_id),
                created_at=int(created_at),
                metadata=_metadata_decoder.decode(metadata) if metadata else {},
            )

        return await self._call(op)

    async def update_conversation(
        self, tenant: str, conv_id: str, metadata: dict[str, str]
    ) -> Conversation | None:
        keys = _conv_keys(tenant, conv_id)
        meta = dict(metadata)
        args = [self.ttl, _encode(meta)]

        async def op(r: aioredis.Redis) -> Conversation | None:
            got = await self._scripts["update"](keys=keys, args=args)
            if got is None:
                return None
            return Conversation(id=_text(got[0]), created_at=int(got[1]), metadata=meta)

        return await self._call(op)

    async def delete_conversation(self, tenant: str, conv_id: str) -> bool:
        keys = _conv_keys(tenant, conv_id)

        async def op(r: aioredis.Redis) -> bool:
            async with r.pipeline(transaction=True) as pipe:
                pipe.delete(keys[0])
                pipe.delete(keys[1], keys[2])
                removed, _ = await pipe.execute()
            return bool(removed)

        return await self._call(op)

    # --- items ---------------------------------------------------------------------------------

    async def add_items(
        self, tenant: str, conv_id: str, items: list[dict[str, Any]]
    ) -> list[Item] | None:
        return await self._append(tenant, conv_id, ["", "", 0, ""], items, int(time.time()))

    async def _append(
        self, tenant: str, conv_id: str, conv: list[Any], bodies: list[dict[str, Any]], now: int
    ) -> list[Item] | None:
        keys = _conv_keys(tenant, conv_id)
        stored: list[_StoredItem] = []
        args: list[Any] = [self.ttl, *conv]
        for body in bodies:
            item_id = item_id_of(body)
            item = _StoredItem(id=item_id, created_at=now, body={**body, "id": item_id})
            stored.append(item)
            args += [item_id, _encode(item)]

        async def op(r: aioredis.Redis) -> Any:
            return await self._scripts["append"](keys=keys, args=args)

        first = await self._call(op)
        if first is None:
            return None
        return [
            Item(
                id=s.id,
                conversation_id=conv_id,
                seq=int(first) + i,
                created_at=s.created_at,
                body=s.body,
            )
            for i, s in enumerate(stored)
        ]

    async def list_items(
        self, tenant: str, conv_id: str, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        keys = _conv_keys(tenant, conv_id)
        limit = max(limit, 0)
        args = [limit, "desc" if order == "desc" else "asc", after or ""]

        async def op(r: aioredis.Redis) -> ItemPage | None:
            flat = await self._scripts["page"](keys=keys, args=args)
            if flat is None:
                return None
            items = [self._item(conv_id, flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
            return ItemPage(items=items[:limit], has_more=len(items) > limit)

        return await self._call(op)

    async def get_item(self, tenant: str, conv_id: str, item_id: str) -> Item | None:
        keys = _conv_keys(tenant, conv_id)

        async def op(r: aioredis.Redis) -> Item | None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.zscore(keys[2], item_id)
                pipe.hget(keys[1], item_id)
                seq, raw = await pipe.execute()
            if seq is None or raw is None:
                return None
            return self._item(conv_id, seq, raw)

        return await self._call(op)

    async def delete_item(self, tenant: str, conv_id: str, item_id: str) -> bool:
        keys = _conv_keys(tenant, conv_id)

        async def op(r: aioredis.Redis) -> bool:
            async with r.pipeline(transaction=True) as pipe:
                pipe.zrem(keys[2], item_id)
                pipe.hdel(keys[1], item_id)
                removed, _ = await pipe.execute()
            return bool(removed)

        return await self._call(op)

    @staticmethod
    def _item(conv_id: str, seq: bytes | str | float, raw: bytes | str) -> Item:
        s = _item_decoder.decode(raw)
        return Item(
            id=s.id,
            conversation_id=conv_id,
            seq=int(float(seq)),
            created_at=s.created_at,
            body=s.body,
        )
