"""--enable-trace: OpenTelemetry spans exported over OTLP (gRPC and HTTP) by a real
`smg launch`, W3C trace context taken from the client and handed to the worker.

The collectors are the test's own, on loopback: a grpcio server implementing
opentelemetry.proto's TraceService, and an http.server endpoint on /v1/traces; exports
are decoded with opentelemetry-proto. The W3C codec is tested directly.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import mockutil
from gatewayutil import Gateway, free_port, running_gateway
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from smg.dataplane.tracing import format_traceparent, otlp_target, parse_traceparent

CHAT = "/v1/chat/completions"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


# --- the W3C codec (pure) -----------------------------------------------------------------


def test_traceparent_parse_and_format() -> None:
    parsed = parse_traceparent(CLIENT_TRACEPARENT.encode())
    assert parsed == (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)
    assert format_traceparent(*parsed) == CLIENT_TRACEPARENT.encode()
    # A later version may append fields; version 00 may not.
    assert parse_traceparent(b"01-" + CLIENT_TRACEPARENT[3:].encode() + b"-extra") == parsed
    assert parse_traceparent(CLIENT_TRACEPARENT.encode() + b"-extra") is None
    for bad in (
        b"",
        b"garbage",
        b"ff-" + CLIENT_TRACEPARENT[3:].encode(),  # version ff is invalid
        CLIENT_TRACEPARENT.upper().encode(),  # hex is lowercase
        f"00-{'0' * 32}-{PARENT_ID}-01".encode(),  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01".encode(),  # all-zero parent id
        f"00-{TRACE_ID}-{PARENT_ID}-0g".encode(),
        f"00_{TRACE_ID}-{PARENT_ID}-01".encode(),
    ):
        assert parse_traceparent(bad) is None, bad


def test_otlp_target_forms() -> None:
    assert otlp_target("127.0.0.1:4317") == ("grpc", "http://127.0.0.1:4317")
    assert otlp_target("http://c:4318") == ("http", "http://c:4318/v1/traces")
    assert otlp_target("https://c:4318/") == ("http", "https://c:4318/v1/traces")
    assert otlp_target("http://c:4318/custom/path") == ("http", "http://c:4318/custom/path")


def test_encode_is_otlp_protobuf() -> None:
    """The hand-made encoding reads back with opentelemetry-proto's classes."""
    from smg.dataplane.tracing import KIND_CLIENT, KIND_SERVER, encode

    records = [
        (
            int(TRACE_ID, 16),
            0x1122334455667788,
            int(PARENT_ID, 16),
            "http_request",
            KIND_SERVER,
            1_700_000_000_000_000_000,
            1_700_000_000_123_456_789,
            {"method": "POST", "status_code": 200, "neg": -5, "ok": True, "ratio": 0.25},
            None,
            "vendor=abc",
        ),
        (
            int(TRACE_ID, 16),
            0x99,
            0,
            "upstream_request",
            KIND_CLIENT,
            5,
            6,
            {"worker": "http://w:1/\u00e9" + "x" * 300},
            "503",
            "",
        ),
    ]
    for _ in range(2):  # the second time from the attribute cache
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(encode(records))
        (resource_spans,) = request.resource_spans
        assert _attributes(resource_spans.resource.attributes) == {"service.name": "smg"}
        (scope_spans,) = resource_spans.scope_spans
        assert scope_spans.scope.name == "smg"
        first, second = scope_spans.spans
        assert first.trace_id.hex() == TRACE_ID
        assert first.span_id.hex() == "1122334455667788"
        assert first.parent_span_id.hex() == PARENT_ID
        assert first.name == "http_request"
        assert first.kind == first.SPAN_KIND_SERVER
        assert first.start_time_unix_nano == 1_700_000_000_000_000_000
        assert first.end_time_unix_nano == 1_700_000_000_123_456_789
        assert first.trace_state == "vendor=abc"
        assert _attributes(first.attributes) == {
            "method": "POST",
            "status_code": 200,
            "neg": -5,
            "ok": True,
            "ratio": 0.25,
        }
        assert first.status.code == first.status.STATUS_CODE_UNSET
        assert second.parent_span_id == b""
        assert second.kind == second.SPAN_KIND_CLIENT
        assert _attributes(second.attributes) == {"worker": "http://w:1/\u00e9" + "x" * 300}
        assert second.status.code == second.status.STATUS_CODE_ERROR
        assert second.status.message == "503"


