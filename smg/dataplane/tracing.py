"""OpenTelemetry tracing of proxied requests (--enable-trace, --otlp-traces-endpoint).

Each data-plane process that traces sets up its own SDK after the fork (`start`): a
BatchSpanProcessor runs an export thread, which must never exist in the supervisor that
forks, and OpenTelemetry is imported only here, only when tracing is on. With tracing off
the data plane holds `tracer = None` and every hook is one `is not None` test.

Spans, named after the Rust SMG's where it has them (its `http_request` server span,
`smg::otel-trace`; its "Sending request" event's `url`), service name `smg`:

- `http_request` (SERVER): method, uri, route, version, request_id, status_code, error,
  module=smg, process (the listener number). The child of the client's W3C
  `traceparent`/`tracestate` when it sent a valid one (same trace id), a root otherwise.
- `select_worker` (INTERNAL, child of the request): policy, model, candidates (ready
  workers offered to the policy), worker (the URL chosen) or error (why none).
- `upstream_request` (CLIENT, child of the request), one per attempt: url, worker,
  attempt (1 = the first), retry_count, status_code, error. Its context goes to the
  worker as `traceparent` (the client's own traceparent is never forwarded then; its
  `tracestate` is, unchanged, as W3C asks of a participant that does not add to it).

The W3C header codec is pure code (`parse_traceparent`, `format_traceparent`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.dataplane.server import Request

log = logging.getLogger("smg.dataplane")

SERVICE_NAME = "smg"
# The Rust SMG's batch settings (otel_trace.rs): export every 500 ms. Larger batches than
# its 64 (the SDK's default 512): each export is a Python call that holds the GIL.
SCHEDULE_DELAY_MILLIS = 500
MAX_EXPORT_BATCH = 512
MAX_QUEUE = 8192  # spans beyond it are dropped (counted by the SDK), never block a request
EXPORT_TIMEOUT_SECS = 5.0
FLUSH_TIMEOUT_MILLIS = 3000

_HEX = frozenset(b"0123456789abcdef")


# --- W3C Trace Context (pure) -------------------------------------------------------------


def parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C `traceparent` value, or None when it is
    not valid (then the request starts a new trace, as the spec asks).

    Version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>`; a later version may append
    fields after a `-`, which are ignored; version ff, uppercase hex and all-zero ids are
    invalid (W3C Trace Context, 3.2)."""
    value = value.strip()
    if len(value) < 55 or (len(value) > 55 and value[55:56] != b"-"):
        return None
    version = value[0:2]
    if version == b"00" and len(value) != 55:
        return None
    if (
        value[2:3] != b"-"
        or value[35:36] != b"-"
        or value[52:53] != b"-"
        or version == b"ff"
        or not _HEX.issuperset(value[0:2] + value[3:35] + value[36:52] + value[53:55])
    ):
        return None
    trace_id = int(value[3:35], 16)
    span_id = int(value[36:52], 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(value[53:55], 16)


def format_traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    """A version-00 `traceparent` value."""
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags & 0xFF)


def otlp_target(endpoint: str) -> tuple[str, str]:
    """("grpc", "http://host:port") for host:port, ("http", url) for an http(s):// URL;
    a URL without a path gets the OTLP/HTTP traces path /v1/traces."""
    if "://" not in endpoint:
        return "grpc", "http://" + endpoint
    scheme, _, rest = endpoint.partition("://")
    host, slash, path = rest.partition("/")
    if not slash or not path:
        return "http", f"{scheme}://{host}/v1/traces"
    return "http", endpoint


# --- the SDK, per process -----------------------------------------------------------------


