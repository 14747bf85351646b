"""Start and stop a real `smg launch` for end-to-end tests (real processes, loopback only)."""

from __future__ import annotations

import collections
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil

READY_PREFIX = "SMG_READY "

# Every credential the tests use (right and wrong), registered with `secret`; conftest.py
# greps the whole run's gateway logs (SESSION_LOG_DIR) for each at the end of the session.
SECRETS: dict[str, str] = {}  # value -> where it was registered (never printed: the value)
# Set by conftest.py: every Gateway's log and every run_launch's stderr is kept there.
SESSION_LOG_DIR: str | None = None


def secret(value: str) -> str:
    """Register a key or token a test uses (or presents wrongly) and return it unchanged.

    At the end of the test session no gateway log line may contain it (tests/conftest.py).
    """
    caller = sys._getframe(1)
    SECRETS.setdefault(value, f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}")
    return value


def leaked_secrets(log_dir: str, secrets: dict[str, str]) -> list[str]:
    """One line per (file, secret) hit: the file's path and where the secret was
    registered; the secret's value never appears in the result."""
    found: list[str] = []
    for root, _dirs, files in os.walk(log_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                data = handle.read()
            for value, origin in secrets.items():
                if value.encode() in data:
                    found.append(f"{path}: contains the secret registered at {origin}")
    return found


def keep_session_log(name: str, text: str) -> None:
    """Add one process's output to the session's collected logs (when collecting)."""
    if SESSION_LOG_DIR is None:
        return
    fd, _path = tempfile.mkstemp(prefix=name, suffix=".log", dir=SESSION_LOG_DIR)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


# Ports free_port handed out lately: the kernel may give a just-closed port again at once,
# and two listeners of one server (--port and --prometheus-port, picked back to back) then
# collide (CI saw the Rust SMG refuse "--prometheus-port and --port are both 34613").
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=512)


def free_port() -> int:
    """A port that was free a moment ago and that no recent call here handed out; callers
    retry if the bind fails after all."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port
    raise RuntimeError("the kernel offered only recently handed-out ports 64 times")


class Gateway:
    def __init__(
        self,
        args: list[str],
        *,
        processes: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.processes = processes
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0
        self.metrics_url = ""
        # In the session's log directory when conftest.py collects logs: kept after the
        # test for the end-of-session secret grep.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's life
            prefix="smg-test-", suffix=".log", delete=False, dir=SESSION_LOG_DIR
        )

    def start(self, timeout: float = 30.0) -> Gateway:
        last_error = ""
        for _attempt in range(3):
            metrics_port = free_port()
            command = [
                sys.executable,
                "-m",
                "smg",
                "launch",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--prometheus-port",
                str(metrics_port),
                "--processes",
                str(self.processes),
                "--log-level",
                "info",
                *self.args,
            ]
            env = {**os.environ, **(self.env or {})}
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True
            )
            line = self._read_ready(timeout)
            if line:
                self.url = line
                self.port = int(line.rsplit(":", 1)[1])
                self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                return self
            last_error = self.logs()[-3000:]
            self.stop()
            keep_session_log("smg-failed-start-", self.logs())
            self.log.truncate(0)
        raise RuntimeError(f"smg launch did not become ready:\n{last_error}")

    def _read_ready(self, timeout: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        buffered = b""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return ""
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(self.process.stdout.fileno(), 65536)
            buffered += chunk
            for raw in buffered.split(b"\n"):
                text = raw.decode("utf-8", "replace").strip()
                if text.startswith(READY_PREFIX):
                    return text[len(READY_PREFIX) :]
        return ""

    def logs(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # Anything of its group still alive (it should not be) is killed too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def close_log(self) -> None:
        self.log.close()
        if SESSION_LOG_DIR is not None:
            return  # kept for the end-of-session secret grep; removed with the directory
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log.name)

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            return client.request(method, path, **kwargs)  # type: ignore[arg-type]

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=10.0).text

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                # verify=False: a TLS gateway's test certificate is not in any trust store;
                # only the readiness answer is read here.
                answer = httpx.get(self.url + "/readiness", timeout=2.0, verify=False)
                if answer.status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"gateway not ready in {timeout} s:\n{self.logs()[-3000:]}")


@contextlib.contextmanager
def running_gateway(args: list[str], **kwargs: object) -> Iterator[Gateway]:
    gateway = Gateway(args, **kwargs)  # type: ignore[arg-type]
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()
        gateway.close_log()


def in_flight_total(gateway: Gateway) -> int:
    for line in gateway.metrics().splitlines():
        if line.startswith("smg_gateway_in_flight_requests "):
            return int(float(line.split()[1]))
    raise AssertionError("smg_gateway_in_flight_requests missing from metrics")


def run_launch(args: list[str], timeout: float = 30.0) -> tuple[int, str, float]:
    """Run `smg launch` to completion: (exit code, stderr, seconds it took)."""
    command = [sys.executable, "-m", "smg", "launch", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    text = err.decode("utf-8", "replace")
    keep_session_log("smg-launch-", out.decode("utf-8", "replace") + text)
    return proc.returncode, text, time.monotonic() - started


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` (connection errors count as "not yet") until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, httpx.HTTPError):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def children(gw: Gateway) -> list[psutil.Process]:
    assert gw.process is not None
    return psutil.Process(gw.process.pid).children()


def pid_serving(gw: Gateway, index: str, attempts: int = 100) -> int:
    """The pid of data-plane process ``index``, 0 when none of ``attempts`` new
    connections landed there; found from the child holding our connection's server side."""
    for _ in range(attempts):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5.0) as sock:
            sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: gw\r\n\r\n")
            head = sock.recv(65536)
            if f"x-smg-process: {index}\r\n".encode() not in head:
                continue
            client_port = sock.getsockname()[1]
            for child in children(gw):
                for conn in child.net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == client_port:
                        return child.pid
    return 0