# --- loopback collectors ----------------------------------------------------------------------


class Spans:
    """Spans received by a collector, decoded: [(resource attributes, span)]."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[dict[str, Any], Any]] = []

    def add(self, raw: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.items.append((resource, span))

    def of_trace(self, trace_id: str) -> list[Any]:
        with self.lock:
            return [span for _r, span in self.items if span.trace_id.hex() == trace_id]

    def resources(self) -> list[dict[str, Any]]:
        with self.lock:
            return [resource for resource, _s in self.items]


def _attributes(attributes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in attributes:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, spans: Spans) -> None:
        self.spans = spans

    def Export(self, request: Any, context: Any) -> Any:
        self.spans.add(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def grpc_collector() -> Iterator[tuple[str, Spans]]:
    spans = Spans()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(spans), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    try:
        yield f"127.0.0.1:{port}", spans
    finally:
        server.stop(grace=None)


@contextlib.contextmanager
def http_collector() -> Iterator[tuple[str, Spans, list[str]]]:
    spans = Spans()
    content_types: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            content_types.append(self.headers.get("content-type", ""))
            spans.add(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", spans, content_types
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def wait_spans(spans: Spans, trace_id: str, predicate: Any, timeout: float = 20.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    found: list[Any] = []
    while time.monotonic() < deadline:
        found = spans.of_trace(trace_id)
        if predicate(found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"spans of trace {trace_id} never complete: {[s.name for s in found]}")


def _by_name(found: list[Any], name: str) -> list[Any]:
    return [span for span in found if span.name == name]


def _chat(
    url: str, traceparent: str | None, query: str = "", **headers: str
) -> tuple[int, dict[str, str]]:
    hdrs = dict(headers)
    if traceparent is not None:
        hdrs["traceparent"] = traceparent
    status, response_headers, _ = mockutil.request(
        "POST",
        url + CHAT + query,
        {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=hdrs,
        timeout=10.0,
    )
    return status, response_headers


def _worker_headers(url: str) -> dict[str, str]:
    """The headers of the last chat request the mock worker at `url` received."""
    return mockutil.stats(url)["last_request_by_route"][CHAT]["header_map"]


# --- end to end -------------------------------------------------------------------------------


def traced_gateway(worker_url: str, endpoint: str) -> contextlib.AbstractContextManager[Gateway]:
    """One data-plane process exporting to `endpoint`, in front of one worker."""
    args = ["--worker-urls", worker_url, "--enable-trace", "--otlp-traces-endpoint", endpoint]
    return running_gateway([*args, "--disable-health-check"], processes=1)


def test_grpc_export_spans_follow_the_client_trace_and_reach_the_worker() -> None:
    with (
        grpc_collector() as (endpoint, spans),
        mockutil.start_mock_workers(1) as mocks,
        traced_gateway(mocks.url, endpoint) as gw,
    ):
        gw.wait_ready()
        status, headers = _chat(
            gw.url, CLIENT_TRACEPARENT, "?api-key=s3cret", tracestate="vendor=abc"
        )
        assert status == 200
        request_id = headers["x-request-id"]
        found = wait_spans(
            spans,
            TRACE_ID,
            lambda s: {"http_request", "select_worker", "upstream_request"} <= {x.name for x in s},
        )
        (server,) = _by_name(found, "http_request")
        (route,) = _by_name(found, "select_worker")
        (attempt,) = _by_name(found, "upstream_request")
        # The request span is the client's child; routing and the attempt are its children.
        assert server.parent_span_id.hex() == PARENT_ID
        assert server.kind == server.SPAN_KIND_SERVER
        assert route.parent_span_id == server.span_id
        assert attempt.parent_span_id == server.span_id
        assert attempt.kind == attempt.SPAN_KIND_CLIENT
        assert server.trace_state == "vendor=abc"
        request_attrs = _attributes(server.attributes)
        # The Rust SMG 1.13's attributes and forms (status_code and latency are strings).
        assert request_attrs["method"] == "POST"
        assert request_attrs["path"] == CHAT  # the query string is not exported
        assert request_attrs["version"] == "HTTP/1.1"
        assert request_attrs["module"] == "smg"
        assert request_attrs["trace_id"] == TRACE_ID
        assert int(request_attrs["latency"]) > 0
        assert not any(
            "s3cret" in str(v) for s in found for v in _attributes(s.attributes).values()
        )
        assert request_attrs["status_code"] == "200"
        assert request_attrs["request_id"] == request_id
        assert request_attrs["process"] == 0
        route_attrs = _attributes(route.attributes)
        assert route_attrs["policy"] == "cache_aware"  # the default policy
        assert route_attrs["worker"] == mocks.url
        assert route_attrs["candidates"] == 1
        attempt_attrs = _attributes(attempt.attributes)
        assert attempt_attrs["worker"] == mocks.url
        assert attempt_attrs["status_code"] == 200
        assert attempt_attrs["attempt"] == 1
        assert attempt_attrs["retry_count"] == 0
        assert "error" not in attempt_attrs
        # The attempt span within the request span.
        assert server.start_time_unix_nano <= attempt.start_time_unix_nano
        assert attempt.end_time_unix_nano <= server.end_time_unix_nano
        # The worker got the attempt span's context, and the client's tracestate.
        worker_headers = _worker_headers(mocks.url)
        assert worker_headers["traceparent"] == f"00-{TRACE_ID}-{attempt.span_id.hex()}-01"
        assert worker_headers["tracestate"] == "vendor=abc"
        assert {r.get("service.name") for r in spans.resources()} == {"smg"}

        # No traceparent from the client: a new trace, still handed to the worker.
        status, _ = _chat(gw.url, None)
        assert status == 200
        sent = _worker_headers(mocks.url)["traceparent"]
        new_trace = sent.split("-")[1]
        assert new_trace != TRACE_ID
        found = wait_spans(spans, new_trace, lambda s: len(_by_name(s, "http_request")) == 1)
        (root,) = _by_name(found, "http_request")
        assert root.parent_span_id == b""

        # A client that did not sample its trace: the context goes on (flags 00), nothing
        # is recorded (the spans of a later request arrive, none of this one).
        unsampled = "d" * 32
        status, _ = _chat(gw.url, f"00-{unsampled}-{PARENT_ID}-00")
        assert status == 200
        sent = _worker_headers(mocks.url)["traceparent"]
        assert sent.startswith(f"00-{unsampled}-") and sent.endswith("-00")
        later = "e" * 32
        status, _ = _chat(gw.url, f"00-{later}-{PARENT_ID}-01")
        assert status == 200
        wait_spans(spans, later, lambda s: len(s) == 3)
        assert spans.of_trace(unsampled) == []

        # An invalid traceparent is not trusted (a new trace) and never forwarded as is.
        bad = f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"
        status, _ = _chat(gw.url, bad)
        assert status == 200
        sent = _worker_headers(mocks.url)["traceparent"]
        assert sent != bad and sent.split("-")[1] not in (TRACE_ID, TRACE_ID.upper())


def test_retried_request_shows_two_attempt_spans() -> None:
    with grpc_collector() as (endpoint, spans), mockutil.start_mock_workers(2) as mocks:
        failing, healthy = mocks.urls
        mockutil.set_config(failing, error_rate=1.0)
        with running_gateway(
            [
                "--worker-urls",
                failing,
                healthy,
                "--policy",
                "round_robin",
                "--enable-trace",
                "--otlp-traces-endpoint",
                endpoint,
                "--disable-health-check",
                "--retry-initial-backoff-ms",
                "1",
            ],
            processes=1,
        ) as gw:
            gw.wait_ready()
            # Round robin: one of two requests goes to the failing worker first.
            trace_ids = [f"{index:032x}" for index in (0xA1, 0xA2)]
            for trace_id in trace_ids:
                status, _ = _chat(gw.url, f"00-{trace_id}-{PARENT_ID}-01")
                assert status == 200
            retried = []
            for trace_id in trace_ids:
                found = wait_spans(spans, trace_id, lambda s: len(_by_name(s, "http_request")) == 1)
                attempts = sorted(
                    _by_name(found, "upstream_request"),
                    key=lambda s: _attributes(s.attributes)["attempt"],
                )
                if len(attempts) == 2:
                    retried.append((found, attempts))
                else:
                    assert len(attempts) == 1
            assert retried, "round robin sent neither request to the failing worker first"
            found, (first, second) = retried[-1]
            first_attrs = _attributes(first.attributes)
            second_attrs = _attributes(second.attributes)
            assert first_attrs["worker"] == failing
            assert first_attrs["status_code"] == 500
            assert first_attrs["retry_count"] == 0
            assert first.status.code == first.status.STATUS_CODE_ERROR
            assert second_attrs["worker"] == healthy
            assert second_attrs["status_code"] == 200
            assert second_attrs["attempt"] == 2
            assert second_attrs["retry_count"] == 1
            assert first.end_time_unix_nano <= second.start_time_unix_nano
            assert len(_by_name(found, "select_worker")) == 2
            (server,) = _by_name(found, "http_request")
            assert _attributes(server.attributes)["status_code"] == "200"
            # The failing worker saw its attempt's span as the parent (one traceparent per
            # attempt, not the client's).
            sent = _worker_headers(failing)["traceparent"]
            assert sent == f"00-{first.trace_id.hex()}-{first.span_id.hex()}-01"


def test_http_export_and_the_local_answers_end_their_span() -> None:
    with (
        http_collector() as (endpoint, spans, content_types),
        mockutil.start_mock_workers(1) as mocks,
        traced_gateway(mocks.url, endpoint) as gw,
    ):
        gw.wait_ready()
        status, _ = _chat(gw.url, CLIENT_TRACEPARENT)
        assert status == 200
        # Answered by smg itself (bad JSON): the request span ends with that answer.
        trace_id = "b" * 32
        status, _, _ = mockutil.request(
            "POST",
            gw.url + CHAT,
            b"{not json",
            headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
        )
        assert status == 400
        found = wait_spans(spans, TRACE_ID, lambda s: len(s) >= 3)
        assert {s.name for s in found} == {"http_request", "select_worker", "upstream_request"}
        (local,) = wait_spans(spans, trace_id, lambda s: len(s) == 1)
        assert local.name == "http_request"
        attrs = _attributes(local.attributes)
        assert attrs["status_code"] == "400"
        assert attrs["error"] == "invalid_json"
        assert content_types and all(c == "application/x-protobuf" for c in content_types)


def test_spans_queued_at_exit_are_flushed() -> None:
    """SIGTERM: the process exports what its batch processor still holds before exiting."""
    with grpc_collector() as (endpoint, spans), mockutil.start_mock_workers(1) as mocks:
        gw_args = [
            "--worker-urls",
            mocks.url,
            "--enable-trace",
            "--otlp-traces-endpoint",
            endpoint,
            "--disable-health-check",
        ]
        # Exports only every 60 s: what arrives was flushed by the exiting process.
        env = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}
        with running_gateway(gw_args, processes=1, env=env) as gw:
            gw.wait_ready()
            trace_id = "c" * 32
            status, _ = _chat(gw.url, f"00-{trace_id}-{PARENT_ID}-01")
            assert status == 200
            time.sleep(1.0)
            assert spans.of_trace(trace_id) == []
            assert gw.stop() == 0
        found = spans.of_trace(trace_id)
        assert {s.name for s in found} == {"http_request", "select_worker", "upstream_request"}


def test_opentelemetry_is_not_imported_with_tracing_off() -> None:
    """The supervisor, the control plane and an untraced data plane never load it."""
    import subprocess
    import sys

    code = (
        "import sys, smg.supervisor, smg.dataplane.process, smg.control.plane;"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'grpc'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def _listed_models(url: str) -> list[str]:
    status, _, body = mockutil.request("GET", url + "/v1/models", None, timeout=10.0)
    assert status == 200
    return [model["id"] for model in json.loads(body)["data"]]


def test_select_worker_span_names_the_models_own_policy() -> None:
    """A model routed by its worker's `policy` label: the routing span says that policy,
    not --policy."""
    with (
        grpc_collector() as (endpoint, spans),
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(
            [
                "--policy",
                "round_robin",
                "--enable-trace",
                "--otlp-traces-endpoint",
                endpoint,
                "--disable-health-check",
            ],
            processes=1,
        ) as gw,
    ):
        added = gw.admin(
            "POST", "/workers", json={"url": mocks.url, "labels": {"policy": "random"}}
        )
        assert added.status_code == 202, added.text
        # Until discovery names the worker's model it serves any model, by --policy.
        deadline = time.monotonic() + 20
        while "mock-model" not in _listed_models(gw.url) and time.monotonic() < deadline:
            time.sleep(0.05)
        trace_id = "f" * 31 + "1"
        status, _ = _chat(gw.url, f"00-{trace_id}-{PARENT_ID}-01")
        assert status == 200
        found = wait_spans(spans, trace_id, lambda s: len(_by_name(s, "select_worker")) == 1)
        (route,) = _by_name(found, "select_worker")
        assert _attributes(route.attributes)["policy"] == "random"
