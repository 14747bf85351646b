"""The PD decode running-window gate (--pd-admission-wait-secs, smg.dataplane.pd_window)
through `smg launch --processes 2 --pd-disaggregation` with the PD mocks (tests/pdutil.py):
a decode worker whose window is 1 (the mock's /server_info `max_running_requests`, or a
`max_running_requests` label) never runs two decode legs at once across both processes;
later requests wait and succeed, or shed with 503 worker_overload_protection_shed after
the wait (at once with 0); a worker reporting no window is never gated."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import mockutil, pdutil
from tests.gatewayutil import Gateway, interleaved, pinned_clients, wait_until
from tests.test_pd_e2e import GENERATE, pd_gateway
from tests.test_pd_grpc_admission import CHAT, grpc_pd

SHED = "worker_overload_protection_shed"


def _burst(
    url: str, delays: list[float], clients: list[httpx.Client] | None = None
) -> list[tuple[int, Any, str, float]]:
    """One request per delay, each on its own connection (`clients[i]` when given: see
    pdutil.staggered_posts): (status, JSON body, x-smg-process, seconds), plus the
    Retry-After in the body's place for a 503 (as `("retry-after", value)` appended to the
    body dict)."""
    results: list[tuple[int, Any, str, float]] = []
    for answer in pdutil.staggered_posts(url, "/generate", GENERATE, delays, clients):
        body = answer.json()
        if answer.status_code == 503:
            body["retry-after"] = answer.headers.get("retry-after")
        process = answer.headers.get("x-smg-process", "")
        results.append((answer.status_code, body, process, answer.elapsed.total_seconds()))
    return results


def _sum(metrics: str, name: str, *parts: str) -> float:
    """The sum of `name`'s samples whose line holds every one of `parts`."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(part in line for part in parts):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _window(gateway: Gateway, url: str, value: int) -> None:
    wanted = f'smg_pd_admission_window{{worker="{url}"}} {value}'
    wait_until(lambda: wanted in gateway.metrics(), 10, "the decode window published")


def _active(gateway: Gateway, url: str) -> float:
    return _sum(gateway.metrics(), "smg_worker_requests_active", f'worker="{url}"')


@contextlib.contextmanager
def window_one(*extra: str) -> Iterator[tuple[pdutil.PdMocks, pdutil.PdMocks, Gateway]]:
    """A prefill and a decode mock whose /server_info window is 1, behind `smg launch
    --processes 2` with `extra`, the window published."""
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(1, "--max-running-requests", "1", wait_s=10) as decode,
        pd_gateway(prefill, decode, *extra) as gateway,
    ):
        _window(gateway, decode.url, 1)
        yield prefill, decode, gateway


def test_window_of_one_holds_across_processes_and_later_ones_wait() -> None:
    # Six requests at once over their own connections, three pinned to each process; the
    # decode runs one at a time (its peak is 1), every request is answered 200, and those
    # that found the slot taken are counted as waits (five, unless a loaded machine
    # started one late, after a slot had come free).
    with window_one() as (prefill, decode, gateway), pinned_clients(gateway.url, 3) as pinned:
        pdutil.set_faults(decode.url, ttft_ms=500)
        mockutil.reset_stats(decode.url)
        began = time.monotonic()
        results = _burst(gateway.url, [0.0] * 6, interleaved(pinned))
        took = time.monotonic() - began
        assert [status for status, _, _, _ in results] == [200] * 6, results
        assert {process for _, _, process, _ in results} == {"0", "1"}
        stats = mockutil.stats(decode.url)
        assert stats["peak_in_flight"] == 1
        assert took >= 6 * 0.5 - 0.1  # one after the other
        metrics = gateway.metrics()
        waits = _sum(metrics, "smg_pd_admission_waits_total", f'worker="{decode.url}"')
        assert 3 <= waits <= 5
        assert _sum(metrics, "smg_pd_admission_sheds_total") == 0
        assert _active(gateway, decode.url) == 0
        assert _active(gateway, prefill.url) == 0


def test_wait_zero_sheds_at_once_and_dispatches_nothing() -> None:
    with (
        window_one("--pd-admission-wait-secs", "0") as (prefill, decode, gateway),
        pinned_clients(gateway.url, 3) as pinned,
    ):
        pdutil.set_faults(decode.url, ttft_ms=2000)
        mockutil.reset_stats(prefill.url)
        # The five behind the first take turns by process: both shed.
        results = _burst(gateway.url, [0.0] + [0.5] * 5, interleaved(pinned))
        assert results[0][0] == 200
        behind = results[1:]
        assert [status for status, _, _, _ in behind] == [503] * 5, behind
        assert {process for _, _, process, _ in behind} == {"0", "1"}
        for _, body, _, seconds in behind:
            assert seconds < 1.5  # at once (a loaded test machine allowed for)
            assert body["retry-after"] == "10"  # the load poll interval (--worker-overload-shed)
            error = body["error"]
            assert error["code"] == SHED
            assert error["type"] == "server_error"  # as every other 503 here
            assert error["message"].startswith(f"Decode worker '{decode.url}' for model ")
            assert "within its running window of 1" in error["message"]
        # Nothing was dispatched for the shed ones: the prefill saw one request.
        assert mockutil.stats(prefill.url)["inference_answered"] == 1
        metrics = gateway.metrics()
        assert _sum(metrics, "smg_pd_admission_sheds_total", f'worker="{decode.url}"') == 5
        # 1.13 counts them under the overload shed counter too (its stage "pd_admission").
        assert _sum(metrics, "smg_worker_overload_shed_total", 'stage="pd_admission"') == 5
        assert _sum(metrics, "smg_pd_admission_waits_total") == 0
        assert _active(gateway, prefill.url) == 0


