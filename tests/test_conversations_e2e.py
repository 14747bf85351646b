"""The Conversations API end to end: `smg launch --processes 2` with a history backend, driven
by the openai SDK's `client.conversations` (max_retries=0). Every call goes over a fresh
connection that the test first checks lands on the process it wants (`x-smg-process`), so
consecutive calls alternate between the two data-plane processes: what one process stored,
the other reads back."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import historyutil
import httpx
import openai
import psutil
import pytest

from tests.gatewayutil import Gateway, children, running_gateway

KEY_A = "key-team-a"
KEY_B = "key-team-b"
TENANT_ARGS = ["--tenant-api-key", f"team-a:{KEY_A}", "--tenant-api-key", f"team-b:{KEY_B}"]

# The HTTP library the installed openai SDK is built on (httpx, or its fork in newer SDKs).
_hx: Any = sys.modules[openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0]]


class PinnedTransport(_hx.BaseTransport):  # type: ignore[misc]
    """Sends each request on a new connection to data-plane process `want`, then flips
    `want`: a probe (GET /liveness) on the connection says which process accepted it, and a
    connection on the other one is closed and another opened (at most 200 tries)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.want = 0
        self.seen: list[str] = []

    def handle_request(self, request: Any) -> Any:
        for _ in range(200):
            transport = _hx.HTTPTransport()
            try:
                probe = transport.handle_request(_hx.Request("GET", self.base + "/liveness"))
                probe.read()
                probe.close()
                if probe.headers.get("x-smg-process") != str(self.want):
                    continue
                answer = transport.handle_request(request)
                content = answer.read()
                answer.close()
            finally:
                transport.close()
            process = answer.headers.get("x-smg-process", "")
            assert process == str(self.want), "the answer came from another process"
            self.seen.append(process)
            self.want = 1 - self.want
            return _hx.Response(
                answer.status_code, headers=answer.headers, content=content, request=request
            )
        raise AssertionError(f"no connection landed on process {self.want} in 200 tries")


def pinned_client(
    gw: Gateway, key: str, transport: PinnedTransport | None = None
) -> tuple[openai.OpenAI, PinnedTransport]:
    transport = transport or PinnedTransport(gw.url)
    client = openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key=key,
        max_retries=0,
        timeout=30.0,
        http_client=openai.DefaultHttpxClient(transport=transport),
    )
    return client, transport


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with running_gateway(["--history-backend", "memory", *TENANT_ARGS]) as gw:
        yield gw


def _message(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "message", "role": role, "content": text}
    if item_id is not None:
        item["id"] = item_id
    return item


def _text(item: Any) -> str:
    return str(item.content[0].text)


