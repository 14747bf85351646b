"""The systemd notify protocol end to end, without systemd: a real `smg launch` with
NOTIFY_SOCKET pointing at a datagram socket the test bound, every message recorded with
its arrival time. Start (READY=1 after the first health round), reload (RELOADING=1 ...
READY=1), a wedged data-plane process (WATCHDOG=1 pauses), stop (STOPPING=1, then
nothing)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from smg.config import GatewayConfig
from tests.gatewayutil import Gateway, free_port, wait_until

WATCHDOG = "WATCHDOG=1"
HEALTH_DELAY_SECS = 2.0
STOPPING = f"STOPPING=1\nSTATUS=draining (up to {GatewayConfig().shutdown_grace_period_secs} s)"


class Recorder:
    """A notify socket: every datagram with its time.monotonic() arrival."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(4096)
                self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()

    def texts(self, watchdog: bool = False) -> list[str]:
        return [text for _at, text in list(self.messages) if watchdog or text != WATCHDOG]

    def first(self, prefix: str) -> float:
        return next(at for at, text in list(self.messages) if text.startswith(prefix))

    def watchdogs(self) -> list[float]:
        return [at for at, text in list(self.messages) if text == WATCHDOG]


@contextlib.contextmanager
def recorder(address: str | bytes) -> Iterator[Recorder]:
    rec = Recorder(address)
    try:
        yield rec
    finally:
        rec.close()


class SlowHealth(BaseHTTPRequestHandler):
    """A worker whose /health answers 200 after HEALTH_DELAY_SECS; everything else 404
    (discovery finds nothing and keeps it as an unknown engine)."""

    answered: list[float] = []

    def do_GET(self) -> None:
        if self.path == "/health":
            time.sleep(HEALTH_DELAY_SECS)
            status = 200
            type(self).answered.append(time.monotonic())
        else:
            status = 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def slow_health_worker() -> Iterator[tuple[str, list[float]]]:
    answered: list[float] = []
    handler = type("Handler", (SlowHealth,), {"answered": answered})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answered
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)


def status(ready: int, workers: int) -> str:
    return f"STATUS={ready}/{workers} workers ready, 2/2 data-plane processes"


