"""smg in front of a real engine: vLLM (CPU) serving a tiny random Llama (conftest.py).

First the engines alone (vLLM's own HTTP server; its gRPC server through the raw
smg_grpc_proto stubs), so a failure below is smg's and not the environment's. Then
`smg launch` on loopback, once with the gRPC worker (`--worker-urls grpc://...
--model-path DIR`: smg renders, tokenizes and detokenizes) and once with the HTTP worker
(smg relays), each driven with the openai client: at temperature 0 every answer equals
what vLLM's own HTTP server returns for the same request, token counts included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from gatewayutil import Gateway
from vllmutil import EOS_TOKEN_IDS, GENERATION_DEFAULTS, MODEL_NAME, Engine, Engines

# The engines start once per session (25-90 s); each test then takes seconds.
pytestmark = pytest.mark.timeout(600)

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours, and say why the sky is blue."},
]
MAX_TOKENS = 24
# The answer must be exactly one of these (random weights, but the grammar decides).
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
GATEWAY_READY_S = 180.0


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(base_url: str, **extra: Any) -> Any:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        **extra,
    }
    return client(base_url).chat.completions.create(**body)


@pytest.fixture(scope="session")
def prompt_ids(model_dir: Path) -> list[int]:
    """The chat prompt's token ids as transformers renders and tokenizes them (what vLLM's
    HTTP server does: the template writes BOS, so no special tokens are added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="session")
def reference(vllm_http: Engine) -> Any:
    """vLLM's own HTTP answer to the plain temperature-0 request: what smg must match."""
    answer = chat(vllm_http.url)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == MAX_TOKENS
    return answer


# --- the engines alone ---------------------------------------------------------------------


def test_vllm_http_answers_chat(vllm_http: Engine, prompt_ids: list[int], reference: Any) -> None:
    assert reference.model == MODEL_NAME
    assert reference.choices[0].message.role == "assistant"
    assert reference.usage.prompt_tokens == len(prompt_ids)
    assert reference.choices[0].message.content  # random weights, but 24 tokens of text
    # Greedy decoding is deterministic: the same request, the same answer.
    again = chat(vllm_http.url)
    assert again.choices[0].message.content == reference.choices[0].message.content


def test_vllm_grpc_raw_stubs(
    vllm_grpc: Engine, model_dir: Path, prompt_ids: list[int], reference: Any
) -> None:
    import grpc
    from smg_grpc_proto.generated import vllm_engine_pb2 as pb
    from smg_grpc_proto.generated import vllm_engine_pb2_grpc as pb_grpc
    from tokenizers import Tokenizer

    with grpc.insecure_channel(vllm_grpc.target) as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        health = stub.HealthCheck(pb.HealthCheckRequest(), timeout=10)
        assert health.healthy is True
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.served_model_name == MODEL_NAME
        assert info.model_path == str(model_dir)
        assert info.max_context_length == 2048
        assert info.vocab_size == 128256
        assert list(info.eos_token_ids) == EOS_TOKEN_IDS
        assert info.bos_token_id == 128000
        assert json.loads(info.default_sampling_params_json) == GENERATION_DEFAULTS

        sampling = pb.SamplingParams(
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=MAX_TOKENS,
            n=1,
            skip_special_tokens=True,
            spaces_between_special_tokens=True,
        )

        def generate(request_id: str, stream: bool) -> list[Any]:
            request = pb.GenerateRequest(
                request_id=request_id,
                tokenized=pb.TokenizedInput(original_text="chat", input_ids=prompt_ids),
                sampling_params=sampling,
                stream=stream,
            )
            return list(stub.Generate(request, timeout=120))

        [whole] = generate("raw-complete", stream=False)
        complete = whole.complete
        assert complete.finish_reason == "length"
        assert complete.prompt_tokens == len(prompt_ids)
        assert complete.completion_tokens == MAX_TOKENS
        assert len(complete.output_ids) == MAX_TOKENS
        # The gRPC engine computes what the HTTP engine does: same tokens, same text.
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        text = tokenizer.decode(list(complete.output_ids), skip_special_tokens=True)
        assert text == reference.choices[0].message.content

        streamed = generate("raw-stream", stream=True)
        kinds = [r.WhichOneof("response") for r in streamed]
        assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"}
        ids = [i for r in streamed[:-1] for i in r.chunk.token_ids]
        assert ids == list(complete.output_ids)[: len(ids)]
        assert streamed[-1].complete.finish_reason == "length"


