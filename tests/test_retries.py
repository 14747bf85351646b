"""Retries, the SSE error ending and SSE keep-alive, end to end: real `smg launch`
processes on loopback in front of mock workers (`smg mock-worker`) and hand-written
fault-injecting workers (`upstreamfault`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import mockutil
import openai
import orjson
import pytest
from gatewayutil import Gateway, free_port, in_flight_total
from upstreamfault import CHAT_BODY, FaultWorker, answer, parse_head, raw_exchange, reset

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
BUSY = b'{"error":{"message":"worker busy","type":"server_error","code":"busy"}}'


def metric_sum(gw: Gateway, name: str, *label_parts: str) -> float:
    """The sum of `name`'s series (over processes) whose labels contain every part."""
    total = 0.0
    for line in gw.metrics().splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(part in line for part in label_parts):
            total += float(line.rsplit(" ", 1)[1])
    return total


def gateway(urls: list[str], *extra: str, processes: int = 1) -> Gateway:
    gw = Gateway(
        ["--worker-urls", *urls, "--policy", "round_robin", "--disable-health-check", *extra],
        processes=processes,
    )
    gw.start()
    try:
        gw.wait_ready()
    except BaseException:
        gw.stop()
        gw.close_log()
        raise
    return gw


def stop(gw: Gateway) -> None:
    gw.stop()
    gw.close_log()