def dataplane_pids(gw: Gateway) -> list[int]:
    """The gateway's children listening on its port: its data-plane processes."""
    pids = []
    assert gw.process is not None
    for child in psutil.Process(gw.process.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == gw.port:
                    pids.append(child.pid)
                    break
    return sorted(pids)


def test_ready_waits_for_the_first_health_round_and_stopping_is_last(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    # Nothing listens on the dead worker's port: its first probe fails at once.
    dead_url = f"http://127.0.0.1:{free_port()}"
    with recorder(address) as rec, slow_health_worker() as (slow_url, answered):
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        args = ["--worker-urls", slow_url, dead_url, "--mock-workers", "1"]
        gw = Gateway(args, processes=2, env=env)
        try:
            gw.start()
            wait_until(lambda: rec.texts(), 30.0, "READY=1")
            ready_at = rec.first("READY=1")
            # The slow worker's first probe ended (answered) before READY=1 was sent; the
            # dead one's failed probe counts as its first too. STATUS counts the ready ones.
            assert answered and answered[0] <= ready_at
            assert rec.texts() == [f"READY=1\n{status(2, 3)}"]
            # STATUS follows the workers: the dead one removed, within about a second.
            workers = gw.admin("GET", "/workers").json()["workers"]
            dead = next(w for w in workers if w["url"] == dead_url)
            assert gw.admin("DELETE", f"/workers/{dead['id']}").status_code == 202
            wait_until(lambda: len(rec.texts()) == 2, 10.0, "the new STATUS")
            # A program smg starts (the mock workers) does not inherit the variables systemd
            # set for the main process. (Forked children show their parent's exec-time block
            # in /proc/PID/environ whatever the environment is now, so they are not read.)
            assert gw.process is not None
            mocks = [
                child
                for child in psutil.Process(gw.process.pid).children()
                if "mock-worker" in child.cmdline()
            ]
            assert len(mocks) == 1
            assert set(mocks[0].environ()) & {"NOTIFY_SOCKET", "WATCHDOG_USEC"} == set()
            wait_until(lambda: len(rec.watchdogs()) >= 20, 20.0, "watchdog pings")
            gw.signal(signal.SIGTERM)
            assert gw.wait(30.0) == 0
            stopped_at = time.monotonic()
            wait_until(lambda: time.monotonic() - stopped_at > 0.3, 1.0, "late messages")
        finally:
            gw.stop()
            gw.close_log()
    assert rec.texts() == [
        f"READY=1\n{status(2, 3)}",
        status(2, 2),
        STOPPING,
    ]
    # STOPPING=1 is the last message: no watchdog ping after it.
    assert rec.messages[-1][1].startswith("STOPPING=1")
    # Watchdog pings at half of WATCHDOG_USEC (0.1 s), on the 50 ms poll: never more often
    # (counted over the run, not gap by gap: the receiving thread has its own jitter).
    pings = rec.watchdogs()
    span = pings[-1] - pings[0]
    # (1 s of slack for a late receiver; sending on every poll would double the count.)
    assert 20 <= len(pings) <= (span + 1.0) / 0.1, (len(pings), span)


def test_reload_says_reloading_then_ready_on_an_abstract_socket(tmp_path: Path) -> None:
    address = f"@smg-test-{uuid.uuid4().hex}"
    config = tmp_path / "smg.yaml"
    config.write_text("max-payload-size: 100000\n")
    with recorder(b"\0" + address[1:].encode()) as rec:
        gw = Gateway(
            ["--config", str(config), "--mock-workers", "1"],
            processes=2,
            env={"NOTIFY_SOCKET": address},
        )
        try:
            gw.start()
            wait_until(lambda: rec.texts(), 30.0, "READY=1")
            # A reload that rolls the data plane over: READY=1 once every process runs it.
            config.write_text("max-payload-size: 200\n")
            sent = time.monotonic()
            gw.signal(signal.SIGHUP)
            wait_until(lambda: len(rec.texts()) >= 3, 60.0, "the rollout's READY=1")
            rolled = "every data-plane process runs the new configuration"
            assert rolled in gw.logs()
            # A refused reload (invalid file): RELOADING=1, then READY=1 at once.
            config.write_text("max-payload-size: -5\n")
            gw.signal(signal.SIGHUP)
            wait_until(lambda: len(rec.texts()) >= 5, 30.0, "the refusal's READY=1")
            assert "configuration reload refused" in gw.logs()
        finally:
            gw.stop()
            gw.close_log()
    texts = rec.texts()
    reloading = [t for t in texts if t.startswith("RELOADING=1")]
    assert len(reloading) == 2
    assert texts == [
        f"READY=1\n{status(1, 1)}",
        reloading[0],
        f"READY=1\n{status(1, 1)}",
        reloading[1],
        f"READY=1\n{status(1, 1)}",
        STOPPING,
    ]
    # MONOTONIC_USEC is CLOCK_MONOTONIC (the test's time.monotonic()) when the reload began.
    lines = reloading[0].split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert 0 <= usec / 1e6 - sent < 5.0, usec / 1e6 - sent
    # The rollout's READY=1 came after the rollout's own end (not with RELOADING=1).
    first_reload = rec.first("RELOADING=1")
    second_ready = [at for at, t in rec.messages if t.startswith("READY=1")][1]
    assert second_ready - first_reload > 0.2


def test_watchdog_pauses_while_a_data_plane_process_is_wedged(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    timeout = 2.0
    with recorder(address) as rec:
        gw = Gateway(
            ["--mock-workers", "1", "--dataplane-heartbeat-timeout-secs", str(timeout)],
            processes=2,
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"},
        )
        try:
            gw.start()
            wait_until(lambda: len(rec.watchdogs()) >= 5, 30.0, "watchdog pings")
            before = dataplane_pids(gw)
            assert len(before) == 2
            victim = before[0]
            os.kill(victim, signal.SIGSTOP)
            stopped = time.monotonic()
            # The supervisor replaces it (dump, SIGKILL, respawn); the new one beats.
            wait_until(
                lambda: len(dataplane_pids(gw)) == 2 and victim not in dataplane_pids(gw),
                30.0,
                "the replacement",
            )
            replaced = time.monotonic()
            wait_until(lambda: rec.watchdogs()[-1] > replaced, 15.0, "watchdog pings again")
            assert "no heartbeat for 2.0 s" in gw.logs()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
            gw.stop()
            gw.close_log()
    after = [at for at in rec.watchdogs() if at > stopped]
    gaps = [(b - a, a) for a, b in itertools.pairwise(after)]
    longest, paused_at = max(gaps)
    # Pings went on while the stopped process's last beat was younger than the timeout
    # (it beat at most 0.25 s before the stop), then paused until the replacement beat.
    assert stopped + timeout - 1.0 <= paused_at <= stopped + timeout + 1.5, paused_at - stopped
    assert longest >= 0.7, longest
