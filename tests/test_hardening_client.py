"""The client side of the data plane: framing, limits, timers, answer order, error shapes.

Pure decisions (timers, answer order, parser failures, error bodies, targets) are tested
alone; the rest against a live gateway on loopback with raw sockets, so the exact bytes the
client sees are checked. Each behaviour was compared with the Rust SMG 1.13 fed the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httptools
import httpx
import mockutil
import orjson
import psutil
import pytest
from gatewayutil import Gateway

from smg.dataplane.server import (
    BETWEEN,
    BODY,
    FIRST,
    HEAD,
    MAX_HEAD_BYTES,
    PHASES,
    AnswerOrder,
    Request,
    Verdict,
    looks_like_http09,
    parse_failure,
    timeout_verdict,
)
from smg.httpwire import (
    HttpError,
    anthropic_error_type,
    anthropic_rewrite,
    error_response,
    error_type,
    origin_form,
)

pytestmark = pytest.mark.timeout(120)

CHAT = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
HEAD_LIMIT_S = 1
BODY_STALL_S = 2


# --- pure: timers -----------------------------------------------------------------------------


def _verdict(phase: int, elapsed: float, busy: bool = False) -> Verdict:
    return timeout_verdict(phase, 100.0, 100.0 + elapsed, busy, 30.0, 300.0, 90.0)


def test_timer_verdicts() -> None:
    # A connection that never sends a byte is bounded by the head timeout, not the idle one.
    assert _verdict(FIRST, 29.0) is Verdict.NONE
    assert _verdict(FIRST, 31.0) is Verdict.CLOSE
    assert _verdict(HEAD, 31.0) is Verdict.CLOSE
    # The head timeout ends with the head: a body has its own, longer bound, answered 408.
    assert _verdict(BODY, 31.0) is Verdict.NONE
    assert _verdict(BODY, 301.0) is Verdict.ANSWER_408
    assert _verdict(BETWEEN, 89.0) is Verdict.NONE
    assert _verdict(BETWEEN, 91.0) is Verdict.CLOSE
    # While an answer is owed, no client timer runs (the request timeout bounds it).
    for phase in PHASES:
        assert _verdict(phase, 10_000.0, busy=True) is Verdict.NONE
    # 0 disables each bound.
    for phase in PHASES:
        assert timeout_verdict(phase, 0.0, 1e9, False, 0.0, 0.0, 0.0) is Verdict.NONE


# --- pure: answer order -------------------------------------------------------------------------


def _request(path: bytes) -> Request:
    return Request(b"GET", path, [], b"", True, "1.1")


def test_answers_leave_in_request_order() -> None:
    order = AnswerOrder()
    first, second = _request(b"/a"), _request(b"/b")
    refusal = HttpError(400, "invalid_request", "garbage")
    assert order.arrive(first) is True  # nothing owed: starts now
    assert order.arrive(second) is False
    assert order.arrive(refusal) is False  # a parse error waits for the earlier answers
    assert order.finished() is second
    assert order.finished() is refusal
    assert order.busy is True  # the refusal is being answered
    assert order.finished() is None
    assert order.busy is False
    assert order.arrive(refusal) is True  # with nothing owed, a refusal goes at once


# --- pure: parser failures and request lines ------------------------------------------------------


class _Sink:
    def on_url(self, url: bytes) -> None:
        pass


def _failure(data: bytes) -> HttpError:
    parser = httptools.HttpRequestParser(_Sink())
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        return parse_failure(exc)
    raise AssertionError(f"{data!r} parsed")


def test_parser_failures_are_400() -> None:
    for data in (
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        error = _failure(data)
        assert (error.status, error.code) == (400, "invalid_request"), data


def test_callback_refusals_keep_their_status() -> None:
    class Refusing(_Sink):
        def on_url(self, url: bytes) -> None:
            raise HttpError(414, "uri_too_long", "long")

    parser = httptools.HttpRequestParser(Refusing())
    with pytest.raises(httptools.HttpParserError) as info:
        parser.feed_data(b"GET /x HTTP/1.1\r\n\r\n")
    assert parse_failure(info.value).status == 414


def test_http09_request_lines() -> None:
    assert looks_like_http09(b"GET /\r\n")
    assert looks_like_http09(b"GET /health\r\n\r\n")
    assert not looks_like_http09(b"GET / HTTP/1.1\r\n")
    assert not looks_like_http09(b"GET / HTTP/1.")  # the line is not complete yet
    assert not looks_like_http09(b"\r\nGET / HTTP/1.1\r\n")


# --- pure: targets and error bodies ----------------------------------------------------------------


def test_origin_form() -> None:
    assert origin_form(b"/v1/models?x=1") == b"/v1/models?x=1"
    assert origin_form(b"http://gw.example/v1/chat/completions") == b"/v1/chat/completions"
    assert origin_form(b"https://gw.example:8443/health?a=b") == b"/health?a=b"
    assert origin_form(b"http://gw.example") == b"/"
    assert origin_form(b"gw.example:443") == b"gw.example:443"  # CONNECT: no route


def test_error_types_per_status() -> None:
    # Observed on the Rust SMG 1.13: 400/404/405 invalid_request_error, 500 server_error.
    assert [error_type(s) for s in (400, 404, 405, 413, 431)] == ["invalid_request_error"] * 5
    assert [error_type(s) for s in (500, 502, 503, 504)] == ["server_error"] * 4
    body = orjson.loads(error_response(404, "unknown_url", "x").split(b"\r\n\r\n", 1)[1])
    assert body == {
        "error": {
            "type": "invalid_request_error",
            "code": "unknown_url",
            "message": "x",
            "param": None,
        }
    }


# Rust SMG 1.13 on /v1/messages, a worker answering status + body (observed).
RUST_REWRITES = [
    (
        404,
        b'{"error":{"message":"no","type":"weird","param":null,"code":"c"}}',
        "not_found_error",
        "no",
    ),
    (
        404,
        b'{"object":"error","message":"m","type":"NotFoundError","code":404}',
        "not_found_error",
        "m",
    ),
    (404, b'{"detail":"Not Found"}', "not_found_error", "Not Found"),
    (422, b'{"detail":"Not Found"}', "invalid_request_error", "Unprocessable Entity"),
    (404, b"plain text failure", "not_found_error", "plain text failure"),
    (404, b"", "not_found_error", "Not Found"),
    (404, b'{"error":"a string error"}', "not_found_error", "a string error"),
    (404, b'{"error":{"type":"x","code":"y"}}', "not_found_error", '{"type":"x","code":"y"}'),
    (
        500,
        b'{"type":"error","error":{"type":"overloaded_error","message":"a"}}',
        "overloaded_error",
        "a",
    ),
    (400, b'{"error":{"message":"no"}}', "invalid_request_error", "no"),
    (401, b'{"error":{"message":"no"}}', "authentication_error", "no"),
    (403, b'{"error":{"message":"no"}}', "permission_error", "no"),
    (413, b'{"error":{"message":"no"}}', "request_too_large", "no"),
    (429, b'{"error":{"message":"no"}}', "rate_limit_error", "no"),
    (500, b'{"error":{"message":"no"}}', "api_error", "no"),
    (502, b'{"error":{"message":"no"}}', "api_error", "no"),
    (503, b"busy", "overloaded_error", "busy"),
    (504, b'{"error":{"message":"no"}}', "timeout_error", "no"),
    (529, b'{"error":{"message":"no"}}', "overloaded_error", "no"),
    (409, b'{"error":{"message":"no"}}', "invalid_request_error", "no"),
]


@pytest.mark.parametrize(("status", "body", "kind", "message"), RUST_REWRITES)
def test_worker_errors_on_messages_take_anthropic_shape(
    status: int, body: bytes, kind: str, message: str
) -> None:
    rewritten = orjson.loads(anthropic_rewrite(status, body, b"msg_1"))
    assert rewritten == {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "msg_1",
    }
    if not body.startswith(b'{"type":"error"'):
        assert anthropic_error_type(status) == kind


# --- live gateway -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    gateway = Gateway(
        [
            "--mock-workers",
            "1",
            "--mock-worker-args",
            "--max-body-bytes 300000000",
            "--header-read-timeout-secs",
            str(HEAD_LIMIT_S),
            "--stream-body-stall-timeout-secs",
            str(BODY_STALL_S),
            "--idle-connection-timeout-secs",
            "60",
        ],
        processes=1,
    )
    gateway.start()
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()
        gateway.close_log()


def _connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def _read(sock: socket.socket, quiet: float = 1.0, limit: float = 10.0) -> tuple[bytes, bool]:
    """What the gateway sends until it closes (True) or stays quiet for `quiet` s (False)."""
    chunks = []
    deadline = time.monotonic() + limit
    sock.settimeout(quiet)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            return b"".join(chunks), False
        except OSError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False


def _exchange(gw: Gateway, payload: bytes, quiet: float = 1.0) -> tuple[bytes, bool]:
    with _connect(gw) as sock:
        sock.sendall(payload)
        return _read(sock, quiet)


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def _answers(data: bytes, head_only: bool = False) -> list[Answer]:
    """Split Content-Length framed answers (the gateway frames its own answers so)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:300]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated header {name}: {head!r}"
            headers[name.lower()] = value.strip()
        size = 0 if head_only else int(headers.get("content-length", "0"))
        out.append(Answer(status, headers, rest[:size]))
        data = rest[size:]
    return out


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s" % (path, len(body), extra, body)
    )