def test_short_wait_sheds_after_it_and_aborts_the_prefill_cleanly() -> None:
    with window_one(
        "--pd-admission-wait-secs", "1", "--prefill-max-inflight-requests-per-worker", "4"
    ) as (prefill, decode, gateway):
        # The prefill is still running when the held decode legs shed (as an engine's
        # prefill waiting on its decode's bootstrap would be): it is aborted.
        pdutil.set_faults(prefill.url, ttft_ms=2500)
        pdutil.set_faults(decode.url, ttft_ms=1000)
        results = _burst(gateway.url, [0.0, 0.4, 0.4])
        assert results[0][0] == 200
        for status, body, _, seconds in results[1:]:
            assert status == 503, body
            assert body["error"]["code"] == SHED
            assert 0.9 <= seconds < 3.0  # about the wait
        # The shed ones' prefill legs ended (in flight and admission slots given back)
        # and the decode ran one at a time.
        assert _active(gateway, prefill.url) == 0
        assert _active(gateway, decode.url) == 0
        assert mockutil.stats(decode.url)["peak_in_flight"] == 1
        metrics = gateway.metrics()
        assert _sum(metrics, "smg_pd_admission_waits_total") == 2
        assert _sum(metrics, "smg_pd_admission_sheds_total") == 2
        assert _sum(metrics, "smg_pd_prefill_admission_inflight") == 0
        # A shed is not the prefill worker's failure (its breaker counts none).
        assert _sum(metrics, "smg_worker_cb_outcomes_total", 'outcome="failure"') == 0
        # Nothing leaked: the next request goes at once.
        pdutil.set_faults(prefill.url, ttft_ms=0)
        pdutil.set_faults(decode.url, ttft_ms=0)
        assert _burst(gateway.url, [0.0])[0][0] == 200


def test_client_leaving_while_held_frees_everything() -> None:
    with window_one() as (prefill, decode, gateway):
        pdutil.set_faults(decode.url, ttft_ms=2000)

        def leaver() -> str:
            time.sleep(0.4)
            try:
                httpx.post(gateway.url + "/generate", json=GENERATE, timeout=0.5)
            except httpx.TimeoutException:
                return "left"
            return "answered"

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_burst, gateway.url, [0.0])
            left = pool.submit(leaver)
            assert left.result() == "left"
            assert first.result()[0][0] == 200
        # The held one never reached the decode, and nothing stayed counted.
        assert mockutil.stats(decode.url)["inference_answered"] == 1
        metrics = gateway.metrics()
        assert _sum(metrics, "smg_pd_admission_waits_total") == 1
        assert _sum(metrics, "smg_pd_admission_sheds_total") == 0
        wait_until(lambda: _active(gateway, prefill.url) == 0, 5, "the prefill leg ended")
        assert _active(gateway, decode.url) == 0
        pdutil.set_faults(decode.url, ttft_ms=0)
        began = time.monotonic()
        assert _burst(gateway.url, [0.0])[0][0] == 200
        assert time.monotonic() - began < 1.5


def test_a_decode_reporting_no_window_is_never_gated() -> None:
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(1, "--max-running-requests", "0", wait_s=10) as decode,
        pd_gateway(prefill, decode, "--pd-admission-wait-secs", "0") as gateway,
    ):
        _window(gateway, decode.url, 0)
        pdutil.set_faults(decode.url, ttft_ms=600)
        results = _burst(gateway.url, [0.0] * 4)
        assert [status for status, _, _, _ in results] == [200] * 4, results
        assert mockutil.stats(decode.url)["peak_in_flight"] >= 2
        metrics = gateway.metrics()
        assert _sum(metrics, "smg_pd_admission_waits_total") == 0
        assert _sum(metrics, "smg_pd_admission_sheds_total") == 0


