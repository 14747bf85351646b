"""Translation end to end: `smg launch` in front of fake providers (tests/providerfakes.py)
registered as external workers through POST /workers, driven with the official SDKs
(max_retries=0).

- The anthropic SDK against an OpenAI-only upstream: /v1/messages goes out as a chat
  completion and comes back as a Message (text, stream events, tool use and a tool
  result round trip, thinking, stop reasons, usage, errors in Anthropic's shape).
- The openai SDK against an Anthropic-only upstream: /v1/chat/completions goes out as a
  Messages request and comes back as a chat completion (and chunks).
- What each upstream saw: the translated path and body, the worker's own key in its
  provider's header, never the gateway's key.
- Routes an Anthropic-only worker lacks answer 400 naming the route; count_tokens passes
  through to it and answers 501 for an OpenAI-only model; a 429 is retried with the same
  translated body."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gatewayutil import Gateway, free_port, running_gateway, secret, wait_until
from providerfakes import FakeProvider, anthropic_client, sse_events

pytestmark = pytest.mark.timeout(120)

GATEWAY_KEY = secret("sk-gateway-xlate-key")
OPENAI_KEY = secret("sk-proj-xlate-worker")
ANTHROPIC_KEY = secret("sk-ant-xlate-worker")
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
GPT = "gpt-4o-mini"
REASONER = "gpt-reasoner"  # the OpenAI fake answers reasoning_content for it
RETRIED = "gpt-4o-retry"  # on a fake whose first POST answers 429 (retry-after: 1)
CLAUDE = "claude-3-5-haiku"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WEATHER_FN = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER["input_schema"],
    },
}
HI = [{"role": "user", "content": "hi there"}]
DENIED_MESSAGE = "Incorrect API key"  # the OpenAI fake's 401


class Fleet:
    def __init__(self, gw: Gateway, *fakes: FakeProvider) -> None:
        self.gw = gw
        self.gpt, self.claude, self.flaky, self.denied = fakes

    def anthropic(self, key: str = GATEWAY_KEY) -> anthropic.Anthropic:
        return anthropic_client(self.gw.url, key)

    def openai(self, key: str = GATEWAY_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=key, max_retries=0, timeout=30.0)

    def post(self, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(self.gw.url + path, json=body, headers={**AUTH, **headers}, timeout=30)

    def posts(self, fake: FakeProvider) -> list[dict[str, Any]]:
        """What reached `fake` since its last clear(), discovery excepted."""
        return [r for r in fake.seen() if r["method"] == "POST"]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with (
        FakeProvider("openai", [GPT, REASONER], key=OPENAI_KEY) as gpt,
        FakeProvider("anthropic", [CLAUDE], key=ANTHROPIC_KEY) as claude,
        FakeProvider("openai", [RETRIED], key=OPENAI_KEY, fail_429=1) as flaky,
        FakeProvider("openai", [], key=secret("sk-proj-nobody-has-it")) as denied,
        running_gateway(["--api-key", GATEWAY_KEY]) as gw,
    ):
        for fake, provider, key in (
            (gpt, "openai", OPENAI_KEY),
            (claude, "anthropic", ANTHROPIC_KEY),
            (flaky, "openai", OPENAI_KEY),
            (denied, "openai", None),  # no key: a wildcard worker (any model, no key sent)
        ):
            spec = {"url": fake.url, "runtime_type": "external", "provider": provider}
            if key is not None:
                spec["api_key"] = key
            added = gw.admin("POST", "/workers", json=spec, headers=AUTH)
            assert added.status_code == 202, added.text

        def listed() -> bool:
            models = httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=5).json()
            return {GPT, REASONER, CLAUDE, RETRIED} <= {m["id"] for m in models["data"]}

        wait_until(listed, 20.0, "every fake's models discovered")
        for fake in (gpt, claude, flaky, denied):
            fake.clear()
        yield Fleet(gw, gpt, claude, flaky, denied)


def _words(text: str) -> int:
    return len(text.split())


def _no_gateway_key(*fakes: FakeProvider) -> None:
    for fake in fakes:
        for request in fake.seen():
            assert GATEWAY_KEY not in repr(request), request


# --- the anthropic SDK, an OpenAI-only upstream ------------------------------------------------


def test_messages_text_over_chat(fleet: Fleet) -> None:
    fleet.gpt.clear()
    message = fleet.anthropic().messages.create(model=GPT, max_tokens=100, messages=HI)  # type: ignore[arg-type]
    text = f"Hello from {GPT}. You said: hi there"
    assert [(b.type, b.text) for b in message.content] == [("text", text)]
    assert (message.type, message.role, message.model) == ("message", "assistant", GPT)
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, _words(text))
    (sent,) = fleet.posts(fleet.gpt)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-api-key" not in sent["headers"]
    # The SDK (httpx) asks for gzip; smg must read the answer it translates: not asked.
    assert "accept-encoding" not in sent["headers"]
    fleet.gpt.clear()
    fleet.openai().chat.completions.create(model=GPT, messages=HI, max_tokens=5)  # type: ignore[arg-type]
    assert "accept-encoding" in fleet.posts(fleet.gpt)[0]["headers"]  # passed through: relayed
    assert sent["body"]["model"] == GPT and not sent["body"].get("stream")
    assert sent["body"]["messages"][-1]["role"] == "user"
    assert 100 in (sent["body"].get("max_completion_tokens"), sent["body"].get("max_tokens"))
    _no_gateway_key(fleet.gpt)


def test_messages_stream_over_chat(fleet: Fleet) -> None:
    text = f"Hello from {GPT}. You said: hi there"
    with fleet.anthropic().messages.stream(model=GPT, max_tokens=100, messages=HI) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds.count("content_block_stop") == 1
    assert [(b.type, b.text) for b in final.content] == [("text", text)]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == _words(text)
    # Raw: chunked event stream in Anthropic's framing, the usage asked of the worker.
    fleet.gpt.clear()
    raw = fleet.post(
        "/v1/messages", {"model": GPT, "max_tokens": 100, "messages": HI, "stream": True}
    )
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["transfer-encoding"] == "chunked"
    events = sse_events(raw.text)
    (delta,) = [data for name, data in events if name == "message_delta"]
    assert delta["usage"]["output_tokens"] == _words(text)
    (sent,) = fleet.posts(fleet.gpt)
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"]["include_usage"] is True


def test_tool_use_and_tool_result_round_trip(fleet: Fleet) -> None:
    client = fleet.anthropic()
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    message = client.messages.create(
        model=GPT,
        max_tokens=100,
        messages=ask,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    call = message.content[1]
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert call.id.startswith("call_fake")  # the worker's call id, kept
    # Streamed, the call's input arrives as input_json_delta pieces; the SDK assembles it.
    with client.messages.stream(
        model=GPT,
        max_tokens=100,
        messages=ask,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in final.content][-1] == (
        "tool_use",
        {"city": "Paris"},
    )
    fleet.gpt.clear()
    answer = client.messages.create(
        model=GPT,
        max_tokens=100,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            *ask,  # type: ignore[list-item]
            {"role": "assistant", "content": [b.model_dump() for b in message.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert answer.content[0].text == "The tool said: sunny"
    assert answer.stop_reason == "end_turn"
    (sent,) = fleet.posts(fleet.gpt)
    chat = sent["body"]["messages"]
    assert chat[1]["role"] == "assistant"
    assert chat[1]["tool_calls"][0]["id"] == call.id
    assert json.loads(chat[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert (chat[2]["role"], chat[2]["tool_call_id"], chat[2]["content"]) == (
        "tool",
        call.id,
        "sunny",
    )
    assert sent["body"]["tools"][0]["function"]["name"] == "get_weather"


def test_stop_reasons_and_thinking(fleet: Fleet) -> None:
    client = fleet.anthropic()
    cut = client.messages.create(model=GPT, max_tokens=1, messages=HI)  # type: ignore[arg-type]
    assert cut.stop_reason == "max_tokens"
    assert cut.content[0].text == "Hello"
    fleet.gpt.clear()
    stopped = client.messages.create(
        model=GPT,
        max_tokens=100,
        messages=HI,  # type: ignore[arg-type]
        stop_sequences=["You said"],
    )
    assert fleet.posts(fleet.gpt)[0]["body"]["stop"] == ["You said"]
    assert stopped.content[0].text == f"Hello from {GPT}. "
    # OpenAI's answer does not say which stop matched (vLLM's and SGLang's do, in
    # `stop_reason`): then it is end_turn, not stop_sequence.
    assert (stopped.stop_reason, stopped.stop_sequence) == ("end_turn", None)
    # reasoning_content -> a thinking block (0.38.0 has no thinking type: by shape).
    whole = fleet.post("/v1/messages", {"model": REASONER, "max_tokens": 100, "messages": HI})
    blocks = whole.json()["content"]
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == "Let me think about it."
    streamed = sse_events(
        fleet.post(
            "/v1/messages", {"model": REASONER, "max_tokens": 100, "messages": HI, "stream": True}
        ).text
    )
    starts = [d["content_block"]["type"] for n, d in streamed if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    thought = "".join(
        d["delta"]["thinking"]
        for n, d in streamed
        if n == "content_block_delta" and d["delta"]["type"] == "thinking_delta"
    )
    assert thought.strip() == "Let me think about it."


def test_errors_in_anthropics_shape(fleet: Fleet) -> None:
    # Refused by the translation (no max_tokens): 400 before any worker is asked.
    fleet.gpt.clear()
    with pytest.raises(anthropic.BadRequestError) as caught:
        fleet.anthropic().messages.create(model=GPT, messages=HI, max_tokens=None)  # type: ignore[arg-type]
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert fleet.posts(fleet.gpt) == []
    # The worker's own error (the keyless wildcard worker: the provider answers 401 in
    # OpenAI's shape) comes back in Anthropic's shape, with the worker's status.
    with pytest.raises(anthropic.AuthenticationError) as denied:
        fleet.anthropic().messages.create(model="gpt-anything", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    body = denied.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"] == DENIED_MESSAGE
    (sent,) = fleet.posts(fleet.denied)
    assert sent["path"] == "/v1/chat/completions" and "authorization" not in sent["headers"]


def test_429_is_retried_with_the_translated_body(fleet: Fleet) -> None:
    fleet.flaky.clear()
    message = fleet.anthropic().messages.create(model=RETRIED, max_tokens=50, messages=HI)  # type: ignore[arg-type]
    assert message.content[0].text == f"Hello from {RETRIED}. You said: hi there"
    first, second = fleet.posts(fleet.flaky)
    assert first["path"] == second["path"] == "/v1/chat/completions"
    assert first["body"] == second["body"]


def test_count_tokens_passes_through_or_501(fleet: Fleet) -> None:
    asked = {"messages": HI}
    counted = fleet.post("/v1/messages/count_tokens", {"model": CLAUDE, **asked})
    assert counted.status_code == 200, counted.text
    assert counted.json() == {"input_tokens": 2}
    sent = fleet.posts(fleet.claude)[-1]
    assert sent["path"] == "/v1/messages/count_tokens"
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY
    refused = fleet.post("/v1/messages/count_tokens", {"model": GPT, **asked})
    assert refused.status_code == 501
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "api_error"  # as the Rust SMG 1.13 answers
    assert GPT in refused.json()["error"]["message"]


# --- the openai SDK, an Anthropic-only upstream ------------------------------------------------


def test_chat_text_over_messages(fleet: Fleet) -> None:
    fleet.claude.clear()
    answer = fleet.openai().chat.completions.create(model=CLAUDE, messages=HI, max_tokens=100)  # type: ignore[arg-type]
    text = f"Hello from {CLAUDE}. You said: hi there"
    (choice,) = answer.choices
    assert (choice.message.role, choice.message.content) == ("assistant", text)
    assert choice.finish_reason == "stop"
    assert answer.object == "chat.completion" and answer.model == CLAUDE
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, _words(text))
    (sent,) = fleet.posts(fleet.claude)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]
    assert sent["body"]["max_tokens"] == 100
    assert sent["body"]["messages"][0]["role"] == "user"
    _no_gateway_key(fleet.claude)


def test_chat_stream_over_messages(fleet: Fleet) -> None:
    text = f"Hello from {CLAUDE}. You said: hi there"
    chunks = list(
        fleet.openai().chat.completions.create(
            model=CLAUDE,
            messages=HI,  # type: ignore[arg-type]
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == _words(text)


def test_chat_tools_and_length_over_messages(fleet: Fleet) -> None:
    client = fleet.openai()
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    answer = client.chat.completions.create(model=CLAUDE, messages=ask, tools=[WEATHER_FN])  # type: ignore[arg-type,list-item]
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    fleet.claude.clear()
    after = client.chat.completions.create(
        model=CLAUDE,
        tools=[WEATHER_FN],  # type: ignore[list-item]
        messages=[
            *ask,  # type: ignore[list-item]
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert after.choices[0].message.content == "The tool said: sunny"
    (sent,) = fleet.posts(fleet.claude)
    last = sent["body"]["messages"][-1]
    assert last["role"] == "user"
    assert last["content"][0]["type"] == "tool_result"
    assert last["content"][0]["tool_use_id"] == call.id
    cut = client.chat.completions.create(model=CLAUDE, messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert cut.choices[0].finish_reason == "length"


def test_chat_errors_and_unsupported_routes_in_openais_shape(fleet: Fleet) -> None:
    fleet.claude.clear()
    for path, body in (
        ("/v1/completions", {"model": CLAUDE, "prompt": "hi"}),
        ("/v1/embeddings", {"model": CLAUDE, "input": "hi"}),
        ("/v1/responses", {"model": CLAUDE, "input": "hi"}),
    ):
        refused = fleet.post(path, body)
        assert refused.status_code == 400, (path, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "unsupported_route" and path in error["message"]
    assert fleet.posts(fleet.claude) == []


# --- a worker that breaks its answers ----------------------------------------------------------

_ROLE_CHUNK = (
    b'data: {"id":"chatcmpl-cut","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}'
    b"\n\n"
)
# What the broken worker answers, per URL path prefix (each registered as its own worker).
_BROKEN = {
    # An event stream cut after its first event (no last chunk: the connection closes).
    b"/cutstream": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(_ROLE_CHUNK), _ROLE_CHUNK),
    # A JSON answer cut short of its content-length.
    b"/cutwhole": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b'content-length: 500\r\n\r\n{"id":"chatcmpl-cut","choices":[',
    # A complete 200 that is no chat completion (no choices).
    b"/nochoices": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b'content-length: 18\r\nconnection: close\r\n\r\n{"object":"what"}\n',
}


@contextlib.contextmanager
def broken_worker() -> Iterator[str]:
    """A raw HTTP server on 127.0.0.1 answering each request per `_BROKEN`, then closing."""
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        for _ in range(10_000):  # bounded: the test stops it long before
            if stop.is_set():
                return
            try:
                conn, _addr = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    part = conn.recv(65536)
                    if not part:
                        break
                    data += part
                target = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b""
                for prefix, answer in _BROKEN.items():
                    if target.startswith(prefix):
                        conn.sendall(answer)
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_broken_answers_end_cleanly_in_the_clients_shape(fleet: Fleet) -> None:
    with broken_worker() as url:
        for prefix in _BROKEN:
            spec = {
                "url": url + prefix.decode(),
                "runtime_type": "external",
                "provider": "openai",
                "model_id": "gpt" + prefix.decode().replace("/", "-"),
                "api_key": OPENAI_KEY,
            }
            added = fleet.gw.admin("POST", "/workers", json=spec, headers=AUTH)
            assert added.status_code == 202, added.text
        wait_until(
            lambda: (
                "gpt-nochoices"
                in {
                    m["id"]
                    for m in httpx.get(fleet.gw.url + "/v1/models", timeout=5).json()["data"]
                }
            ),
            15.0,
            "the broken workers registered",
        )
        ask = {"max_tokens": 20, "messages": HI}
        # The stream: what came, then Anthropic's error event; the SDK raises it.
        raw = fleet.post("/v1/messages", {"model": "gpt-cutstream", "stream": True, **ask})
        events = sse_events(raw.text)
        assert [name for name, _data in events] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error",
        ]
        assert events[-1][1]["error"]["type"] == "api_error"
        with (
            pytest.raises(anthropic.APIStatusError) as caught,
            fleet.anthropic().messages.stream(
                model="gpt-cutstream",
                max_tokens=20,
                messages=HI,  # type: ignore[arg-type]
            ) as stream,
        ):
            for _event in stream:
                pass
        assert caught.value.body["type"] == "error"  # type: ignore[index]
        # A whole answer cut short, and one with no choices: 502 in Anthropic's shape.
        for model in ("gpt-cutwhole", "gpt-nochoices"):
            answer = fleet.post("/v1/messages", {"model": model, **ask})
            assert answer.status_code == 502, (model, answer.text)
            assert answer.json()["type"] == "error", answer.text
            assert answer.json()["error"]["type"] == "api_error"
        # The gateway still serves.
        assert fleet.post("/v1/messages", {"model": GPT, **ask}).status_code == 200


def test_http10_client_gets_the_translated_stream_unframed(fleet: Fleet) -> None:
    body = json.dumps({"model": GPT, "max_tokens": 20, "messages": HI, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", fleet.gw.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.0\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer %b\r\ncontent-length: %d\r\n\r\n%b"
            % (GATEWAY_KEY.encode(), len(body), body)
        )
        data = b""
        for _ in range(1000):  # the answer ends with the connection (no chunked in 1.0)
            part = sock.recv(65536)
            if not part:
                break
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding" not in head.lower()
    assert b"content-type: text/event-stream" in head.lower()
    names = [name for name, _data in sse_events(rest.decode())]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]


def test_a_retry_stays_on_workers_of_the_first_attempts_api() -> None:
    """One model on an OpenAI-only and an Anthropic-only worker, each answering its first
    POST with 429: whichever the first attempt took, the retry goes to a worker of the same
    API (the body went out in that API), never to the other, untried one."""
    shared = "shared-model"  # names no provider: both workers stay candidates
    with (
        FakeProvider("openai", [], fail_429=1) as gpt,
        FakeProvider("anthropic", [], fail_429=1) as claude,
        running_gateway([]) as gw,
    ):
        for fake, provider in ((gpt, "openai"), (claude, "anthropic")):
            spec = {"url": fake.url, "runtime_type": "external", "provider": provider}
            spec |= {"model_id": shared, "api_key": "sk-any"}
            assert gw.admin("POST", "/workers", json=spec).status_code == 202
        wait_until(
            lambda: (
                len(gw.admin("GET", "/workers").json()["workers"]) == 2
                and all(
                    w["status"] == "ready" for w in gw.admin("GET", "/workers").json()["workers"]
                )
            ),
            15.0,
            "both workers ready",
        )
        answer = httpx.post(
            gw.url + "/v1/messages",
            json={"model": shared, "max_tokens": 20, "messages": HI},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["content"][0]["text"] == f"Hello from {shared}. You said: hi there"
        posts = {
            name: [r["path"] for r in fake.seen() if r["method"] == "POST"]
            for name, fake in (("openai", gpt), ("anthropic", claude))
        }
        assert posts in (
            {"openai": ["/v1/chat/completions"] * 2, "anthropic": []},
            {"openai": [], "anthropic": ["/v1/messages"] * 2},
        ), posts