def _worker_url(gw: Gateway) -> str:
    return str(gw.admin("GET", "/workers").json()["workers"][0]["url"])


def test_header_value_refused_as_it_arrives(gw: Gateway) -> None:
    """Issue 6.1: a huge header value is refused once the head passes the limit, not after
    the whole value is buffered (it used to take 48 MiB before the 431)."""
    sent = 0
    answer = b""
    with _connect(gw) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: gw\r\nx-big: ")
        piece = b"v" * 16384
        try:
            while sent < 8 * 1024 * 1024 and not answer:
                sock.sendall(piece)
                sent += len(piece)
                sock.settimeout(0.02)
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(65536)
        except OSError:
            pass  # the gateway closed after answering
        if not answer:
            answer = _read(sock, quiet=2.0)[0]
    (refusal,) = _answers(answer)
    assert refusal.status == 431, answer[:300]
    assert refusal.headers["x-smg-error-code"] == "request_header_fields_too_large"
    assert refusal.headers["x-request-id"]
    assert sent <= MAX_HEAD_BYTES + 512 * 1024, f"refused only after {sent} bytes"


def test_parse_error_waits_for_the_earlier_answer(gw: Gateway) -> None:
    """Issue 6.2: valid request + garbage in one send gets 200 then 400 (as the Rust SMG),
    and a slow first request's answer is not lost."""
    for extra in (b"", b"x-mock-ttft-ms: 400\r\n"):
        data, closed = _exchange(
            gw, _post(b"/v1/chat/completions", CHAT, extra) + b"\x00garbage\r\n\r\n"
        )
        answers = _answers(data)
        assert [a.status for a in answers] == [200, 400], data[:600]
        assert answers[0].json()["object"] == "chat.completion"
        assert answers[1].headers["connection"] == "close"
        assert closed