class Tracer:
    """This process's tracer and exporter pipeline."""

    def __init__(self, provider: Any, tracer: Any, index: int) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        self.provider = provider
        self.tracer = tracer
        self.index = index
        self._in_context = trace.set_span_in_context
        self._non_recording = NonRecordingSpan
        self._span_context = SpanContext
        self._flags = TraceFlags
        self._trace_state = TraceState
        self._server = SpanKind.SERVER
        self._client = SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._status = Status
        self._error_code = StatusCode.ERROR

    def begin(self, request: Request, path: str) -> RequestTrace:
        """The request span of a proxied request, child of the client's traceparent."""
        parent = None
        value = request.header(b"traceparent")
        if value is not None:
            parsed = parse_traceparent(value)
            if parsed is not None:
                state = request.header(b"tracestate")
                trace_state = None
                if state is not None:
                    try:
                        trace_state = self._trace_state.from_header([state.decode("latin-1")])
                    except Exception:  # an invalid tracestate is dropped, not fatal
                        trace_state = None
                context = self._span_context(
                    parsed[0],
                    parsed[1],
                    is_remote=True,
                    trace_flags=self._flags(parsed[2]),
                    trace_state=trace_state,
                )
                parent = self._in_context(self._non_recording(context))
        span = self.tracer.start_span(
            "http_request",
            context=parent,
            kind=self._server,
            attributes={
                "method": request.method.decode("latin-1"),
                "uri": request.url.decode("latin-1"),
                "route": path,
                "version": request.version,
                "request_id": request.request_id.decode("latin-1"),
                "module": "smg",
                "process": self.index,
            },
        )
        return RequestTrace(self, span)

    def shutdown(self) -> None:
        """Export what is queued (bounded), then stop the export thread."""
        try:
            self.provider.force_flush(FLUSH_TIMEOUT_MILLIS)
            self.provider.shutdown()
        except Exception as exc:  # exiting anyway: say why spans may be missing
            log.warning("tracing shutdown failed: %r", exc)


class RequestTrace:
    """The spans of one proxied request (request, routing decisions, attempts)."""

    __slots__ = ("attempt", "attempts", "context", "span", "tracer")

    def __init__(self, tracer: Tracer, span: Any) -> None:
        self.tracer = tracer
        self.span = span
        self.context = tracer._in_context(span)
        self.attempt: Any = None
        self.attempts = 0

    def route(
        self,
        start_ns: int,
        policy: str,
        model: str | None,
        candidates: int,
        worker: str | None,
        error: str | None,
    ) -> None:
        """The routing decision that began at `start_ns` (time.time_ns) and ends now."""
        attributes: dict[str, Any] = {"policy": policy, "candidates": candidates}
        if model is not None:
            attributes["model"] = model
        if worker is not None:
            attributes["worker"] = worker
        span = self.tracer.tracer.start_span(
            "select_worker", context=self.context, attributes=attributes, start_time=start_ns
        )
        if error is not None:
            span.set_attribute("error", error)
            span.set_status(self.tracer._status(self.tracer._error_code, error))
        span.end()

    def begin_attempt(self, worker: str) -> bytes:
        """Start the next attempt's span; its `traceparent` header line for the worker."""
        self.attempts += 1
        attempt = self.attempts
        span = self.attempt = self.tracer.tracer.start_span(
            "upstream_request",
            context=self.context,
            kind=self.tracer._client,
            attributes={
                "url": worker,
                "worker": worker,
                "attempt": attempt,
                "retry_count": attempt - 1,
            },
        )
        ctx = span.get_span_context()
        return b"traceparent: %b\r\n" % format_traceparent(
            ctx.trace_id, ctx.span_id, int(ctx.trace_flags)
        )

    def end_attempt(self, status: int, error: str) -> None:
        """The open attempt ended with the worker's `status` (0: none, see `error`)."""
        span = self.attempt
        if span is None:
            return
        self.attempt = None
        if status:
            span.set_attribute("status_code", status)
        if error:
            span.set_attribute("error", error)
        if error or status >= 500:
            span.set_status(self.tracer._status(self.tracer._error_code, error or str(status)))
        span.end()

    def finish(self, status: int, error_code: str) -> None:
        """The answer went out with `status` (and smg's error code, if any)."""
        if self.attempt is not None:
            self.end_attempt(0, error_code or "request ended")
        span = self.span
        span.set_attribute("status_code", status)
        if error_code:
            span.set_attribute("error", error_code)
        if status >= 500:
            span.set_status(self.tracer._status(self.tracer._error_code, error_code or None))
        span.end()


def start(cfg: GatewayConfig, index: int) -> Tracer:
    """Set up the SDK in this (data-plane) process: resource `service.name=smg`, an OTLP
    exporter for --otlp-traces-endpoint, a batch processor (its thread starts here)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    kind, endpoint = otlp_target(cfg.otlp_traces_endpoint)
    if kind == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter: Any = GrpcExporter(endpoint=endpoint, insecure=True, timeout=EXPORT_TIMEOUT_SECS)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_SECS)
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE,
            # The standard OTEL_BSP_SCHEDULE_DELAY wins when set (the SDK reads it).
            schedule_delay_millis=(
                None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else SCHEDULE_DELAY_MILLIS
            ),
            max_export_batch_size=MAX_EXPORT_BATCH,
        )
    )
    return Tracer(provider, provider.get_tracer("smg"), index)
