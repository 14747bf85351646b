"""Process the response: engine outputs -> text deltas -> OpenAI / SGLang bodies and SSE.

Pure (no I/O). `ChoiceState` turns one choice's `EngineOutput`s into `Delta`s with the
tokenizer's incremental detokenizer and a stop-string matcher (the engine is sent the
stop strings too, but only the gateway sees the text, so it matches them itself across
token boundaries and hides them unless include_stop_str_in_output, as vLLM's output
processor does). The writers and `*_body` functions produce vLLM's OpenAI shapes
(`chat.completion`, `chat.completion.chunk`, `text_completion`) and SGLang's /generate
shape; every body parses with the openai client's models unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from smg.grpc.types import EngineOutput, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from smg.grpc.prepare import Prepared

_DONE = b"data: [DONE]\n\n"
# vLLM clamps -inf logprobs to this so the JSON stays valid
_MIN_LOGPROB = -9999.0


class _Detokenizer(Protocol):
    def add(self, ids: Sequence[int]) -> str: ...
    def finish(self) -> str: ...


class _Stops(Protocol):
    def feed(self, delta: str) -> tuple[str, str | None]: ...
    def finish(self) -> str: ...


@dataclass(slots=True)
class Delta:
    """What one engine output added to one choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # set once, on the choice's last delta
    matched_stop: int | str | None  # vLLM's stop_reason: the stop string or stop token id
    token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def finish_reason_of(engine_reason: str | None) -> str:
    """The engine's words -> the client's: vLLM's OpenAI server passes "stop", "length"
    and "abort" through; an engine "error" (vLLM V1) and anything unknown end as "stop"
    would hide a failure, so they become "abort"."""
    if engine_reason in ("stop", "length", "abort"):
        return engine_reason
    if engine_reason in (None, "", "eos", "stop_token", "stop_str", "matched_stop"):
        return "stop"
    return "abort"


class ChoiceState:
    """One choice: detokenizer, stop matcher, finish reason (per the interface)."""

    __slots__ = (
        "_detok",
        "_done",
        "_include_stop",
        "_min_tokens",
        "_stop_ids",
        "_stops",
        "_tokens",
        "index",
    )

    def __init__(
        self,
        index: int,
        tokenizer: Any,
        sampling: SamplingParams,
        *,
        detokenizer: _Detokenizer | None = None,
        stops: _Stops | None = None,
    ) -> None:
        self.index = index
        if detokenizer is None or (stops is None and sampling.stop):
            from smg.tokenizer import IncrementalDetokenizer, StopMatcher

            if detokenizer is None:
                detokenizer = IncrementalDetokenizer(
                    tokenizer,
                    skip_special_tokens=sampling.skip_special_tokens,
                    spaces_between_special_tokens=sampling.spaces_between_special_tokens,
                )
            if stops is None and sampling.stop:
                stops = StopMatcher(sampling.stop, include_stop=sampling.include_stop_str_in_output)
        self._detok = detokenizer
        self._stops = stops
        self._include_stop = sampling.include_stop_str_in_output
        # A finished "stop" whose last token is one of these ended on a stop token (vLLM
        # reports stop_reason None for EOS, the id for stop_token_ids).
        self._stop_ids = frozenset(sampling.stop_token_ids) | frozenset(
            getattr(tokenizer, "eos_token_ids", ()) or ()
        )
        self._min_tokens = sampling.min_tokens
        self._tokens = 0
        self._done = False

    def done(self) -> bool:
        return self._done

    def on_output(self, out: EngineOutput) -> Delta:
        if self._done:
            return Delta(self.index, "", None, None, None, [])
        ids = list(out.token_ids)
        text_ids = ids
        stop_token = (
            out.finished
            and out.finish_reason == "stop"
            and not isinstance(out.matched_stop, str)
            and bool(ids)
            and (ids[-1] == out.matched_stop or ids[-1] in self._stop_ids)
        )
        if stop_token and not self._include_stop:
            # vLLM's detokenizer skips a stop-terminated sequence's last token
            text_ids = ids[:-1]
        self._tokens += len(ids)
        text = self._detok.add(text_ids) if text_ids else ""
        if out.finished:
            text += self._detok.finish()
        stops = self._stops
        if stops is None:
            if out.finished:
                return self._finish(text, ids, out)
            return Delta(self.index, text, out.logprobs, None, None, ids)
        if self._tokens <= self._min_tokens:
            # vLLM checks stop strings only past min_tokens: this text is not matched
            if out.finished:
                return self._finish(text, ids, out)
            return Delta(self.index, text, out.logprobs, None, None, ids)
        safe, hit = stops.feed(text)
        if hit is not None:
            self._done = True
            return Delta(self.index, safe, out.logprobs, "stop", hit, ids)
        if out.finished:
            return self._finish(safe + stops.finish(), ids, out)
        return Delta(self.index, safe, out.logprobs, None, None, ids)

    def _finish(self, text: str, ids: list[int], out: EngineOutput) -> Delta:
        self._done = True
        reason = finish_reason_of(out.finish_reason)
        matched = out.matched_stop if reason == "stop" else None
        return Delta(self.index, text, out.logprobs, reason, matched, ids)


