"""Socket activation without systemd: the test opens the listening socket (as smg.socket
does), hands it to `smg launch` as fd 3 with LISTEN_PID/LISTEN_FDS (sd_listen_fds(3)),
and checks that smg serves it from every data-plane process; that connections made while
no smg runs wait in the socket's backlog and are served by the next instance; and that a
LISTEN_PID naming another process is ignored."""

from __future__ import annotations

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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.gatewayutil import READY_PREFIX, SESSION_LOG_DIR, free_port, wait_until

# Execs `smg launch` with the socket on fd 3 and LISTEN_PID set to its own pid (the pid the
# exec keeps), as systemd's service manager does.
WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "smg.socket"
os.execv(sys.executable, [sys.executable, "-m", "smg", "launch", *sys.argv[2:]])
"""


def listening_socket() -> socket.socket:
    """A listening socket on a checked free loopback port (retried if taken meanwhile)."""
    for _attempt in range(5):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", free_port()))
        except OSError:
            sock.close()
            continue
        sock.listen(2048)
        return sock
    raise RuntimeError("no free port")


class Activated:
    """One `smg launch` serving `sock` through socket activation (`command`: another way
    to start it, e.g. systemd's own tool)."""

    def __init__(
        self, sock: socket.socket | None, args: list[str], command: list[str] | None = None
    ) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's life
            prefix="smg-activated-", suffix=".log", delete=False, dir=SESSION_LOG_DIR
        )
        if command is None:
            assert sock is not None
            command = [sys.executable, "-c", WRAPPER, str(sock.fileno())]
        self.process = subprocess.Popen(
            [*command, *args],
            pass_fds=() if sock is None else (sock.fileno(),),
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
        )

    def ready_line(self, timeout: float = 30.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        buffered = b""
        while time.monotonic() < deadline and self.process.poll() is None:
            if select.select([self.process.stdout], [], [], 0.2)[0]:
                buffered += os.read(self.process.stdout.fileno(), 65536)
                for raw in buffered.split(b"\n"):
                    text = raw.decode("utf-8", "replace").strip()
                    if text.startswith(READY_PREFIX):
                        return text[len(READY_PREFIX) :]
        raise AssertionError(f"smg did not become ready:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()
        return self.process.returncode


@contextlib.contextmanager
def activated(sock: socket.socket, args: list[str]) -> Iterator[Activated]:
    smg = Activated(sock, args)
    try:
        yield smg
    finally:
        smg.stop()


def launch_args(processes: int = 2) -> list[str]:
    return [
        "--prometheus-port",
        str(free_port()),
        "--processes",
        str(processes),
        "--mock-workers",
        "1",
        "--log-level",
        "info",
    ]


def test_every_data_plane_process_serves_the_passed_socket() -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    unused = free_port()
    try:
        with activated(sock, [*launch_args(), "--port", str(unused)]) as smg:
            assert smg.ready_line() == f"http://127.0.0.1:{port}"
            url = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: httpx.get(url + "/readiness", timeout=2.0).status_code == 200,
                30.0,
                "a ready worker",
            )
            # New connections, 8 at a time: the kernel hands each to whichever accepts.
            answers = chat_processes(url, 80)
            assert {status for status, _ in answers} == {200}
            assert {process for _, process in answers} == {"0", "1"}
            # --port was not bound: the socket from systemd replaces it, and the log says so.
            with pytest_raises_refused():
                socket.create_connection(("127.0.0.1", unused), timeout=2.0).close()
            logs = smg.logs()
            assert f"serving the socket systemd passed (127.0.0.1:{port})" in logs
            assert f"--port {unused} is ignored: serving port {port}" in logs
            # Close-on-exec: the mock workers (an exec'ed program) do not hold the socket.
            children = psutil.Process(smg.process.pid).children()
            mocks = [c for c in children if "mock-worker" in c.cmdline()]
            assert len(mocks) == 1
            ports = {c.laddr.port for c in mocks[0].net_connections(kind="tcp")}
            assert port not in ports
        assert smg.process.returncode == 0
    finally:
        sock.close()


def chat_processes(url: str, count: int) -> list[tuple[int, str]]:
    """(status, x-smg-process) of `count` chat requests, 8 at a time, one connection each."""
    body = {"messages": [{"role": "user", "content": "hi"}]}

    def one(_i: int) -> tuple[int, str]:
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=30.0)
        return answer.status_code, answer.headers.get("x-smg-process", "")

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def test_replacements_and_reload_rollouts_serve_the_passed_socket(tmp_path: Path) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "smg.yaml"
    config.write_text("max-payload-size: 100000\n")
    try:
        with activated(sock, [*launch_args(), "--config", str(config)]) as smg:
            assert smg.ready_line() == url
            wait_until(
                lambda: httpx.get(url + "/readiness", timeout=2.0).status_code == 200,
                30.0,
                "a ready worker",
            )
            # A crashed data-plane process: its replacement accepts from the same socket.
            victim = next(
                c
                for c in psutil.Process(smg.process.pid).children()
                if "mock-worker" not in c.cmdline()
                and any(
                    n.status == psutil.CONN_LISTEN and n.laddr.port == port
                    for n in c.net_connections(kind="tcp")
                )
            )
            victim.kill()
            wait_until(lambda: "replacing it in" in smg.logs(), 15.0, "the crash noticed")
            wait_until(
                lambda: {p for s, p in chat_processes(url, 40) if s == 200} == {"0", "1"},
                30.0,
                "both processes answering after the replacement",
            )
            # A live reload that rolls every process over: the new ones accept from it too.
            config.write_text("max-payload-size: 200\n")
            smg.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: "every data-plane process runs the new configuration" in smg.logs(),
                60.0,
                "the rollout",
            )
            answers = chat_processes(url, 80)
            assert {status for status, _ in answers} == {200}
            assert {process for _, process in answers} == {"0", "1"}
        assert smg.process.returncode == 0
    finally:
        sock.close()


