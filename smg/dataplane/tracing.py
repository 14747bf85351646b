"""OpenTelemetry tracing of proxied requests (--enable-trace, --otlp-traces-endpoint).

Each data-plane process that traces starts its own exporter after the fork (`start`): an
export thread, which must never exist in the supervisor that forks; the OTLP protobuf
and gRPC modules are imported only here, only when tracing is on. With tracing off the
data plane holds `tracer = None` and every hook is one `is not None` test.

Why not the OpenTelemetry SDK's spans and BatchSpanProcessor: measured on this 2-core
box, its span objects (sampler, locked attribute maps, context copies) cost ~30 us each
and its OTLP encoder ~30 us more per span, together ~0.3 ms of CPU per request, which cut
throughput to a quarter. Here a finished span is one tuple appended to a deque on the
loop (ids from `random.getrandbits`); the export thread batches them every 500 ms (the
Rust SMG's delay), encodes them as OTLP protobuf (`encode`, by hand: the generated
classes cost as much as the SDK's encoder) and sends them over OTLP/gRPC (grpcio) or OTLP/HTTP protobuf (urllib), as the SDK's
exporters would. Spans beyond MAX_QUEUE waiting are dropped (and counted in the log),
never a reason to slow a request. Sampling follows the client's `sampled` flag (a
request it did not sample is propagated but not recorded); every other request is
recorded, as the Rust SMG's default (parent-based, always on) sampler does.

Spans, named after the Rust SMG's where it has them (tried on 1.13: one `http_request`
span per request, target `smg::otel-trace`), service name `smg`:

- `http_request` (SERVER; INTERNAL in the Rust SMG): 1.13's attributes method, path (no
  query string: it may carry a credential), version (`HTTP/1.1`), module=smg, trace_id,
  request_id, status_code and latency (microseconds), both strings as 1.13 records them;
  error (smg's error code) and process (the listener number) are smg's. The child of the
  client's W3C `traceparent`/`tracestate` when it sent a valid one (same trace id, as
  1.13 does), a root otherwise.
- `select_worker` (INTERNAL, child of the request; smg only): policy, model,
  candidates (ready workers offered to the policy), worker (the URL chosen) or error
  (why none).
- `upstream_request` (CLIENT, child of the request; smg only), one per attempt: url and
  worker (the worker's URL), attempt (1 = the first), retry_count, status_code (int),
  error. Its context goes to the worker as `traceparent` (1.13 sends its request span's),
  replacing the client's; the client's `tracestate` goes on unchanged, as in 1.13. A PD
  attempt is one span: worker is the decode, prefill_worker the prefill, and both legs
  carry its context (1.13 sends both the same one).

The W3C header codec is pure code (`parse_traceparent`, `format_traceparent`).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from smg.config import GatewayConfig
    from smg.dataplane.server import Request

# A finished span: (trace id, span id, parent span id or 0, name, kind, start ns, end ns,
# attributes, error message or None, tracestate).
SpanRecord = tuple[int, int, int, str, int, int, int, dict[str, Any], "str | None", str]

log = logging.getLogger("smg.dataplane")

SERVICE_NAME = "smg"
# The Rust SMG's batch delay (otel_trace.rs): export every 500 ms; larger batches than its
# 64 (the SDK's default 512): each export is Python work that holds the GIL. The standard
# OTEL_BSP_SCHEDULE_DELAY (milliseconds) overrides the delay.
SCHEDULE_DELAY_SECS = 0.5
MAX_EXPORT_BATCH = 512
# Spans waiting beyond this are dropped, never a reason to block a request: a few seconds
# of a busy process's spans (~200 bytes each once encoded, a few hundred as tuples).
MAX_QUEUE = 65536
EXPORT_TIMEOUT_SECS = 5.0
FLUSH_TIMEOUT_SECS = 3.0

# OTLP's enums (opentelemetry/proto/trace/v1/trace.proto).
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
STATUS_ERROR = 2

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


# --- recording, on the loop ---------------------------------------------------------------


_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


def _new_id(bits: int) -> int:
    return random.getrandbits(bits) or 1  # all-zero ids are invalid


class Tracer:
    """This process's span recorder; `exporter` drains `queue` from its thread."""

    def __init__(self, index: int, max_queue: int = MAX_QUEUE) -> None:
        self.index = index
        self.queue: collections.deque[SpanRecord] = collections.deque()
        self.max_queue = max_queue
        self.dropped = 0
        self.exporter: Exporter | None = None

    def record(self, span: SpanRecord) -> None:
        queue = self.queue
        if len(queue) < self.max_queue:
            queue.append(span)  # deque.append is atomic: the export thread pops the left
        else:
            self.dropped += 1

    def begin(self, request: Request, path: str) -> RequestTrace:
        """The request span of a proxied request, child of the client's traceparent."""
        trace = RequestTrace(self)
        value = request.header(b"traceparent")
        parsed = parse_traceparent(value) if value is not None else None
        if parsed is not None:
            trace.trace_id, trace.parent_id, trace.flags = parsed
            state = request.header(b"tracestate")
            if state is not None:
                trace.state = state.decode("latin-1")
        else:
            trace.trace_id = _new_id(128)
        # The Rust SMG 1.13's attributes (tried on it), and the process.
        trace.attributes = {
            "method": request.method.decode("latin-1"),
            "path": path,  # no query string: it may carry a credential
            "version": _VERSIONS.get(request.version) or "HTTP/" + request.version,
            "module": "smg",
            "trace_id": f"{trace.trace_id:032x}",
            "request_id": request.request_id.decode("latin-1"),
            "process": self.index,
        }
        return trace

    def shutdown(self) -> None:
        """Export what is queued (bounded by FLUSH_TIMEOUT_SECS), then stop the thread."""
        exporter = self.exporter
        if exporter is not None:
            self.exporter = None
            exporter.stop(FLUSH_TIMEOUT_SECS)
        if self.dropped:
            log.warning("tracing: %d spans dropped (export queue full)", self.dropped)


