"""Response bodies in the shapes the real engines produce (pure: bytes in, bytes out).

Sources the shapes were taken from (read, not copied):
- OpenAI chat/completion objects and SSE chunks: vllm/entrypoints/openai/protocol.py and
  sglang python/sglang/srt/entrypoints/openai/protocol.py (+ serving_chat.py).
- SGLang native /generate: python/sglang/srt/entrypoints/http_server.py (generate_request:
  `data: {...}` lines, then `data: [DONE]`); the default (non-incremental) stream carries
  the cumulative `text`; `meta_info.finish_reason` is {"type": "length", "length": n} or
  {"type": "stop", "matched": id}.
- SGLang /v1/loads: python/sglang/srt/entrypoints/v1_loads.py (timestamp, version,
  dp_rank_count, loads[], aggregate) with per-rank fields from
  python/sglang/srt/managers/load_snapshot.py (LoadSnapshot.to_dict) plus
  `num_total_reqs`; /get_load: the legacy shim in http_server.py (dp_rank, num_reqs,
  num_waiting_reqs, num_tokens, num_pending_tokens, ts_tic).
- SGLang /metrics gauges: python/sglang/srt/metrics/collector.py
  (SchedulerMetricsCollector: sglang:num_running_reqs, sglang:num_queue_reqs,
  sglang:token_usage, sglang:num_used_tokens, sglang:gen_throughput, ...), labels
  model_name/engine_type/tp_rank/pp_rank as the scheduler sets them.
- vLLM /metrics: vllm/v1/metrics/loggers.py (PrometheusStatLogger:
  vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc and the
  deprecated vllm:gpu_cache_usage_perc, vllm:prompt_tokens_total, ...), labels
  engine/model_name.
- Rerank: SGLang returns a list of {score, document, index, meta_info} sorted by score
  (serving_rerank.py); vLLM returns {id, model, usage, results: [{index, document: {text},
  relevance_score}]} (vllm/entrypoints/openai/protocol.py RerankResponse).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import orjson

from smg.mock_worker.plan import Plan

SGLANG_VERSION = "0.5.4-mock"
VLLM_VERSION = "0.11.0-mock"
EOS_TOKEN_ID = 2

_VOCAB = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while")
_VOCAB += ("mock", "tokens", "keep", "flowing", "in", "order")
_TOKEN_ID_BASE = 1000
_TEXT_CACHE_MAX = 4096
_text_cache: dict[int, str] = {}

DONE_EVENT = b"data: [DONE]\n\n"


def token_piece(i: int) -> str:
    """Text of output token i: words separated by single spaces, so words == tokens."""
    word = _VOCAB[i % len(_VOCAB)]
    return word if i == 0 else " " + word


def output_text(n: int) -> str:
    text = _text_cache.get(n)
    if text is None:
        text = "".join(token_piece(i) for i in range(n))
        if n <= _TEXT_CACHE_MAX:
            _text_cache[n] = text
    return text


def output_ids(n: int) -> list[int]:
    return [_TOKEN_ID_BASE + i % len(_VOCAB) for i in range(n)]


def error_body(status: int, message: str, type_: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": status}}
    )


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        # SGLang (--enable-cache-report) and vLLM (--enable-prompt-tokens-details) shape.
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


# --- non-streaming inference responses --------------------------------------------------


def chat_response(plan: Plan, rid: str, created: int, model: str) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": output_text(plan.n_tokens)},
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            ],
            "usage": usage(
                plan.total_prompt_tokens, plan.total_completion_tokens, plan.cached_tokens
            ),
        }
    )


def completion_response(plan: Plan, rid: str, created: int, model: str) -> bytes:
    text = output_text(plan.n_tokens)
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": plan.finish_reason}
                for i in range(len(plan.prompt_tokens))
            ],
            "usage": usage(
                plan.total_prompt_tokens, plan.total_completion_tokens, plan.cached_tokens
            ),
        }
    )


def _generate_finish(plan: Plan) -> dict[str, Any]:
    if plan.finish_reason == "length":
        return {"type": "length", "length": plan.n_tokens}
    return {"type": "stop", "matched": EOS_TOKEN_ID}


def input_token_logprobs(ids: list[int]) -> list[list[Any]]:
    """SGLang's [logprob, token_id, text] rows of a prompt (text None: return_text_in_logprobs
    off); the first token has no logprob. Values are a fixed function of the position."""
    return [[None if i == 0 else -round(0.1 * (1 + i % 7), 4), t, None] for i, t in enumerate(ids)]


OUTPUT_LOGPROB = -0.25  # every output token's logprob


def _generate_meta(
    plan: Plan, rid: str, prompt: int, done: int, final: bool, index: int = 0
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": _generate_finish(plan) if final else None,
        "prompt_tokens": prompt,
        "completion_tokens": done,
        "cached_tokens": 0 if plan.cached is None else plan.cached[index],
    }
    ids = plan.logprob_ids
    if ids is not None:
        meta["input_token_logprobs"] = (
            input_token_logprobs(ids[index]) if plan.input_logprobs else []
        )
        meta["output_token_logprobs"] = [[OUTPUT_LOGPROB, t, None] for t in output_ids(done)]
    return meta


def generate_response(plan: Plan, rid: str) -> bytes:
    text = output_text(plan.n_tokens)
    ids = output_ids(plan.n_tokens)
    items = [
        {
            "text": text,
            "output_ids": ids,
            "meta_info": _generate_meta(
                plan, f"{rid}-{i}" if plan.batch else rid, p, plan.n_tokens, True, i
            ),
        }
        for i, p in enumerate(plan.prompt_tokens)
    ]
    return orjson.dumps(items if plan.batch else items[0])


def render_response(plan: Plan, rid: str, created: int, model: str) -> bytes:
    if plan.kind == "chat":
        return chat_response(plan, rid, created, model)
    if plan.kind == "completion":
        return completion_response(plan, rid, created, model)
    return generate_response(plan, rid)


# --- streaming ----------------------------------------------------------------------------


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamRenderer:
    """The SSE events of one streamed response, produced token by token.

    `opening()` is sent with the first token, `token(i)` for each token, `closing()` after
    the last one; it includes the finish chunk, the optional usage chunk and `[DONE]`.
    """

    def __init__(self, plan: Plan, rid: str, created: int, model: str) -> None:
        self.plan = plan
        self.rid = rid
        head = {"id": rid, "created": created, "model": model}
        if plan.kind == "chat":
            self._head = {"id": rid, "object": "chat.completion.chunk", **head}
        else:
            self._head = {"id": rid, "object": "text_completion", **head}
        # A token chunk differs from the next only in its text: splice it between fixed bytes.
        if plan.kind == "chat":
            pre, post = self._split({**self._head, "choices": [self._chat_choice("\0")]})
            self._token_parts = [(pre, post)]
        elif plan.kind == "completion":
            self._token_parts = [
                self._split({**self._head, "choices": [self._completion_choice(i, "\0")]})
                for i in range(len(plan.prompt_tokens))
            ]
        else:
            self._token_parts = []

    @staticmethod
    def _split(template: dict[str, Any]) -> tuple[bytes, bytes]:
        raw = b"data: " + orjson.dumps(template) + b"\n\n"
        pre, _, post = raw.partition(b'"\\u0000"')
        return pre, post

    @staticmethod
    def _chat_choice(content: str | None, finish: str | None = None) -> dict[str, Any]:
        delta = {} if content is None else {"content": content}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def _completion_choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def opening(self) -> bytes:
        if self.plan.kind != "chat":
            return b""
        role = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse({**self._head, "choices": [role]})

    def token(self, i: int) -> bytes:
        plan = self.plan
        if plan.kind == "generate":
            done = i + 1
            final = done == plan.n_tokens
            return sse(
                {
                    "text": output_text(done),
                    "meta_info": _generate_meta(plan, self.rid, plan.prompt_tokens[0], done, final),
                }
            )
        piece = orjson.dumps(token_piece(i))
        return b"".join(pre + piece + post for pre, post in self._token_parts)

    def closing(self) -> bytes:
        plan = self.plan
        parts: list[bytes] = []
        if plan.kind == "generate":
            if plan.n_tokens == 0:  # no token chunk carried the finish reason
                meta = _generate_meta(plan, self.rid, plan.prompt_tokens[0], 0, True)
                parts.append(sse({"text": "", "meta_info": meta}))
            parts.append(DONE_EVENT)
            return b"".join(parts)
        if plan.kind == "chat":
            parts.append(
                sse({**self._head, "choices": [self._chat_choice(None, plan.finish_reason)]})
            )
        else:
            for i in range(len(plan.prompt_tokens)):
                choice = self._completion_choice(i, "", plan.finish_reason)
                parts.append(sse({**self._head, "choices": [choice]}))
        if plan.include_usage:
            u = usage(plan.total_prompt_tokens, plan.total_completion_tokens, plan.cached_tokens)
            parts.append(sse({**self._head, "choices": [], "usage": u}))
        parts.append(DONE_EVENT)
        return b"".join(parts)


# --- embeddings and rerank ----------------------------------------------------------------


def _embedding(seed: bytes, dim: int) -> list[float]:
    """A deterministic unit vector derived from the input."""
    values: list[float] = []
    counter = 0
    while len(values) < dim:
        digest = hashlib.blake2b(seed + counter.to_bytes(4, "little"), digest_size=64).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    values = values[:dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def embeddings_inputs(value: Any) -> list[tuple[bytes, int]]:
    """(seed bytes, token count) per input; raises ValueError on a bad `input`."""
    if isinstance(value, str):
        return [(value.encode(), len(value.split()))]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [(orjson.dumps(value), len(value))]
        if all(isinstance(s, str) for s in value):
            return [(s.encode(), len(s.split())) for s in value]
        if all(isinstance(x, list) for x in value):
            return [(orjson.dumps(x), len(x)) for x in value]
    raise ValueError("'input' must be a string, a list of strings or token ids")


def embeddings_response(inputs: list[tuple[bytes, int]], model: str, dim: int) -> bytes:
    tokens = sum(n for _, n in inputs)
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _embedding(seed, dim)}
                for i, (seed, _) in enumerate(inputs)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def rerank_score(query: str, document: str) -> float:
    """Jaccard overlap of the lower-cased word sets: simple, deterministic, in [0, 1]."""
    q = set(query.lower().split())
    d = set(document.lower().split())
    if not q and not d:
        return 0.0
    return round(len(q & d) / len(q | d), 6)


def rerank_response(
    engine: str,
    query: str,
    documents: list[str],
    top_n: int | None,
    return_documents: bool,
    rid: str,
    model: str,
) -> bytes:
    scored = sorted(
        ((rerank_score(query, doc), i, doc) for i, doc in enumerate(documents)),
        key=lambda t: (-t[0], t[1]),
    )
    if top_n:
        scored = scored[:top_n]
    if engine == "vllm":
        tokens = sum(len(query.split()) + len(doc.split()) for doc in documents)
        return orjson.dumps(
            {
                "id": rid,
                "model": model,
                "usage": {"total_tokens": tokens},
                "results": [
                    {
                        "index": i,
                        "document": {"text": doc} if return_documents else None,
                        "relevance_score": score,
                    }
                    for score, i, doc in scored
                ],
            }
        )
    results = []
    for score, i, doc in scored:
        item: dict[str, Any] = {"score": score, "index": i}
        if return_documents:
            item["document"] = doc
        item["meta_info"] = {
            "id": f"{rid}-{i}",
            "prompt_tokens": len(query.split()) + len(doc.split()),
        }
        results.append(item)
    return orjson.dumps(results)


# --- server information -------------------------------------------------------------------


def models_response(engine: str, model: str, created: int, max_model_len: int) -> bytes:
    card: dict[str, Any] = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": engine,  # what backend detection reads ("sglang" / "vllm")
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
    }
    if engine == "vllm":
        card["permission"] = [
            {
                "id": f"modelperm-{model}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ]
    return orjson.dumps({"object": "list", "data": [card]})


def sglang_model_info(model: str) -> bytes:
    return orjson.dumps(
        {
            "model_path": model,
            "tokenizer_path": model,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "mock",
            "architectures": ["MockForCausalLM"],
        }
    )


@dataclasses.dataclass(frozen=True)
class LoadView:
    """The worker's load as its engine would report it."""

    running: int
    waiting: int
    used_tokens: int
    max_total_tokens: int
    token_usage: float
    gen_throughput: float
    max_running_requests: int
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_total: int


