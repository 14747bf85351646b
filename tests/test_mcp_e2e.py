"""The MCP tool loop of POST /v1/responses end to end: `smg launch --processes 2
--mcp-config-path FILE` in front of the OpenAI fake (tests/providerfakes.py: a first user
message "call NAME" makes it call the function NAME until it sees the output, then answer
the output as text), with the real MCP server tests/mcpserver.py over stdio ("calc") and
over streamable HTTP ("web"), driven by the openai SDK (max_retries=0).

Proves: mcp_list_tools, mcp_call with output "5" and the final message "5", streamed and
not, over both transports; the stored response reads back (from the other process); a
failing tool and a hanging one (a second gateway, tool timeout 3 s) end as failed mcp_call
items and the request completes; 11 calls in a row stop at 1.13's limit of 10; a request's
own server_url; an unknown label answers 400.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from providerfakes import FakeProvider

from smg.mcp.loop import NOT_EXECUTED
from tests.gatewayutil import Gateway, free_port, running_gateway, wait_until
from tests.mcputil import SERVER, http_server
from tests.test_conversations_e2e import pinned_client

MODEL = "gpt-4o"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider("openai", [MODEL]) as provider:
        yield provider


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    """tests/mcpserver.py over streamable HTTP on 127.0.0.1 (its MCP_READY line)."""
    with http_server() as (url, _proc):
        yield url


def config_file(tmp: Path, url: str) -> str:
    path = tmp / "mcp.yaml"
    path.write_text(
        "servers:\n"
        "  - name: calc\n"
        "    protocol: stdio\n"
        f"    command: {sys.executable}\n"
        f"    args: [{SERVER}, stdio]\n"
        "  - name: web\n"
        "    protocol: streamable\n"
        f"    url: {url}\n"
    )
    return str(path)


def launch(fake: FakeProvider, config: str, timeout: str, *flags: str) -> Iterator[Gateway]:
    args = [
        *flags,
        "--worker-urls",
        fake.url,
        "--disable-health-check",
        "--history-backend",
        "memory",
        "--mcp-config-path",
        config,
        "--mcp-tool-timeout-secs",
        timeout,
    ]
    with running_gateway(args) as gw:
        wait_until(lambda: _models(gw) == [MODEL], 20, "the fake's model listed")
        yield gw


@pytest.fixture(scope="module")
def gateway(
    fake: FakeProvider, mcp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    # 15 s: a stdio server's first use starts its process (about 2 s here), within the bound.
    yield from launch(fake, config_file(tmp_path_factory.mktemp("mcp"), mcp_url), "15")


def _models(gw: Gateway) -> list[str]:
    answer = httpx.get(gw.url + "/v1/models", timeout=5)
    return [m["id"] for m in answer.json().get("data", [])] if answer.status_code == 200 else []


def _posts(fake: FakeProvider) -> list[dict[str, Any]]:
    return [r["body"] for r in fake.seen() if r["method"] == "POST"]


def mcp_tool(label: str) -> list[Any]:
    return [{"type": "mcp", "server_label": label, "require_approval": "never"}]


@pytest.mark.parametrize("label", ["calc", "web"])
def test_add_whole(gateway: Gateway, fake: FakeProvider, label: str) -> None:
    client, _ = pinned_client(gateway, "unused")
    fake.clear()
    response = client.responses.create(model=MODEL, input="call add", tools=mcp_tool(label))
    kinds = [item.type for item in response.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"]
    listed, call, _message = response.output
    assert listed.server_label == label
    assert [t.name for t in listed.tools] == ["add", "fail", "sleep", "env", "pid"]
    assert (call.server_label, call.name, call.arguments, call.output, call.error) == (
        label,
        "add",
        '{"a":2,"b":3}',
        "5",
        None,
    )
    assert response.output_text == "5"
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.store is True and response.previous_response_id is None
    posts = _posts(fake)
    assert len(posts) == 2
    assert [t["name"] for t in posts[0]["tools"]] == ["add", "fail", "sleep", "env", "pid"]
    assert {p["store"] for p in posts} == {False}
    called, output = posts[1]["input"][-2:]
    assert (called["type"], called["name"], called["arguments"]) == (
        "function_call",
        "add",
        '{"a":2,"b":3}',
    )
    assert output == {"type": "function_call_output", "call_id": called["call_id"], "output": "5"}
    # usage: the fake counts input items (1, then 3) and words (0, then 1)
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 1)
    # Written before the answer: the other process reads it at once.
    stored = client.responses.retrieve(response.id)
    assert [item.type for item in stored.output] == kinds
    assert stored.output[1].output == "5"


@pytest.mark.parametrize("label", ["calc", "web"])
def test_add_streamed_then_chained(gateway: Gateway, fake: FakeProvider, label: str) -> None:
    client, _ = pinned_client(gateway, "unused")
    fake.clear()
    events = list(
        client.responses.create(model=MODEL, input="call add", tools=mcp_tool(label), stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for expected in (
        "response.mcp_list_tools.completed",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_text.delta",
    ):
        assert expected in kinds, expected
    assert kinds.index("response.mcp_call.completed") < kinds.index("response.output_text.delta")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "5"
    final = events[-1].response
    assert [item.type for item in final.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert final.output[1].output == "5" and final.output_text == "5"
    created_id = events[0].response.id
    assert final.id == created_id
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == "5"
    # The next turn sees the stored mcp_call as a function call and its output.
    fake.clear()
    follow = client.responses.create(model=MODEL, input="thanks", previous_response_id=final.id)
    (post,) = _posts(fake)
    assert [i["type"] for i in post["input"]] == [
        "message",
        "mcp_list_tools",
        "mcp_call",
        "message",
        "message",
    ]
    assert follow.output_text.startswith("seen 5 items")


def test_mcp_turn_chained(gateway: Gateway, fake: FakeProvider) -> None:
    """An MCP turn after a stored one: the history goes to the model, the request's fields
    come back on the answer (previous_response_id, metadata, instructions, store), the
    stream's opening events carry them too."""
    client, _ = pinned_client(gateway, "unused")
    first = client.responses.create(model=MODEL, input="call add")  # no tools: plain text
    fake.clear()
    events = list(
        client.responses.create(
            model=MODEL,
            input="call add",
            tools=mcp_tool("calc"),
            previous_response_id=first.id,
            metadata={"k": "v"},
            instructions="be brief",
            stream=True,
        )
    )
    opened, final = events[0].response, events[-1].response
    assert (opened.previous_response_id, opened.store) == (first.id, True)
    assert final.previous_response_id == first.id
    assert (final.metadata, final.instructions, final.store) == ({"k": "v"}, "be brief", True)
    assert final.output_text == "5"
    posts = _posts(fake)
    assert [i["type"] for i in posts[0]["input"]] == ["message", "message", "message"]
    assert posts[0]["instructions"] == "be brief" and "previous_response_id" not in posts[0]
    stored = client.responses.retrieve(final.id)
    assert (stored.previous_response_id, stored.metadata) == (first.id, {"k": "v"})


