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


# --- the attempt bookkeeping, driven without sockets --------------------------------------------


class _FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.written.append(b"".join(parts))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _FakeConn:
    def __init__(self) -> None:
        self.transport = _FakeTransport()
        self.closed = False
        self.released: list[bool] = []
        self.aborted = False

    def bind(self, exchange: object) -> None:
        pass

    def release(self, reusable: bool) -> None:
        self.released.append(reusable)

    def abort(self) -> None:
        self.aborted = True


class _FakePool:
    def __init__(self, conn: _FakeConn) -> None:
        self.conn = conn

    def take_idle(self) -> _FakeConn:
        return self.conn

    def cancel_wait(self, exchange: object) -> None:
        pass


class _FakeLoop:
    def __init__(self) -> None:
        self.scheduled: list[tuple[float, object]] = []

    def call_soon(self, callback: object) -> object:
        self.scheduled.append((0.0, callback))
        return _Handle()

    def call_later(self, delay: float, callback: object) -> object:
        self.scheduled.append((delay, callback))
        return _Handle()

    def run_next(self) -> float:
        delay, callback = self.scheduled.pop(0)
        callback()  # type: ignore[operator]
        return delay


class _Handle:
    def cancel(self) -> None:
        pass


class _FakeApp:
    """What an Exchange asks of the data plane, counted."""

    def __init__(self, pools: list[_FakePool]) -> None:
        from smg.dataplane.metrics import DataPlaneMetrics
        from smg.dataplane.retry import RetryPolicy

        self.request_timeout = 30.0
        self.retries_on = True
        self.process_header = b"x-smg-process: 0\r\n"
        self.draining = False
        self.cors = None  # --cors-allowed-origins unset
        self.tracer = None  # --enable-trace off
        self.loop = _FakeLoop()
        self.metrics = DataPlaneMetrics()
        self.retry_policy = RetryPolicy(max_attempts=3, jitter=0.0)
        self.pools = pools
        self.attempts: list[tuple[int, int]] = []  # (row, outcome) per finished attempt
        self.finished: list[tuple[int, str]] = []
        self.dispatched: list[int] = []

    def attempt_done(self, exchange: object, outcome: int) -> None:
        self.attempts.append((exchange.row, outcome))  # type: ignore[attr-defined]

    def exchange_finished(self, exchange: object, status: int, code: str) -> None:
        if exchange.attempting:  # type: ignore[attr-defined]
            exchange.attempting = False  # type: ignore[attr-defined]
            self.attempt_done(exchange, exchange.outcome)  # type: ignore[attr-defined]
        self.finished.append((status, code))

    def has_untried_worker(self, exchange: object) -> bool:
        return True

    def next_attempt(self, exchange: object) -> None:
        row = len(self.dispatched) + 1
        self.dispatched.append(row)
        exchange.row = row  # type: ignore[attr-defined]
        exchange.pool = self.pools[row]  # type: ignore[attr-defined]
        exchange.head = b"POST / HTTP/1.1\r\n\r\n"  # type: ignore[attr-defined]


def _exchange(app: _FakeApp, client: object, body: bytes = b"{}") -> object:
    from types import SimpleNamespace

    from smg.dataplane.exchange import Exchange
    from smg.policies.base import RouteRequest

    exchange = Exchange(
        app,  # type: ignore[arg-type]
        client,  # type: ignore[arg-type]
        0,
        1,
        app.pools[0],  # type: ignore[arg-type]
        b"POST / HTTP/1.1\r\n\r\n",
        body,
        b"rid",
        CHAT,
        "m",
        False,
        True,
        False,
    )
    exchange.allow_retries(SimpleNamespace(), RouteRequest(), 3, True)  # type: ignore[arg-type]
    return exchange


def _client() -> object:
    from types import SimpleNamespace

    client = SimpleNamespace(write_paused=False, written=[], done=[])
    client.write = client.written.append
    client.response_done = client.done.append
    return client


def test_one_exchange_accounts_every_attempt_and_finishes_once() -> None:
    conns = [_FakeConn() for _ in range(3)]
    app = _FakeApp([_FakePool(conn) for conn in conns])
    client = _client()
    exchange = _exchange(app, client)
    exchange.start()  # type: ignore[attr-defined]
    # Attempt 1: a 503, read in full, not relayed; its connection is reused.
    exchange.response_head(503, [(b"content-length", b"2")])  # type: ignore[attr-defined]
    exchange.response_body(b"no")  # type: ignore[attr-defined]
    exchange.response_complete(True)  # type: ignore[attr-defined]
    exchange.flush()  # type: ignore[attr-defined]
    assert client.written == []  # type: ignore[attr-defined]
    assert conns[0].released == [True]
    assert app.attempts == [(0, 503)]
    assert app.loop.run_next() == 0.05  # SMG's first backoff, no jitter here
    # Attempt 2: the connection resets before any head.
    exchange.upstream_lost(conns[1])  # type: ignore[attr-defined]
    assert app.attempts == [(0, 503), (1, 0)]
    assert app.loop.run_next() == 0.075
    # Attempt 3 (the last): 200, relayed.
    exchange.response_head(200, [(b"content-length", b"2")])  # type: ignore[attr-defined]
    exchange.response_body(b"ok")  # type: ignore[attr-defined]
    exchange.response_complete(True)  # type: ignore[attr-defined]
    exchange.flush()  # type: ignore[attr-defined]
    assert app.attempts == [(0, 503), (1, 0), (2, 200)]
    assert app.finished == [(200, "")]
    assert client.done == [True]  # type: ignore[attr-defined]
    assert b"".join(client.written).endswith(b"\r\n\r\nok")  # type: ignore[attr-defined]
    assert [len(conn.transport.written) for conn in conns] == [1, 1, 1]  # sent 3 times
    assert app.metrics.retries == {"chat": 2}


