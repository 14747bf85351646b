"""Prefill/decode (PD) roles of the HTTP mock, SGLang style.

A real SGLang prefill engine runs a bootstrap server next to its API; the gateway sends
the same body to a prefill and a decode engine with `bootstrap_host`, `bootstrap_port`
and `bootstrap_room` injected; the decode engine finds the prefill through
`bootstrap_host:bootstrap_port` and pulls the KV cache of `bootstrap_room` from it. An
engine in a PD role refuses a request without a room or a host (SGLang: "Disaggregated
request received without bootstrap room id", 400); a null or missing port means the
engine's own --disaggregation-bootstrap-port (SGLang's scheduler does that; 1.13 sends
null for a prefill given without a port), here --bootstrap-port (default 8998).

The mock's bootstrap protocol (HTTP/1.1 on the prefill's bootstrap port):
    GET /pd/rooms/{room}  200 {"room": R, "state": S, "age_s": T}, 404 when never seen;
                          with ?wait_ms=N (<= 10000) the answer waits until the room is
                          "ready" or "failed" or N ms passed (a long poll: one request per
                          decode instead of a busy loop)
    GET /pd/rooms         200 {"rooms": [{"room": R, "state": S, "age_s": T}, ...]} oldest first
    GET /health           200
S is "prefilling" from the moment the prefill request starts, "ready" once the prefill
answered (its KV is "transferable"), "failed" when it ended otherwise (error, fault,
client gone). The decode polls each of its rooms until "ready" (then answers normally),
"failed" (then fails at once) or its wait (--pd-wait-s) runs out (then fails): 500 with
an error JSON, as an SGLang decode aborts a request whose KV transfer failed. A streamed
request's head (200, SSE) goes out at once, as SGLang's StreamingResponse sends it, so
there the failure is SGLang's in-band event `data: {"error": {"object": "error",
"message", "type": "INTERNAL_SERVER_ERROR", "param": null, "code": 500}}` then `[DONE]`.

Pure parts (field parsing, the room book) are separate from the two small servers.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import orjson

from smg.mock_worker.plan import ApiError

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)
PREFILLING, READY, FAILED = "prefilling", "ready", "failed"
MAX_ROOM = 2**64 - 1  # SGLang rooms are u64 (1.13 sends [0, 2^63 - 1])
POLL_S = 0.01  # how long a decode pauses before asking again after a failed ask
STATS_ROOMS = 1000  # the newest rooms a stats answer lists
MAX_WAIT_MS = 10_000  # the longest a bootstrap server holds one ?wait_ms= answer


# --- pure: the bootstrap fields of a request ------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def item_count(kind: str, obj: dict[str, Any]) -> int:
    """How many sequences one request holds, as SGLang counts them for its bootstrap
    normalization: prompts (a `text`/`input_ids`/`prompt` list) times `n`."""
    prompts = 1
    if kind == "generate":
        text = obj.get("text")
        ids = obj.get("input_ids")
        if isinstance(text, list):
            prompts = len(text)
        elif isinstance(ids, list) and ids and isinstance(ids[0], list):
            prompts = len(ids)
        params = obj.get("sampling_params")
        n = params.get("n", 1) if isinstance(params, dict) else 1
    else:
        prompt = obj.get("prompt")
        # A token-id list is one prompt; a list of strings or id lists is a batch.
        if kind == "completion" and isinstance(prompt, list) and prompt:
            prompts = 1 if all(_is_int(t) for t in prompt) else len(prompt)
        n = obj.get("n", 1)
    if not _is_int(n) or n < 1:
        n = 1
    return max(1, prompts) * n


def _spread(value: Any, count: int, field: str, check: Any, what: str) -> list[Any]:
    """A scalar repeated `count` times, or a list of exactly `count` (or of one per prompt
    when n > 1 is folded in by the engine: any non-empty list is accepted as given)."""
    if isinstance(value, list):
        if not value:
            raise ApiError(400, f"{field} must not be an empty list")
        if not all(check(v) for v in value):
            raise ApiError(400, f"every {field} must be {what}")
        return list(value)
    if not check(value):
        raise ApiError(400, f"{field} must be {what} or a list of them")
    return [value] * count


def _room(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= MAX_ROOM


def _port(v: Any) -> bool:
    return v is None or (_is_int(v) and 1 <= v <= 65535)


def _host(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def bootstrap_targets(
    kind: str, obj: dict[str, Any], default_port: int = 8998
) -> list[tuple[str, int, int]]:
    """(host, port, room) per sequence of a PD request, or ApiError(400).

    Batches as SGLang normalizes them (io_struct GenerateReqInput): a scalar room becomes
    room + i for sequence i; a list is taken as given. Host and port lists pair with it.
    A null port (scalar or list item) is `default_port`, as SGLang's scheduler does."""
    missing = [k for k in ("bootstrap_room", "bootstrap_host") if obj.get(k) is None]
    if missing:
        raise ApiError(
            400,
            "Invalid request: Disaggregated request received without "
            f"{', '.join(missing)} (a prefill/decode engine is reached through a PD router)",
        )
    count = item_count(kind, obj)
    raw_room = obj["bootstrap_room"]
    if isinstance(raw_room, list):
        rooms = _spread(raw_room, count, "bootstrap_room", _room, "an integer in [0, 2^64)")
    elif _room(raw_room):
        rooms = [raw_room + i for i in range(count)]
    else:
        raise ApiError(400, "bootstrap_room must be an integer in [0, 2^64) or a list of them")
    hosts = _spread(obj["bootstrap_host"], len(rooms), "bootstrap_host", _host, "a host name")
    ports = _spread(obj.get("bootstrap_port"), len(rooms), "bootstrap_port", _port, "a port number")
    ports = [default_port if p is None else p for p in ports]
    if not len(hosts) == len(ports) == len(rooms):
        raise ApiError(
            400,
            f"bootstrap_host ({len(hosts)}), bootstrap_port ({len(ports)}) and "
            f"bootstrap_room ({len(rooms)}) lists differ in length",
        )
    return list(zip(hosts, ports, rooms, strict=True))


