"""Request bodies per backend (pure). Names follow `vllm bench serve`, plus SGLang's
native `/generate` and short aliases."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson

# backend -> (response kind, default endpoint)
BACKENDS: dict[str, tuple[str, str]] = {
    "openai": ("completions", "/v1/completions"),
    "vllm": ("completions", "/v1/completions"),
    "openai-chat": ("chat", "/v1/chat/completions"),
    "sglang": ("generate", "/generate"),
    "embeddings": ("embeddings", "/v1/embeddings"),
    "openai-embeddings": ("embeddings", "/v1/embeddings"),
}


@dataclass(frozen=True)
class BodyOptions:
    model: str
    stream: bool = True
    ignore_eos: bool = False
    extra_body: dict[str, Any] | None = None  # sampling overrides merged with --extra-body
    # A LoRA adapter (--lora-modules): OpenAI bodies carry it as `model` (vLLM's bench sets
    # model to it); SGLang's native /generate as `lora_path` (SGLang's bench_serving).
    lora: str | None = None


def kind_of(backend: str) -> str:
    try:
        return BACKENDS[backend][0]
    except KeyError:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        ) from None


def build_body(backend: str, prompt: str, output_len: int, opts: BodyOptions) -> bytes:
    kind = kind_of(backend)
    body: dict[str, Any]
    if kind == "completions":
        body = {"model": opts.model, "prompt": prompt, "max_tokens": output_len}
    elif kind == "chat":
        body = {
            "model": opts.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_completion_tokens": output_len,
        }
    elif kind == "generate":
        sampling: dict[str, Any] = {"max_new_tokens": output_len}
        if opts.ignore_eos:
            sampling["ignore_eos"] = True
        sampling.update(opts.extra_body or {})
        body = {"text": prompt, "sampling_params": sampling, "stream": opts.stream}
        if opts.lora:
            body["lora_path"] = opts.lora
        return orjson.dumps(body)
    else:
        body = {"model": opts.model, "input": prompt}
        body.update(opts.extra_body or {})
        return orjson.dumps(body)
    if opts.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body or {})
    return orjson.dumps(body)


def base_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    """JSON content type, OPENAI_API_KEY as a bearer token, then --header overrides."""
    headers = {"Content-Type": "application/json", "User-Agent": "smg-bench"}
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(extra or {})
    return headers
