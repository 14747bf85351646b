"""No request can take a data-plane process down: malformed bytes on raw sockets."""

from __future__ import annotations

import random
import socket
import time

import httpx
from gatewayutil import Gateway, in_flight_total

CASES: list[bytes] = [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"mod',
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 4\r\n\r\nnull",
    b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12\r\n\r\n{"model":42}',
    b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 14\r\n\r\n{"stream":"x"}',
    b"GET /workers/not-a-uuid HTTP/1.1\r\n\r\n",
    b"DELETE /workers HTTP/1.1\r\n\r\n",
    b"PATCH /workers/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\nContent-Length: 1\r\n\r\n{",
    b'POST /workers HTTP/1.1\r\nContent-Length: 9\r\n\r\n{"url":1}',
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"GET /liveness HTTP/1.1\r\n" + b"X-Long: " + b"b" * 70000 + b"\r\n\r\n",
]


def _send(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        chunks = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_malformed_requests_never_kill_a_process() -> None:
    gw = Gateway(["--mock-workers", "1"], processes=2)
    gw.start()
    try:
        gw.wait_ready()
        rng = random.Random(7)
        payloads = list(CASES)
        payloads += [
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(60)
        ]
        # Valid heads with random bodies and truncations.
        for _ in range(60):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            head = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            payloads.append((head + body)[: rng.randrange(1, len(head) + len(body) + 1)])
        for payload in payloads:
            answer = _send(gw.port, payload)
            if answer:
                status = int(answer.split(b" ", 2)[1])
                assert 400 <= status < 600 or status == 200, answer[:200]
        assert gw.process is not None and gw.process.poll() is None
        # Every process still serves, and nothing is left counted in flight.
        seen: set[str] = set()
        for _ in range(200):
            with httpx.Client(base_url=gw.url, timeout=5) as client:
                response = client.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}]},
                )
            assert response.status_code == 200
            seen.add(response.headers["x-smg-process"])
            if len(seen) == 2:
                break
        assert seen == {"0", "1"}
        assert in_flight_total(gw) == 0
        logs = gw.logs()
        # Bad input is answered, not caught by the last-resort handlers.
        assert "request failed" not in logs, logs[-3000:]
        assert "request handling failed" not in logs, logs[-3000:]
        assert "crashed" not in logs, logs[-3000:]
    finally:
        gw.stop()
        gw.close_log()
