"""`smg mock-worker --grpc`: a mock vLLM or SGLang gRPC engine (one service per process).

    smg mock-worker --grpc --grpc-backend vllm --port 0 --tokenizer-path DIR --model NAME \
        --max-context-length 8192 --itl-ms 10 --output-mode random --control-port 0

Serves `vllm.grpc.engine.VllmEngine` or `sglang.grpc.scheduler.SglangScheduler` (the
stubs of the smg-grpc-proto package): Generate, Abort, HealthCheck, GetModelInfo,
GetServerInfo, GetLoads, GetTokenizer, Embed. Once listening it prints
`MOCK_CONTROL_URL http://HOST:Q` (with --control-port) and then
`MOCK_WORKER_URL grpc://HOST:P` to stdout. `--processes K` runs K serving processes on one
SO_REUSEPORT port (the parent only supervises them); stats and config are per process, so
--control-port needs --processes 1. The server is h2fast.py's minimal HTTP/2 one (~4.5 us
of CPU per streamed token, one ticker per process); `--grpc-impl aio` serves the same
servicer methods with grpc.aio instead (~50 us per token; the tests check both answer
alike).

How the real servicers fill the responses (smg-grpc-servicer 0.14.1,
smg_grpc_servicer/{vllm,sglang}/servicer.py and sglang/request_manager.py; the mock does
the same):

vLLM (engine outputs in DELTA mode when streaming, FINAL_ONLY otherwise):
- stream: per engine step and per choice one GenerateStreamChunk: token_ids = the new
  tokens, completion_tokens = len(token_ids) (a DELTA count; the client sums them),
  prompt_tokens = len(prompt), cached_tokens = the prompt's cached count, index = the
  choice, output_logprobs for the new tokens only (when sampling_params.logprobs is set).
  When that step finishes the choice, a GenerateComplete FOLLOWS the chunk and repeats
  that last delta: output_ids = the same tokens as the chunk before it (NOT the whole
  output), completion_tokens = their count, output_logprobs for them, finish_reason,
  matched_stop. A client must not append the Complete's output_ids when streaming (the
  Rust SMG ignores them and sums the chunks' lengths: CompletionTokenTracker).
- non-stream: one GenerateComplete per choice once all choices finished, in index order,
  output_ids = all tokens, completion_tokens = their count, output_logprobs for all.
- finish_reason: "stop" | "length" | "abort" (vLLM's words). matched_stop: the tokenizer's
  own EOS -> unset; another EOS id of generation_config.json (vLLM merges them into
  stop_token_ids unless ignore_eos) or a request stop_token_id -> matched_token_id; a stop
  string -> matched_stop_str. The stop token stays in the output ids.
- top logprobs: k entries, the sampled token first, then the best others (vLLM's logprob
  dict order cut to k); none when logprobs = 0.
- Abort of a running request: an empty chunk, then Complete(finish_reason="abort",
  output_ids=[]) per unfinished choice.

SGLang:
- every GenerateResponse carries request_id. stream: one GenerateStreamChunk per scheduler
  output: token_ids = the new tokens, completion_tokens = CUMULATIVE, prompt_tokens,
  cached_tokens, index, incremental output_logprobs (when return_logprob). When finished,
  a GenerateComplete follows built from the same output: output_ids = that last delta
  again, completion_tokens = cumulative total, output_logprobs = the last delta's.
- non-stream n=1: one Complete with all output ids and cumulative logprobs. non-stream
  n>1: n Completes once all finished, and every one has index 0 (the request manager sets
  "index" only when streaming): a client must number them by order.
- finish_reason: "stop" | "length" | "abort"; any EOS id or stop_token_id ->
  matched_token_id (ignore_eos turns all token stops off, stop_token_ids included); a stop
  string -> matched_stop_str. Top logprobs: top_logprobs_num alternatives (not the sampled
  token). The SGLang proto has no seed: the mock reads custom_params["seed"].
- n>1 is served as n sub-requests after a prefill-only one, so each choice reports the
  whole prompt as cached when the prefix cache is on.

Both: prompt_tokens counts the prompt once per choice message (a client summing them over
choices gets n x prompt, as the Rust SMG's usage does). Errors end the stream with a gRPC
status: an empty prompt, a prompt at or over the context length, vLLM max_tokens 0 ->
INVALID_ARGUMENT. Prefix cache (--prefix-cache-tokens) as the HTTP mock's, over token ids.

Output (`--output-mode`): echo repeats the prompt's ids; random draws non-special ids
(seeded by the request's seed and the choice index, else unseeded); text:<s> repeats the
tokenization of <s>; reply:<s> (`--reply-file FILE`: the file's text) sends the tokenization
of <s> once, as plain text (a special token's spelling is ordinary text, so the text comes
back whatever skip_special_tokens says), then the EOS: finish "stop". A choice ends at max_tokens (absent: the context left), or as the stop
rules of grpc_script.py say; `--eos-after N` makes token N+1 the EOS (unless ignore_eos).
Pace: the first token ttft after the request, then one every itl, deadline-based (0: as
fast as the loop goes); a non-streamed answer comes when the last token would have.

Control port (--control-port, HTTP/1.1, one request per connection): GET /stats (calls per
method, last GenerateRequest via protobuf json_format, its constraint, aborted and
cancelled request ids, failures, tokens; "h2": the fast server's connections accepted and
open, PINGs ACKed), GET /config, POST /config (grpc_options
GrpcRuntime: fail_next N with fail_code before the first token or after fail_after_tokens
tokens of choice 0, healthy, ttft_ms, itl_ms, delay_ms, waiting, output_mode, eos_after),
POST /reset (config back to the command line's, stats and cache emptied).
Tests start it with tests/grpcmockutil.py (start_grpc_mock, llama3_dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from smg_grpc_proto.generated import (
    common_pb2,
    sglang_scheduler_pb2,
    sglang_scheduler_pb2_grpc,
    vllm_engine_pb2,
    vllm_engine_pb2_grpc,
)

from smg.mock_worker import h2fast
from smg.mock_worker.grpc_model import ModelFiles, load_model_files
from smg.mock_worker.grpc_options import GrpcOptions, GrpcRuntime, apply_update, parse_grpc_options
from smg.mock_worker.grpc_pd import GrpcPd, PdRefused
from smg.mock_worker.grpc_script import (
    ChoiceScript,
    Model,
    OutputMode,
    Request,
    fake_logprob,
    fake_top,
    parse_output_mode,
)
from smg.mock_worker.h2fast import Route, serve_fast
from smg.mock_worker.pd import start_bootstrap_server
from smg.mock_worker.prefix_cache import PrefixCache

# The GetTokenizer archive: the gateway's own builder and chunking, so the mock sends
# exactly what the gateway unpacks.
from smg.tokenizer.bundle import bundle_chunks, make_bundle

URL_PREFIX = "MOCK_WORKER_URL"
BOOTSTRAP_PREFIX = "MOCK_WORKER_BOOTSTRAP"
CONTROL_PREFIX = "MOCK_CONTROL_URL"
READY_PREFIX = "MOCK_CHILD_READY"
EMBED_DIM = 16
MAX_TOP_LOGPROBS = 20  # vLLM's -1 (all) is served as this many
KEEP_IDS = 1000  # aborted/cancelled ids kept in the stats


class Stats:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.last_generate_msg: Any = None
        self.constraint: dict[str, Any] | None = None
        self.aborted: deque[str] = deque(maxlen=KEEP_IDS)
        self.cancelled: deque[str] = deque(maxlen=KEEP_IDS)
        self.failed = 0
        self.completed = 0
        self.tokens = 0
        self.in_flight = 0
        self.by_dp_rank: dict[str, int] = {}  # data_parallel_rank ("none": unset) -> count

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.calls),
            "generate": self.calls.get("Generate", 0),
            "last_generate_request": (
                None
                if self.last_generate_msg is None
                else json_format.MessageToDict(
                    self.last_generate_msg, preserving_proto_field_name=True
                )
            ),
            "constraint": self.constraint,
            "aborted": list(self.aborted),
            "cancelled": list(self.cancelled),
            "failed": self.failed,
            "completed": self.completed,
            "tokens": self.tokens,
            "in_flight": self.in_flight,
            "requests_by_dp_rank": dict(self.by_dp_rank),
        }


class Running:
    """One Generate in flight (what Abort reaches)."""

    __slots__ = ("aborted",)

    def __init__(self) -> None:
        self.aborted = False


class Engine:
    """State shared by the service of one process: model, config, stats, cache."""

    def __init__(self, opts: GrpcOptions, files: ModelFiles) -> None:
        self.opts = opts
        self.files = files
        self.model: Model = files.model(opts.backend, opts.max_context_length)
        self.runtime = self.initial_runtime()
        self.mode = self.output_mode(self.runtime.output_mode)
        self.stats = Stats()
        self.cache = PrefixCache(opts.prefix_cache_tokens) if opts.prefix_cache_tokens else None
        self.running: dict[str, Running] = {}
        self.started = time.time()
        self.last_receive = 0.0
        self._bundle: tuple[bytes, str] | None = None
        self.pd: GrpcPd | None = None
        if opts.pd_role is not None:
            self.pd = GrpcPd(
                opts.pd_role,
                opts.backend,
                opts.host,
                opts.bootstrap_port,
                opts.pd_wait_s,
                opts.kv_connector,
            )

    def initial_runtime(self) -> GrpcRuntime:
        o = self.opts
        return GrpcRuntime(
            healthy=not o.health_fail,
            ttft_ms=o.ttft_ms,
            itl_ms=o.itl_ms,
            output_mode=o.output_mode,
            eos_after=o.eos_after,
        )

    def output_mode(self, text: str) -> OutputMode:
        mode = parse_output_mode(text)
        if mode.kind == "text":
            ids = self.files.tokenizer.encode(text[len("text:") :], add_special_tokens=False).ids
            return OutputMode("text", tuple(ids))
        if mode.kind == "reply":
            return OutputMode("reply", tuple(plain_ids(self.files.tokenizer, text[6:])))
        return mode

    def count(self, method: str) -> None:
        self.stats.calls[method] = self.stats.calls.get(method, 0) + 1

    async def delay(self) -> None:
        if self.runtime.delay_ms > 0:
            await asyncio.sleep(self.runtime.delay_ms / 1000)

    def cached_tokens(self, prompt: list[int]) -> int:
        if self.cache is None:
            return 0
        return self.cache.lookup([str(t) for t in prompt])

    def bundle(self) -> tuple[bytes, str]:
        if self._bundle is None:
            self._bundle = make_bundle(self.files.path)
        return self._bundle

    def embedding(self, ids: list[int]) -> list[float]:
        raw = [math.sin(sum(ids) + 1.0 + i) for i in range(EMBED_DIM)]
        norm = math.sqrt(sum(v * v for v in raw)) or 1.0
        return [v / norm for v in raw]

    def take_failure(self) -> tuple[grpc.StatusCode, str, int] | None:
        rt = self.runtime
        if rt.fail_next <= 0:
            return None
        rt.fail_next -= 1
        self.stats.failed += 1
        return grpc.StatusCode[rt.fail_code], rt.fail_message, rt.fail_after_tokens


def input_logprob(i: int) -> float | None:
    """The mock's logprob of prompt position i (render.input_token_logprobs' values):
    none for the first token."""
    return None if i == 0 else -round(0.1 * (1 + i % 7), 4)


def input_logprobs_from(backend: str, msg: Any) -> int | None:
    """SGLang computes prompt logprobs when return_logprob is set and logprob_start_len
    >= 0 (from that position on); -1 asks for none. vLLM's are prompt_logprobs, which the
    gateway never sends (as the Rust SMG 1.13)."""
    if backend != "sglang" or not msg.return_logprob or msg.logprob_start_len < 0:
        return None
    return msg.logprob_start_len


def input_logprobs_message(module: Any, prompt: list[int], start: int) -> Any:
    """InputLogProbs of prompt[start:] (empty when start is past the prompt)."""
    rows = range(start, len(prompt))
    return module.InputLogProbs(
        token_logprobs=[module.InputTokenLogProb(value=input_logprob(i)) for i in rows],
        token_ids=[prompt[i] for i in rows],
    )


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """`text`'s ids with no special-token matching: it decodes back to `text` exactly."""
    tokenizer.encode_special_tokens = True
    try:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    finally:
        tokenizer.encode_special_tokens = False