class RequestTrace:
    """The spans of one proxied request (request, routing decisions, attempts)."""

    __slots__ = (
        "attempt_attributes",
        "attempt_id",
        "attempt_start",
        "attempts",
        "attributes",
        "flags",
        "parent_id",
        "span_id",
        "start",
        "state",
        "trace_id",
        "tracer",
    )

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.trace_id = 0
        self.parent_id = 0
        self.flags = 1  # sampled, unless the client's traceparent says otherwise
        self.state = ""
        self.span_id = _new_id(64)
        self.start = time.time_ns()
        self.attributes: dict[str, Any] = {}
        self.attempt_id = 0
        self.attempt_start = 0
        self.attempt_attributes: dict[str, Any] = {}
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
        if not self.flags & 1:
            return
        attributes: dict[str, Any] = {"policy": policy, "candidates": candidates}
        if model is not None:
            attributes["model"] = model
        if worker is not None:
            attributes["worker"] = worker
        if error is not None:
            attributes["error"] = error
        self.tracer.record(
            (
                self.trace_id,
                _new_id(64),
                self.span_id,
                "select_worker",
                KIND_INTERNAL,
                start_ns,
                time.time_ns(),
                attributes,
                error,
                self.state,
            )
        )

    def begin_attempt(self, worker: str) -> bytes:
        """Start the next attempt's span; its `traceparent` header line for the worker."""
        self.attempts += 1
        attempt = self.attempts
        self.attempt_id = span_id = _new_id(64)
        self.attempt_start = time.time_ns()
        self.attempt_attributes = {
            "url": worker,
            "worker": worker,
            "attempt": attempt,
            "retry_count": attempt - 1,
        }
        return b"traceparent: %b\r\n" % format_traceparent(self.trace_id, span_id, self.flags)

    def second_leg(self, worker: str) -> bytes:
        """A PD attempt's prefill leg: part of the open attempt (one span per attempt, the
        leg's worker as `prefill_worker`), whose `traceparent` it carries too, as 1.13
        sends both legs the same context."""
        self.attempt_attributes["prefill_worker"] = worker
        return b"traceparent: %b\r\n" % format_traceparent(
            self.trace_id, self.attempt_id, self.flags
        )

    def end_attempt(self, status: int, error: str) -> None:
        """The open attempt ended with the worker's `status` (0: none, see `error`)."""
        span_id = self.attempt_id
        if not span_id:
            return
        self.attempt_id = 0
        if not self.flags & 1:
            return
        attributes = self.attempt_attributes
        if status:
            attributes["status_code"] = status
        if error:
            attributes["error"] = error
        self.tracer.record(
            (
                self.trace_id,
                span_id,
                self.span_id,
                "upstream_request",
                KIND_CLIENT,
                self.attempt_start,
                time.time_ns(),
                attributes,
                (error or str(status)) if error or status >= 500 else None,
                self.state,
            )
        )

    def finish(self, status: int, error_code: str) -> None:
        """The answer went out with `status` (and smg's error code, if any)."""
        if self.attempt_id:
            self.end_attempt(0, error_code or "request ended")
        if not self.flags & 1:
            return
        attributes = self.attributes
        attributes["status_code"] = str(status)  # a string, as the Rust SMG records it
        attributes["latency"] = str((time.time_ns() - self.start) // 1000)  # us, as it does
        if error_code:
            attributes["error"] = error_code
        self.tracer.record(
            (
                self.trace_id,
                self.span_id,
                self.parent_id,
                "http_request",
                KIND_SERVER,
                self.start,
                time.time_ns(),
                attributes,
                (error_code or str(status)) if status >= 500 else None,
                self.state,
            )
        )


# --- exporting, on its own thread -------------------------------------------------------------


def encode(spans: list[SpanRecord], service_name: str = SERVICE_NAME) -> bytes:
    """An OTLP ExportTraceServiceRequest (protobuf bytes) carrying `spans`, encoded by
    hand (opentelemetry/proto/trace/v1/trace.proto field numbers): building the
    generated classes' objects costs ~20 us a span, this a few."""
    resource = _field(1, _key_value("service.name", service_name))
    scope = _field(1, _field(1, b"smg"))
    encoded = b"".join([_span(span) for span in spans])
    return _field(1, _field(1, resource) + _field(2, scope + encoded))


def _span(record: SpanRecord) -> bytes:
    trace_id, span_id, parent_id, name, kind, start, end, attributes, error, state = record
    parts = [
        b"\x0a\x10" + trace_id.to_bytes(16, "big"),  # 1 trace_id
        b"\x12\x08" + span_id.to_bytes(8, "big"),  # 2 span_id
    ]
    if state:
        parts.append(_field(3, state.encode()))
    if parent_id:
        parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))  # 4 parent_span_id
    parts.append(_field(5, name.encode()))
    parts.append(b"\x30" + _varint(kind))  # 6 kind
    parts.append(b"\x39" + start.to_bytes(8, "little"))  # 7 start, fixed64
    parts.append(b"\x41" + end.to_bytes(8, "little"))  # 8 end, fixed64
    cache = _ATTRIBUTE_CACHE
    for item in attributes.items():
        encoded = cache.get(item)
        if encoded is None:
            encoded = _field(9, _key_value(*item))
            if (
                len(cache) < _ATTRIBUTE_CACHE_MAX
                and item[0] not in _UNIQUE_ATTRIBUTES
                and type(item[1]) is not bool  # True == 1: would share int 1's entry
            ):
                cache[item] = encoded
        parts.append(encoded)
    if error is not None:
        parts.append(_field(15, _field(2, error.encode()) + b"\x18\x02"))  # message, ERROR
    return _field(2, b"".join(parts))


