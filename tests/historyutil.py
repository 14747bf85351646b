"""Real Redis and PostgreSQL servers for the history-store tests, on checked free loopback ports.

`RedisServer` runs `redis-server` (no persistence: a restart starts empty, as the tests want
for the "killed server" case); `PostgresServer` runs `initdb` once into a temporary directory,
then `postgres` on it (kept across a stop/start, so records survive a restart). Both can be
stopped and started again on the same port. PostgreSQL refuses to run as root, so as root the
cluster belongs to `nobody`. The fixtures `redis_server` / `postgres_server` (module-scoped)
skip the test with the reason when the binaries are missing; each stops its server after.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from gatewayutil import free_port

PG_BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def postgres_bin_dir() -> str | None:
    for d in PG_BIN_DIRS:
        if os.path.exists(os.path.join(d, "postgres")) and os.path.exists(
            os.path.join(d, "initdb")
        ):
            return d
    found = shutil.which("postgres")
    return os.path.dirname(found) if found and shutil.which("initdb") else None


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(proc: subprocess.Popen[bytes], port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        if _port_open(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class RedisServer:
    def __init__(self) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="smg-test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--protected-mode",
            "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.proc, self.port, 10.0, "redis-server")

    def kill(self) -> None:
        """Gone at once, as a crash: every client connection is reset."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    def __init__(self) -> None:
        bindir = postgres_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, postgres) not installed")
        self.bindir = bindir
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="smg-test-pg-")
        self.data = os.path.join(self.dir, "data")
        # postgres refuses to run as root; nobody owns the cluster then.
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "nobody"
            os.chown(self.dir, pwd.getpwnam("nobody").pw_uid, -1)
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                os.path.join(bindir, "initdb"),
                "-D",
                self.data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            user=self.user,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        args = [
            os.path.join(self.bindir, "postgres"),
            "-D",
            self.data,
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            self.dir,
            "-F",
            "-c",
            "max_connections=100",
        ]
        self.proc = subprocess.Popen(
            args, user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_port(self.proc, self.port, 30.0, "postgres")
        # Listening comes before accepting connections (start-up recovery): wait for a login.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [os.path.join(self.bindir, "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not accept connections within 30s")

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT): the postmaster and every backend quit at once, as a crash."""
        _stop(self.proc, signal.SIGQUIT)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server