def _logprob_parts(module: Any, tokens: list[int], k: int, vocab: int, backend: str) -> Any:
    """OutputLogProbs for `tokens` (the same message shape in both protos)."""
    tops = []
    if k > 0:
        for t in tokens:
            pairs = fake_top(t, k, vocab, backend)
            tops.append(
                module.TopLogProbs(values=[p[1] for p in pairs], token_ids=[p[0] for p in pairs])
            )
    return module.OutputLogProbs(
        token_logprobs=[fake_logprob(t) for t in tokens], token_ids=tokens, top_logprobs=tops
    )


class Backend:
    """The per-proto half: reading a GenerateRequest and writing the messages."""

    name = ""
    pb: Any = None
    # completion_tokens: vLLM counts the tokens of this message, SGLang all so far.
    cumulative = False

    def request(self, msg: Any) -> tuple[Request, int | None]:
        raise NotImplementedError

    def constraint(self, msg: Any) -> dict[str, Any] | None:
        sp = msg.sampling_params
        kind = sp.WhichOneof("constraint")
        if kind is None:
            return None
        value = getattr(sp, kind)
        if kind == "choice":
            value = list(value.choices)
        return {"kind": kind, "value": value}

    def response(self, rid: str, **part: Any) -> Any:
        """A GenerateResponse holding `part` (vLLM's has no request_id; SGLang's does)."""
        return self.pb.GenerateResponse(**part)

    def _common(
        self, s: ChoiceScript, toks: list[int], prompt: int, cached: int, k: int | None, inputs: Any
    ) -> dict[str, Any]:
        """The fields a chunk and a complete share (SGLang's prompt logprobs when given)."""
        common = {
            "prompt_tokens": prompt,
            "completion_tokens": s.count if self.cumulative else len(toks),
            "cached_tokens": cached,
            "output_logprobs": self.logprobs(s, toks, k),
        }
        if inputs is not None:
            common["input_logprobs"] = inputs
        return common

    def chunk(
        self,
        rid: str,
        s: ChoiceScript,
        toks: list[int],
        prompt: int,
        cached: int,
        k: int | None,
        inputs: Any = None,
    ) -> Any:
        common = self._common(s, toks, prompt, cached, k, inputs)
        chunk = self.pb.GenerateStreamChunk(token_ids=toks, index=s.index, **common)
        return self.response(rid, chunk=chunk)

    def complete(
        self,
        rid: str,
        s: ChoiceScript,
        toks: list[int],
        prompt: int,
        cached: int,
        k: int | None,
        index: int,
        inputs: Any = None,
    ) -> Any:
        complete = self.pb.GenerateComplete(
            output_ids=toks,
            finish_reason=s.finish_reason or "stop",
            index=index,
            **self._common(s, toks, prompt, cached, k, inputs),
            **self.matched(s),
        )
        return self.response(rid, complete=complete)

    def logprobs(self, s: ChoiceScript, toks: list[int], k: int | None) -> Any:
        """The OutputLogProbs of `toks` (None when none were asked for, or no tokens)."""
        if k is None or not toks:
            return None
        return _logprob_parts(self.pb, toks, k, s.model.vocab_size, self.name)

    def matched(self, s: ChoiceScript) -> dict[str, Any]:
        if isinstance(s.matched, str):
            return {"matched_stop_str": s.matched}
        if isinstance(s.matched, int):
            return {"matched_token_id": s.matched}
        return {}


