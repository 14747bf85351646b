"""The Responses API on a gRPC model, end to end: `smg launch --processes 2` in front of the
gRPC mock (`smg mock-worker --grpc`) serving a Qwen3 model (its real chat template; the
qwen tool parser and the qwen3 reasoning parser), driven with the openai SDK's
`client.responses` (max_retries=0). smg renders the prompt and parses the output itself:
POST /v1/responses is translated to chat (smg.translate.responses_chat), served by the gRPC
chat path, and the answer (whole or streamed) comes back as a Response; the history
(previous_response_id, conversation) is expanded and stored as for HTTP workers, each turn
on the other data-plane process (x-smg-process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from grpcmockutil import GrpcMock, served_gateway

from smg.grpc.frontend import GrpcExchange
from tests.gatewayutil import Gateway
from tests.test_conversations_e2e import PinnedTransport, pinned_client
from tests.test_grpc_frontend import FakeConn, Rig, Script, out, split_chunks
from tests.test_grpc_frontend import rig as frontend_rig

MODEL = "Qwen/Qwen3-8B"
TEMPLATE = "Qwen-Qwen3-0.6B.jinja"
# Qwen3's template thinks unless told not to: the chat path's chat_template_kwargs.
OFF = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CALL_REPLY = (
    "<think>The user wants weather.</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


GATEWAY_ARGS = [
    "--history-backend", "memory",
    "--tool-call-parser", "qwen", "--reasoning-parser", "qwen3",
]  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, GrpcMock]]:
    with served_gateway(
        tmp_path_factory.mktemp("qwen3"),
        model=MODEL,
        template=TEMPLATE,
        gateway_args=GATEWAY_ARGS,
        ready=lambda gw: _post(gw, {"input": "hi", "store": False}).status_code == 200,
        what="the gRPC model served on /v1/responses",
    ) as served:
        yield served


def _post(gw: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + "/v1/responses", json={"model": MODEL, **OFF, **body}, timeout=30)


def _client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30.0)


def _prompt(mock: GrpcMock) -> str:
    """The prompt text the engine got for the last request."""
    sent = mock.stats()["last_generate_request"]
    return str(sent["tokenized"]["original_text"])


def _prompt_len(mock: GrpcMock) -> int:
    return len(mock.stats()["last_generate_request"]["tokenized"]["input_ids"])


def test_text_answer(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("Hello there.")
    made = _client(gw).responses.create(
        model=MODEL, input="hi", instructions="Be brief.", extra_body=OFF, store=False
    )
    assert made.id.startswith("resp_") and made.object == "response"
    assert made.status == "completed" and made.incomplete_details is None
    assert made.model == MODEL
    assert [item.type for item in made.output] == ["message"]
    message = made.output[0]
    assert message.role == "assistant" and message.status == "completed"  # type: ignore[union-attr]
    assert made.output_text == "Hello there."
    assert made.instructions == "Be brief." and made.store is False
    assert made.usage is not None
    assert made.usage.input_tokens == _prompt_len(mock)
    assert made.usage.output_tokens == 4  # "Hello", " there", ".", EOS
    assert made.usage.total_tokens == made.usage.input_tokens + 4
    prompt = _prompt(mock)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


def test_max_output_tokens_is_incomplete(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("one two three four five six")
    made = _client(gw).responses.create(
        model=MODEL, input="count", max_output_tokens=2, extra_body=OFF, store=False
    )
    assert made.status == "incomplete"
    assert made.incomplete_details is not None
    assert made.incomplete_details.reason == "max_output_tokens"
    assert made.output_text == "one two"
    assert made.usage is not None and made.usage.output_tokens == 2


def test_engine_sampling_fields_reach_the_engine(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("one two three four five six")
    made = _client(gw).responses.create(
        model=MODEL,
        input="count",
        store=False,
        extra_body={**OFF, "stop": ["four"], "top_k": 7},
    )
    assert made.output_text == "one two three " and made.status == "completed"
    assert mock.stats()["last_generate_request"]["sampling_params"]["top_k"] == 7


def test_text_format_json_schema_constrains_the_engine(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply('{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    made = _client(gw).responses.create(
        model=MODEL,
        input="json",
        store=False,
        text={"format": {"type": "json_schema", "name": "out", "schema": schema}},
        extra_body=OFF,
    )
    assert made.output_text == '{"a": 1}'
    assert made.text is not None and made.text.format.type == "json_schema"
    constraint = mock.stats()["constraint"]
    assert constraint["kind"] == "json_schema"
    assert json.loads(constraint["value"]) == schema


def test_stream_events(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply("<think>Easy.</think>\n\nHello there.")
    events = list(_client(gw).responses.create(model=MODEL, input="hi", stream=True, store=False))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert reasoning == "Easy." and text == "\n\nHello there."
    # Each item: added, its part, deltas, done; the reasoning item before the message.
    frame = [k for k in kinds if not k.endswith(".delta")]
    assert frame == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1].response  # type: ignore[union-attr]
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output_text == "\n\nHello there."
    assert final.usage is not None and final.usage.input_tokens == _prompt_len(mock)


def test_function_call_round_trip(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    mock.reply(CALL_REPLY)
    client, transport = pinned_client(gw, "unused")
    asked = client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert [i.type for i in asked.output] == ["reasoning", "function_call"]
    call = asked.output[1]
    assert call.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert call.call_id and call.status == "completed"  # type: ignore[union-attr]
    assert '"name": "get_weather"' in _prompt(mock)  # the tool reached the template
    mock.reply("It is sunny.")
    answered = client.responses.create(
        model=MODEL,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],  # type: ignore[union-attr]
        tools=[WEATHER],  # type: ignore[list-item]
        extra_body=OFF,
    )
    assert answered.output_text == "It is sunny."
    assert transport.seen == ["0", "1"]
    prompt = _prompt(mock)
    # The history: the call as the assistant's tool call, its output as the tool's answer.
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_three_turns_through_previous_response_id(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    client, transport = pinned_client(gw, "unused")
    probe, _ = pinned_client(gw, "unused", PinnedTransport(gw.url))
    mock.reply("first answer")
    first = client.responses.create(model=MODEL, input="one", extra_body=OFF)
    # Stored before the answer's last bytes went out: the other process reads it at once.
    assert probe.responses.retrieve(first.id).output_text == "first answer"
    mock.reply("second answer")
    second = client.responses.create(
        model=MODEL, input="two", previous_response_id=first.id, extra_body=OFF
    )
    assert second.previous_response_id == first.id and second.store is True
    mock.reply("third answer")
    with client.responses.stream(
        model=MODEL, input="three", previous_response_id=second.id, extra_body=OFF
    ) as stream:
        third = stream.get_final_response()
    assert third.output_text == "third answer"
    assert third.previous_response_id == second.id
    assert transport.seen == ["0", "1", "0"]
    prompt = _prompt(mock)
    turns = ["one", "first answer", "two", "second answer", "three"]
    positions = [prompt.index(f"\n{t}<|im_end|>") for t in turns[:-1]]
    assert positions == sorted(positions)
    assert prompt.count("<|im_start|>user\n") == 3
    assert prompt.count("<|im_start|>assistant\n") == 3  # two turns + the generation prompt
    got = probe.responses.retrieve(third.id)  # a stream's too: before its last event
    assert (got.output_text, got.previous_response_id) == ("third answer", second.id)
    listed = probe.responses.input_items.list(third.id)
    assert [i.content[0].text for i in listed.data] == ["three"]  # type: ignore[union-attr]


def test_three_turns_through_conversation(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    client, transport = pinned_client(gw, "unused")
    conversation = client.conversations.create()
    for n, word in enumerate(["alpha", "beta", "gamma"]):
        mock.reply(f"reply {n}")
        made = client.responses.create(
            model=MODEL, input=word, conversation=conversation.id, extra_body=OFF
        )
        assert made.output_text == f"reply {n}"
        # The turn's items were appended before the answer went out.
        assert len(_items(gw, conversation.id)) == 2 * (n + 1)
    assert transport.seen == ["0", "1", "0", "1"]  # create, then the three turns
    prompt = _prompt(mock)
    for earlier in ("alpha", "reply 0", "beta", "reply 1", "gamma"):
        assert f"\n{earlier}<|im_end|>" in prompt
    texts = [item["content"][0]["text"] for item in _items(gw, conversation.id)]
    assert texts == ["alpha", "reply 0", "beta", "reply 1", "gamma", "reply 2"]


def _items(gw: Gateway, conversation: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{gw.url}/v1/conversations/{conversation}/items?order=asc", timeout=10)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"input": [{"type": "web_search_call", "id": "ws_1"}]},
            "input[0]: input item type 'web_search_call' cannot be sent to this model",
        ),
        (
            {"input": "hi", "tools": [{"type": "web_search"}]},
            "tool type 'web_search' cannot be sent to this model",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0]: content part type 'input_image' cannot be sent to this model",
        ),
        ({"input": 7}, "'input' must be a string or a list of items"),
    ],
)
def test_bad_input_is_400(
    served: tuple[Gateway, GrpcMock], body: dict[str, Any], message: str
) -> None:
    gw, mock = served
    before = mock.stats()["generate"]
    answer = _post(gw, {**body, "store": False})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"
    assert mock.stats()["generate"] == before  # nothing reached the engine


# --- settle(): the answer's last bytes wait for the history write (in-process rig) ------------


@pytest.fixture
def grpc_rig() -> Iterator[Rig]:
    """tests/test_grpc_frontend.py's rig: a DataPlane with two fake gRPC workers."""
    yield from frontend_rig.__wrapped__()  # type: ignore[attr-defined]