@contextlib.contextmanager
def pinned_clients(
    url: str,
    per_process: int,
    processes: int = 2,
    *,
    attempts: int = 200,
    within: float = 20.0,
    timeout: float = 30.0,
) -> Iterator[dict[str, list[httpx.Client]]]:
    """``per_process`` keep-alive clients on each of data-plane processes 0..processes-1,
    by the ``x-smg-process`` of their answers; closed on exit.

    The kernel's SO_REUSEPORT hash picks a new connection's process, so a handful of new
    connections all land on one process now and then (six: 1 in 32). Each client holds
    one connection (max_connections=1, no keep-alive expiry) that a probe (GET /health,
    answered by the data plane itself: no worker, no admission) showed on the process
    wanted; its later requests go there too unless the gateway closes the connection, so
    callers still check the header of what they send. At most ``attempts`` new connections
    and ``within`` seconds, then an AssertionError saying how far it got.
    """
    wanted = [str(index) for index in range(processes)]
    pinned: dict[str, list[httpx.Client]] = {index: [] for index in wanted}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=None)
    deadline = time.monotonic() + within
    tries = 0
    try:
        while any(len(pinned[index]) < per_process for index in wanted):
            if tries >= attempts or time.monotonic() > deadline:
                got = {index: len(clients) for index, clients in pinned.items()}
                raise AssertionError(
                    f"{per_process} connection(s) per process wanted on {wanted}; "
                    f"got {got} after {tries} new connections"
                )
            tries += 1
            client = httpx.Client(base_url=url, timeout=timeout, limits=limits)
            probe = client.get("/health")
            process = probe.headers.get("x-smg-process", "")
            if probe.status_code == 200 and len(pinned.get(process, [per_process])) < per_process:
                pinned[process].append(client)
            else:
                client.close()
        yield pinned
    finally:
        for clients in pinned.values():
            for client in clients:
                client.close()


def interleaved(pinned: dict[str, list[httpx.Client]]) -> list[httpx.Client]:
    """The clients of ``pinned_clients`` taking turns by process: the first of each
    process, then the second of each, ... (so any run of ``processes`` in a row covers
    every process)."""
    rounds = zip(*(pinned[index] for index in sorted(pinned, key=int)), strict=True)
    return [client for one_round in rounds for client in one_round]


def promtool_check(text: str) -> None:
    """promtool's `check metrics` on an exposition page (skipped where promtool is absent;
    .ci/run installs it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # optional second opinion; prometheus_client's parser already ran
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    # Exit 1 is a format error; lint remarks (naming style) alone exit 3 in promtool 2.x.
    assert done.returncode in (0, 3), done.stdout + done.stderr
    assert "error" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