# --- pure: the prefill's record of rooms ------------------------------------------------


Key = int | str  # SGLang: a bootstrap room; vLLM (gRPC): the transfer id the prefill minted


class RoomBook:
    """Rooms a prefill served, bounded in count and age (oldest dropped first). A room
    may hold the kv_transfer_params the prefill returned (vLLM style)."""

    def __init__(
        self, max_rooms: int = 100_000, ttl_s: float = 600.0, engine_id: str | None = None
    ) -> None:
        self.max_rooms = max_rooms
        self.ttl_s = ttl_s
        self.engine_id = engine_id  # shown with every room (a Mooncake decode checks it)
        self._rooms: collections.OrderedDict[Key, tuple[str, float]] = collections.OrderedDict()
        self._params: dict[Key, dict[str, Any]] = {}
        self._waiters: dict[Key, list[asyncio.Future[None]]] = {}  # long polls per room

    def _trim(self, now: float) -> None:
        rooms = self._rooms
        while rooms and (
            len(rooms) > self.max_rooms or now - next(iter(rooms.values()))[1] > self.ttl_s
        ):
            self._params.pop(rooms.popitem(last=False)[0], None)

    def start(self, rooms: list[Key], now: float) -> None:
        for room in rooms:
            self._rooms.pop(room, None)  # a reused room counts from its new start
            self._rooms[room] = (PREFILLING, now)
        self._trim(now)
        self._wake(rooms)

    def _wake(self, rooms: list[Key]) -> None:
        for room in rooms:
            for fut in self._waiters.pop(room, ()):
                if not fut.done():
                    fut.set_result(None)

    async def wait_settled(self, room: Key, timeout: float) -> None:
        """Return once `room` is "ready" or "failed", or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            entry = self._rooms.get(room)
            left = deadline - loop.time()
            if (entry is not None and entry[0] != PREFILLING) or left <= 0:
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(room, []).append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                return
            finally:
                waiting = self._waiters.get(room)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del self._waiters[room]

    def finish(self, rooms: list[Key], ok: bool, params: dict[str, Any] | None = None) -> None:
        """End the prefill of `rooms`; only a room still prefilling changes. `params`: the
        kv_transfer_params the prefill answered with (kept for the decode to compare)."""
        state = READY if ok else FAILED
        for room in rooms:
            entry = self._rooms.get(room)
            if entry is not None and entry[0] == PREFILLING:
                self._rooms[room] = (state, entry[1])
                if params is not None and ok:
                    self._params[room] = params
        self._wake(rooms)

    def get(self, room: Key, now: float) -> dict[str, Any] | None:
        self._trim(now)
        entry = self._rooms.get(room)
        if entry is None:
            return None
        out: dict[str, Any] = {"room": room, "state": entry[0], "age_s": round(now - entry[1], 3)}
        if self.engine_id is not None:
            out["engine_id"] = self.engine_id
        params = self._params.get(room)
        if params is not None:
            out["kv_transfer_params"] = params
        return out

    def __len__(self) -> int:
        return len(self._rooms)

    def listing(self, now: float, last: int | None = None) -> list[dict[str, Any]]:
        """Every room (or the `last` newest), oldest first."""
        self._trim(now)
        items = list(self._rooms.items())
        if last is not None:
            items = items[-last:] if last else []
        return [
            {"room": room, "state": state, "age_s": round(now - t, 3)} for room, (state, t) in items
        ]


# --- the prefill's bootstrap server -------------------------------------------------------


def _answer(status: int, body: Any, keep_alive: bool) -> bytes:
    data = orjson.dumps(body)
    phrase = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status,
        phrase.get(status, b"Status"),
        len(data),
        b"" if keep_alive else b"connection: close\r\n",
        data,
    )


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": status}}


def bootstrap_route(book: RoomBook, method: str, path: str, now: float) -> tuple[int, Any]:
    """The bootstrap server's answer to one request (pure)."""
    if method != "GET":
        return 405, _error(405, "the bootstrap server answers GET only")
    if path == "/health":
        return 200, {"status": "ok"}
    if path == "/pd/rooms":
        return 200, {"rooms": book.listing(now)}
    if path.startswith("/pd/rooms/"):
        text = path[len("/pd/rooms/") :]
        if not text or not all(c.isalnum() or c in "._-" for c in text) or not text.isascii():
            return 400, _error(400, f"room must be an integer or a transfer id, got {text!r}")
        found = book.get(int(text) if text.isdigit() else text, now)
        if found is None:
            return 404, _error(404, f"room {text} was never prefilled here")
        return 200, found
    return 404, _error(404, f"route {path} not found")