def test_deep_json_is_400_without_a_log_flood(gw: Gateway) -> None:
    """Issue 6.3: 1,000 levels of nesting made msgspec raise RecursionError: a 500 and a
    traceback per request."""
    deep = b'{"model":"mock-model","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    before = gw.logs()
    for _ in range(3):
        (answer,) = _answers(_exchange(gw, _post(b"/v1/chat/completions", deep))[0])
        assert answer.status == 400
        assert answer.json()["error"]["code"] == "invalid_json"
        assert answer.json()["error"]["type"] == "invalid_request_error"
    new = gw.logs()[len(before) :]
    assert "Traceback" not in new and "ERROR" not in new, new[-2000:]


def test_head_timeout_ends_with_the_head_and_a_stalled_body_is_408(gw: Gateway) -> None:
    """Issue 6.5: the head timeout used to cut a body still arriving, silently."""
    body = CHAT
    with _connect(gw) as sock:
        started = time.monotonic()
        sock.sendall(_post(b"/v1/chat/completions", body)[: -len(body) + 5])
        time.sleep(HEAD_LIMIT_S + 0.6)  # past the head timeout: the body keeps arriving
        sock.sendall(body[5:10])
        data, closed = _read(sock, quiet=BODY_STALL_S + 3)
        elapsed = time.monotonic() - started
    (answer,) = _answers(data)
    assert answer.status == 408, data[:300]
    assert answer.headers["x-smg-error-code"] == "request_body_timeout"
    assert closed
    # The timers read a clock the sweeper moves every 0.25 s.
    assert HEAD_LIMIT_S + 0.6 + BODY_STALL_S - 0.3 < elapsed < HEAD_LIMIT_S + BODY_STALL_S + 3


