"""native_bench/grpc_bench.py: its pure parts, and the Rust SMG 1.13 serving the gRPC mock.

The Rust test needs the Rust SMG (native_bench/.venv-rust/bin/smg, or $RUST_SMG); it is
skipped without one. It proves the mock speaks the protos as the Rust client expects: a
streamed and a non-streamed chat, n=2, a stop string and logprobs through the Rust
gateway, for both backends.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpc_bench as gb  # noqa: E402

RUST = os.environ.get("RUST_SMG") or str(HERE / ".venv-rust" / "bin" / "smg")


def test_summarize_cpu_per_thousand_requests() -> None:
    result = {"completed": 400, "failed": 0, "output_throughput": 1000.0, "median_ttft_ms": 2.5}
    out = gb.summarize(result, 3.0)
    assert out["cpu_s_per_1000_req"] == 7.5
    assert (out["median_ttft_ms"], out["output_throughput"], out["p99_itl_ms"]) == (
        2.5,
        1000.0,
        None,
    )
    assert gb.summarize({"completed": 0}, 1.0)["cpu_s_per_1000_req"] is None


def test_markdown_rows() -> None:
    sat = {
        "output_throughput": 12345.6,
        "request_throughput": 48.2,
        "cpu_s_per_1000_req": 9.87,
        "failed": 0,
    }
    half = {
        "offered_rps": 24.1,
        "median_ttft_ms": 1.5,
        "p90_ttft_ms": 2.0,
        "p99_ttft_ms": 3.25,
        "median_itl_ms": 0.1,
        "p90_itl_ms": 0.2,
        "p99_itl_ms": 0.3,
        "cpu_s_per_1000_req": 5.0,
        "failed": 1,
    }
    report = {
        "date": "d",
        "cpus": 2,
        "mock_processes": 2,
        "concurrency": 64,
        "output_len": 256,
        "seed": 0,
        "rows": [
            {"gateway": "rust", "input_len": 1024, "saturation": sat, "half_rate": half},
            {"gateway": "smg-p2", "input_len": 1024, "error": "not ready"},
        ],
    }
    lines = gb.markdown(report).splitlines()
    assert lines[4] == (
        "| 1024 | rust | 12,346 | 48.20 | 9.9 | 24.10 | 1.50/2.00/3.25 | 0.10/0.20/0.30 | 5.0 | 1 |"
    )
    assert lines[5].startswith("| 1024 | smg-p2 | error: not ready")


def test_model_dir_has_what_the_gateways_read(tmp_path: Path) -> None:
    d = gb.make_model_dir(tmp_path / "m")
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|eot_id|>")
    assert "<|start_header_id|>" in config["chat_template"]
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [
        128001,
        128008,
        128009,
    ]
    assert json.loads((d / "config.json").read_text())["model_type"] == "llama"
    assert not (gb.make_model_dir(tmp_path / "n", config_json=False) / "config.json").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gb.make_model_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(params=["vllm", "sglang"])
def rust_port(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path
) -> Iterator[tuple[int, str]]:
    if not Path(RUST).exists():
        pytest.skip(f"no Rust SMG at {RUST} (set RUST_SMG)")
    mock = gb.start_mock(model_dir, request.param)
    args = gb.parse_args(["--rust-smg", RUST])
    try:
        gw, port = gb.start_gateway("rust", args, mock, model_dir, tmp_path)
        try:
            yield port, request.param
        finally:
            gw.stop()
    finally:
        mock.stop()


def _chat(port: int, **body: Any) -> tuple[int, Any]:
    return gb.http_json(
        port,
        "POST",
        "/v1/chat/completions",
        {"model": gb.MODEL, "messages": [{"role": "user", "content": "hi"}], **body},
    )


def test_rust_smg_serves_the_mock(rust_port: tuple[int, str]) -> None:
    port, backend = rust_port
    status, body = _chat(port, max_tokens=7, n=2, logprobs=True, top_logprobs=2, seed=3)
    assert status == 200, body
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 14
    assert [len(c["logprobs"]["content"]) for c in body["choices"]] == [7, 7]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts[0] != texts[1] and all(texts)  # random ids, per choice
    if backend == "vllm":  # the seed reaches the engine (SGLang's proto has no seed field)
        again = _chat(port, max_tokens=7, n=2, seed=3)[1]
        assert [c["message"]["content"] for c in again["choices"]] == texts
    status, stream = _stream(port, max_tokens=9, seed=5, stream_options={"include_usage": True})
    assert status == 200
    events = [json.loads(line[6:]) for line in stream.split("\n") if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 9
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    streamed = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
    )
    if backend == "vllm":  # the same seeded ids as a non-streamed answer
        assert streamed == _chat(port, max_tokens=9, seed=5)[1]["choices"][0]["message"]["content"]


def _stream(port: int, **body: Any) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection(gb.HOST, port, timeout=30)
    try:
        payload = {
            "model": gb.MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            **body,
        }
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(payload),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_reply_text_fills_the_budget_and_parses_as_reasoning_then_one_call(
    tmp_path: Path,
) -> None:
    from smg.parsers import ChoiceParser, parse_all
    from smg.parsers.registry import reasoning_parser_class, tool_parser_class

    count = gb._counter(gb.make_model_dir(tmp_path / "llama3"))
    text = gb.reply_text("qwen", 256, count)
    assert 240 <= count(text) <= 255  # the EOS is the 256th token
    tool_name, reasoning_name = gb.PARSER_FAMILIES["qwen"]
    parser = ChoiceParser(
        reasoning_parser_class(reasoning_name)(in_reasoning=None),
        tool_parser_class(tool_name)([gb.TOOL]),
    )
    parsed = parse_all(parser, text)
    assert parsed.content.strip() == ""
    assert parsed.reasoning.strip().startswith("The user wants the weather in Reykjavik")
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", gb.CALL_ARGUMENTS)
    ]
    with pytest.raises(ValueError):
        gb.reply_text("nope", 256, count)


def test_parser_mode_flags_reach_both_gateways_and_the_load() -> None:
    args = gb.parse_args(["--parsers", "qwen", "--rust-smg", "/x/smg"])
    mock = gb.Proc("mock", None, "127.0.0.1:9")  # type: ignore[arg-type]
    for name in gb.GATEWAYS:
        argv = gb.gateway_argv(name, args, mock, Path("/m"), 1234)
        i = argv.index("--tool-call-parser")
        assert argv[i : i + 4] == ["--tool-call-parser", "qwen", "--reasoning-parser", "qwen3"]


def test_smg_base_needs_a_source_root(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--smg-base"):
        gb.main(["--gateways", "smg-base", "--smg-base", str(tmp_path)])
    args = gb.parse_args(["--smg-base", str(tmp_path), "--rounds", "2"])
    assert (args.smg_base, args.rounds) == (tmp_path, 2)