class VllmBackend(Backend):
    name = "vllm"
    pb = vllm_engine_pb2

    def request(self, msg: Any) -> tuple[Request, int | None]:
        sp = msg.sampling_params
        if msg.WhichOneof("input") == "text":
            raise ValueError("the mock takes tokenized input only")
        if sp.HasField("max_tokens") and sp.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1, got 0.")
        req = Request(
            request_id=msg.request_id,
            prompt=list(msg.tokenized.input_ids),
            n=sp.n if sp.n > 0 else 1,
            max_tokens=sp.max_tokens if sp.HasField("max_tokens") else None,
            min_tokens=sp.min_tokens,
            ignore_eos=sp.ignore_eos,
            stop=list(sp.stop),
            stop_token_ids=list(sp.stop_token_ids),
            skip_special_tokens=sp.skip_special_tokens,
            seed=sp.seed if sp.HasField("seed") else None,
            stream=msg.stream,
        )
        k = None
        if sp.HasField("logprobs"):
            k = MAX_TOP_LOGPROBS if sp.logprobs < 0 else sp.logprobs
        return req, k

    def chunk_bytes(self, rid: str, s: ChoiceScript, t: int, prompt: int, cached: int) -> bytes:
        """GenerateResponse{chunk{token_ids: [t], prompt_tokens, completion_tokens: 1,
        cached_tokens, index}} encoded by hand (the per-token hot path)."""
        tail = s.wire_tail
        if tail is None:  # the fields that stay the same for every chunk of this choice
            tail = b"\x10" + _varint(prompt) + b"\x18\x01"
            if cached:
                tail += b"\x20" + _varint(cached)
            if s.index:
                tail += b"\x38" + _varint(s.index)
            s.wire_tail = tail
        tv = _varint(t)
        inner = b"\x0a" + bytes((len(tv),)) + tv + tail
        return b"\x0a" + _varint(len(inner)) + inner