# --- through smg ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["grpc", "http"])
def gateway(request: pytest.FixtureRequest, engines: Engines) -> Iterator[Gateway]:
    """`smg launch` in front of one engine: the gRPC worker with the model directory as
    --model-path (smg is the OpenAI server), or the HTTP worker (smg relays)."""
    if request.param == "grpc":
        args = ["--worker-urls", engines.grpc.url, "--model-path", str(engines.model_dir)]
    else:
        args = ["--worker-urls", engines.http.url]
    gw = Gateway(args, processes=2)
    gw.start(timeout=60)
    try:
        gw.wait_ready(timeout=GATEWAY_READY_S)
        yield gw
    finally:
        gw.stop()
        gw.close_log()


def test_models_lists_the_served_name(gateway: Gateway) -> None:
    models = client(gateway.url).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_chat_equals_vllm(gateway: Gateway, reference: Any) -> None:
    answer = chat(gateway.url)
    assert answer.model == MODEL_NAME
    assert answer.object == "chat.completion"
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == reference.choices[0].message.content
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
    assert answer.usage.completion_tokens == reference.usage.completion_tokens == MAX_TOKENS
    assert answer.usage.total_tokens == reference.usage.total_tokens


def test_stream_equals_vllm(gateway: Gateway, reference: Any) -> None:
    stream = chat(gateway.url, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # The role first, the usage last (no choices), the finish reason just before it.
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == reference.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (
        len(with_choices) - 1
    )
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == reference.choices[0].message.content


def test_logprobs_equal_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    expected = chat(vllm_http.url, logprobs=True, top_logprobs=3)
    answer = chat(gateway.url, logprobs=True, top_logprobs=3)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    got = answer.choices[0].logprobs.content
    want = expected.choices[0].logprobs.content
    assert len(got) == len(want) == MAX_TOKENS
    for mine, theirs in zip(got, want, strict=True):
        assert mine.token == theirs.token
        assert mine.bytes == theirs.bytes
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t.token for t in mine.top_logprobs] == [t.token for t in theirs.top_logprobs]
        assert [t.logprob for t in mine.top_logprobs] == pytest.approx(
            [t.logprob for t in theirs.top_logprobs], abs=1e-4
        )
        # Greedy: the chosen token is the most likely one.
        assert mine.top_logprobs[0].token == mine.token


def test_n2_greedy_is_refused_like_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    # vLLM refuses n > 1 at temperature 0 (SamplingParams: "n must be 1 when using greedy
    # sampling"); through smg, over either protocol, the client gets the same 400.
    with pytest.raises(openai.BadRequestError) as direct:
        chat(vllm_http.url, n=2)
    assert direct.value.status_code == 400
    assert direct.value.body["message"] == "n must be 1 when using greedy sampling, got 2."  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as through:
        chat(gateway.url, n=2)
    assert through.value.status_code == 400


def test_n2_seeded_sampling_equals_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    # Sampled, but seeded: vLLM seeds choice i with seed + i, whichever server it runs in.
    extra = {"n": 2, "temperature": 1.0, "top_p": 1.0, "seed": 1234}
    expected = chat(vllm_http.url, **extra)
    answer = chat(gateway.url, **extra)
    texts = [c.message.content for c in sorted(answer.choices, key=lambda c: c.index)]
    want = [c.message.content for c in sorted(expected.choices, key=lambda c: c.index)]
    assert texts == want
    assert texts[0] != texts[1]
    assert [c.finish_reason for c in answer.choices] == ["length", "length"]
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    assert answer.usage.completion_tokens == expected.usage.completion_tokens == 2 * MAX_TOKENS