@contextlib.contextmanager
def pytest_raises_refused() -> Iterator[None]:
    try:
        yield
    except ConnectionRefusedError:
        return
    raise AssertionError("the connection was accepted")


def test_connections_made_while_smg_restarts_wait_in_the_backlog() -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    clients: list[socket.socket] = []
    try:
        with activated(sock, launch_args()) as first:
            assert first.ready_line() == f"http://127.0.0.1:{port}"
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(30.0) == 0
        # No smg runs: the connections complete in the kernel (the test's copy of the socket
        # still listens) and their requests wait, unread.
        for _ in range(8):
            client = socket.create_connection(("127.0.0.1", port), timeout=5.0)
            client.sendall(b"GET /liveness HTTP/1.1\r\nHost: smg\r\nConnection: close\r\n\r\n")
            clients.append(client)
        time.sleep(0.5)
        for client in clients:
            assert select.select([client], [], [], 0)[0] == []  # nothing answers yet
        with activated(sock, launch_args()) as second:
            assert second.ready_line() == f"http://127.0.0.1:{port}"
            for client in clients:
                client.settimeout(30.0)
                answer = b""
                while chunk := client.recv(65536):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        for client in clients:
            client.close()
        sock.close()


def test_a_listen_pid_of_another_process_is_ignored() -> None:
    sock = listening_socket()
    try:
        # LISTEN_PID names this test process, not smg: smg binds --port itself. The
        # variables reach smg through the environment; fd 3 is not passed.
        env = {**os.environ, "LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        port = free_port()
        smg = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smg",
                "launch",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *launch_args(1),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert smg.stdout is not None
            line = b""
            deadline = time.monotonic() + 30.0
            while not line.startswith(b"SMG_READY") and time.monotonic() < deadline:
                if select.select([smg.stdout], [], [], 0.5)[0]:
                    line = smg.stdout.readline()
            assert line.decode().strip() == f"SMG_READY http://127.0.0.1:{port}"
        finally:
            smg.send_signal(signal.SIGTERM)
            try:
                smg.wait(30.0)
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(smg.pid, signal.SIGKILL)
                assert smg.stdout is not None
                smg.stdout.close()
    finally:
        sock.close()


def test_a_passed_fd_that_is_not_a_listening_socket_is_refused() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        smg = Activated(udp, launch_args(1))
        try:
            assert smg.process.wait(30.0) == 2
        finally:
            smg.stop()
        assert "fd 3 from systemd (LISTEN_FDS) must be a listening TCP socket" in smg.logs()
    finally:
        udp.close()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate (from the systemd package) is not installed",
)
def test_systemd_socket_activate_hands_smg_its_socket() -> None:
    """systemd's own implementation of the protocol (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES,
    fd 3): the tool listens, and on the first connection execs smg, which answers it."""
    port = free_port()
    tool = str(shutil.which("systemd-socket-activate"))
    command = [tool, "-l", f"127.0.0.1:{port}", "--fdname=smg.socket"]
    smg = Activated(None, launch_args(), [*command, sys.executable, "-m", "smg", "launch"])
    try:
        wait_until(lambda: "Listening on" in smg.logs(), 10.0, "the tool's socket")
        # This first request starts smg; it waits in the backlog until smg serves it.
        answer = httpx.get(f"http://127.0.0.1:{port}/liveness", timeout=60.0)
        assert answer.status_code == 200
        assert smg.ready_line() == f"http://127.0.0.1:{port}"
        assert f"serving the socket systemd passed (127.0.0.1:{port})" in smg.logs()
    finally:
        assert smg.stop() == 0