class SettlingTranslation:
    """A translation whose settle() is a future the test resolves."""

    upstream_path = b"/v1/chat/completions"

    def __init__(self, write: asyncio.Future[None]) -> None:
        self.write = write
        self.settled = 0

    def response(self, status: int, body: bytes) -> bytes:
        return b"answer:" + body

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b"data: last\n\n"

    def abort(self, code: str, message: str) -> bytes:
        return b"data: aborted\n\n"

    def settle(self) -> asyncio.Future[None]:
        self.settled += 1
        return self.write


def _settling(rig: Rig, stream: bool) -> tuple[FakeConn, GrpcExchange, SettlingTranslation]:
    rig.client(0).scripts.append(Script([out(0, [7], finished=True, reason="stop")]))
    conn, exchange = rig.start({"prompt": "ab", "stream": stream}, path="/v1/chat/completions")
    translation = SettlingTranslation(rig.loop.create_future())
    exchange.translation = translation  # type: ignore[assignment]
    for _ in range(100):  # until the exchange waits on the write
        rig.loop.run_until_complete(asyncio.sleep(0.01))
        if translation.settled:
            break
    assert translation.settled == 1
    return conn, exchange, translation


def test_whole_answer_waits_for_the_write(grpc_rig: Rig) -> None:
    conn, exchange, translation = _settling(grpc_rig, stream=False)
    assert bytes(conn.out) == b"" and not exchange.finished
    translation.write.set_result(None)
    grpc_rig.run(exchange)
    head, _, body = bytes(conn.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body.startswith(b"answer:{")
    assert conn.done == [True]


def test_stream_last_bytes_wait_for_the_write(grpc_rig: Rig) -> None:
    conn, exchange, translation = _settling(grpc_rig, stream=True)
    assert b"data: start" in conn.out and b"data: last" not in conn.out
    assert not exchange.finished
    translation.write.set_result(None)
    grpc_rig.run(exchange)
    _head, chunks = split_chunks(bytes(conn.out))
    assert chunks[-1] == b"data: usage 3 1 2\n\ndata: [DONE]\n\ndata: last\n\n"
    assert conn.done == [True]


@pytest.mark.parametrize("failure", ["raised", "False"])
def test_a_failed_write_is_503_for_a_whole_answer(grpc_rig: Rig, failure: str) -> None:
    # As the HTTP path and the 1.13 binary: a stored turn whose record was not written.
    conn, exchange, translation = _settling(grpc_rig, stream=False)
    if failure == "raised":
        translation.write.set_exception(RuntimeError("store down"))
    else:
        translation.write.set_result(False)
    grpc_rig.run(exchange)
    out = bytes(conn.out)
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b'"code":"storage_unavailable"' in out
    assert b"The response was not stored" in out


def test_a_failed_write_still_ends_a_stream_whole(grpc_rig: Rig) -> None:
    conn, exchange, translation = _settling(grpc_rig, stream=True)
    translation.write.set_result(False)
    grpc_rig.run(exchange)
    out = bytes(conn.out)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"0\r\n\r\n")