_MAX_HEAD = 16 * 1024


async def _serve_bootstrap(
    book: RoomBook, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_HEAD:
                break
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                writer.write(_answer(400, _error(400, "malformed request line"), False))
                break
            method, target, version = parts
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            length = int(headers.get("content-length", "0") or 0)
            if length:  # a GET has no body; drain one anyway so the next request parses
                await reader.readexactly(min(length, _MAX_HEAD))
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            path, _, query = target.partition("?")
            wait_ms = _wait_ms(query)
            if wait_ms and method == "GET" and path.startswith("/pd/rooms/"):
                key = path[len("/pd/rooms/") :]
                await book.wait_settled(int(key) if key.isdigit() else key, wait_ms / 1000)
            status, body = bootstrap_route(book, method, path, time.monotonic())
            writer.write(_answer(status, body, keep))
            await writer.drain()
            if not keep:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def _wait_ms(query: str) -> int:
    """The ?wait_ms= of a bootstrap request, capped at MAX_WAIT_MS (0: none or unreadable)."""
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "wait_ms" and value.isdigit():
            return min(int(value), MAX_WAIT_MS)
    return 0


async def start_bootstrap_server(book: RoomBook, host: str, port: int) -> asyncio.AbstractServer:
    """Listen on host:port (0: ephemeral) and answer the bootstrap protocol from `book`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_bootstrap(book, reader, writer)

    return await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)


# --- the decode's side: wait for the prefill's rooms -------------------------------------


class KvTransferError(Exception):
    """The decode could not get a room's KV from its prefill (answered 500)."""


# Idle keep-alive connections to bootstrap servers, per (host, port): a decode under load
# asks once per request, and a fresh TCP connection each time would cost more than the ask.
_IDLE: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
_MAX_IDLE = 64


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, timeout: float
) -> tuple[int, dict[str, Any]]:
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    return status, orjson.loads(body) if body else {}