# --------------------------------------------------------------------------- logprobs


def _token_text(tokenizer: Any, token_id: int, cache: dict[int, str]) -> str:
    """vLLM's `convert_ids_list_to_tokens`: the token's own decode (special tokens kept);
    a piece of a multi-byte character decodes to U+FFFD as it does there."""
    text = cache.get(token_id)
    if text is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        cache[token_id] = text
    return text


def _lp(value: float) -> float:
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB


def chat_logprobs(
    entries: Sequence[TokenLogprob], top: int, tokenizer: Any, cache: dict[int, str]
) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` items: token, logprob, bytes, top_logprobs (best first)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        token = _token_text(tokenizer, entry.token_id, cache)
        alternatives = []
        for alt_id, alt_lp in sorted(entry.top, key=lambda p: -p[1])[:top]:
            alt = _token_text(tokenizer, alt_id, cache)
            alternatives.append(
                {
                    "token": alt,
                    "logprob": _lp(alt_lp),
                    "bytes": list(alt.encode("utf-8", "replace")),
                }
            )
        out.append(
            {
                "token": token,
                "logprob": _lp(entry.logprob),
                "bytes": list(token.encode("utf-8", "replace")),
                "top_logprobs": alternatives,
            }
        )
    return out


def completion_logprobs(
    entries: Sequence[TokenLogprob],
    top: int,
    tokenizer: Any,
    cache: dict[int, str],
    offset: int,
) -> tuple[dict[str, Any], int]:
    """Completions' logprobs (tokens, token_logprobs, top_logprobs, text_offset) and the
    text offset after them (offsets count characters of the tokens' own texts, as vLLM)."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        token = _token_text(tokenizer, entry.token_id, cache)
        tokens.append(token)
        token_logprobs.append(_lp(entry.logprob))
        alternatives: dict[str, float] = {}
        for alt_id, alt_lp in sorted(entry.top, key=lambda p: -p[1])[:top]:
            alternatives.setdefault(_token_text(tokenizer, alt_id, cache), _lp(alt_lp))
        tops.append(alternatives if top > 0 else None)
        offsets.append(offset)
        offset += len(token)
    body = {
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": tops,
    }
    return body, offset


# --------------------------------------------------------------------------- SSE writers


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Writer:
    def __init__(
        self,
        prepared: Prepared,
        request_id: str,
        model: str,
        created: int,
        tokenizer: Any,
        *,
        prompt_tokens: int = 0,
    ) -> None:
        self.p = prepared
        self.request_id = request_id
        self.model = model
        self.created = created
        self.tokenizer = tokenizer
        self.n = max(1, prepared.sampling.n)
        self.prompt_tokens = prompt_tokens  # for continuous_usage_stats; settable
        self.completion = [0] * self.n
        self._cache: dict[int, str] = {}

    def _continuous(self) -> dict[str, Any] | None:
        if not (self.p.include_usage and self.p.continuous_usage):
            return None
        done = sum(self.completion)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }


class ChatStreamWriter(_Writer):
    """vLLM's chat stream: a role chunk per choice, a chunk per non-empty delta (the
    last carries finish_reason and stop_reason), the usage chunk, `data: [DONE]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = chat_id(self.request_id)

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        usage = self._continuous()
        if usage is not None:
            obj["usage"] = usage
        return _event(obj)

    def start(self) -> bytes:
        return b"".join(
            self._chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            for i in range(self.n)
        )

    def delta(self, d: Delta) -> bytes:
        if not d.text and d.finish_reason is None and not (self.p.logprobs and d.logprobs):
            return b""
        if 0 <= d.index < self.n:
            self.completion[d.index] += len(d.token_ids)
        logprobs = None
        if self.p.logprobs and d.logprobs is not None:
            logprobs = {
                "content": chat_logprobs(
                    d.logprobs, self.p.top_logprobs, self.tokenizer, self._cache
                )
            }
        choice: dict[str, Any] = {
            "index": d.index,
            "delta": {"content": d.text} if d.text or d.finish_reason is None else {},
            "logprobs": logprobs,
            "finish_reason": d.finish_reason,
        }
        if d.finish_reason is not None:
            choice["stop_reason"] = d.matched_stop
        return self._chunk(choice)

    def end(self, usage: Usage) -> bytes:
        tail = b""
        if self.p.include_usage:
            tail = _event(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage.as_dict(),
                }
            )
        return tail + _DONE


