"""Prefill/decode disaggregation over HTTP, SGLang's way (issue 17).

Each request goes to one prefill worker (--prefill-policy, else --policy) and one decode
worker (--decode-policy, else --policy) at once, with the same JSON body plus
`bootstrap_host` / `bootstrap_port` / `bootstrap_room` (arrays for a batch), which the two
engines use to meet and hand the KV cache over. The client gets the decode worker's
answer; the prefill's answer is read and dropped (or mined for input logprobs).

The Rust SMG 1.13 (model_gateway/src/routers/http/pd_router.rs, and the binary tried with
the same bytes) fixes the behaviour matched here:

- room: a random 63-bit integer (`rand::random::<u64>() & i64::MAX`), one per batch item;
  batch size: /generate `input_ids` as a list of lists, chat `n > 1`, completions `prompt`
  as a list; the same body (stream flag included) goes to both legs;
- the decode answer is relayed only once the prefill answered: the decode's error first
  (`decode_*` codes, the worker's message), then the prefill's (`prefill_*` codes,
  "Prefill server error (500 Internal Server Error): <body>"), then the decode answer,
  with `meta_info.input_token_logprobs` = prefill's + decode's when logprobs were asked
  (each event of a stream, or the whole answer);
- a transport failure on either leg aborts both: 502, code
  "PD disaggregation request failed", message "Transport error: error sending request
  for url (<url>)".

Pure parts (injection, batch size, logprob merge, error mapping) are functions tested
directly (tests/test_pd_dispatch.py); `PDRouter` wires them into the data plane: the
decode leg is an `Exchange` (`DecodeExchange`) whose upstream events are held until the
prefill leg (`PrefillLeg`, a bare collector on the same worker pools) resolves.
"""

from __future__ import annotations

import asyncio
import random
import time
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson

from smg.dataplane.exchange import Exchange
from smg.dataplane.gate import CLIENT_LEFT
from smg.dataplane.lifecycle import EVENT_COUNT, FLAT, Action, Event, State
from smg.dataplane.metrics import DURATION_BUCKETS, Histogram, histogram_samples
from smg.dataplane.pd_admission import PrefillAdmission
from smg.dataplane.pd_health import NO_ANSWER, probe_pair
from smg.dataplane.pd_health import PATH as HEALTH_PATH
from smg.dataplane.pd_health import Pending as HealthPending
from smg.dataplane.pd_health import verdict as health_verdict
from smg.dataplane.pd_window import DecodeWindow, Hold
from smg.dataplane.pool_leg import PoolLeg
from smg.dataplane.retry import RETRYABLE_STATUSES
from smg.dp import pd_rank_fields
from smg.httpwire import error_body, status_line
from smg.policies.base import NoEligibleWorker, RouteRequest
from smg.promtext import Family, Sample
from smg.worker_url import worker_address

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request
    from smg.dataplane.upstream import UpstreamConnection, WorkerPool
    from smg.policies.base import Policy
    from smg.shm.directory import DirectoryEntry

PD_ROUTES = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
ROOM_BITS = 63  # [0, 2**63 - 1], as SGLang's random.randint(0, 2**63 - 1)
TRANSPORT_CODE = "PD disaggregation request failed"  # 1.13's code, spaces and all
# An error or logprob answer from a leg is read whole; past this it is cut (no error
# message or prefill answer is this large).
MAX_HELD_BYTES = 16 * 1024 * 1024
_STREAM_DONE = b"[DONE]"

# --- pure parts ----------------------------------------------------------------------------


def new_rooms(count: int | None, rng: random.Random | None = None) -> list[int]:
    """`count` rooms (one when `count` is None), each uniform in [0, 2**63 - 1]."""
    bits = (rng or _RNG).getrandbits
    return [bits(ROOM_BITS) for _ in range(count or 1)]


_RNG = random.SystemRandom()
# A PD histogram's key: the model (HTTP PD, runtime "sglang") or (model, runtime) (gRPC PD).
HistKey = str | tuple[str, str]


def batch_size(path: str, body: dict[str, Any]) -> int | None:
    """How many bootstrap entries a request carries (None: one, as scalars), 1.13's rule:
    /generate with `input_ids` a non-empty list of lists; chat with `n` > 1; completions
    with `prompt` a non-empty list. (A /generate `text` list is refused by 1.13's parser;
    here it passes as scalars and the engine decides.)"""
    if path == "/generate":
        ids = body.get("input_ids")
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            return len(ids)
        return None
    if path == "/v1/chat/completions":
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            return n
        return None
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            return len(prompt)
    return None


def inject_bootstrap(
    body: dict[str, Any], host: str, port: int | None, batch: int | None, rooms: list[int]
) -> None:
    """Add the three bootstrap fields to `body` in place: scalars, or arrays of `batch`
    entries (`rooms` has one room per entry)."""
    if batch is None:
        body["bootstrap_host"] = host
        body["bootstrap_port"] = port
        body["bootstrap_room"] = rooms[0]
    else:
        body["bootstrap_host"] = [host] * batch
        body["bootstrap_port"] = [port] * batch
        body["bootstrap_room"] = rooms[:batch]


def wants_logprobs(path: str, body: dict[str, Any]) -> bool:
    """Whether the client asked for logprobs (1.13: /generate `return_logprob`, chat
    `logprobs`, completions `logprobs` present)."""
    if path == "/generate":
        return body.get("return_logprob") is True
    if path == "/v1/chat/completions":
        return body.get("logprobs") is True
    return body.get("logprobs") is not None


def prefill_logprobs(answer: bytes) -> list[Any] | None:
    """`meta_info.input_token_logprobs` of a prefill answer, or None."""
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    meta = value.get("meta_info") if isinstance(value, dict) else None
    found = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    return found if isinstance(found, list) else None


def merge_logprobs(prefill: list[Any], decode: Any) -> bool:
    """Put `prefill` in front of the decode answer's `meta_info.input_token_logprobs`
    (in place); False when the decode answer has no such list (left as it is)."""
    meta = decode.get("meta_info") if isinstance(decode, dict) else None
    own = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    if not isinstance(own, list):
        return False
    meta["input_token_logprobs"] = prefill + own
    return True