def test_silent_connection_is_closed_at_the_head_timeout(gw: Gateway) -> None:
    """Issue 6.6: a connection that sends nothing was held for the idle timeout (90 s);
    the Rust SMG closes it at the header-read timeout (observed: 30.0 s by default)."""
    for first in (b"", b"GET /health HTTP/1.1\r\n"):
        with _connect(gw) as sock:
            started = time.monotonic()
            if first:
                sock.sendall(first)
            data, closed = _read(sock, quiet=HEAD_LIMIT_S + 3)
            elapsed = time.monotonic() - started
        assert (data, closed) == (b"", True)
        assert elapsed < HEAD_LIMIT_S + 1.5


def test_http09_is_400(gw: Gateway) -> None:
    for payload in (b"GET /\r\n", b"GET /health\r\n\r\n"):
        data, closed = _exchange(gw, payload)
        (answer,) = _answers(data)
        assert answer.status == 400 and closed, data


def test_head_answers_like_get_without_a_body(gw: Gateway) -> None:
    for path in (b"/health", b"/liveness", b"/readiness", b"/v1/models", b"/workers", b"/nope"):
        get = b"GET %s HTTP/1.1\r\nhost: gw\r\n\r\n" % path
        head = b"HEAD %s HTTP/1.1\r\nhost: gw\r\n\r\n" % path
        (got,) = _answers(_exchange(gw, get)[0])
        # HEAD then GET on one connection: the HEAD answer must carry no body bytes.
        data, _ = _exchange(gw, head + get)
        head_answer = _answers(data[: data.index(b"\r\n\r\n") + 4], head_only=True)[0]
        (after,) = _answers(data[data.index(b"\r\n\r\n") + 4 :])
        assert head_answer.status == got.status == after.status, path
        if path != b"/nope":  # its message names the method, as the Rust SMG's does
            assert head_answer.headers["content-length"] == got.headers["content-length"], path
        assert head_answer.headers["content-type"] == got.headers["content-type"], path
    (answer,) = _answers(
        _exchange(gw, b"HEAD /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n\r\n")[0], head_only=True
    )
    assert answer.status == 405 and answer.headers["allow"] == "POST"


def test_absolute_form_target_is_routed_by_its_path(gw: Gateway) -> None:
    data, _ = _exchange(gw, _post(b"http://gw.example/v1/chat/completions", CHAT))
    (answer,) = _answers(data)
    assert answer.status == 200, data[:300]
    seen = mockutil.stats(_worker_url(gw))["last_request_by_route"]
    assert "/v1/chat/completions" in seen


def test_upgrade_and_connect_get_exactly_one_answer(gw: Gateway) -> None:
    follow = b"GET /liveness HTTP/1.1\r\nhost: gw\r\n\r\n"
    for upgrade in (
        b"Upgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n",
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABk\r\n",
    ):
        data, closed = _exchange(
            gw, b"GET /health HTTP/1.1\r\nhost: gw\r\n" + upgrade + b"\r\n" + follow
        )
        # Answered as plain HTTP/1.1 (the Rust SMG: 200, connection kept), then the next.
        assert [a.status for a in _answers(data)] == [200, 200], data
        assert not closed
    data, _ = _exchange(gw, b"CONNECT gw.example:443 HTTP/1.1\r\nhost: gw.example:443\r\n\r\n")
    (answer,) = _answers(data)
    assert answer.status == 404 and answer.headers["x-smg-error-code"] == "unknown_url"
    data, closed = _exchange(
        gw, _post(b"/v1/chat/completions", CHAT, b"Upgrade: websocket\r\nConnection: upgrade\r\n")
    )
    assert [a.status for a in _answers(data)] == [400] and closed


def _dataplane(gw: Gateway) -> psutil.Process:
    assert gw.process is not None
    for child in psutil.Process(gw.process.pid).children(recursive=True):
        for conn in child.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == gw.port:
                return child
    raise AssertionError("no data-plane process listens on the gateway port")


