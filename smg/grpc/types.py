"""The backend-neutral vocabulary of the gRPC request path (pure; no grpcio import).

Stages: prepare (an OpenAI body -> `SamplingParams` and the prompt) -> render (chat
template) -> tokenize -> select a worker -> build the proto request from `GenerateInput`
(per backend, `smg.grpc.protos`) -> execute (`smg.grpc.client.EngineClient.generate`
yields `EngineOutput`) -> process the response (detokenize, stop strings, OpenAI shapes).

`GrpcModelInfo` travels from the control plane (which asks `GetModelInfo` /
`GetServerInfo` and fetches the tokenizer bundle) to the data planes inside each worker's
directory entry, so it is a msgspec struct with defaults for every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

# Constraint kinds (`SamplingParams.constraint`): (kind, value). The vLLM proto calls an
# EBNF grammar `grammar`, SGLang's `ebnf_grammar`; `json_object` has no SGLang field and
# is sent there as the schema `{"type": "object"}`.
CONSTRAINT_KINDS: tuple[str, ...] = (
    "json_schema",
    "json_object",
    "regex",
    "ebnf",
    "structural_tag",
    "choice",
)


@dataclass(slots=True)
class SamplingParams:
    """Every sampling field set explicitly: proto3 zero values are not the engines'
    defaults (top_p 0, repetition_penalty 0, n 0 would all be wrong), so the build stage
    copies each one and never relies on an unset field."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off (vLLM takes 0 for off on its uint32 field; the builder maps)
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # None: the context length minus the prompt (prepare sets it)
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # also matched gateway-side
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's and k alternatives
    # SGLang prompt logprobs from this position on (/generate's logprob_start_len); -1: none
    logprob_start_len: int = -1
    logit_bias: dict[int, float] = field(default_factory=dict)
    # (kind, value), kind in CONSTRAINT_KINDS; value a JSON text, a pattern, a grammar, or
    # a list of choices; None: unconstrained.
    constraint: tuple[str, object] | None = None


@dataclass(slots=True)
class GenerateInput:
    """One engine request: the prompt as token ids (the gateway tokenized it)."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool = True
    text: str = ""  # the rendered prompt, sent as TokenizedInput.original_text (debugging)
    # PD over gRPC (smg.grpc.pd): SGLang's DisaggregatedParams (host, port, room); vLLM's
    # kv_transfer_params_json. None: a plain request.
    disaggregated: tuple[str, int, int] | None = None
    kv_transfer_params_json: str | None = None
    # --dp-aware (smg.dp): the rank worker's DP rank, sent as the proto's
    # data_parallel_rank (1.13's request_execution.rs); None: unset (the engine balances).
    dp_rank: int | None = None


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass(slots=True)
class EngineOutput:
    """One message from the engine's Generate stream, for one of the n choices.

    Streaming: `token_ids` are the new tokens of this chunk; the last message of a choice
    has `finished` set (a GenerateComplete) and carries only tokens not streamed before
    (the client normalises the backends to this). Non-streaming: one finished message per
    choice with all its tokens."""

    index: int
    token_ids: list[int]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked
    finished: bool = False
    finish_reason: str | None = None  # the engine's words: "stop", "length", "abort", ...
    matched_stop: int | str | None = None  # the stop token id or stop string that matched
    kv_transfer_params_json: str = ""  # a vLLM PD prefill's GenerateComplete (smg.grpc.pd)
    # SGLang's prompt logprobs on a GenerateComplete: (logprob, token id), the first
    # prompt token's logprob None; None when the engine sent none
    input_logprobs: list[tuple[float | None, int]] | None = None


class EngineError(Exception):
    """A failed RPC, with its gRPC status code name ("UNAVAILABLE", "INVALID_ARGUMENT",
    ...) so the data plane can map it to an HTTP status and an OpenAI error code, and
    `before_first_token` so it knows whether a retry is still allowed."""

    def __init__(self, code: str, message: str, *, before_first_token: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.before_first_token = before_first_token


class GrpcModelInfo(msgspec.Struct, array_like=True, frozen=True):
    """What the control plane learned about a gRPC worker's model (GetModelInfo,
    GetServerInfo, the tokenizer bundle); published in the worker's directory entry."""

    backend: str = ""  # "vllm" | "sglang": which service answered
    served_model_name: str = ""
    model_path: str = ""
    max_context_length: int = 0  # 0: unknown
    max_req_input_len: int = 0  # 0: unknown
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int = -1
    pad_token_id: int = -1
    is_generation: bool = True
    default_sampling_params_json: str = ""  # the engine's generation-config defaults
    # A local directory holding the worker's tokenizer bundle (fetched with GetTokenizer,
    # checked against its sha256, cached on disk); "" when the gateway has its own
    # (--tokenizer-path / --model-path) or none was fetched.
    tokenizer_dir: str = ""
    # vLLM's kv_transfer_config as GetServerInfo reports it (PD over gRPC: smg.grpc.pd).
    kv_connector: str = ""
    kv_engine_id: str = ""
