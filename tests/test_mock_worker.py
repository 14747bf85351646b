"""Tests for `smg mock-worker`: pure planning/rendering, then real subprocesses on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import random
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import mockutil
import openai
import pytest

from smg.mock_worker import options, plan, render

pytestmark = pytest.mark.timeout(60)

DEFAULT_CONFIG = {
    "healthy": True,
    "error_rate": 0.0,
    "hang_rate": 0.0,
    "ttft_ms": 0.0,
    "itl_ms": 0.0,
    "output_len": 16,
    "eos_prob": 0.0,
    "waiting": 0,
    "token_usage": None,
    "prefill_us_per_token": 0.0,
}


# --- helpers -----------------------------------------------------------------------------


def client(url: str, api_key: str = "unused", timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if block:
            assert block.startswith(b"data: "), block
            events.append(block[len(b"data: ") :].decode())
    return events


_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$'
)


def parse_prometheus(text: str) -> dict[str, tuple[str, dict[str, str], float]]:
    """A strict little parser for the text exposition format: name -> (type, labels, value)."""
    types: dict[str, str] = {}
    out: dict[str, tuple[str, dict[str, str], float]] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert name in types, f"sample before its TYPE: {line!r}"
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
        out[name] = (types[name], pairs, float(value))
    return out


def raw_exchange(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def split_responses(raw: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of content-length responses into (status, body) pairs."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v)
            for k, _, v in (ln.partition(b":") for ln in lines[1:])
            if k.lower() == b"content-length"
        )
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


def chat_body(content: str = "one two three", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": content}], **extra}


# --- pure code ------------------------------------------------------------------------------


def test_decide_length_and_finish_reason() -> None:
    rng = random.Random(1)
    t = plan.Timing(0.0, 0.0, output_len=16, eos_prob=0.0)
    assert plan.decide_length(None, t, False, rng) == (16, "stop")
    assert plan.decide_length(5, t, False, rng) == (5, "length")
    assert plan.decide_length(16, t, False, rng) == (16, "length")
    assert plan.decide_length(100, t, False, rng) == (16, "stop")
    assert plan.decide_length(0, t, False, rng) == (0, "length")
    eos = plan.Timing(0.0, 0.0, output_len=1000, eos_prob=0.5)
    n, reason = plan.decide_length(None, eos, False, rng)
    assert 1 <= n < 1000 and reason == "stop"
    assert plan.decide_length(None, eos, True, rng) == (1000, "stop")  # ignore_eos


def test_plans_count_words_and_reject_bad_input() -> None:
    rng = random.Random(0)
    t = plan.Timing(0.0, 0.0, 16, 0.0)
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "three more words"}]},
        ],
        "max_completion_tokens": 4,
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    p = plan.plan_chat(body, t, rng)
    assert (p.prompt_tokens, p.n_tokens, p.finish_reason, p.include_usage) == (
        [5],
        4,
        "length",
        True,
    )
    p = plan.plan_completion({"prompt": ["a b", "c"], "max_tokens": 2}, t, rng)
    assert (p.prompt_tokens, p.batch, p.total_completion_tokens) == ([2, 1], True, 4)
    p = plan.plan_generate(
        {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3}}, t, rng
    )
    assert (p.prompt_tokens, p.n_tokens, p.finish_reason) == ([3], 3, "length")
    for bad in (
        {"messages": []},
        {"messages": [{"content": 5}]},
        {"messages": [{"content": "x"}], "max_tokens": -1},
        {"messages": [{"content": "x"}], "max_tokens": "3"},
        {"messages": [{"content": "x"}], "stream": "yes"},
    ):
        with pytest.raises(plan.ApiError) as err:
            plan.plan_chat(bad, t, rng)
        assert err.value.status == 400
    with pytest.raises(plan.ApiError):
        plan.plan_generate({"sampling_params": {}}, t, rng)
    with pytest.raises(plan.ApiError):
        plan.parse_json_object(b"[1, 2]")


def test_stream_renderer_chunks_rebuild_the_text() -> None:
    t = plan.Timing(0.0, 0.0, 16, 0.0)
    p = plan.plan_chat(
        chat_body(stream=True, max_tokens=6, stream_options={"include_usage": True}),
        t,
        random.Random(),
    )
    r = render.StreamRenderer(p, "chatcmpl-x", 123, "m")
    raw = r.opening() + b"".join(r.token(i) for i in range(p.n_tokens)) + r.closing()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == render.output_text(6) and len(text.split()) == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_config_update_validation() -> None:
    cfg = options.RuntimeConfig()
    assert options.apply_update(cfg, {"error_rate": 2}) is not None
    assert options.apply_update(cfg, {"nope": 1}) is not None
    assert options.apply_update(cfg, {"healthy": 1}) is not None
    assert options.apply_update(cfg, {"waiting": 3, "token_usage": 0.5, "ttft_ms": 10}) is None
    assert (cfg.waiting, cfg.token_usage, cfg.ttft_ms) == (3, 0.5, 10)
    # An invalid field leaves the whole update unapplied.
    assert options.apply_update(cfg, {"waiting": 4, "error_rate": -1}) is not None
    assert cfg.waiting == 3


# --- subprocess fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sglang3() -> Iterator[mockutil.MockWorkers]:
    with mockutil.start_mock_workers(3, "--seed", "7", engine="sglang") as mocks:
        yield mocks


@pytest.fixture()
def sg(sglang3: mockutil.MockWorkers) -> Iterator[str]:
    """Worker 0 of the shared SGLang process, with default config and fresh stats."""
    for url in sglang3.urls:
        mockutil.set_config(url, **DEFAULT_CONFIG)
        mockutil.reset_stats(url)
    yield sglang3.urls[0]
    assert sglang3.alive(), "a test killed the shared mock process"


@pytest.fixture(scope="module")
def vllm() -> Iterator[str]:
    with mockutil.start_mock_workers(1, engine="vllm", timeout=15) as mocks:
        yield mocks.url


@pytest.fixture(scope="module")
def keyed() -> Iterator[str]:
    args = ("--api-key", "secret-key", "--health-fail", "--max-body-bytes", "4096")
    with mockutil.start_mock_workers(1, *args) as mocks:
        yield mocks.url


# --- OpenAI client --------------------------------------------------------------------------


def test_openai_chat_and_completions(sg: str) -> None:
    c = client(sg)
    r = c.chat.completions.create(
        model="mock-model",
        messages=[{"role": "user", "content": "count these four words"}],
        max_tokens=5,
    )
    assert r.object == "chat.completion" and r.model == "mock-model"
    assert len(r.choices[0].message.content.split()) == 5
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)
    r = c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
    assert len(r.choices[0].message.content.split()) == 16 and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="mock-model", prompt="a b c", max_tokens=3)
    assert r.object == "text_completion" and len(r.choices[0].text.split()) == 3
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 3)
    s = mockutil.stats(sg)
    assert s["requests_by_route"] == {"/v1/chat/completions": 2, "/v1/completions": 1}
    assert s["generation_tokens_total"] == 24 and s["inference_answered"] == 3


def test_openai_streaming_chat_and_completions(sg: str) -> None:
    c = client(sg)
    chunks = list(
        c.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "a b"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 4
    finals = [
        ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 2
    comp = list(c.completions.create(model="mock-model", prompt="x", max_tokens=3, stream=True))
    assert "".join(ch.choices[0].text for ch in comp) == render.output_text(3)
    assert comp[-1].choices[0].finish_reason == "length"
    # The raw stream: chunked SSE ending with [DONE], no usage chunk when not asked for.
    with httpx.Client(timeout=5) as h:
        r = h.post(sg + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=2))
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    events = sse_events(r.content)
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_generate_native(sg: str) -> None:
    with httpx.Client(timeout=5) as h:
        r = h.post(
            sg + "/generate", json={"text": "w1 w2 w3", "sampling_params": {"max_new_tokens": 3}}
        )
        out = r.json()
        assert out["text"] == render.output_text(3) and len(out["output_ids"]) == 3
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
        assert out["meta_info"]["prompt_tokens"] == 3
        r = h.post(
            sg + "/generate",
            json={"input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 1}},
        )
        assert [o["meta_info"]["prompt_tokens"] for o in r.json()] == [2, 1]
        r = h.post(
            sg + "/generate",
            json={"text": "go", "sampling_params": {"max_new_tokens": 3}, "stream": True},
        )
        events = sse_events(r.content)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [ch["text"] for ch in chunks] == [render.output_text(i) for i in (1, 2, 3)]
        assert [ch["meta_info"]["finish_reason"] for ch in chunks][:2] == [None, None]
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
        r = h.post(sg + "/generate", json={"sampling_params": {}})
        assert r.status_code == 400 and "error" in r.json()


# --- timing -----------------------------------------------------------------------------------


def test_stream_timing_follows_headers(sg: str) -> None:
    headers = {"x-mock-ttft-ms": "300", "x-mock-itl-ms": "150", "x-mock-output-len": "4"}
    arrivals: list[float] = []
    with httpx.Client(timeout=10) as h:
        start = time.monotonic()
        with h.stream(
            "POST", sg + "/v1/chat/completions", json=chat_body(stream=True), headers=headers
        ) as r:
            assert r.status_code == 200
            buf = b""
            for data in r.iter_raw():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if b'"content":"' in event and b'"content":""' not in event:
                        arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4, arrivals
    # Token i is due at ttft + i * itl. The server never sends early (deadline-based);
    # on a loaded machine it may be late, so the upper bound is loose.
    for i, t in enumerate(arrivals):
        due = 0.3 + 0.15 * i
        assert due - 0.02 <= t < due + 0.6, (i, arrivals)
    assert arrivals[-1] - arrivals[0] >= 0.43, arrivals


def test_nonstream_delay_and_runtime_config(sg: str) -> None:
    mockutil.set_config(sg, ttft_ms=200, itl_ms=50, output_len=3)
    start = time.monotonic()
    status, body = mockutil.request_json("POST", sg + "/v1/chat/completions", chat_body())
    elapsed = time.monotonic() - start
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert 0.28 <= elapsed < 1.5, elapsed


# --- faults -----------------------------------------------------------------------------------


def test_error_rate_and_status_override(sg: str) -> None:
    mockutil.set_config(sg, error_rate=1.0)
    with pytest.raises(openai.InternalServerError) as err:
        client(sg).chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 500
    status, body = mockutil.request_json("POST", sg + "/v1/completions", {"prompt": "x"})
    assert status == 500 and set(body["error"]) >= {"message", "type", "code"}
    mockutil.set_config(sg, error_rate=0.0)
    status, body = mockutil.request_json(
        "POST", sg + "/v1/chat/completions", chat_body(), headers={"x-mock-status": "503"}
    )
    assert status == 503 and body["error"]["code"] == 503
    assert mockutil.stats(sg)["responses_by_status"] == {"500": 2, "503": 1}


def test_hang_is_counted_as_disconnect(sg: str) -> None:
    mockutil.set_config(sg, hang_rate=1.0)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.3) as h:
        h.post(sg + "/v1/chat/completions", json=chat_body())
    s = mockutil.wait_for(lambda: (s := mockutil.stats(sg))["disconnects"] == 1 and s)
    assert s and s["in_flight"] == 0 and s["inference_answered"] == 0


def test_stream_disconnect_stops_generation(sg: str) -> None:
    headers = {"x-mock-itl-ms": "100", "x-mock-output-len": "100"}
    with (
        httpx.Client(timeout=5) as h,
        h.stream(
            "POST", sg + "/v1/chat/completions", json=chat_body(stream=True), headers=headers
        ) as r,
    ):
        chunks = r.iter_raw()  # keep a reference: dropping the iterator closes the response
        next(chunks)
        assert mockutil.stats(sg)["in_flight"] == 1
    closed_at = time.monotonic()
    s = mockutil.wait_for(lambda: (s := mockutil.stats(sg))["disconnects"] == 1 and s)
    assert s, "disconnect not counted"
    assert s["in_flight"] == 0
    assert abs(s["last_disconnect_monotonic"] - closed_at) < 1.0
    time.sleep(0.3)
    assert mockutil.stats(sg)["generation_tokens_total"] < 10  # generation stopped


def test_health_toggle(sg: str) -> None:
    assert mockutil.request("GET", sg + "/health")[0] == 200
    mockutil.set_config(sg, healthy=False)
    assert mockutil.request("GET", sg + "/health")[0] == 503
    assert mockutil.request("GET", sg + "/health_generate")[0] == 503
    mockutil.set_config(sg, healthy=True)
    assert mockutil.request("GET", sg + "/health")[0] == 200
    status, body = mockutil.request_json("POST", sg + "/mock/config", {"error_rate": 5})
    assert status == 400 and "error_rate" in body["error"]["message"]


def test_exit_after() -> None:
    with mockutil.start_mock_workers(1, "--exit-after", "2") as mocks:
        for _ in range(2):
            assert (
                mockutil.request("POST", mocks.url + "/v1/chat/completions", chat_body())[0] == 200
            )
        assert mocks.proc.wait(timeout=5) == 0
        with pytest.raises(OSError):
            mockutil.request("GET", mocks.url + "/health", timeout=1)


# --- load reporting -------------------------------------------------------------------------------


def test_loads_and_metrics_reflect_in_flight(sg: str) -> None:
    headers = {"x-mock-ttft-ms": "5000"}
    with httpx.Client(timeout=10) as h:
        streams = [
            h.stream(
                "POST", sg + "/v1/chat/completions", json=chat_body(stream=True), headers=headers
            )
            for _ in range(2)
        ]
        responses = [s.__enter__() for s in streams]  # headers arrive before the first token
        try:
            assert all(r.status_code == 200 for r in responses)
            mockutil.set_config(sg, waiting=5, token_usage=0.4)
            status, loads = mockutil.request_json(
                "GET", sg + "/v1/loads?include=core,disagg,queues,memory"
            )
            assert status == 200
            assert set(loads) == {"timestamp", "version", "dp_rank_count", "loads", "aggregate"}
            load = loads["loads"][0]
            assert (load["num_running_reqs"], load["num_waiting_reqs"], load["token_usage"]) == (
                2,
                5,
                0.4,
            )
            assert load["num_total_reqs"] == 7 and load["max_total_num_tokens"] > 0
            assert loads["aggregate"]["total_reqs"] == 7
            _, get_load = mockutil.request_json("GET", sg + "/get_load")
            assert get_load[0]["num_reqs"] == 7 and get_load[0]["num_waiting_reqs"] == 5
            _, hdrs, text = mockutil.request("GET", sg + "/metrics")
            assert hdrs["content-type"].startswith("text/plain")
            m = parse_prometheus(text.decode())
            assert m["sglang:num_running_reqs"][0] == "gauge"
            assert m["sglang:num_running_reqs"][2] == 2.0
            assert m["sglang:num_queue_reqs"][2] == 5.0
            assert m["sglang:token_usage"][2] == 0.4
            assert m["sglang:token_usage"][1]["model_name"] == "mock-model"
            _, _, prom = mockutil.request("GET", sg + "/v1/loads?format=prometheus")
            assert parse_prometheus(prom.decode())["sglang_num_running_reqs"][2] == 2.0
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    s = mockutil.wait_for(lambda: (s := mockutil.stats(sg))["in_flight"] == 0 and s)
    assert s and s["disconnects"] == 2
    mockutil.set_config(sg, token_usage=None)
    _, loads = mockutil.request_json("GET", sg + "/v1/loads")
    assert loads["loads"][0]["num_running_reqs"] == 0 and loads["loads"][0]["token_usage"] == 0.0


def test_sglang_info_endpoints(sg: str) -> None:
    _, models = mockutil.request_json("GET", sg + "/v1/models")
    assert models["object"] == "list" and models["data"][0]["owned_by"] == "sglang"
    assert models["data"][0]["id"] == "mock-model"
    for path in ("/server_info", "/get_server_info"):
        status, info = mockutil.request_json("GET", sg + path)
        assert status == 200 and "version" in info and info["served_model_name"] == "mock-model"
    _, info = mockutil.request_json("GET", sg + "/get_model_info")
    assert info["model_path"] == "mock-model" and info["is_generation"] is True
    assert mockutil.request("GET", sg + "/version")[0] == 404  # vLLM-only
    status, _, text = mockutil.request("POST", sg + "/flush_cache", b"")
    assert status == 200 and text.startswith(b"Cache flushed")


def test_vllm_engine(vllm: str) -> None:
    _, models = mockutil.request_json("GET", vllm + "/v1/models")
    assert models["data"][0]["owned_by"] == "vllm"
    assert mockutil.request_json("GET", vllm + "/version")[1]["version"]
    for path in ("/v1/loads", "/get_load", "/server_info", "/get_model_info"):
        assert mockutil.request("GET", vllm + path)[0] == 404, path
    mockutil.set_config(vllm, waiting=3, token_usage=0.25)
    m = parse_prometheus(mockutil.request("GET", vllm + "/metrics")[2].decode())
    assert m["vllm:num_requests_running"][2] == 0.0
    assert m["vllm:num_requests_waiting"][2] == 3.0
    assert m["vllm:kv_cache_usage_perc"][2] == 0.25 and m["vllm:gpu_cache_usage_perc"][2] == 0.25
    assert m["vllm:num_requests_running"][1] == {"engine": "0", "model_name": "mock-model"}
    assert m["vllm:prompt_tokens_total"][0] == "counter"
    r = client(vllm).chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "q"}], max_tokens=2
    )
    assert r.usage.completion_tokens == 2
    status, out = mockutil.request_json(
        "POST", vllm + "/rerank", {"query": "red fox", "documents": ["blue", "red fox"]}
    )
    assert status == 200 and [x["index"] for x in out["results"]] == [1, 0]
    assert (
        out["results"][0]["document"] == {"text": "red fox"}
        and out["results"][0]["relevance_score"] == 1.0
    )


def test_embeddings_and_rerank(sg: str) -> None:
    e1 = client(sg).embeddings.create(model="mock-model", input=["alpha beta", "gamma"])
    e2 = client(sg).embeddings.create(model="mock-model", input="alpha beta")
    assert len(e1.data) == 2 and len(e1.data[0].embedding) == 16
    assert e1.data[0].embedding == e2.data[0].embedding != e1.data[1].embedding
    assert e1.usage.prompt_tokens == 3
    for path in ("/v1/rerank", "/rerank"):
        body = {"query": "the fox", "documents": ["a cat", "the fox", "fox"], "top_n": 2}
        status, out = mockutil.request_json("POST", sg + path, body)
        assert status == 200
        assert [x["index"] for x in out] == [1, 2] and out[0]["document"] == "the fox"
        assert out[0]["score"] >= out[1]["score"]


def test_count_three_independent(sglang3: mockutil.MockWorkers, sg: str) -> None:
    urls = sglang3.urls
    assert len(set(urls)) == 3
    assert mockutil.request("POST", urls[1] + "/v1/chat/completions", chat_body())[0] == 200
    mockutil.set_config(urls[2], healthy=False)
    assert [
        mockutil.stats(u)["requests_by_route"].get("/v1/chat/completions", 0) for u in urls
    ] == [0, 1, 0]
    assert [mockutil.request("GET", u + "/health")[0] for u in urls] == [200, 200, 503]
    assert [mockutil.stats(u)["port"] for u in urls] == [int(u.rsplit(":", 1)[1]) for u in urls]


# --- auth, headers, bodies ----------------------------------------------------------------------


def test_api_key_and_recorded_headers(keyed: str) -> None:
    auth = {"Authorization": "Bearer secret-key"}
    assert (
        mockutil.request("GET", keyed + "/health")[0] == 503
    )  # exempt from the key; --health-fail
    assert mockutil.request("GET", keyed + "/v1/models")[0] == 401
    assert (
        mockutil.request("GET", keyed + "/v1/models", headers={"Authorization": "Bearer wrong"})[0]
        == 401
    )
    assert mockutil.request("GET", keyed + "/v1/models", headers=auth)[0] == 200
    assert mockutil.request("GET", keyed + "/metrics")[0] == 401
    assert mockutil.request("GET", keyed + "/v1/loads", headers=auth)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        client(keyed).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    r = client(keyed, api_key="secret-key").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert r.usage.completion_tokens == 1
    body = (
        b'{"messages": [{"role":"user","content":"caf\xc3\xa9  \\u00e9\\n x"}],   "max_tokens": 2}'
    )
    status, _, _ = mockutil.request(
        "POST", keyed + "/v1/chat/completions", body, headers={**auth, "X-Custom": "v1"}
    )
    assert status == 200
    rec = mockutil.stats(keyed)["last_request_by_route"]["/v1/chat/completions"]
    assert base64.b64decode(rec["body_b64"]) == body and rec["body_len"] == len(body)
    assert rec["header_map"]["authorization"] == "Bearer secret-key"
    assert rec["header_map"]["x-custom"] == "v1" and rec["method"] == "POST"
    big = b'{"prompt": "' + b"x " * 3000 + b'"}'
    assert mockutil.request("POST", keyed + "/v1/completions", big, headers=auth)[0] == 413
    assert mockutil.request("GET", keyed + "/health")[0] == 503  # still serving


def test_bad_requests_never_kill_the_process(sg: str) -> None:
    status, body = mockutil.request_json("POST", sg + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == 400 and body["error"]["type"]
    assert mockutil.request("GET", sg + "/no/such/route")[0] == 404
    status, headers, _ = mockutil.request("GET", sg + "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    garbage = raw_exchange(sg, b"\x16\x03\x01 definitely not http\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw_exchange(sg, huge).startswith(b"HTTP/1.1 431 ")
    endless = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 200_000  # never finishes its head
    assert raw_exchange(sg, endless).startswith(b"HTTP/1.1 431 ")
    assert mockutil.request("GET", sg + "/health")[0] == 200


def test_pipelined_requests_answer_in_order(sg: str) -> None:
    body = json.dumps(chat_body(max_tokens=2)).encode()
    slow = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-mock-ttft-ms: 200\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    fast = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    start = time.monotonic()
    responses = split_responses(raw_exchange(sg, slow + fast + slow + last))
    assert time.monotonic() - start >= 0.38  # the two slow ones ran one after the other
    assert [s for s, _ in responses] == [200, 200, 200, 200]
    assert json.loads(responses[0][1])["object"] == "chat.completion"
    assert json.loads(responses[1][1])["object"] == "list"
    assert json.loads(responses[2][1])["object"] == "chat.completion"
    assert responses[3][1] == b""
