"""The gRPC request path's CPU shortcuts give the same bytes as the general code, over
many random cases: the request proto with the prompt set in place (vs the TokenizedInput
passed to the constructor), chunk_output's inline 2-3 byte varints (vs protobuf's own
parse), ChoiceState's plain-token shortcut (vs the stop-matching path with a stop string
that never matches), _Run without kept deltas (a stream's) returning the same ones, and
the tool parsers' JSON reader and writer made once (vs json.loads / json.dumps)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smg.grpc.frontend import Stages, _Run
from smg.grpc.protos import build_generate_request, chunk_output, output_from, sgl, vll
from smg.grpc.respond import ChoiceState
from smg.grpc.types import EngineOutput, GenerateInput, SamplingParams
from smg.parsers.toolcalls import _json as tool_json
from smg.tokenizer import Tokenizer, load_tokenizer
from tests.tokenizer_data import llama31_dir, needs_llama3

_PB = {"vllm": vll, "sglang": sgl}
# Token ids across every varint length a uint32 takes (1-5 bytes).
_EDGES = [0, 1, 127, 128, 255, 16383, 16384, 128000, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**32 - 1]


def _random_id(rng: random.Random) -> int:
    return (
        rng.choice(_EDGES)
        if rng.random() < 0.3
        else rng.randrange(0, 2 ** rng.choice([7, 14, 17, 21, 32]))
    )


def _random_text(rng: random.Random) -> str:
    return "".join(
        rng.choice(["a", " ", "é", "🦙", "\n", "\x00", "<|x|>"])
        for _ in range(rng.randrange(0, 40))
    )


def _reference_request(backend: str, req: GenerateInput) -> bytes:
    """The request as build_generate_request made it before: the TokenizedInput built
    apart and handed to the constructor, which copies it."""
    pb = _PB[backend]
    built = build_generate_request(backend, req)
    ref = pb.GenerateRequest()
    ref.CopyFrom(built)
    ref.ClearField("tokenized")
    ref.MergeFrom(
        pb.GenerateRequest(
            tokenized=pb.TokenizedInput(original_text=req.text, input_ids=req.input_ids)
        )
    )
    return ref.SerializeToString()


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_request_bytes_equal_the_constructor_built_ones(backend: str) -> None:
    rng = random.Random(backend)
    for case in range(300):
        ids = [_random_id(rng) for _ in range(rng.choice([0, 1, 5, 300]))]
        sampling = SamplingParams(
            max_tokens=rng.choice([None, 1, 256]),
            stop=["</s>"] if case % 3 == 0 else [],
            stop_token_ids=[7] if case % 5 == 0 else [],
            seed=rng.choice([None, 3]),
            n=rng.choice([1, 2]),
        )
        req = GenerateInput(
            request_id=f"r{case}",
            input_ids=ids,
            sampling=sampling,
            stream=bool(case % 2),
            text=_random_text(rng),
        )
        got = build_generate_request(backend, req).SerializeToString()
        assert got == _reference_request(backend, req), (case, ids)
        tokenized = _PB[backend].GenerateRequest.FromString(got).tokenized
        assert list(tokenized.input_ids) == ids and tokenized.original_text == req.text


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_request_with_an_out_of_range_id_still_raises(backend: str) -> None:
    for bad in (-1, 2**32):
        req = GenerateInput(
            request_id="r", input_ids=[1, bad], sampling=SamplingParams(), stream=True, text=""
        )
        with pytest.raises(ValueError, match="out of range"):
            build_generate_request(backend, req)


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_chunk_output_equals_protobuf_over_random_chunks(backend: str) -> None:
    pb = _PB[backend]
    rng = random.Random(f"chunks-{backend}")
    extra = {"request_id": "rid"} if backend == "sglang" else {}
    for _ in range(3000):
        ids = [_random_id(rng) for _ in range(rng.choice([0, 1, 1, 1, 2, 7]))]
        fields: dict[str, Any] = {}
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "index"):
            if rng.random() < 0.6:
                fields[name] = _random_id(rng) if name != "index" else rng.randrange(0, 300)
        data = pb.GenerateResponse(
            chunk=pb.GenerateStreamChunk(token_ids=ids, **fields), **extra
        ).SerializeToString()
        fast = chunk_output(backend, data)
        assert fast == output_from(backend, pb.GenerateResponse.FromString(data)), data
        # Any cut of the message is refused (None) or read as protobuf reads it.
        cut = data[: rng.randrange(0, len(data) + 1)]
        short = chunk_output(backend, cut)
        if short is not None:
            assert short == output_from(backend, pb.GenerateResponse.FromString(cut))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(str(llama31_dir(tmp_path_factory.mktemp("llama31"))))


def _stream(rng: random.Random, tok: Tokenizer) -> list[EngineOutput]:
    """A choice's chunks: random ids (byte pieces that split characters included), the
    complete last with finish "stop" on the EOS or "length"."""
    pieces = [9468, 99, 247, 9906, 11, 1917, 810, 0, 128000, 128009, 220, 198]
    chunks = []
    for _ in range(rng.randrange(1, 30)):
        ids = [rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(0, 128000)]
        # SGLang's prompt logprobs ride on a stream's first chunk (kept on the delta).
        inputs = [(None, 5), (-0.5, 6)] if not chunks and rng.random() < 0.5 else None
        chunks.append(EngineOutput(0, ids, input_logprobs=inputs))
    if rng.random() < 0.5:
        chunks.append(EngineOutput(0, [tok.eos_token_ids[0]], finished=True, finish_reason="stop"))
    else:
        chunks.append(
            EngineOutput(0, [rng.randrange(0, 128000)], finished=True, finish_reason="length")
        )
    return chunks


@needs_llama3
def test_plain_token_shortcut_equals_the_stop_matching_path(tok: Tokenizer) -> None:
    rng = random.Random("choice")
    for case in range(300):
        chunks = _stream(rng, tok)
        skip = bool(case % 2)
        plain = ChoiceState(0, tok, SamplingParams(skip_special_tokens=skip))
        # A stop string no text holds: the general path, which must give the same deltas.
        general = ChoiceState(0, tok, SamplingParams(skip_special_tokens=skip, stop=["\x07\x08"]))
        for c in chunks:
            a = plain.on_output(
                EngineOutput(
                    0,
                    list(c.token_ids),
                    finished=c.finished,
                    finish_reason=c.finish_reason,
                    input_logprobs=c.input_logprobs,
                )
            )
            b = general.on_output(c)
            assert a == b, (case, chunks)
        assert plain.done() and general.done()


@needs_llama3
def test_run_without_kept_deltas_returns_the_same_deltas(tok: Tokenizer) -> None:
    rng = random.Random("run")
    stages = Stages()
    prepared = SimpleNamespace(sampling=SamplingParams(n=2))
    for _ in range(50):
        kept = _Run(stages, prepared, tok, 10)
        streamed = _Run(stages, prepared, tok, 10, keep_deltas=False)
        for index in (0, 1):
            for c in _stream(rng, tok):
                c.index = index
                twin = EngineOutput(
                    index,
                    list(c.token_ids),
                    finished=c.finished,
                    finish_reason=c.finish_reason,
                    input_logprobs=c.input_logprobs,
                )
                assert kept.add(c) == streamed.add(twin)
        assert kept.usage() == streamed.usage()
        assert kept.all_done() and streamed.all_done()
        assert streamed.deltas == [[], []] and len(kept.deltas[0]) > 0


def _json_outcome(fn: Any, text: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(text)
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_JSON_VALUES, st.sampled_from(["", "\ufeff", " ", "x", "]"]), st.booleans())
def test_tool_json_reader_and_writer_equal_json_loads_and_dumps(
    value: Any, affix: str, as_bytes: bool
) -> None:
    expected_dump = _json_outcome(
        lambda v: json.dumps(v, ensure_ascii=False, allow_nan=False), value
    )
    assert _json_outcome(tool_json.dumps, value) == expected_dump
    text = json.dumps(value, ensure_ascii=False)  # NaN/Infinity included: strict refuses them
    for candidate in (text, affix + text, text + affix, text[: len(text) // 2]):
        arg: Any = candidate.encode() if as_bytes else candidate
        reference = _json_outcome(
            lambda t: json.loads(t, parse_constant=tool_json._no_constant), arg
        )
        assert _json_outcome(tool_json.strict_loads, arg) == reference