def test_structured_output_json_schema_equals_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
    }
    extra = {"response_format": response_format, "max_tokens": 64}
    expected = chat(vllm_http.url, **extra)
    answer = chat(gateway.url, **extra)
    content = answer.choices[0].message.content
    assert content == expected.choices[0].message.content
    assert json.loads(content) in ({"answer": "yes"}, {"answer": "no"})
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == expected.usage.completion_tokens


def assert_same_chat(answer: Any, expected: Any) -> None:
    """Every choice's text and finish reason, and the token counts, as vLLM answered."""
    got = sorted(answer.choices, key=lambda c: c.index)
    want = sorted(expected.choices, key=lambda c: c.index)
    assert [c.message.content for c in got] == [c.message.content for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    assert answer.usage.completion_tokens == expected.usage.completion_tokens


def test_every_sampling_field_reaches_the_engine(gateway: Gateway, vllm_http: Engine) -> None:
    # Seeded sampling with every knob moved off its neutral value: one field lost or
    # left at a proto3 zero on the way changes the sampled text.
    extra = {
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "extra_body": {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.2},
    }
    expected = chat(vllm_http.url, **extra)
    answer = chat(gateway.url, **extra)
    assert_same_chat(answer, expected)
    assert expected.choices[0].finish_reason == "length"


def test_model_defaults_apply_when_the_request_has_none(
    gateway: Gateway, vllm_http: Engine
) -> None:
    # No temperature / top_p: generation_config.json's 0.6 / 0.9 apply in vLLM and must
    # in smg too (seeded, so the sampled text shows which values were used).
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "seed": 11}
    expected = client(vllm_http.url).chat.completions.create(**body)
    answer = client(gateway.url).chat.completions.create(**body)
    assert_same_chat(answer, expected)
    greedy = chat(vllm_http.url, seed=11)
    assert expected.choices[0].message.content != greedy.choices[0].message.content


def test_eos_logit_bias_min_tokens_and_ignore_eos(gateway: Gateway, vllm_http: Engine) -> None:
    # <|eot_id|> (one of the model's three EOS ids) pushed to the top: the answer stops
    # at once; min_tokens holds it back; ignore_eos runs to max_tokens.
    bias = {"logit_bias": {str(EOS_TOKEN_IDS[2]): 100}}
    cases = [
        bias,
        {**bias, "extra_body": {"min_tokens": 5}},
        {**bias, "extra_body": {"ignore_eos": True}},
    ]
    for extra in cases:
        expected = chat(vllm_http.url, **extra)
        answer = chat(gateway.url, **extra)
        assert_same_chat(answer, expected)
    stopped = chat(vllm_http.url, **cases[0])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == ""
    held = chat(vllm_http.url, **cases[1])
    assert held.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens > 5
    ignored = chat(vllm_http.url, **cases[2])
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == MAX_TOKENS


def stop_across_tokens(vllm_http: Engine) -> tuple[str, str]:
    """A stop string that spans two tokens of the greedy answer (the end of one, the
    start of the next) and first occurs there: (stop, the text before it)."""
    answer = chat(vllm_http.url, logprobs=True)
    tokens = [t.token for t in answer.choices[0].logprobs.content]
    text = answer.choices[0].message.content
    offset = 0
    for k in range(len(tokens) - 1):
        offset += len(tokens[k])
        if k < 3 or len(tokens[k]) < 2 or len(tokens[k + 1]) < 2:
            continue
        stop = tokens[k][-2:] + tokens[k + 1][:2]
        at = offset - 2
        aligned = text[:offset] == "".join(tokens[: k + 1])
        if aligned and "\ufffd" not in stop and text.find(stop) == at:
            return stop, text[:at]
    raise AssertionError(f"no stop string spanning two tokens in {tokens!r}")