def always_503(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
    sock.sendall(answer(BUSY, 503))
    return True


def post_raw(port: int, body: bytes, path: str = CHAT, extra: bytes = b"") -> bytes:
    request = (
        b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n%b\r\n%b"
        % (path.encode(), len(body), extra, body)
    )
    return raw_exchange(port, request, timeout=20.0)


def chats(url: str) -> int:
    """Chat requests a mock worker received."""
    return int(mockutil.stats(url)["requests_by_route"].get(CHAT, 0))


def wait_idle(gw: Gateway, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while in_flight_total(gw) != 0:
        assert time.monotonic() < deadline, "in-flight count never went back to 0"
        time.sleep(0.05)


@pytest.fixture
def raw_good() -> Iterator[mockutil.MockWorkers]:
    """A healthy mock worker serving the fault worker's model name."""
    with mockutil.start_mock_workers(1, "--model", "raw-model") as mocks:
        yield mocks


# --- (1) a retryable status goes to another worker ---------------------------------------------


def test_503_is_retried_on_the_other_worker(raw_good: mockutil.MockWorkers) -> None:
    with FaultWorker(always_503) as bad:
        gw = gateway([bad.url, raw_good.url])
        try:
            with httpx.Client(base_url=gw.url, timeout=20.0) as client:
                answers = [client.post(CHAT, json=CHAT_BODY) for _ in range(6)]
            assert [a.status_code for a in answers] == [200] * 6
            assert all(a.json()["choices"] for a in answers)
            # Every try the bad worker got was retried once, on the good worker (the
            # failed one is left out of the retry's choice).
            assert bad.posts >= 1
            assert chats(raw_good.url) == 6
            retries = metric_sum(gw, "smg_worker_retries_total", 'endpoint="chat"')
            assert retries == bad.posts
            assert metric_sum(gw, "smg_worker_retries_exhausted_total") == 0
            assert metric_sum(gw, "smg_worker_retry_backoff_seconds_count") == bad.posts
            wait_idle(gw)
        finally:
            stop(gw)


def test_disable_retries_relays_the_503(raw_good: mockutil.MockWorkers) -> None:
    with FaultWorker(always_503) as bad:
        gw = gateway([bad.url, raw_good.url], "--disable-retries")
        try:
            with httpx.Client(base_url=gw.url, timeout=20.0) as client:
                answers = [client.post(CHAT, json=CHAT_BODY) for _ in range(4)]
            assert sorted(a.status_code for a in answers) == [200, 200, 503, 503]
            relayed = [a for a in answers if a.status_code == 503]
            assert all(a.content == BUSY for a in relayed)  # the worker's own answer
            assert bad.posts == 2
            assert metric_sum(gw, "smg_worker_retries_total") == 0
        finally:
            stop(gw)


# --- (2) every worker failing: the final status after exactly max attempts -----------------------


@pytest.mark.parametrize(("flag", "attempts"), [(None, 5), ("3", 3), ("1", 1)])
def test_all_failing_relays_the_final_status_after_max_attempts(
    flag: str | None, attempts: int
) -> None:
    with FaultWorker(always_503) as one, FaultWorker(always_503) as two:
        extra = ["--retry-initial-backoff-ms", "10"]
        if flag is not None:
            extra += ["--retry-max-retries", flag]
        gw = gateway([one.url, two.url], *extra)
        try:
            raw = post_raw(gw.port, orjson.dumps(CHAT_BODY))
            status, headers, body = parse_head(raw)
            assert status == 503
            assert body == BUSY
            assert "x-smg-error-code" not in headers  # relayed, not the gateway's own
            assert one.posts + two.posts == attempts
            if attempts > 1:
                assert one.posts >= 1 and two.posts >= 1  # alternates: the failed one is left out
            assert metric_sum(gw, "smg_worker_retries_total") == attempts - 1
            # Counted with retries on, --retry-max-retries 1 included (as SMG does).
            assert metric_sum(gw, "smg_worker_retries_exhausted_total") == 1
            wait_idle(gw)
        finally:
            stop(gw)


def test_backoff_grows_between_attempts() -> None:
    """50 ms, x2, no jitter: 3 retries wait 50 + 100 + 200 ms in all."""
    with FaultWorker(always_503) as bad:
        gw = gateway(
            [bad.url],
            "--retry-max-retries",
            "4",
            "--retry-initial-backoff-ms",
            "50",
            "--retry-backoff-multiplier",
            "2",
            "--retry-jitter-factor",
            "0",
        )
        try:
            started = time.monotonic()
            status, _h, _b = parse_head(post_raw(gw.port, orjson.dumps(CHAT_BODY)))
            elapsed = time.monotonic() - started
            assert status == 503
            assert bad.posts == 4
            assert 0.35 <= elapsed < 3.0, elapsed
            text = gw.metrics()
            for number, seconds in (("1", 0.05), ("2", 0.1), ("3", 0.2)):
                line = f'smg_worker_retry_backoff_seconds_sum{{process="0",attempt="{number}"}}'
                assert f"{line} {seconds}" in text, text
        finally:
            stop(gw)


# --- transport failures before the head ----------------------------------------------------------


def test_reset_before_the_head_is_retried(raw_good: mockutil.MockWorkers) -> None:
    def reset_at_once(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        reset(sock)
        return False

    with FaultWorker(reset_at_once) as bad:
        gw = gateway([bad.url, raw_good.url])
        try:
            with httpx.Client(base_url=gw.url, timeout=20.0) as client:
                statuses = [client.post(CHAT, json=CHAT_BODY).status_code for _ in range(4)]
            assert statuses == [200] * 4
            assert bad.posts >= 1
            assert metric_sum(gw, "smg_worker_retries_total") == bad.posts
            wait_idle(gw)
        finally:
            stop(gw)


def test_refused_connection_goes_elsewhere_at_once(raw_good: mockutil.MockWorkers) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway([dead, raw_good.url], "--retry-initial-backoff-ms", "2000")
    try:
        with httpx.Client(base_url=gw.url, timeout=20.0) as client:
            started = time.monotonic()
            statuses = [
                client.post(CHAT, json={"messages": MESSAGES}).status_code for _ in range(4)
            ]
            elapsed = time.monotonic() - started
        assert statuses == [200] * 4
        assert elapsed < 1.5, elapsed  # no 2 s backoff: a refusal reached no worker
        retries = metric_sum(gw, "smg_worker_retries_total")
        assert retries >= 1
        # Every one of them without a backoff.
        assert metric_sum(gw, "smg_worker_retry_backoff_seconds_bucket", 'le="0.001"') == retries
    finally:
        stop(gw)


# --- (3) one of three workers killed under steady load -------------------------------------------


def test_killed_worker_under_load_fails_no_request() -> None:
    workers = [mockutil.start_mock_workers(1, "--ttft-ms", "20") for _ in range(3)]
    try:
        gw = gateway([w.url for w in workers], processes=2)
        try:
            client = openai.OpenAI(
                base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20.0
            )
            failures: list[str] = []
            done = [0]
            lock = threading.Lock()
            stop_at = time.monotonic() + 5.0

            def load() -> None:
                while time.monotonic() < stop_at:
                    try:
                        chat = client.chat.completions.create(model="mock-model", messages=MESSAGES)
                        assert chat.choices[0].message.content
                    except Exception as exc:  # every failure is recorded, then asserted
                        with lock:
                            failures.append(repr(exc))
                    with lock:
                        done[0] += 1

            threads = [threading.Thread(target=load) for _ in range(6)]
            for thread in threads:
                thread.start()
            time.sleep(1.5)
            workers[1].proc.kill()  # SIGKILL: connections reset, then refused
            workers[1].proc.wait(5)
            for thread in threads:
                thread.join(30)
            assert not any(thread.is_alive() for thread in threads)
            assert done[0] >= 30, done[0]
            assert failures == []
            assert metric_sum(gw, "smg_worker_retries_total") >= 1
            wait_idle(gw)
        finally:
            stop(gw)
    finally:
        for worker in workers:
            worker.stop()


# --- (4) a stream whose worker dies after its head -----------------------------------------------

_EVENT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"raw-model",'
    b'"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
)


def dies_mid_stream(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
    sock.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    sock.sendall(b"%x\r\n%b\r\n" % (len(_EVENT), _EVENT))
    time.sleep(0.2)
    reset(sock)
    return False


def test_stream_cut_by_the_worker_ends_with_an_error_event() -> None:
    with FaultWorker(dies_mid_stream) as worker:
        gw = gateway([worker.url])
        try:
            body = orjson.dumps({**CHAT_BODY, "stream": True})
            started = time.monotonic()
            status, headers, rest = parse_head(post_raw(gw.port, body))
            assert time.monotonic() - started < 5.0
            assert status == 200
            assert headers["transfer-encoding"] == "chunked"
            assert rest.endswith(b"0\r\n\r\n")  # a proper chunked end
            data = _dechunk(rest)
            events = [e for e in data.split(b"\n\n") if e]
            assert events[0] == _EVENT.strip()
            error = orjson.loads(events[1].removeprefix(b"data: "))
            assert error["error"]["code"] == "upstream_connection_closed"
            assert error["error"]["type"] == "stream_error"  # as SMG 1.13 sends it
            assert error["error"]["message"]
            assert events[2:] == [b"data: [DONE]"]
            assert worker.posts == 1  # never retried: the client had the head
            assert (
                metric_sum(
                    gw, "smg_http_responses_total", 'status_code="200"', 'error_code="stream_error"'
                )
                == 1
            )
            wait_idle(gw)

            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
            stream = client.chat.completions.create(
                model="raw-model", messages=MESSAGES, stream=True
            )
            with pytest.raises(openai.APIError) as caught:
                list(stream)
            # The error event itself, not a cut connection (APIConnectionError subclasses it).
            assert type(caught.value) is openai.APIError
            assert caught.value.code == "upstream_connection_closed"
        finally:
            stop(gw)


def test_stream_cut_on_messages_ends_with_anthropic_error_event() -> None:
    with FaultWorker(dies_mid_stream) as worker:
        gw = gateway([worker.url])
        try:
            body = orjson.dumps({**CHAT_BODY, "stream": True, "max_tokens": 5})
            status, _headers, rest = parse_head(post_raw(gw.port, body, "/v1/messages"))
            assert status == 200
            assert rest.endswith(b"0\r\n\r\n")
            events = [e for e in _dechunk(rest).split(b"\n\n") if e]
            assert events[0] == _EVENT.strip()
            kind, _, data = events[1].partition(b"\n")
            assert kind == b"event: error"
            error = orjson.loads(data.removeprefix(b"data: "))
            assert error["type"] == "error"
            assert error["error"]["type"] == "api_error"
            assert len(events) == 2  # no [DONE] in Anthropic's protocol
        finally:
            stop(gw)


def test_killed_mock_worker_ends_its_stream_with_the_error_event() -> None:
    with mockutil.start_mock_workers(1, "--itl-ms", "100", "--output-len", "100") as mock:
        gw = gateway([mock.url])
        try:
            client = openai.OpenAI(
                base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20.0
            )
            stream = client.chat.completions.create(
                model="mock-model", messages=MESSAGES, stream=True
            )
            started = time.monotonic()
            chunks = 0
            with pytest.raises(openai.APIError) as caught:
                for _chunk in stream:
                    chunks += 1
                    if chunks == 2:
                        mock.proc.kill()
            assert type(caught.value) is openai.APIError
            assert time.monotonic() - started < 10.0
            wait_idle(gw)
        finally:
            stop(gw)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2 :]
    raise AssertionError("no last chunk")


# --- (5) bodies over --max-buffered-request-bytes are sent once ----------------------------------


def _big_body(size: int) -> bytes:
    return orjson.dumps({**CHAT_BODY, "messages": [{"role": "user", "content": "x" * size}]})


def test_body_over_the_buffer_limit_is_not_retried_after_a_503() -> None:
    with FaultWorker(always_503) as bad:
        gw = gateway([bad.url], "--max-buffered-request-bytes", "1024")
        try:
            status, _h, body = parse_head(post_raw(gw.port, _big_body(4000)))
            assert status == 503 and body == BUSY
            assert bad.posts == 1  # written once, never again
            status, _h, _b = parse_head(post_raw(gw.port, _big_body(100)))
            assert status == 503
            assert bad.posts == 1 + 5  # a small body is kept and retried
            wait_idle(gw)
        finally:
            stop(gw)


def test_body_over_the_buffer_limit_still_skips_a_refused_worker(
    raw_good: mockutil.MockWorkers,
) -> None:
    """Nothing was written to a refused connection: the large body can go elsewhere."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway([dead, raw_good.url], "--max-buffered-request-bytes", "1024")
    try:
        body = orjson.dumps({"messages": [{"role": "user", "content": "x" * 4000}]})
        statuses = [parse_head(post_raw(gw.port, body))[0] for _ in range(4)]
        assert statuses == [200] * 4
        assert chats(raw_good.url) == 4
    finally:
        stop(gw)


# --- (6) SSE keep-alive --------------------------------------------------------------------------


def _read_stream(port: int, body: bytes, path: str = CHAT, seconds: float = 15.0) -> bytes:
    """A streaming request on a raw socket: everything until the last chunk."""
    request = (
        b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (path.encode(), len(body), body)
    )
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(request)
        received = b""
        while not _body_done(received):
            assert time.monotonic() < deadline, received[-300:]
            chunk = sock.recv(65536)
            assert chunk, received[-300:]
            received += chunk
    return received


def _body_done(received: bytes) -> bool:
    """The chunked body after the head has its last chunk."""
    _head, sep, body = received.partition(b"\r\n\r\n")
    return bool(sep) and (body == b"0\r\n\r\n" or body.endswith(b"\r\n0\r\n\r\n"))


def test_sse_keepalive_after_silence_and_none_while_frames_flow() -> None:
    with mockutil.start_mock_workers(1, "--ttft-ms", "2600", "--output-len", "3") as mock:
        gw = gateway([mock.url], "--sse-keepalive-secs", "1")
        try:
            body = orjson.dumps({"model": "mock-model", "messages": MESSAGES, "stream": True})
            _status, _h, rest = parse_head(_read_stream(gw.port, body))
            data = _dechunk(rest)
            before_first, _, after = data.partition(b"data: ")
            pings = before_first.count(b": ping\n\n")
            assert 1 <= pings <= 3, data[:200]
            assert before_first == b": ping\n\n" * pings  # whole frames, between events
            assert b": ping" not in after  # frames flowed after the first token
            assert data.endswith(b"data: [DONE]\n\n")

            # Frames every 300 ms for 3 s: never 1 s of silence, never a ping.
            headers = b"x-mock-ttft-ms: 0\r\nx-mock-itl-ms: 300\r\nx-mock-output-len: 10\r\n"
            request = (
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b"
                % (len(body), headers, body)
            )
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as sock:
                sock.sendall(request)
                received = b""
                while not _body_done(received):
                    chunk = sock.recv(65536)
                    assert chunk
                    received += chunk
            assert time.monotonic() - started > 2.5  # long enough for pings, were it quiet
            flowing = _dechunk(parse_head(received)[2])
            assert flowing.count(b"data: ") >= 10
            assert flowing.endswith(b"data: [DONE]\n\n")
            assert b": ping" not in flowing
        finally:
            stop(gw)


def test_sse_keepalive_on_messages_is_the_ping_event() -> None:
    def slow_stream(worker: FaultWorker, sock: socket.socket, conn: int, req: int) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        time.sleep(1.8)
        event = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        sock.sendall(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
        return True

    with FaultWorker(slow_stream) as worker:
        gw = gateway([worker.url], "--sse-keepalive-secs", "1")
        try:
            body = orjson.dumps({**CHAT_BODY, "stream": True, "max_tokens": 5})
            _s, _h, rest = parse_head(_read_stream(gw.port, body, "/v1/messages"))
            data = _dechunk(rest)
            assert data.startswith(b'event: ping\ndata: {"type":"ping"}\n\n')
            assert data.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        finally:
            stop(gw)


# --- (7) 4xx answers are never retried -----------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_are_never_retried(status: int) -> None:
    with mockutil.start_mock_workers(2) as mocks:
        gw = gateway(list(mocks.urls))
        try:
            body = orjson.dumps({"model": "mock-model", "messages": MESSAGES})
            got, _h, _b = parse_head(
                post_raw(gw.port, body, extra=b"x-mock-status: %d\r\n" % status)
            )
            assert got == status
            seen = sum(chats(url) for url in mocks.urls)
            assert seen == 1
            assert metric_sum(gw, "smg_worker_retries_total") == 0
        finally:
            stop(gw)
