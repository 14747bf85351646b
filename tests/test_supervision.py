"""Supervision of data-plane processes: heartbeats from inside the event loop, a stalled
process dumped (faulthandler) and replaced, restart counters, and metrics that never go
backwards when a process is replaced. Real `smg launch` processes on loopback; the stall
comes from a test-only route (`SMG__TEST_HOOKS=1`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest
from gatewayutil import Gateway, children, pid_serving, wait_until
from test_reload import assert_no_counter_went_back, metric_values

from smg.control.metricfold import MetricFolder
from smg.promtext import Family, Sample
from smg.shm.stash import Stash
from smg.supervisor import heartbeat_interval, heartbeat_stale

pytestmark = pytest.mark.timeout(120)

CHAT_BODY = b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}'


# --- pure -----------------------------------------------------------------------------------


def test_heartbeat_staleness_rule() -> None:
    second = 1_000_000_000
    assert not heartbeat_stale(0, 100 * second, 10.0)  # no beat yet: still starting
    assert not heartbeat_stale(90 * second, 100 * second, 10.0)  # exactly the timeout
    assert heartbeat_stale(90 * second - 1, 100 * second, 10.0)
    assert not heartbeat_stale(99 * second, 100 * second, 1.5)


def test_heartbeat_interval_is_well_inside_the_timeout() -> None:
    from smg.config import GatewayConfig

    assert heartbeat_interval(GatewayConfig()) == 0.25
    assert heartbeat_interval(GatewayConfig(dataplane_heartbeat_timeout_secs=0.4)) == 0.1
    assert heartbeat_interval(GatewayConfig(dataplane_heartbeat_timeout_secs=0.01)) == 0.02


def _counter(value: int, process: str = "0") -> Family:
    return Family("c_total", "counter", "c", [Sample("", [("process", process)], value)])


def _gauge(value: int) -> Family:
    return Family("g", "gauge", "g", [Sample("", [("process", "0")], value)])


def _hist(count: int, total: float) -> Family:
    base = [("process", "0")]
    return Family(
        "h",
        "histogram",
        "h",
        [
            Sample("_bucket", [*base, ("le", "1.0")], count),
            Sample("_bucket", [*base, ("le", "+Inf")], count),
            Sample("_sum", base, total),
            Sample("_count", base, count),
        ],
    )


def _values(folder: MetricFolder) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
    return {
        (f.name, s.suffix, tuple(s.labels)): s.value for f in folder.families() for s in f.samples
    }


def test_folder_keeps_a_gone_process_counts_and_drops_its_gauges() -> None:
    folder = MetricFolder()
    folder.update((0, 100), [_counter(7), _gauge(3), _hist(7, 2.5)], seq=1)
    folder.sync({(0, 100)})
    assert _values(folder)[("c_total", "", (("process", "0"),))] == 7
    # Process 0 crashes; its replacement (same listener, another slot) starts from zero.
    folder.sync(set())
    folder.update((2, 200), [_counter(2), _gauge(1), _hist(2, 0.5)], seq=2)
    values = _values(folder)
    assert values[("c_total", "", (("process", "0"),))] == 9
    assert values[("g", "", (("process", "0"),))] == 1  # live only
    assert values[("h", "_count", (("process", "0"),))] == 9
    assert values[("h", "_sum", (("process", "0"),))] == 3.0
    assert values[("h", "_bucket", (("process", "0"), ("le", "+Inf")))] == 9


def test_folder_takes_a_final_push_once_and_ignores_late_or_stale_scrapes() -> None:
    folder = MetricFolder()
    folder.update((1, 10), [_counter(5, "1")], seq=3)
    folder.update((1, 10), [_counter(4, "1")], seq=2)  # an older scrape answering late
    assert _values(folder)[("c_total", "", (("process", "1"),))] == 5
    folder.retire((1, 10), [_counter(6, "1")])  # the draining process's final numbers
    folder.retire((1, 10))  # the table says it is gone too: no second fold
    folder.update((1, 10), [_counter(6, "1")], seq=4)  # a scrape that raced the exit
    folder.sync(set())
    assert _values(folder) == {("c_total", "", (("process", "1"),)): 6}


def test_folder_sums_two_processes_of_one_listener_during_a_reload() -> None:
    folder = MetricFolder()
    folder.update((0, 1), [_counter(10)], seq=1)
    folder.update((2, 2), [_counter(1)], seq=1)
    assert _values(folder) == {("c_total", "", (("process", "0"),)): 11}


def test_folder_state_survives_in_a_stash() -> None:
    folder = MetricFolder()
    folder.update((0, 100), [_counter(7), _gauge(3), _hist(7, 2.5)], seq=1)
    folder.sync(set())
    stash = Stash(bytearray(4096))
    assert stash.read() == b""
    assert MetricFolder.from_state(stash.read()).families() == []
    assert stash.write(folder.state())
    restored = MetricFolder.from_state(stash.read())
    assert _values(restored) == _values(folder)
    restored.update((0, 100), [_counter(99)], seq=5)  # already folded: ignored
    assert _values(restored) == _values(folder)
    assert not stash.write(b"x" * 4096)  # too big: the last state stays
    assert _values(MetricFolder.from_state(stash.read())) == _values(folder)
    assert MetricFolder.from_state(b"\xc1garbage").families() == []


def control_plane_pid(gw: Gateway) -> int:
    """The child serving the metrics port is the control plane (0: none now)."""
    metrics_port = int(gw.metrics_url.rsplit(":", 1)[1].split("/")[0])
    for child in children(gw):
        with contextlib.suppress(psutil.NoSuchProcess):  # one exiting meanwhile
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == metrics_port:
                    return child.pid
    return 0


# --- end to end -------------------------------------------------------------------------------


def test_test_hooks_are_absent_without_the_environment_variable() -> None:
    gw = Gateway(["--mock-workers", "1"], processes=1).start()
    try:
        answer = httpx.post(gw.url + "/__smg_test/block_loop?seconds=5", timeout=10.0)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "unknown_url"
    finally:
        gw.stop()
        gw.close_log()


@pytest.mark.parametrize("to_file", [False, True], ids=["stderr", "log_dir"])
def test_stalled_process_is_dumped_and_replaced(to_file: bool, tmp_path: Path) -> None:
    # With --log-dir each process writes its own file (dataplane-<slot>.log for the stalled
    # one): the dump must land in the files, not only on stderr.
    extra = ["--log-dir", str(tmp_path)] if to_file else []
    gw = Gateway(
        ["--mock-workers", "1", "--dataplane-heartbeat-timeout-secs", "1", *extra],
        processes=2,
        env={"SMG__TEST_HOOKS": "1"},
    ).start()
    try:
        gw.wait_ready()
        # The held request: its process blocks its loop for a minute and stops beating.
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=20.0)
        started = time.monotonic()
        sock.sendall(
            b"POST /__smg_test/block_loop?seconds=60 HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        elapsed = time.monotonic() - started
        sock.close()
        # An error (the connection closed, no answer), not a hang: 1 s timeout, 0.5 s
        # for the dump, the supervisor's 50 ms poll, and slack for this slow machine.
        assert received == b""
        assert elapsed < 15.0, elapsed

        def logs_now() -> str:
            if not to_file:
                return gw.logs()
            return "".join(p.read_text() for p in sorted(tmp_path.glob("*.log*")))

        wait_until(lambda: "no heartbeat for 1.0 s" in logs_now(), 10.0, "the replacement")
        logs = logs_now()
        assert "testhooks.py" in logs
        assert "has not beaten for" in logs
        assert "Current thread" in logs or "Thread 0x" in logs  # faulthandler's header
        assert "in _test_route" in logs  # faulthandler's frame line of the blocked handler
        # Replaced: every request is answered again, by both processes' listeners.
        gw.wait_ready()
        with gw.client() as client:
            statuses = [
                client.post("/v1/chat/completions", content=CHAT_BODY).status_code
                for _ in range(20)
            ]
        assert statuses == [200] * 20
        values = metric_values(gw.metrics())
        assert values['smg_dataplane_restarts_total{reason="heartbeat"}'] == 1
        assert values['smg_dataplane_restarts_total{reason="crash"}'] == 0
    finally:
        gw.stop()
        gw.close_log()


def test_counters_never_go_backwards_when_a_process_is_killed() -> None:
    gw = Gateway(["--mock-workers", "1"], processes=2).start()
    try:
        gw.wait_ready()
        for _ in range(40):  # new connections: both processes serve some
            answer = httpx.post(gw.url + "/v1/chat/completions", content=CHAT_BODY, timeout=20.0)
            assert answer.status_code == 200
        victim = pid_serving(gw, "1", attempts=200)
        assert victim, "no connection landed on data-plane process 1"
        before = gw.metrics()
        assert 'process="1"' in before
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                metric_values(gw.metrics()).get('smg_dataplane_restarts_total{reason="crash"}') == 1
            ),
            20.0,
            "the crash to be counted",
        )
        wait_until(lambda: pid_serving(gw, "1") != victim, 20.0, "the replacement")
        after = gw.metrics()
        assert_no_counter_went_back(before, after)
        requests = sum(
            value
            for series, value in metric_values(after).items()
            if series.startswith("smg_http_requests_total{")
            and 'path="/v1/chat/completions"' in series
        )
        assert requests == 40
        # The control plane itself crashes: its replacement starts from the folded totals.
        control = control_plane_pid(gw)
        assert control
        os.kill(control, signal.SIGKILL)
        wait_until(lambda: control_plane_pid(gw) not in (0, control), 30.0, "a new control plane")
        again = wait_until(gw.metrics, 30.0, "metrics from the new control plane")
        assert_no_counter_went_back(after, again)
    finally:
        gw.stop()
        gw.close_log()