def run_lifecycle(gw: Gateway) -> list[str]:
    """Create, read, update, add, page, get and delete an item, another tenant's 404s,
    delete: each call on the other process than the one before. Returns the processes."""
    client, transport = pinned_client(gw, KEY_A)
    other, _ = pinned_client(gw, KEY_B, transport)  # the same alternation
    conv = client.conversations.create(
        items=[_message("user", "first"), _message("assistant", "second")],  # type: ignore[list-item]
        metadata={"topic": "demo"},
    )
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert conv.metadata == {"topic": "demo"}
    got = client.conversations.retrieve(conv.id)
    assert (got.id, got.created_at, got.metadata) == (conv.id, conv.created_at, {"topic": "demo"})
    updated = client.conversations.update(conv.id, metadata={"topic": "changed", "k": "v"})
    assert updated.metadata == {"topic": "changed", "k": "v"}

    added = client.conversations.items.create(
        conv.id,
        items=[
            _message("user", "third"),
            _message("assistant", "fourth"),
            _message("user", "fifth", "msg_fixed"),
        ],  # type: ignore[list-item]
    )
    assert [_text(item) for item in added.data] == ["third", "fourth", "fifth"]
    assert added.last_id == "msg_fixed" and added.data[2].id == "msg_fixed"
    assert all(item.status == "completed" for item in added.data)

    # Pages of 2 in ascending order, chained with `after`.
    texts: list[str] = []
    after: str | None = None
    pages = 0
    while pages < 5:
        page = client.conversations.items.list(
            conv.id, limit=2, order="asc", **({"after": after} if after else {})
        )
        pages += 1
        texts += [_text(item) for item in page.data]
        if not page.has_more:
            break
        after = page.last_id
    assert texts == ["first", "second", "third", "fourth", "fifth"]
    assert pages == 3
    newest = client.conversations.items.list(conv.id)
    assert [_text(item) for item in newest.data] == ["fifth", "fourth", "third", "second", "first"]
    assert newest.has_more is False

    item = client.conversations.items.retrieve("msg_fixed", conversation_id=conv.id)
    assert (item.id, item.role, _text(item)) == ("msg_fixed", "user", "fifth")

    # Another tenant: every route answers as if the conversation did not exist.
    with pytest.raises(openai.NotFoundError) as err:
        other.conversations.retrieve(conv.id)
    assert err.value.body == {
        "type": "invalid_request_error",
        "code": "not_found",
        "message": "Conversation not found",
        "param": None,
    }
    with pytest.raises(openai.NotFoundError):
        other.conversations.items.list(conv.id)
    with pytest.raises(openai.NotFoundError):
        other.conversations.items.retrieve("msg_fixed", conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        other.conversations.delete(conv.id)

    after_delete = client.conversations.items.delete("msg_fixed", conversation_id=conv.id)
    assert (after_delete.id, after_delete.object) == (conv.id, "conversation")
    with pytest.raises(openai.NotFoundError) as err:
        client.conversations.items.retrieve("msg_fixed", conversation_id=conv.id)
    assert err.value.body["message"] == "Item not found in this conversation"  # type: ignore[index]
    assert len(client.conversations.items.list(conv.id).data) == 4

    deleted = client.conversations.delete(conv.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (conv.id, "conversation.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    return transport.seen


def test_lifecycle_across_processes(gateway: Gateway) -> None:
    seen = run_lifecycle(gateway)
    assert seen == ["0", "1"] * 9  # 18 calls, each on the other process than the last


def test_bad_input_is_400_in_openai_shape(gateway: Gateway) -> None:
    client, _ = pinned_client(gateway, KEY_A)
    conv = client.conversations.create()
    assert conv.metadata == {}
    with pytest.raises(openai.BadRequestError) as err:
        client.conversations.items.create(
            conv.id,
            items=[_message("user", str(i)) for i in range(21)],  # type: ignore[misc]
        )
    assert err.value.body == {
        "type": "invalid_request_error",
        "code": "invalid_request",
        "message": "Cannot add more than 20 items at a time",
        "param": None,
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.conversations.items.list(conv.id, limit=0)
    assert err.value.body["message"] == "limit must be an integer between 1 and 100"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.conversations.items.create(conv.id, items=[{"type": "bogus"}])  # type: ignore[list-item]
    assert err.value.body["message"].startswith("Unsupported item type 'bogus'")  # type: ignore[index]
    client.conversations.items.create(conv.id, items=[_message("user", "dup", "msg_d")])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError) as err:
        client.conversations.items.create(conv.id, items=[_message("user", "again", "msg_d")])  # type: ignore[list-item]
    assert err.value.body["code"] == "item_already_in_conversation"  # type: ignore[index]
    headers = {"authorization": f"Bearer {KEY_A}"}
    answer = httpx.post(
        gateway.url + "/v1/conversations", content=b"{bad", headers=headers, timeout=10
    )
    assert answer.status_code == 400
    assert answer.headers["x-smg-error-code"] == "invalid_json"
    assert set(answer.json()["error"]) == {"type", "code", "message", "param"}
    answer = httpx.post(
        gateway.url + "/v1/conversations",
        json={"metadata": {"n": 1}},
        headers=headers,
        timeout=10,
    )
    assert (answer.status_code, answer.json()["error"]["message"]) == (
        400,
        "metadata value of 'n' must be a string",
    )
    answer = httpx.put(gateway.url + f"/v1/conversations/{conv.id}", headers=headers, timeout=10)
    assert (answer.status_code, answer.headers["allow"]) == (405, "GET,HEAD,POST,DELETE")
    # The serving keys guard these routes as every other serving route.
    answer = httpx.get(gateway.url + f"/v1/conversations/{conv.id}", timeout=10)
    assert (answer.status_code, answer.json()["error"]["code"]) == (401, "invalid_api_key")
    answer = httpx.get(gateway.url + "/v1/conversations/x/items/y/z", headers=headers, timeout=10)
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "unknown_url")


def test_history_backend_none_refuses() -> None:
    with running_gateway(["--history-backend", "none"], processes=1) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.conversations.create()
        assert err.value.status_code == 501
        assert err.value.body == {
            "type": "server_error",
            "code": "not_implemented",
            "message": "Conversations need a history store: "
            "this gateway runs with --history-backend none",
            "param": None,
        }
        # The stateless routes are untouched.
        assert httpx.get(gw.url + "/liveness", timeout=10).status_code == 200


def test_trusted_tenant_header() -> None:
    """--trust-tenant-header: without a gateway key, the header names the tenant (1.13's
    default name, x-smg-tenant-id); another header value, or none, finds nothing."""
    with running_gateway(["--trust-tenant-header"], processes=1) as gw:
        url = gw.url + "/v1/conversations"
        created = httpx.post(url, json={}, headers={"x-smg-tenant-id": "t1"}, timeout=10)
        assert created.status_code == 200
        conv = f"{url}/{created.json()['id']}"
        for headers, status in (
            ({"x-smg-tenant-id": "t1"}, 200),
            ({"x-smg-tenant-id": "t2"}, 404),
            ({}, 404),
            ({"x-smg-tenant-id": ""}, 404),
        ):
            assert httpx.get(conv, headers=headers, timeout=10).status_code == status, headers
        # Stored with no tenant: every caller finds it (as 1.13's binary answers).
        created = httpx.post(url, json={}, timeout=10)
        conv = f"{url}/{created.json()['id']}"
        assert httpx.get(conv, headers={"x-smg-tenant-id": "t2"}, timeout=10).status_code == 200


def test_store_unavailable_is_503_and_stateless_routes_keep_serving() -> None:
    """The memory store lives in the control plane: stopped (SIGSTOP), the history call times
    out (smg.history.ipc, 5 s) and the route answers 503 storage_unavailable while the
    stateless routes answer; continued, the same call succeeds."""
    with running_gateway(["--history-backend", "memory"], processes=1) as gw:
        url = gw.url + "/v1/conversations"
        assert httpx.post(url, json={}, timeout=10).status_code == 200
        control = control_plane_pid(gw)
        os.kill(control, signal.SIGSTOP)
        try:
            started = time.monotonic()
            answer = httpx.post(url, json={}, timeout=30)
            took = time.monotonic() - started
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "storage_unavailable"
            assert 4.0 < took < 15.0, took
            assert httpx.get(gw.url + "/liveness", timeout=5).status_code == 200
        finally:
            os.kill(control, signal.SIGCONT)
        assert httpx.post(url, json={}, timeout=10).status_code == 200


def control_plane_pid(gw: Gateway) -> int:
    """The child listening on the metrics port is the control plane."""
    metrics_port = int(gw.metrics_url.rsplit(":", 1)[1].split("/")[0])
    for child in children(gw):
        for conn in child.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == metrics_port:
                return int(child.pid)
    raise AssertionError("no child listens on the metrics port")


# --- the same on the databases (real redis-server / PostgreSQL from tests/historyutil.py) ------


@contextlib.contextmanager
def database_gateway(backend: str) -> Iterator[tuple[Gateway, Any]]:
    """A gateway on `backend` with its server started (and stopped after) by the test; the
    test is skipped where the server's binaries are not installed."""
    if backend == "redis":
        if historyutil.redis_binary() is None:
            pytest.skip("redis-server is not installed")
        server_cm = historyutil.running_redis()
        flags = ["--redis-op-timeout-secs", "1"]
    else:
        if historyutil.postgres_bin_dir() is None:
            pytest.skip("PostgreSQL is not installed")
        server_cm = historyutil.running_postgres()
        flags = ["--postgres-op-timeout-secs", "1"]
    with server_cm as server:
        url_flag = "--redis-url" if backend == "redis" else "--postgres-db-url"
        args = ["--history-backend", backend, url_flag, server.url, *flags, *TENANT_ARGS]
        with running_gateway(args) as gw:
            yield gw, server


@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_lifecycle_on_database(backend: str) -> None:
    with database_gateway(backend) as (gw, _server):
        assert run_lifecycle(gw) == ["0", "1"] * 9


def test_redis_down_is_503_within_the_op_timeout() -> None:
    """Each call is pinned to a data-plane process (0, 1, 0, ...). Process 1's pooled
    connection is left unused while Redis is down, so it is stale when Redis is back: the pool
    must find that out at check-out (redis-py 8 skipped that test with RESP3 maintenance
    notifications on, and the first call there was 503)."""
    with database_gateway("redis") as (gw, server):
        client, transport = pinned_client(gw, KEY_A)
        http = _hx.Client(transport=transport, base_url=gw.url, timeout=30)
        conv = client.conversations.create(metadata={"a": "b"})  # process 0
        path, headers = f"/v1/conversations/{conv.id}", {"authorization": f"Bearer {KEY_A}"}
        assert http.get(path, headers=headers).status_code == 200  # process 1: pooled too

        def down() -> None:
            started = time.monotonic()
            answer = http.get(path, headers=headers)
            assert time.monotonic() - started < 3.0  # --redis-op-timeout-secs 1, and margin
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "storage_unavailable"

        server.kill()
        down()  # process 0
        assert httpx.get(gw.url + "/liveness", timeout=5).status_code == 200
        server.start()  # empty again (no persistence): the service answers, 404 for the id
        assert http.get(path, headers=headers).status_code == 404  # process 1: stale conn
        assert http.get(path, headers=headers).status_code == 404  # process 0
        assert client.conversations.create().id.startswith("conv_")  # process 1
        server.kill()
        down()  # process 0
        down()  # process 1
        assert transport.seen == ["0", "1", "0", "1", "0", "1", "0", "1"]
