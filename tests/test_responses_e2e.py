"""The Responses API's history end to end: `smg launch --processes 2 --history-backend memory`
in front of the OpenAI fake (tests/providerfakes.py), which keeps no history. Driven by the
openai SDK's `client.responses` (max_retries=0); each call lands on the other data-plane
process than the one before (PinnedTransport, x-smg-process), so what one process stored,
the other reads back. The fake's answer text says how many input items it received."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import historyutil
import httpx
import openai
import pytest
from providerfakes import FakeProvider

from tests.fakegateway import gateway_over, openai_fake
from tests.gatewayutil import Gateway, running_gateway, wait_until
from tests.test_conversations_e2e import PinnedTransport, pinned_client

MODEL = "gpt-4o"


fake = openai_fake(MODEL)


@pytest.fixture(scope="module")
def gateway(fake: FakeProvider) -> Iterator[Gateway]:
    args = ["--history-backend", "memory"]
    with gateway_over(
        fake, args, lambda gw: _models(gw) == [MODEL], "the fake's model listed"
    ) as gw:
        yield gw


def _models(gw: Gateway) -> list[str]:
    import httpx

    answer = httpx.get(gw.url + "/v1/models", timeout=5)
    return [m["id"] for m in answer.json().get("data", [])] if answer.status_code == 200 else []


def _posts(fake: FakeProvider) -> list[dict[str, Any]]:
    return [r["body"] for r in fake.seen() if r["method"] == "POST"]


def _texts(items: list[dict[str, Any]]) -> list[str]:
    return [" ".join(p["text"] for p in item["content"]) for item in items]


def _stored(client: openai.OpenAI, response_id: str) -> None:
    """The record is written before the answer (Observer.settle): it reads back at once,
    from either process."""
    assert client.responses.retrieve(response_id).id == response_id


def test_chain_through_previous_response_id(gateway: Gateway, fake: FakeProvider) -> None:
    run_previous_chain(gateway, fake)


def run_previous_chain(gateway: Gateway, fake: FakeProvider) -> None:
    client, transport = pinned_client(gateway, "unused")
    probe, _ = pinned_client(gateway, "unused", PinnedTransport(gateway.url))
    fake.clear()
    first = client.responses.create(model=MODEL, input="one", instructions="be brief")
    assert first.output_text == "seen 1 items; last: one"
    _stored(probe, first.id)
    second = client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.store is True
    _stored(probe, second.id)
    with client.responses.stream(
        model=MODEL, input="three", previous_response_id=second.id
    ) as stream:
        third = stream.get_final_response()
    assert third.output_text == "seen 5 items; last: three"
    # The stream's response events carry the request's fields back, as 1.13 rewrites them.
    assert (third.previous_response_id, third.store) == (second.id, True)
    _stored(probe, third.id)
    assert transport.seen == ["0", "1", "0"]
    sent = _posts(fake)
    assert len(sent) == 3
    assert [b.get("previous_response_id") for b in sent] == [None, None, None]
    assert _texts(sent[2]["input"]) == [
        "one",
        "seen 1 items; last: one",
        "two",
        "seen 3 items; last: two",
        "three",
    ]
    assert [i["role"] for i in sent[2]["input"]] == ["user", "assistant"] * 2 + ["user"]
    # As 1.13 sends them: the items as stored (ids, status), store=false to the worker.
    assert sent[2]["input"][1]["id"] == first.output[0].id
    assert all(i["status"] == "completed" for i in sent[2]["input"])
    assert [b["store"] for b in sent] == [False, False, False]
    assert sent[0]["instructions"] == "be brief"
    assert "instructions" not in sent[1]  # not carried from earlier turns

    got = client.responses.retrieve(second.id)
    assert (got.id, got.previous_response_id, got.output_text) == (
        second.id,
        first.id,
        "seen 3 items; last: two",
    )
    listed = client.responses.input_items.list(third.id)
    assert [i.content[0].text for i in listed.data] == ["three"]  # type: ignore[union-attr]
    assert listed.first_id == listed.last_id == listed.data[0].id
    assert listed.has_more is False

    deleted = client.responses.delete(first.id)
    assert deleted is None  # the SDK returns nothing; the answer's JSON is checked below
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(first.id)
    assert err.value.body["message"] == f"No response found with id '{first.id}'"  # type: ignore[index]


def test_delete_answer_shape(gateway: Gateway) -> None:
    import httpx

    client, _ = pinned_client(gateway, "unused")
    made = client.responses.create(model=MODEL, input="x")
    _stored(client, made.id)
    answer = httpx.delete(f"{gateway.url}/v1/responses/{made.id}", timeout=5)
    assert answer.status_code == 200
    # 1.13's answer, tried on its binary (OpenAI documents object "response").
    assert answer.json() == {"id": made.id, "object": "response.deleted", "deleted": True}
    again = httpx.delete(f"{gateway.url}/v1/responses/{made.id}", timeout=5)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "not_found"


def test_chain_through_conversation(gateway: Gateway, fake: FakeProvider) -> None:
    run_conversation_chain(gateway, fake)


def run_conversation_chain(gateway: Gateway, fake: FakeProvider) -> None:
    client, transport = pinned_client(gateway, "unused")
    conv = client.conversations.create(items=[{"role": "user", "content": "zero"}])  # type: ignore[list-item]
    fake.clear()
    turns = []
    for n, word in enumerate(["one", "two", "three", "four"]):
        last = n == 3  # store=false: neither stored nor appended, as 1.13
        answer = client.responses.create(
            model=MODEL, input=word, conversation=conv.id, **({"store": False} if last else {})
        )
        assert answer.conversation is not None and answer.conversation.id == conv.id
        turns.append(answer)

        # Appended before the answer: read back at once (on the other process).
        items = client.conversations.items.list(conv.id, limit=100).data
        assert len(items) == (3, 5, 7, 7)[n]
    sent = _posts(fake)
    assert [b.get("conversation") for b in sent] == [None] * 4
    assert _texts(sent[2]["input"]) == [
        "zero",
        "one",
        "seen 2 items; last: one",
        "two",
        "seen 4 items; last: two",
        "three",
    ]
    assert [t.output_text for t in turns] == [
        "seen 2 items; last: one",
        "seen 4 items; last: two",
        "seen 6 items; last: three",
        "seen 8 items; last: four",
    ]
    # Every call (turns and item listings) on the other process than the one before.
    seen = transport.seen
    assert len(seen) >= 9 and all(a != b for a, b in itertools.pairwise(seen))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(turns[3].id)


def test_unknown_history_is_refused(gateway: Gateway) -> None:
    client, _ = pinned_client(gateway, "unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope")
    assert err.value.body == {  # the Rust SMG's words (routers/openai/responses/history.rs)
        "type": "invalid_request_error",
        "code": "previous_response_not_found",
        "message": "Previous response with id 'resp_nope' not found.",
        "param": None,
    }
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(
            model=MODEL, input="x", previous_response_id="resp_1", conversation="conv_1"
        )
    assert both.value.body["code"] == "mutually_exclusive_parameters"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as nf:
        client.responses.create(model=MODEL, input="x", conversation="conv_nope")
    assert nf.value.body["message"] == "No conversation found with id 'conv_nope'"  # type: ignore[index]


def test_history_backend_none() -> None:
    with FakeProvider("openai", [MODEL]) as fake:
        args = ["--worker-urls", fake.url, "--disable-health-check", "--history-backend", "none"]
        with running_gateway(args) as gw:
            wait_until(lambda: _models(gw) == [MODEL], 20, "the fake's model listed")
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            assert client.responses.create(model=MODEL, input="a").output_text.endswith("a")
            with pytest.raises(openai.BadRequestError):
                client.responses.create(model=MODEL, input="b", previous_response_id="resp_1")
            with pytest.raises(openai.InternalServerError) as err:  # 501
                client.responses.retrieve("resp_1")
            assert err.value.status_code == 501


# --- the same on the databases (real redis-server / PostgreSQL from tests/historyutil.py) ------


@contextlib.contextmanager
def database_gateway(backend: str, fake: FakeProvider) -> Iterator[tuple[Gateway, Any]]:
    if backend == "redis":
        server_cm = historyutil.running_redis()  # skips where redis-server is missing
        flags = ["--redis-op-timeout-secs", "1"]
    else:
        server_cm = historyutil.running_postgres()
        flags = ["--postgres-op-timeout-secs", "1"]
    with server_cm as server:
        url_flag = "--redis-url" if backend == "redis" else "--postgres-db-url"
        args = ["--worker-urls", fake.url, "--disable-health-check"]
        args += ["--history-backend", backend, url_flag, server.url, *flags]
        with running_gateway(args) as gw:
            wait_until(lambda: _models(gw) == [MODEL], 20, "the fake's model listed")
            yield gw, server


@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_chains_on_database(backend: str, fake: FakeProvider) -> None:
    with database_gateway(backend, fake) as (gw, _server):
        run_previous_chain(gw, fake)
        run_conversation_chain(gw, fake)


def test_store_down_is_503_and_stateless_requests_keep_working(fake: FakeProvider) -> None:
    with database_gateway("redis", fake) as (gw, server):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        first = client.responses.create(model=MODEL, input="one")
        _stored(client, first.id)
        server.kill()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
            assert time.monotonic() - started < 5.0  # --redis-op-timeout-secs 1, and margin
            assert err.value.status_code == 503
            assert err.value.body["code"] == "storage_unavailable"  # type: ignore[index]
            answer = httpx.get(f"{gw.url}/v1/responses/{first.id}", timeout=30)
            assert answer.status_code == 503
        # No history and store=false: answered. A stored turn whose record cannot be
        # written: 503, as the 1.13 binary answers it (tests/test_responses_proofs.py).
        assert client.responses.create(model=MODEL, input="a", store=False).output_text
        with pytest.raises(openai.APIStatusError) as err:
            client.responses.create(model=MODEL, input="b")
        assert (err.value.status_code, err.value.body["code"]) == (503, "storage_unavailable")  # type: ignore[index]


def test_chains_through_an_external_worker() -> None:
    """The fake registered as an external worker (POST /workers, provider openai): the same
    history, through the external route."""
    from test_external_routing import register

    with (
        FakeProvider("openai", [MODEL]) as ext,
        running_gateway(["--history-backend", "memory"]) as gw,
    ):
        register(gw, ext, "openai", 1, api_key="sk-proj-worker")
        run_previous_chain(gw, ext)
        run_conversation_chain(gw, ext)
