"""Start mock SGLang/vLLM workers (`smg mock-worker`) in a subprocess, for tests.

Ports are picked safely: the mock is run with `--port 0`, binds one ephemeral port per
worker itself and prints `MOCK_WORKER_URL http://127.0.0.1:PORT` lines once every
listener is bound; we read those, then wait until each worker answers /health (any
status: a worker started with --health-fail answers 503).

    with mockutil.start_mock_workers(3, "--ttft-ms", "5") as mocks:
        url = mocks.urls[0]
        mockutil.set_config(url, error_rate=1.0)
        ...

The process is stopped on leaving the `with` block (or by calling `stop()`).
"""

from __future__ import annotations

import http.client
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

URL_PREFIX = "MOCK_WORKER_URL "


class MockWorkers:
    """A running mock-worker process and the URLs of its workers."""

    def __init__(
        self, proc: subprocess.Popen[bytes], urls: list[str], reader: threading.Thread
    ) -> None:
        self.proc = proc
        self.urls = urls
        self._reader = reader

    @property
    def url(self) -> str:
        return self.urls[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.urls)

    def __enter__(self) -> MockWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate (then kill) the process; returns its exit code."""
        return stop_with_reader(self.proc, self._reader, timeout)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """Terminate `proc` unless it has ended, kill it past `timeout`; returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def stop_with_reader(
    proc: subprocess.Popen[bytes], reader: threading.Thread, timeout: float = 5.0
) -> int | None:
    """Terminate (then kill) a mock whose stdout `reader` drains; returns its exit code."""
    stop_process(proc, timeout)
    reader.join(timeout)  # it ends at EOF, so the pipe is not closed under it
    if proc.stdout is not None and not reader.is_alive():
        proc.stdout.close()
    return proc.returncode


def mock_command(count: int, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "smg", "mock-worker", "--port", "0", "--count", str(count), *args]


def read_lines(stream: Any, out: queue.Queue[str | None]) -> None:
    """A reader thread's body: each line of a mock's stdout into `out`, None at EOF."""
    for raw in iter(stream.readline, b""):
        out.put(raw.decode("utf-8", "replace"))
    out.put(None)


def start_reader(proc: subprocess.Popen[bytes]) -> tuple[queue.Queue[str | None], threading.Thread]:
    """A daemon thread draining `proc`'s stdout into a queue of lines (None at EOF)."""
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    return lines, reader


def next_line(
    lines: queue.Queue[str | None],
    proc: subprocess.Popen[bytes],
    deadline: float,
    late: str,
    who: str,
) -> str:
    """The mock's next stdout line; RuntimeError(`late`) past `deadline`, or when it exits."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(late)
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"{who} exited early (code {proc.wait()})")
        return line


def start_mock_workers(
    count: int = 1, *args: str, timeout: float = 15.0, engine: str | None = None
) -> MockWorkers:
    """Start `count` workers in one process; extra CLI `args` are passed through."""
    argv = list(args) if engine is None else ["--engine", engine, *args]
    proc = subprocess.Popen(mock_command(count, argv), stdout=subprocess.PIPE)
    lines, reader = start_reader(proc)
    mocks = MockWorkers(proc, [], reader)
    deadline = time.monotonic() + timeout
    try:
        while len(mocks.urls) < count:
            late = f"mock worker printed {len(mocks.urls)}/{count} URLs in time"
            line = next_line(lines, proc, deadline, late, "mock worker")
            if line.startswith(URL_PREFIX):
                mocks.urls.append(line[len(URL_PREFIX) :].strip())
        for url in mocks.urls:
            wait_answering(url, deadline)
    except BaseException:
        mocks.stop()
        raise
    return mocks


def wait_answering(url: str, deadline: float) -> None:
    """Poll /health until the worker answers with any HTTP status."""
    while True:
        try:
            request("GET", url + "/health", timeout=1.0)
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def request(
    method: str,
    url: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection: (status, lower-cased headers, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = dict(headers or {})
        if isinstance(body, dict):
            hdrs.setdefault("Content-Type", "application/json")
        target = parts.path + ("?" + parts.query if parts.query else "")
        conn.request(method, target or "/", body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def request_json(
    method: str,
    url: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    status, _, data = request(method, url, body, headers, timeout)
    return status, json.loads(data) if data else None


def stats(url: str) -> dict[str, Any]:
    status, data = request_json("GET", url + "/mock/stats")
    assert status == 200, data
    return data


def set_config(url: str, **fields: Any) -> dict[str, Any]:
    status, data = request_json("POST", url + "/mock/config", fields)
    assert status == 200, data
    return data["config"]


def reset_stats(url: str) -> None:
    status, _ = request_json("POST", url + "/mock/reset", b"")
    assert status == 200


def wait_for(predicate: Any, timeout: float = 3.0, interval: float = 0.02) -> Any:
    """Poll `predicate()` until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
