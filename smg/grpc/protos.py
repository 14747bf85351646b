"""Proto building and parsing for the two engine backends (pure: no I/O, no channel).

`build_generate_request` turns the backend-neutral `GenerateInput` into the engine's
`GenerateRequest`, `output_from` turns one `GenerateResponse` back into an `EngineOutput`,
`StreamNormalizer` makes a whole stream uniform, `model_info_from` / `load_from` read the
management answers.

What the engines do with the fields (smg-grpc-servicer 0.14, `vllm/servicer.py`
`_sampling_params_from_proto`, `sglang/servicer.py` `_convert_sampling_params`): proto3
cannot tell an unset scalar from its zero, so every field is set here explicitly:

- vLLM: `temperature` and `max_tokens` are `optional` (unset: 1.0 / none); `top_k` is
  uint32 with 0 = off (our -1 maps to 0); `n` 0 would be read as 1, `top_p` /
  `repetition_penalty` 0 as 1.0, but we never send those zeros. Logprobs ride in
  `SamplingParams.logprobs` (k: the chosen token's and k alternatives), `seed` is an
  optional int32 (clamped, as the Rust SMG clamps), `logit_bias` is map<int32, float>,
  `json_object` is the oneof's bool.
- SGLang: `temperature` is a plain float (0 would be greedy: always sent); `top_k` int32
  with -1 = off (0 would be read as -1 too); `max_new_tokens` optional; logprobs are on the
  GenerateRequest (`return_logprob`, `top_logprobs_num`, `logprob_start_len` -1 = no prompt
  logprobs); `logit_bias` is map<string, float>; `include_stop_str_in_output` is
  `no_stop_trim`; a JSON object is the schema `{"type":"object"}` and an EBNF grammar is
  `ebnf_grammar` (as the Rust SMG sends them); a choice list becomes an alternation regex.
  The SGLang proto has no seed field: a seed is not sent (the Rust SMG drops it too).

Streams: both servicers send, for each choice, chunks with the new token ids and then a
`GenerateComplete` built from the same engine output as the last chunk, so in a streamed
request the complete repeats the last chunk's tokens (vLLM's chunk `completion_tokens` are
per-chunk counts, SGLang's cumulative). `StreamNormalizer` hands each token out once and
keeps `completion_tokens` as the choice's running total.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import vllm_engine_pb2 as vll

from smg.grpc.types import EngineOutput, GenerateInput, GrpcModelInfo, TokenLogprob
from smg.policies.base import BackendLoad

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("vllm", "sglang")

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
# SGLang's json_object (it has no such field): the schema the Rust SMG sends for it.
_JSON_OBJECT_SCHEMA = '{"type":"object"}'

# gRPC status code name -> (HTTP status, OpenAI error code), as the Rust SMG maps them
# (model_gateway/src/routers/grpc/utils/tonic_ext.rs `http_status`). The code is the Rust
# SMG's for a Generate that fails before its first response ("start_generation_failed",
# request_execution.rs); a stream that fails later is `STREAM_FAILED_CODE` there.
_START = "start_generation_failed"
GRPC_STATUS_HTTP: dict[str, tuple[int, str]] = {
    "OK": (200, _START),
    "INVALID_ARGUMENT": (400, _START),
    "FAILED_PRECONDITION": (400, _START),
    "OUT_OF_RANGE": (400, _START),
    "CANCELLED": (400, _START),
    "UNAUTHENTICATED": (401, _START),
    "PERMISSION_DENIED": (403, _START),
    "NOT_FOUND": (404, _START),
    "ALREADY_EXISTS": (409, _START),
    "ABORTED": (409, _START),
    "RESOURCE_EXHAUSTED": (429, _START),
    "UNAVAILABLE": (503, _START),
    "DEADLINE_EXCEEDED": (504, _START),
    "UNIMPLEMENTED": (501, _START),
    "INTERNAL": (500, _START),
    "UNKNOWN": (500, _START),
    "DATA_LOSS": (500, _START),
}
# The Rust SMG's code when a non-streaming collection fails mid-stream
# (response_collection.rs) and in an SSE error event after the first chunk (streaming.rs).
STREAM_FAILED_CODE = "worker_stream_failed"
SSE_ERROR_CODE = "internal_error"


def http_status_for(code: str) -> tuple[int, str]:
    """(HTTP status, error code) for a gRPC status code name; 500 for one not listed."""
    return GRPC_STATUS_HTTP.get(code, (500, _START))


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown gRPC backend {backend!r} (expected vllm or sglang)")


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _choice_regex(choices: Any) -> str:
    """A regex matching exactly one of `choices` (SGLang has no choice constraint)."""
    special = set("\\.^$|?*+()[]{}")
    escaped = ["".join("\\" + c if c in special else c for c in str(x)) for x in choices]
    return "(" + "|".join(escaped) + ")"


def _constraint_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _vllm_sampling(req: GenerateInput) -> vll.SamplingParams:
    s = req.sampling
    p = vll.SamplingParams(
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        top_k=s.top_k if s.top_k > 0 else 0,  # vLLM: 0 = off
        min_p=float(s.min_p),
        frequency_penalty=float(s.frequency_penalty),
        presence_penalty=float(s.presence_penalty),
        repetition_penalty=float(s.repetition_penalty),
        min_tokens=_clamp(s.min_tokens, 0, _UINT32_MAX),
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        skip_special_tokens=s.skip_special_tokens,
        spaces_between_special_tokens=s.spaces_between_special_tokens,
        ignore_eos=s.ignore_eos,
        n=max(1, s.n),
        include_stop_str_in_output=s.include_stop_str_in_output,
    )
    if s.max_tokens is not None:
        p.max_tokens = _clamp(s.max_tokens, 0, _UINT32_MAX)
    if s.logprobs is not None:
        p.logprobs = _clamp(s.logprobs, -1, _INT32_MAX)
    if s.seed is not None:
        p.seed = _clamp(s.seed, -_INT32_MAX - 1, _INT32_MAX)
    for token, bias in s.logit_bias.items():
        p.logit_bias[int(token)] = float(bias)
    if s.constraint is not None:
        kind, value = s.constraint
        if kind == "json_schema":
            p.json_schema = _constraint_text(value)
        elif kind == "json_object":
            p.json_object = True
        elif kind == "regex":
            p.regex = str(value)
        elif kind == "ebnf":
            p.grammar = str(value)
        elif kind == "structural_tag":
            p.structural_tag = _constraint_text(value)
        elif kind == "choice":
            p.choice.choices.extend(str(x) for x in value)  # type: ignore[attr-defined]
        else:
            raise ValueError(f"unknown constraint kind {kind!r}")
    return p


def _sglang_sampling(req: GenerateInput) -> sgl.SamplingParams:
    s = req.sampling
    p = sgl.SamplingParams(
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        top_k=s.top_k if s.top_k > 0 else -1,  # SGLang: -1 = off
        min_p=float(s.min_p),
        frequency_penalty=float(s.frequency_penalty),
        presence_penalty=float(s.presence_penalty),
        repetition_penalty=float(s.repetition_penalty),
        min_new_tokens=_clamp(s.min_tokens, 0, _UINT32_MAX),
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        skip_special_tokens=s.skip_special_tokens,
        spaces_between_special_tokens=s.spaces_between_special_tokens,
        ignore_eos=s.ignore_eos,
        no_stop_trim=s.include_stop_str_in_output,
        n=max(1, s.n),
    )
    if s.max_tokens is not None:
        p.max_new_tokens = _clamp(s.max_tokens, 0, _UINT32_MAX)
    for token, bias in s.logit_bias.items():
        p.logit_bias[str(int(token))] = float(bias)
    if s.constraint is not None:
        kind, value = s.constraint
        if kind == "json_schema":
            p.json_schema = _constraint_text(value)
        elif kind == "json_object":
            p.json_schema = _JSON_OBJECT_SCHEMA
        elif kind == "regex":
            p.regex = str(value)
        elif kind == "ebnf":
            p.ebnf_grammar = str(value)
        elif kind == "structural_tag":
            p.structural_tag = _constraint_text(value)
        elif kind == "choice":
            p.regex = _choice_regex(value)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown constraint kind {kind!r}")
    return p


def _set_tokenized(tokenized: Any, req: GenerateInput) -> None:
    """The prompt set in place on the request's own TokenizedInput: a TokenizedInput
    passed to the request's constructor is copied whole (its ~1,000 ids again, ~20 us
    a request); the serialized bytes are the same."""
    tokenized.original_text = req.text
    tokenized.input_ids.extend(req.input_ids)


def build_generate_request(backend: str, req: GenerateInput) -> Any:
    """The backend's GenerateRequest for `req`, every sampling field set explicitly.
    ValueError for an unknown backend or constraint kind."""
    _check_backend(backend)
    if backend == "vllm":
        vreq = vll.GenerateRequest(
            request_id=req.request_id, sampling_params=_vllm_sampling(req), stream=req.stream
        )
        _set_tokenized(vreq.tokenized, req)
        if req.kv_transfer_params_json is not None:
            vreq.kv_transfer_params_json = req.kv_transfer_params_json
        if req.dp_rank is not None:
            vreq.data_parallel_rank = req.dp_rank
        return vreq
    logprobs = req.sampling.logprobs
    sreq = sgl.GenerateRequest(
        request_id=req.request_id,
        sampling_params=_sglang_sampling(req),
        return_logprob=logprobs is not None,
        top_logprobs_num=max(0, logprobs or 0),
        # the client's (SGLang /generate); -1: no prompt logprobs
        logprob_start_len=_clamp(req.sampling.logprob_start_len, -1, _INT32_MAX),
        stream=req.stream,
    )
    _set_tokenized(sreq.tokenized, req)
    if req.disaggregated is not None:
        host, port, room = req.disaggregated
        sreq.disaggregated_params.CopyFrom(
            sgl.DisaggregatedParams(bootstrap_host=host, bootstrap_port=port, bootstrap_room=room)
        )
    if req.dp_rank is not None:
        sreq.data_parallel_rank = req.dp_rank
    return sreq


def build_abort_request(backend: str, request_ids: list[str]) -> Any:
    """vLLM aborts a list; SGLang one id per call (the caller loops)."""
    _check_backend(backend)
    if backend == "vllm":
        return vll.AbortRequest(request_ids=request_ids)
    return sgl.AbortRequest(request_id=request_ids[0] if request_ids else "", reason="client")


# --- responses --------------------------------------------------------------------------------


def _logprobs_from(msg: Any) -> list[TokenLogprob] | None:
    """OutputLogProbs (same shape in both protos) -> one TokenLogprob per position; None
    when the message has none."""
    ids = msg.token_ids
    if not ids:
        return None
    values = msg.token_logprobs
    tops = msg.top_logprobs
    out: list[TokenLogprob] = []
    for i, token in enumerate(ids):
        top: list[tuple[int, float]] = []
        if i < len(tops):
            t = tops[i]
            top = list(zip(t.token_ids, t.values, strict=False))
        out.append(TokenLogprob(int(token), float(values[i]) if i < len(values) else 0.0, top))
    return out


def _input_logprobs_from(c: Any) -> list[tuple[float | None, int]]:
    """SGLang's InputLogProbs: (logprob or None for an unset value, token id) per row."""
    lp = c.input_logprobs
    values = lp.token_logprobs
    out: list[tuple[float | None, int]] = []
    for i, token in enumerate(lp.token_ids):
        v = values[i] if i < len(values) else None
        out.append((float(v.value) if v is not None and v.HasField("value") else None, int(token)))
    return out