def test_request_body_is_held_once_and_released(gw: Gateway) -> None:
    """Issue 6.7: a 200 MiB body added 400 MiB to the process, and 223 MiB stayed."""
    size = 200 * 1024 * 1024
    process = _dataplane(gw)
    body = (
        b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"pad":"'
    )
    body += b"a" * (size - len(body) - 2) + b'"}'
    baseline = process.memory_info().rss
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with _connect(gw) as sock:
            sock.sendall(_post(b"/v1/chat/completions", body))
            data, _ = _read(sock, quiet=5.0, limit=60.0)
    finally:
        stop.set()
        sampler.join()
    del body
    (answer,) = _answers(data)
    assert answer.status == 200, data[:300]
    time.sleep(0.5)
    after = process.memory_info().rss
    mib = 1024 * 1024
    assert peak - baseline < 1.5 * size, f"peak +{(peak - baseline) / mib:.0f} MiB"
    assert after - baseline < 40 * mib, f"+{(after - baseline) / mib:.0f} MiB after the answer"


def test_every_answer_the_gateway_makes_has_a_request_id(gw: Gateway) -> None:
    """Issue 6.24."""
    payloads = [
        b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"GET /workers HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"GET /readiness HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nhost: gw\r\n\r\n",
        _post(b"/v1/chat/completions", b'{"model":'),
        _post(b"/v1/chat/completions", b'{"model":"no-such-model"}'),
        _post(b"/workers", b'{"url":1}'),
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    ]
    for payload in payloads:
        (answer,) = _answers(_exchange(gw, payload)[0])
        assert re.fullmatch(r"[\x21-\x7e]{1,128}", answer.headers.get("x-request-id", "")), payload
    (answer,) = _answers(_exchange(gw, b"GET /nope HTTP/1.1\r\nx-request-id: mine-1\r\n\r\n")[0])
    assert answer.headers["x-request-id"] == "mine-1"


def test_messages_errors_use_anthropic_shape(gw: Gateway) -> None:
    """Issue 6.28: the gateway's own errors on /v1/messages, as the Rust SMG writes them."""
    cases = [
        (
            _post(b"/v1/messages", b'{"model":"no-such-model","max_tokens":5,"messages":[]}'),
            404,
            "not_found_error",
        ),
        (_post(b"/v1/messages", b'{"model":'), 400, "invalid_request_error"),
        (b"GET /v1/messages HTTP/1.1\r\nhost: gw\r\n\r\n", 405, "invalid_request_error"),
    ]
    for payload, status, kind in cases:
        (answer,) = _answers(_exchange(gw, payload)[0])
        assert answer.status == status
        body = answer.json()
        assert set(body) == {"type", "error", "request_id"}, body
        assert body["type"] == "error" and body["error"]["type"] == kind
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
        assert body["request_id"] == answer.headers["x-request-id"]
        assert answer.headers["x-smg-error-code"]


def test_upstream_gets_only_the_clients_request_id(gw: Gateway) -> None:
    """Issue 6.30: as the Rust SMG, an x-request-id goes upstream only when the client sent
    one (its own when valid, the generated one otherwise)."""
    url = _worker_url(gw)

    def upstream_headers(extra: bytes) -> tuple[dict[str, str], Answer]:
        (answer,) = _answers(_exchange(gw, _post(b"/v1/chat/completions", CHAT, extra))[0])
        assert answer.status == 200
        seen = mockutil.stats(url)["last_request_by_route"]["/v1/chat/completions"]
        return seen["header_map"], answer

    seen, answer = upstream_headers(b"")
    assert "x-request-id" not in seen and answer.headers["x-request-id"].startswith("chatcmpl-")
    seen, answer = upstream_headers(b"x-request-id: client-7\r\n")
    assert seen["x-request-id"] == answer.headers["x-request-id"] == "client-7"
    seen, answer = upstream_headers(b"x-correlation-id: corr-9\r\n")
    assert "x-request-id" not in seen and seen["x-correlation-id"] == "corr-9"
    assert answer.headers["x-request-id"] == "corr-9"
    seen, answer = upstream_headers(b"x-request-id: " + b"a" * 200 + b"\r\n")
    assert seen["x-request-id"] == answer.headers["x-request-id"] != "a" * 200