def sglang_server_info(
    model: str, host: str, port: int, opts_info: dict[str, Any], load: LoadView
) -> bytes:
    return orjson.dumps(
        {
            "model_path": model,
            "tokenizer_path": model,
            "served_model_name": model,
            "host": host,
            "port": port,
            "tp_size": 1,
            "dp_size": 1,
            "pp_size": 1,
            "disaggregation_mode": "null",
            **opts_info,
            "max_total_num_tokens": load.max_total_tokens,
            "internal_states": [
                {
                    "last_gen_throughput": load.gen_throughput,
                    "num_running_reqs": load.running,
                    "num_waiting_reqs": load.waiting,
                }
            ],
            "version": SGLANG_VERSION,
        }
    )


def vllm_version() -> bytes:
    return orjson.dumps({"version": VLLM_VERSION})


def _core_load(load: LoadView) -> dict[str, Any]:
    return {
        "dp_rank": 0,
        "num_running_reqs": load.running,
        "num_waiting_reqs": load.waiting,
        "num_waiting_uncached_tokens": 0,
        "num_used_tokens": load.used_tokens,
        "num_total_tokens": load.used_tokens,
        "max_total_num_tokens": load.max_total_tokens,
        "max_running_requests": load.max_running_requests,
        "token_usage": round(load.token_usage, 4),
        "gen_throughput": round(load.gen_throughput, 2),
        "cache_hit_rate": 0.0,
        "utilization": 0.0,
        "num_total_reqs": load.running + load.waiting,
    }