class SglangBackend(Backend):
    name = "sglang"
    pb = sglang_scheduler_pb2
    cumulative = True

    def response(self, rid: str, **part: Any) -> Any:
        return self.pb.GenerateResponse(request_id=rid, **part)

    def request(self, msg: Any) -> tuple[Request, int | None]:
        sp = msg.sampling_params
        custom = json_format.MessageToDict(sp.custom_params) if sp.HasField("custom_params") else {}
        seed = custom.get("seed")
        req = Request(
            request_id=msg.request_id,
            prompt=list(msg.tokenized.input_ids),
            n=sp.n if sp.n > 0 else 1,
            max_tokens=sp.max_new_tokens if sp.HasField("max_new_tokens") else None,
            min_tokens=sp.min_new_tokens,
            ignore_eos=sp.ignore_eos,
            stop=list(sp.stop),
            stop_token_ids=list(sp.stop_token_ids),
            skip_special_tokens=sp.skip_special_tokens,
            seed=int(seed) if isinstance(seed, (int, float)) else None,
            stream=msg.stream,
        )
        k = max(0, msg.top_logprobs_num) if msg.return_logprob else None
        return req, k

    def chunk_bytes(self, rid: str, s: ChoiceScript, t: int, prompt: int, cached: int) -> bytes:
        """GenerateResponse{request_id, chunk{token_ids: [t], prompt_tokens,
        completion_tokens (cumulative), cached_tokens, index}} encoded by hand."""
        tail = s.wire_tail
        if tail is None:  # (request_id field, prompt_tokens field, cached and index fields)
            r = rid.encode()
            tail = b"\x0a" + _varint(len(r)) + r, b"\x10" + _varint(prompt) + b"\x18", b""
            if cached:
                tail = tail[0], tail[1], tail[2] + b"\x20" + _varint(cached)
            if s.index:
                tail = tail[0], tail[1], tail[2] + b"\x40" + _varint(s.index)
            s.wire_tail = tail
        tv = _varint(t)
        inner = b"\x0a" + bytes((len(tv),)) + tv + tail[1] + _varint(s.count) + tail[2]
        return tail[0] + b"\x12" + _varint(len(inner)) + inner


BACKENDS: dict[str, type[Backend]] = {"vllm": VllmBackend, "sglang": SglangBackend}


class Abort(Exception):
    """End the call with this gRPC status (both servers turn it into trailers)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _varint(v: int) -> bytes:
    if v < 0x80:
        return bytes((v,))
    if v < 0x4000:
        return bytes(((v & 0x7F) | 0x80, v >> 7))
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def dp_rank_of(engine: Engine, msg: Any) -> None:
    """Count a Generate's `data_parallel_rank` (both protos: an optional int32); refuse
    one outside [0, --dp-size) as an engine with that many DP ranks cannot serve it (the
    HTTP mock's 400, as a gRPC status)."""
    counts = engine.stats.by_dp_rank
    if not msg.HasField("data_parallel_rank"):
        counts["none"] = counts.get("none", 0) + 1
        return
    rank, size = msg.data_parallel_rank, engine.opts.dp_size
    if not 0 <= rank < size:
        counts["invalid"] = counts.get("invalid", 0) + 1
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"data_parallel_rank {rank} is out of range [0, {size})",
        )
    counts[str(rank)] = counts.get(str(rank), 0) + 1