class CompletionStreamWriter(_Writer):
    """vLLM's completions stream: `text_completion` chunks (echo: the prompt first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = completion_id(self.request_id)
        self._offsets = [0] * self.n

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        usage = self._continuous()
        if usage is not None:
            obj["usage"] = usage
        return _event(obj)

    def start(self) -> bytes:
        if not self.p.echo:
            return b""
        prompt = _prompt_text(self.p, self.tokenizer)
        out = []
        for i in range(self.n):
            self._offsets[i] = len(prompt)
            out.append(
                self._chunk({"index": i, "text": prompt, "logprobs": None, "finish_reason": None})
            )
        return b"".join(out)

    def delta(self, d: Delta) -> bytes:
        if not d.text and d.finish_reason is None and not (self.p.logprobs and d.logprobs):
            return b""
        i = d.index if 0 <= d.index < self.n else 0
        self.completion[i] += len(d.token_ids)
        logprobs = None
        if self.p.logprobs and d.logprobs is not None:
            logprobs, self._offsets[i] = completion_logprobs(
                d.logprobs, self.p.top_logprobs, self.tokenizer, self._cache, self._offsets[i]
            )
        choice: dict[str, Any] = {
            "index": d.index,
            "text": d.text,
            "logprobs": logprobs,
            "finish_reason": d.finish_reason,
        }
        if d.finish_reason is not None:
            choice["stop_reason"] = d.matched_stop
        return self._chunk(choice)

    def end(self, usage: Usage) -> bytes:
        tail = b""
        if self.p.include_usage:
            tail = _event(
                {
                    "id": self.id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage.as_dict(),
                }
            )
        return tail + _DONE


class GenerateStreamWriter(_Writer):
    """SGLang's /generate stream: per delta `data: {text, output_ids, meta_info, index}`
    with the choice's text and ids so far (SGLang's default, not incremental), then
    `data: [DONE]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._text = [""] * self.n
        self._ids: list[list[int]] = [[] for _ in range(self.n)]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]

    def start(self) -> bytes:
        return b""

    def delta(self, d: Delta) -> bytes:
        i = d.index if 0 <= d.index < self.n else 0
        if not d.text and not d.token_ids and d.finish_reason is None:
            return b""
        self._text[i] += d.text
        self._ids[i].extend(d.token_ids)
        if d.logprobs:
            self._logprobs[i].extend(d.logprobs)
        self.completion[i] = len(self._ids[i])
        usage = Usage(self.prompt_tokens, len(self._ids[i]), 0)
        obj = _generate_item(
            self.p,
            _generate_id(self.request_id, i, self.n),
            self._text[i],
            self._ids[i],
            self._logprobs[i],
            d.finish_reason,
            d.matched_stop,
            usage,
            self.tokenizer,
            self._cache,
        )
        if self.n > 1:
            obj["index"] = i
        return _event(obj)

    def end(self, usage: Usage) -> bytes:
        return _DONE


# --------------------------------------------------------------------------- bodies


def chat_id(request_id: str) -> str:
    return request_id if request_id.startswith("chatcmpl-") else f"chatcmpl-{request_id}"


def completion_id(request_id: str) -> str:
    return request_id if request_id.startswith("cmpl-") else f"cmpl-{request_id}"


def _generate_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{index}"


def _collect(
    deltas: Sequence[Delta],
) -> tuple[str, list[int], list[TokenLogprob] | None, str | None, int | str | None]:
    text = "".join(d.text for d in deltas)
    ids = [t for d in deltas for t in d.token_ids]
    logprobs: list[TokenLogprob] | None = None
    reason = None
    matched = None
    for d in deltas:
        if d.logprobs is not None:
            logprobs = (logprobs or []) + list(d.logprobs)
        if d.finish_reason is not None:
            reason = d.finish_reason
            matched = d.matched_stop
    return text, ids, logprobs, reason, matched


def chat_body(
    prepared: Prepared,
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    usage: Usage,
) -> bytes:
    """The non-streaming `chat.completion` body; `choices` holds each choice's deltas."""
    cache: dict[int, str] = {}
    out = []
    for index, deltas in enumerate(choices):
        text, _ids, logprobs, reason, matched = _collect(deltas)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if prepared.tool_choice is not None:
            calls = tool_calls_from(text, prepared.tool_choice)
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                if prepared.tool_choice == "required" and reason == "stop":
                    reason = "tool_calls"  # vLLM: "required" that stopped -> tool_calls
        out.append(
            {
                "index": index,
                "message": message,
                "logprobs": {
                    "content": chat_logprobs(
                        logprobs or [], prepared.top_logprobs, tokenizer, cache
                    )
                }
                if prepared.logprobs
                else None,
                "finish_reason": reason or "stop",
                "stop_reason": matched,
            }
        )
    return orjson.dumps(
        {
            "id": chat_id(request_id),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": usage.as_dict(),
        }
    )


def tool_calls_from(text: str, choice: str) -> list[dict[str, Any]] | None:
    """vLLM's answer for tool_choice "required" (the output is a JSON array of
    {name, parameters}) and a named function (the output is its arguments)."""
    if choice != "required":
        return [_tool_call(choice, text)]
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(items, list):
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(_tool_call(item["name"], orjson.dumps(item.get("parameters", {})).decode()))
    return calls


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _prompt_text(prepared: Prepared, tokenizer: Any) -> str:
    prompt = prepared.prompt
    if isinstance(prompt, list):
        return tokenizer.decode(prompt, skip_special_tokens=False)
    return prompt or ""


def completion_body(
    prepared: Prepared,
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    usage: Usage,
) -> bytes:
    """The non-streaming `text_completion` body (echo: the prompt leads the text)."""
    cache: dict[int, str] = {}
    prefix = _prompt_text(prepared, tokenizer) if prepared.echo else ""
    out = []
    for index, deltas in enumerate(choices):
        text, _ids, logprobs, reason, matched = _collect(deltas)
        lp = None
        if prepared.logprobs:
            lp, _ = completion_logprobs(
                logprobs or [], prepared.top_logprobs, tokenizer, cache, len(prefix)
            )
        out.append(
            {
                "index": index,
                "text": prefix + text,
                "logprobs": lp,
                "finish_reason": reason or "stop",
                "stop_reason": matched,
            }
        )
    return orjson.dumps(
        {
            "id": completion_id(request_id),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": usage.as_dict(),
        }
    )


def _sglang_finish(reason: str | None, matched: int | str | None, length: int) -> Any:
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": length}
    if reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": matched}


def _generate_item(
    prepared: Prepared,
    rid: str,
    text: str,
    ids: list[int],
    logprobs: list[TokenLogprob],
    reason: str | None,
    matched: int | str | None,
    usage: Usage,
    tokenizer: Any,
    cache: dict[int, str],
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": _sglang_finish(reason, matched, len(ids)),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
    }
    if prepared.logprobs:
        # SGLang: [logprob, token_id, text-or-None] triples; top ones per position
        with_text = prepared.return_text_in_logprobs

        def triple(token_id: int, value: float) -> list[Any]:
            return [value, token_id, _token_text(tokenizer, token_id, cache) if with_text else None]

        meta["output_token_logprobs"] = [triple(e.token_id, e.logprob) for e in logprobs]
        if prepared.top_logprobs > 0:
            meta["output_top_logprobs"] = [
                [
                    triple(t, v)
                    for t, v in sorted(e.top, key=lambda p: -p[1])[: prepared.top_logprobs]
                ]
                for e in logprobs
            ]
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def generate_body(
    prepared: Prepared,
    request_id: str,
    model: str,
    created: int,
    tokenizer: Any,
    choices: Sequence[Sequence[Delta]],
    usage: Usage,
) -> bytes:
    """SGLang's non-streaming /generate answer: one object, or a list of them for n > 1
    (each choice's own completion tokens)."""
    cache: dict[int, str] = {}
    n = len(choices)
    items = []
    for index, deltas in enumerate(choices):
        text, ids, logprobs, reason, matched = _collect(deltas)
        own = Usage(
            usage.prompt_tokens, len(ids) if n > 1 else usage.completion_tokens, usage.cached_tokens
        )
        items.append(
            _generate_item(
                prepared,
                _generate_id(request_id, index, n),
                text,
                ids,
                logprobs or [],
                reason or "stop",
                matched,
                own,
                tokenizer,
                cache,
            )
        )
    return orjson.dumps(items[0] if n == 1 else items)


def tokenize_body(
    ids: list[int], tokenizer: Any, context_length: int | None, body: dict[str, Any]
) -> bytes:
    """vLLM's /tokenize answer: count, max_model_len, tokens (+ token_strs when asked)."""
    out: dict[str, Any] = {"count": len(ids), "max_model_len": context_length or 0, "tokens": ids}
    if body.get("return_token_strs") is True:
        cache: dict[int, str] = {}
        out["token_strs"] = [
            tokenizer.id_to_token(t) or _token_text(tokenizer, t, cache) for t in ids
        ]
    else:
        out["token_strs"] = None
    return orjson.dumps(out)


def detokenize_body(body: dict[str, Any], tokenizer: Any) -> bytes:
    """vLLM's /detokenize answer: {"prompt": text} (special tokens kept, as vLLM decodes)."""
    from smg.grpc.prepare import RequestError

    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    ):
        raise RequestError(
            400, "invalid_request_error", "'tokens' must be a list of token ids", "tokens"
        )
    vocab = getattr(tokenizer, "vocab_size", 0) or 0
    if vocab and any(t >= vocab for t in tokens):
        bad = next(t for t in tokens if t >= vocab)
        raise RequestError(
            400, "invalid_request_error", f"token id {bad} is out of vocabulary", "tokens"
        )
    return orjson.dumps({"prompt": tokenizer.decode(tokens, skip_special_tokens=False)})


def embeddings_body(
    results: Sequence[tuple[list[float], int]], model: str, body: dict[str, Any]
) -> bytes:
    """The OpenAI /v1/embeddings answer; `results` are (vector, prompt tokens) per input.
    encoding_format "base64" packs little-endian float32 as OpenAI does."""
    fmt = body.get("encoding_format") or "float"
    data = []
    total = 0
    for index, (vector, tokens) in enumerate(results):
        total += tokens
        if fmt == "base64":
            import base64
            import struct

            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": index, "embedding": value})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": total, "total_tokens": total},
            "id": f"embd-{uuid.uuid4().hex}",
            "created": int(time.time()),
        }
    )
