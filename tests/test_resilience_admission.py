"""Global admission control end to end: real `smg launch` processes on loopback in front of
a mock worker; load from raw asyncio HTTP/1.1 keep-alive connections (bounded in count and
time). The limits hold for the gateway as a whole, checked by the mock's own peak
concurrency counter and by the count of admitted requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator

import orjson
import psutil
import pytest

from tests import mockutil
from tests.gatewayutil import Gateway

CHAT = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def mock() -> Iterator[str]:
    with mockutil.start_mock_workers(1) as workers:
        yield workers.url


def configure(mock: str, ttft_ms: int) -> None:
    """Every test sets the mock's timing it needs (the mock is shared by the module)."""
    mockutil.set_config(mock, ttft_ms=ttft_ms, itl_ms=0, output_len=16)


@contextlib.contextmanager
def gateway(worker: str, *flags: str, processes: int = 4) -> Iterator[Gateway]:
    gw = Gateway(["--worker-urls", worker, *flags], processes=processes)
    gw.start()
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()
        gw.close_log()


# --- a small raw HTTP/1.1 client ------------------------------------------------------------


Answer = tuple[int, dict[str, str], bytes]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
) -> Answer:
    writer.write(
        b"POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    data = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, data


async def _connection(port: int, count: int, until: float, out: list[tuple[float, int]]) -> None:
    """Up to `count` requests one after another on one keep-alive connection, none started
    after `until`; appends (completion time, status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            if time.monotonic() >= until:
                break
            status, _, _ = await _exchange(reader, writer, "/v1/chat/completions", CHAT)
            out.append((time.monotonic(), status))
    finally:
        writer.close()


def load(
    port: int, connections: int, per_connection: int, seconds: float
) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    until = time.monotonic() + seconds

    async def main() -> None:
        tasks = [_connection(port, per_connection, until, out) for _ in range(connections)]
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)

    asyncio.run(main())
    return out


def one(port: int, path: str = "/v1/chat/completions", body: bytes = CHAT) -> Answer:
    async def main() -> Answer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(_exchange(reader, writer, path, body), 30)
        finally:
            writer.close()

    return asyncio.run(main())


def send_only(port: int, body: bytes = CHAT) -> socket.socket:
    """A request whose answer is read later (or never: close the socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def metric(gw: Gateway, name: str, label: str = "") -> float:
    """A series' value summed over its label sets (process="i" and others) that have
    `label` (e.g. 'result="allowed"')."""
    total = 0.0
    found = False
    for line in gw.metrics().splitlines():
        if (line.startswith(name + " ") or line.startswith(name + "{")) and label in line:
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} missing from /metrics"
    return total


def wait_metric(gw: Gateway, name: str, value: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = metric(gw, name)
        if seen == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} is {seen}, not {value}, after {timeout} s")


# --- tests ---------------------------------------------------------------------------------


def test_concurrency_limit_holds_for_the_gateway(mock: str) -> None:
    configure(mock, 200)
    with gateway(mock, "--max-concurrent-requests", "50") as gw:
        mockutil.reset_stats(mock)
        answers = load(gw.port, connections=64, per_connection=6, seconds=30)
        stats = mockutil.stats(mock)
        print(f"limit 50, 4 processes, 64 connections: mock peak {stats['peak_in_flight']}")
        assert Counter(status for _, status in answers) == {200: 64 * 6}  # none lost
        assert stats["inference_answered"] == 64 * 6
        # Never above the limit, and the limit was binding (64 clients, 4 processes).
        assert 40 <= stats["peak_in_flight"] <= 50, stats["peak_in_flight"]
        assert metric(gw, "smg_admission_queued_total") >= 14  # the excess waited
        assert metric(gw, "smg_http_rate_limit_total", 'result="allowed"') >= 64 * 6
        wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
        wait_metric(gw, "smg_gateway_admission_queue_depth", 0, 5.0)


def test_queue_full_429_and_queue_timeout_503_as_smg(mock: str) -> None:
    configure(mock, 3000)
    flags = ("--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "1")
    with gateway(mock, *flags, processes=2) as gw:
        holder = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_inflight", 1, 5.0)
        queued = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
        started = time.monotonic()
        status, headers, body = one(gw.port)
        assert status == 429
        assert headers["x-smg-error-code"] == "admission_queue_full"
        assert headers["retry-after"] == "2"
        assert orjson.loads(body) == {
            "error": {
                "type": "rate_limit_error",
                "code": "admission_queue_full",
                "message": "admission queue is at capacity",
                "param": None,
            }
        }
        status, head = read_status(queued)
        waited = time.monotonic() - started
        # The Rust SMG 1.13 answers a queue timeout 503 admission_queue_timeout.
        assert status == 503, head
        assert b"x-smg-error-code: admission_queue_timeout\r\n" in head
        assert b"retry-after: 2\r\n" in head
        assert b'"message":"timed out waiting for an admission slot"' in head
        assert 0.5 <= waited <= 3.0, waited
        # /v1/messages refusals take Anthropic's shape.
        queued2 = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
        messages = orjson.dumps(
            {"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        )
        status, headers, body = one(gw.port, "/v1/messages", messages)
        assert status == 429
        parsed = orjson.loads(body)
        assert parsed["type"] == "error"
        assert parsed["error"] == {
            "type": "rate_limit_error",
            "message": "admission queue is at capacity",
        }
        assert read_status(queued2)[0] == 503
        assert read_status(holder)[0] == 200
        for sock in (holder, queued, queued2):
            sock.close()
        wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
        assert metric(gw, "smg_admission_queue_rejected_total") == 4  # 2 full + 2 timeouts


def test_queue_size_zero_answers_429_at_once(mock: str) -> None:
    configure(mock, 2000)
    with gateway(mock, "--max-concurrent-requests", "1", "--queue-size", "0", processes=2) as gw:
        holder = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_inflight", 1, 5.0)
        status, headers, body = one(gw.port)
        assert status == 429
        assert headers["x-smg-error-code"] == "admission_queue_full"
        assert orjson.loads(body)["error"]["message"] == (
            "concurrency limit reached and queuing is disabled"
        )
        assert read_status(holder)[0] == 200
        holder.close()


def test_a_client_that_leaves_the_queue_frees_its_place(mock: str) -> None:
    configure(mock, 3000)
    flags = ("--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "30")
    with gateway(mock, *flags, processes=2) as gw:
        holder = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_inflight", 1, 5.0)
        leaver = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
        leaver.close()
        wait_metric(gw, "smg_gateway_admission_queue_depth", 0, 2.0)
        # Its place is free: the next request waits (and is admitted) instead of a 429.
        waiting = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
        assert read_status(holder)[0] == 200
        assert read_status(waiting)[0] == 200
        for sock in (holder, waiting):
            sock.close()
        wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
        assert metric(gw, "smg_admission_queue_cancelled_total") == 1


@pytest.mark.parametrize("connections", [64, 1])
def test_rate_limit_is_gateway_wide(mock: str, connections: int) -> None:
    configure(mock, 0)
    flags = ("--max-concurrent-requests", "50", "--rate-limit-tokens-per-second", "100")
    with gateway(mock, *flags) as gw:
        seconds = 20.0
        started = time.monotonic()
        answers = load(gw.port, connections, per_connection=10_000, seconds=seconds)
        ok = [at for at, status in answers if status == 200 and at - started <= seconds]
        assert Counter(status for _, status in answers) == {200: len(answers)}
        # 100/s, plus the burst of 50 at the start.
        rate = (len(ok) - 50) / seconds
        print(f"rate limit 100/s over {connections} connection(s): {len(ok)} in {seconds} s")
        assert 90 <= rate <= 110, (len(ok), rate)


def _holders(gw: Gateway) -> dict[int, int]:
    """pid -> client connections it serves, for each data-plane process."""
    assert gw.process is not None
    found: dict[int, int] = {}
    for child in psutil.Process(gw.process.pid).children():
        for conn in child.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == gw.port:
                found[child.pid] = found.get(child.pid, 0) + 1
    return found


def test_a_killed_process_gives_its_permits_back(mock: str) -> None:
    configure(mock, 3000)
    with gateway(mock, "--max-concurrent-requests", "50") as gw:
        socks = [send_only(gw.port) for _ in range(40)]
        wait_metric(gw, "smg_gateway_admission_inflight", 40, 10.0)
        holders = _holders(gw)
        victim, held = max(holders.items(), key=lambda item: item[1])
        assert held > 0
        os.kill(victim, signal.SIGKILL)
        # The supervisor returns the dead process's permits; the rest finish theirs.
        wait_metric(gw, "smg_gateway_admission_inflight", 40 - held, 3.0)
        statuses = Counter()
        for sock in socks:
            with contextlib.suppress(AssertionError, OSError):
                statuses[read_status(sock)[0]] += 1
            sock.close()
        assert statuses[200] == 40 - held
        wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)
        # The full limit is usable again: 50 requests at once all get in.
        configure(mock, 500)
        gw.wait_ready()
        mockutil.reset_stats(mock)
        answers = load(gw.port, connections=50, per_connection=1, seconds=20)
        assert Counter(status for _, status in answers) == {200: 50}
        assert mockutil.stats(mock)["peak_in_flight"] == 50


def test_a_stream_holds_its_permit_until_its_last_byte(mock: str) -> None:
    mockutil.set_config(mock, ttft_ms=0, itl_ms=150, output_len=10)  # about 1.4 s of stream
    flags = ("--max-concurrent-requests", "1", "--queue-timeout-secs", "30")
    with gateway(mock, *flags, processes=2) as gw:
        stream = orjson.dumps(
            {
                "model": "mock-model",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
        )
        streaming = send_only(gw.port, stream)
        status, head = read_status(streaming)
        assert status == 200 and b"text/event-stream" in head
        # Its first frames are out, the stream goes on: the permit is still held.
        assert metric(gw, "smg_gateway_admission_inflight") == 1
        waiting = send_only(gw.port)
        wait_metric(gw, "smg_gateway_admission_queue_depth", 1, 5.0)
        started = time.monotonic()
        rest = b""
        while b"data: [DONE]" not in rest:
            chunk = streaming.recv(65536)
            assert chunk
            rest += chunk
        # Only once the stream ended did the waiting request get in.
        assert read_status(waiting)[0] == 200
        assert time.monotonic() - started >= 0.5
        for sock in (streaming, waiting):
            sock.close()
        wait_metric(gw, "smg_gateway_admission_inflight", 0, 5.0)


def test_mock_peak_in_flight_counts_and_resets(mock: str) -> None:
    configure(mock, 500)
    mockutil.reset_stats(mock)
    socks = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", int(mock.rsplit(":", 1)[1])), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
        )
        socks.append(sock)
    mockutil.wait_for(lambda: mockutil.stats(mock)["in_flight"] == 3)
    mockutil.reset_stats(mock)  # the peak restarts from what runs now
    assert mockutil.stats(mock)["peak_in_flight"] == 3
    for sock in socks:
        assert read_status(sock)[0] == 200
        sock.close()
    mockutil.reset_stats(mock)
    assert mockutil.stats(mock)["peak_in_flight"] == 0
    assert mockutil.request("POST", mock + "/v1/chat/completions", CHAT)[0] == 200
    assert mockutil.stats(mock)["peak_in_flight"] == 1
