"""A hand-written HTTP/1.1 worker for fault injection, on 127.0.0.1 (threads, raw sockets).

Each accepted connection is served by a thread that reads requests (head, then a
Content-Length body). GET /health and /v1/models are answered normally; every POST goes to
the test's `script(worker, sock, conn_no, req_no)`, which writes whatever bytes it likes
and returns False to stop serving that connection. The worker counts what it saw.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import orjson

MODELS = orjson.dumps({"object": "list", "data": [{"id": "raw-model", "owned_by": "sglang"}]})
CHAT_BODY = {"model": "raw-model", "messages": [{"role": "user", "content": "hi"}]}

Script = Callable[["FaultWorker", socket.socket, int, int], bool]


def answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b" % (
        status,
        len(body),
        extra,
        body,
    )


class FaultWorker:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.lock = threading.Lock()
        self.connections = 0  # accepted connections (the control plane's GETs included)
        self.post_connections: set[int] = set()  # those that carried a POST
        self.posting_now = 0
        self.max_posting = 0  # most POST-carrying connections open at once
        self.posts = 0  # POST requests fully read
        self.eofs: list[int] = []  # POST-carrying connections the gateway closed (EOF seen)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> FaultWorker:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accepter.join(5)
        self.listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            thread = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(0.2)
        buffer = b""
        served = 0
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        if self._stop.is_set():
                            return
                        continue
                    if not chunk:
                        with self.lock:
                            if number in self.post_connections:
                                self.eofs.append(number)
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split()[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buffer) < length:
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer[length:]
                if method != b"POST":
                    body = MODELS if path == b"/v1/models" else b""
                    sock.sendall(answer(body, 200 if path in (b"/v1/models", b"/health") else 404))
                    continue
                served += 1
                with self.lock:
                    self.posts += 1
                    if served == 1:
                        self.post_connections.add(number)
                        self.posting_now += 1
                        self.max_posting = max(self.max_posting, self.posting_now)
                if not self.script(self, sock, number, served):
                    return
        except OSError:
            return
        finally:
            with self.lock:
                if number in self.post_connections:
                    self.posting_now -= 1
            sock.close()


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashing engine does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the gateway and read until it closes (or `timeout`)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                return received
            received += chunk
        raise AssertionError(f"connection still open after {timeout} s; got {received[:500]!r}")


def parse_head(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (each line must be one well-formed field) and the rest."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep and name and name == name.strip() and " " not in name, line
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value.strip()
    return status, headers, rest
