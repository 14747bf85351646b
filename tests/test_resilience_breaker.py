"""End to end: circuit breakers, overload protection and stalls hold for the whole gateway
(real `smg launch` with several data-plane processes, real mock workers, loopback only)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from gatewayutil import Gateway, free_port, running_gateway
from mockutil import request, reset_stats, set_config, start_mock_workers, stats
from mockutil import wait_for as wait_until

BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def send(gateway: Gateway, n: int) -> list[tuple[int, str]]:
    """`n` requests, each on a fresh connection (so the kernel spreads them over the
    processes' listeners): (status, x-smg-process) of each."""
    out = []
    for _ in range(n):
        status, headers, _body = request("POST", gateway.url + "/v1/chat/completions", BODY)
        out.append((status, headers.get("x-smg-process", "")))
    return out


def send_parallel(gateway: Gateway, n: int) -> list[tuple[int, str]]:
    def one(_i: int) -> tuple[int, str]:
        status, headers, _body = request(
            "POST", gateway.url + "/v1/chat/completions", BODY, timeout=20.0
        )
        return status, headers.get("x-smg-process", "")

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def hits(url: str) -> int:
    return int(stats(url)["requests_by_route"].get("/v1/chat/completions", 0))


def metric(gateway: Gateway, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = None
    for line in gateway.metrics().splitlines():
        if line.startswith(name + "{") and all(part in line for part in want.split(",")):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def test_breaker_opens_in_every_process_and_half_open_admits_at_most_the_threshold() -> None:
    with start_mock_workers(2) as mocks:
        bad, good = mocks.urls
        args = [
            "--worker-urls",
            bad,
            good,
            "--policy",
            "round_robin",
            "--disable-retries",
            "--cb-failure-threshold",
            "4",
            "--cb-success-threshold",
            "2",
            "--cb-timeout-duration-secs",
            "2",
        ]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready()
            set_config(bad, error_rate=1.0)
            first = send(gateway, 24)
            failed = [status for status, _p in first if status == 500]
            # Four consecutive failures open it; a process may dispatch one more before
            # the opening failure's record lands (it runs right after the answer is sent).
            assert 4 <= len(failed) <= 5, first
            assert {status for status, _p in first} == {200, 500}

            # Open: no process sends it anything, and every process serves.
            reset_stats(bad)
            answers = send(gateway, 40)
            assert [status for status, _p in answers] == [200] * 40
            assert {p for _s, p in answers} == {"0", "1"}
            assert hits(bad) == 0
            assert metric(gateway, "smg_worker_cb_state", worker=bad) == 1.0
            assert metric(gateway, "smg_worker_cb_state", worker=good) == 0.0
            assert metric(gateway, "smg_worker_cb_transitions_total", to="open") == 1.0

            # Half-open while it still fails: one trial reaches it and reopens the breaker.
            time.sleep(2.3)
            reset_stats(bad)
            answers = send(gateway, 20)
            assert hits(bad) == 1
            assert sorted(status for status, _p in answers) == [200] * 19 + [500]
            assert metric(gateway, "smg_worker_cb_state", worker=bad) == 1.0

            # Half-open with slow trials: 16 concurrent requests over both processes, at
            # most --cb-success-threshold (2) of them reach the worker; both succeed and
            # close the breaker.
            set_config(bad, error_rate=0.0, ttft_ms=1500)
            time.sleep(2.3)
            reset_stats(bad)
            answers = send_parallel(gateway, 16)
            assert [status for status, _p in answers] == [200] * 16
            assert 1 <= hits(bad) <= 2
            set_config(bad, ttft_ms=0)
            # With one trial through (on a loaded box one process's requests may all pass
            # while the other holds the trial) the breaker needs one more success: keep a
            # trickle of requests going until it closes.
            assert wait_until(
                lambda: (
                    bool(send(gateway, 2))
                    and metric(gateway, "smg_worker_cb_state", worker=bad) == 0.0
                ),
                10.0,
            )
            reset_stats(bad)
            answers = send(gateway, 20)
            assert [status for status, _p in answers] == [200] * 20
            assert hits(bad) >= 8  # round robin again
            outcomes = metric(gateway, "smg_worker_cb_outcomes_total", worker=bad)
            assert outcomes is not None and outcomes > 0
            logs = gateway.logs()
            assert f"worker {bad}: circuit breaker closed -> open" in logs


def test_every_breaker_open_answers_503_no_available_workers() -> None:
    with start_mock_workers(1) as mocks:
        (bad,) = mocks.urls
        args = [
            "--worker-urls",
            bad,
            "--disable-retries",
            "--cb-failure-threshold",
            "2",
            "--load-monitor-interval",
            "3",
        ]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready()
            set_config(bad, error_rate=1.0)
            assert [s for s, _p in send(gateway, 2)] == [500, 500]
            status, headers, body = request("POST", gateway.url + "/v1/chat/completions", BODY)
            assert status == 503
            assert headers["x-smg-error-code"] == "no_available_workers"
            assert headers["retry-after"] == "3"
            assert b"circuit breaker open" in body


def overload_args(busy: str, idle: str, *extra: str) -> list[str]:
    """Two workers, round robin, loads polled every second (overload flags follow fast)."""
    return [
        *("--worker-urls", busy, idle),
        *("--policy", "round_robin", "--load-monitor-interval", "1"),
        *extra,
    ]


def wait_overloaded(gateway: Gateway, count: float) -> bool:
    return bool(
        wait_until(
            lambda: metric(gateway, "smg_workers_overloaded", model="mock-model") == count, 5.0
        )
    )


def test_overload_reports_move_traffic_in_every_process_and_shed_when_all_are_over() -> None:
    with start_mock_workers(2) as mocks:
        busy, idle = mocks.urls
        args = overload_args(busy, idle, "--worker-overload-shed")
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready()
            set_config(busy, waiting=20)
            assert wait_overloaded(gateway, 1.0)
            reset_stats(busy)
            answers = send(gateway, 30)
            assert [status for status, _p in answers] == [200] * 30
            assert {p for _s, p in answers} == {"0", "1"}
            assert hits(busy) == 0

            # KV usage at the threshold counts as well (inclusive, as in SMG).
            set_config(busy, waiting=0, token_usage=0.8)
            time.sleep(1.5)
            reset_stats(busy)
            send(gateway, 10)
            assert hits(busy) == 0

            set_config(idle, waiting=8)
            assert wait_overloaded(gateway, 2.0)
            for _ in range(4):
                status, headers, body = request("POST", gateway.url + "/v1/chat/completions", BODY)
                assert status == 503
                assert headers["x-smg-error-code"] == "worker_overload_protection_shed"
                assert headers["retry-after"] == "1"
                assert b"All workers for model 'mock-model' are overloaded" in body
            shed = metric(gateway, "smg_worker_overload_shed_total", stage="selection")
            assert shed == 4.0

            # Reports back under the thresholds: both take traffic again.
            set_config(busy, token_usage=None)
            set_config(idle, waiting=0)
            assert wait_overloaded(gateway, 0.0)
            reset_stats(busy)
            assert [s for s, _p in send(gateway, 10)] == [200] * 10
            assert hits(busy) >= 3


def test_overload_protection_can_be_switched_off() -> None:
    with start_mock_workers(2) as mocks:
        busy, idle = mocks.urls
        args = overload_args(busy, idle, "--disable-worker-overload-protection")
        with running_gateway(args, processes=1) as gateway:
            gateway.wait_ready()
            set_config(busy, waiting=50)
            time.sleep(2.0)
            reset_stats(busy)
            assert [s for s, _p in send(gateway, 10)] == [200] * 10
            assert hits(busy) == 5


def test_killed_worker_leaves_routing_in_every_process_and_returns_after_restart() -> None:
    port = free_port()
    others = start_mock_workers(2)
    victim = start_mock_workers(1, "--port", str(port))
    try:
        dead = victim.urls[0]
        args = [
            "--worker-urls",
            dead,
            *others.urls,
            "--policy",
            "round_robin",
            "--disable-retries",
            "--load-monitor-interval",
            "1",
        ]
        with running_gateway(args, processes=2) as gateway:
            gateway.wait_ready()
            assert [s for s, _p in send(gateway, 9)] == [200] * 9
            victim.stop()
            started = time.monotonic()
            failures: list[float] = []
            answers: list[tuple[int, str]] = []
            while time.monotonic() - started < 1.5:
                for status, process in send(gateway, 10):
                    answers.append((status, process))
                    if status != 200:
                        assert status == 502
                        failures.append(time.monotonic())
            # Refusals open the breaker (10 failures) in well under a second, in every
            # process at once.
            assert failures, answers
            assert failures[-1] - failures[0] < 1.0
            assert len(failures) <= 11
            assert {p for _s, p in answers[-20:]} == {"0", "1"}
            assert all(s == 200 for s, _p in answers[-20:])
            # Silent since the refusals: stalled as well (the control plane's sweep).
            assert wait_until(
                lambda: metric(gateway, "smg_worker_stalled", worker=dead) == 1.0, 4.0
            )

            # Back on the same port: the next load poll is contact, which ends the stall and
            # resets the breaker (as SMG's liveness does).
            victim = start_mock_workers(1, "--port", str(port))
            assert wait_until(
                lambda: metric(gateway, "smg_worker_cb_state", worker=dead) == 0.0, 5.0
            )
            assert metric(gateway, "smg_worker_stalled", worker=dead) == 0.0
            assert [s for s, _p in send(gateway, 12)] == [200] * 12
            assert hits(dead) >= 3
            assert re.search(rf"worker {re.escape(dead)}: answered again", gateway.logs())
    finally:
        victim.stop()
        others.stop()
