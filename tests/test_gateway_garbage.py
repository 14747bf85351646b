"""No request can take a data-plane process down: malformed bytes on raw sockets.

Every case has its exact answer: the statuses of the answers the client gets, in order
(an empty list: the connection is closed without one, as for a request cut short).
"""

from __future__ import annotations

import contextlib
import random
import socket
import time

import httpx
from gatewayutil import Gateway, in_flight_total

CHAT = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
VALID = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
DEEP = b"[" * 1000 + b"]" * 1000

CASES: list[tuple[bytes, list[int]]] = [
    (b"\x00\x01\x02garbage\r\n\r\n", [400]),
    (b"GET / HTTP/9.9\r\n\r\n", [400]),
    (b"GET /\r\n", [400]),  # HTTP/0.9
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n", [400]),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", [400]),
    (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        [400],
    ),
    (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        [400],
    ),
    (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", [400]),
    (b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"mod', []),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", [400]),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 4\r\n\r\nnull", [400]),
    (b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12\r\n\r\n{"model":42}', [400]),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + DEEP, [400]),
    # Not a boolean: not streamed; the body reaches the worker as it is, which refuses it.
    (b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 14\r\n\r\n{"stream":"x"}', [400]),
    (b"GET /v1/chat/completions HTTP/1.1\r\n\r\n", [405]),
    (b"GET /workers/not-a-uuid HTTP/1.1\r\n\r\n", [400]),  # as the Rust SMG
    (b"DELETE /workers HTTP/1.1\r\n\r\n", [405]),
    (
        b"PATCH /workers/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\n"
        b"Content-Length: 1\r\n\r\n{",
        [404],  # no such worker (the Rust SMG parses the body first: 400)
    ),
    (b'POST /workers HTTP/1.1\r\nContent-Length: 9\r\n\r\n{"url":1}', [400]),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", [414]),
    (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", [404]),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", [404]),
    (b"GET /liveness HTTP/1.1\r\n" + b"X-Long: " + b"b" * 70000 + b"\r\n\r\n", [431]),
    (b"GET /liveness HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 201 + b"\r\n", [431]),
    (VALID + b"\x00garbage\r\n\r\n", [200, 400]),  # answers leave in request order
    (VALID + b"GET /liveness HTTP/1.1\r\n\r\n", [200, 200]),
]


def _send(port: int, payload: bytes, answers: int) -> bytes:
    """Send, then read until `answers` complete answers came or the gateway closed (or,
    when none is expected, it stayed quiet). No half-close: a client's EOF means it is gone."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        # Refused before the end of the payload: the answer is still there to read.
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        chunks = []
        deadline = time.monotonic() + 5
        # Waiting for an answer that should not come: a short quiet spell settles it.
        sock.settimeout(5.0 if answers else 0.3)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
            if answers and len(_statuses(b"".join(chunks), complete=True)) >= answers:
                break
        return b"".join(chunks)


def _statuses(answer: bytes, complete: bool = False) -> list[int]:
    """Statuses of Content-Length framed answers, in order (`complete`: whole ones only)."""
    statuses = []
    while answer:
        head, sep, rest = answer.partition(b"\r\n\r\n")
        if not sep and complete:
            break
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if complete and len(rest) < length:
            break
        statuses.append(int(lines[0].split(b" ", 2)[1]))
        answer = rest[length:]
    return statuses


def test_malformed_requests_never_kill_a_process() -> None:
    gw = Gateway(["--mock-workers", "1"], processes=2)
    gw.start()
    try:
        gw.wait_ready()
        rng = random.Random(7)
        cases = list(CASES)
        # Random bytes: never a valid request line, so a 400.
        for _ in range(60):
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            cases.append((payload, [400]))
        # Valid heads with random bodies: not JSON (400) when complete, no answer when cut.
        for _ in range(60):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            head = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            cut = rng.randrange(1, len(head) + len(body) + 1)
            cases.append(((head + body)[:cut], [400] if cut == len(head) + len(body) else []))
        for payload, expected in cases:
            answer = _send(gw.port, payload, len(expected))
            assert _statuses(answer) == expected, (payload[:120], answer[:300])
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
        assert "Traceback" not in logs, logs[-3000:]
        assert "crashed" not in logs, logs[-3000:]
    finally:
        gw.stop()
        gw.close_log()