def test_a_free_decode_is_taken_rather_than_waiting_on_a_full_one() -> None:
    # Two decodes of window 1: two requests at once both go (one on each), a third waits.
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(2, "--max-running-requests", "1", wait_s=10) as decodes,
        pd_gateway(prefill, decodes, "--policy", "random") as gateway,
    ):
        for url in decodes.urls:
            _window(gateway, url, 1)
        for url in decodes.urls:
            pdutil.set_faults(url, ttft_ms=1200)
        began = time.monotonic()
        results = _burst(gateway.url, [0.0, 0.0, 0.3])
        assert [status for status, _, _, _ in results] == [200] * 3
        assert [mockutil.stats(url)["peak_in_flight"] for url in decodes.urls] == [1, 1]
        assert results[0][3] < 2.2 and results[1][3] < 2.2  # neither waited for the other
        assert time.monotonic() - began >= 2.3  # the third waited for a slot
        assert _sum(gateway.metrics(), "smg_pd_admission_waits_total") == 1


# --- gRPC PD --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pdwin-llama3"))


@contextlib.contextmanager
def grpc_window(
    llama_dir: Path, window: int, *extra: str
) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock, Gateway]]:
    """SGLang gRPC PD mocks behind `smg launch --processes 2` (test_pd_grpc_admission's);
    the decode re-registered with a `max_running_requests` label of `window` (the gRPC
    mock reports none)."""
    with grpc_pd(llama_dir, "sglang", *extra) as (prefill, decode, gateway):
        if window:
            workers = httpx.get(gateway.url + "/workers", timeout=5).json()["workers"]
            decode_id = next(w["id"] for w in workers if w["url"] == decode.url)
            assert gateway.admin("DELETE", f"/workers/{decode_id}").status_code == 202
            spec = {
                "url": decode.url,
                "worker_type": "decode",
                "labels": {"max_running_requests": str(window)},
            }
            assert gateway.admin("POST", "/workers", json=spec).status_code == 202
        _window(gateway, decode.url, window)  # (the labelled worker registered)
        wait_until(lambda: _ready(gateway, 2), 30, "both workers ready")
        yield prefill, decode, gateway


def _ready(gateway: Gateway, count: int) -> bool:
    workers = httpx.get(gateway.url + "/workers", timeout=5).json()["workers"]
    return sum(w["status"] == "ready" for w in workers) == count


def _chats(url: str, delays: list[float]) -> list[tuple[int, Any, float]]:
    def one(delay: float) -> tuple[int, Any, float]:
        time.sleep(delay)
        with httpx.Client(base_url=url, timeout=30.0) as client:
            began = time.monotonic()
            answer = client.post("/v1/chat/completions", json=CHAT)
            body = answer.json()
            if answer.status_code == 503:
                body["retry-after"] = answer.headers.get("retry-after")
            return answer.status_code, body, time.monotonic() - began

    with concurrent.futures.ThreadPoolExecutor(len(delays)) as pool:
        return list(pool.map(one, delays))


def test_grpc_window_of_one_serialises_the_decode_legs(llama_dir: Path) -> None:
    with grpc_window(llama_dir, 1) as (_prefill, decode, gateway):
        decode.config(ttft_ms=400)
        began = time.monotonic()
        results = _chats(gateway.url, [0.0] * 4)
        took = time.monotonic() - began
        assert [status for status, _, _ in results] == [200] * 4, results
        assert took >= 4 * 0.4 - 0.1  # one decode at a time
        metrics = gateway.metrics()
        # Three waited (two, should a loaded machine start one late, after a slot freed).
        assert _sum(metrics, "smg_pd_admission_waits_total", f'worker="{decode.url}"') >= 2
        assert _active(gateway, decode.url) == 0


def test_grpc_wait_sheds_after_it(llama_dir: Path) -> None:
    with grpc_window(llama_dir, 1, "--pd-admission-wait-secs", "1") as (prefill, decode, gw):
        decode.config(ttft_ms=3000)
        results = _chats(gw.url, [0.0, 0.5])
        assert results[0][0] == 200
        status, body, seconds = results[1]
        assert status == 503, body
        assert body["error"]["code"] == SHED
        assert body["retry-after"] == "10"
        assert 0.9 <= seconds < 3.0
        metrics = gw.metrics()
        assert _sum(metrics, "smg_pd_admission_sheds_total", f'worker="{decode.url}"') == 1
        wait_until(lambda: _active(gw, prefill.url) == 0, 5, "the prefill leg ended")
        assert _active(gw, decode.url) == 0


def test_grpc_wait_zero_sheds_and_no_window_is_never_gated(llama_dir: Path) -> None:
    with grpc_window(llama_dir, 1, "--pd-admission-wait-secs", "0") as (_p, decode, gw):
        decode.config(ttft_ms=1500)
        results = _chats(gw.url, [0.0, 0.4])
        assert [status for status, _, _ in results] == [200, 503]
        assert results[1][1]["error"]["code"] == SHED
        assert results[1][2] < 1.5
    with grpc_window(llama_dir, 0, "--pd-admission-wait-secs", "0") as (_p, decode, gw):
        decode.config(ttft_ms=800)
        began = time.monotonic()
        results = _chats(gw.url, [0.0, 0.0, 0.0])
        assert [status for status, _, _ in results] == [200] * 3
        assert time.monotonic() - began < 3 * 0.8  # not one after the other
        assert _sum(gw.metrics(), "smg_pd_admission_sheds_total") == 0
