"""What the gRPC mock generates for one choice, and when it stops (pure: no grpc, no clocks).

The engines' stop rules, as the mock applies them per generated token (`ChoiceScript.step`):

- Length first: the max_tokens-th token ends the choice with "length" (both engines check
  it before anything else).
- Nothing else stops a choice while its output, this token included, is at most
  `min_tokens` long (vLLM masks EOS and stop ids below min_tokens and checks stop strings
  only past it; SGLang's check_finished returns early below min_new_tokens). The mock has
  no logits to mask, so a stop id met that early is emitted as an ordinary token.
- vLLM: the tokenizer's own EOS (the primary one) stops with no matched_stop unless
  ignore_eos; the other EOS ids (generation_config.json's) were merged into stop_token_ids
  unless ignore_eos and, like a request's stop_token_ids (honoured even with ignore_eos),
  stop with matched_token_id. SGLang: ignore_eos turns all token stops off; otherwise any
  EOS id or stop_token_id stops with matched_token_id.
- Stop strings: the output is decoded incrementally with the tokenizer (the prefix/read
  offset scheme engines use, honouring skip_special_tokens) and searched in the tail that
  the new text can complete; a match stops with matched_stop_str. vLLM checks strings
  after the token stops and a string match overrides "length"; SGLang checks them last.
  The matched token stays in the output ids (both engines keep it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

LENGTH = "length"
STOP = "stop"
ABORT = "abort"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class OutputMode:
    """echo: the prompt's ids over and over; random: uniform over `pool`; text: `ids`
    over and over; reply: `ids` once, then the EOS (the choice stops)."""

    kind: str  # "echo" | "random" | "text" | "reply"
    ids: tuple[int, ...] = ()  # text / reply mode: the tokenized string


def parse_output_mode(text: str) -> OutputMode:
    if text in ("echo", "random"):
        return OutputMode(text)
    if text.startswith("text:") and len(text) > 5:
        return OutputMode("text")  # the ids are filled in once the tokenizer is loaded
    if text.startswith("reply:"):
        return OutputMode("reply")  # --reply-file's text (may be empty: EOS at once)
    raise ValueError("--output-mode must be echo, random, text:<string> or reply:<string>")


@dataclass
class Request:
    """A backend-neutral view of one GenerateRequest (what the mock acts on)."""

    request_id: str
    prompt: list[int]
    n: int = 1
    max_tokens: int | None = None  # None: the context length minus the prompt
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's and k alternatives
    stream: bool = True


@dataclass(frozen=True)
class Model:
    """The model facts a script needs."""

    backend: str  # "vllm" | "sglang"
    vocab_size: int
    primary_eos: int | None  # the tokenizer's own eos_token
    eos_ids: frozenset[int]  # every EOS id (tokenizer, generation_config.json, config.json)
    random_pool: tuple[int, ...] | range  # ids random mode draws from (no special tokens)
    context_length: int


class StopStrings:
    """Incremental detokenization plus a stop-string search over what it produced."""

    def __init__(self, decoder: Decoder, stops: Sequence[str], skip_special_tokens: bool) -> None:
        self._decoder = decoder
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def add(self, token: int) -> str | None:
        """Feed one token; the stop string it completes, or None."""
        ids = self._ids
        ids.append(token)
        prefix_text = self._decoder.decode(ids[self._prefix : self._read], self._skip)
        full = self._decoder.decode(ids[self._prefix :], self._skip)
        if len(full) <= len(prefix_text) or full.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        new = full[len(prefix_text) :]
        self._prefix, self._read = self._read, len(ids)
        self.text += new
        # Only a match that ends inside the new text is new.
        tail = self.text[-(len(new) + self._longest - 1) :] if self._longest > 1 else new
        best: tuple[int, str] | None = None
        for s in self._stops:
            at = tail.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        return None if best is None else best[1]


def fake_logprob(token: int) -> float:
    """A deterministic fake log-probability for a token id (in [-1.0, -0.01])."""
    return -((token % 100) + 1) / 100.0


def fake_top(token: int, k: int, vocab_size: int, backend: str) -> list[tuple[int, float]]:
    """k (id, logprob) alternatives, best first. vLLM's servicer lists the sampled token
    first and then the top ones (its logprob dict's order, cut to k); SGLang's are the
    top-k alone."""
    if k <= 0:
        return []
    alts = [((token + j) % vocab_size, -0.001 * j) for j in range(1, k + 1)]
    if backend == "vllm":
        return [(token, fake_logprob(token)), *alts][:k]
    return alts


class ChoiceScript:
    """The token stream of one choice: `step()` returns (token, finish) until finished."""

    def __init__(
        self,
        index: int,
        req: Request,
        model: Model,
        mode: OutputMode,
        decoder: Decoder | None,
        *,
        eos_after: int | None = None,
    ) -> None:
        self.index = index
        self.req = req
        self.model = model
        self.mode = mode
        self.eos_after = eos_after
        # Both engines end a choice with "length" at the context's end, whatever max_tokens says.
        budget = model.context_length - len(req.prompt)
        wanted = budget if req.max_tokens is None else min(req.max_tokens, budget)
        self.max_tokens = max(0, wanted)
        self.count = 0
        self.finish_reason: str | None = None
        self.matched: int | str | None = None
        self.tokens: list[int] = []
        self.wire_tail: Any = None  # the gRPC mock's cached encoding of this choice's fixed fields
        seed = req.seed if req.seed is not None else random.getrandbits(64)
        self._rng = random.Random(f"{seed}:{index}")
        self._stops = (
            StopStrings(decoder, req.stop, req.skip_special_tokens)
            if req.stop and decoder is not None
            else None
        )
        ids = req.prompt if mode.kind == "echo" else mode.ids
        self._cycle: Sequence[int] = ids or (model.primary_eos or 0,)
        self._reply = mode.ids if mode.kind == "reply" else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _next(self) -> int:
        n = self.count
        m = self.model
        if (
            self.eos_after is not None
            and n >= self.eos_after
            and n >= self.req.min_tokens
            and m.primary_eos is not None
            and not self.req.ignore_eos
        ):
            return m.primary_eos
        if self.mode.kind == "random":
            pool = m.random_pool
            return pool[self._rng.randrange(len(pool))]
        if self._reply is not None:
            return self._reply[n] if n < len(self._reply) else (m.primary_eos or 0)
        return self._cycle[n % len(self._cycle)]

    def _token_stop(self, token: int) -> tuple[bool, int | None]:
        """Whether `token` stops the choice, and the matched id the engine reports."""
        req, m = self.req, self.model
        if m.backend == "vllm":
            if token == m.primary_eos and not req.ignore_eos:
                return True, None
            if token in req.stop_token_ids or (token in m.eos_ids and not req.ignore_eos):
                return True, token
            return False, None
        if req.ignore_eos:
            return False, None
        if token in m.eos_ids or token in req.stop_token_ids:
            return True, token
        return False, None

    def step(self) -> int:
        """Generate the next token and decide whether it finishes the choice."""
        token = self._next()
        self.count += 1
        self.tokens.append(token)
        past_min = self.count > self.req.min_tokens
        matched_str = self._stops.add(token) if self._stops is not None else None
        if self.count >= self.max_tokens:
            self.finish_reason = LENGTH
            if self.model.backend == "vllm" and past_min and matched_str is not None:
                self.finish_reason, self.matched = STOP, matched_str
            return token
        reply = self._reply
        if reply is not None and self.count > len(reply):
            # The reply is over: the engine's EOS ends it, whatever ignore_eos/min_tokens say
            # (a reply is a fixed script). vLLM names no matched id for its own EOS.
            self.finish_reason = STOP
            self.matched = None if self.model.backend == "vllm" else token
            return token
        if not past_min:
            return token
        stops, matched = self._token_stop(token)
        if stops:
            self.finish_reason, self.matched = STOP, matched
        elif matched_str is not None:
            self.finish_reason, self.matched = STOP, matched_str
        return token

    def abort(self) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.matched = ABORT, None