async def _ask(host: str, port: int, room: Key, wait: float) -> tuple[int, dict[str, Any]]:
    """One GET /pd/rooms/{room}?wait_ms= (a long poll of up to `wait` s) on a kept-alive
    connection (a fresh one when none is idle): (status, JSON body)."""
    request = b"GET /pd/rooms/%s?wait_ms=%d HTTP/1.1\r\nhost: %s:%d\r\n\r\n" % (
        str(room).encode(),
        int(wait * 1000),
        host.encode(),
        port,
    )
    idle = _IDLE.setdefault((host, port), [])
    while idle:  # a kept connection the server may have closed meanwhile: then a fresh one
        reader, writer = idle.pop()
        try:
            answer = await _exchange(reader, writer, request, wait + 1.0)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            writer.close()
            continue
        _keep(idle, reader, writer)
        return answer
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait + 1.0)
    try:
        answer = await _exchange(reader, writer, request, wait + 1.0)
    except BaseException:
        writer.close()
        raise
    _keep(idle, reader, writer)
    return answer


def _keep(
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    if len(idle) < _MAX_IDLE and not writer.is_closing():
        idle.append((reader, writer))
    else:
        writer.close()


async def await_rooms(
    targets: list[tuple[str, int, Key]],
    wait_s: float,
    expect: dict[str, Any] | None = None,
    engine_id: str | None = None,
) -> None:
    """Return once every (host, port, room) is "ready" at its bootstrap server; raise
    KvTransferError when one is "failed" or `wait_s` runs out (shared by all rooms), or,
    with `expect`, when the prefill returned other kv_transfer_params than these, or, with
    `engine_id`, when the prefill there is another engine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    for host, port, room in dict.fromkeys(targets):  # a room repeated by n > 1 asks once
        last = "no answer"
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise KvTransferError(
                    f"KV transfer failed: bootstrap_room {room} not ready at "
                    f"{host}:{port} after {wait_s:g} s ({last})"
                )
            try:
                status, body = await _ask(host, port, room, min(left, 1.0))
            except (
                OSError,
                TimeoutError,
                ValueError,
                IndexError,
                asyncio.IncompleteReadError,
            ) as e:
                last = f"bootstrap server unreachable: {type(e).__name__}"
            else:
                state = body.get("state") if status == 200 else None
                if state == READY:
                    if expect is not None and body.get("kv_transfer_params") != expect:
                        raise KvTransferError(
                            f"KV transfer failed: kv_transfer_params of {room} differ from "
                            f"what the prefill at {host}:{port} returned"
                        )
                    if engine_id is not None and body.get("engine_id") != engine_id:
                        raise KvTransferError(
                            f"KV transfer failed: remote_engine_id {engine_id} is not the "
                            f"engine at {host}:{port} ({body.get('engine_id')})"
                        )
                    break
                if state == FAILED:
                    raise KvTransferError(
                        f"KV transfer failed: the prefill of bootstrap_room {room} at "
                        f"{host}:{port} failed"
                    )
                last = f"room {state}" if state else f"room unknown (HTTP {status})"
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - loop.time())))