# Most attributes repeat (method, route, worker, policy, status): their encoding is kept.
# Only the export thread touches it.
_ATTRIBUTE_CACHE: dict[tuple[str, Any], bytes] = {}
_ATTRIBUTE_CACHE_MAX = 4096
_UNIQUE_ATTRIBUTES = frozenset({"request_id", "trace_id", "latency"})


def _key_value(key: str, value: Any) -> bytes:
    if isinstance(value, str):
        any_value = _field(1, value.encode())
    elif isinstance(value, bool):
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    else:
        any_value = b"\x21" + struct.pack("<d", value)
    return _field(1, key.encode()) + _field(2, any_value)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (numbers up to 15: a one-byte tag)."""
    return bytes(((number << 3) | 2,)) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Exporter:
    """The export thread: every `delay` seconds (and at stop) it takes the queued spans
    in batches, encodes and sends them. A failed export is logged (rate-limited) and its
    batch dropped: a collector that is down never holds spans or requests back."""

    def __init__(
        self, queue: collections.deque[SpanRecord], send: Callable[[bytes], None], delay: float
    ) -> None:
        self.queue = queue
        self.send = send
        self.delay = delay
        self.stopping = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="smg-otlp-export", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.delay):
            self.drain()
        self.drain()

    def drain(self) -> None:
        """Send what was queued when called, in full batches (what arrives meanwhile
        waits for the next turn: a busy process then sends a few large exports per
        turn, not a stream of small ones, each with its fixed cost)."""
        queue = self.queue
        pop = queue.popleft
        left = len(queue)
        while left > 0:
            size = min(left, MAX_EXPORT_BATCH)
            left -= size
            batch = [pop() for _ in range(size)]
            try:
                self.send(encode(batch))
            except Exception as exc:
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    log.warning(
                        "tracing: export of %d spans failed (%d failures so far): %r",
                        len(batch),
                        self.failures,
                        exc,
                    )
                if self.stopping.is_set():
                    return  # exiting: do not wait out a dead collector for every batch

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.thread.join(timeout)


def _grpc_sender(target: str) -> Callable[[bytes], None]:
    import grpc

    channel = grpc.insecure_channel(target)
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None,  # the bytes `encode` made
        response_deserializer=None,
    )

    def send(body: bytes) -> None:
        export(body, timeout=EXPORT_TIMEOUT_SECS)

    return send


def _http_sender(url: str) -> Callable[[bytes], None]:
    import urllib.request

    def send(body: bytes) -> None:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"}
        )
        with urllib.request.urlopen(request, timeout=EXPORT_TIMEOUT_SECS) as answer:
            answer.read()

    return send


def start(cfg: GatewayConfig, index: int) -> Tracer:
    """Tracing in this (data-plane) process: the recorder and its export thread, sending
    to --otlp-traces-endpoint over OTLP/gRPC (host:port) or OTLP/HTTP protobuf (URL)."""
    kind, endpoint = otlp_target(cfg.otlp_traces_endpoint)
    if kind == "grpc":
        send = _grpc_sender(endpoint.removeprefix("http://"))
    else:
        send = _http_sender(endpoint)
    delay = SCHEDULE_DELAY_SECS
    configured = os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "")
    if configured.isdigit() and int(configured) > 0:
        delay = int(configured) / 1000
    tracer = Tracer(index)
    tracer.exporter = Exporter(tracer.queue, send, delay)
    return tracer