def _control_plane_pid(gw: Gateway) -> int:
    found = re.findall(r"\[(\d+) smg\.control\]", gw.logs())
    assert found, gw.logs()[-2000:]
    return int(found[-1])


def _responses_total(gw: Gateway, path: str, status: int, code: str) -> float:
    pattern = re.compile(r"^smg_http_responses_total\{([^}]*)\} (\S+)$", re.MULTILINE)
    total = 0.0
    for labels, value in pattern.findall(gw.metrics()):
        if (
            f'path="{path}"' in labels
            and f'status_code="{status}"' in labels
            and f'error_code="{code}"' in labels
        ):
            total += float(value)
    return total


def test_admin_errors_are_counted_with_their_code_and_a_missing_control_plane_logs_one_line(
    gw: Gateway,
) -> None:
    """Issue 6.20 (data-plane part)."""
    before = _responses_total(gw, "/workers", 400, "BAD_REQUEST")
    answer = httpx.post(gw.url + "/workers", json={"url": 1}, timeout=10)
    assert answer.status_code == 400 and answer.headers["x-smg-error-code"] == "BAD_REQUEST"
    assert _responses_total(gw, "/workers", 400, "BAD_REQUEST") == before + 1

    logs_before = len(gw.logs())
    os.kill(_control_plane_pid(gw), signal.SIGKILL)
    statuses = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and 503 not in statuses:
        reply = httpx.get(gw.url + "/workers", timeout=10)
        statuses.add(reply.status_code)
    assert 503 in statuses
    assert reply.json()["error"] == {
        "type": "server_error",
        "code": "control_plane_unavailable",
        "message": "the control plane did not answer",
        "param": None,
    }
    new = gw.logs()[logs_before:]
    assert "Traceback" not in new, new[-3000:]
    assert "admin call to the control plane failed" in new
    # The replacement takes over: admin calls answer again.
    assert mockutil.wait_for(
        lambda: httpx.get(gw.url + "/workers", timeout=10).status_code == 200, 20
    )


def test_worker_errors_on_messages_are_rewritten_to_anthropic_shape(gw: Gateway) -> None:
    """Issue 6.28: a worker's own error answer on /v1/messages (the mock serves no such
    route: 404 in the OpenAI shape) reaches the client in Anthropic's shape, as the Rust
    SMG rewrites it; the connection stays usable."""
    body = b'{"model":"mock-model","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    follow = b"GET /liveness HTTP/1.1\r\nhost: gw\r\n\r\n"
    data, closed = _exchange(gw, _post(b"/v1/messages", body) + follow)
    answer, after = _answers(data)
    assert answer.status == 404, data[:400]
    doc = answer.json()
    assert set(doc) == {"type", "error", "request_id"}, doc
    assert doc["type"] == "error" and doc["error"]["type"] == "not_found_error"
    assert "/v1/messages" in doc["error"]["message"]  # the worker's own message
    assert doc["request_id"] == answer.headers["x-request-id"]
    assert answer.headers["content-type"] == "application/json"
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert after.status == 200 and not closed
    # A success on the same route is relayed untouched (only errors are rewritten).
    data, _ = _exchange(gw, _post(b"/v1/chat/completions", CHAT))
    assert _answers(data)[0].json()["object"] == "chat.completion"


def test_head_on_a_proxied_route_answers_like_get_without_a_body(gw: Gateway) -> None:
    """HEAD on a route proxied to a worker: the worker's GET answer, headers only (the Rust
    SMG proxies HEAD there too); the next request on the connection is answered."""
    get = b"GET /get_model_info HTTP/1.1\r\nhost: gw\r\n\r\n"
    head = b"HEAD /get_model_info HTTP/1.1\r\nhost: gw\r\n\r\n"
    (got,) = _answers(_exchange(gw, get)[0])
    assert got.status == 200 and got.body
    data, closed = _exchange(gw, head + get)
    head_answer = _answers(data[: data.index(b"\r\n\r\n") + 4], head_only=True)[0]
    (after,) = _answers(data[data.index(b"\r\n\r\n") + 4 :])
    assert head_answer.status == 200
    assert head_answer.headers["content-length"] == got.headers["content-length"]
    assert after.status == 200 and after.body == got.body and not closed
