"""The gRPC mock engine (`smg mock-worker --grpc`), driven directly with the raw stubs.

One mock per backend for the module (text mode "Hello there, world. " by default); each
test resets its config and stats through the control port first. The pure stop rules
(grpc_script.py) are tested without a server at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpcmockutil
import pytest
from smg_grpc_proto.generated import (
    common_pb2,
    sglang_scheduler_pb2,
    sglang_scheduler_pb2_grpc,
    vllm_engine_pb2,
    vllm_engine_pb2_grpc,
)
from tokenizers import Tokenizer

from smg.mock_worker.grpc_script import ChoiceScript, Model, OutputMode, Request, StopStrings

TEXT = "Hello there, world. "
EOT, END, EOM = 128009, 128001, 128008  # Llama 3: <|eot_id|> (the tokenizer's), the others
PB = {"vllm": vllm_engine_pb2, "sglang": sglang_scheduler_pb2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grpcmockutil.llama3_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def text_ids(model_dir: Path) -> list[int]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(TEXT, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def mocks(model_dir: Path) -> Iterator[dict[str, grpcmockutil.GrpcMock]]:
    started: dict[str, grpcmockutil.GrpcMock] = {}
    try:
        for backend in ("vllm", "sglang"):
            started[backend] = grpcmockutil.start_grpc_mock(
                model_dir,
                backend=backend,
                args=["--output-mode", f"text:{TEXT}", "--max-context-length", "4096"],
            )
        yield started
    finally:
        for mock in started.values():
            mock.stop()


class Engine:
    """A raw stub of one backend plus helpers that build its requests."""

    def __init__(self, backend: str, mock: grpcmockutil.GrpcMock) -> None:
        self.backend = backend
        self.mock = mock
        self.pb = PB[backend]
        self.channel = grpc.insecure_channel(mock.target)
        stub_cls = (
            vllm_engine_pb2_grpc.VllmEngineStub
            if backend == "vllm"
            else sglang_scheduler_pb2_grpc.SglangSchedulerStub
        )
        self.stub = stub_cls(self.channel)

    def request(
        self,
        rid: str = "r1",
        prompt: list[int] | None = None,
        *,
        stream: bool = True,
        max_tokens: int | None = 6,
        logprobs: int | None = None,
        **sp: Any,
    ) -> Any:
        pb = self.pb
        ids = [1, 2, 3] if prompt is None else prompt
        if self.backend == "vllm":
            params = pb.SamplingParams(n=sp.pop("n", 1), **sp)
            if max_tokens is not None:
                params.max_tokens = max_tokens
            if logprobs is not None:
                params.logprobs = logprobs
            return pb.GenerateRequest(
                request_id=rid,
                tokenized=pb.TokenizedInput(input_ids=ids),
                sampling_params=params,
                stream=stream,
            )
        renames = {"min_tokens": "min_new_tokens"}
        params = pb.SamplingParams(
            n=sp.pop("n", 1), **{renames.get(k, k): v for k, v in sp.items()}
        )
        if max_tokens is not None:
            params.max_new_tokens = max_tokens
        return pb.GenerateRequest(
            request_id=rid,
            tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=params,
            stream=stream,
            return_logprob=logprobs is not None,
            top_logprobs_num=logprobs or 0,
        )

    def generate(self, req: Any, timeout: float = 10.0) -> list[Any]:
        return list(self.stub.Generate(req, timeout=timeout))


@pytest.fixture(params=["vllm", "sglang"])
def engine(
    request: pytest.FixtureRequest, mocks: dict[str, grpcmockutil.GrpcMock]
) -> Iterator[Engine]:
    mock = mocks[request.param]
    mock.reset()
    eng = Engine(request.param, mock)
    try:
        yield eng
    finally:
        eng.channel.close()


def kinds(msgs: list[Any]) -> list[tuple[str, int, list[int]]]:
    out = []
    for m in msgs:
        kind = m.WhichOneof("response")
        part = getattr(m, kind)
        ids = list(part.token_ids) if kind == "chunk" else list(part.output_ids)
        out.append((kind, part.index, ids))
    return out


def completes(msgs: list[Any]) -> list[Any]:
    return [m.complete for m in msgs if m.WhichOneof("response") == "complete"]


# ----------------------------------------------------------------------------- info RPCs


def test_model_info_and_only_its_own_service(engine: Engine, model_dir: Path) -> None:
    info = engine.stub.GetModelInfo(engine.pb.GetModelInfoRequest(), timeout=5)
    assert info.served_model_name == "llama3"
    assert info.max_context_length == 4096
    assert list(info.eos_token_ids) == [EOT, END, EOM]
    assert info.vocab_size == 128256
    assert info.bos_token_id == 128000
    assert info.is_generation is True
    assert info.tokenizer_path == str(model_dir)
    assert json.loads(info.default_sampling_params_json) == {"temperature": 0.6, "top_p": 0.9}
    # The other backend's service is not served: that is how a client detects the backend.
    other = "sglang" if engine.backend == "vllm" else "vllm"
    other_stub = (
        sglang_scheduler_pb2_grpc.SglangSchedulerStub(engine.channel)
        if other == "sglang"
        else vllm_engine_pb2_grpc.VllmEngineStub(engine.channel)
    )
    with pytest.raises(grpc.RpcError) as err:
        other_stub.HealthCheck(PB[other].HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_follows_config(engine: Engine) -> None:
    assert engine.stub.HealthCheck(engine.pb.HealthCheckRequest(), timeout=5).healthy is True
    engine.mock.config(healthy=False)
    assert engine.stub.HealthCheck(engine.pb.HealthCheckRequest(), timeout=5).healthy is False
    assert engine.mock.stats()["requests"]["HealthCheck"] == 2


def test_loads_server_info_and_embed(engine: Engine) -> None:
    engine.mock.config(waiting=3)
    loads = engine.stub.GetLoads(engine.pb.GetLoadsRequest(), timeout=5)
    assert loads.dp_rank_count == 1
    assert [(x.num_running_reqs, x.num_waiting_reqs) for x in loads.loads] == [(0, 3)]
    server = engine.stub.GetServerInfo(engine.pb.GetServerInfoRequest(), timeout=5)
    assert server.server_type == ("vllm-grpc" if engine.backend == "vllm" else "grpc")
    emb = engine.stub.Embed(
        engine.pb.EmbedRequest(
            request_id="e", tokenized=engine.pb.TokenizedInput(input_ids=[5, 6])
        ),
        timeout=5,
    )
    assert (emb.prompt_tokens, emb.embedding_dim, len(emb.embedding)) == (2, 16, 16)
    assert abs(sum(v * v for v in emb.embedding) - 1.0) < 1e-5


def test_tokenizer_bundle(engine: Engine, model_dir: Path) -> None:
    chunks = list(engine.stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=10))
    data = b"".join(c.data for c in chunks)
    assert [c.sha256 for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(len(c.data) <= 64 * 1024 for c in chunks)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        assert zf.read("tokenizer.json") == (model_dir / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------- Generate shapes


def test_vllm_stream_chunks_then_complete_repeating_the_last_delta(
    mocks: dict[str, grpcmockutil.GrpcMock], text_ids: list[int]
) -> None:
    eng = Engine("vllm", mocks["vllm"])
    eng.mock.reset()
    msgs = eng.generate(eng.request(n=2, max_tokens=3))
    a, b, c = text_ids[:3]
    assert kinds(msgs) == [
        ("chunk", 0, [a]), ("chunk", 1, [a]),
        ("chunk", 0, [b]), ("chunk", 1, [b]),
        ("chunk", 0, [c]), ("complete", 0, [c]),
        ("chunk", 1, [c]), ("complete", 1, [c]),
    ]  # fmt: skip
    chunks = [m.chunk for m in msgs if m.WhichOneof("response") == "chunk"]
    assert {(x.prompt_tokens, x.completion_tokens, x.cached_tokens) for x in chunks} == {(3, 1, 0)}
    done = completes(msgs)
    assert [(x.finish_reason, x.completion_tokens, x.prompt_tokens) for x in done] == [
        ("length", 1, 3),
        ("length", 1, 3),
    ]
    assert [x.WhichOneof("matched_stop") for x in done] == [None, None]


def test_sglang_stream_counts_cumulative_and_names_the_request(
    mocks: dict[str, grpcmockutil.GrpcMock], text_ids: list[int]
) -> None:
    eng = Engine("sglang", mocks["sglang"])
    eng.mock.reset()
    msgs = eng.generate(eng.request("sg-1", max_tokens=3))
    a, b, c = text_ids[:3]
    assert kinds(msgs) == [
        ("chunk", 0, [a]),
        ("chunk", 0, [b]),
        ("chunk", 0, [c]),
        ("complete", 0, [c]),
    ]
    assert {m.request_id for m in msgs} == {"sg-1"}
    assert [m.chunk.completion_tokens for m in msgs[:3]] == [1, 2, 3]
    assert (msgs[3].complete.completion_tokens, msgs[3].complete.finish_reason) == (3, "length")


def test_non_stream_one_complete_per_choice_with_every_token(
    engine: Engine, text_ids: list[int]
) -> None:
    msgs = engine.generate(engine.request(n=2, max_tokens=4, stream=False))
    # SGLang's request manager numbers choices only when streaming: every Complete says 0.
    indexes = [0, 1] if engine.backend == "vllm" else [0, 0]
    assert kinds(msgs) == [("complete", i, text_ids[:4]) for i in indexes]
    assert [(x.completion_tokens, x.finish_reason) for x in completes(msgs)] == [(4, "length")] * 2


def test_max_tokens_absent_runs_to_the_context_end(engine: Engine) -> None:
    msgs = engine.generate(
        engine.request(prompt=list(range(1, 4091)), max_tokens=None, stream=False)
    )
    (done,) = completes(msgs)
    assert (len(done.output_ids), done.finish_reason) == (6, "length")  # 4096 - 4090


# ----------------------------------------------------------------------------- stop rules


def test_eos_after(engine: Engine, text_ids: list[int]) -> None:
    engine.mock.config(eos_after=2)
    (done,) = completes(engine.generate(engine.request(max_tokens=10, stream=False)))
    assert list(done.output_ids) == [*text_ids[:2], EOT]
    assert done.finish_reason == "stop"
    # vLLM: the tokenizer's own EOS reports no matched stop; SGLang names the token.
    if engine.backend == "vllm":
        assert done.WhichOneof("matched_stop") is None
    else:
        assert done.matched_token_id == EOT
    (ignored,) = completes(
        engine.generate(engine.request(max_tokens=5, stream=False, ignore_eos=True))
    )
    assert (list(ignored.output_ids), ignored.finish_reason) == (text_ids[:5], "length")


def test_reply_once_as_plain_text_then_eos(engine: Engine, model_dir: Path) -> None:
    reply = '<|python_tag|>{"name": "f"}'  # a special token's spelling stays plain text
    engine.mock.reply(reply)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    msgs = engine.generate(engine.request(max_tokens=50, stream=True))
    streamed = [ids for kind, _, ids in kinds(msgs) if kind == "chunk"]
    assert all(len(ids) == 1 for ids in streamed)  # one token per message
    (done,) = completes(msgs)
    out = [i for ids in streamed for i in ids]
    assert out[-1] == EOT and tok.decode(out[:-1], skip_special_tokens=True) == reply
    assert done.finish_reason == "stop"
    (short,) = completes(engine.generate(engine.request(max_tokens=3, stream=False)))
    assert (len(short.output_ids), short.finish_reason) == (3, "length")


def test_stop_token_ids_and_min_tokens(engine: Engine, text_ids: list[int]) -> None:
    comma = text_ids[2]
    (done,) = completes(
        engine.generate(engine.request(max_tokens=20, stream=False, stop_token_ids=[comma]))
    )
    assert (list(done.output_ids), done.finish_reason, done.matched_token_id) == (
        text_ids[:3],
        "stop",
        comma,
    )
    # min_tokens 3: the stop id at position 3 does not count; the next one (9) does.
    (late,) = completes(
        engine.generate(
            engine.request(max_tokens=20, stream=False, stop_token_ids=[comma], min_tokens=3)
        )
    )
    assert list(late.output_ids) == (text_ids * 2)[:9]
    assert late.matched_token_id == comma


def test_other_eos_ids_stop_unless_ignore_eos(engine: Engine) -> None:
    engine.mock.config(output_mode="echo")
    prompt = [9906, EOM, 1070]
    (done,) = completes(engine.generate(engine.request(prompt=prompt, max_tokens=6, stream=False)))
    assert (list(done.output_ids), done.finish_reason, done.matched_token_id) == (
        [9906, EOM],
        "stop",
        EOM,
    )
    (ignored,) = completes(
        engine.generate(engine.request(prompt=prompt, max_tokens=4, stream=False, ignore_eos=True))
    )
    assert (list(ignored.output_ids), ignored.finish_reason) == ([9906, EOM, 1070, 9906], "length")


def test_stop_strings_decoded_across_tokens(engine: Engine, text_ids: list[int]) -> None:
    msgs = engine.generate(engine.request(max_tokens=20, stop=["ere, wo"]))
    (done,) = completes(msgs)
    # " world" (the 4th token) completes "ere, wo"; the token stays in the output.
    assert [k for k in kinds(msgs) if k[0] == "chunk"] == [("chunk", 0, [t]) for t in text_ids[:4]]
    assert (done.finish_reason, done.matched_stop_str) == ("stop", "ere, wo")


# ----------------------------------------------------------------------------- output modes, logprobs


def test_random_mode_is_seeded_and_plain(mocks: dict[str, grpcmockutil.GrpcMock]) -> None:
    eng = Engine("vllm", mocks["vllm"])
    eng.mock.reset()
    eng.mock.config(output_mode="random")

    def run(seed: int) -> list[int]:
        (done,) = completes(eng.generate(eng.request(max_tokens=32, stream=False, seed=seed)))
        return list(done.output_ids)

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    assert all(0 <= t < 128000 for t in first + other)  # no special tokens
    eng.channel.close()


def test_logprobs(engine: Engine, text_ids: list[int]) -> None:
    msgs = engine.generate(engine.request(max_tokens=2, logprobs=2))
    first = msgs[0].chunk.output_logprobs
    t = text_ids[0]
    assert list(first.token_ids) == [t]
    assert list(first.token_logprobs) == [pytest.approx(-((t % 100) + 1) / 100)]
    (top,) = first.top_logprobs
    # vLLM lists the sampled token first, then the best others; SGLang the top k alone.
    expect = [t, t + 1] if engine.backend == "vllm" else [t + 1, t + 2]
    assert list(top.token_ids) == expect


# ----------------------------------------------------------------------------- control, faults, abort


def test_fail_before_the_first_token_then_recover(engine: Engine, text_ids: list[int]) -> None:
    engine.mock.config(fail_next=1, fail_code="UNAVAILABLE", fail_message="boom")
    with pytest.raises(grpc.RpcError) as err:
        engine.generate(engine.request())
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, "boom")
    assert [k[2] for k in kinds(engine.generate(engine.request(max_tokens=2)))] == [
        [text_ids[0]],
        [text_ids[1]],
        [text_ids[1]],
    ]
    assert engine.mock.stats()["failed"] == 1


def test_fail_after_tokens(engine: Engine) -> None:
    engine.mock.config(fail_next=1, fail_code="RESOURCE_EXHAUSTED", fail_after_tokens=2)
    got: list[Any] = []
    with pytest.raises(grpc.RpcError) as err:
        for msg in engine.stub.Generate(engine.request(max_tokens=10), timeout=10):
            got.append(msg)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [m.WhichOneof("response") for m in got] == ["chunk", "chunk"]


def test_stats_record_the_request_and_its_constraint(engine: Engine) -> None:
    req = engine.request("rec-1", max_tokens=2, json_schema='{"type": "object"}')
    engine.generate(req)
    stats = engine.mock.stats()
    assert stats["constraint"] == {"kind": "json_schema", "value": '{"type": "object"}'}
    last = stats["last_generate_request"]
    assert last["request_id"] == "rec-1"
    assert last["tokenized"]["input_ids"] == [1, 2, 3]
    assert (stats["generate"], stats["completed"], stats["in_flight"]) == (1, 1, 0)


def test_abort_ends_the_stream_with_abort(engine: Engine) -> None:
    engine.mock.config(itl_ms=50)
    req = engine.request("ab-1", max_tokens=200)
    stream = engine.stub.Generate(req, timeout=20)
    first = next(stream)
    assert first.WhichOneof("response") == "chunk"
    if engine.backend == "vllm":
        engine.stub.Abort(engine.pb.AbortRequest(request_ids=["ab-1"]), timeout=5)
    else:
        answer = engine.stub.Abort(engine.pb.AbortRequest(request_id="ab-1"), timeout=5)
        assert answer.success is True
    rest = list(stream)
    done = completes(rest)
    assert [(x.finish_reason, list(x.output_ids)) for x in done] == [("abort", [])]
    assert len(rest) < 50
    stats = engine.mock.stats()
    assert stats["aborted"] == ["ab-1"]


def test_client_cancel_is_recorded(engine: Engine) -> None:
    engine.mock.config(itl_ms=50)
    stream = engine.stub.Generate(engine.request("cx-1", max_tokens=200), timeout=20)
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 5
    while engine.mock.stats()["cancelled"] != ["cx-1"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.mock.stats()
    assert (stats["cancelled"], stats["in_flight"]) == (["cx-1"], 0)


def test_pace(engine: Engine) -> None:
    engine.mock.config(ttft_ms=150, itl_ms=30)
    start = time.monotonic()
    stamps = []
    for _ in engine.stub.Generate(engine.request(max_tokens=6), timeout=10):
        stamps.append(time.monotonic() - start)
    assert stamps[0] >= 0.15
    assert stamps[-1] >= 0.15 + 5 * 0.03
    assert stamps[-1] < 5.0


def test_bad_prompts_are_invalid_argument(engine: Engine) -> None:
    for prompt in ([], list(range(4096))):
        with pytest.raises(grpc.RpcError) as err:
            engine.generate(engine.request(prompt=prompt))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_control_rejects_bad_config(engine: Engine) -> None:
    from mockutil import request_json

    status, body = request_json("POST", engine.mock.control + "/config", {"fail_code": "NOPE"})
    assert (status, body["error"].startswith("fail_code must be")) == (400, True)
    status, body = request_json("POST", engine.mock.control + "/config", {"speed": 1})
    assert status == 400


# ----------------------------------------------------------------------------- other processes


def test_prefix_cache_reports_cached_tokens(model_dir: Path) -> None:
    with grpcmockutil.start_grpc_mock(model_dir, args=["--prefix-cache-tokens", "4096"]) as mock:
        eng = Engine("vllm", mock)
        prompt = list(range(100, 140))  # 40 tokens: two full 16-token blocks of the first 39
        first = completes(eng.generate(eng.request(prompt=prompt, max_tokens=1, stream=False)))[0]
        second = completes(eng.generate(eng.request(prompt=prompt, max_tokens=1, stream=False)))[0]
        assert (first.cached_tokens, second.cached_tokens) == (0, 32)
        eng.channel.close()


def test_several_processes_share_one_port(model_dir: Path) -> None:
    with grpcmockutil.start_grpc_mock(
        model_dir, backend="sglang", args=["--processes", "2", "--itl-ms", "20"], control=False
    ) as mock:
        results: list[int] = []

        def one(i: int) -> None:
            eng = Engine("sglang", mock)
            msgs = eng.generate(eng.request(f"p{i}", max_tokens=5))
            results.append(len(msgs))
            eng.channel.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [6] * 8
        assert mock.stop() == 0


# ----------------------------------------------------------------------------- pure script


class Chars:
    """A fake decoder: token i is chr(i); 0 is a 'special' token that decodes to ''."""

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join("" if i == 0 and skip_special_tokens else chr(i) for i in ids)


def _model(backend: str) -> Model:
    return Model(
        backend,
        1000,
        primary_eos=0,
        eos_ids=frozenset({0, 1}),
        random_pool=range(2, 1000),
        context_length=100,
    )


def test_stop_strings_pure() -> None:
    s = StopStrings(Chars(), ["cd", "xyz"], True)
    assert [s.add(ord(c)) for c in "abcd"] == [None, None, None, "cd"]
    assert s.text == "abcd"


@pytest.mark.parametrize(
    ("backend", "req", "tokens", "finish", "matched"),
    [
        ("vllm", Request("a", [5], max_tokens=9), [5, 6, 0], "stop", None),
        ("sglang", Request("a", [5], max_tokens=9), [5, 6, 0], "stop", 0),
        (
            "vllm",
            Request("a", [5], max_tokens=9, stop_token_ids=[6], ignore_eos=True),
            [5, 6],
            "stop",
            6,
        ),
        (
            "sglang",
            Request("a", [5], max_tokens=3, stop_token_ids=[6], ignore_eos=True),
            [5, 6, 0],
            "length",
            None,
        ),
        ("vllm", Request("a", [5], max_tokens=9, min_tokens=3), [5, 6, 0, 5, 6, 0], "stop", None),
    ],
)
def test_choice_script_rules(
    backend: str, req: Request, tokens: list[int], finish: str, matched: Any
) -> None:
    script = ChoiceScript(0, req, _model(backend), OutputMode("text", (5, 6, 0)), Chars())
    while not script.finished:
        script.step()
    assert (script.tokens, script.finish_reason, script.matched) == (tokens, finish, matched)


# ----------------------------------------------------------------------------- the two servers


def test_grpc_aio_reference_server_sends_the_same_messages(
    model_dir: Path, mocks: dict[str, grpcmockutil.GrpcMock]
) -> None:
    """--grpc-impl aio (grpc.aio) and the default fast HTTP/2 server answer alike."""
    for backend in ("vllm", "sglang"):
        mocks[backend].reset()
        args = [
            "--output-mode",
            f"text:{TEXT}",
            "--max-context-length",
            "4096",
            "--grpc-impl",
            "aio",
        ]
        with grpcmockutil.start_grpc_mock(model_dir, backend=backend, args=args) as ref:
            fast, aio = Engine(backend, mocks[backend]), Engine(backend, ref)
            for req in (
                fast.request("x", n=2, max_tokens=3, logprobs=1),
                fast.request("w", n=3, max_tokens=3),  # the hand-encoded chunks
                fast.request("y", max_tokens=4, stream=False, stop=["ere, wo"]),
            ):
                assert aio.generate(req) == fast.generate(req)
            for eng in (fast, aio):
                with pytest.raises(grpc.RpcError) as err:
                    eng.generate(eng.request(prompt=[]))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                eng.channel.close()


def test_large_request_and_response_cross_the_flow_control_windows(model_dir: Path) -> None:
    args = ["--max-context-length", "200000", "--output-mode", "echo"]
    with grpcmockutil.start_grpc_mock(model_dir, args=args) as mock:
        eng = Engine("vllm", mock)
        prompt = [100000 + i % 20000 for i in range(60000)]  # ~180 KB: many DATA frames
        (done,) = completes(
            eng.generate(eng.request(prompt=prompt, max_tokens=30000, stream=False, logprobs=3))
        )
        # ~1.3 MB answer: beyond the 64 KiB default stream and connection windows.
        assert list(done.output_ids) == prompt[:30000]
        assert len(done.output_logprobs.top_logprobs) == 30000
        msgs = eng.generate(eng.request(prompt=prompt, max_tokens=3000), timeout=30)
        assert [m.chunk.token_ids[0] for m in msgs[:-1]] == prompt[:3000]
        assert mock.stats()["requests"]["Generate"] == 2
        eng.channel.close()


def test_garbage_on_the_wire_closes_only_that_connection(engine: Engine) -> None:
    import socket

    from smg.mock_worker.h2fast import PREFACE, frame

    host, port = engine.mock.target.rsplit(":", 1)
    for junk in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 16,  # not HTTP/2
        PREFACE + frame(1, 0x5, 1, b"\xff\xff\xff\xff\xff"),  # HEADERS with a broken HPACK block
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        if junk.startswith(PREFACE):
            # SETTINGS, WINDOW_UPDATE, then GOAWAY (type 7) with COMPRESSION_ERROR (9)
            assert got[-17:-8] == frame(7, 0, 0, b"\x00" * 8)[:9]
            assert got[-4:] == b"\x00\x00\x00\x09"
    assert engine.stub.HealthCheck(engine.pb.HealthCheckRequest(), timeout=5).healthy is True


def test_reply_file_flag(tmp_path: Path) -> None:
    from smg.mock_worker.grpc_options import parse_grpc_options

    reply = tmp_path / "reply.txt"
    reply.write_text("<think>hm</think>ok\n", "utf-8")
    base = ["--grpc", "--tokenizer-path", "x"]
    opts = parse_grpc_options([*base, "--reply-file", str(reply)])
    assert opts.output_mode == "reply:<think>hm</think>ok\n"
    with pytest.raises(SystemExit):
        parse_grpc_options([*base, "--reply-file", str(tmp_path / "missing.txt")])