def sglang_loads(load: LoadView, timestamp: str, dp_rank: int | None) -> bytes:
    loads = [] if dp_rank not in (None, 0) else [_core_load(load)]
    n = len(loads)
    aggregate = {
        "total_running_reqs": sum(x["num_running_reqs"] for x in loads),
        "total_waiting_reqs": sum(x["num_waiting_reqs"] for x in loads),
        "total_reqs": sum(x["num_total_reqs"] for x in loads),
        "avg_token_usage": round(sum(x["token_usage"] for x in loads) / n, 4) if n else 0.0,
        "avg_throughput": round(sum(x["gen_throughput"] for x in loads) / n, 2) if n else 0.0,
        "avg_utilization": 0.0,
    }
    return orjson.dumps(
        {
            "timestamp": timestamp,
            "version": SGLANG_VERSION,
            "dp_rank_count": n,
            "loads": loads,
            "aggregate": aggregate,
        }
    )


def sglang_get_load(load: LoadView, ts_tic: float) -> bytes:
    return orjson.dumps(
        [
            {
                "dp_rank": 0,
                "num_reqs": load.running + load.waiting,
                "num_waiting_reqs": load.waiting,
                "num_tokens": load.used_tokens,
                "num_pending_tokens": 0,
                "ts_tic": ts_tic,
            }
        ]
    )


