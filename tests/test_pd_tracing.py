"""--enable-trace on the HTTP PD router: one `upstream_request` span per PD attempt (worker:
the decode, prefill_worker: the prefill), whose context both legs carry as `traceparent`
(1.13 injects the same context into both legs; its spans have no attempt level). Through
`smg launch` with the PD mocks and the test's OTLP/gRPC collector (tests/test_tracing.py)."""

from __future__ import annotations

import httpx

from tests import mockutil, pdutil
from tests.gatewayutil import running_gateway
from tests.test_tracing import PARENT_ID, _attributes, _by_name, grpc_collector, wait_spans

GENERATE = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}


def _sent(url: str, route: str) -> str:
    return mockutil.stats(url)["last_request_by_route"][route]["header_map"]["traceparent"]


def test_one_attempt_span_per_pd_attempt() -> None:
    with (
        grpc_collector() as (endpoint, spans),
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=5) as decode,
    ):
        args = [
            "--pd-disaggregation", *prefill.prefill_args(), *decode.decode_args(),
            "--enable-trace", "--otlp-traces-endpoint", endpoint, "--disable-health-check",
        ]  # fmt: skip
        with running_gateway(args, processes=1) as gateway:
            gateway.wait_ready(timeout=30)
            for index, path in enumerate(("/generate", "/health_generate")):
                trace_id = f"{0xB1 + index:032x}"
                headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
                if path == "/generate":
                    answer = httpx.post(gateway.url + path, json=GENERATE, headers=headers)
                else:
                    answer = httpx.get(gateway.url + path, headers=headers)
                assert answer.status_code == 200, answer.text
                found = wait_spans(spans, trace_id, lambda s: _by_name(s, "http_request"))
                (attempt,) = _by_name(found, "upstream_request")
                attributes = _attributes(attempt.attributes)
                assert attributes["worker"] == decode.urls[0]
                assert attributes["prefill_worker"] == prefill.urls[0]
                assert attributes["attempt"] == 1
                assert attributes["status_code"] == 200
                (server,) = _by_name(found, "http_request")
                assert attempt.parent_span_id == server.span_id
                if path == "/generate":  # both legs carry the attempt's context
                    context = f"00-{trace_id}-{attempt.span_id.hex()}-01"
                    assert _sent(prefill.urls[0], path) == context
                    assert _sent(decode.urls[0], path) == context
