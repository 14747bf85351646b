"""Turn a response's timed body pieces into TTFT, ITL and token counts (pure).

The HTTP layer calls `feed(ts, data)` with each body piece and the time it arrived,
then `finish(ts)` when the response is complete. Definitions (docs/bench.md):

- a chunk is *token-bearing* when it has a choice, except a chat role announcement (a
  delta with `role` and no text, reasoning or tool call) and a finish-only chunk
  (`finish_reason` set, no text, no logprobs). A choice with empty text counts: a
  special token or a partial UTF-8 character is still a token (vLLM's rule). When the
  chunk carries a cumulative token count (continuous usage stats), that decides: the
  chunk is token-bearing when the count rose;
- TTFT is the arrival of the first token-bearing chunk;
- each later token-bearing chunk that carries k tokens adds k ITL entries of gap/k,
  where gap is the time since the previous token-bearing chunk, so TTFT + sum(ITL)
  is the arrival of the last token-bearing chunk. Tokens in the first chunk add no
  ITL entries (they arrived with the first token);
- k comes from a cumulative token count the chunk carries (SGLang `meta_info`, or an
  OpenAI chunk's `usage` with continuous usage stats), else from its logprobs entries,
  else k = 1.
"""

from __future__ import annotations

from typing import Any

import orjson

from smg.bench.stats import split_gap

KINDS = ("completions", "chat", "generate", "embeddings")
_ERROR_BODY_LIMIT = 2048