def test_failing_tool(gateway: Gateway, fake: FakeProvider) -> None:
    client, _ = pinned_client(gateway, "unused")
    response = client.responses.create(model=MODEL, input="call fail", tools=mcp_tool("web"))
    _listed, call, message = response.output
    assert (call.type, call.status, call.output) == ("mcp_call", "failed", "")
    assert call.error is not None and "deliberate failure" in call.error
    assert message.type == "message"
    assert "deliberate failure" in response.output_text  # the model saw the error


def test_model_error_mid_loop(gateway: Gateway, fake: FakeProvider) -> None:
    """The model call after the tool's output fails (the fake answers 400): the client gets
    that error, whole, or as the stream's last event after the mcp_call's."""
    client, _ = pinned_client(gateway, "unused")
    fake.clear()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="call add then break", tools=mcp_tool("calc"))
    assert err.value.message.endswith("the scripted model breaks after the tool call")
    assert len(_posts(fake)) == 2
    events = list(
        client.responses.create(
            model=MODEL, input="call add then break", tools=mcp_tool("calc"), stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["response.output_item.done", "error"]
    assert "response.mcp_call.completed" in kinds and "response.completed" not in kinds
    assert events[-1].message == "the scripted model breaks after the tool call"


def test_limit_of_ten_calls(gateway: Gateway, fake: FakeProvider) -> None:
    client, _ = pinned_client(gateway, "unused")
    fake.clear()
    response = client.responses.create(
        model=MODEL, input="call add forever", tools=mcp_tool("calc")
    )
    calls = [item for item in response.output if item.type == "mcp_call"]
    assert [(c.status, c.output) for c in calls[:10]] == [("completed", "5")] * 10
    assert (calls[10].status, calls[10].error) == ("failed", NOT_EXECUTED)
    assert len(calls) == 11
    assert response.status == "completed"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_tool_calls"
    assert len(_posts(fake)) == 11


def test_max_tool_calls_streamed(gateway: Gateway, fake: FakeProvider) -> None:
    client, _ = pinned_client(gateway, "unused")
    events = list(
        client.responses.create(
            model=MODEL,
            input="call add forever",
            tools=mcp_tool("calc"),
            max_tool_calls=2,
            stream=True,
        )
    )
    final = events[-1].response
    assert [(i.type, i.status) for i in final.output if i.type == "mcp_call"] == [
        ("mcp_call", "completed"),
        ("mcp_call", "completed"),
        ("mcp_call", "failed"),
    ]
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_tool_calls"


def test_request_server_url(gateway: Gateway, mcp_url: str) -> None:
    client, _ = pinned_client(gateway, "unused")
    tools = [{"type": "mcp", "server_label": "mine", "server_url": mcp_url}]
    response = client.responses.create(model=MODEL, input="call add", tools=tools, store=False)
    assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert response.output[1].server_label == "mine" and response.output_text == "5"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)  # store: false keeps nothing


def test_unreachable_server(gateway: Gateway, fake: FakeProvider) -> None:
    """A server that cannot list its tools: 424 (OpenAI's status), no model call."""
    client, _ = pinned_client(gateway, "unused")
    fake.clear()
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    tools = [{"type": "mcp", "server_label": "dead", "server_url": dead}]
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.responses.create(model=MODEL, input="call add", tools=tools)
    assert err.value.status_code == 424
    assert err.value.code == "mcp_server_unavailable"
    assert "Error retrieving tool list from MCP server: 'dead'" in err.value.message
    assert time.monotonic() - started < 14  # not the whole 15 s bound
    assert _posts(fake) == []


def test_unknown_label(gateway: Gateway) -> None:
    client, _ = pinned_client(gateway, "unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="call add", tools=mcp_tool("nope"))
    assert err.value.code == "invalid_request"
    assert err.value.message.endswith("MCP server 'nope' is not configured")


def test_hanging_tool_times_out(
    fake: FakeProvider, mcp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # 3 s, not 1: the tool timeout also bounds a process's first connect to the server,
    # which imports the MCP SDK (1-2 s on a busy 2-core host).
    config = config_file(tmp_path_factory.mktemp("mcp1"), mcp_url)
    for gw in launch(fake, config, "3"):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        started = time.monotonic()
        response = client.responses.create(
            model=MODEL, input="call sleep", tools=mcp_tool("web"), timeout=30
        )
        took = time.monotonic() - started
        _listed, call, _message = response.output
        assert (call.type, call.status) == ("mcp_call", "failed")
        assert call.error == "tool 'sleep' on MCP server 'web' timed out after 3 s"
        assert took < 15
        # A client gone while the tool runs stops the loop: no model call after the tool's
        # timeout (without the stop, a second POST would follow it).
        fake.clear()
        body = {"model": MODEL, "input": "call sleep", "tools": mcp_tool("web"), "stream": True}
        with httpx.stream("POST", gw.url + "/v1/responses", json=body, timeout=30) as answer:
            for line in answer.iter_lines():
                if "response.mcp_call_arguments.done" in line:
                    break
        time.sleep(4.5)
        assert len(_posts(fake)) == 1
        follow = client.responses.create(model=MODEL, input="call add", tools=mcp_tool("web"))
        assert follow.output_text == "5"
        assert "Traceback" not in gw.logs()


def test_a_failed_write_is_503_for_a_whole_answer(fake: FakeProvider, tmp_path: Path) -> None:
    """Redis killed: the loop's whole stored answer is 503 storage_unavailable, as the relayed
    Responses path and the 1.13 binary answer a record that was not written; a stream goes
    out whole. The store is written before answering, so the write is what fails."""
    from tests.test_responses_proofs import database

    config = tmp_path / "mcp.yaml"
    config.write_text(
        "servers:\n  - name: calc\n    protocol: stdio\n"
        f"    command: {sys.executable}\n    args: [{SERVER}, stdio]\n"
    )
    with database("redis") as (flags, server):
        args = ["--worker-urls", fake.url, "--disable-health-check", *flags]
        args += ["--redis-op-timeout-secs", "1", "--mcp-config-path", str(config)]
        with running_gateway(args) as gw:
            wait_until(lambda: _models(gw) == [MODEL], 20, "the fake's model listed")
            client, _ = pinned_client(gw, "unused")
            stored = client.responses.create(model=MODEL, input="call add", tools=mcp_tool("calc"))
            assert stored.output_text == "5"
            server.kill()
            with pytest.raises(openai.APIStatusError) as err:
                client.responses.create(model=MODEL, input="call add", tools=mcp_tool("calc"))
            assert err.value.status_code == 503
            assert isinstance(err.value.body, dict)
            assert err.value.body["code"] == "storage_unavailable"
            stream = client.responses.create(
                model=MODEL, input="call add", tools=mcp_tool("calc"), stream=True
            )
            kinds = [event.type for event in stream]
            assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
            unstored = client.responses.create(
                model=MODEL, input="call add", tools=mcp_tool("calc"), store=False
            )
            assert unstored.output_text == "5"


def test_stdio_servers_stop_with_the_gateway(fake: FakeProvider, tmp_path: Path) -> None:
    """Each data-plane process starts its own stdio servers on first use; stopping smg stops
    them (the data plane closes its MCP sessions as it drains)."""
    config = tmp_path / "mcp.yaml"
    config.write_text(
        "servers:\n  - name: calc\n    protocol: stdio\n"
        f"    command: {sys.executable}\n    args: [{SERVER}, stdio]\n"
    )
    args = ["--worker-urls", fake.url, "--disable-health-check", "--mcp-config-path", str(config)]
    pids: set[int] = set()
    with running_gateway(args) as gw:
        wait_until(lambda: _models(gw) == [MODEL], 20, "the fake's model listed")
        client, _ = pinned_client(gw, "unused")  # alternates between the two processes
        for _ in range(2):  # one stdio server in each data-plane process
            answer = client.responses.create(model=MODEL, input="call pid", tools=mcp_tool("calc"))
            call = answer.output[1]
            assert call.type == "mcp_call" and call.name == "pid" and call.error is None
            pids.add(int(call.output))
        assert len(pids) == 2
        for server_pid in pids:
            os.kill(server_pid, 0)  # running while the gateway runs
    deadline = time.monotonic() + 15
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for server_pid in list(alive):
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                alive.discard(server_pid)
        time.sleep(0.1)
    assert not alive, f"stdio MCP servers left running: {alive}"


def test_the_loop_holds_one_admission_permit(
    fake: FakeProvider, mcp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """--max-concurrent-requests 1, no queue: the client's MCP request holds the one permit
    for its whole loop (1.13 admits the request, and its loop calls the worker directly), so
    a chat request sent while the tool runs is refused 429; the loop's own model calls take
    no permit, so it does not wait on itself and completes (the tool times out after 3 s)."""
    from tests.test_resilience_admission import wait_metric

    config = config_file(tmp_path_factory.mktemp("mcp2"), mcp_url)
    flags = ("--max-concurrent-requests", "1", "--queue-size", "0")
    for gw in launch(fake, config, "3", *flags):
        body = {"model": MODEL, "input": "call sleep", "tools": mcp_tool("web"), "stream": True}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        kinds: list[str] = []
        with httpx.stream("POST", gw.url + "/v1/responses", json=body, timeout=30) as answer:
            assert answer.status_code == 200
            lines = answer.iter_lines()
            seen = ""
            for line in lines:
                seen += line + "\n"
                if "response.mcp_call_arguments.done" in line:
                    break  # the tool runs now; the model call before it is over
            else:
                raise AssertionError(f"the loop ended before its tool call: {seen}")
            wait_metric(gw, "smg_gateway_admission_inflight", 1, 5.0)
            refused = httpx.post(gw.url + "/v1/chat/completions", json=chat, timeout=10)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "admission_queue_full"
            for line in lines:
                if line.startswith("event: "):
                    kinds.append(line[7:])
        assert kinds[-1] == "response.completed"
        wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat, timeout=10).status_code == 200