def merge_answer(prefill: list[Any], answer: bytes) -> bytes:
    """A whole decode answer with the prefill's input logprobs merged (re-encoded), or the
    answer as it is when it has nowhere to put them."""
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return answer
    return orjson.dumps(value) if merge_logprobs(prefill, value) else answer


class StreamMerger:
    """Merges the prefill's input logprobs into each `data:` event of a decode stream.
    Events are cut at blank lines (an event split over reads is joined first); events
    that are not JSON objects with the list (`[DONE]`, comments) pass unchanged."""

    __slots__ = ("pending", "prefill")

    def __init__(self, prefill: list[Any]) -> None:
        self.prefill = prefill
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self.pending = data
            return b""
        self.pending = data[end + 2 :]
        events = data[: end + 2].split(b"\n\n")
        return b"".join(self._event(event) for event in events[:-1])

    def finish(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        if event.startswith(b"data: ") and b"\n" not in event:
            payload = event[6:].strip()
            if payload != _STREAM_DONE:
                try:
                    value = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    value = None
                if value is not None and merge_logprobs(self.prefill, value):
                    return b"data: " + orjson.dumps(value) + b"\n\n"
        return event + b"\n\n"


_PREFILL_CODES = {
    400: "prefill_bad_request",
    404: "prefill_not_found",
    500: "prefill_internal_error",
    502: "prefill_bad_gateway",
    503: "prefill_unavailable",
}
_DECODE_CODES = {
    400: "decode_bad_request",
    404: "decode_not_found",
    500: "decode_internal_error",
    502: "decode_bad_gateway",
    503: "decode_unavailable",
}


def _phrase(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def prefill_error(status: int, body: bytes) -> tuple[int, str, str]:
    """(status, code, message) the client gets for a prefill's error answer: 1.13 keeps
    400/404/500/502/503 and makes anything else a 500 `prefill_error`."""
    code = _PREFILL_CODES.get(status)
    text = body.decode("utf-8", "replace")
    message = f"Prefill server error ({_phrase(status)}): {text}"
    return (status, code, message) if code else (500, "prefill_error", message)


def decode_error(status: int, body: bytes) -> tuple[int, str, str]:
    """(status, code, message) for a decode's error answer (not a stream): the worker's
    `error.message`, else its `message`, else the body as text."""
    message = body.decode("utf-8", "replace")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        elif isinstance(value.get("message"), str):
            message = value["message"]
    code = _DECODE_CODES.get(status)
    return (status, code, message) if code else (500, "decode_error", message)


def decode_stream_error(status: int, body: bytes) -> bytes:
    """The one SSE event 1.13 answers (with the decode's status) when a streamed request's
    decode leg fails: `data: {"error": {"message": <the body, JSON if it is>, "status"}}`."""
    try:
        message: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        message = body.decode("utf-8", "replace")
    return b"data: " + orjson.dumps({"error": {"message": message, "status": status}}) + b"\n\n"


def transport_message(url: str, path: str) -> str:
    return f"Transport error: error sending request for url ({url}{path})"


# --- the prefill leg -------------------------------------------------------------------------

_CLIENT_GONE = int(Event.CLIENT_GONE)
_BACKOFF = int(State.BACKOFF)
_BACKOFF_OVER = int(Event.BACKOFF_OVER)
_NO_WORKER = int(Event.NO_WORKER)
_ATTEMPT = int(Action.ATTEMPT)
_FAIL_NO_WORKER = int(Action.FAIL_NO_WORKER)
_HEAD_EVENT, _BODY_EVENT, _COMPLETE_EVENT = 0, 1, 2


class PrefillLeg(PoolLeg):
    """The prefill request: sent on the prefill worker's pool, its answer read (kept only
    when it is an error or carries logprobs asked for), then `DecodeExchange.prefill_done`.
    Speaks the pool's and the upstream connection's side of the exchange protocol."""

    __slots__ = ("chunks", "decode", "generation", "keep", "row", "sent_at", "size", "url")

    def __init__(
        self,
        app: DataPlane,
        decode: DecodeExchange,
        row: int,
        generation: int,
        pool: WorkerPool,
        head: bytes,
        body: bytes,
        url: str,
        keep: bool,
    ) -> None:
        super().__init__(app, pool, head, body)
        self.decode = decode
        self.row = row
        self.generation = generation
        self.url = url
        self.keep = keep  # keep a 2xx body (logprobs asked for)
        self.chunks: list[bytes] = []
        self.size = 0
        self.sent_at = time.monotonic()

    def response_body(self, chunk: bytes) -> None:
        if (self.keep or self.status >= 300) and self.size < MAX_HELD_BYTES:
            self.chunks.append(chunk)
            self.size += len(chunk)

    def flush(self) -> None:
        if self.complete and not self.done:
            self._release()
            self._end(self.status)
            decode = self.decode
            if decode.prefill is not self:
                return  # an attempt that ended meanwhile
            if self.status < 300:
                pd = self.app.pd
                assert pd is not None
                pd.observe(pd.prefill_durations, decode.model, time.monotonic() - self.sent_at)
            decode.prefill_done(self.status, b"".join(self.chunks))

    def _failed(self) -> None:
        if self.done:
            return
        self._drop()
        self._end(0)
        if self.decode.prefill is self:
            self.decode.prefill_failed(self.url)

    def abort(self, outcome: int = 0) -> None:
        """The decode leg ended first (its failure, the client gone, a timeout); `outcome`
        is the gate's for this leg (CLIENT_LEFT: the prefill worker is not to blame)."""
        if self.done:
            return
        self._drop()
        self._end(outcome)

    def _end(self, outcome: int) -> None:
        self.done = True
        pd = self.app.pd
        assert pd is not None
        pd.leg_done(self.row, self.generation, outcome, dispatched=True)


# --- the decode leg ----------------------------------------------------------------------------


class DecodeExchange(Exchange):
    """The decode request as a plain relay, except that its upstream events wait in
    `pd_held` until the prefill leg resolves (`prefill_done` replays them, `prefill_failed`
    answers the error instead), and that error answers and logprob merges take 1.13's
    shapes. Retries are off: a new attempt needs a new pair and room."""

    __slots__ = (
        "err",
        "logprobs",
        "merger",
        "pd_admitted",
        "pd_body",
        "pd_failed",
        "pd_held",
        "pd_hold",
        "pd_url",
        "prefill",
        "whole",
    )

    def pd_init(self, prefill: PrefillLeg, url: str, logprobs: bool) -> None:
        """(Re)arm for an attempt: its prefill leg and decode URL."""
        self.prefill = prefill
        self.pd_hold: Hold | None = None
        self.pd_url = url
        self.pd_held: list[tuple[int, Any, Any]] | None = []
        self.logprobs: list[Any] | None = [] if logprobs else None
        self.err: list[bytes] | None = None  # the decode answered an error: its body
        self.whole: list[bytes] | None = None  # a whole answer held for the logprob merge
        self.merger: StreamMerger | None = None

    def pd_retries(self, body: dict[str, Any] | None) -> None:
        """Let a failed pair be retried as 1.13 does (a new pair, a new room): `body` is
        the client's JSON without bootstrap fields (None: retries off)."""
        self.pd_body = body
        self.pd_failed: list[int] = []  # prefill rows an attempt failed on

    # upstream events: held while the prefill runs
    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status < 300:
            # 1.13's smg_pd_ttft_seconds: dispatch to the decode answer's head.
            pd = self.app.pd
            assert pd is not None
            pd.observe(pd.ttfts, self.model, time.monotonic() - self.prefill.sent_at)
        if self.pd_held is not None:
            self.pd_held.append((_HEAD_EVENT, status, headers))
        else:
            self._head(status, headers)

    def response_body(self, chunk: bytes) -> None:
        if self.pd_held is not None:
            self.pd_held.append((_BODY_EVENT, chunk, None))
        else:
            self._body(chunk)

    def response_complete(self, upstream_keep_alive: bool) -> None:
        if self.pd_held is not None:
            self.pd_held.append((_COMPLETE_EVENT, upstream_keep_alive, None))
        else:
            self._complete(upstream_keep_alive)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        held = self.pd_held
        if held is not None and conn is self.upstream:
            if held and held[-1][0] == _COMPLETE_EVENT:
                return  # the answer is whole: only its connection is gone
            self._transport_failed(self.pd_url)
            return
        super().upstream_lost(conn)

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status >= 300:
            self.err = []
            self.status = status
            return
        logprobs = self.logprobs
        if logprobs:
            if self.stream:
                self.merger = StreamMerger(logprobs)
            else:
                self.whole = []
                self.held_headers = headers
                self.status = status
                return
        super().response_head(status, headers)

    def _body(self, chunk: bytes) -> None:
        held = self.err if self.err is not None else self.whole
        if held is not None:
            if sum(map(len, held)) < MAX_HELD_BYTES:
                held.append(chunk)
            return
        merger = self.merger
        if merger is not None:
            chunk = merger.feed(chunk)
            if not chunk:
                return
        super().response_body(chunk)

    def _complete(self, keep_alive: bool) -> None:
        if self.err is not None:
            self.upstream_reusable = keep_alive
            self._decode_failed(self.status, b"".join(self.err))
            return
        if self.whole is not None:
            body = merge_answer(self.logprobs or [], b"".join(self.whole))
            headers = [
                (name, value)
                for name, value in self.held_headers or ()
                if name not in (b"content-length", b"transfer-encoding")
            ]
            headers.append((b"content-length", b"%d" % len(body)))
            self.whole = None
            super().response_head(self.status, headers)
            super().response_body(body)
        elif self.merger is not None:
            rest = self.merger.finish()
            if rest:
                super().response_body(rest)
        super().response_complete(keep_alive)

    # the prefill's outcome
    def prefill_done(self, status: int, body: bytes) -> None:
        held = self.pd_held
        if held is None:
            return
        if status >= 300:
            # The decode's own error comes first (1.13 reads the decode status first).
            if held and held[0][1] >= 300:
                self._replay(held)
                return
            code_status, code, message = prefill_error(status, body)
            self._pd_fail(code_status, code, message)
            return
        if self.logprobs is not None:
            self.logprobs = prefill_logprobs(body) or []
        self._replay(held)

    def _replay(self, held: list[tuple[int, Any, Any]]) -> None:
        self.pd_held = None
        try:
            for kind, first, second in held:
                if kind == _HEAD_EVENT:
                    self._head(first, second)
                elif kind == _BODY_EVENT:
                    self._body(first)
                else:
                    self._complete(first)
                if self.state == _DONE or self.state == _BACKOFF:
                    return  # answered by the gateway itself, or a new attempt is due
            self.flush()
        except Exception as exc:  # a request must never take the process down
            self.app.log_error("relaying a decode answer failed", exc)
            self.client.close()

    def prefill_failed(self, url: str) -> None:
        if self.pd_held is not None:
            self._transport_failed(url)

    def _transport_failed(self, url: str) -> None:
        self._pd_fail(502, TRANSPORT_CODE, transport_message(url, self.endpoint))

    def _decode_failed(self, status: int, body: bytes) -> None:
        if self.stream:
            self._pd_answer(status, decode_stream_error(status, body), b"text/event-stream", "")
            return
        code_status, code, message = decode_error(status, body)
        self._pd_fail(code_status, code, message)

    def _pd_fail(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        self._pd_answer(status, error_body(status, code, message), b"application/json", code, extra)

    def _pd_answer(
        self, status: int, body: bytes, content_type: bytes, code: str, extra: bytes = b""
    ) -> None:
        """Answer the client with the gateway's own `body` instead of the decode's; or,
        for a retryable status with attempts left, try a new pair instead (1.13 retries
        the whole dispatch, `is_retryable_status`, new room and all)."""
        if (
            status in RETRYABLE_STATUSES
            and self.pd_body is not None
            and self.attempts < self.max_attempts
        ):
            self._pd_retry(0 if code == TRANSPORT_CODE else status)
            return
        self.pd_held = None
        self.state, _action = _step(self.state)
        self._drop_upstream()
        self.prefill.abort()
        keep_alive = self.keep_alive and not self.app.draining
        outcome = status if code != TRANSPORT_CODE else 0
        status, code = self._write_own(status, body, content_type, code, extra, keep_alive)
        self._finish(status, code, outcome)
        self.client.response_done(keep_alive)

    def _write_own(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        code: str,
        extra: bytes,
        keep_alive: bool,
    ) -> tuple[int, str]:
        """Write a whole answer the gateway made itself, through the OnResponse modules
        when they see this request's answers (1.13's middleware runs on every answer of
        the serving routes, the PD router's own errors included; not on event streams):
        the status and error code written."""
        if code:
            extra = b"x-smg-error-code: %b\r\n%b" % (code.encode("latin-1"), extra)
        chain = getattr(self.translation, "chain", None)  # smg.wasm.chain.ResponseHook
        if chain is not None and content_type != b"text/event-stream":
            from smg.wasm.chain import local_answer

            answer = local_answer(chain, status, content_type, extra, body, code)
            status, content_type, extra = answer.status, answer.content_type, answer.extra
            body, code = answer.body, answer.code
        app = self.app
        head = [
            status_line(status),
            b"content-type: %b\r\ncontent-length: %d\r\n" % (content_type, len(body)),
            extra,
            b"x-request-id: %b\r\n%b" % (self.request_id, app.process_header),
        ]
        if app.cors is not None:
            head.append(self.cors)
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        head.append(body)
        self.out.clear()
        self.client.write(b"".join(head))
        return status, code

    def _pd_retry(self, outcome: int) -> None:
        """End this attempt (both legs) and schedule the next one after the backoff."""
        self.pd_held = None
        prefill = self.prefill
        prefill.abort()
        if prefill.row not in self.pd_failed:
            self.pd_failed.append(prefill.row)
        if self.upstream is None:
            self.pool.cancel_wait(self)
        # Straight to BACKOFF: the attempt may end in any pre-head state (the prefill can
        # fail while the decode still waits for a connection), which the table's retry
        # edges do not all cover; nothing reached the client, so a new attempt is safe.
        self.state = _BACKOFF
        self.upstream_reusable = False  # a request is in flight on it: drop it
        self._retry(outcome)

    def _backoff_over(self) -> None:
        self.timer = None
        if self._advance(_BACKOFF_OVER) != _ATTEMPT:
            return
        pd = self.app.pd
        assert pd is not None
        try:
            refusal = pd.next_attempt(self)
        except Exception as exc:  # a request must never take the process down
            self.app.log_error("PD retry failed", exc)
            refusal = (502, "internal_error", "internal gateway error while retrying")
        if refusal is not None:
            if self._advance(_NO_WORKER) == _FAIL_NO_WORKER:
                self.pd_body = None  # no further attempt
                self._pd_fail(*refusal)
            return
        self.attempts += 1
        pd.go(self)

    # the decode window (smg.dataplane.pd_window): a held decode leg
    def pd_wait(self, window: DecodeWindow) -> None:
        """Hold the decode leg (the prefill leg is on its way) until its row has a slot."""
        self.attempting = False  # nothing counted for the decode until it is admitted
        self.pd_hold = window.hold(self.row, self.generation, self._pd_admitted, self._pd_shed)

    def _pd_admitted(self) -> None:
        """A slot was taken (in flight counted): the decode leg goes."""
        self.pd_hold = None
        self.attempting = True
        self.app.policy.on_dispatch(self.row)
        self.start()

    def _pd_shed(self) -> None:
        """No slot in time: 503 worker_overload_protection_shed, the prefill aborted (not
        retried: another attempt would find the same full window)."""
        self.pd_hold = None
        self.pd_body = None
        self.app.gate.record(self.row, self.generation, CLIENT_LEFT)  # the claim, unused
        self.prefill.abort(CLIENT_LEFT)  # not the prefill worker's failure
        pd = self.app.pd
        assert pd is not None
        self._pd_fail(*pd.window.shed(self.row, self.model))

    def _unhold(self) -> None:
        """The attempt ended while its decode leg was held: the hold and the claim go."""
        hold = self.pd_hold
        if hold is not None:
            self.pd_hold = None
            pd = self.app.pd
            assert pd is not None
            pd.window.release(hold)
            self.app.gate.record(self.row, self.generation, CLIENT_LEFT)

    def _retry(self, outcome: int, *, immediate: bool = False) -> None:
        # Every retry ends the attempt's prefill leg too (a new pair, a new room).
        self.pd_held = None
        self._unhold()
        self.prefill.abort()
        if not self.attempting and self.app.tracer is not None:
            # A held decode leg's attempt counted nothing, so `_end_attempt` skips it; its
            # span ends here (the next attempt's would replace it unrecorded).
            self.trace.end_attempt(outcome, "" if outcome else "upstream transport failure")
        super()._retry(outcome, immediate=immediate)

    def _fail(self, status: int, code: str, message: str, *, extra_headers: bytes = b"") -> None:
        if status == 502 and code.startswith("upstream_"):
            # The decode worker unreachable or gone: both legs end, 1.13's words (and its
            # retry of the whole pair while attempts are left).
            if self.pd_body is not None and self.attempts < self.max_attempts:
                self._pd_retry(0)
                return
            self.pd_held = None
            code, message = TRANSPORT_CODE, transport_message(self.pd_url, self.endpoint)
        # The base's write, through the OnResponse modules (PD routes: POST, OpenAI shape).
        self._drop_upstream()
        keep_alive = self.keep_alive and not self.app.draining
        body = error_body(status, code, message)
        status, code = self._write_own(
            status, body, b"application/json", code, extra_headers, keep_alive
        )
        self._finish(status, code, 0)
        self.client.response_done(keep_alive)

    def client_gone(self) -> None:
        # The client leaving says nothing of the prefill worker (1.13 records no outcome
        # for a dropped request; the decode's attempt records CLIENT_LEFT): its leg ends
        # first, so that `_finish` does not count it as a transport failure.
        self.prefill.abort(CLIENT_LEFT)
        super().client_gone()

    def _finish(self, status: int, error_code: str, outcome: int) -> None:
        self._unhold()
        self.prefill.abort()  # no-op once it resolved
        super()._finish(status, error_code, outcome)
        pd = self.app.pd
        assert pd is not None
        pd.window.freed()  # a decode slot of this process may have come free


_DONE = int(State.DONE)


def _step(state: int) -> tuple[int, int]:
    """Move an exchange answered by the gateway itself to its end state (the table's
    client-gone edge: drop the upstream, which `_pd_answer` does)."""
    return FLAT[state * EVENT_COUNT + _CLIENT_GONE]


# --- routing -----------------------------------------------------------------------------------

_NO_PREFILL = "No available servers: No available prefill workers (all circuits open or unhealthy)"
_NO_DECODE = "No available servers: No available decode workers (all circuits open or unhealthy)"


class PDRouter:
    """This process's PD dispatch: the two policies, the prefill admission, the counters."""

    def __init__(self, app: DataPlane, cfg: GatewayConfig, prefill_policy: Policy) -> None:
        from smg.dataplane.app import _TextFields, prompt_text

        self.app = app
        self.prefill_policy = prefill_policy
        self.needs_text = prefill_policy.needs_text
        self._fields = _TextFields
        self._prompt_text = prompt_text
        self.directory_generation = -1
        self.routing_generation = -1
        self.types: dict[int, str] = {}
        # (kind, model or None) -> ready rows; kind -> models its workers serve (any status).
        self.ready: dict[tuple[str, str | None], list[int]] = {}
        self.known: dict[str, set[str | None]] = {}
        self.admission = PrefillAdmission.from_config(app, cfg)
        self.window = DecodeWindow(app, float(getattr(cfg, "pd_admission_wait_secs", 30)))
        # Counters (smg_pd_*; summed over processes by the reader), by model label.
        self.dispatched = 0
        # Histogram keys: HTTP's are models (runtime sglang); smg.grpc.pd's (model, runtime).
        self.prefill_durations: dict[HistKey, Histogram] = {}
        self.ttfts: dict[HistKey, Histogram] = {}
        # gRPC PD only, as on the 1.13 binary (its HTTP router records neither): the decode
        # phase (decode dispatch to first token) and the vLLM relay phase (prefill end to
        # decode dispatch).
        self.decode_ttfts: dict[HistKey, Histogram] = {}
        self.kv_transfers: dict[HistKey, Histogram] = {}
        self.kv_modes: dict[str, int] = {}  # vLLM sequential PD's connector mode -> requests

    # --- the request path ---------------------------------------------------------------

    def proxy(
        self,
        conn: ClientConnection,
        request: Request,
        started: float,
        queued: bool = False,
        parsed: dict[str, Any] | None = None,
    ) -> bool:
        """Route and dispatch one request, or answer it; False only for a request from the
        prefill queue (`queued`) that still finds no free prefill slot (left queued).
        `parsed`: a queued request's body, parsed and checked when it came (the queue tries
        its head every millisecond: parsing a large body each time would hold the loop)."""
        app = self.app
        path = request.path
        if path not in PD_ROUTES:
            app._send_error(
                conn,
                request,
                501,
                "not_implemented",
                f"{path} is not supported by the prefill/decode router",
            )
            return True
        if parsed is not None:
            body = parsed
        else:
            try:
                body = orjson.loads(request.body)
            except orjson.JSONDecodeError as exc:
                app._send_error(conn, request, 400, "invalid_json", f"invalid JSON body: {exc}")
                return True
            if not isinstance(body, dict):
                message = "Request must be a JSON object"
                app._send_error(conn, request, 400, "invalid_request", message)
                return True
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            app._send_error(conn, request, 400, "invalid_request", "'model' must be a string")
            return True
        state = app.refresh()
        model = state.aliases.get(model, model) if model else None
        if self.routing_generation != state.routing_generation:
            self._rebuild(state)
        known = self.known
        if model is not None and not any(
            model in known.get(kind, ()) or None in known.get(kind, ())
            for kind in ("prefill", "decode")
        ):
            app._send_error(
                conn, request, 404, "model_not_found", f"No worker available for model '{model}'"
            )
            return True
        grpc = app.grpc
        if grpc is not None and grpc.pd_rows:  # a gRPC PD fleet: smg.grpc.pd serves it
            from smg.grpc.pd import handle

            taken = handle(grpc, conn, request, body, model, started, queued)
            if taken is not None:
                return taken
        route = RouteRequest(model=model, stream=body.get("stream") is True)
        if app.needs_text or self.needs_text:
            route.text = self._text(path, body)
        prefill_rows = self._rows("prefill", model)
        decode_rows = self._rows("decode", model)
        refusal = self._no_pair(prefill_rows, decode_rows)
        if refusal is not None:
            app._send_error(conn, request, 503, "server_selection_failed", refusal)
            return True
        admission = self.admission
        if admission is not None:
            prefill_rows = admission.free(prefill_rows)
            if not prefill_rows:
                if queued:
                    return False
                admission.wait(conn, request, started, body)
                return True
        prefill = self._choose(self.prefill_policy, prefill_rows, route)
        if prefill >= 0 and admission is not None:
            generation = state.entries[prefill].generation
            if not admission.take(prefill, generation):
                app.gate.record(prefill, generation, CLIENT_LEFT)  # the claim, unused
                if queued:
                    return False
                admission.wait(conn, request, started, body)
                return True
        if prefill < 0:
            app._send_error(conn, request, 503, "server_selection_failed", _NO_PREFILL)
            return True
        decode, admitted = self.window.pick(
            partial(self._choose, app.policy, route=route), decode_rows
        )
        if decode < 0 or not (admitted or self.window.wait > 0):
            self.leg_done(prefill, state.entries[prefill].generation, CLIENT_LEFT)
            if decode < 0:
                app._send_error(conn, request, 503, "server_selection_failed", _NO_DECODE)
                return True
            # --pd-admission-wait-secs 0: shed at once, nothing dispatched.
            app.gate.record(decode, state.entries[decode].generation, CLIENT_LEFT)
            status, code, message, extra = self.window.shed(decode, model)
            app._send_error(conn, request, status, code, message, extra_headers=extra)
            return True
        self._dispatch(conn, request, started, body, route, model, prefill, decode, admitted)
        return True

    def _text(self, path: str, body: dict[str, Any]) -> str | None:
        """The prompt text the policies route on: /generate's `text` (1.13: the body's
        text, a string only), else what the plain path reads (messages, prompt)."""
        if path == "/generate":
            text = body.get("text")
            return text if isinstance(text, str) else None
        fields = self._fields(messages=body.get("messages"), prompt=body.get("prompt"))
        return self._prompt_text(fields)

    def _rebuild(self, state: Any) -> None:
        """The ready prefill and decode rows by model, from the table (the plain path's
        lists leave PD workers out), and the prefill policy told the fleet."""
        from smg.shm.layout import FLAG_IN_USE
        from smg.shm.readiness import routable

        entries = state.entries
        if self.directory_generation != state.directory_generation:
            self.types = {row: e.spec.worker_type for row, e in entries.items()}
            self.prefill_policy.on_directory(
                {row: (e.generation, e.url) for row, e in entries.items()}
            )
            self.directory_generation = state.directory_generation
        ready: dict[tuple[str, str | None], list[int]] = {}
        known: dict[str, set[str | None]] = {}
        table = self.app.table
        for row, entry in sorted(entries.items()):
            kind = entry.spec.worker_type
            if kind != "prefill" and kind != "decode":
                continue
            value = table.read_row(row)
            if value.generation != entry.generation or not value.flags & FLAG_IN_USE:
                continue
            models: tuple[str | None, ...] = entry.models or (
                (entry.model_id,) if entry.model_id else (None,)
            )
            known.setdefault(kind, set()).update(models)
            if routable(value, entry.generation):
                ready.setdefault((kind, None), []).append(row)
                for model in models:
                    if model is not None:
                        ready.setdefault((kind, model), []).append(row)
                    else:
                        ready.setdefault((kind, ""), []).append(row)  # serves any model
        self.ready = ready
        self.known = known
        self.routing_generation = state.routing_generation

    def _rows(self, kind: str, model: str | None) -> list[int]:
        """Ready `kind` rows that serve `model` (every ready one without a model)."""
        ready = self.ready
        if model is None:
            return ready.get((kind, None), [])
        own = ready.get((kind, model), [])
        wildcard = ready.get((kind, ""))
        return own + wildcard if wildcard else own

    def info(self, conn: ClientConnection, request: Request, started: float) -> None:
        """A worker-info GET (/get_model_info, /get_server_info) relayed to the first ready
        prefill worker, as 1.13's PD router does (503 no_prefill_servers without one);
        /health_generate asks a pair (smg.dataplane.pd_health)."""
        app = self.app
        state = app.refresh()
        if self.routing_generation != state.routing_generation:
            self._rebuild(state)
        if request.path == HEALTH_PATH:
            self._health_generate(conn, request)
            return
        rows = self._rows("prefill", None)
        if not rows:
            app._send_error(
                conn, request, 503, "no_prefill_servers", "No prefill servers available"
            )
            return
        row = rows[0]
        entry = state.entries[row]
        pool = app._pool(row, entry)
        head = app._upstream_request(request, entry, pool, 0)
        exchange = Exchange(
            app,
            conn,
            row,
            entry.generation,
            pool,
            head,
            b"",
            request.request_id,
            request.path,
            entry.model_id or "",
            False,
            request.keep_alive,
            request.version == "1.0",
            request.method == b"HEAD",
            started,
        )
        exchange.method = request.method.decode("latin-1")
        if app.cors is not None:
            exchange.cors = app.cors.response(request.header(b"origin"))
        app._in_flight_add(row, entry.generation)
        app.policy.on_dispatch(row)  # exchange_finished completes it on app.policy
        app.active.add(exchange)
        conn.exchange = exchange
        exchange.start()

    def _health_generate(self, conn: ClientConnection, request: Request) -> None:
        """1.13: a pair from the available workers (503 no_healthy_worker_pair without
        one), both asked at once. 1.13 picks through its policies; smg at random, so that a
        probe carrying no text leaves the policies' state alone."""
        app = self.app
        sides = [app.gate.filter(self._rows(kind, None)) or [] for kind in ("prefill", "decode")]
        refusal = self._no_pair(sides[0], sides[1], prefix="")
        if refusal is not None:
            message = f"No healthy worker pair available: {refusal}"
            app._send_error(conn, request, 503, "no_healthy_worker_pair", message)
            return
        p_entry, d_entry = (app.state.entries[_RNG.choice(rows)] for rows in sides)
        legs = []
        # The decode first: it opens the pair's one attempt span, the prefill joins it.
        for entry, second in ((d_entry, False), (p_entry, True)):
            pool = app._pool(entry.row, entry)
            legs.append((pool, app._upstream_request(request, entry, pool, 0, second)))
        pending = HealthPending()
        conn.exchange = pending  # type: ignore[assignment]
        urls = [p_entry.url, d_entry.url]
        pending.task = app.spawn(self._health_answer(conn, request, urls, legs, pending))

    async def _health_answer(
        self,
        conn: ClientConnection,
        request: Request,
        urls: list[str],
        legs: list[tuple[WorkerPool, bytes]],
        pending: HealthPending,
    ) -> None:
        app = self.app
        try:
            statuses = await probe_pair(app, legs, app.request_timeout)
            d_status, p_status = statuses
            trace = request.trace if app.tracer is not None else None  # set only when tracing
            if trace is not None:  # the pair's attempt: the worst of the two legs
                worst = 0 if NO_ANSWER in statuses else max(statuses)
                trace.end_attempt(worst, "" if worst else "no answer")
            status, text = health_verdict(urls[0], p_status, urls[1], d_status)
        except asyncio.CancelledError:
            if not conn.closed:
                raise  # the loop is shutting down
            status, text = 0, ""
        except Exception as exc:  # a request must never take the process down
            app.log_error("PD /health_generate failed", exc)
            status, text = 500, ""
        if conn.exchange is pending:
            conn.exchange = None
        if conn.closed:
            # Counted, its span ended, as a proxied request whose client left.
            app._count(request, 499, "client_disconnected", conn)
            return
        if status == 200:
            plain = b"text/plain; charset=utf-8"
            app._send(conn, request, 200, text.encode(), content_type=plain)
        elif status == 500:
            app._send_error(conn, request, 500, "internal_error", "internal gateway error")
        else:
            app._send_error(conn, request, status, "health_generate_failed", text)

    def _no_pair(
        self,
        prefill_rows: list[int],
        decode_rows: list[int],
        prefix: str = "No available servers: ",
    ) -> str | None:
        """1.13's words when a side has no ready worker at all (after `prefix`)."""
        for kind, rows in (("prefill", prefill_rows), ("decode", decode_rows)):
            if not rows:
                if self.known.get(kind):
                    return f"{prefix}No available {kind} workers (all circuits open or unhealthy)"
                return (
                    f"{prefix}No {kind} workers available. Please check if "
                    f"{kind} servers are configured and healthy."
                )
        return None

    def _choose(self, policy: Policy, rows: list[int], route: RouteRequest) -> int:
        """One row through the gate and `policy`, or -1 (as DataPlane._choose)."""
        gate = self.app.gate
        allowed = gate.filter(rows)
        if not allowed:
            return -1
        view = self.app.view
        while allowed:
            try:
                row = policy.select(allowed, view, route)
            except NoEligibleWorker:
                return -1
            if gate.claim(row):
                return row
            allowed = [other for other in allowed if other != row]
        return -1

    def _dispatch(
        self,
        conn: ClientConnection,
        request: Request,
        started: float,
        body: dict[str, Any],
        route: RouteRequest,
        model: str | None,
        prefill: int,
        decode: int,
        admitted: bool,
    ) -> None:
        app = self.app
        state = app.state
        d_entry: DirectoryEntry = state.entries[decode]
        d_pool = app._pool(decode, d_entry)
        path = request.path
        keep = None
        if app.retries_on and app.retry_policy.max_attempts > 1:
            keep = dict(body)  # the client's fields: each attempt injects its own room
        exchange = DecodeExchange(
            app,
            conn,
            decode,
            d_entry.generation,
            d_pool,
            b"",
            b"",
            request.request_id,
            path,
            model
            if model is not None and model in self.known.get("decode", ())
            else (d_entry.model_id or ("other" if model else "")),
            route.stream,
            request.keep_alive,
            request.version == "1.0",
            False,
            started,
        )
        exchange.pd_retries(keep)
        if keep is not None:
            exchange.allow_retries(request, route, app.retry_policy.max_attempts, False)
        if app.tracer is not None:
            exchange.trace = request.trace
        if app.cors is not None:
            exchange.cors = app.cors.response(request.header(b"origin"))
        wasm = app.wasm
        if wasm is not None and wasm.on_response and app._wasm_answers(conn, request):
            # OnResponse modules on the decode answer, as on a plain proxied one (the
            # OnRequest ones already ran in DataPlane.handle): asked for uncompressed.
            from smg.wasm.chain import ResponseHook

            request.headers = [h for h in request.headers if h[0] != b"accept-encoding"]
            exchange.translation = ResponseHook(
                wasm, None, path.encode(), bytes(request.body), route.stream
            )
        self._arm(exchange, request, body, prefill, decode, admitted)
        request.body = b""
        app.active.add(exchange)
        conn.exchange = exchange
        self.go(exchange)

    def go(self, exchange: DecodeExchange) -> None:
        """Send an armed attempt: the prefill leg, and the decode leg now or once its row
        has a slot in its running window (smg.dataplane.pd_window)."""
        exchange.prefill.start()
        if exchange.pd_admitted:
            exchange.attempting = True
            exchange.start()
        else:
            exchange.pd_wait(self.window)

    def _arm(
        self,
        exchange: DecodeExchange,
        request: Request,
        body: dict[str, Any],
        prefill: int,
        decode: int,
        admitted: bool,
    ) -> None:
        """Point `exchange` at a pair for one attempt: the body with a new room, both
        heads, a new prefill leg, the accounting of both rows (the decode's in flight is
        counted by DecodeWindow.take: now when `admitted`, else once a slot frees)."""
        app = self.app
        entries = app.state.entries
        p_entry: DirectoryEntry = entries[prefill]
        d_entry: DirectoryEntry = entries[decode]
        path = request.path
        batch = batch_size(path, body)
        host = worker_address(p_entry.url).host
        inject_bootstrap(body, host, p_entry.spec.bootstrap_port, batch, new_rooms(batch))
        payload = p_payload = orjson.dumps(body)
        if p_entry.dp_rank is not None or d_entry.dp_rank is not None:
            # --dp-aware rank workers: each leg's rank fields, as 1.13's PD router sends.
            p_body, d_body = pd_rank_fields(body, p_entry.dp_rank, d_entry.dp_rank)
            p_payload, payload = orjson.dumps(p_body), orjson.dumps(d_body)
        p_pool = app._pool(prefill, p_entry)
        d_pool = app._pool(decode, d_entry)
        exchange.row = decode
        exchange.generation = d_entry.generation
        exchange.pool = d_pool
        exchange.head = app._upstream_request(request, d_entry, d_pool, len(payload))
        exchange.body = payload
        logprobs = wants_logprobs(path, body)
        p_head = app._upstream_request(request, p_entry, p_pool, len(p_payload), second_leg=True)
        leg = PrefillLeg(
            app,
            exchange,
            prefill,
            p_entry.generation,
            p_pool,
            p_head,
            p_payload,
            p_entry.url,
            logprobs,
        )
        exchange.pd_init(leg, d_entry.url, logprobs)
        exchange.pd_admitted = admitted
        self.dispatched += 1
        if self.admission is None:  # else counted by PrefillAdmission.take
            app._in_flight_add(prefill, p_entry.generation)
        self.prefill_policy.on_dispatch(prefill)
        if admitted:  # else when the held leg is admitted (DecodeExchange._pd_admitted)
            app.policy.on_dispatch(decode)

    def next_attempt(
        self, exchange: DecodeExchange
    ) -> tuple[int, str, str] | tuple[int, str, str, bytes] | None:
        """A new pair for a retry (rows an earlier attempt failed on only when nothing
        else is left), armed on `exchange` (its decode leg admitted or to be held, as a
        first attempt's); or (status, code, message[, headers]) when none."""
        app = self.app
        state = app.refresh()
        if self.routing_generation != state.routing_generation:
            self._rebuild(state)
        route = exchange.route
        request = exchange.request
        body = exchange.pd_body
        if route is None or request is None or body is None:
            return 502, "internal_error", "the request can no longer be retried"
        model = route.model
        prefill_rows = self._rows("prefill", model)
        decode_rows = self._rows("decode", model)
        refusal = self._no_pair(prefill_rows, decode_rows)
        if refusal is not None:
            return 503, "server_selection_failed", refusal
        route.retry = True
        failed = exchange.pd_failed
        prefill_rows = [row for row in prefill_rows if row not in failed] or prefill_rows
        failed_decode = exchange.failed_rows or ()
        decode_rows = [row for row in decode_rows if row not in failed_decode] or decode_rows
        admission = self.admission
        if admission is not None:
            prefill_rows = admission.free(prefill_rows)
        prefill = self._choose(self.prefill_policy, prefill_rows, route) if prefill_rows else -1
        if prefill >= 0 and admission is not None:
            generation = state.entries[prefill].generation
            if not admission.take(prefill, generation):
                app.gate.record(prefill, generation, CLIENT_LEFT)
                prefill = -1
        if prefill < 0:
            return 503, "server_selection_failed", _NO_PREFILL
        window = self.window
        decode, admitted = window.pick(partial(self._choose, app.policy, route=route), decode_rows)
        if decode < 0 or not (admitted or window.wait > 0):
            self.leg_done(prefill, state.entries[prefill].generation, CLIENT_LEFT)
            if decode < 0:
                return 503, "server_selection_failed", _NO_DECODE
            app.gate.record(decode, state.entries[decode].generation, CLIENT_LEFT)
            return window.shed(decode, model)
        self._arm(exchange, request, dict(body), prefill, decode, admitted)
        return None

    def leg_done(
        self,
        row: int,
        generation: int,
        outcome: int,
        dispatched: bool = False,
    ) -> None:
        """The prefill leg ended (answered, failed or aborted), or was chosen and not sent
        (no decode): its in-flight count, the policy's tally, the gate's outcome."""
        app = self.app
        if dispatched or self.admission is not None:
            app._in_flight_done(row, generation)
        if dispatched:
            self.prefill_policy.on_complete(row)
        app.gate.record(row, generation, outcome)
        if self.admission is not None:
            self.admission.freed()

    # --- metrics ---------------------------------------------------------------------------

    @staticmethod
    def observe(hists: dict[HistKey, Histogram], key: HistKey, seconds: float) -> None:
        key = key or "unknown"
        hist = hists.get(key)
        if hist is None:
            hist = hists[key] = Histogram(DURATION_BUCKETS)
        hist.observe(seconds)

    def families(self, process: int) -> list[Family]:
        proc = [("process", str(process))]
        families = [
            Family(
                "smg_pd_requests_total",
                "counter",
                "Dispatches to a prefill/decode pair, one per attempt: a retry counts again (smg)",
                [Sample("", proc, self.dispatched)],
            ),
        ]
        for name, help_text, hists in (
            (
                "smg_pd_prefill_duration_seconds",
                "PD prefill phase: prefill dispatch to the end of the prefill response, "
                "by backend_type, model, runtime",
                self.prefill_durations,
            ),
            (
                "smg_pd_kv_transfer_duration_seconds",
                "PD relay phase (sequential dispatch): end of the prefill response to the "
                "decode dispatch, gateway work only; not the engines' KV transfer, which runs "
                "inside smg_pd_decode_ttft_seconds; by backend_type, model, runtime",
                self.kv_transfers,
            ),
            (
                "smg_pd_decode_ttft_seconds",
                "PD decode phase: decode dispatch to the first decode token, the engines' KV "
                "transfer and the decode scheduling included (the whole TTFT under parallel "
                "dispatch), by backend_type, model, runtime",
                self.decode_ttfts,
            ),
            (
                "smg_pd_ttft_seconds",
                "PD time to first token: prefill dispatch to the decode response head, "
                "by backend_type, model, runtime",
                self.ttfts,
            ),
        ):
            samples: list[Sample] = []
            for key, hist in hists.items():
                model, runtime = key if isinstance(key, tuple) else (key, "sglang")
                labels = [*proc, ("backend_type", "pd"), ("model", model), ("runtime", runtime)]
                samples += histogram_samples(labels, hist)
            families.append(Family(name, "histogram", help_text, samples))
        families.append(
            Family(
                "smg_pd_kv_connector_mode_total",
                "counter",
                "KV connector mode decisions by mode (mooncake/nixl/passthrough)",
                [Sample("", [*proc, ("mode", mode)], n) for mode, n in self.kv_modes.items()],
            )
        )
        if self.admission is not None:
            families += self.admission.families(proc)
        return families + self.window.families(proc)


def make_router(app: DataPlane, cfg: GatewayConfig) -> PDRouter:
    """The PD router of a data-plane process: the prefill policy (--prefill-policy, else
    --policy), and the decode policy (--decode-policy, else --policy) as `app.policy`, so
    the decode exchange's accounting (DataPlane.exchange_finished) goes to it."""
    from smg.policies.registry import make_policy

    prefill_name = getattr(cfg, "prefill_policy", None) or cfg.policy
    decode_name = getattr(cfg, "decode_policy", None) or cfg.policy
    prefill = make_policy(prefill_name, cfg, index=app.index, shared=app.shared)
    if decode_name != app.policy.name:
        app.policy = make_policy(decode_name, cfg, index=app.index, shared=app.shared)
        app.needs_text = app.policy.needs_text
    app.metrics.backend_type = "pd"
    return PDRouter(app, cfg, prefill)