def output_from(backend: str, response: Any) -> EngineOutput:
    """One GenerateResponse as the engine sent it (no normalisation across messages: see
    `StreamNormalizer`). A response with neither a chunk nor a complete is an empty,
    unfinished output for choice 0. Hot path (one call per streamed message): slicing a
    repeated field copies it at half the cost of list(), and positional arguments."""
    which = response.WhichOneof("response")
    if which == "chunk":
        c = response.chunk
        lp = c.output_logprobs
        return EngineOutput(
            c.index,
            c.token_ids[:],
            c.prompt_tokens,
            c.completion_tokens,
            c.cached_tokens,
            _logprobs_from(lp) if lp.token_ids else None,
            # SGLang sends the prompt logprobs in a stream's first chunk (its proto)
            input_logprobs=_input_logprobs_from(c)
            if backend == "sglang" and c.HasField("input_logprobs")
            else None,
        )
    if which == "complete":
        c = response.complete
        stop_kind = c.WhichOneof("matched_stop")
        matched: int | str | None = None
        if stop_kind == "matched_token_id":
            matched = c.matched_token_id
        elif stop_kind == "matched_stop_str":
            matched = c.matched_stop_str
        lp = c.output_logprobs
        return EngineOutput(
            c.index,
            c.output_ids[:],
            c.prompt_tokens,
            c.completion_tokens,
            c.cached_tokens,
            _logprobs_from(lp) if lp.token_ids else None,
            True,
            c.finish_reason or "stop",
            matched,
            # vLLM PD: what a prefill hands its decode (smg.grpc.pd); SGLang has no field.
            getattr(c, "kv_transfer_params_json", ""),
            _input_logprobs_from(c)
            if backend == "sglang" and c.HasField("input_logprobs")
            else None,
        )
    if backend not in BACKENDS:
        _check_backend(backend)
    return EngineOutput(index=0, token_ids=[])