# --- Prometheus text exposition -------------------------------------------------------------


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in pairs) + "}"


def _family(lines: list[str], name: str, kind: str, help_: str, labels: str, value: float) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    lines.append(f"{name}{labels} {float(value)!r}")


def sglang_metrics(load: LoadView, model: str) -> bytes:
    labels = _labels(
        [("model_name", model), ("engine_type", "unified"), ("tp_rank", "0"), ("pp_rank", "0")]
    )
    lines: list[str] = []
    gauges = (
        ("sglang:num_running_reqs", "The number of running requests.", load.running),
        ("sglang:num_used_tokens", "The number of used tokens.", load.used_tokens),
        ("sglang:token_usage", "The token usage.", load.token_usage),
        ("sglang:gen_throughput", "The generation throughput (token/s).", load.gen_throughput),
        ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", load.waiting),
        (
            "sglang:num_grammar_queue_reqs",
            "The number of requests in the grammar waiting queue.",
            0,
        ),
        ("sglang:cache_hit_rate", "The prefix cache hit rate.", 0.0),
        (
            "sglang:max_total_num_tokens",
            "Maximum total number of tokens in the KV cache pool.",
            load.max_total_tokens,
        ),
        ("sglang:utilization", "The utilization.", 0.0),
    )
    for name, help_, value in gauges:
        _family(lines, name, "gauge", help_, labels, value)
    counters = (
        (
            "sglang:prompt_tokens_total",
            "Number of prefill tokens processed.",
            load.prompt_tokens_total,
        ),
        (
            "sglang:generation_tokens_total",
            "Number of generation tokens processed.",
            load.generation_tokens_total,
        ),
        ("sglang:num_requests_total", "Number of requests processed.", load.requests_total),
    )
    counter_labels = _labels([("model_name", model)])
    for name, help_, value in counters:
        _family(lines, name, "counter", help_, counter_labels, value)
    return ("\n".join(lines) + "\n").encode()


def vllm_metrics(load: LoadView, model: str) -> bytes:
    labels = _labels([("engine", "0"), ("model_name", model)])
    lines: list[str] = []
    families = (
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            load.running,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            load.waiting,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            load.token_usage,
        ),
        (
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            load.token_usage,
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            load.prompt_tokens_total,
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            load.generation_tokens_total,
        ),
    )
    for name, kind, help_, value in families:
        _family(lines, name, kind, help_, labels, value)
    return ("\n".join(lines) + "\n").encode()
