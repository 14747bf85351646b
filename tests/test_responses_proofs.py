"""Issue 15's storage proofs, through `smg launch --processes 2` in front of the OpenAI fake
(tests/providerfakes.py) on real redis-server / PostgreSQL (tests/historyutil.py), driven by
the openai SDK (max_retries=0):

- the record is written before the answer: a Redis relay holds every SET for 0.5 s, and a
  GET issued the moment the answer (or the stream's response.completed) arrives finds it;
- a stored response and a conversation survive a restart of smg on Redis and PostgreSQL,
  and a new turn chains from them; on memory they are gone (404);
- 200 concurrent turns over 10 conversations on PostgreSQL, counted in the database;
- Redis killed under load, then started again on the same port;
- the history GET routes take admission permits, as 1.13 puts them under its admission
  layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import historyutil
import httpx
import openai
import orjson
import pytest
from providerfakes import FakeProvider

from tests import mockutil
from tests.gatewayutil import Gateway, running_gateway, wait_until
from tests.test_resilience_admission import metric, read_status, send_only, wait_metric

MODEL = "gpt-4o"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider("openai", [MODEL]) as provider:
        yield provider


def _models(gw: Gateway) -> list[str]:
    answer = httpx.get(gw.url + "/v1/models", timeout=5)
    return [m["id"] for m in answer.json().get("data", [])] if answer.status_code == 200 else []


@contextlib.contextmanager
def fake_gateway(fake: FakeProvider, *flags: str) -> Iterator[Gateway]:
    args = ["--worker-urls", fake.url, "--disable-health-check", *flags]
    with running_gateway(args) as gw:
        wait_until(lambda: _models(gw) == [MODEL], 20, "the fake's model listed")
        yield gw


def _client(gw: Gateway, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


# --- the record before the answer -------------------------------------------------------------


class DelayedRelay:
    """A TCP relay to a Redis server on a checked free loopback port: a client chunk that
    carries a SET command is held `delay` seconds (what follows on that connection waits
    behind it); every other command passes at once."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:  # the server is down: so is this connection
                client.close()
                continue
            self.sockets += [client, server]
            for src, dst, hold in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pump, args=(src, dst, hold), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, hold: bool) -> None:
        src.settimeout(0.2)
        try:
            while not self.stopping:
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if hold and b"\r\nSET\r\n" in data:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stopping = True
        self.listener.close()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


def test_the_record_is_written_before_the_answer(fake: FakeProvider) -> None:
    """Every SET reaches Redis 0.5 s late: the answer (and a stream's response.completed)
    comes only after the write, so a GET sent the moment it arrives, on a new connection
    to either process, finds the record (before: 404, the answer out at once)."""
    delay = 0.5
    with historyutil.running_redis() as redis_server:
        relay = DelayedRelay(redis_server.port, delay)
        try:
            flags = ("--history-backend", "redis", "--redis-url", relay.url)
            with fake_gateway(fake, *flags) as gw:
                client = _client(gw)
                started = time.monotonic()
                whole = client.responses.create(model=MODEL, input="one")
                took = time.monotonic() - started
                got = httpx.get(f"{gw.url}/v1/responses/{whole.id}", timeout=10)
                assert got.status_code == 200, got.text
                assert got.json()["id"] == whole.id and got.json()["store"] is True
                assert took >= delay * 0.9, took

                started = time.monotonic()
                completed: Any = None
                with client.responses.create(
                    model=MODEL, input="two", previous_response_id=whole.id, stream=True
                ) as events:
                    for event in events:
                        if event.type == "response.completed":
                            completed = event.response
                            got = httpx.get(f"{gw.url}/v1/responses/{completed.id}", timeout=10)
                            break
                took = time.monotonic() - started
                assert completed is not None
                assert got.status_code == 200, got.text
                assert got.json()["previous_response_id"] == whole.id
                assert took >= delay * 0.9, took
        finally:
            relay.close()


