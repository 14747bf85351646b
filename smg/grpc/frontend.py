"""The gRPC request path in a data-plane process: OpenAI HTTP in, engine gRPC out.

`GrpcFront` (one per process, made when the directory first lists a gRPC worker) decides
per request whether the model's workers are gRPC and, if so, runs a `GrpcExchange`: one
asyncio task that orchestrates the stages (prepare -> render -> tokenize -> choose a
worker -> Generate -> process the outputs -> write HTTP/SSE). The HTTP proxy path does
not change: `DataPlane.proxy` pays one attribute check (`self.grpc is not None`), made
after its directory read (`DataPlane.grpc_front`: a worker listed since the last sweep
is seen by the request itself).

A `GrpcExchange` is what the rest of the data plane sees of such a request, with the
attributes and methods the HTTP `Exchange` offers where they are read:

- `DataPlane.active` / `deadline` / `timed_out()`: the sweeper's --request-timeout-secs;
- `DataPlane.streams` / `state` / `keepalive()`: SSE keep-alive frames when quiet;
- `conn.exchange` / `client_gone()`: a client that leaves cancels the task, and the
  engine gets an Abort RPC;
- `upstream.transport.pause_reading()/resume_reading()`: the client connection's write
  back-pressure (`ClientConnection.pause_writing`) pauses the task's writes;
- `DataPlane.exchange_finished` (metrics, access line, admission permit, the last
  attempt's in-flight count, policy on_complete and gate outcome) and
  `DataPlane.attempt_done` for an attempt that is retried.

The other engineers' stages are reached through `Stages` (one object, so the tests can
replace them with in-memory fakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from array import array
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from smg.dataplane.gate import CLIENT_LEFT
from smg.dataplane.lifecycle import State
from smg.dataplane.responses import STORE_FAILED
from smg.dataplane.retry import RETRYABLE_STATUSES
from smg.grpc.types import EngineError, EngineOutput, GenerateInput
from smg.grpc.workers import GrpcWorkers, NoTokenizer, is_grpc_entry
from smg.httpwire import (
    ANTHROPIC_ROUTE,
    anthropic_error_body,
    build_response,
    error_body,
    error_response,
    status_line,
)

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request
    from smg.policies.base import RouteRequest
    from smg.shm.directory import DirectoryEntry
    from smg.translate import Translation

log = logging.getLogger("smg.grpc")

# Routes served by the engines in gRPC mode (kind per path), and the ones answered here.
GENERATE_KINDS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/generate": "generate",
}
EMBED_ROUTE = "/v1/embeddings"
# Anthropic Messages on a gRPC model: translated to chat (smg.translate) and served as
# chat; count_tokens is the rendered prompt's length.
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"
# The Responses API on a gRPC model: translated to chat as well (smg.translate.responses_chat).
RESPONSES_ROUTE = "/v1/responses"
LOCAL_ROUTES = frozenset({"/v1/tokenize", "/v1/detokenize"})

_STREAMING = int(State.STREAMING)
_IDLE = int(State.WAITING)
_CHUNK_END = b"0\r\n\r\n"
_SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": ping\n\n"
SSE_KEEPALIVE_ANTHROPIC = b'event: ping\ndata: {"type":"ping"}\n\n'
# Why the task was cancelled from outside (client_gone / timed_out).
_GONE = 1
_TIMEOUT = 2
# UNAVAILABLE is what a refused or reset channel reports: a transport failure for the
# breaker (outcome 0), as a refused connect is on the HTTP path.
_TRANSPORT_CODES = frozenset({"UNAVAILABLE"})


class Stages:
    """The stages of the other parts (D1 prepare/respond, A templates, B tokenizer, C2
    error mapping), called through one object. Imports are lazy so that a process that
    never sees a gRPC worker never loads them."""

    def __init__(self, tool_flag: str | None = None, reasoning_flag: str | None = None) -> None:
        from smg.chat import TemplateError
        from smg.chat import messages as chat_messages
        from smg.grpc import prepare, protos, respond
        from smg.tokenizer import TokenizerLoadError

        self.template_error = TemplateError
        self.load_error: type[Exception] = TokenizerLoadError

        self.prepare_mod = prepare
        self.respond = respond
        self.protos = protos
        self.normalize = chat_messages.normalize_messages
        self.request_error: type[Exception] = prepare.RequestError
        from functools import lru_cache

        from smg.parsers import thinking
        from smg.parsers.select import ParserSelector

        self.thinking = thinking
        # One answer per template source (a template's text is its identity here).
        self.thinking_toggle = lru_cache(maxsize=64)(thinking.detect_thinking_toggle)
        self.selector = ParserSelector(tool_flag, reasoning_flag)

    def defaults(self, tokenizer: Any, entry: DirectoryEntry | None) -> Any:
        engine = entry.grpc.default_sampling_params_json if entry and entry.grpc else ""
        return self.prepare_mod.Defaults.from_sources(tokenizer.generation_defaults, engine)

    def prepare(self, kind: str, body: dict[str, Any], defaults: Any) -> Any:
        if kind == "chat":
            return self.prepare_mod.prepare_chat(body, defaults)
        if kind == "completion":
            return self.prepare_mod.prepare_completion(body, defaults)
        return self.prepare_mod.prepare_generate(body, defaults)

    def prompt_ids(self, prepared: Any, tokenizer: Any, template: Any) -> tuple[list[int], str]:
        """Render (chat) and tokenize: (token ids, the prompt text)."""
        if prepared.kind == "chat":
            if template is None:
                raise self.request_error(
                    400,
                    "invalid_request_error",
                    "the model's tokenizer has no chat template; pass --chat-template",
                )
            try:
                text = template.render(
                    self.normalize(prepared.messages, template.content_format),
                    tools=prepared.tools,
                    documents=prepared.documents,
                    add_generation_prompt=prepared.add_generation_prompt,
                    continue_final_message=prepared.continue_final_message,
                    kwargs=prepared.template_kwargs,
                )
            except self.template_error as exc:  # the template's raise_exception, or a bad render
                raise self.request_error(400, "invalid_request_error", str(exc)) from None
            return self.encode(tokenizer, text, False), text
        prompt = prepared.prompt
        if isinstance(prompt, list):
            return prompt, ""
        text = prompt or ""
        return self.encode(tokenizer, text, True), text

    def encode(self, tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except ValueError as exc:  # text the tokenizer refuses (a lone surrogate)
            raise self.request_error(400, "invalid_request_error", str(exc)) from None

    def apply_limits(self, prepared: Any, prompt_len: int, context_length: int | None) -> None:
        self.prepare_mod.apply_limits(prepared, prompt_len, context_length)

    def choice(self, index: int, tokenizer: Any, sampling: Any) -> Any:
        return self.respond.ChoiceState(index, tokenizer, sampling)

    def parsers(
        self, prepared: Any, entry: DirectoryEntry, template: Any, request_model: str | None
    ) -> Any:
        """The attempt's ParserPlan (which output parsers its choices get), or None."""
        if not self.respond.may_parse(prepared):
            return None
        tool, reasoning = self.selector.for_entry(entry, request_model)
        in_reasoning = None
        if reasoning is not None and prepared.separate_reasoning and template is not None:
            toggle, key = self.thinking_toggle(template.source)
            in_reasoning = self.thinking.starts_in_reasoning(
                toggle, key, prepared.template_kwargs, prepared.reasoning_effort
            )
        return self.respond.parser_plan(prepared, tool, reasoning, in_reasoning)

    def writer(
        self, prepared: Any, request_id: str, model: str, created: int, tokenizer: Any
    ) -> Any:
        cls = {
            "chat": self.respond.ChatStreamWriter,
            "completion": self.respond.CompletionStreamWriter,
        }.get(prepared.kind, self.respond.GenerateStreamWriter)
        return cls(prepared, request_id, model, created, tokenizer)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Any:
        return self.respond.Usage(prompt_tokens, completion_tokens, cached_tokens)

    def body(
        self,
        prepared: Any,
        request_id: str,
        model: str,
        created: int,
        tokenizer: Any,
        choices: list[list[Any]],
        usage: Any,
    ) -> bytes:
        """The non-streaming answer: `choices` holds each choice's deltas in order."""
        fn = {
            "chat": self.respond.chat_body,
            "completion": self.respond.completion_body,
        }.get(prepared.kind, self.respond.generate_body)
        return fn(prepared, request_id, model, created, tokenizer, choices, usage)

    def http_status(self, code: str) -> tuple[int, str]:
        """A gRPC status code name -> (HTTP status, OpenAI error code)."""
        return self.protos.http_status_for(code)

    def failure(self, error: EngineError, streaming: bool) -> tuple[int, str]:
        """(HTTP status, error code) of a failed Generate, in the Rust SMG's words: before
        its first output the mapped status and `start_generation_failed`; later, an SSE
        error event's code, or `worker_stream_failed` for a non-streaming collection."""
        status, code = self.http_status(error.code)
        if streaming:
            return status, self.protos.SSE_ERROR_CODE
        if not error.before_first_token:
            return status, self.protos.STREAM_FAILED_CODE
        return status, code