# --- the streamed chunk, read from its wire bytes ---------------------------------------------
#
# Why: a data plane decodes one GenerateResponse per streamed token. Through the protobuf
# runtime (upb) every message's arena is freed with glibc's malloc_trim (protobuf 7's
# `upb_trim_allocfunc`, seen with `strace -k` in a data-plane process): a heap walk and
# an madvise(MADV_DONTNEED) per token, then a page fault when the page is used again.
# A plain chunk (token ids, the counts, the index; no logprobs) is read here with a
# varint scan instead; anything else (a complete, logprobs, hidden states, a field we do
# not know, bytes that do not parse) returns None and goes through `output_from`.

# GenerateResponse's `chunk` key byte per backend (field 1 / 2, length-delimited), and a
# table from a GenerateStreamChunk key byte to the slot its varint goes to: 1 an unpacked
# token id, 2-4 prompt/completion/cached tokens, 5 the index (vLLM 7, SGLang 8), 6 read
# and ignored (SGLang's reasoning_tokens, 9); 0: not read here.
_CHUNK_KEY = {"vllm": 0x0A, "sglang": 0x12}


def _slots(index_field: int, ignored: tuple[int, ...]) -> tuple[int, ...]:
    table = [0] * 256
    for field, slot in ((1, 1), (2, 2), (3, 3), (4, 4), (index_field, 5)):
        table[field << 3] = slot
    for field in ignored:
        table[field << 3] = 6
    return tuple(table)


