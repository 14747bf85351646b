"""smg.grpc.protos with in-memory proto messages: request building per backend, response
parsing, the stream normalisation, model info and loads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import vllm_engine_pb2 as vll

from smg.grpc.protos import (
    GRPC_STATUS_HTTP,
    StreamNormalizer,
    build_abort_request,
    build_generate_request,
    chunk_output,
    http_status_for,
    load_from,
    model_info_from,
    output_from,
)
from smg.grpc.types import EngineOutput, GenerateInput, SamplingParams, TokenLogprob
from smg.policies.base import BackendLoad


def _input(**sampling: object) -> GenerateInput:
    return GenerateInput(
        request_id="req-1",
        input_ids=[1, 2, 3],
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        stream=True,
        text="hi",
    )


# --- requests: defaults --------------------------------------------------------------------


def test_vllm_defaults_are_explicit() -> None:
    req = build_generate_request("vllm", _input())
    assert isinstance(req, vll.GenerateRequest)
    assert req.request_id == "req-1"
    assert list(req.tokenized.input_ids) == [1, 2, 3]
    assert req.tokenized.original_text == "hi"
    assert req.stream is True
    p = req.sampling_params
    assert p.HasField("temperature") and p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0  # -1 (off) -> vLLM's 0 (off)
    assert p.repetition_penalty == 1.0
    assert p.n == 1
    assert p.skip_special_tokens is True
    assert p.spaces_between_special_tokens is True
    assert not p.HasField("max_tokens")
    assert not p.HasField("logprobs")
    assert not p.HasField("seed")
    assert p.WhichOneof("constraint") is None


def test_sglang_defaults_are_explicit() -> None:
    req = build_generate_request("sglang", _input())
    assert isinstance(req, sgl.GenerateRequest)
    p = req.sampling_params
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.repetition_penalty == 1.0
    assert p.n == 1
    assert p.skip_special_tokens is True
    assert not p.HasField("max_new_tokens")
    assert req.return_logprob is False
    assert req.top_logprobs_num == 0
    assert req.logprob_start_len == -1
    assert req.stream is True


def test_temperature_zero_is_sent_to_vllm() -> None:
    p = build_generate_request("vllm", _input(temperature=0.0)).sampling_params
    assert p.HasField("temperature") and p.temperature == 0.0


# --- requests: every field ------------------------------------------------------------------


FULL = dict(
    temperature=0.5,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    frequency_penalty=0.25,
    presence_penalty=0.5,
    repetition_penalty=1.25,
    max_tokens=64,
    min_tokens=3,
    stop=["</s>", "END"],
    stop_token_ids=[7, 9],
    ignore_eos=True,
    skip_special_tokens=False,
    spaces_between_special_tokens=False,
    include_stop_str_in_output=True,
    n=3,
    seed=1234,
    logprobs=5,
    logit_bias={50: -100.0, 7: 2.5},
)


def test_vllm_every_field() -> None:
    p = build_generate_request("vllm", _input(**FULL)).sampling_params
    assert p.temperature == 0.5
    assert p.top_p == pytest.approx(0.9)
    assert p.top_k == 40
    assert p.min_p == pytest.approx(0.05)
    assert p.frequency_penalty == 0.25
    assert p.presence_penalty == 0.5
    assert p.repetition_penalty == 1.25
    assert p.max_tokens == 64
    assert p.min_tokens == 3
    assert list(p.stop) == ["</s>", "END"]
    assert list(p.stop_token_ids) == [7, 9]
    assert p.ignore_eos is True
    assert p.skip_special_tokens is False
    assert p.spaces_between_special_tokens is False
    assert p.include_stop_str_in_output is True
    assert p.n == 3
    assert p.seed == 1234
    assert p.logprobs == 5
    assert dict(p.logit_bias) == {50: -100.0, 7: 2.5}


def test_sglang_every_field() -> None:
    req = build_generate_request("sglang", _input(**FULL))
    p = req.sampling_params
    assert p.temperature == 0.5
    assert p.top_p == pytest.approx(0.9)
    assert p.top_k == 40
    assert p.min_p == pytest.approx(0.05)
    assert p.frequency_penalty == 0.25
    assert p.presence_penalty == 0.5
    assert p.repetition_penalty == 1.25
    assert p.spaces_between_special_tokens is False
    assert p.max_new_tokens == 64
    assert p.min_new_tokens == 3
    assert list(p.stop) == ["</s>", "END"]
    assert list(p.stop_token_ids) == [7, 9]
    assert p.ignore_eos is True
    assert p.skip_special_tokens is False
    assert p.no_stop_trim is True
    assert p.n == 3
    assert dict(p.logit_bias) == {"50": -100.0, "7": 2.5}  # SGLang keys are strings
    assert req.return_logprob is True
    assert req.top_logprobs_num == 5
    assert req.logprob_start_len == -1
    # No seed field in the SGLang proto: nothing carries it.
    assert "seed" not in sgl.SamplingParams.DESCRIPTOR.fields_by_name


def test_logprobs_zero_means_chosen_token_only() -> None:
    assert build_generate_request("vllm", _input(logprobs=0)).sampling_params.logprobs == 0
    assert build_generate_request("vllm", _input(logprobs=0)).sampling_params.HasField("logprobs")
    req = build_generate_request("sglang", _input(logprobs=0))
    assert (req.return_logprob, req.top_logprobs_num) == (True, 0)


def test_seed_is_clamped_to_int32() -> None:
    p = build_generate_request("vllm", _input(seed=2**40)).sampling_params
    assert p.seed == 2**31 - 1
    p = build_generate_request("vllm", _input(seed=-(2**40))).sampling_params
    assert p.seed == -(2**31)


def test_top_k_zero_is_off_on_both() -> None:
    assert build_generate_request("vllm", _input(top_k=0)).sampling_params.top_k == 0
    assert build_generate_request("sglang", _input(top_k=0)).sampling_params.top_k == -1


@pytest.mark.parametrize(
    ("constraint", "vllm_field", "vllm_value", "sglang_field", "sglang_value"),
    [
        (("json_schema", '{"type":"string"}'), "json_schema", '{"type":"string"}', "json_schema",
         '{"type":"string"}'),
        (("json_schema", {"type": "integer"}), "json_schema", '{"type": "integer"}', "json_schema",
         '{"type": "integer"}'),
        (("json_object", None), "json_object", True, "json_schema", '{"type":"object"}'),
        (("regex", "[a-z]+"), "regex", "[a-z]+", "regex", "[a-z]+"),
        (("ebnf", 'root ::= "a"'), "grammar", 'root ::= "a"', "ebnf_grammar", 'root ::= "a"'),
        (("structural_tag", '{"x":1}'), "structural_tag", '{"x":1}', "structural_tag",
         '{"x":1}'),
    ],
)  # fmt: skip
def test_constraints(
    constraint: tuple[str, object],
    vllm_field: str,
    vllm_value: object,
    sglang_field: str,
    sglang_value: object,
) -> None:
    p = build_generate_request("vllm", _input(constraint=constraint)).sampling_params
    assert p.WhichOneof("constraint") == vllm_field
    assert getattr(p, vllm_field) == vllm_value
    q = build_generate_request("sglang", _input(constraint=constraint)).sampling_params
    assert q.WhichOneof("constraint") == sglang_field
    assert getattr(q, sglang_field) == sglang_value


def test_choice_constraint() -> None:
    p = build_generate_request("vllm", _input(constraint=("choice", ["yes", "no"])))
    assert list(p.sampling_params.choice.choices) == ["yes", "no"]
    q = build_generate_request("sglang", _input(constraint=("choice", ["a.b", "c|d"])))
    assert q.sampling_params.regex == r"(a\.b|c\|d)"


def test_unknown_backend_and_constraint() -> None:
    with pytest.raises(ValueError, match="unknown gRPC backend"):
        build_generate_request("trtllm", _input())
    with pytest.raises(ValueError, match="unknown constraint kind"):
        build_generate_request("vllm", _input(constraint=("lark", "x")))


def test_abort_requests() -> None:
    assert list(build_abort_request("vllm", ["a", "b"]).request_ids) == ["a", "b"]
    assert build_abort_request("sglang", ["a"]).request_id == "a"


def test_request_round_trips_through_the_wire() -> None:
    req = build_generate_request("vllm", _input(**FULL, constraint=("json_object", None)))
    back = vll.GenerateRequest.FromString(req.SerializeToString())
    assert back.sampling_params.repetition_penalty == 1.25
    assert back.sampling_params.json_object is True


# --- responses ------------------------------------------------------------------------------


def _vllm_chunk(ids: list[int], index: int = 0, **kw: object) -> vll.GenerateResponse:
    return vll.GenerateResponse(chunk=vll.GenerateStreamChunk(token_ids=ids, index=index, **kw))


def _vllm_complete(ids: list[int], index: int = 0, **kw: object) -> vll.GenerateResponse:
    return vll.GenerateResponse(complete=vll.GenerateComplete(output_ids=ids, index=index, **kw))


def test_output_from_vllm_chunk_with_logprobs() -> None:
    resp = _vllm_chunk(
        [11, 12],
        index=1,
        prompt_tokens=3,
        completion_tokens=2,
        cached_tokens=1,
        output_logprobs=vll.OutputLogProbs(
            token_logprobs=[-0.5, -1.5],
            token_ids=[11, 12],
            top_logprobs=[
                vll.TopLogProbs(values=[-0.5, -2.0], token_ids=[11, 13]),
                vll.TopLogProbs(values=[-1.5, -1.75], token_ids=[12, 14]),
            ],
        ),
    )
    out = output_from("vllm", resp)
    assert out == EngineOutput(
        index=1,
        token_ids=[11, 12],
        prompt_tokens=3,
        completion_tokens=2,
        cached_tokens=1,
        logprobs=[
            TokenLogprob(11, -0.5, [(11, -0.5), (13, -2.0)]),
            TokenLogprob(12, -1.5, [(12, -1.5), (14, -1.75)]),
        ],
    )


def test_output_from_complete_with_matched_stop() -> None:
    out = output_from(
        "vllm", _vllm_complete([5], finish_reason="stop", prompt_tokens=3, matched_token_id=128009)
    )
    assert out.finished is True
    assert out.finish_reason == "stop"
    assert out.matched_stop == 128009
    assert out.logprobs is None
    resp = sgl.GenerateResponse(
        request_id="r",
        complete=sgl.GenerateComplete(
            output_ids=[1], finish_reason="length", completion_tokens=4, matched_stop_str="END"
        ),
    )
    out = output_from("sglang", resp)
    assert (out.finish_reason, out.matched_stop, out.completion_tokens) == ("length", "END", 4)
    empty = output_from("vllm", vll.GenerateResponse())
    assert empty == EngineOutput(index=0, token_ids=[])


def _run(backend: str, responses: list[object]) -> list[EngineOutput]:
    norm = StreamNormalizer()
    outs = [norm.feed(output_from(backend, r)) for r in responses]
    return [o for o in outs if o is not None]


def test_vllm_stream_complete_repeats_last_delta() -> None:
    # What vllm/servicer.py sends with stream=True: per-chunk counts, then a complete
    # built from the last delta (same tokens as the last chunk, its count).
    outs = _run(
        "vllm",
        [
            _vllm_chunk([10], prompt_tokens=3, completion_tokens=1),
            _vllm_chunk([11, 12], prompt_tokens=3, completion_tokens=2),
            _vllm_chunk([13], prompt_tokens=3, completion_tokens=1),
            _vllm_complete([13], finish_reason="length", prompt_tokens=3, completion_tokens=1),
        ],
    )
    assert [o.token_ids for o in outs] == [[10], [11, 12], [13], []]
    assert [o.completion_tokens for o in outs] == [1, 3, 4, 4]
    assert outs[-1].finished and outs[-1].finish_reason == "length"


def test_sglang_stream_complete_repeats_last_delta_with_logprobs() -> None:
    def chunk(ids: list[int], total: int) -> sgl.GenerateResponse:
        lp = sgl.OutputLogProbs(token_logprobs=[-1.0] * len(ids), token_ids=ids)
        return sgl.GenerateResponse(
            chunk=sgl.GenerateStreamChunk(
                token_ids=ids, completion_tokens=total, output_logprobs=lp
            )
        )

    lp = sgl.OutputLogProbs(token_logprobs=[-1.0], token_ids=[22])
    outs = _run(
        "sglang",
        [
            chunk([20, 21], 2),
            chunk([22], 3),
            sgl.GenerateResponse(
                complete=sgl.GenerateComplete(
                    output_ids=[22], completion_tokens=3, finish_reason="stop", output_logprobs=lp
                )
            ),
        ],
    )
    assert [o.token_ids for o in outs] == [[20, 21], [22], []]
    assert outs[-1].logprobs is None
    assert [o.completion_tokens for o in outs] == [2, 3, 3]


def test_complete_repeating_everything_or_adding_tokens() -> None:
    outs = _run("vllm", [_vllm_chunk([1, 2]), _vllm_chunk([3]), _vllm_complete([1, 2, 3])])
    assert outs[-1].token_ids == []
    outs = _run("vllm", [_vllm_chunk([1, 2]), _vllm_complete([1, 2, 3, 4])])
    assert outs[-1].token_ids == [3, 4]
    assert outs[-1].completion_tokens == 4


def test_non_streaming_complete_carries_everything() -> None:
    outs = _run("vllm", [_vllm_complete([1, 2, 3], completion_tokens=3, finish_reason="stop")])
    assert [o.token_ids for o in outs] == [[1, 2, 3]]
    assert outs[0].completion_tokens == 3


def test_n2_interleaved_choices_and_nothing_after_complete() -> None:
    outs = _run(
        "vllm",
        [
            _vllm_chunk([1], index=0),
            _vllm_chunk([9], index=1),
            _vllm_chunk([2], index=0),
            _vllm_complete([2], index=0, finish_reason="stop"),
            _vllm_chunk([8], index=1),
            _vllm_complete([8], index=1, finish_reason="length"),
            _vllm_chunk([7], index=1),  # after its complete: dropped
        ],
    )
    by_index: dict[int, list[int]] = {0: [], 1: []}
    for o in outs:
        by_index[o.index].extend(o.token_ids)
    assert by_index == {0: [1, 2], 1: [9, 8]}
    assert [(o.index, o.finish_reason) for o in outs if o.finished] == [(0, "stop"), (1, "length")]


def test_sglang_non_streaming_n2_completes_all_say_index_0() -> None:
    # sglang/request_manager.py sets "index" only when streaming: the batch of n
    # completes reaches the client numbered 0, 0, ... in choice order.
    def complete(ids: list[int]) -> sgl.GenerateResponse:
        return sgl.GenerateResponse(
            complete=sgl.GenerateComplete(output_ids=ids, finish_reason="stop", index=0)
        )

    outs = _run("sglang", [complete([1, 2]), complete([3]), complete([4, 5, 6])])
    assert [(o.index, o.token_ids, o.completion_tokens) for o in outs] == [
        (0, [1, 2], 2),
        (1, [3], 1),
        (2, [4, 5, 6], 3),
    ]


# --- model info and loads -------------------------------------------------------------------


def test_model_info_from_vllm() -> None:
    info = model_info_from(
        "vllm",
        vll.GetModelInfoResponse(
            model_path="/m/llama",
            served_model_name="llama",
            max_context_length=8192,
            max_req_input_len=8192,
            vocab_size=128256,
            eos_token_ids=[128001, 128008, 128009],
            bos_token_id=128000,
            is_generation=True,
            default_sampling_params_json='{"temperature": 0.6}',
        ),
        vll.GetServerInfoResponse(server_type="vllm-grpc"),
    )
    assert info.backend == "vllm"
    assert info.served_model_name == "llama"
    assert info.model_path == "/m/llama"
    assert info.max_context_length == 8192
    assert info.eos_token_ids == (128001, 128008, 128009)
    assert info.bos_token_id == 128000
    assert info.default_sampling_params_json == '{"temperature": 0.6}'
    assert info.tokenizer_dir == ""


def test_model_info_from_sglang_falls_back_to_preferred_params() -> None:
    info = model_info_from(
        "sglang",
        sgl.GetModelInfoResponse(
            model_path="/m/q", max_context_length=4096, preferred_sampling_params='{"top_k": 20}'
        ),
        None,
    )
    assert (info.backend, info.max_context_length) == ("sglang", 4096)
    assert info.default_sampling_params_json == '{"top_k": 20}'


def test_load_from_sums_ranks() -> None:
    loads = sgl.GetLoadsResponse(
        loads=[
            sgl.SchedulerLoad(
                num_running_reqs=3,
                num_waiting_reqs=2,
                token_usage=0.5,
                gen_throughput=100.0,
                num_waiting_uncached_tokens=40,
            ),
            sgl.SchedulerLoad(num_running_reqs=1, num_waiting_reqs=0, token_usage=0.25),
        ]
    )
    assert load_from("sglang", loads) == BackendLoad(
        running=4, waiting=2, token_usage=0.375, throughput=100.0, waiting_tokens=40, valid=True
    )
    assert load_from("vllm", vll.GetLoadsResponse()) == BackendLoad()


def test_status_mapping_is_the_rust_smgs() -> None:
    assert GRPC_STATUS_HTTP["INVALID_ARGUMENT"][0] == 400
    assert GRPC_STATUS_HTTP["RESOURCE_EXHAUSTED"][0] == 429
    assert GRPC_STATUS_HTTP["UNAVAILABLE"][0] == 503
    assert GRPC_STATUS_HTTP["DEADLINE_EXCEEDED"][0] == 504
    assert GRPC_STATUS_HTTP["UNIMPLEMENTED"][0] == 501
    assert GRPC_STATUS_HTTP["ABORTED"][0] == 409
    assert GRPC_STATUS_HTTP["CANCELLED"][0] == 400
    assert http_status_for("INTERNAL") == (500, "start_generation_failed")
    assert http_status_for("NO_SUCH_CODE") == (500, "start_generation_failed")


# --- chunk_output: the streamed chunk read from its bytes ----------------------------------


def _chunk_bytes(backend: str, ids: list[int], **kw: object) -> bytes:
    pb = vll if backend == "vllm" else sgl
    extra = {"request_id": "rid-1"} if backend == "sglang" else {}
    return pb.GenerateResponse(  # type: ignore[attr-defined]
        chunk=pb.GenerateStreamChunk(token_ids=ids, **kw), **extra
    ).SerializeToString()


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_chunk_output_equals_output_from(backend: str) -> None:
    pb = vll if backend == "vllm" else sgl
    cases: list[tuple[list[int], dict[str, object]]] = [
        ([128000], {"prompt_tokens": 1024, "completion_tokens": 1}),
        ([0, 127, 128, 16383, 16384, 2**32 - 1], {"cached_tokens": 300, "index": 3}),
        ([], {}),
        ([5, 6], {"prompt_tokens": 2**31, "completion_tokens": 2, "index": 1}),
    ]
    if backend == "sglang":
        cases.append(([9], {"reasoning_tokens": 4, "completion_tokens": 7}))
    for ids, kw in cases:
        data = _chunk_bytes(backend, ids, **kw)
        fast = chunk_output(backend, data)
        assert fast == output_from(backend, pb.GenerateResponse.FromString(data))
        assert fast is not None and fast.token_ids == ids


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_chunk_output_leaves_other_messages_to_protobuf(backend: str) -> None:
    pb = vll if backend == "vllm" else sgl
    with_logprobs = _chunk_bytes(
        backend,
        [11],
        output_logprobs=pb.OutputLogProbs(token_logprobs=[-0.5], token_ids=[11]),
    )
    complete = pb.GenerateResponse(
        complete=pb.GenerateComplete(output_ids=[1], finish_reason="stop")
    ).SerializeToString()
    two_chunks = _chunk_bytes(backend, [1]) + _chunk_bytes(backend, [2])
    unpacked = bytes([0x0A if backend == "vllm" else 0x12, 2, 0x08, 7])  # token_ids unpacked
    for data in (with_logprobs, complete, two_chunks, b"", b"\x0a", b"\x0a\x05\x08"):
        assert chunk_output(backend, data) is None
    # Unpacked token ids are proto-legal: read too.
    assert chunk_output(backend, unpacked) == output_from(
        backend, pb.GenerateResponse.FromString(unpacked)
    )


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["vllm", "sglang"]), st.binary(max_size=40))
def test_chunk_output_never_raises_and_agrees_with_protobuf(backend: str, data: bytes) -> None:
    pb = vll if backend == "vllm" else sgl
    fast = chunk_output(backend, data)  # never raises
    if fast is not None:
        assert fast == output_from(backend, pb.GenerateResponse.FromString(data))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["vllm", "sglang"]),
    st.lists(st.integers(0, 2**32 - 1), max_size=6),
    st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
    st.integers(0, 60),
    st.integers(0, 255),
)
def test_chunk_output_on_mutated_chunks(
    backend: str, ids: list[int], counts: list[int], where: int, byte: int
) -> None:
    """A real chunk is read exactly as protobuf reads it; with one byte changed, either
    the same answer as protobuf or None (never one protobuf would refuse)."""
    prompt, completion, cached, index = counts
    kw: dict[str, object] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "index": index,
    }
    pb = vll if backend == "vllm" else sgl
    data = _chunk_bytes(backend, ids, **kw)
    assert chunk_output(backend, data) == EngineOutput(index, ids, prompt, completion, cached)
    mutated = bytearray(data)
    mutated[where % len(mutated)] = byte
    fast = chunk_output(backend, bytes(mutated))
    try:
        slow = output_from(backend, pb.GenerateResponse.FromString(bytes(mutated)))
    except Exception:  # protobuf refuses it: so must the fast path
        assert fast is None
        return
    if fast is not None:
        assert fast == slow