# --- survival across a restart of smg ---------------------------------------------------------


@contextlib.contextmanager
def database(backend: str) -> Iterator[tuple[list[str], Any]]:
    """The flags for `backend` and its server (started and stopped here; the test is skipped
    where the binaries are missing)."""
    if backend == "memory":
        yield ["--history-backend", "memory"], None
        return
    if backend == "redis":
        if historyutil.redis_binary() is None:
            pytest.skip("redis-server is not installed")
        cm = historyutil.running_redis()
        flag = "--redis-url"
    else:
        if historyutil.postgres_bin_dir() is None:
            pytest.skip("PostgreSQL is not installed")
        cm = historyutil.running_postgres()
        flag = "--postgres-db-url"
    with cm as server:
        yield ["--history-backend", backend, flag, server.url], server


@pytest.mark.parametrize("backend", ["redis", "postgres", "memory"])
def test_history_survives_a_restart_of_smg(backend: str, fake: FakeProvider) -> None:
    with database(backend) as (flags, _server):
        with fake_gateway(fake, *flags) as gw:
            client = _client(gw)
            conv = client.conversations.create(items=[{"role": "user", "content": "zero"}])  # type: ignore[list-item]
            in_conv = client.responses.create(model=MODEL, input="one", conversation=conv.id)
            first = client.responses.create(model=MODEL, input="a")
            second = client.responses.create(model=MODEL, input="b", previous_response_id=first.id)
        # The first smg is stopped: a new one on the same database.
        with fake_gateway(fake, *flags) as gw:
            client = _client(gw)
            if backend == "memory":
                with pytest.raises(openai.NotFoundError):
                    client.responses.retrieve(second.id)
                with pytest.raises(openai.NotFoundError):
                    client.conversations.retrieve(conv.id)
                with pytest.raises(openai.BadRequestError) as err:
                    client.responses.create(model=MODEL, input="c", previous_response_id=second.id)
                assert err.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
                return
            got = client.responses.retrieve(second.id)
            assert (got.id, got.previous_response_id, got.output_text) == (
                second.id,
                first.id,
                second.output_text,
            )
            third = client.responses.create(model=MODEL, input="c", previous_response_id=second.id)
            assert third.output_text == "seen 5 items; last: c"  # a, its answer, b, its answer, c
            assert client.conversations.retrieve(conv.id).id == conv.id
            texts = [
                " ".join(part.text for part in item.content)  # type: ignore[union-attr]
                for item in client.conversations.items.list(conv.id, order="asc").data
            ]
            assert texts == ["zero", "one", in_conv.output_text]
            turn = client.responses.create(model=MODEL, input="two", conversation=conv.id)
            assert turn.output_text == "seen 4 items; last: two"
            assert len(client.conversations.items.list(conv.id, limit=100).data) == 5


# --- 200 concurrent stateful requests on PostgreSQL ------------------------------------------


TURNS = 200
CONVERSATIONS = 10