_SLOTS = {"vllm": _slots(7, ()), "sglang": _slots(8, (9,))}
_U32 = 0xFFFFFFFF


def chunk_output(backend: str, data: bytes) -> EngineOutput | None:
    """The EngineOutput of a GenerateResponse holding a plain streamed chunk (as
    `output_from` would make it), read from `data` without protobuf objects; None for any
    other message (the caller parses it the usual way). Never raises."""
    try:
        return _chunk_output(_CHUNK_KEY[backend], _SLOTS[backend], data)
    except (IndexError, KeyError, UnicodeDecodeError):
        return None


def _chunk_output(chunk_key: int, slots: tuple[int, ...], data: bytes) -> EngineOutput | None:
    # The response: exactly one chunk field (a repeated one: the slow path merges them),
    # and for SGLang a request_id string (field 1) to skip.
    end = len(data)
    pos = 0
    start = -1
    while pos < end:
        key = data[pos]
        n = data[pos + 1]
        if n < 0x80:
            pos += 2
        else:
            n, pos = _varint(data, pos + 1)
        if key == chunk_key and start < 0:
            start, stop = pos, pos + n
        elif key == 0x0A and chunk_key == 0x12:  # SGLang's request_id: a valid string
            str(data[pos : pos + n], "utf-8")
        else:
            return None
        pos += n
    if start < 0 or pos != end:
        return None
    ids: list[int] = []
    values = [0, 0, 0, 0, 0, 0, 0]
    pos = start
    while pos < stop:
        key = data[pos]
        value = data[pos + 1]
        if value < 0x80:
            pos += 2
        elif data[pos + 2] < 0x80:  # a prompt of 128-16,383 tokens
            value = (value & 0x7F) | data[pos + 2] << 7
            pos += 3
        else:
            value, pos = _varint(data, pos + 1)
        if key == 0x0A:  # token_ids, packed: `value` is its length
            last = pos + value
            if last > stop:
                return None
            while pos < last:
                b = data[pos]
                if b < 0x80:
                    ids.append(b)
                    pos += 1
                    continue
                # Most ids of a 32K-256K vocabulary take 2-3 bytes: read here, not in
                # a _varint call per token.
                b2 = data[pos + 1]
                if b2 < 0x80:
                    ids.append((b & 0x7F) | b2 << 7)
                    pos += 2
                    continue
                b3 = data[pos + 2]
                if b3 < 0x80:
                    ids.append((b & 0x7F) | (b2 & 0x7F) << 7 | b3 << 14)
                    pos += 3
                    continue
                b, pos = _varint(data, pos)
                ids.append(b & _U32)
            if pos != last:
                return None
            continue
        slot = slots[key]
        if slot == 1:
            ids.append(value & _U32)
        elif slot:
            values[slot] = value & _U32
        else:
            return None
    if pos != stop:
        return None
    return EngineOutput(values[5], ids, values[2], values[3], values[4])


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); IndexError past the end or beyond 10 bytes."""
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    value = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 10 bytes")


class StreamNormalizer:
    """Makes one request's outputs uniform across backends (pure, per request):

    - every token is handed out once: a choice's complete carries only tokens that its
      chunks did not (both servicers repeat the last chunk's tokens in it when streaming;
      one that repeats all of them, or sends a complete alone, works too);
    - `completion_tokens` is the choice's running total (vLLM chunks count per chunk);
    - a chunk for a choice after its complete is dropped; a second complete for the same
      index is the next choice (SGLang's non-streaming n > 1 numbers every one 0)."""

    def __init__(self) -> None:
        self._streamed: dict[int, list[int]] = {}
        self._done: set[int] = set()

    def feed(self, out: EngineOutput) -> EngineOutput | None:
        index = out.index
        if index in self._done:
            if not out.finished:
                return None
            # SGLang without streaming sends the n completes all as index 0 (its request
            # manager numbers choices only when streaming): they come in choice order.
            index = out.index = len(self._done)
            while index in self._done:
                index = out.index = index + 1
        seen = self._streamed.get(index)
        if seen is None:  # (setdefault would make a list per token)
            seen = self._streamed[index] = []
        if not out.finished:
            seen.extend(out.token_ids)
            out.completion_tokens = max(out.completion_tokens, len(seen))
            return out
        self._done.add(index)
        ids = out.token_ids
        new_from = _new_tokens_from(seen, ids)
        if new_from:
            ids = ids[new_from:]
            if out.logprobs is not None:
                out.logprobs = out.logprobs[new_from:] or None
            out.token_ids = ids
        seen.extend(ids)
        out.completion_tokens = max(out.completion_tokens, len(seen))
        return out

    def finished(self, index: int) -> bool:
        return index in self._done


def _new_tokens_from(streamed: list[int], ids: list[int]) -> int:
    """Where the tokens not streamed before start in a complete's `ids`: 0 when nothing
    was streamed, len(ids) when `ids` repeats the tail (or the whole) of what was, and
    past the streamed prefix when `ids` is the whole output so far plus new ones."""
    if not streamed or not ids:
        return 0
    n = len(ids)
    if n <= len(streamed) and streamed[-n:] == ids:
        return n
    if n > len(streamed) and ids[: len(streamed)] == streamed:
        return len(streamed)
    log.debug("a complete's %d output ids do not match the %d streamed", n, len(streamed))
    return n  # inconsistent: trust what was streamed


# --- management answers -----------------------------------------------------------------------


def model_info_from(backend: str, model_info: Any, server_info: Any | None) -> GrpcModelInfo:
    """GetModelInfoResponse (+ GetServerInfoResponse, unused for now beyond the backend)
    -> GrpcModelInfo. SGLang's `default_sampling_params_json` falls back to its
    `preferred_sampling_params`."""
    _check_backend(backend)
    m = model_info
    defaults = m.default_sampling_params_json
    if backend == "sglang" and not defaults:
        defaults = m.preferred_sampling_params
    return GrpcModelInfo(
        backend=backend,
        served_model_name=m.served_model_name,
        model_path=m.model_path,
        max_context_length=max(0, m.max_context_length),
        max_req_input_len=max(0, m.max_req_input_len),
        vocab_size=max(0, m.vocab_size),
        eos_token_ids=tuple(int(x) for x in m.eos_token_ids),
        bos_token_id=m.bos_token_id,
        pad_token_id=m.pad_token_id,
        is_generation=m.is_generation,
        default_sampling_params_json=defaults,
        kv_connector=getattr(server_info, "kv_connector", "") if server_info else "",
        kv_engine_id=getattr(server_info, "kv_engine_id", "") if server_info else "",
    )


def server_info_from(backend: str, server_info: Any | None) -> dict[str, Any]:
    """The few GetServerInfo facts smg uses: `version`, `server_type` (shown in /workers)
    and `dp_size` (--dp-aware: SGLang's server_args.dp_size, as 1.13 reads it; vLLM's
    data_parallel_size), absent when the engine reports none."""
    _check_backend(backend)
    if server_info is None:
        return {}
    info: dict[str, Any] = {"server_type": server_info.server_type}
    if backend == "sglang" and server_info.sglang_version:
        info["version"] = server_info.sglang_version
    if backend == "sglang":
        args = server_info.server_args
        size = args.fields["dp_size"].number_value if "dp_size" in args.fields else 0
    else:
        size = server_info.data_parallel_size
    if size >= 1 and size == int(size):
        info["dp_size"] = int(size)
    return info


def load_from(backend: str, loads: Any) -> BackendLoad:
    """GetLoadsResponse -> BackendLoad, summed over DP ranks (KV usage averaged), as the
    HTTP path reads SGLang's /v1/loads. No ranks: an invalid load."""
    _check_backend(backend)
    ranks = list(loads.loads)
    if not ranks:
        return BackendLoad()
    return BackendLoad(
        running=sum(max(0, r.num_running_reqs) for r in ranks),
        waiting=sum(max(0, r.num_waiting_reqs) for r in ranks),
        token_usage=min(1.0, max(0.0, sum(r.token_usage for r in ranks) / len(ranks))),
        throughput=max(0.0, sum(r.gen_throughput for r in ranks)),
        waiting_tokens=sum(max(0, r.num_waiting_uncached_tokens) for r in ranks),
        valid=True,
    )