def test_last_attempt_relays_the_retryable_status() -> None:
    conns = [_FakeConn() for _ in range(3)]
    app = _FakeApp([_FakePool(conn) for conn in conns])
    client = _client()
    exchange = _exchange(app, client)
    exchange.start()  # type: ignore[attr-defined]
    for _ in range(2):
        exchange.response_head(502, [(b"content-length", b"0")])  # type: ignore[attr-defined]
        exchange.response_complete(False)  # type: ignore[attr-defined]
        exchange.flush()  # type: ignore[attr-defined]
        app.loop.run_next()
    exchange.response_head(502, [(b"content-length", b"0")])  # type: ignore[attr-defined]
    exchange.response_complete(True)  # type: ignore[attr-defined]
    exchange.flush()  # type: ignore[attr-defined]
    assert [conn.aborted for conn in conns] == [True, True, False]  # not reusable: dropped
    assert app.attempts == [(0, 502), (1, 502), (2, 502)]
    assert app.finished == [(502, "")]
    assert b"".join(client.written).startswith(b"HTTP/1.1 502")  # type: ignore[attr-defined]
    assert app.metrics.exhausted == {"chat": 1}


def test_client_leaving_during_the_backoff_ends_it_once() -> None:
    conns = [_FakeConn() for _ in range(3)]
    app = _FakeApp([_FakePool(conn) for conn in conns])
    exchange = _exchange(app, _client())
    exchange.start()  # type: ignore[attr-defined]
    exchange.upstream_lost(conns[0])  # type: ignore[attr-defined]
    exchange.client_gone()  # type: ignore[attr-defined]
    app.loop.run_next()  # the backoff timer fires late: ignored
    assert app.attempts == [(0, 0)]
    assert app.finished == [(499, "client_disconnected")]
    assert app.dispatched == []


def test_large_body_is_not_sent_twice() -> None:
    conns = [_FakeConn() for _ in range(3)]
    app = _FakeApp([_FakePool(conn) for conn in conns])
    client = _client()
    exchange = _exchange(app, client)
    exchange.keep_body = False  # type: ignore[attr-defined]  # over --max-buffered-request-bytes
    exchange.start()  # type: ignore[attr-defined]
    exchange.upstream_lost(conns[0])  # type: ignore[attr-defined]
    assert app.finished == [(502, "upstream_connection_closed")]
    assert app.loop.scheduled == []


# --- worker choice through the gate --------------------------------------------------------------


class _Gate:
    def __init__(self, shed: bool = False, refuse: frozenset[int] = frozenset()) -> None:
        self.shed = shed
        self.refuse = refuse
        self.claims: list[int] = []

    def filter(self, rows: list[int]) -> list[int] | None:
        return None if self.shed else rows

    def claim(self, row: int) -> bool:
        self.claims.append(row)
        return row not in self.refuse


class _First:
    """A policy that takes the first row it is offered."""

    def select(self, rows: list[int], view: object, request: object) -> int:
        return rows[0]


def _plane(gate: _Gate) -> object:
    from types import SimpleNamespace

    from smg.dataplane.app import DataPlane

    plane = DataPlane.__new__(DataPlane)
    plane.gate = gate  # type: ignore[assignment]
    plane.policy = _First()  # type: ignore[assignment]
    plane.view = None  # type: ignore[assignment]
    plane.cfg = SimpleNamespace(load_monitor_interval=10)  # type: ignore[assignment]
    return plane


def test_choice_leaves_out_failed_rows_unless_none_else() -> None:
    from smg.policies.base import RouteRequest

    plane = _plane(_Gate())
    route = RouteRequest()
    assert plane._choose([1, 2, 3], None, route) == 1  # type: ignore[attr-defined]
    assert plane._choose([1, 2, 3], [1], route) == 2  # type: ignore[attr-defined]
    assert plane._choose([1, 2, 3], [1, 2], route) == 3  # type: ignore[attr-defined]
    assert plane._choose([1, 2, 3], [1, 2, 3], route) == 1  # type: ignore[attr-defined]


def test_refused_claim_chooses_again_without_that_row() -> None:
    from smg.policies.base import RouteRequest

    gate = _Gate(refuse=frozenset({1}))
    plane = _plane(gate)
    assert plane._choose([1, 2], None, RouteRequest()) == 2  # type: ignore[attr-defined]
    assert gate.claims == [1, 2]
    everyone = _plane(_Gate(refuse=frozenset({1, 2})))
    reason = everyone._choose([1, 2], None, RouteRequest())  # type: ignore[attr-defined]
    refusal = everyone._refusal(reason, None)  # type: ignore[attr-defined]
    assert refusal[:2] == (503, "no_available_workers")


def test_shed_is_a_503_with_retry_after() -> None:
    from smg.policies.base import RouteRequest

    plane = _plane(_Gate(shed=True))
    reason = plane._choose([1, 2], None, RouteRequest())  # type: ignore[attr-defined]
    status, code, message, extra = plane._refusal(reason, "m")  # type: ignore[attr-defined]
    assert (status, code, extra) == (503, "worker_overload_protection_shed", b"retry-after: 10\r\n")
    assert message == "All workers for model 'm' are overloaded"  # the Rust SMG 1.13's words
