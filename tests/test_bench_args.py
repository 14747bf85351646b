"""Flag parsing, request bodies and sizing decisions of `smg bench` (pure)."""

from __future__ import annotations

import json

import pytest

from smg.bench import serve
from smg.bench.args import build_parser, parse_goodput, parse_kv, sampling_overrides
from smg.bench.backends import BodyOptions, base_headers, build_body
from smg.bench.http import build_request, parse_url


def args(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_vllm_defaults() -> None:
    a = args()
    assert a.backend == "openai" and a.dataset_name == "random"
    assert a.num_prompts == 1000 and a.random_input_len == 1024 and a.random_output_len == 128
    assert a.request_rate == float("inf") and a.burstiness == 1.0
    assert a.metric_percentiles == "99" and a.seed == 0 and a.max_concurrency is None


def test_goodput_and_kv_parsing() -> None:
    assert parse_goodput(["ttft:200", "tpot:20.5", "e2el:1000"]) == {
        "ttft": 200.0,
        "tpot": 20.5,
        "e2el": 1000.0,
    }
    for bad in (["ttft=5"], ["itl:5"], ["ttft:-1"], ["ttft:x"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_kv(["a=1", "b = x=y"], "--header") == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError):
        parse_kv(["nokey"], "--metadata")


def test_sampling_overrides_and_extra_body() -> None:
    a = args("--temperature", "0", "--top-k", "5", "--extra-body", '{"top_k": 7, "seed": 1}')
    assert sampling_overrides(a) == {"temperature": 0.0, "top_k": 7, "seed": 1}
    with pytest.raises(SystemExit):
        args("--extra-body", "[1]")


@pytest.mark.parametrize(
    ("backend", "expect"),
    [
        (
            "openai",
            {
                "model": "m",
                "prompt": "hi",
                "max_tokens": 5,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
                "temperature": 0.0,
            },
        ),
        (
            "openai-chat",
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 5,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
                "temperature": 0.0,
            },
        ),
        (
            "sglang",
            {
                "text": "hi",
                "sampling_params": {"max_new_tokens": 5, "ignore_eos": True, "temperature": 0.0},
                "stream": True,
            },
        ),
        ("embeddings", {"model": "m", "input": "hi", "temperature": 0.0}),
    ],
)
def test_request_bodies(backend: str, expect: dict) -> None:
    opts = BodyOptions("m", stream=True, ignore_eos=True, extra_body={"temperature": 0.0})
    assert json.loads(build_body(backend, "hi", 5, opts)) == expect


def test_api_key_header_and_request_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    headers = base_headers({"X-Extra": "1"})
    assert headers["Authorization"] == "Bearer sk-test" and headers["X-Extra"] == "1"
    target = parse_url("http://127.0.0.1:8000/prefix")
    assert target.base_path == "/prefix" and target.host_header == "127.0.0.1:8000"
    raw = build_request("POST", target, "/v1/x", {"A": "b"}, b"{}")
    assert (
        raw == b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nA: b\r\nContent-Length: 2\r\n\r\n{}"
    )
    with pytest.raises(ValueError):
        parse_url("ftp://x")


def test_client_processes_and_prewarm_sizing() -> None:
    assert serve.choose_processes(args("--client-processes", "3"), 100) == 3
    assert serve.choose_processes(args("--client-processes", "auto"), 100) == 1  # inf rate
    auto = serve.choose_processes(
        args("--client-processes", "auto", "--request-rate", "100000"), 10
    )
    assert auto >= 1
    assert serve.prewarm_size(args("--max-concurrency", "32"), 1000, 1) == 32
    assert serve.prewarm_size(args("--max-concurrency", "32"), 1000, 2) == 16
    assert serve.prewarm_size(args(), 100, 1) == 100
    assert serve.prewarm_size(args("--request-rate", "5"), 1000, 1) == 64
    with pytest.raises(SystemExit):
        args("--client-processes", "0")


def test_validation_errors() -> None:
    for argv in (
        ["--max-concurrency", "0"],
        ["--dataset-name", "random", "--dataset-path", "x"],
        ["--dataset-name", "timed_trace"],
        ["--self-timed"],
        ["--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "0", "--ramp-up-end-rps", "5"],
        ["--max-error-rate", "2"],
    ):
        with pytest.raises(serve.UsageError):
            serve.validate(args(*argv))
