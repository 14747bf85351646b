"""The mock worker's HTTP layer: a lean asyncio.Protocol on httptools, plus routing.

Hot path (non-streaming, no delay): parse, plan, render and write in the protocol
callback, with no Task and one `transport.write`. A request with a delay, a stream or a
hang runs as one Task; later pipelined requests on that connection wait in order.
Reading is not paused while a response is in progress so a client's close is noticed
at once: the Task is cancelled and the disconnect counted.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import httptools
import orjson

from smg.mock_worker import render, wire
from smg.mock_worker.options import Options, RuntimeConfig, apply_update
from smg.mock_worker.pd import (
    PREFILL,
    STATS_ROOMS,
    KvTransferError,
    RoomBook,
    await_rooms,
    bootstrap_targets,
)
from smg.mock_worker.plan import (
    PLANNERS,
    ApiError,
    Plan,
    Timing,
    apply_header_overrides,
    parse_json_object,
    parse_status_override,
    prompt_token_lists,
    read_limit,
)
from smg.mock_worker.prefix_cache import PrefixCache
from smg.mock_worker.stats import WorkerStats


def server_ssl_context(opts: Options) -> ssl.SSLContext | None:
    """The context for --ssl-certfile (None: plain HTTP). With --ssl-cert-reqs 2 a client
    without a certificate from --ssl-ca-certs fails the handshake, as uvicorn/vLLM do.
    Raises OSError / ssl.SSLError for unusable files (the runner reports them)."""
    if opts.ssl_certfile is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(opts.ssl_certfile, opts.ssl_keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    if opts.ssl_ca_certs is not None:
        ctx.load_verify_locations(opts.ssl_ca_certs)
    ctx.verify_mode = ssl.VerifyMode(opts.ssl_cert_reqs)
    return ctx


# Connection states and their transitions; an event not in the table is a bug.
IDLE, BUSY, CLOSED = "idle", "busy", "closed"
_TRANSITIONS: dict[tuple[str, str], str] = {
    (IDLE, "start_async"): BUSY,
    (BUSY, "finish_async"): IDLE,
    (IDLE, "lost"): CLOSED,
    (BUSY, "lost"): CLOSED,  # a response was cut short: a disconnect
}

# Route kinds: what faults, auth, stats and in-flight accounting apply to.
INFERENCE, PROBE, INFO, CONTROL = "inference", "probe", "info", "control"

_PIPELINE_HIGH = 64  # parsed-but-waiting requests before reading pauses
_LINGER_S = 1.0  # how long a rejected connection keeps draining input before closing
_NO_PREV: dict[bytes, bytes] = {}

_FLUSH_TEXT = (
    b"Cache flushed.\nPlease check backend logs for more details. (When there are running "
    b"or waiting requests, the operation will not be performed.)\n"
)


class _HeadersTooLarge(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


class Request:
    __slots__ = (
        "auth",
        "body",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "mock",
        "path",
        "query",
        "target",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        auth: bytes | None,
        mock: dict[bytes, bytes] | None,
        keep_alive: bool,
        http10: bool,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition(b"?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.auth = auth
        self.mock = mock
        self.keep_alive = keep_alive
        self.http10 = http10


class ProcessState:
    """Process-wide: the `--exit-after` budget and the stop signal."""

    def __init__(self, exit_after: int | None) -> None:
        self.exit_after = exit_after
        self.answered = 0
        self.stop = asyncio.Event()

    def count_answered(self) -> None:
        self.answered += 1
        limit = self.exit_after
        if limit is not None and self.answered >= limit and not self.stop.is_set():
            print(
                f"smg mock-worker: exiting after {self.answered} requests (--exit-after)",
                file=sys.stderr,
                flush=True,
            )
            self.stop.set()


Handler = Callable[["Worker", "Connection", Request], None]


class Route:
    __slots__ = ("handler", "kind", "methods")

    def __init__(self, methods: tuple[bytes, ...], kind: str, handler: Handler) -> None:
        self.methods = methods
        self.kind = kind
        self.handler = handler


class Worker:
    """One emulated engine: its own config, stats, dice and listener."""

    def __init__(self, opts: Options, index: int, process: ProcessState) -> None:
        self.opts = opts
        self.index = index
        self.process = process
        self.cfg = RuntimeConfig.from_options(opts)
        self.stats = WorkerStats()
        self.cache = PrefixCache(opts.prefix_cache_tokens) if opts.prefix_cache_tokens else None
        self.rng = random.Random(None if opts.seed is None else opts.seed + index)
        self.port = 0
        self.in_flight = 0
        self.in_flight_tokens = 0
        self.connections: set[Connection] = set()
        prefix = opts.root_path.encode()
        self.routes = {prefix + path: route for path, route in ROUTES[opts.engine].items()}
        self.auth_token = None if opts.api_key is None else b"Bearer " + opts.api_key.encode()
        self._seq = 0
        # PD roles (pd.py): a prefill records its rooms for its bootstrap server.
        self.pd_role = opts.pd_role
        self.rooms = RoomBook() if opts.pd_role == PREFILL else None
        self.bootstrap_port = 0
        self.kv_failures = 0  # decode requests failed for want of their prefill's KV

    # --- helpers -------------------------------------------------------------------------

    def next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-mock{self.index}x{self._seq:x}"

    def respond(
        self,
        conn: Connection,
        req: Request,
        status: int,
        body: bytes,
        ctype: bytes = wire.JSON,
        count: bool = True,
        extra: bytes = b"",
    ) -> None:
        if count:
            self.stats.count_status(status)
        if status == 200 and req.keep_alive and not req.http10 and ctype is wire.JSON:
            conn.write(wire.ok_json(body))
            return
        if req.http10 and req.keep_alive:  # 1.0 keeps the connection only when told so
            extra += b"connection: keep-alive\r\n"
        conn.write(wire.response(status, body, ctype, close=not req.keep_alive, extra=extra))

    def error(self, conn: Connection, req: Request, status: int, message: str, type_: str) -> None:
        self.respond(conn, req, status, render.error_body(status, message, type_))

    def load_view(self) -> render.LoadView:
        cfg = self.cfg
        capacity = self.opts.max_total_tokens
        if cfg.token_usage is None:
            usage = min(1.0, self.in_flight_tokens / capacity)
        else:
            usage = cfg.token_usage
        return render.LoadView(
            running=self.in_flight,
            waiting=cfg.waiting,
            used_tokens=int(usage * capacity),
            max_total_tokens=capacity,
            token_usage=usage,
            gen_throughput=self.stats.gen_throughput(time.monotonic()),
            max_running_requests=self.opts.max_running_requests,
            prompt_tokens_total=self.stats.prompt_tokens_total,
            generation_tokens_total=self.stats.generation_tokens_total,
            requests_total=self.stats.inference_answered,
        )

    def answered(self, prompt_tokens: int, completion_tokens: int) -> None:
        st = self.stats
        st.inference_answered += 1
        st.prompt_tokens_total += prompt_tokens
        st.generation_tokens_total += completion_tokens
        self.process.count_answered()

    # --- dispatch ------------------------------------------------------------------------

    def dispatch(self, conn: Connection, req: Request) -> None:
        route = self.routes.get(req.path)
        if route is None:
            self.stats.record(b"<unknown>", _record(req))
            self.error(
                conn, req, 404, f"route {req.path.decode('latin-1')} not found", "not_found_error"
            )
            return
        kind = route.kind
        if kind is not CONTROL:
            self.stats.record(req.path, _record(req))
        if req.method not in route.methods:
            body = render.error_body(405, "method not allowed", "invalid_request_error")
            allow = b"allow: " + b", ".join(route.methods) + b"\r\n"
            self.respond(conn, req, 405, body, count=kind is not CONTROL, extra=allow)
            return
        token = self.auth_token
        if (
            token is not None
            and req.auth != token
            and kind is not CONTROL
            and (kind is not PROBE or self.opts.auth_health)
        ):
            self.error(conn, req, 401, "Unauthorized", "authentication_error")
            return
        try:
            route.handler(self, conn, req)
        except ApiError as e:
            body = render.error_body(e.status, e.message, e.type)
            self.respond(conn, req, e.status, body, count=kind is not CONTROL)
            if kind is INFERENCE:
                self.answered(0, 0)

    # --- inference -----------------------------------------------------------------------

    def pick_fault(self, req: Request) -> tuple[str, int]:
        """The injected fault of an inference request: ("", 0) none, ("status", code) for
        x-mock-status, ("error", 500), ("hang", 0) or ("crash", 0)."""
        mock = req.mock
        if mock is not None and b"x-mock-status" in mock:
            return "status", parse_status_override(mock[b"x-mock-status"])
        cfg = self.cfg
        if cfg.error_rate > 0.0 and self.rng.random() < cfg.error_rate:
            return "error", 500
        if cfg.hang_rate > 0.0 and self.rng.random() < cfg.hang_rate:
            return "hang", 0
        if cfg.crash_rate > 0.0 and self.rng.random() < cfg.crash_rate:
            return "crash", 0
        return "", 0

    def fault_error(self, conn: Connection, req: Request, what: str, status: int) -> None:
        if what == "status":
            self.error(conn, req, status, f"mock status {status} (x-mock-status)", "mock_error")
        else:
            self.error(conn, req, 500, "mock injected error (error_rate)", "internal_server_error")
        self.answered(0, 0)

    def faults(self, conn: Connection, req: Request) -> bool:
        """Injected faults of an inference request; True when one answered it (or hung)."""
        what, status = self.pick_fault(req)
        if not what:
            return False
        if what == "hang":
            conn.start_async(self._hang())
        elif what == "crash":
            conn.start_async(self._crash())
        else:
            self.fault_error(conn, req, what, status)
        return True

    def prepare(
        self, req: Request, kind: str, obj: dict[str, Any]
    ) -> tuple[Plan, Timing, str, int, str]:
        """Plan one inference request: (plan, timing, id, created, model); ApiError when bad."""
        cfg = self.cfg
        mock = req.mock
        timing = Timing(cfg.ttft_ms / 1000.0, cfg.itl_ms / 1000.0, cfg.output_len, cfg.eos_prob)
        if mock is not None:
            apply_header_overrides(
                timing,
                mock.get(b"x-mock-ttft-ms"),
                mock.get(b"x-mock-itl-ms"),
                mock.get(b"x-mock-output-len"),
            )
        plan = PLANNERS[kind](obj, timing, self.rng)
        cache = self.cache
        prefill = cfg.prefill_us_per_token
        if cache is not None or prefill > 0.0:  # one check when both are off
            uncached = plan.total_prompt_tokens
            if cache is not None:
                plan.cached = [cache.lookup(t) for t in prompt_token_lists(kind, obj)]
                plan.report_zero_cached = self.opts.engine == "vllm"
                uncached -= sum(plan.cached)
            timing.ttft_s += prefill * uncached / 1e6
        model = self._model_for(plan.model)
        rid = plan.rid or self.next_id(_ID_PREFIX[kind])
        return plan, timing, rid, int(time.time()), model

    def inference(self, conn: Connection, req: Request, kind: str) -> None:
        if self.pd_role is not None:
            self.pd_inference(conn, req, kind)
            return
        if self.faults(conn, req):
            return
        plan, timing, rid, created, model = self.prepare(req, kind, parse_json_object(req.body))
        if plan.stream:
            if timing.ttft_s > 0.0 or timing.itl_s > 0.0:
                conn.start_async(
                    self._stream(conn, req, plan, timing, rid, created, model), _tokens(plan)
                )
            else:
                self._stream_now(conn, req, plan, rid, created, model)
            return
        delay = timing.ttft_s + timing.itl_s * max(0, plan.n_tokens - 1)
        if delay > 0.0:
            conn.start_async(
                self._delayed(conn, req, plan, delay, rid, created, model), _tokens(plan)
            )
            return
        self.respond(conn, req, 200, render.render_response(plan, rid, created, model))
        self.answered(plan.total_prompt_tokens, plan.total_completion_tokens)

    # --- PD roles (pd.py) ------------------------------------------------------------------

    def pd_inference(self, conn: Connection, req: Request, kind: str) -> None:
        """A request to a prefill or decode engine: its bootstrap fields and body are
        checked first (400), then it runs as one Task (a decode waits for its KV)."""
        obj = parse_json_object(req.body)
        targets = bootstrap_targets(kind, obj, self.opts.bootstrap_port)
        plan, timing, rid, created, model = self.prepare(req, kind, obj)
        rooms = self.rooms
        if rooms is not None:
            # SGLang's prefill runs with max_new_tokens = 1: it computes the KV and the
            # first token; the decode engine generates the answer.
            if plan.n_tokens >= 1:
                plan.n_tokens = 1
                plan.finish_reason = "length"
            room_ids = [room for _, _, room in targets]
            rooms.start(room_ids, time.monotonic())
            coro = self._pd_prefill(conn, req, room_ids, plan, timing, rid, created, model)
        else:
            plan.input_logprobs = False  # the prefill computed them
            coro = self._pd_decode(conn, req, targets, plan, timing, rid, created, model)
        conn.start_async(coro, _tokens(plan))

    async def _pd_prefill(
        self,
        conn: Connection,
        req: Request,
        room_ids: list[int],
        plan: Plan,
        timing: Timing,
        rid: str,
        created: int,
        model: str,
    ) -> None:
        ok = False
        try:
            ok = await self._pd_answer(conn, req, plan, timing, rid, created, model)
        finally:  # cancelled (the client went away) or failed: the room failed
            assert self.rooms is not None
            self.rooms.finish(room_ids, ok)

    async def _pd_decode(
        self,
        conn: Connection,
        req: Request,
        targets: list[tuple[str, int, int]],
        plan: Plan,
        timing: Timing,
        rid: str,
        created: int,
        model: str,
    ) -> None:
        # A stream's head goes out at once, as SGLang's StreamingResponse sends it: a
        # failure after that is an in-band error event, not a status.
        head = plan.stream and self.opts.pd_stream_head == "early"
        if head:
            self._stream_head(conn, req)
        try:
            await await_rooms(targets, self.opts.pd_wait_s)
        except KvTransferError as e:
            self.kv_failures += 1
            if head:
                self._stream_error(conn, req, str(e))
            else:
                self.error(conn, req, 500, str(e), "internal_server_error")
            self.answered(0, 0)
            conn.finish_async(req)
            return
        await self._pd_answer(conn, req, plan, timing, rid, created, model, head)

    async def _pd_answer(
        self,
        conn: Connection,
        req: Request,
        plan: Plan,
        timing: Timing,
        rid: str,
        created: int,
        model: str,
        head_sent: bool = False,
    ) -> bool:
        """Answer as the plain engine would, faults included; True when answered 200."""
        what, status = self.pick_fault(req)
        if what == "hang":
            await self._hang()
        elif what == "crash":
            await self._crash()
        elif what:
            if head_sent:
                self._stream_error(conn, req, f"mock injected error ({what} {status})")
                self.answered(0, 0)
            else:
                self.fault_error(conn, req, what, status)
            conn.finish_async(req)
            return False
        if plan.stream:
            await self._stream(conn, req, plan, timing, rid, created, model, not head_sent)
        else:
            delay = timing.ttft_s + timing.itl_s * max(0, plan.n_tokens - 1)
            await self._delayed(conn, req, plan, delay, rid, created, model)
        return True

    def _model_for(self, requested: str | None) -> str:
        if requested is None or requested == "":
            model = self.opts.model
        elif self.opts.strict_model and requested != self.opts.model:
            raise ApiError(404, f"The model `{requested}` does not exist.", "NotFoundError")
        else:
            model = requested
        self.stats.count_model(model)
        return model

    async def _hang(self) -> None:
        await asyncio.get_running_loop().create_future()  # until the client goes away

    async def _crash(self) -> None:
        await asyncio.sleep(self.cfg.ttft_ms / 1000.0)
        print("smg mock-worker: crashing mid-request (crash_rate)", file=sys.stderr, flush=True)
        os._exit(1)  # no cleanup, no answer: every connection is reset by the kernel

    async def _delayed(
        self,
        conn: Connection,
        req: Request,
        plan: Plan,
        delay: float,
        rid: str,
        created: int,
        model: str,
    ) -> None:
        await asyncio.sleep(delay)
        self.respond(conn, req, 200, render.render_response(plan, rid, created, model))
        self.answered(plan.total_prompt_tokens, plan.total_completion_tokens)
        conn.finish_async(req)

    def _stream_now(
        self, conn: Connection, req: Request, plan: Plan, rid: str, created: int, model: str
    ) -> None:
        r = render.StreamRenderer(plan, rid, created, model)
        parts = [r.opening()]
        parts.extend(r.token(i) for i in range(plan.n_tokens))
        parts.append(r.closing())
        body = b"".join(parts)
        self.stats.count_status(200)
        if req.http10:
            conn.write(wire.stream_head(chunked=False, close=True) + body)
            conn.close_after_response()
        else:
            conn.write(
                wire.stream_head(chunked=True, close=not req.keep_alive)
                + wire.chunk(body)
                + wire.CHUNKED_END
            )
        self.answered(plan.total_prompt_tokens, plan.total_completion_tokens)

    async def _stream(
        self,
        conn: Connection,
        req: Request,
        plan: Plan,
        timing: Timing,
        rid: str,
        created: int,
        model: str,
        head: bool = True,  # False: the caller already sent the head (a PD decode)
    ) -> None:
        r = render.StreamRenderer(plan, rid, created, model)
        chunked = not req.http10
        frame: Callable[[bytes], bytes] = wire.chunk if chunked else _same
        prompts = len(plan.prompt_tokens)
        loop = asyncio.get_running_loop()
        self.stats.prompt_tokens_total += plan.total_prompt_tokens
        if head:
            self._stream_head(conn, req)
        start = loop.time()
        if timing.ttft_s > 0.0:
            await asyncio.sleep(timing.ttft_s)
        opening = r.opening()
        for i in range(plan.n_tokens):
            if i > 0 and timing.itl_s > 0.0:
                # Deadline-based, so timer slack does not accumulate over many tokens.
                wait = start + timing.ttft_s + i * timing.itl_s - loop.time()
                if wait > 0.0:
                    await asyncio.sleep(wait)
            data = r.token(i)
            if i == 0:
                data = opening + data
            conn.write(frame(data))
            self.stats.generation_tokens_total += prompts
            if conn.write_paused:
                await conn.drain()
        tail = r.closing() if plan.n_tokens else opening + r.closing()
        conn.write(frame(tail) + (wire.CHUNKED_END if chunked else b""))
        self.stats.inference_answered += 1
        self.process.count_answered()
        if req.http10:
            conn.close_after_response()
        conn.finish_async(req)

    def _stream_head(self, conn: Connection, req: Request) -> None:
        self.stats.count_status(200)
        conn.write(wire.stream_head(not req.http10, close=not req.keep_alive or req.http10))

    def _stream_error(self, conn: Connection, req: Request, message: str) -> None:
        """End a stream whose head went out with SGLang's in-band error event (its
        serving_chat on a scheduler abort: the error, then [DONE])."""
        event = {
            "error": {
                "object": "error",
                "message": message,
                "type": "INTERNAL_SERVER_ERROR",
                "param": None,
                "code": 500,
            }
        }
        data = render.sse(event) + render.DONE_EVENT
        if req.http10:
            conn.write(data)
            conn.close_after_response()
        else:
            conn.write(wire.chunk(data) + wire.CHUNKED_END)

    # --- route handlers ------------------------------------------------------------------

    def h_chat(self, conn: Connection, req: Request) -> None:
        self.inference(conn, req, "chat")

    def h_completion(self, conn: Connection, req: Request) -> None:
        self.inference(conn, req, "completion")

    def h_generate(self, conn: Connection, req: Request) -> None:
        self.inference(conn, req, "generate")

    def h_embeddings(self, conn: Connection, req: Request) -> None:
        if self.faults(conn, req):
            return
        obj = parse_json_object(req.body)
        try:
            inputs = render.embeddings_inputs(obj.get("input"))
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        model = self._model_for(obj.get("model") if isinstance(obj.get("model"), str) else None)
        body = render.embeddings_response(inputs, model, self.opts.embedding_dim)
        self.respond(conn, req, 200, body)
        self.answered(sum(n for _, n in inputs), 0)

    def h_rerank(self, conn: Connection, req: Request) -> None:
        if self.faults(conn, req):
            return
        obj = parse_json_object(req.body)
        query = obj.get("query")
        documents = obj.get("documents")
        if not isinstance(query, str):
            raise ApiError(400, "'query' must be a string")
        if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
            raise ApiError(400, "'documents' must be a list of strings")
        top_n = read_limit(obj, "top_n", "top_k")
        return_documents = obj.get("return_documents", True) is not False
        model = self._model_for(obj.get("model") if isinstance(obj.get("model"), str) else None)
        body = render.rerank_response(
            self.opts.engine,
            query,
            documents,
            top_n,
            return_documents,
            self.next_id("rerank"),
            model,
        )
        self.respond(conn, req, 200, body)
        self.answered(len(query.split()) * len(documents), 0)

    def h_health(self, conn: Connection, req: Request) -> None:
        status = 200 if self.cfg.healthy else 503
        self.respond(conn, req, status, b"", wire.TEXT)

    def h_models(self, conn: Connection, req: Request) -> None:
        body = render.models_response(
            self.opts.engine, self.opts.model, int(time.time()), self.opts.max_model_len
        )
        self.respond(conn, req, 200, body)

    def h_server_info(self, conn: Connection, req: Request) -> None:
        opts = self.opts
        info = {
            "context_length": opts.max_model_len,
            "max_running_requests": opts.max_running_requests,
            "max_total_tokens": opts.max_total_tokens,
        }
        body = render.sglang_server_info(opts.model, opts.host, self.port, info, self.load_view())
        self.respond(conn, req, 200, body)

    def h_model_info(self, conn: Connection, req: Request) -> None:
        self.respond(conn, req, 200, render.sglang_model_info(self.opts.model))

    def h_version(self, conn: Connection, req: Request) -> None:
        self.respond(conn, req, 200, render.vllm_version())

    def h_loads(self, conn: Connection, req: Request) -> None:
        query = _parse_query(req.query)
        dp_rank: int | None = None
        if "dp_rank" in query:
            try:
                dp_rank = int(query["dp_rank"])
            except ValueError:
                raise ApiError(400, "dp_rank must be an integer") from None
        view = self.load_view()
        if query.get("format") == "prometheus":
            self.respond(conn, req, 200, _loads_prometheus(view), wire.PROMETHEUS)
            return
        stamp = datetime.now(UTC).isoformat()
        self.respond(conn, req, 200, render.sglang_loads(view, stamp, dp_rank))

    def h_get_load(self, conn: Connection, req: Request) -> None:
        self.respond(conn, req, 200, render.sglang_get_load(self.load_view(), time.perf_counter()))

    def h_metrics(self, conn: Connection, req: Request) -> None:
        view = self.load_view()
        if self.opts.engine == "vllm":
            body = render.vllm_metrics(view, self.opts.model)
        else:
            body = render.sglang_metrics(view, self.opts.model)
        self.respond(conn, req, 200, body, wire.PROMETHEUS)

    def h_flush_cache(self, conn: Connection, req: Request) -> None:
        if self.cache is not None:
            self.cache.clear()
        self.respond(conn, req, 200, _FLUSH_TEXT, wire.TEXT)

    def h_start_profile(self, conn: Connection, req: Request) -> None:
        # The engines' profiler switch (vLLM, SGLang): the mock only records the call and
        # the options it was given (SGLang reads them from the JSON body).
        try:
            options = orjson.loads(req.body) if req.body else None
        except orjson.JSONDecodeError:
            options = None
        self.stats.record_profile("start", time.monotonic(), options)
        self.respond(conn, req, 200, b"Start profiling.\n", wire.TEXT)

    def h_stop_profile(self, conn: Connection, req: Request) -> None:
        self.stats.record_profile("stop", time.monotonic())
        self.respond(conn, req, 200, b"Stop profiling.\n", wire.TEXT)

    def h_mock_stats(self, conn: Connection, req: Request) -> None:
        snap = self.stats.snapshot(self.in_flight, time.monotonic())
        snap["port"] = self.port
        snap["engine"] = self.opts.engine
        snap["pd"] = None
        if self.pd_role is not None:
            rooms = self.rooms
            snap["pd"] = {
                "role": self.pd_role,
                "bootstrap_port": self.bootstrap_port if rooms is not None else None,
                # The newest rooms only: /mock/stats stays small after a long run.
                "rooms": None if rooms is None else rooms.listing(time.monotonic(), STATS_ROOMS),
                "rooms_recorded": None if rooms is None else len(rooms),
                "kv_failures": self.kv_failures,
            }
        cache = self.cache
        if cache is None:
            snap["prefix_cache"] = None
        else:
            snap["prefix_cache"] = {
                **cache.stats.to_json(),
                "capacity_tokens": cache.capacity_tokens,
                "used_tokens": cache.used_tokens,
                "block_tokens": cache.block,
            }
        self.respond(conn, req, 200, orjson.dumps(snap), count=False)

    def h_mock_config(self, conn: Connection, req: Request) -> None:
        if req.method == b"POST":
            problem = apply_update(self.cfg, parse_json_object(req.body))
            if problem is not None:
                raise ApiError(400, problem)
        self.respond(conn, req, 200, orjson.dumps({"config": self.cfg.to_json()}), count=False)

    def h_mock_reset(self, conn: Connection, req: Request) -> None:
        self.stats.reset()
        if self.cache is not None:
            self.cache.reset()  # a fresh worker: empty cache, zero counters
        self.stats.peak_in_flight = self.in_flight  # the peak counts from what runs now
        self.respond(conn, req, 200, b'{"reset":true}', count=False)


_ID_PREFIX = {"chat": "chatcmpl", "completion": "cmpl", "generate": "gen"}


def _tokens(plan: Plan) -> int:
    """KV tokens a request holds while in flight (drives the derived token_usage)."""
    return plan.total_prompt_tokens + plan.total_completion_tokens


def _same(data: bytes) -> bytes:
    return data


def _record(req: Request) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, float]:
    return (req.method, req.target, req.headers, req.body, time.monotonic())


def _parse_query(query: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in query.decode("latin-1").split("&"):
        if part:
            key, _, value = part.partition("=")
            out[key] = value
    return out


def _loads_prometheus(view: render.LoadView) -> bytes:
    """/v1/loads?format=prometheus: `sglang_<field>{dp_rank="0"}` lines (v1_loads.py)."""
    fields = (
        ("num_running_reqs", "gauge", "Number of running requests", view.running),
        ("num_waiting_reqs", "gauge", "Number of waiting requests", view.waiting),
        ("num_used_tokens", "gauge", "Number of used KV cache tokens", view.used_tokens),
        ("max_total_num_tokens", "gauge", "Maximum KV cache capacity", view.max_total_tokens),
        ("token_usage", "gauge", "Token usage ratio", round(view.token_usage, 4)),
        ("gen_throughput", "gauge", "Generation throughput", round(view.gen_throughput, 2)),
    )
    lines: list[str] = []
    for name, kind, help_, value in fields:
        lines.append(f"# HELP sglang_{name} {help_}")
        lines.append(f"# TYPE sglang_{name} {kind}")
        lines.append(f'sglang_{name}{{dp_rank="0"}} {value}')
    return ("\n".join(lines) + "\n").encode()


def _routes(engine: str) -> dict[bytes, Route]:
    get, post, both = (b"GET",), (b"POST",), (b"GET", b"POST")
    table: dict[str, tuple[tuple[bytes, ...], str, Handler]] = {
        "/health": (get, PROBE, Worker.h_health),
        "/health_generate": (get, PROBE, Worker.h_health),
        "/v1/models": (get, INFO, Worker.h_models),
        "/metrics": (get, INFO, Worker.h_metrics),
        "/flush_cache": (both, INFO, Worker.h_flush_cache),
        "/start_profile": (post, INFO, Worker.h_start_profile),
        "/stop_profile": (post, INFO, Worker.h_stop_profile),
        # /generate is SGLang's native API; the vLLM mock serves it too so one gateway
        # test can drive either engine through the same route.
        "/generate": (post, INFERENCE, Worker.h_generate),
        "/v1/chat/completions": (post, INFERENCE, Worker.h_chat),
        "/v1/completions": (post, INFERENCE, Worker.h_completion),
        "/v1/embeddings": (post, INFERENCE, Worker.h_embeddings),
        "/v1/rerank": (post, INFERENCE, Worker.h_rerank),
        "/rerank": (post, INFERENCE, Worker.h_rerank),
        "/mock/stats": (get, CONTROL, Worker.h_mock_stats),
        "/mock/config": (both, CONTROL, Worker.h_mock_config),
        "/mock/reset": (post, CONTROL, Worker.h_mock_reset),
    }
    if engine == "sglang":
        table.update(
            {
                "/server_info": (get, INFO, Worker.h_server_info),
                "/get_server_info": (get, INFO, Worker.h_server_info),
                "/get_model_info": (get, INFO, Worker.h_model_info),
                "/model_info": (get, INFO, Worker.h_model_info),
                "/v1/loads": (get, INFO, Worker.h_loads),
                "/get_load": (get, INFO, Worker.h_get_load),
            }
        )
    else:
        table.update(
            {
                "/version": (get, INFO, Worker.h_version),
                "/reset_prefix_cache": (post, INFO, Worker.h_flush_cache),
            }
        )
    return {path.encode(): Route(m, k, h) for path, (m, k, h) in table.items()}


ROUTES = {engine: _routes(engine) for engine in ("sglang", "vllm")}


class Connection(asyncio.Protocol):
    """One client connection: httptools parsing, in-order responses, disconnect tracking."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.pending: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._async_tokens = 0
        # per-message scratch
        self._in_head = False
        self._head_pending = 0
        self._head_size = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] | None = None
        self._body_len = 0
        self._auth: bytes | None = None
        self._mock: dict[bytes, bytes] | None = None
        self._expect = False

    # --- state -----------------------------------------------------------------------------

    def _transition(self, event: str) -> str:
        previous = self.state
        self.state = _TRANSITIONS[(previous, event)]
        return previous

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.connections.discard(self)
        self.pending.clear()
        if self.state is CLOSED:
            return
        if self._transition("lost") is BUSY:
            self._end_in_flight()
            self.worker.stats.record_disconnect(time.monotonic(), time.time())
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.cancel()

    def eof_received(self) -> bool:
        return False  # a half-close ends the connection, as a disconnect when mid-response

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and self.state is not CLOSED:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self._in_head:
            self._head_pending += len(data)
        try:
            self.parser.feed_data(data)
        except _HeadersTooLarge:
            self._fail(431, "request headers too large")
            return
        except _BodyTooLarge:
            self._fail(413, "request body too large")
            return
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrade is not supported")
            return
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _HeadersTooLarge):
                self._fail(431, "request headers too large")
            elif isinstance(cause, _BodyTooLarge):
                self._fail(413, "request body too large")
            else:
                self._fail(400, f"malformed HTTP request: {e}")
            return
        if self._in_head and self._head_pending > self.worker.opts.max_header_bytes:
            self._fail(431, "request headers too large")

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_pending = 0
        self._head_size = 0
        self._url = b""
        self._headers = []
        self._body = None
        self._body_len = 0
        self._auth = None
        self._mock = None
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if name[:1] in b"aAxXeE":
            lname = name.lower()
            if lname == b"authorization":
                self._auth = value
            elif lname.startswith(b"x-mock-"):
                if self._mock is None:
                    self._mock = {}
                self._mock[lname] = value
            elif lname == b"expect":
                self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_size > self.worker.opts.max_header_bytes:
            raise _HeadersTooLarge()
        if self._expect and self.state is IDLE and not self.pending:
            self.write(wire.CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.worker.opts.max_body_bytes:
            raise _BodyTooLarge()
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return
        parts = self._body
        body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
        parser = self.parser
        req = Request(
            parser.get_method(),
            self._url,
            self._headers,
            body,
            self._auth,
            self._mock,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.0",
        )
        if self.state is IDLE and not self.pending:
            self._handle(req)
        else:
            self.pending.append(req)
            if len(self.pending) >= _PIPELINE_HIGH and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    # --- request handling ----------------------------------------------------------------

    def _handle(self, req: Request) -> None:
        if not req.keep_alive:
            self.closing = True  # nothing after this request will be answered
        try:
            self.worker.dispatch(self, req)
        except Exception as e:  # a bug must cost one request, never the process
            print(f"smg mock-worker: internal error: {e!r}", file=sys.stderr, flush=True)
            self.worker.error(
                self, req, 500, f"mock internal error: {e!r}", "internal_server_error"
            )
        if self.state is IDLE and self.closing:
            self._close()

    def write(self, data: bytes) -> None:
        if self.state is not CLOSED:
            self.transport.write(data)  # type: ignore[union-attr]

    def start_async(self, coro: Coroutine[Any, Any, None], tokens: int = 0) -> None:
        """Run one inference response as a Task; it is in flight until finished or cut."""
        self._transition("start_async")
        self._async_tokens = tokens
        worker = self.worker
        worker.in_flight += 1
        worker.in_flight_tokens += tokens
        if worker.in_flight > worker.stats.peak_in_flight:
            worker.stats.peak_in_flight = worker.in_flight
        self.task = asyncio.get_running_loop().create_task(coro)
        self.task.add_done_callback(self._task_done)

    def _end_in_flight(self) -> None:
        # Synchronous with the state change, so /mock/stats never shows a disconnect
        # whose request still counts as in flight.
        self.worker.in_flight -= 1
        self.worker.in_flight_tokens -= self._async_tokens
        self._async_tokens = 0

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug cut the response short: drop this connection, not the process. Not a
        # client disconnect, so leave the state machine before the transport goes.
        print(f"smg mock-worker: internal error: {task.exception()!r}", file=sys.stderr, flush=True)
        if self.state is BUSY:
            self._end_in_flight()
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()

    def finish_async(self, req: Request) -> None:
        if self.state is CLOSED:
            return
        self._transition("finish_async")
        self._end_in_flight()
        self.task = None
        if self.closing:
            self._close()
            return
        while self.pending and self.state is IDLE and not self.closing:
            self._handle(self.pending.popleft())
        if (
            self.reading_paused
            and self.state is not CLOSED
            and len(self.pending) < _PIPELINE_HIGH // 2
        ):
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def close_after_response(self) -> None:
        self.closing = True

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, status: int, message: str) -> None:
        """A request the parser rejected: answer it if nothing is in progress, then close.

        The close lingers: closing with unread input makes the kernel send a RST, which can
        destroy the error response before the client reads it. So half-close, discard what
        still arrives (data_received ignores it once `closing`), and close when the client
        does or after a grace period.
        """
        self.closing = True
        transport = self.transport
        if transport is None or self.state is CLOSED:
            return
        if self.state is not IDLE or self.pending:
            transport.close()
            return
        body = render.error_body(status, message, "invalid_request_error")
        self.write(wire.response(status, body, close=True))
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
        else:
            transport.close()

    def shutdown(self) -> None:
        self.closing = True
        self._close()