def test_a_client_leaving_does_not_cancel_the_write(grpc_rig: Rig) -> None:
    conn, exchange, translation = _settling(grpc_rig, stream=True)
    exchange.client_gone()
    conn.closed = True
    grpc_rig.loop.run_until_complete(asyncio.sleep(0.02))
    assert exchange.finished and not translation.write.cancelled()


def test_engine_failure_before_the_answer_is_an_openai_error(
    served: tuple[Gateway, GrpcMock],
) -> None:
    gw, mock = served
    mock.reply("Hello there.")
    mock.config(fail_next=1, fail_code="INVALID_ARGUMENT", fail_message="bad prompt")
    answer = _post(gw, {"input": "hi"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"] == "bad prompt"
    assert error["type"] == "invalid_request_error"


def test_engine_failure_mid_stream_fails_the_response_and_stores_nothing(
    served: tuple[Gateway, GrpcMock],
) -> None:
    gw, mock = served
    mock.reply("one two three four five six")
    mock.config(fail_next=1, fail_code="INTERNAL", fail_after_tokens=2, fail_message="engine died")
    client = _client(gw)
    events = list(client.responses.create(model=MODEL, input="go", stream=True, extra_body=OFF))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.completed" not in kinds
    assert events[-2].message == "engine died"  # type: ignore[union-attr]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == "engine died"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(failed.id)