class _Refused(Exception):
    """No worker for the next attempt: (status, code, message, extra header lines)."""

    def __init__(self, status: int, code: str, message: str, extra: bytes) -> None:
        super().__init__(message)
        self.answer = (status, code, message, extra)


class GrpcFront:
    """This process's gRPC path: the worker registry, the stages, the offload pool."""

    def __init__(
        self,
        app: DataPlane,
        *,
        workers: GrpcWorkers | None = None,
        stages: Any | None = None,
        offload: Any | None = None,
    ) -> None:
        self.app = app
        self.workers = workers if workers is not None else GrpcWorkers(app.cfg, app.loop)
        self._stages = stages
        if offload is None:
            from smg.grpc.offload import Offload

            offload = Offload.from_config(app.cfg)
        self.offload = offload
        self.rows: frozenset[int] = frozenset()  # the regular gRPC workers' rows
        self.pd_rows: frozenset[int] = frozenset()  # the gRPC prefill/decode workers' rows

    @property
    def stages(self) -> Any:
        if self._stages is None:
            cfg = self.app.cfg
            self._stages = Stages(cfg.tool_call_parser, cfg.reasoning_parser)
        return self._stages

    def on_directory(self, entries: dict[int, DirectoryEntry]) -> None:
        grpc = [entry for entry in entries.values() if is_grpc_entry(entry)]
        # The plain path serves regular workers only; PD mode's pairs are smg.grpc.pd's.
        self.rows = frozenset(e.row for e in grpc if e.spec.worker_type == "regular")
        self.pd_rows = frozenset(e.row for e in grpc if e.spec.worker_type != "regular")
        self.workers.on_directory(entries)
        # Start loading the tokenizers now, off the loop, so the first request does not wait.
        for entry in grpc:
            with contextlib.suppress(NoTokenizer):
                self.workers.tokenizer_source(entry)  # none yet: no load, no warning
                self.app.spawn(_quiet(self.workers.tokenizer(entry)))

    async def close(self) -> None:
        """Shutdown: the engine channels and the offload pool."""
        await self.workers.close_all()
        self.offload.close()

    # --- routing ----------------------------------------------------------------------------

    def rows_for(self, model: str | None) -> tuple[list[int], list[int]] | None:
        """(every gRPC row serving `model`, the ready ones), or None when the model's
        workers are not gRPC (the HTTP proxy path serves it)."""
        app = self.app
        state = app.state
        grpc_rows = self.rows
        if model is None:
            everything = sorted(state.entries)
            ready = state.ready
        else:
            everything = state.models_all.get(model) or state.any_model_all
            ready = app._candidates(state, model) or []
        rows = [row for row in everything if row in grpc_rows]
        if not rows:
            return None
        return rows, [row for row in ready if row in grpc_rows]

    def handle(self, conn: ClientConnection, request: Request) -> bool:
        """Take a request on a proxied route if its model is served over gRPC (True);
        False leaves it to the HTTP proxy path (which also answers bad JSON)."""
        path = request.path
        kind = GENERATE_KINDS.get(path)
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(body, dict):
            return False
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            return False
        app = self.app
        state = app.refresh()
        model = state.aliases.get(model, model) if model else None
        found = self.rows_for(model)
        if found is None:
            return False
        translation = None
        if path in (ANTHROPIC_ROUTE, COUNT_TOKENS_ROUTE):
            from smg.providers import API_OPENAI
            from smg.translate import TranslateError
            from smg.translate import translation as translate

            asked = body if path == ANTHROPIC_ROUTE else _countable(body)
            try:
                translation = translate(ANTHROPIC_ROUTE, asked, API_OPENAI, model)
                if translation is None:
                    raise TranslateError("the request cannot be served as chat")
                chat = orjson.loads(translation.upstream_body)
                _thinking_switch(asked, chat)
                if chat.get("stream") is True:
                    # Usage on every chunk: message_start then carries the prompt's tokens,
                    # as Anthropic's does (the prompt is known before the first token).
                    chat["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
            except TranslateError as exc:
                app._send_error(conn, request, 400, "invalid_request", str(exc))
                return True
            if path == COUNT_TOKENS_ROUTE:
                app.spawn(self._count_tokens(conn, request, chat, found[0]))
                return True
            kind = "chat"
            body = chat
        elif path == RESPONSES_ROUTE:
            translation = self._responses(conn, request, body, model)
            if translation is None:
                return True  # refused (400)
            kind = "chat"
            body = orjson.loads(translation.upstream_body)
        if kind is None and path != EMBED_ROUTE:
            # /v1/rerank: not served by gRPC workers (yet).
            app._send_error(
                conn,
                request,
                501,
                "not_implemented",
                f"{path} is not supported for models served by gRPC workers",
            )
            return True
        exchange = GrpcExchange(self, conn, request, kind or "embed", body, model, found[0])
        exchange.translation = translation
        exchange.anthropic = path == ANTHROPIC_ROUTE
        conn.exchange = exchange  # type: ignore[assignment]
        app.active.add(exchange)  # type: ignore[arg-type]
        exchange.task = app.loop.create_task(exchange.run())
        app.tasks.add(exchange.task)
        exchange.task.add_done_callback(app.tasks.discard)
        return True

    def _responses(
        self, conn: ClientConnection, request: Request, body: dict[str, Any], model: str | None
    ) -> Translation | None:
        """POST /v1/responses on a gRPC model: served as chat through ResponsesOverChat,
        with the history observer (set by DataPlane._responses_post: the history is already
        in `input`) after it. None: refused with a 400 here."""
        from smg.translate import TranslateError, responses_over_chat
        from smg.translate.responses_chat import Observed

        try:
            inner = responses_over_chat(body, model)
        except TranslateError as exc:
            self.app._send_error(conn, request, 400, "invalid_request", str(exc))
            return None
        history = getattr(request, "history", None)
        return Observed(inner, history) if history else inner

    def handle_info(self, conn: ClientConnection, request: Request) -> bool:
        """GET /get_model_info, /get_server_info, /health_generate when every ready worker
        is gRPC (an HTTP request to a gRPC port would only fail, and count against its
        breaker): the model facts the control plane published, or a HealthCheck RPC."""
        app = self.app
        state = app.refresh()
        ready = state.ready
        if not ready or not all(row in self.rows for row in ready):
            return False
        entry = state.entries[ready[0]]
        if request.path == "/health_generate":
            self.app.spawn(self._health(conn, request, entry))
            return True
        info = entry.grpc
        if info is None:
            return False
        facts: dict[str, Any] = {
            "model_path": info.model_path,
            "served_model_name": info.served_model_name,
            "tokenizer_path": info.tokenizer_dir or self.workers.local_dir or info.model_path,
            "is_generation": info.is_generation,
            "max_context_length": info.max_context_length or entry.context_length,
            "max_req_input_len": info.max_req_input_len or None,
            "vocab_size": info.vocab_size,
            "eos_token_ids": list(info.eos_token_ids),
            "bos_token_id": info.bos_token_id if info.bos_token_id >= 0 else None,
            "pad_token_id": info.pad_token_id if info.pad_token_id >= 0 else None,
            "backend": info.backend,
        }
        if request.path == "/get_server_info":
            facts = {**facts, "default_sampling_params_json": info.default_sampling_params_json}
        app._send(conn, request, 200, orjson.dumps(facts))
        return True

    async def _health(
        self, conn: ClientConnection, request: Request, entry: DirectoryEntry
    ) -> None:
        app = self.app
        try:
            healthy = await self.workers.client(entry).health(5.0)
        except Exception as exc:  # a failed probe is an unhealthy answer, never a crash
            log.debug("HealthCheck failed: %r", exc)
            healthy = False
        if conn.closed:
            return
        if healthy:
            app._send(conn, request, 200, b"{}")
        else:
            app._send_error(
                conn, request, 503, "worker_unhealthy", f"worker {entry.url} is not healthy"
            )

    def handle_local(self, conn: ClientConnection, request: Request) -> None:
        """/v1/tokenize and /v1/detokenize: answered here with the model's tokenizer."""
        self.app.spawn(self._local(conn, request))

    async def _local(self, conn: ClientConnection, request: Request) -> None:
        app = self.app
        try:
            body = orjson.loads(request.body)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except (orjson.JSONDecodeError, ValueError) as exc:
            app._send_error(conn, request, 400, "invalid_json", f"invalid JSON body: {exc}")
            return
        model = body.get("model")
        model = app.refresh().aliases.get(model, model) if isinstance(model, str) else None
        found = self.rows_for(model)
        if found is None:
            app._send_error(
                conn, request, 404, "model_not_found", f"No worker available for model '{model}'"
            )
            return
        entry = app.state.entries.get(found[0][0])
        stages = self.stages
        try:
            tokenizer = await self.workers.tokenizer(entry)
            context = _context_length(entry, tokenizer)
            if request.path == "/v1/tokenize":
                answer = await self._tokenize(body, tokenizer, context)
            else:
                answer = stages.respond.detokenize_body(body, tokenizer)
        except NoTokenizer as exc:
            app._send_error(conn, request, 503, "tokenizer_unavailable", str(exc))
            return
        except stages.request_error as exc:
            e: Any = exc
            app._send(conn, request, e.status, e.body(), error_code=e.code)
            return
        except Exception as exc:
            app.log_error("tokenize failed", exc)
            app._send_error(conn, request, 500, "internal_error", "internal gateway error")
            return
        if not conn.closed:
            app._send(conn, request, 200, answer)

    async def _count_tokens(
        self, conn: ClientConnection, request: Request, chat: dict[str, Any], rows: list[int]
    ) -> None:
        """POST /v1/messages/count_tokens on a gRPC model: the Messages request rendered
        as its chat prompt (template, tools, system) and tokenized, as the engine would
        get it; Anthropic's answer `{"input_tokens": n}`."""
        app = self.app
        entry = app.state.entries.get(rows[0])
        stages = self.stages
        try:
            tokenizer = await self.workers.tokenizer(entry)
            prepared = stages.prepare("chat", chat, stages.prepare_mod.Defaults())
            ids, _text = await self.offload.run(
                len(request.body),
                stages.prompt_ids,
                prepared,
                tokenizer,
                self.workers.template(tokenizer),
            )
        except NoTokenizer as exc:
            app._send_error(conn, request, 503, "tokenizer_unavailable", str(exc))
            return
        except stages.request_error as exc:
            e: Any = exc
            app._send_error(conn, request, e.status, e.code, e.message)
            return
        except Exception as exc:
            app.log_error("count_tokens failed", exc)
            app._send_error(conn, request, 500, "internal_error", "internal gateway error")
            return
        if not conn.closed:
            app._send(conn, request, 200, orjson.dumps({"input_tokens": len(ids)}))

    async def _tokenize(self, body: dict[str, Any], tokenizer: Any, context: int | None) -> bytes:
        stages = self.stages
        respond = stages.respond
        if "messages" in body:
            template = self.workers.template(tokenizer)
            prepared = stages.prepare(
                "chat", {"max_tokens": 1, **body}, stages.prepare_mod.Defaults()
            )
            prepared.add_generation_prompt = bool(body.get("add_generation_prompt", True))
            ids, _text = await self.offload.run(
                len(orjson.dumps(body["messages"])),
                stages.prompt_ids,
                prepared,
                tokenizer,
                template,
            )
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise stages.request_error(
                    400, "invalid_request_error", "'prompt' must be a string"
                )
            add_special = body.get("add_special_tokens", True) is not False
            ids = await self.offload.run(len(prompt), stages.encode, tokenizer, prompt, add_special)
        return respond.tokenize_body(ids, tokenizer, context, body)


async def _quiet(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception as exc:  # logged here; a request asking for it gets the error
        log.warning("loading a tokenizer failed: %r", exc)


def _error_message(body: bytes | None) -> str | None:
    """The `error.message` of an OpenAI error body (a RequestError's), if any."""
    if body is None:
        return None
    try:
        found = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return found if isinstance(found, str) else None


# The keys chat templates read for their thinking toggle (Qwen3's, DeepSeek V3.1's and
# Kimi's): a template reads its own and ignores the other.
_THINKING_KEYS = ("enable_thinking", "thinking")


def _thinking_switch(messages: dict[str, Any], chat: dict[str, Any]) -> None:
    """Anthropic's `thinking` as the template's toggle, as the Rust SMG's gRPC Messages
    path does (enabled: on, disabled: off, absent: the template's default), where the
    chat request alone (reasoning_effort) could only turn it off."""
    thinking = messages.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled"):
        return
    kwargs = chat.get("chat_template_kwargs")
    if not isinstance(kwargs, dict):
        kwargs = chat["chat_template_kwargs"] = {}
    for key in _THINKING_KEYS:
        kwargs.setdefault(key, kind == "enabled")


def _countable(body: dict[str, Any]) -> dict[str, Any]:
    """A count_tokens body as a Messages request: count_tokens takes no `max_tokens`
    (Anthropic's API has none there), which a Messages request must have."""
    counted = {k: v for k, v in body.items() if k not in ("stream", "max_tokens")}
    counted["max_tokens"] = 1
    return counted


def _context_length(entry: DirectoryEntry | None, tokenizer: Any) -> int | None:
    if entry is not None:
        if entry.context_length:
            return entry.context_length
        if entry.grpc is not None and entry.grpc.max_context_length:
            return entry.grpc.max_context_length
    return getattr(tokenizer, "context_length", None)


def retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def stream_error_event(code: str, message: str) -> bytes:
    """The SSE frames that end a broken stream: SMG 1.13's `stream_error` event (with
    smg's error code), then `[DONE]`, as the HTTP path ends a relayed stream."""
    body = orjson.dumps({"error": {"message": message, "type": "stream_error", "code": code}})
    return b"data: %b\n\n%b" % (body, _SSE_DONE)


def sse_head(request_id: bytes, extra: bytes, keep_alive: bool, chunked: bool) -> bytes:
    return b"".join(
        (
            status_line(200),
            b"content-type: text/event-stream\r\ncache-control: no-cache\r\n",
            b"transfer-encoding: chunked\r\n" if chunked else b"",
            b"x-request-id: %b\r\n" % request_id,
            extra,
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
        )
    )


class GrpcExchange:
    """One request on the gRPC path, run as one task (`run`). See the module docstring
    for what the data plane reads of it."""

    connection_mode = "grpc"

    def __init__(
        self,
        front: GrpcFront,
        client: ClientConnection,
        request: Request,
        kind: str,
        body: dict[str, Any],
        model: str | None,
        rows: list[int],
    ) -> None:
        app = front.app
        self.front = front
        self.app = app
        self.client = client
        self.request = request
        self.kind = kind
        self.body = body
        self.route_model = model
        self.request_id = request.request_id
        self.endpoint = request.path
        self.method = "POST"
        state = app.state
        # Only served model names become metric labels (as DataPlane.proxy).
        self.model = model if model in state.models_all else ("other" if model else "")
        self.stream = body.get("stream") is True
        self.keep_alive = request.keep_alive
        self.http10 = request.version == "1.0"
        self.started = time.monotonic()
        self.deadline = self.started + app.request_timeout
        self.entry_rows = rows
        self.cors = b"" if app.cors is None else app.cors.response(request.header(b"origin"))
        self.trace: Any = getattr(request, "trace", None)
        # Attempt accounting, read by DataPlane.exchange_finished.
        self.row = -1
        self.generation = 0
        self.attempting = False
        self.attempts = 0
        self.outcome = 0
        self.failed_rows: list[int] | None = None
        self.route: RouteRequest | None = None
        # What the client has seen and how the task ends.
        self.state = _IDLE
        self.head_sent = False
        self.finished = False
        self.reason = 0  # _GONE / _TIMEOUT: why the task was cancelled
        self.task: asyncio.Task[None] | None = None
        self.dispatched: Any = None  # the EngineClient of the running attempt
        self.engine_rid = request.request_id.decode("latin-1")  # what Abort names
        self.batch_rids: list[str] | None = None  # a batched completion's: Abort names these
        self.ttft_pending = False  # smg_router_ttft_seconds: a stream's first events not sent yet
        self.last_write = app.now
        self._writable = asyncio.Event()
        self._writable.set()
        self.upstream = self  # ClientConnection.pause_writing: upstream.transport.pause_reading()
        self.transport = self
        # /v1/messages, /v1/responses: served as chat, every answer byte through the
        # translation; `anthropic`: errors and keep-alives in Anthropic's shape.
        self.translation: Translation | None = None
        self.anthropic = False
        self.pd: Any = None  # PD mode over gRPC: the attempts' worker pairs (smg.grpc.pd)

    # --- what the connection and the sweeper call ----------------------------------------

    def pause_reading(self) -> None:
        self._writable.clear()

    def resume_reading(self) -> None:
        self._writable.set()

    def client_gone(self) -> None:
        if self.finished or self.reason:
            return
        self.reason = _GONE
        self._writable.set()
        if self.task is not None:
            self.task.cancel()

    def timed_out(self) -> None:
        if self.finished or self.reason:
            return
        self.reason = _TIMEOUT
        if self.task is not None:
            self.task.cancel()

    def keepalive(self, now: float, quiet_for: float) -> None:
        if self.state != _STREAMING or not self._writable.is_set():
            return
        if now - self.last_write >= quiet_for:
            self._write(SSE_KEEPALIVE_ANTHROPIC if self.anthropic else SSE_KEEPALIVE)

    # --- the task --------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                await self._serve()
            except asyncio.CancelledError:
                if not self.reason:
                    raise  # the loop is shutting down
                await self._cancelled()
        except asyncio.CancelledError:
            self._end_silently(CLIENT_LEFT, "cancelled")
            raise
        except Exception as exc:
            request_error = getattr(self.front._stages, "request_error", None)
            if request_error is not None and isinstance(exc, request_error):
                e: Any = exc
                # D1's RequestError writes the OpenAI body with `param`.
                body = e.body() if hasattr(e, "body") else None
                self._fail(e.status, e.code, e.message, body=body)
            elif isinstance(exc, _Refused):
                self._fail(*exc.answer)
            elif isinstance(
                exc, (NoTokenizer, getattr(self.front._stages, "load_error", NoTokenizer))
            ):
                self._fail(503, "tokenizer_unavailable", f"the model's tokenizer: {exc}")
            else:
                self.app.log_error("gRPC request failed", exc)
                self._fail(500, "internal_error", "internal gateway error")
        finally:
            if not self.finished:  # a path above forgot to end it: never leak a slot
                self._end_silently(500, "internal_error")

    async def _cancelled(self) -> None:
        """The client left or the deadline passed: stop the engine, answer if anyone listens."""
        await self._abort_engine()
        if self.reason == _GONE:
            self.outcome = 200 if self.head_sent else CLIENT_LEFT
            self._finish(499, "client_disconnected")
            return
        # As the HTTP path: a worker that did not answer in time is a transport failure.
        self.outcome = 200 if self.head_sent else 0
        self._fail(
            504,
            "upstream_timeout",
            f"worker did not answer within {self.app.request_timeout:g} s",
        )

    async def _abort_engine(self) -> None:
        client = self.dispatched
        if client is None:
            return
        self.dispatched = None
        try:
            rids = self.batch_rids if self.batch_rids is not None else [self.engine_rid]
            await asyncio.wait_for(client.abort(rids), 5.0)
        except Exception as exc:  # the engine may be gone: nothing more to do
            log.debug("Abort RPC failed: %r", exc)

    async def _serve(self) -> None:
        front = self.front
        app = self.app
        stages = front.stages
        entry = app.state.entries.get(self.entry_rows[0])
        tokenizer = await front.workers.tokenizer(entry)
        if self.kind == "embed":
            await self._embed(tokenizer, entry)
            return
        prepared = stages.prepare(self.kind, self.body, stages.defaults(tokenizer, entry))
        if prepared.prompts is not None:
            await self._serve_batch(prepared, tokenizer, entry)
            return
        template = front.workers.template(tokenizer) if prepared.kind == "chat" else None
        ids, text = await front.offload.run(
            len(self.request.body), stages.prompt_ids, prepared, tokenizer, template
        )
        stages.apply_limits(prepared, len(ids), _context_length(entry, tokenizer))
        self.request.body = b""  # parsed: the request no longer needs it
        route = self._route(ids)
        model = self.body.get("model") or (entry.models[0] if entry and entry.models else "")
        await self._generate(prepared, ids, text, tokenizer, route, str(model), template)

    async def _serve_batch(
        self, prepared: Any, tokenizer: Any, entry: DirectoryEntry | None
    ) -> None:
        """/v1/completions with several prompts: each prompt checked and tokenized as a
        request of its own, routed as the first one (the Rust SMG's affinity proxy)."""
        front = self.front
        stages = front.stages
        parts = [stages.prepare_mod.batch_part(prepared, p) for p in prepared.prompts]
        prompts = await front.offload.run(
            len(self.request.body), _batch_prompt_ids, stages, parts, tokenizer
        )
        context = _context_length(entry, tokenizer)
        for part, (ids, _text) in zip(parts, prompts, strict=True):
            stages.apply_limits(part, len(ids), context)
        self.request.body = b""
        route = self._route(prompts[0][0])
        route.prompt_tokens = sum(len(ids) for ids, _text in prompts)
        model = self.body.get("model") or (entry.models[0] if entry and entry.models else "")
        await self._generate_batch(parts, prompts, tokenizer, str(model))

    def _route(self, ids: list[int]) -> RouteRequest:
        from smg.policies.base import RouteRequest
        from smg.policies.routing_key import TARGET_WORKER_HEADER, implicit_key, routing_key

        app = self.app
        route = RouteRequest(model=self.route_model, stream=self.stream, prompt_tokens=len(ids))
        if app.needs_text or self.pd is not None:  # PD: the prefill policy may read them
            route.token_ids = array("I", ids).tobytes()
        if app.key_names is not None:
            header = self.request.header
            route.routing_key = routing_key(header, app.key_names)
            if route.routing_key is None and app._policy_for(route.model).implicit_key:
                route.routing_key = implicit_key(header)
            target = header(TARGET_WORKER_HEADER)
            if target:
                route.target_worker = target.decode("latin-1")
        self.route = route
        return route

    # --- attempts ----------------------------------------------------------------------------------

    def _next_worker(self) -> DirectoryEntry:
        """Choose a worker for the next attempt and account it (in-flight count, policy
        dispatch), or raise _Refused."""
        if self.pd is not None:
            return self.pd.choose()  # type: ignore[no-any-return]
        app = self.app
        route = self.route
        assert route is not None
        state = app.refresh()
        found = self.front.rows_for(route.model)
        rows = found[1] if found is not None else []
        chose_at = time.time_ns() if self.trace is not None else 0
        row = app._choose(rows, self.failed_rows, route) if rows else -4
        if self.trace is not None:
            app._trace_route(self.request, chose_at, route.model, rows, row)
        if row < 0:
            raise _Refused(*app._refusal(row, route.model))
        entry = state.entries[row]
        self.row = row
        self.generation = entry.generation
        self.attempts += 1
        self.attempting = True
        app._in_flight_add(row, entry.generation)
        app.policy.on_dispatch(row)
        if self.trace is not None:
            self.trace.begin_attempt(entry.url)
        return entry

    def _client(self, entry: DirectoryEntry) -> Any:
        workers = self.front.workers
        return workers.client(entry) if self.pd is None else self.pd.client(workers, entry)

    async def _retry_after(self, outcome: int) -> None:
        """End the failed attempt (accounted with `outcome`) and wait out the backoff."""
        app = self.app
        row = self.row
        if self.attempting:  # else a PD decode leg never admitted (smg.grpc.pd): nothing counted
            self.attempting = False
            app.attempt_done(self, outcome)  # type: ignore[arg-type]
        elif self.trace is not None:  # the held leg's attempt span ends all the same
            self.trace.end_attempt(outcome, "" if outcome else "upstream transport failure")
        if self.failed_rows is None:
            self.failed_rows = [row]
        elif row not in self.failed_rows:
            self.failed_rows.append(row)
        delay = app.retry_policy.delay_seconds(self.attempts - 1, random.random())
        app.metrics.retry(self.endpoint, self.attempts, delay)
        if delay > 0:
            await asyncio.sleep(delay)

    def _can_retry(self, error: EngineError, status: int) -> bool:
        app = self.app
        return (
            app.retries_on
            and not self.head_sent
            and error.before_first_token
            and retryable(status)
            and self.attempts < app.retry_policy.max_attempts
        )

    async def _generate(
        self,
        prepared: Any,
        ids: list[int],
        text: str,
        tokenizer: Any,
        route: RouteRequest,
        model: str,
        template: Any = None,
    ) -> None:
        stages = self.front.stages
        asked = self.body.get("model")
        request_model = asked if isinstance(asked, str) else None
        # SGLang's /generate `rid` names the request at the engine and in the answer.
        request_id = prepared.request_id_hint or self.request_id.decode("latin-1")
        self.engine_rid = request_id
        created = int(time.time())
        engine_request = GenerateInput(
            request_id=request_id,
            input_ids=ids,
            sampling=prepared.sampling,
            stream=prepared.stream,
            text=text,
        )
        self.ttft_pending = prepared.stream
        while True:
            entry = self._next_worker()
            client = self._client(entry)
            # --dp-aware: this attempt's rank worker's rank (a retry's replaces the last);
            # in PD the decode's (smg.grpc.pd gives the prefill its own).
            engine_request.dp_rank = entry.dp_rank
            plan = stages.parsers(prepared, entry, template, request_model)
            run = _Run(stages, prepared, tokenizer, len(ids), plan, keep_deltas=not prepared.stream)
            writer = None
            if prepared.stream:
                writer = stages.writer(prepared, request_id, model, created, tokenizer)
                writer.prompt_tokens = len(ids)  # continuous usage stats
                if plan is not None:
                    writer.use_parsers()
            self.dispatched = client
            try:
                timeout = max(0.001, self.deadline - time.monotonic())
                outputs = _batches(client, engine_request, timeout)
                try:
                    async for outs in outputs:
                        # A batch is what one read of the worker's socket brought: its
                        # events go out in one write (one await per batch, not per token).
                        events: list[bytes] = []
                        ended = False
                        for out in outs:
                            delta = run.add(out)
                            if writer is not None:
                                data = writer.delta(delta)
                                if data:
                                    events.append(data)
                            # A choice ends only with a finish reason: check the others then.
                            if delta.finish_reason is not None and run.all_done():
                                ended = True  # every choice ended (a stop string matched here)
                                break
                        if writer is not None:
                            if events and self.head_sent and self._plain_sse():
                                # A running stream's batch: _send_event's work inline (no
                                # coroutine made and awaited per batch of a token or two).
                                self._write(b"".join(events))
                                if not self._writable.is_set():
                                    await self._writable.wait()  # the client's buffer is full
                            elif events or not self.head_sent:
                                await self._stream_events(writer, events)
                        if ended:
                            break
                finally:
                    with contextlib.suppress(Exception):
                        await outputs.aclose()  # type: ignore[attr-defined]
            except EngineError as error:
                if await self._after_failure(error):
                    continue
                return
            if not run.engine_finished():
                # A gateway-side stop ended every choice: the engine stops too.
                await self._abort_engine()
            self.dispatched = None
            self.outcome = 200
            usage = stages.usage(*run.usage())
            if writer is not None:
                if not self.head_sent:
                    await self._start_stream(writer.start())
                await self._end_stream(writer.end(usage))
            else:
                body = stages.body(
                    prepared, request_id, model, created, tokenizer, run.deltas, usage
                )
                if self.translation is not None:
                    await self._answer_translated(body)
                    return
                self._answer(200, body)
            return

    def _plain_sse(self) -> bool:
        """The stream's events go out as they are: no TTFT left to record, no translation."""
        return not self.ttft_pending and self.translation is None

    async def _stream_events(self, writer: Any, events: list[bytes]) -> None:
        """One batch of a stream out: the head first if it has not gone yet, then the
        batch's events in one write; the first events sent are the stream's TTFT."""
        if events and self.ttft_pending:
            self.ttft_pending = False
            self.app.metrics.ttft(
                self.model, self.endpoint, "grpc", time.monotonic() - self.started
            )
        if not self.head_sent:
            await self._start_stream(writer.start(), b"".join(events))
        elif events:
            await self._send_event(b"".join(events))

    async def _after_failure(self, error: EngineError) -> bool:
        """An attempt failed: True when it is retried on another worker (the caller tries
        again), False when the client got the failure (the error answer, or the SSE error
        event once the stream has started)."""
        self.dispatched = None
        status, code = self.front.stages.failure(error, self.head_sent)
        outcome = 0 if error.code in _TRANSPORT_CODES else status
        pd_answer = getattr(error, "pd_answer", None)  # a PD leg's (smg.grpc.pd.LegError)
        if pd_answer is not None and not self.head_sent:
            status, code, outcome = pd_answer
        if self._can_retry(error, status):
            await self._retry_after(outcome)
            return True
        if (
            self.app.retries_on
            and self.attempts >= self.app.retry_policy.max_attempts
            and retryable(status)
        ):
            self.app.metrics.retries_exhausted(self.endpoint)
        self.outcome = outcome
        self._fail(status, code, error.message)
        return False

    async def _generate_batch(
        self,
        parts: list[Any],
        prompts: list[tuple[list[int], str]],
        tokenizer: Any,
        model: str,
    ) -> None:
        """A batched completion: one engine request per prompt on one worker, all at
        once, their outputs handled as they come (streamed: interleaved, each chunk's
        choice numbered by `batch_index`). The first failure ends the request as the
        single path's would (retried elsewhere while nothing was sent), and every engine
        request still running is aborted."""
        stages = self.front.stages
        respond = stages.respond
        request_id = self.request_id.decode("latin-1")
        rids = [f"{request_id}-p{i}" for i in range(len(parts))]
        self.batch_rids = rids
        created = int(time.time())
        stream = parts[0].stream
        requests = [
            GenerateInput(
                request_id=rid,
                input_ids=ids,
                sampling=part.sampling,
                stream=stream,
                text=text,
            )
            for rid, part, (ids, text) in zip(rids, parts, prompts, strict=True)
        ]
        self.ttft_pending = stream
        while True:
            entry = self._next_worker()
            client = self._client(entry)
            for request in requests:  # --dp-aware: as in _generate
                request.dp_rank = entry.dp_rank
            runs = [
                _Run(stages, part, tokenizer, len(ids), None, keep_deltas=not stream)
                for part, (ids, _text) in zip(parts, prompts, strict=True)
            ]
            writers: list[Any] = []
            if stream:
                for i, (part, (ids, _text)) in enumerate(zip(parts, prompts, strict=True)):
                    writer = stages.writer(part, request_id, model, created, tokenizer)
                    writer.prompt_tokens = len(ids)
                    writer.index_offset = respond.batch_index(i, max(1, part.sampling.n), 0)
                    writers.append(writer)
            self.dispatched = client
            timeout = max(0.001, self.deadline - time.monotonic())
            queue: asyncio.Queue[tuple[int, list[Any] | None, BaseException | None]] = (
                asyncio.Queue(maxsize=len(requests))
            )
            pumps = [
                asyncio.ensure_future(_pump(i, _batches(client, req, timeout), queue))
                for i, req in enumerate(requests)
            ]
            open_prompts = len(requests)
            closed = [False] * len(requests)  # no more outputs wanted
            stopped = [False] * len(requests)  # ended by the gateway (a stop string)
            failed = -1
            try:
                while open_prompts:
                    i, outs, failure = await queue.get()
                    if closed[i]:
                        continue
                    if outs is None:
                        closed[i] = True
                        if failure is not None:
                            failed = i
                            raise failure
                        open_prompts -= 1
                        continue
                    run = runs[i]
                    writer = writers[i] if stream else None
                    events: list[bytes] = []
                    for out in outs:
                        delta = run.add(out)
                        if writer is not None:
                            data = writer.delta(delta)
                            if data:
                                events.append(data)
                        if delta.finish_reason is not None and run.all_done():
                            if not run.engine_finished():
                                # the gateway stopped it: no more outputs, Abort at the end
                                stopped[i] = closed[i] = True
                                pumps[i].cancel()
                                open_prompts -= 1
                            break
                    if stream:
                        await self._stream_events(writers[0], events)
            except EngineError as error:
                await _stop_pumps(pumps)
                # The other prompts' requests that may still run: Abort them.
                self.batch_rids = [
                    rid
                    for j, (rid, run) in enumerate(zip(rids, runs, strict=True))
                    if j != failed and not run.engine_finished()
                ]
                if self.batch_rids:
                    await self._abort_engine()
                self.batch_rids = rids
                if await self._after_failure(error):
                    continue
                return
            except Exception:
                await _stop_pumps(pumps)
                await self._abort_engine()
                raise
            finally:
                await _stop_pumps(pumps)
            if any(stopped):
                # A gateway-side stop ended those prompts: their engine requests stop too.
                self.batch_rids = [rid for rid, s in zip(rids, stopped, strict=True) if s]
                await self._abort_engine()
            self.dispatched = None
            self.outcome = 200
            usage = respond.summed_usage([stages.usage(*run.usage()) for run in runs])
            if stream:
                if not self.head_sent:
                    await self._start_stream(writers[0].start())
                await self._end_stream(writers[0].end(usage))
            else:
                body = respond.completion_batch_body(
                    parts,
                    request_id,
                    model,
                    created,
                    tokenizer,
                    [run.deltas for run in runs],
                    usage,
                )
                self._answer(200, body)
            return

    async def _embed(self, tokenizer: Any, entry: DirectoryEntry | None) -> None:
        stages = self.front.stages
        body = self.body
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and all(isinstance(x, int) for x in inputs)
        ):
            inputs = [inputs]
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(
                isinstance(x, str)
                or (isinstance(x, list) and x and all(isinstance(t, int) for t in x))
                for x in inputs
            )
        ):
            raise stages.request_error(
                400,
                "invalid_request_error",
                "'input' must be a string, a list of strings, or token ids",
            )
        sequences = [
            x if isinstance(x, list) else stages.encode(tokenizer, x, True) for x in inputs
        ]
        context = _context_length(entry, tokenizer)
        for seq in sequences:
            if context and len(seq) > context:
                raise stages.request_error(
                    400,
                    "invalid_request_error",
                    f"This model's maximum context length is {context} tokens. However, you "
                    f"requested {len(seq)} tokens in the input for embedding generation. "
                    "Please reduce the length of the input.",
                )
        route = self._route(sequences[0])
        rid = self.request_id.decode("latin-1")
        model = body.get("model") or (entry.models[0] if entry and entry.models else "")
        while True:
            entry = self._next_worker()
            client = self._client(entry)
            self.dispatched = client
            timeout = max(0.001, self.deadline - time.monotonic())
            try:
                results = await asyncio.gather(
                    *(client.embed(f"{rid}-{i}", seq, timeout) for i, seq in enumerate(sequences))
                )
            except EngineError as error:
                self.dispatched = None
                status, code = stages.http_status(error.code)
                outcome = 0 if error.code in _TRANSPORT_CODES else status
                if self._can_retry(error, status):
                    await self._retry_after(outcome)
                    continue
                self.outcome = outcome
                self._fail(status, code, error.message)
                return
            self.dispatched = None
            del route
            self.outcome = 200
            self._answer(200, stages.respond.embeddings_body(results, str(model), body))
            return

    # --- writing ----------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.client.write(data if self.http10 else chunk(data))
        self.last_write = self.app.now

    async def _start_stream(self, first: bytes, more: bytes = b"") -> None:
        """The head, then `first` and `more` (the stream's first events)."""
        app = self.app
        keep_alive = self.keep_alive and not app.draining and not self.http10
        self.keep_alive = keep_alive
        extra = app.process_header + self.cors
        head = sse_head(self.request_id, extra, keep_alive, not self.http10)
        self.head_sent = True
        self.state = _STREAMING
        if app.sse_keepalive > 0:
            app.streams.add(self)  # type: ignore[arg-type]
        if self.translation is None:
            # Head and first events in one write: each write is a send(2), which is most
            # of what a stream's start costs.
            data = first + more
            if data:
                head += data if self.http10 else chunk(data)
                self.last_write = app.now
            self.client.write(head)
            if not self._writable.is_set():
                await self._writable.wait()  # the client's socket buffer is full
            return
        self.client.write(head)
        if first:
            await self._send_event(first)
        if more:
            await self._send_event(more)

    async def _send_event(self, data: bytes) -> None:
        if self.translation is not None:
            data = self.translation.feed(data)
            if not data:
                return
        self._write(data)
        if not self._writable.is_set():
            await self._writable.wait()  # the client's socket buffer is full

    async def _end_stream(self, last: bytes) -> None:
        if self.translation is not None:
            last = self.translation.feed(last) + self.translation.finish()
            await self._settle()
        if last:
            self.last_write = self.app.now
        self._close_stream(200, "", last)

    def _close_stream(self, status: int, code: str, last: bytes = b"") -> None:
        """Ends the stream: `last` (the final events) and the last chunk in one write."""
        if self.http10:
            if last:
                self.client.write(last)
        else:
            self.client.write(chunk(last) + _CHUNK_END if last else _CHUNK_END)
        self.state = _IDLE
        self.app.streams.discard(self)  # type: ignore[arg-type]
        self._finish(status, code)
        if self.http10:
            self.client.close()
        else:
            self.client.response_done(self.keep_alive)

    async def _settle(self) -> bool:
        """The history observer's store write, awaited before the answer's last bytes go
        out (a client that reads the response right after has it). False: the write
        failed (the observer logged it)."""
        settle = getattr(self.translation, "settle", None)
        pending = settle() if settle is not None else None
        if pending is None:
            return True
        try:
            # shield: a client that leaves meanwhile must not cancel the write.
            return await asyncio.shield(pending) is not False
        except Exception:
            return False

    async def _answer_translated(self, body: bytes) -> None:
        """A whole 2xx answer through the translation, the observer's write awaited; a
        write that failed is answered 503 storage_unavailable, as the HTTP path and the
        1.13 binary answer it (a stream goes out whole all the same)."""
        assert self.translation is not None
        body = self.translation.response(200, body)
        if not await self._settle():
            self._fail(503, "storage_unavailable", STORE_FAILED)
            return
        self._answer(200, body, translated=True)

    def _answer(self, status: int, body: bytes, *, translated: bool = False) -> None:
        if self.translation is not None and not translated:
            body = self.translation.response(status, body)
        app = self.app
        content_type, extra, code = b"application/json", b"", ""
        wasm = None if app.wasm is None else self._wasm(status, body, extra, code)
        if wasm is not None:
            status, content_type, extra, body, code = wasm
        keep_alive = self.keep_alive and not app.draining
        self.client.write(self._built(status, body, content_type, extra, keep_alive))
        self._finish(status, code)
        self.client.response_done(keep_alive)

    def _built(
        self, status: int, body: bytes, content_type: bytes, extra: bytes, keep_alive: bool
    ) -> bytes:
        """A whole answer's bytes, with this request's id, process and CORS lines."""
        app = self.app
        return build_response(
            status,
            body,
            content_type=content_type,
            extra_headers=b"%bx-request-id: %b\r\n%b%b"
            % (extra, self.request_id, app.process_header, self.cors),
            keep_alive=keep_alive,
        )

    def _wasm(
        self, status: int, body: bytes, extra: bytes, code: str
    ) -> tuple[int, bytes, bytes, bytes, str] | None:
        """A whole answer through the OnResponse modules (smg.wasm.chain.local_answer), as a
        proxied one goes: (status, content type, header lines, body, error code); None when
        no module runs on it."""
        app = self.app
        chain = app.wasm
        if (
            chain is None
            or not chain.on_response
            or not app._wasm_answers(self.client, self.request)
        ):
            return None
        from smg.wasm.chain import local_answer

        a = local_answer(chain, status, b"application/json", extra, body, code)
        return a.status, a.content_type, a.extra, a.body, a.code

    def _fail(
        self,
        status: int,
        code: str,
        message: str,
        extra: bytes = b"",
        *,
        body: bytes | None = None,
    ) -> None:
        """An error answer, or, once the stream's head is out, an error event that ends it."""
        if self.finished:
            return
        if self.client.closed:
            self._finish(499 if not self.head_sent else status, code)
            return
        if self.head_sent:
            if self.translation is not None:
                self._write(self.translation.abort(code, message))
            else:
                self._write(stream_error_event(code, message))
            self._close_stream(200, "stream_error")
            return
        app = self.app
        keep_alive = self.keep_alive and not app.draining
        if self.anthropic:
            # Anthropic's shape, with the message the OpenAI body would have carried.
            body = anthropic_error_body(status, _error_message(body) or message, self.request_id)
        wasm = None
        if app.wasm is not None:  # OnResponse modules: the error answer as a whole answer
            shown = error_body(status, code, message) if body is None else body
            lines = b"x-smg-error-code: %b\r\n%b" % (code.encode("latin-1"), extra)
            wasm = self._wasm(status, shown, lines, code)
        if wasm is not None:
            status, content_type, extra, body, code = wasm
            answer = self._built(status, body, content_type, extra, keep_alive)
        elif body is None:
            answer = error_response(
                status,
                code,
                message,
                extra_headers=extra + app.process_header + self.cors,
                keep_alive=keep_alive,
                request_id=self.request_id,
            )
        else:
            answer = build_response(
                status,
                body,
                extra_headers=b"x-smg-error-code: %b\r\nx-request-id: %b\r\n%b%b%b"
                % (code.encode("latin-1"), self.request_id, extra, app.process_header, self.cors),
                keep_alive=keep_alive,
            )
        self.client.write(answer)
        self._finish(status, code)
        self.client.response_done(keep_alive)

    def _end_silently(self, status: int, code: str) -> None:
        if not self.finished:
            self._finish(status, code)
            if not self.client.closed:
                self.client.close()

    def _finish(self, status: int, code: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.state = _IDLE
        self.app.streams.discard(self)  # type: ignore[arg-type]
        # exchange_finished ends the open attempt's span and the request's (tracing on).
        self.app.exchange_finished(self, status, code)  # type: ignore[arg-type]


def _batches(client: Any, request: GenerateInput, timeout: float) -> AsyncIterator[list[Any]]:
    """The engine's outputs in batches: the h2 client's own (`generate_batches`), else
    grpc.aio's outputs one at a time."""
    batches = getattr(client, "generate_batches", None)
    if batches is not None:
        return batches(request, timeout=timeout)  # type: ignore[no-any-return]
    return _one_by_one(client.generate(request, timeout=timeout))


async def _one_by_one(outputs: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
    try:
        async for out in outputs:
            yield [out]
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


def _batch_prompt_ids(stages: Any, parts: list[Any], tokenizer: Any) -> list[tuple[list[int], str]]:
    """Tokenize every prompt of a batched completion (one offload call for them all)."""
    return [stages.prompt_ids(part, tokenizer, None) for part in parts]


async def _pump(
    index: int,
    outputs: AsyncIterator[list[Any]],
    queue: asyncio.Queue[tuple[int, list[Any] | None, BaseException | None]],
) -> None:
    """One prompt's engine outputs into the batch's queue: (index, batch, None) per
    batch, then (index, None, None) at the end or (index, None, error) on a failure."""
    try:
        async for outs in outputs:
            await queue.put((index, outs, None))
    except Exception as error:  # an EngineError, or a bug the request must not hang on
        await queue.put((index, None, error))
        return
    finally:
        with contextlib.suppress(Exception):
            await outputs.aclose()  # type: ignore[attr-defined]
    await queue.put((index, None, None))


async def _stop_pumps(pumps: list[asyncio.Future[None]]) -> None:
    """Cancel a batch's pumps and wait for them (each closes its engine stream)."""
    for pump in pumps:
        pump.cancel()
    # return_exceptions: the pumps' own ends are not ours; a cancel of this task still is
    await asyncio.gather(*pumps, return_exceptions=True)


class _Run:
    """One attempt's choices: the per-choice state machines, their deltas, the usage."""

    __slots__ = (
        "cached",
        "choices",
        "completion",
        "deltas",
        "finished",
        "keep_deltas",
        "prompt_tokens",
    )

    def __init__(
        self,
        stages: Any,
        prepared: Any,
        tokenizer: Any,
        prompt_tokens: int,
        plan: Any = None,
        *,
        keep_deltas: bool = True,
    ) -> None:
        n = max(1, int(prepared.sampling.n))
        make = stages.choice if plan is None else plan.choice
        self.choices = [make(i, tokenizer, prepared.sampling) for i in range(n)]
        # Only a non-streamed answer is built from the deltas: a stream's are written as
        # they come, and keeping them would hold ~3 objects a token until the end.
        self.keep_deltas = keep_deltas
        self.deltas: list[list[Any]] = [[] for _ in range(n)]
        self.prompt_tokens = prompt_tokens
        self.cached = 0
        self.completion = [0] * n
        self.finished = [False] * n  # the engine ended the choice

    def add(self, out: EngineOutput) -> Any:
        index = out.index
        choices = self.choices
        if not 0 <= index < len(choices):
            index = 0
        if out.prompt_tokens:
            self.prompt_tokens = out.prompt_tokens
        if out.cached_tokens > self.cached:
            self.cached = out.cached_tokens
        completion = self.completion
        count = completion[index] + len(out.token_ids)
        completion[index] = count if count > out.completion_tokens else out.completion_tokens
        if out.finished:
            self.finished[index] = True
        delta = choices[index].on_output(out)
        if self.keep_deltas:
            self.deltas[index].append(delta)
        return delta

    def all_done(self) -> bool:
        return all(choice.done() for choice in self.choices)

    def engine_finished(self) -> bool:
        return all(self.finished)

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens over every choice, cached prompt tokens)."""
        return (self.prompt_tokens, sum(self.completion), self.cached)