class GenRun:
    """One Generate call: validation, then `advance()` once per step (at `due()`) until
    `done`; shared by the grpc.aio server and the fast HTTP/2 one. Raises Abort."""

    def __init__(self, engine: Engine, be: Backend, msg: Any, *, raw: bool) -> None:
        engine.count("Generate")
        engine.last_receive = time.time()
        stats = engine.stats
        stats.last_generate_msg = msg  # converted to JSON only when /stats asks
        stats.constraint = be.constraint(msg)
        dp_rank_of(engine, msg)
        try:
            req, k = be.request(msg)
        except ValueError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        n = len(req.prompt)
        ctx = engine.model.context_length
        if n == 0:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "The decoder prompt cannot be empty")
        if n >= ctx:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The decoder prompt (length {n}) is longer than the maximum model length of {ctx}.",
            )
        rt = engine.runtime
        self.engine, self.be, self.req, self.k = engine, be, req, k
        self.raw = raw and k is None  # pre-encoded chunks (no logprobs) for the fast server
        # SGLang prompt logprobs: from this prompt position on (None: not asked); a PD
        # decode clears it (its prefill computed them).
        self.input_from: int | None = input_logprobs_from(be.name, msg)
        self.rid = req.request_id
        self.prompt_len = n
        self.start = time.monotonic() + rt.delay_ms / 1000 + rt.ttft_ms / 1000
        self.itl = rt.itl_ms / 1000
        self.eos_after = rt.eos_after
        self.failure = engine.take_failure()
        self.steps = 0
        self.done = False
        self.scripts: list[ChoiceScript] = []
        self.live = 0  # choices not finished yet
        self.cached = 0
        self.running = Running()
        engine.running[self.rid] = self.running
        stats.in_flight += 1
        self._closed = False

    def due(self) -> float:
        return self.start + self.itl * self.steps

    def _begin(self) -> None:
        e, req = self.engine, self.req
        self.cached = e.cached_tokens(req.prompt)
        tok = e.files.tokenizer if req.stop else None
        self.scripts = [
            ChoiceScript(i, req, e.model, e.mode, tok, eos_after=self.eos_after)
            for i in range(req.n)
        ]
        self.live = req.n

    def advance(self) -> list[Any]:
        """The messages of one step (protobuf messages, or bytes already encoded)."""
        if self.steps == 0:
            if self.failure is not None and self.failure[2] == 0:
                raise Abort(self.failure[0], self.failure[1])
            self._begin()
        self.steps += 1
        be, req, k, rid = self.be, self.req, self.k, self.rid
        p, c = self.prompt_len, self.cached
        out: list[Any] = []
        live = (
            self.scripts
            if self.live == len(self.scripts)
            else [s for s in self.scripts if not s.finished]
        )
        if self.running.aborted:
            for s in live:
                s.abort()
                if req.stream:
                    out.append(be.chunk(rid, s, [], p, c, k))
                out.append(be.complete(rid, s, [], p, c, k, s.index))
            self.done = True
            return out
        stats = self.engine.stats
        failure = self.failure
        raw = self.raw
        stream = req.stream
        # SGLang's stream carries the prompt logprobs in a choice's first chunk (its proto
        # says so) and in its complete (built from the finished request, as non-streamed)
        inputs = None
        if stream and self.input_from is not None:
            inputs = input_logprobs_message(be.pb, req.prompt, self.input_from)
        for s in live:
            t = s.step()
            stats.tokens += 1
            if stream:
                first = inputs if s.count == 1 else None
                out.append(
                    be.chunk_bytes(rid, s, t, p, c)
                    if raw
                    else be.chunk(rid, s, [t], p, c, k, first)
                )
            if failure is not None and s.index == 0 and s.count >= failure[2]:
                self.pending_failure = out
                raise Abort(failure[0], failure[1])
            if s.finish_reason is not None:
                self.live -= 1
                if stream:
                    out.append(be.complete(rid, s, [t], p, c, k, s.index, inputs))
        if self.live == 0:
            self.done = True
            if not stream:
                sglang_n = be.name == "sglang" and req.n > 1
                inputs = (
                    None
                    if self.input_from is None
                    else input_logprobs_message(be.pb, req.prompt, self.input_from)
                )
                for s in self.scripts:
                    i = 0 if sglang_n else s.index
                    out.append(be.complete(rid, s, s.tokens, p, c, k, i, inputs))
        return out

    def close(self, *, cancelled: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        st = self.engine.stats
        st.in_flight -= 1
        if cancelled:
            st.cancelled.append(self.rid)
        elif self.done:
            st.completed += 1
        if self.engine.running.get(self.rid) is self.running:
            del self.engine.running[self.rid]


async def generate(
    engine: Engine, be: Backend, msg: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """The Generate stream of either backend (grpc.aio)."""
    pd = engine.pd
    if pd is not None:
        async for m in _pd_generate(engine, pd, be, msg, context):
            yield m
        return
    try:
        run = GenRun(engine, be, msg, raw=False)
    except Abort as e:
        await context.abort(e.code, e.message)
    try:
        async for m in _run_messages(run, context):
            yield m
        run.close()
    except asyncio.CancelledError:
        run.close(cancelled=True)
        raise
    finally:
        run.close()


async def _run_messages(run: GenRun, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The run's messages, each once it falls due; on a failure mid-run, what the run
    still has to send (its pending_failure), then the abort."""
    while not run.done:
        delay = run.due() - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            msgs = run.advance()
        except Abort as e:
            for m in getattr(run, "pending_failure", []):
                yield m
            await context.abort(e.code, e.message)
        for m in msgs:
            yield m


async def _pd_generate(
    engine: Engine, pd: GrpcPd, be: Backend, msg: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """Generate in a PD role (grpc_pd.py): the bootstrap checks, then the plain stream."""
    try:
        leg = pd.leg(msg)
        run = GenRun(engine, be, msg, raw=False)
    except (PdRefused, Abort) as e:
        await context.abort(e.code, e.message)
    if pd.book is not None and be.name == "sglang":
        run.req.max_tokens = 1  # SGLang's prefill computes the KV and the first token
    elif be.name == "sglang" and run.input_from is not None:
        # an SGLang decode's input logprobs are empty, as the HTTP PD mock's: a PD
        # router takes the prefill's
        run.input_from = len(run.req.prompt)
    ok = False
    try:
        try:
            await pd.before(leg, time.monotonic())
        except PdRefused as e:
            await context.abort(e.code, e.message)
        async for m in _run_messages(run, context):
            pd.decorate(leg, m)
            yield m
        ok = True
    except asyncio.CancelledError:
        run.close(cancelled=True)
        raise
    finally:
        run.close()
        pd.after(leg, ok)


def _abort_ids(engine: Engine, ids: list[str]) -> None:
    for rid in ids:
        engine.stats.aborted.append(rid)
        running = engine.running.get(rid)
        if running is not None:
            running.aborted = True


class _Service:
    """The methods both backends answer alike; each subclass names its proto module (`pb`)
    and the message its engine puts in a passing health check. Listed first among the
    bases so these override the generated servicer's UNIMPLEMENTED stubs."""

    pb: Any
    healthy_message: str

    def __init__(self, engine: Engine, be: Backend) -> None:
        self.e = engine
        self.be = be

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for msg in generate(self.e, self.be, request, context):
            yield msg

    async def Embed(self, request: Any, context: Any) -> Any:
        self.e.count("Embed")
        await self.e.delay()
        ids = list(request.tokenized.input_ids)
        emb = self.e.embedding(ids)
        return self.pb.EmbedResponse(embedding=emb, prompt_tokens=len(ids), embedding_dim=len(emb))

    async def HealthCheck(self, request: Any, context: Any) -> Any:
        self.e.count("HealthCheck")
        await self.e.delay()
        ok = self.e.runtime.healthy
        return self.pb.HealthCheckResponse(
            healthy=ok, message=self.healthy_message if ok else "Engine is not alive"
        )

    async def GetTokenizer(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for chunk in tokenizer_chunks(self.e, context):
            yield chunk

    async def FlushCache(self, request: Any, context: Any) -> Any:
        # Counted in /stats "requests" (what the --dp-aware tests read: one per engine).
        self.e.count("FlushCache")
        await self.e.delay()
        if self.e.cache is not None:
            self.e.cache.reset()
        return common_pb2.FlushCacheResponse(success=True, message="Cache flushed.")

    async def StartProfile(self, request: Any, context: Any) -> Any:
        self.e.count("StartProfile")
        return common_pb2.ProfileResponse(success=True, message="")

    async def StopProfile(self, request: Any, context: Any) -> Any:
        self.e.count("StopProfile")
        return common_pb2.ProfileResponse(success=True, message="")


class VllmService(_Service, vllm_engine_pb2_grpc.VllmEngineServicer):
    pb = vllm_engine_pb2
    healthy_message = "Health"

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, VllmBackend())

    async def Abort(self, request: Any, context: Any) -> Any:
        self.e.count("Abort")
        _abort_ids(self.e, list(request.request_ids))
        return vllm_engine_pb2.AbortResponse()

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        self.e.count("GetModelInfo")
        await self.e.delay()
        return vllm_engine_pb2.GetModelInfoResponse(**model_info_fields(self.e))

    async def GetServerInfo(self, request: Any, context: Any) -> Any:
        self.e.count("GetServerInfo")
        await self.e.delay()
        return vllm_engine_pb2.GetServerInfoResponse(
            active_requests=len(self.e.running),
            is_paused=False,
            last_receive_timestamp=self.e.last_receive,
            uptime_seconds=time.time() - self.e.started,
            server_type="vllm-grpc",
            data_parallel_size=self.e.opts.dp_size,
            max_num_seqs=256,
            **_kv_fields(self.e),
        )

    async def GetLoads(self, request: Any, context: Any) -> Any:
        self.e.count("GetLoads")
        await self.e.delay()
        return vllm_engine_pb2.GetLoadsResponse(
            timestamp=_now_iso(),
            version="mock",
            dp_rank_count=1,
            loads=[vllm_engine_pb2.SchedulerLoad(**load_fields(self.e))],
        )


class SglangService(_Service, sglang_scheduler_pb2_grpc.SglangSchedulerServicer):
    pb = sglang_scheduler_pb2
    healthy_message = "Health check passed"

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, SglangBackend())

    async def Abort(self, request: Any, context: Any) -> Any:
        self.e.count("Abort")
        rid = request.request_id
        found = rid in self.e.running
        _abort_ids(self.e, [rid])
        return sglang_scheduler_pb2.AbortResponse(
            success=found, message=f"Request {rid} {'aborted' if found else 'not found'}"
        )

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        self.e.count("GetModelInfo")
        await self.e.delay()
        fields = model_info_fields(self.e)
        return sglang_scheduler_pb2.GetModelInfoResponse(weight_version="default", **fields)

    async def GetServerInfo(self, request: Any, context: Any) -> Any:
        self.e.count("GetServerInfo")
        await self.e.delay()
        e = self.e
        args = struct_pb2.Struct()
        args.update(
            {
                "model_path": e.opts.model_path or e.opts.tokenizer_path,
                "tokenizer_path": e.opts.tokenizer_path,
                "served_model_name": e.opts.model,
                "context_length": e.opts.max_context_length,
                "dp_size": e.opts.dp_size,  # SGLang's server_args always carry it
            }
        )
        sched = struct_pb2.Struct()
        sched.update(
            {"max_total_num_tokens": 1 << 20, "max_req_input_len": e.opts.max_context_length - 1}
        )
        return sglang_scheduler_pb2.GetServerInfoResponse(
            server_args=args,
            scheduler_info=sched,
            active_requests=len(e.running),
            is_paused=False,
            last_receive_timestamp=e.last_receive,
            uptime_seconds=time.time() - e.started,
            sglang_version="mock",
            server_type="grpc",
            max_total_num_tokens=1 << 20,
        )

    async def GetLoads(self, request: Any, context: Any) -> Any:
        self.e.count("GetLoads")
        await self.e.delay()
        fields = load_fields(self.e)
        return sglang_scheduler_pb2.GetLoadsResponse(
            timestamp=_now_iso(),
            version="mock",
            dp_rank_count=1,
            loads=[sglang_scheduler_pb2.SchedulerLoad(**fields)],
            aggregate=sglang_scheduler_pb2.AggregateMetrics(
                total_running_reqs=fields["num_running_reqs"],
                total_waiting_reqs=fields["num_waiting_reqs"],
                total_reqs=fields["num_total_reqs"],
                avg_token_usage=fields["token_usage"],
            ),
        )


def _kv_fields(e: Engine) -> dict[str, Any]:
    """vLLM's kv_transfer_config as GetServerInfo reports it (a PD role only)."""
    pd = e.pd
    if pd is None:
        return {}
    return {"kv_connector": pd.kv_connector, "kv_role": pd.kv_role, "kv_engine_id": pd.engine_id}


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def model_info_fields(e: Engine) -> dict[str, Any]:
    f = e.files
    return {
        "model_path": e.opts.model_path or e.opts.tokenizer_path,
        "tokenizer_path": e.opts.tokenizer_path,
        "is_generation": True,
        "served_model_name": e.opts.model,
        "max_context_length": e.opts.max_context_length,
        "max_req_input_len": e.opts.max_context_length,
        "vocab_size": f.vocab_size,
        "supports_vision": False,
        "model_type": f.model_type,
        "architectures": list(f.architectures),
        "eos_token_ids": list(f.eos_ids),
        "pad_token_id": f.pad_id,
        "bos_token_id": f.bos_id,
        "default_sampling_params_json": f.default_sampling_params_json(),
    }


def load_fields(e: Engine) -> dict[str, Any]:
    running = len(e.running)
    waiting = e.runtime.waiting
    return {
        "dp_rank": 0,
        "num_running_reqs": running,
        "num_waiting_reqs": waiting,
        "num_total_reqs": running + waiting,
        "num_used_tokens": 0,
        "max_total_num_tokens": 1 << 20,
        "token_usage": 0.0,
        "max_running_requests": 256,
    }


async def tokenizer_chunks(e: Engine, context: Any) -> AsyncIterator[Any]:
    e.count("GetTokenizer")
    await e.delay()
    try:
        data, sha = await asyncio.to_thread(e.bundle)
    except (OSError, ValueError) as exc:  # ValueError: TokenizerLoadError, no files left
        await context.abort(grpc.StatusCode.INTERNAL, str(exc))
    chunks = bundle_chunks(data)
    for i, chunk in enumerate(chunks):
        yield common_pb2.GetTokenizerChunk(data=chunk, sha256=sha if i == len(chunks) - 1 else "")


# ----------------------------------------------------------------------------- control port


def _http(status: int, body: Any) -> bytes:
    payload = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "OK")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + payload


def control_answer(e: Engine, method: str, path: str, body: bytes) -> bytes:
    if path == "/stats" and method == "GET":
        out = e.stats.to_json()
        out["prefix_cache"] = e.cache.stats.to_json() if e.cache is not None else None
        out["backend"] = e.opts.backend
        out["h2"] = dict(h2fast.COUNTS)  # the fast server's connections and PINGs
        out["pd"] = None if e.pd is None else e.pd.stats(time.monotonic())
        return _http(200, out)
    if path == "/config" and method == "GET":
        return _http(200, e.runtime.to_json())
    if path == "/config" and method == "POST":
        try:
            update = json.loads(body or b"{}")
        except ValueError:
            return _http(400, {"error": "body is not JSON"})
        err = apply_update(e.runtime, update)
        if err is not None:
            return _http(400, {"error": err})
        e.mode = e.output_mode(e.runtime.output_mode)
        return _http(200, e.runtime.to_json())
    if path == "/reset" and method == "POST":
        e.runtime = e.initial_runtime()
        e.mode = e.output_mode(e.runtime.output_mode)
        e.stats = Stats()
        e.stats.in_flight = len(e.running)
        if e.cache is not None:
            e.cache.reset()
        return _http(200, {"reset": True})
    return _http(404, {"error": f"no route {method} {path}"})


async def _control_conn(
    e: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if not 0 <= length <= 1 << 20:
            raise ValueError("bad content-length")
        body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
        writer.write(control_answer(e, method, path.split("?", 1)[0], body))
        await writer.drain()
    except (
        TimeoutError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
        OSError,
    ):
        with contextlib.suppress(OSError):
            writer.write(_http(400, {"error": "bad request"}))
    finally:
        writer.close()


# ----------------------------------------------------------------------------- processes


def fast_routes(service: VllmService | SglangService) -> dict[str, Route]:
    """The service's methods by HTTP/2 path, for the fast server."""
    pb = service.pb
    if isinstance(service, VllmService):
        prefix = "/vllm.grpc.engine.VllmEngine/"
    else:
        prefix = "/sglang.grpc.scheduler.SglangScheduler/"
    routes: dict[str, Route] = {prefix + "Generate": ("generate", pb.GenerateRequest, service.be)}
    for name in ("Embed", "HealthCheck", "Abort", "GetModelInfo", "GetServerInfo", "GetLoads"):
        routes[prefix + name] = ("unary", getattr(pb, name + "Request"), getattr(service, name))
    for name, request in (
        ("FlushCache", common_pb2.FlushCacheRequest),
        ("StartProfile", common_pb2.StartProfileRequest),
        ("StopProfile", common_pb2.StopProfileRequest),
    ):
        routes[prefix + name] = ("unary", request, getattr(service, name))
    routes[prefix + "GetTokenizer"] = (
        "stream",
        common_pb2.GetTokenizerRequest,
        service.GetTokenizer,
    )
    return routes


def _fail(why: str) -> int:
    """Say why the worker cannot serve (on stderr, where the launcher shows it); exit 1."""
    print(f"smg mock-worker --grpc: {why}", file=sys.stderr, flush=True)
    return 1


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve(opts: GrpcOptions) -> int:
    try:
        files = load_model_files(opts.tokenizer_path)
    except Exception as exc:  # OSError, ValueError, and tokenizers raises plain Exception
        return _fail(f"cannot load {opts.tokenizer_path}: {exc}")
    engine = Engine(opts, files)
    service: VllmService | SglangService = (
        VllmService(engine) if opts.backend == "vllm" else SglangService(engine)
    )
    fast: asyncio.AbstractServer | None = None
    server: grpc.aio.Server | None = None
    try:
        if opts.impl == "fast":
            fast = await serve_fast(
                opts.host,
                opts.port,
                fast_routes(service),
                lambda be, msg: GenRun(engine, be, msg, raw=True),
            )
            port = fast.sockets[0].getsockname()[1]
        else:
            server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", 1),
                    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                    ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ]
            )
            if opts.backend == "vllm":
                vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(service, server)
            else:
                sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(service, server)
            port = server.add_insecure_port(f"{opts.host}:{opts.port}")
            if port == 0:
                raise OSError("no port")
            await server.start()
    except (OSError, RuntimeError) as exc:
        return _fail(f"cannot listen on {opts.host}:{opts.port}: {exc}")
    control: asyncio.AbstractServer | None = None
    lines = []
    boot: asyncio.AbstractServer | None = None
    if engine.pd is not None and engine.pd.book is not None:  # a prefill's bootstrap server
        try:
            boot = await start_bootstrap_server(engine.pd.book, opts.host, opts.bootstrap_port)
        except OSError as exc:
            return _fail(f"cannot listen on {opts.host}:{opts.bootstrap_port} (bootstrap): {exc}")
        engine.pd.bootstrap_port = boot.sockets[0].getsockname()[1]
    if opts.control_port is not None:
        control = await asyncio.start_server(
            lambda r, w: _control_conn(engine, r, w), opts.host, opts.control_port
        )
        cport = control.sockets[0].getsockname()[1]
        lines.append(f"{CONTROL_PREFIX} {_url('http', opts.host, cport)}\n")
    prefix = READY_PREFIX if opts.child else URL_PREFIX
    lines.append(f"{prefix} {_url('grpc', opts.host, port)}\n")
    if boot is not None:
        lines.append(
            f"{BOOTSTRAP_PREFIX} {_url('grpc', opts.host, port)} {engine.pd.bootstrap_port}\n"
        )  # type: ignore[union-attr]
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if control is not None:
        control.close()
    if boot is not None:
        boot.close()
    if fast is not None:
        fast.close()
    if server is not None:
        await server.stop(0.2)
    return 0


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket: it holds the port number for the
    children (which bind it with SO_REUSEPORT too) and never takes a connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(opts: GrpcOptions, argv: list[str]) -> int:
    """--processes K > 1: start K children on one port, print the URL, stop them on a signal."""
    try:
        holder = _reserve_port(opts.host, opts.port)
    except OSError as exc:
        return _fail(f"cannot listen on {opts.host}:{opts.port}: {exc}")
    port = holder.getsockname()[1]
    child_argv = [*argv, "--processes", "1", "--port", str(port), "--child"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        for _ in range(opts.processes):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "smg", "mock-worker", *child_argv],
                    stdout=subprocess.PIPE,
                )
            )
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().decode()
            if not line.startswith(READY_PREFIX):
                return _fail("a serving process did not start")
        sys.stdout.write(f"{URL_PREFIX} {_url('grpc', opts.host, port)}\n")
        sys.stdout.flush()
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.1)
        return 0 if stopping else 1
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 5
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        holder.close()


def main(argv: list[str]) -> int:
    try:
        opts = parse_grpc_options(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if opts.processes > 1:
        return supervise(opts, argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(opts))
    return 130
