"""Defects found rereading the PD request path (HTTP and gRPC) after the decode-window,
PD-metrics and gRPC dp-aware merges, each through `smg launch` in front of the PD mocks
(tests/pdutil.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import mockutil, pdutil
from tests.gatewayutil import Gateway, children, in_flight_total, running_gateway, wait_until
from tests.test_pd_decode_window_e2e import grpc_window
from tests.test_pd_e2e import GENERATE
from tests.test_pd_grpc_admission import CHAT as GRPC_CHAT
from tests.test_tracing import PARENT_ID, _attributes, _by_name, grpc_collector, wait_spans


def _leave_early(url: str, after_s: float) -> None:
    """POST /generate on a connection of its own and hang up after `after_s` seconds."""
    try:
        with httpx.Client(base_url=url, timeout=after_s) as client:
            client.post("/generate", json=GENERATE)
    except httpx.TimeoutException:
        return
    raise AssertionError("the request was answered before the client left")


def _cb_failures(metrics: str, worker: str) -> float:
    return pdutil.metric_sum(
        metrics, "smg_worker_cb_outcomes_total{", f'worker="{worker}"', 'outcome="failure"'
    )


def test_a_client_leaving_does_not_count_against_the_prefill_worker() -> None:
    # The client hangs up while the prefill leg is still running (a 3 s prefill): the
    # request ends, and its prefill leg is aborted. The client leaving says nothing of the
    # prefill worker (1.13 records no outcome for a dropped request; smg's decode attempt
    # records CLIENT_LEFT): before the fix the aborted prefill leg was recorded as a
    # transport failure, so ten impatient clients opened a healthy prefill's breaker.
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=10) as decode,
        pdutil.pd_gateway(prefill, decode) as gateway,
    ):
        pdutil.set_faults(prefill.url, ttft_ms=3000)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: _leave_early(gateway.url, 0.5), range(3)))
        wait_until(lambda: in_flight_total(gateway) == 0, 10, "the three requests ended")
        metrics = gateway.metrics()
        assert _cb_failures(metrics, prefill.url) == 0
        assert _cb_failures(metrics, decode.url) == 0
        # The prefill worker's three legs were dropped by the gateway, not failed by it.
        assert wait_until(lambda: mockutil.stats(prefill.url)["disconnects"] >= 3, 10, "drops")


def test_a_queued_client_leaving_gives_its_queue_place_back_at_once() -> None:
    # One prefill slot held 2 s by A, a gateway-wide queue of two: B waits at its head, C
    # behind B hangs up, then D arrives. C's place is free again (the waiter's own words:
    # "a client leaving takes it out", as admission.Waiter leaves the queue at once), so D
    # waits and is served. Before the fix only the queue's head was ever looked at: C kept
    # its place until B left the queue, and D got 429 pd_prefill_queue_full although one
    # request was waiting. One process, so that B and C share one queue (with two, the
    # kernel may put them in different processes, where C is its queue's head).
    with pdutil.start_prefill() as prefill, pdutil.start_decode(wait_s=10) as decode:
        pd = ["--pd-disaggregation", *prefill.prefill_args(), *decode.decode_args()]
        admission = pdutil.admission_args(20, queue_size=2)
        with running_gateway([*pd, *admission], processes=1) as gateway:
            _queue_place_freed(gateway, prefill)


def _queue_place_freed(gateway: Gateway, prefill: pdutil.PdMocks) -> None:
    """A holds the slot, B queues, C queues and hangs up, D must still find a place."""
    gateway.wait_ready()
    pdutil.set_faults(prefill.url, ttft_ms=2000)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        a, b = (
            pool.submit(pdutil.staggered_posts, gateway.url, "/generate", GENERATE, [delay])
            for delay in (0.0, 0.3)
        )
        time.sleep(0.6)
        _leave_early(gateway.url, 0.4)  # C: queued behind B, then gone
        d = pdutil.staggered_posts(gateway.url, "/generate", GENERATE, [0.0])[0]
        assert d.status_code == 200, d.text
        assert a.result()[0].status_code == 200
        assert b.result()[0].status_code == 200
    metrics = gateway.metrics()
    assert pdutil.metric_sum(metrics, "smg_pd_prefill_admission_rejections_total{") == 0
    assert pdutil.metric_sum(metrics, "smg_pd_prefill_admission_queued{") == 0


def test_each_attempt_of_a_held_decode_leg_ends_its_span() -> None:
    # The decode's running window (1) is taken by A for 3 s, so B's decode leg is held
    # while its prefill fails (500, retried: a new pair each attempt, the decode held
    # again). Every attempt is one `upstream_request` span, as a plain retried request's.
    # Before the fix a held attempt counted nothing, so nothing ended its span: the next
    # attempt's replaced it unrecorded and only the last attempt was exported.
    with (
        grpc_collector() as (endpoint, spans),
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(1, "--max-running-requests", "1", wait_s=10) as decode,
    ):
        args = [
            "--pd-disaggregation", *prefill.prefill_args(), *decode.decode_args(),
            "--enable-trace", "--otlp-traces-endpoint", endpoint, "--disable-health-check",
            "--disable-circuit-breaker", "--retry-max-retries", "3",
            "--retry-initial-backoff-ms", "10", "--pd-admission-wait-secs", "10",
        ]  # fmt: skip
        with running_gateway(args, processes=1) as gateway:
            gateway.wait_ready(timeout=30)
            wanted = f'smg_pd_admission_window{{worker="{decode.url}"}} 1'
            wait_until(lambda: wanted in gateway.metrics(), 10, "the decode window published")
            pdutil.set_faults(decode.url, ttft_ms=3000)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                first = pool.submit(pdutil.staggered_posts, gateway.url, "/generate", GENERATE, [0])
                wait_until(
                    lambda: mockutil.stats(prefill.url)["inference_answered"] == 1,
                    10,
                    "A's prefill answered (its decode leg holds the window)",
                )
                pdutil.set_faults(prefill.url, error_rate=1.0)
                trace_id = f"{0xC1:032x}"
                headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
                answer = httpx.post(gateway.url + "/generate", json=GENERATE, headers=headers)
                assert first.result()[0].status_code == 200
        assert answer.status_code == 500, answer.text
        assert answer.json()["error"]["code"] == "prefill_internal_error"
        found = wait_spans(spans, trace_id, lambda s: _by_name(s, "http_request"))
        attempts = [_attributes(span.attributes) for span in _by_name(found, "upstream_request")]
        assert sorted(a["attempt"] for a in attempts) == [1, 2, 3]
        assert {a["prefill_worker"] for a in attempts} == {prefill.urls[0]}


def _cpu_seconds(gateway: Gateway) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in children(gateway))


def test_a_queued_large_request_does_not_keep_its_process_busy() -> None:
    # A holds the one prefill slot 3 s; B, an 8 MB body, waits in the prefill queue. The
    # queue tries its head every millisecond: before the fix each try parsed B's body
    # again (a few ms each), so B's process spent the whole wait parsing (a core's worth
    # of CPU, every other request on it delayed); now the body is parsed once.
    big = {"text": "a " * 4_000_000, "sampling_params": {"max_new_tokens": 3}}
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=10) as decode,
        pdutil.pd_gateway(prefill, decode, *pdutil.admission_args(10)) as gateway,
    ):
        pdutil.set_faults(prefill.url, ttft_ms=3000)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a = pool.submit(pdutil.staggered_posts, gateway.url, "/generate", GENERATE, [0.0])
            b = pool.submit(pdutil.staggered_posts, gateway.url, "/generate", big, [0.3])
            wait_until(
                lambda: (
                    pdutil.metric_sum(gateway.metrics(), "smg_pd_prefill_admission_queued{") == 1
                ),
                5,
                "B queued",
            )
            before = _cpu_seconds(gateway)
            time.sleep(1.0)
            busy = _cpu_seconds(gateway) - before
            assert a.result()[0].status_code == 200
            assert b.result()[0].status_code == 200
        assert busy < 0.2, f"{busy:.2f} s of CPU in 1 s while B waited"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pdreview-llama3"))


def test_grpc_each_attempt_of_a_held_decode_leg_ends_its_span(llama_dir: Path) -> None:
    # gRPC PD (SGLang), the same story: the decode's window (1) taken by A for 3 s, B's
    # decode leg held while its prefill fails twice (UNAVAILABLE, retried), the third
    # attempt served once A ends. Before the fix the two held attempts counted nothing
    # (`attempting` False), so `_retry_after` ended no span for them.
    with grpc_collector() as (endpoint, spans):
        extra = [
            "--enable-trace", "--otlp-traces-endpoint", endpoint, "--disable-circuit-breaker",
            "--retry-max-retries", "3", "--retry-initial-backoff-ms", "10",
            "--pd-admission-wait-secs", "10",
        ]  # fmt: skip
        with grpc_window(llama_dir, 1, *extra) as (prefill, decode, gateway):
            decode.config(ttft_ms=3000)
            rooms = len(prefill.pd_stats()["rooms"])
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                first = pool.submit(
                    httpx.post, gateway.url + "/v1/chat/completions", json=GRPC_CHAT, timeout=30
                )
                wait_until(
                    lambda: len(prefill.pd_stats()["rooms"]) > rooms, 10, "A's prefill reached"
                )
                prefill.config(fail_next=2, fail_code="UNAVAILABLE")
                trace_id = f"{0xC2:032x}"
                headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
                answer = httpx.post(
                    gateway.url + "/v1/chat/completions",
                    json=GRPC_CHAT,
                    headers=headers,
                    timeout=30,
                )
                assert first.result().status_code == 200
        assert answer.status_code == 200, answer.text
        found = wait_spans(spans, trace_id, lambda s: _by_name(s, "http_request"))
        attempts = [_attributes(span.attributes) for span in _by_name(found, "upstream_request")]
        assert sorted(a["attempt"] for a in attempts) == [1, 2, 3]


def test_a_health_generate_whose_client_left_still_ends_its_span() -> None:
    # /health_generate asks a pair; the decode here accepts and never answers, so the
    # client leaves first. The request is still counted and its server span ended (499
    # client_disconnected, as a proxied request whose client left); before the fix the
    # answer was dropped without either, and the span never reached the collector.
    with (
        grpc_collector() as (endpoint, spans),
        _silent_worker() as silent,
        pdutil.start_prefill() as prefill,
    ):
        args = [
            "--pd-disaggregation", *prefill.prefill_args(), "--decode", silent,
            "--enable-trace", "--otlp-traces-endpoint", endpoint, "--disable-health-check",
        ]  # fmt: skip
        with running_gateway(args, processes=1) as gateway:
            gateway.wait_ready(timeout=30)
            trace_id = f"{0xC3:032x}"
            headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
            with pytest.raises(httpx.TimeoutException):
                httpx.get(gateway.url + "/health_generate", headers=headers, timeout=0.5)
            found = wait_spans(spans, trace_id, lambda s: _by_name(s, "http_request"))
            (server,) = _by_name(found, "http_request")
            assert _attributes(server.attributes)["status_code"] == "499"
            metrics = gateway.metrics()
        assert 'code="499"' in "".join(
            line for line in metrics.splitlines() if "/health_generate" in line
        )


@contextlib.contextmanager
def _silent_worker() -> Iterator[str]:
    """A worker URL that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()