class StreamAccumulator:
    __slots__ = (
        "_buf",
        "_cum",
        "_gen_text",
        "body",
        "done",
        "error",
        "first_tokens",
        "first_ts",
        "itl",
        "kind",
        "last_ts",
        "parts",
        "status",
        "stream",
        "t_send",
        "tokens_seen",
        "usage_in",
        "usage_out",
    )

    def __init__(self, kind: str, t_send: float, stream: bool = True) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown response kind {kind!r}")
        self.kind = kind
        self.stream = stream and kind != "embeddings"
        self.t_send = t_send
        self.status = 0
        self._buf = b""
        self.body: list[bytes] = []
        self._cum = 0
        self._gen_text = ""
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.first_tokens = 0
        self.tokens_seen = 0
        self.itl: list[float] = []
        self.parts: list[str] = []
        self.usage_in: int | None = None
        self.usage_out: int | None = None
        self.done = False
        self.error: str | None = None

    # -- input ---------------------------------------------------------------------

    def on_status(self, status: int) -> None:
        self.status = status

    def feed(self, ts: float, data: bytes) -> None:
        if self.status != 200 or not self.stream:
            if self.status != 200 and sum(len(b) for b in self.body) >= _ERROR_BODY_LIMIT:
                return
            self.body.append(data)
            return
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return
        self._buf = buf[end + 2 :]
        for event in buf[:end].split(b"\n\n"):
            if event:
                self._event(ts, event)

    def finish(self, ts: float) -> None:
        """The response is complete; parses a non-streamed body and any unterminated event."""
        if self.status != 200:
            return
        if not self.stream:
            self._whole_body(ts)
            return
        if self._buf.strip():
            self._event(ts, self._buf.strip())
            self._buf = b""

    # -- results -------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def error_body(self) -> str:
        return b"".join(self.body)[:_ERROR_BODY_LIMIT].decode("utf-8", "replace")

    # -- internals -----------------------------------------------------------------

    def _event(self, ts: float, event: bytes) -> None:
        if event.startswith(b"data: ") and b"\n" not in event:
            payload = event[6:]
        else:
            lines = [ln for ln in event.split(b"\n") if ln.startswith(b"data:")]
            if not lines:
                return  # comment / keep-alive / other field
            payload = b"\n".join(ln[5:].lstrip(b" ") for ln in lines)
        payload = payload.strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = self.error or "invalid_json"
            return
        if not isinstance(obj, dict):
            self.error = self.error or "invalid_response"
            return
        try:
            self._chunk(ts, obj)
        except (AttributeError, TypeError, IndexError, KeyError):
            self.error = self.error or "invalid_response"

    def _chunk(self, ts: float, obj: dict[str, Any]) -> None:
        # Hot path (once per streamed chunk): plain dict lookups, no helper calls for the
        # common one-token chunk.
        if obj.get("error"):
            self.error = self.error or "stream_error"
            return
        if self.kind == "generate":
            self._generate_chunk(ts, obj)
            return
        usage = obj.get("usage")
        cum = None
        if usage:
            self._usage(usage)
            cum = usage.get("completion_tokens")
            if not isinstance(cum, int) or self._cum != self.tokens_seen:
                # Not a running count (continuous usage stats) but a total sent with
                # the last chunk of a stream whose earlier chunks carried none.
                cum = None
        choices = obj.get("choices")
        if not choices:
            return
        choice = choices[0]
        if self.kind == "chat":
            delta = choice.get("delta")
            if delta is None:
                return
            text = delta.get("content")
            # Text, reasoning or a tool call; an empty `content` is still a token unless
            # the chunk only announces the role or only carries the finish reason.
            said = text or delta.get("reasoning_content") or delta.get("reasoning")
            if (
                not (said or delta.get("tool_calls"))
                and ("role" in delta or choice.get("finish_reason"))
                and cum is None
                and not choice.get("logprobs")
            ):
                return  # a role announcement or a finish-only chunk: no token
        else:
            text = choice.get("text")
            if (
                not text
                and choice.get("finish_reason")
                and cum is None
                and not choice.get("logprobs")
            ):
                return  # a finish-only chunk: no token
        if cum is not None:
            if cum <= self._cum:  # the server's own count says: no new token
                if text:
                    self.parts.append(text)
                return
            k = cum - self._cum
            self._cum = cum
        elif choice.get("logprobs"):
            k = _logprob_tokens(choice) or 1
        else:
            k = 1
        self._token_event(ts, k)
        if text:
            self.parts.append(text)

    def _generate_chunk(self, ts: float, obj: dict[str, Any]) -> None:
        text = obj.get("text")
        meta = obj.get("meta_info") or {}
        new_text = ""
        if isinstance(text, str) and len(text) > len(self._gen_text):
            new_text = text[len(self._gen_text) :]
            self._gen_text = text
        cum = meta.get("completion_tokens")
        if isinstance(meta.get("prompt_tokens"), int):
            self.usage_in = meta["prompt_tokens"]
        if isinstance(cum, int):
            self.usage_out = cum
            k = cum - self._cum
            self._cum = max(cum, self._cum)
        else:
            k = 1 if new_text else 0
        if k <= 0 and not new_text:
            return
        self._token_event(ts, max(k, 1))
        if new_text:
            self.parts.append(new_text)

    def _token_event(self, ts: float, k: int) -> None:
        if self.first_ts is None:
            self.first_ts = ts
            self.first_tokens = k
        elif k == 1:
            self.itl.append(ts - self.last_ts)  # type: ignore[operator]
        else:
            self.itl.extend(split_gap(ts - self.last_ts, k))  # type: ignore[operator]
        self.last_ts = ts
        self.tokens_seen += k

    def _usage(self, usage: dict[str, Any]) -> None:
        out = usage.get("completion_tokens")
        if isinstance(out, int):
            self.usage_out = out
        pin = usage.get("prompt_tokens")
        if isinstance(pin, int):
            self.usage_in = pin

    def _whole_body(self, ts: float) -> None:
        raw = b"".join(self.body)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.error = "invalid_json"
            return
        if not isinstance(obj, dict):
            self.error = "invalid_json"
            return
        if obj.get("error"):
            self.error = "response_error"
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        if self.kind == "embeddings":
            if not isinstance(obj.get("data"), list):
                self.error = "invalid_response"
                return
            self.first_ts = self.last_ts = ts
            return
        text = ""
        if self.kind == "generate":
            text = str(obj.get("text") or "")
            meta = obj.get("meta_info") or {}
            if isinstance(meta.get("completion_tokens"), int):
                self.usage_out = meta["completion_tokens"]
            if isinstance(meta.get("prompt_tokens"), int):
                self.usage_in = meta["prompt_tokens"]
        else:
            choices = obj.get("choices") or [{}]
            choice = choices[0]
            if self.kind == "chat":
                text = str((choice.get("message") or {}).get("content") or "")
            else:
                text = str(choice.get("text") or "")
        self.first_ts = self.last_ts = ts
        self.first_tokens = 1
        self.tokens_seen = 1
        if text:
            self.parts.append(text)


def _logprob_tokens(choice: dict[str, Any]) -> int:
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        content = lp.get("content")
        if isinstance(content, list):
            return len(content)
        tokens = lp.get("tokens")
        if isinstance(tokens, list):
            return len(tokens)
    return 0