async def _turns(url: str, conv_ids: list[str]) -> list[tuple[int, str, str]]:
    """TURNS turns at once, turn n on conversation n % CONVERSATIONS: (n, response id,
    x-smg-process) each."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def turn(n: int) -> tuple[int, str, str]:
        raw = await client.responses.with_raw_response.create(
            model=MODEL, input=f"turn {n}", conversation=conv_ids[n % CONVERSATIONS]
        )
        return n, raw.parse().id, raw.headers.get("x-smg-process", "")

    try:
        return await asyncio.gather(*(turn(n) for n in range(TURNS)))
    finally:
        await client.close()


async def _rows(url: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return {
            "items": await conn.fetch(
                "SELECT conversation_id, id, seq, body::text AS body FROM smg_conversation_items"
            ),
            "responses": await conn.fetch("SELECT id, conversation_id FROM smg_responses"),
        }
    finally:
        await conn.close()


def test_200_concurrent_turns_on_postgres(fake: FakeProvider) -> None:
    """Counted in the database the moment the last answer is in (no wait): every turn's
    response stored once, its two items (input, output) appended once each, sequence
    numbers without a gap or a repeat, both processes serving."""
    with database("postgres") as (flags, server):
        flags += ["--postgres-op-timeout-secs", "20"]
        with fake_gateway(fake, *flags) as gw:
            client = _client(gw)
            conv_ids = [client.conversations.create().id for _ in range(CONVERSATIONS)]
            started = time.monotonic()
            answers = asyncio.run(_turns(gw.url, conv_ids))
            took = time.monotonic() - started
            rows = asyncio.run(_rows(server.url))
    print(f"{TURNS} concurrent turns in {took:.2f} s")
    assert {process for _n, _id, process in answers} == {"0", "1"}
    response_ids = [rid for _n, rid, _p in answers]
    assert len(set(response_ids)) == TURNS
    stored = {r["id"]: r["conversation_id"] for r in rows["responses"]}
    assert len(rows["responses"]) == TURNS
    assert {rid: stored.get(rid) for _n, rid, _p in answers} == {
        rid: conv_ids[n % CONVERSATIONS] for n, rid, _p in answers
    }
    items = rows["items"]
    assert len(items) == 2 * TURNS
    assert len({(r["conversation_id"], r["id"]) for r in items}) == 2 * TURNS
    per_turn = TURNS // CONVERSATIONS
    for conv_id in conv_ids:
        seqs = sorted(r["seq"] for r in items if r["conversation_id"] == conv_id)
        assert seqs == list(range(1, 2 * per_turn + 1)), conv_id
    inputs = sorted(
        orjson.loads(r["body"])["content"][0]["text"]
        for r in items
        if orjson.loads(r["body"])["role"] == "user"
    )
    assert inputs == sorted(f"turn {n}" for n in range(TURNS))


# --- Redis killed under load ------------------------------------------------------------------


class Outcome:
    __slots__ = ("code", "ended", "kind", "started", "status")

    def __init__(self, kind: str, started: float, ended: float, status: int, code: str) -> None:
        self.kind = kind
        self.started = started
        self.ended = ended
        self.status = status
        self.code = code


def _load(gw: Gateway, until: float, out: list[Outcome], lock: threading.Lock) -> None:
    """One client's bounded loop: a stateless turn (store=false), a stored turn, a GET of
    the last one stored and a turn chained from it, each noted with its time and answer."""
    client = httpx.Client(base_url=gw.url, timeout=30)

    def call(kind: str, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        started = time.monotonic()
        answer = client.request(method, path, json=body)
        code = ""
        if answer.status_code >= 400:
            code = str(answer.json().get("error", {}).get("code", ""))
        with lock:
            out.append(Outcome(kind, started, time.monotonic(), answer.status_code, code))
        return answer

    try:
        rid = ""  # the last response stored: read and chained from while Redis is down
        for n in range(2000):  # bounded in count and in time
            if time.monotonic() >= until:
                break
            time.sleep(0.01)  # paced: the phases after the outage get their share
            body: dict[str, Any] = {"model": MODEL, "input": "s", "store": False}
            call("stateless", "POST", "/v1/responses", body)
            stored = call("stored", "POST", "/v1/responses", {"model": MODEL, "input": f"{n}"})
            if stored.status_code == 200:
                rid = stored.json()["id"]
            if rid:
                call("get", "GET", f"/v1/responses/{rid}", None)
                body = {"model": MODEL, "input": "next", "previous_response_id": rid}
                call("chained", "POST", "/v1/responses", body)
    finally:
        client.close()


def test_redis_killed_under_load(fake: FakeProvider) -> None:
    op_timeout = 1.0
    with database("redis") as (flags, server):
        flags += ["--redis-op-timeout-secs", str(op_timeout)]
        with fake_gateway(fake, *flags) as gw:
            out: list[Outcome] = []
            lock = threading.Lock()
            t0 = time.monotonic()
            killed_at, restarted_at, until = t0 + 1.5, t0 + 5.0, t0 + 8.0
            signalled_at, restarting_at = killed_at, restarted_at
            clients = [
                threading.Thread(target=_load, args=(gw, until, out, lock)) for _ in range(4)
            ]
            for thread in clients:
                thread.start()
            try:
                time.sleep(max(0.0, killed_at - time.monotonic()))
                signalled_at = time.monotonic()
                server.kill()
                killed_at = time.monotonic()  # gone (waited for) by now
                time.sleep(max(0.0, restarted_at - time.monotonic()))
                restarting_at = time.monotonic()
                server.start()  # the same port; empty (no persistence)
                restarted_at = time.monotonic()  # listening by now
            finally:
                for thread in clients:
                    thread.join(timeout=60)
            logs = gw.logs()

    def phase(o: Outcome) -> str:
        if o.ended < signalled_at:
            return "up"
        if o.started > killed_at and o.ended < restarting_at:
            return "down"
        if o.started > restarted_at + 1.0:
            return "back"
        return "edge"

    table: dict[tuple[str, str], dict[str, int]] = {}
    for o in out:
        row = table.setdefault((phase(o), o.kind), {})
        key = f"{o.status} {o.code}".strip()
        row[key] = row.get(key, 0) + 1
    print("redis killed under load:", sorted(table.items()))
    down = [o for o in out if phase(o) == "down"]
    back = [o for o in out if phase(o) == "back"]
    assert all(o.status == 200 for o in out if phase(o) == "up")
    # Down: the history it needs is unavailable, or its record cannot be written -> 503
    # storage_unavailable within the op timeout (and a margin for this loaded host), as the
    # 1.13 binary answers all three; no history and store=false -> answered.
    needs_store = [o for o in down if o.kind in ("get", "chained", "stored")]
    assert needs_store and all(
        (o.status, o.code) == (503, "storage_unavailable") for o in needs_store
    )
    slowest = max(o.ended - o.started for o in needs_store)
    print(f"503s while down: {len(needs_store)}, slowest {slowest * 1000:.0f} ms")
    assert slowest < op_timeout + 1.5
    assert [o for o in down if o.kind == "stateless"]
    assert all(o.status == 200 for o in down if o.kind == "stateless")
    assert "storing response" in logs
    # Back: everything works again.
    assert {o.kind for o in back} == {"stateless", "stored", "get", "chained"}
    assert all(o.status == 200 for o in back), [(o.kind, o.status, o.code) for o in back]


def test_a_failed_write(fake: FakeProvider) -> None:
    """Redis gone: a whole stored answer is 503 storage_unavailable ("The response was not
    stored: ..."), a streamed one goes out whole (its failure logged), as the 1.13 binary
    answers the same requests; store=false is answered."""
    with (
        database("redis") as (flags, server),
        fake_gateway(fake, *flags, "--redis-op-timeout-secs", "1") as gw,
    ):
        client = _client(gw)
        first = client.responses.create(model=MODEL, input="up")
        # Hung (SIGSTOP): each store call gives up at the op timeout (1 s): 503 after it.
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            for what, call in (
                ("write", lambda: client.responses.create(model=MODEL, input="hung")),
                ("read", lambda: client.responses.retrieve(first.id)),
            ):
                started = time.monotonic()
                with pytest.raises(openai.APIStatusError) as err:
                    call()
                took = time.monotonic() - started
                print(f"hung redis, {what}: 503 after {took:.2f} s")
                assert err.value.status_code == 503 and 0.9 <= took < 2.5, took
        finally:
            server.proc.send_signal(signal.SIGCONT)
        server.kill()
        with pytest.raises(openai.APIStatusError) as err:
            client.responses.create(model=MODEL, input="one")
        assert err.value.status_code == 503
        assert err.value.body == {  # the 1.13 binary's type, code and first words
            "type": "server_error",
            "code": "storage_unavailable",
            "message": "The response was not stored: the history store is unavailable",
            "param": None,
        }
        types = [e.type for e in client.responses.create(model=MODEL, input="two", stream=True)]
        assert types[0] == "response.created" and types[-1] == "response.completed"
        unstored = client.responses.create(model=MODEL, input="three", store=False)
        assert unstored.store is False
        assert "storing response" in gw.logs()


# --- admission for the history routes ---------------------------------------------------------


def test_history_routes_take_admission_permits() -> None:
    """--max-concurrent-requests 1 --queue-size 1: while a slow chat request holds the one
    permit, a conversation GET queues and a response GET is refused 429 (queue full), as
    1.13's admission layer answers on these routes; the queued GET runs when the permit
    frees, and gives its permit back."""
    with mockutil.start_mock_workers(1) as workers:
        mockutil.set_config(workers.url, ttft_ms=1500, itl_ms=0, output_len=4)
        flags = [
            "--max-concurrent-requests",
            "1",
            "--queue-size",
            "1",
            "--queue-timeout-secs",
            "30",
        ]
        with running_gateway(
            ["--worker-urls", workers.url, "--history-backend", "memory", *flags]
        ) as gw:
            gw.wait_ready()
            holder = send_only(gw.port)
            wait_metric(gw, "smg_gateway_admission_inflight", 1, 5.0)
            started = time.monotonic()
            queued = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            queued.sendall(b"GET /v1/conversations/conv_nope HTTP/1.1\r\nhost: gw\r\n\r\n")
            wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
            refused = httpx.get(gw.url + "/v1/responses/resp_nope", timeout=10)
            assert refused.status_code == 429
            assert refused.headers["x-smg-error-code"] == "admission_queue_full"
            assert refused.json()["error"]["code"] == "admission_queue_full"
            assert read_status(holder)[0] == 200
            status, head = read_status(queued)
            assert status == 404, head  # run once admitted: no such conversation
            assert time.monotonic() - started > 0.5  # it waited for the holder
            wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
            assert metric(gw, "smg_admission_queue_rejected_total") == 1
            for sock in (holder, queued):
                sock.close()


def test_a_queued_responses_post_loads_its_history_once_admitted() -> None:
    """--max-concurrent-requests 1 --queue-size 1: while a slow chat request holds the one
    permit, a POST /v1/responses naming an unknown previous_response_id queues (1.13's
    admission layer runs before its handler reads the store) and a second one is refused 429
    queue full; before this, both read the store at once and answered 400 without waiting.
    Once admitted, the queued one reads the store: 400 previous_response_not_found."""
    with mockutil.start_mock_workers(1) as workers:
        mockutil.set_config(workers.url, ttft_ms=1500, itl_ms=0, output_len=4)
        flags = ["--max-concurrent-requests", "1", "--queue-size", "1"]
        flags += ["--queue-timeout-secs", "30"]
        with running_gateway(
            ["--worker-urls", workers.url, "--history-backend", "memory", *flags]
        ) as gw:
            gw.wait_ready()
            body = orjson.dumps({"model": "m", "input": "hi", "previous_response_id": "resp_nope"})
            holder = send_only(gw.port)
            wait_metric(gw, "smg_gateway_admission_inflight", 1, 5.0)
            started = time.monotonic()
            queued = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            queued.sendall(
                b"POST /v1/responses HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
            refused = httpx.post(
                gw.url + "/v1/responses",
                content=body,
                headers={"content-type": "application/json"},
                timeout=10,
            )
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "admission_queue_full"
            assert read_status(holder)[0] == 200
            status, answer = read_status(queued)
            while chunk := queued.recv(65536):  # connection: close, so it ends
                answer += chunk
            assert status == 400, answer
            assert b'"previous_response_not_found"' in answer
            assert time.monotonic() - started > 0.5  # it waited for the holder
            wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
            for sock in (holder, queued):
                sock.close()
