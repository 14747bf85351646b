"""Supervision of data-plane processes: heartbeats from inside the event loop, a stalled
process dumped (faulthandler) and replaced, restart counters, and metrics that never go
backwards when a process is replaced. Real `smg launch` processes on loopback; the stall
comes from a test-only route (`SMG__TEST_HOOKS=1`)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from gatewayutil import Gateway

from smg.supervisor import heartbeat_interval, heartbeat_stale

pytestmark = pytest.mark.timeout(120)

CHAT_BODY = b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}'


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, httpx.HTTPError):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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


def test_stalled_process_is_dumped_and_replaced() -> None:
    gw = Gateway(
        ["--mock-workers", "1", "--dataplane-heartbeat-timeout-secs", "1"],
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
        wait_until(lambda: "no heartbeat for 1.0 s" in gw.logs(), 10.0, "the replacement")
        logs = gw.logs()
        assert "testhooks.py" in logs
        assert "has not beaten for" in logs
        assert "in _test_route" in logs  # faulthandler's frame line of the blocked handler
        # Replaced: every request is answered again, by both processes' listeners.
        gw.wait_ready()
        with gw.client() as client:
            statuses = [
                client.post("/v1/chat/completions", content=CHAT_BODY).status_code
                for _ in range(20)
            ]
        assert statuses == [200] * 20
    finally:
        gw.stop()
        gw.close_log()