def test_stop_string_across_tokens_equals_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    stop, before = stop_across_tokens(vllm_http)
    expected = chat(vllm_http.url, stop=[stop])
    assert expected.choices[0].message.content == before
    assert expected.choices[0].finish_reason == "stop"
    answer = chat(gateway.url, stop=[stop])
    assert_same_chat(answer, expected)
    # Streamed, the stop string is held back across chunks and never shown.
    chunks = list(chat(gateway.url, stop=[stop], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == before
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # Shown when asked to.
    extra = {"stop": [stop], "extra_body": {"include_stop_str_in_output": True}}
    expected = chat(vllm_http.url, **extra)
    assert expected.choices[0].message.content == before + stop
    assert_same_chat(chat(gateway.url, **extra), expected)


def test_completions_equal_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    # A text prompt, tokenized with add_special_tokens as vLLM does (this tokenizer.json
    # has no BOS post-processor, so none is added).
    body = {"model": MODEL_NAME, "prompt": "The sky is blue because", "temperature": 0}
    body["max_tokens"] = MAX_TOKENS
    expected = client(vllm_http.url).completions.create(**body, logprobs=2)
    answer = client(gateway.url).completions.create(**body, logprobs=2)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected.choices[0].text
    assert answer.choices[0].finish_reason == expected.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    assert answer.usage.completion_tokens == expected.usage.completion_tokens == MAX_TOKENS
    assert answer.choices[0].logprobs.tokens == expected.choices[0].logprobs.tokens
    assert answer.choices[0].logprobs.token_logprobs == pytest.approx(
        expected.choices[0].logprobs.token_logprobs, abs=1e-4
    )
    assert answer.choices[0].logprobs.text_offset == expected.choices[0].logprobs.text_offset


def test_prompt_over_the_context_is_400_like_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    too_long = [{"role": "user", "content": "hello " * 2100}]  # 2,135 prompt tokens
    for url in (vllm_http.url, gateway.url):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(url, messages=too_long)
        assert refused.value.status_code == 400
        message = refused.value.body["message"]  # type: ignore[index]
        assert message.startswith("This model's maximum context length is 2048 tokens."), message


def test_max_tokens_past_the_context(gateway: Gateway, vllm_http: Engine) -> None:
    # 2,035 prompt tokens and max_tokens 100: vLLM 0.32 clamps max_tokens to what is left
    # of the context (its get_max_tokens: the minimum of the bounds) and answers 13
    # tokens; smg's gRPC front end does the same (prepare's apply_limits).
    messages = [{"role": "user", "content": "hello " * 2000}]
    expected = chat(vllm_http.url, messages=messages, max_tokens=100)
    assert expected.usage.prompt_tokens == 2035
    assert expected.usage.completion_tokens == 2048 - 2035
    assert expected.choices[0].finish_reason == "length"
    assert_same_chat(chat(gateway.url, messages=messages, max_tokens=100), expected)


def test_stream_n2_seeded_equals_vllm(gateway: Gateway, vllm_http: Engine) -> None:
    extra = {"n": 2, "temperature": 1.0, "top_p": 1.0, "seed": 99}
    expected = chat(vllm_http.url, **extra)
    chunks = list(chat(gateway.url, stream=True, stream_options={"include_usage": True}, **extra))
    texts = {0: "", 1: ""}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    want = {c.index: c.message.content for c in expected.choices}
    assert texts == want
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens


def test_client_disconnect_aborts_the_engine_request(
    gateway: Gateway, request: pytest.FixtureRequest, engines: Engines
) -> None:
    # A long stream (1,500 tokens, EOS ignored: ~10 s or more here) left after three
    # chunks: the engine must abort it (vLLM's AsyncLLM logs "Aborted request(s) ..."
    # with --enable-log-requests), over gRPC through the Abort RPC (the servicer logs
    # "Abort requests: [...]"); a stream that ran to its end would log neither.
    kind = request.node.callspec.params["gateway"]
    engine = engines.grpc if kind == "grpc" else engines.http
    before = engine.log_tail(chars=10**9)
    stream = chat(gateway.url, stream=True, max_tokens=1500, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += sum(1 for c in chunk.choices if c.delta.content)
        if received >= 3:
            break
    stream.close()
    assert received == 3
    markers = ["Aborted request(s)"] + (["Abort requests:"] if kind == "grpc" else [])
    deadline = time.monotonic() + 20.0
    new = ""
    while time.monotonic() < deadline:
        new = engine.log_tail(chars=10**9)[len(before) :]
        if all(marker in new for marker in markers):
            break
        time.sleep(0.2)
    for marker in markers:
        assert marker in new, f"{marker!r} not in the {engine.name} log after the disconnect"
