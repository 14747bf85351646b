"""End-to-end tests of `smg launch`: real gateway processes in front of real mock workers.

Everything listens on 127.0.0.1. Each test class shares one gateway (class-scoped
fixture) among tests that do not disturb each other; tests that kill, drain or stop
something get a gateway of their own. Streams are read on raw sockets so arrival times
are measured where the client sees them, without a client library's buffering.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx
import mockutil
import openai
import psutil
import pytest
from gatewayutil import Gateway, free_port, in_flight_total, run_launch

pytestmark = pytest.mark.timeout(90)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there gateway"}]
PAYLOAD_LIMIT = 64 * 1024
HOP_BY_HOP_SENT = {
    "Connection": "keep-alive, X-Listed-In-Connection",
    "X-Listed-In-Connection": "hop-by-hop because Connection names it",
    "Keep-Alive": "timeout=5, max=100",
    "TE": "trailers",
    "Upgrade": "h2c",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "Proxy-Connection": "keep-alive",
}


# --- helpers ------------------------------------------------------------------------------


def chat_body(model: str | None = "mock-model", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": MESSAGES, **extra}
    if model is not None:
        body["model"] = model
    return body


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    value = mockutil.wait_for(predicate, timeout=timeout, interval=0.02)
    assert value, f"timed out after {timeout} s waiting for {what}"
    return value


def assert_error_shape(body: Any, code: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert error["code"] == code, body


class RawExchange:
    """One HTTP/1.1 request on its own socket, read incrementally.

    httptools undoes the chunked framing; every SSE event is recorded with the monotonic
    time of the read that completed it. `eof` is set when the server closed the
    connection, `complete` when the response ended properly.
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        body: bytes | dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        declared_length: int | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        length = len(data) if declared_length is None else declared_length
        lines = [
            f"POST {path} HTTP/1.1",
            f"host: {parts.netloc}",
            "content-type: application/json",
            f"content-length: {length}",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.events: list[tuple[float, bytes]] = []
        self.complete = False
        self.eof = False
        self.head_at = 0.0
        self.closed_at = 0.0
        self._pending = b""
        self.last_read_at = 0.0
        assert parts.hostname is not None and parts.port is not None
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=10.0)
        self.sent_at = time.monotonic()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)

    def __enter__(self) -> RawExchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_at = self.last_read_at

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk
        self._pending += chunk
        while b"\n\n" in self._pending:
            event, self._pending = self._pending.split(b"\n\n", 1)
            self.events.append((self.last_read_at, event))

    def on_message_complete(self) -> None:
        self.complete = True

    def read_until(self, done: Callable[[RawExchange], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done(self) and not self.complete and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                self.eof = True
                break
            self.last_read_at = time.monotonic()
            if not data:
                self.eof = True
                break
            self.parser.feed_data(data)
        return done(self)

    def read_head(self, timeout: float = 10.0) -> RawExchange:
        assert self.read_until(lambda ex: ex.status != 0, timeout), "no response head"
        return self

    def finish(self, timeout: float = 10.0) -> RawExchange:
        self.read_until(lambda ex: ex.complete, timeout)
        return self

    def close(self) -> None:
        if not self.closed_at:
            self.closed_at = time.monotonic()
            self.sock.close()

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def data(self) -> list[str]:
        return [
            event.decode()[len("data: ") :]
            for _t, event in self.events
            if event.startswith(b"data: ")
        ]

    def content_events(self) -> list[tuple[float, str]]:
        """(arrival time, text) of each event that carries generated text."""
        out = []
        for at, event in self.events:
            if not event.startswith(b"data: {"):
                continue
            choice = json.loads(event[len(b"data: ") :])["choices"]
            if not choice:
                continue
            text = choice[0].get("text") or (choice[0].get("delta") or {}).get("content")
            if text:
                out.append((at, text))
        return out

    def json(self) -> Any:
        return json.loads(self.body)


def get(url: str, path: str) -> tuple[int, dict[str, str], Any]:
    """A GET on a fresh connection: (status, headers, parsed JSON body)."""
    status, headers, body = mockutil.request("GET", url + path)
    return status, headers, json.loads(body) if body else None


def post(
    url: str, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """A POST on a fresh connection: (status, headers, parsed JSON body or raw bytes)."""
    status, got_headers, data = mockutil.request("POST", url + path, body, headers, timeout=10.0)
    try:
        return status, got_headers, json.loads(data)
    except ValueError:
        return status, got_headers, data


def workers(gw: Gateway, model: str | None = None) -> list[dict[str, Any]]:
    params = {"model": model} if model is not None else None
    answer = gw.admin("GET", "/workers", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()["workers"]


def worker_with_url(gw: Gateway, url: str) -> dict[str, Any] | None:
    return next((w for w in workers(gw) if w["url"] == url), None)


def wait_healthy(gw: Gateway, url: str, healthy: bool, timeout: float = 10.0) -> None:
    def check() -> bool:
        worker = worker_with_url(gw, url)
        return worker is not None and worker["is_healthy"] is healthy

    wait_until(check, timeout, f"worker {url} is_healthy={healthy}")


def wait_in_flight_zero(gw: Gateway, timeout: float = 5.0) -> None:
    wait_until(lambda: in_flight_total(gw) == 0, timeout, "global in-flight back to 0")


def inference_count(url: str) -> int:
    return mockutil.stats(url)["inference_answered"]


def openai_client(gw: Gateway, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=timeout
    )


@dataclasses.dataclass
class Fleet:
    gw: Gateway
    main: mockutil.MockWorkers  # two workers serving mock-model
    solo: mockutil.MockWorkers  # one worker serving solo-model


@contextlib.contextmanager
def started(gw: Gateway) -> Iterator[Gateway]:
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()
        gw.close_log()


# --- one gateway, two processes, three workers ------------------------------------------------


@pytest.fixture(scope="class")
def fleet() -> Iterator[Fleet]:
    with (
        mockutil.start_mock_workers(2, "--model", "mock-model") as main,
        mockutil.start_mock_workers(1, "--model", "solo-model") as solo,
    ):
        args = [
            "--worker-urls",
            *main.urls,
            solo.url,
            "--policy",
            "round_robin",
            "--model-alias",
            "alias-model=mock-model",
            "--max-payload-size",
            str(PAYLOAD_LIMIT),
            "--health-check-interval-secs",
            "1",
            "--worker-startup-check-interval",
            "1",
        ]
        with started(Gateway(args, processes=2)) as gw:
            for url in [*main.urls, solo.url]:
                wait_healthy(gw, url, True)
            yield Fleet(gw, main, solo)


class TestProxy:
    def test_models_is_union_of_worker_models_and_aliases(self, fleet: Fleet) -> None:
        ids = sorted(model.id for model in openai_client(fleet.gw).models.list())
        assert ids == ["alias-model", "mock-model", "solo-model"]

    def test_openai_client_chat_and_completions(self, fleet: Fleet) -> None:
        client = openai_client(fleet.gw)
        raw = client.chat.completions.with_raw_response.create(
            model="mock-model", messages=MESSAGES, max_tokens=5
        )
        assert raw.headers["x-smg-process"] in ("0", "1")
        assert raw.headers["x-request-id"]
        chat = raw.parse()
        assert chat.choices[0].message.content
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 5

        completion = client.completions.create(
            model="solo-model", prompt="one two three", max_tokens=4
        )
        assert completion.choices[0].text
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)

    def test_openai_client_streams(self, fleet: Fleet) -> None:
        client = openai_client(fleet.gw)
        chunks = list(
            client.chat.completions.create(
                model="mock-model", messages=MESSAGES, max_tokens=6, stream=True
            )
        )
        pieces = [
            c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
        ]
        assert len(pieces) == 6
        assert chunks[-1].choices[0].finish_reason == "length"

        stream = client.completions.create(
            model="solo-model", prompt="count with me", max_tokens=7, stream=True
        )
        texts = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
        assert len(texts) == 7

    def test_model_alias_routes_to_the_canonical_model(self, fleet: Fleet) -> None:
        before_main = sum(inference_count(url) for url in fleet.main.urls)
        before_solo = inference_count(fleet.solo.url)
        client = openai_client(fleet.gw)
        for _ in range(4):
            chat = client.chat.completions.create(model="alias-model", messages=MESSAGES)
            assert chat.choices[0].message.content
        assert sum(inference_count(url) for url in fleet.main.urls) == before_main + 4
        assert inference_count(fleet.solo.url) == before_solo

    def test_unknown_model_is_404_model_not_found(self, fleet: Fleet) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            openai_client(fleet.gw).chat.completions.create(
                model="no-such-model", messages=MESSAGES
            )
        error = caught.value
        assert error.status_code == 404
        assert error.response.headers["x-smg-error-code"] == "model_not_found"
        assert_error_shape(error.response.json(), "model_not_found")

    def test_request_without_model_goes_to_a_ready_worker(self, fleet: Fleet) -> None:
        urls = [*fleet.main.urls, fleet.solo.url]
        before = sum(inference_count(url) for url in urls)
        for _ in range(6):
            status, _headers, body = post(fleet.gw.url, CHAT, chat_body(None))
            assert status == 200, body
            assert body["model"] in ("mock-model", "solo-model")
        assert sum(inference_count(url) for url in urls) == before + 6

    @pytest.mark.parametrize(
        "body",
        [b'{"model": "mock-model", "messages": [', b"[1, 2]", b"\xff"],
        ids=["truncated", "not-an-object", "not-utf8"],
    )
    def test_invalid_json_is_400(self, fleet: Fleet, body: bytes) -> None:
        status, headers, answer = post(fleet.gw.url, CHAT, body)
        assert status == 400, answer
        assert headers["x-smg-error-code"] == answer["error"]["code"]
        assert_error_shape(answer, answer["error"]["code"])

    def test_payload_limit(self, fleet: Fleet) -> None:
        fits = chat_body(pad="a" * (PAYLOAD_LIMIT - 1000))
        assert post(fleet.gw.url, CHAT, fits)[0] == 200

        too_big = b'{"model": "mock-model", "pad": "' + b"a" * (2 * PAYLOAD_LIMIT) + b'"}'
        with fleet.gw.client() as client:
            answer = client.post(CHAT, content=too_big)
            assert answer.status_code == 413, answer.text
            assert answer.headers["x-smg-error-code"] == "payload_too_large"
            assert_error_shape(answer.json(), "payload_too_large")

            def chunked() -> Iterator[bytes]:
                yield too_big[:1000]
                for start in range(1000, len(too_big), 8192):
                    yield too_big[start : start + 8192]

            answer = client.post(CHAT, content=chunked())
            assert answer.request.headers.get("transfer-encoding") == "chunked"
            assert answer.status_code == 413, answer.text
            assert_error_shape(answer.json(), "payload_too_large")

    def test_oversized_headers_are_431(self, fleet: Fleet) -> None:
        with fleet.gw.client() as client:
            answer = client.post(CHAT, json=chat_body(), headers={"x-big": "b" * 70_000})
        assert answer.status_code == 431, answer.text
        assert_error_shape(answer.json(), answer.headers["x-smg-error-code"])

    def test_liveness_and_readiness(self, fleet: Fleet) -> None:
        assert mockutil.request("GET", fleet.gw.url + "/liveness")[::2] == (200, b"OK")
        status, _headers, body = get(fleet.gw.url, "/readiness")
        assert status == 200, body

    def test_body_reaches_the_worker_byte_for_byte(self, fleet: Fleet) -> None:
        body = (
            b'{ "model":"solo-model" ,\n "messages" : [{"role":"user","content":"caf\\u00e9 \xc3\xa9"}],'
            b'\t"smg_does_not_know_this": {"nested": [1, 2.50, null, true]}, "max_tokens": 3 }'
        )
        status, _headers, answer = post(fleet.gw.url, CHAT, body)
        assert status == 200, answer
        seen = mockutil.stats(fleet.solo.url)["last_request_by_route"][CHAT]
        assert base64.b64decode(seen["body_b64"]) == body

        def chunked() -> Iterator[bytes]:
            for start in range(0, len(body), 7):
                yield body[start : start + 7]

        with fleet.gw.client() as client:
            answer = client.post(CHAT, content=chunked())
        assert answer.request.headers.get("transfer-encoding") == "chunked"
        assert answer.status_code == 200, answer.text
        seen = mockutil.stats(fleet.solo.url)["last_request_by_route"][CHAT]
        assert base64.b64decode(seen["body_b64"]) == body

    def test_request_headers_sent_upstream(self, fleet: Fleet) -> None:
        headers = {
            **HOP_BY_HOP_SENT,
            "Authorization": "Bearer client-secret",
            "X-Custom-Header": "kept",
        }
        status, got, answer = post(fleet.gw.url, CHAT, chat_body("solo-model"), headers)
        assert status == 200, answer
        seen = mockutil.stats(fleet.solo.url)["last_request_by_route"][CHAT]["header_map"]
        assert seen["x-custom-header"] == "kept"
        assert "authorization" not in seen, "the client's Authorization reached the worker"
        dropped = {name.lower() for name in HOP_BY_HOP_SENT} & set(seen)
        assert not dropped, f"hop-by-hop headers forwarded: {dropped}"
        # No id given: one is generated and returned, but not sent upstream (the Rust SMG
        # forwards only the client's; vLLM would prefix its response ids with ours).
        assert got["x-request-id"]
        assert "x-request-id" not in seen

    def test_request_id_is_honoured_and_generated(self, fleet: Fleet) -> None:
        status, got, _ = post(
            fleet.gw.url, CHAT, chat_body("solo-model"), {"x-request-id": "rid-e2e-42"}
        )
        assert status == 200
        assert got["x-request-id"] == "rid-e2e-42"
        seen = mockutil.stats(fleet.solo.url)["last_request_by_route"][CHAT]["header_map"]
        assert seen["x-request-id"] == "rid-e2e-42"
        generated = {
            post(fleet.gw.url, CHAT, chat_body("solo-model"))[1]["x-request-id"] for _ in range(3)
        }
        assert len(generated) == 3 and "rid-e2e-42" not in generated

    def test_worker_api_key_goes_upstream_and_never_out(self, fleet: Fleet) -> None:
        gw, secret = fleet.gw, "sekrit-worker-key"
        with mockutil.start_mock_workers(
            1, "--model", "keyed-model", "--api-key", secret, "--auth-health"
        ) as keyed:
            mockutil.reset_stats(keyed.url)  # forget the helper's own keyless /health polls
            created = gw.admin("POST", "/workers", json={"url": keyed.url, "api_key": secret})
            assert created.status_code == 202, created.text
            worker_id = created.json()["worker_id"]
            try:
                # /health needs the key too (--auth-health): healthy means probes carry it.
                wait_healthy(gw, keyed.url, True)
                headers = {"Authorization": "Bearer client-secret"}
                status, _got, answer = post(gw.url, CHAT, chat_body("keyed-model"), headers)
                assert status == 200, answer
                stats = mockutil.stats(keyed.url)
                by_route = stats["last_request_by_route"]
                assert by_route[CHAT]["header_map"]["authorization"] == f"Bearer {secret}"
                assert "/health" in by_route
                for route, record in by_route.items():
                    assert record["header_map"].get("authorization") == f"Bearer {secret}", route
                assert stats["responses_by_status"].get("401") is None, stats

                patched = gw.admin("PATCH", f"/workers/{worker_id}", json={"priority": 7})
                duplicate = gw.admin("POST", "/workers", json={"url": keyed.url, "api_key": secret})
                assert duplicate.status_code == 409, duplicate.text
                invalid = {"url": keyed.url + "/x", "api_key": secret, "priority": "high"}
                refused = gw.admin("POST", "/workers", json=invalid)
                assert refused.status_code == 400, refused.text
                answers = [
                    created,
                    patched,
                    duplicate,
                    refused,
                    gw.admin("GET", "/workers"),
                    gw.admin("GET", f"/workers/{worker_id}"),
                    gw.admin("GET", "/workers", params={"model": "keyed-model"}),
                    gw.admin("GET", "/get_loads"),
                    gw.admin("GET", "/v1/models"),
                ]
                assert all(a.status_code < 300 for a in answers if a not in (duplicate, refused))
                for answer in answers:
                    assert secret not in answer.text, f"{answer.request.url} leaks the api key"
            finally:
                gw.admin("DELETE", f"/workers/{worker_id}")
                wait_until(lambda: worker_with_url(gw, keyed.url) is None, 5, "keyed worker gone")

    def test_sse_chunks_are_relayed_as_they_arrive(self, fleet: Fleet) -> None:
        """The worker sends a chunk every 500 ms; each must reach the client within 20 ms of
        when it reaches a client reading the worker directly (both measured concurrently)."""
        headers = {"x-mock-ttft-ms": "500", "x-mock-itl-ms": "500", "x-mock-output-len": "3"}
        body = chat_body("solo-model", stream=True)
        results: dict[str, RawExchange] = {}

        def run(name: str, url: str) -> None:
            with RawExchange(url, CHAT, body, headers) as ex:
                results[name] = ex.finish(10.0)

        threads = [
            threading.Thread(target=run, args=("direct", fleet.solo.url)),
            threading.Thread(target=run, args=("gateway", fleet.gw.url)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15.0)
        direct, via = results["direct"], results["gateway"]
        assert direct.complete and via.complete
        assert via.data[-1] == "[DONE]"
        direct_times = [at - direct.sent_at for at, _ in direct.content_events()]
        via_times = [at - via.sent_at for at, _ in via.content_events()]
        assert len(via_times) == len(direct_times) == 3
        for k, (d, v) in enumerate(zip(direct_times, via_times)):
            assert abs(v - d) < 0.020, f"chunk {k}: direct {d:.4f} s, via smg {v:.4f} s"
            assert abs(v - 0.5 * (k + 1)) < 0.050, f"chunk {k} arrived at {v:.4f} s"
        gaps = [b - a for a, b in itertools.pairwise(via_times)]
        assert all(abs(gap - 0.5) < 0.020 for gap in gaps), gaps

    def test_client_disconnect_closes_the_upstream_request(self, fleet: Fleet) -> None:
        gw, url = fleet.gw, fleet.solo.url
        before = mockutil.stats(url)["disconnects"]
        headers = {"x-mock-itl-ms": "500", "x-mock-output-len": "20"}
        with RawExchange(gw.url, CHAT, chat_body("solo-model", stream=True), headers) as ex:
            assert ex.read_until(lambda e: len(e.content_events()) >= 1, 5.0)
            assert in_flight_total(gw) == 1
        closed_at = ex.closed_at
        stats = wait_until(
            lambda: (s := mockutil.stats(url))["disconnects"] > before and s,
            2.0,
            "the worker to see the disconnect",
        )
        delay = stats["last_disconnect_monotonic"] - closed_at
        assert 0 <= delay < 0.100, f"worker saw the disconnect {delay * 1000:.1f} ms later"
        wait_in_flight_zero(gw, 2.0)
        assert mockutil.stats(url)["in_flight"] == 0

    def test_every_process_serves(self, fleet: Fleet) -> None:
        seen: set[str] = set()
        for _ in range(200):
            status, headers, _ = post(fleet.gw.url, CHAT, chat_body())
            assert status == 200
            seen.add(headers["x-smg-process"])
            if seen == {"0", "1"}:
                break
        assert seen == {"0", "1"}

    def test_added_worker_reaches_every_process_within_one_second(self, fleet: Fleet) -> None:
        gw = fleet.gw
        with mockutil.start_mock_workers(1, "--model", "late-model") as late:
            created = gw.admin("POST", "/workers", json={"url": late.url})
            accepted_at = time.monotonic()
            assert created.status_code == 202, created.text
            worker_id = created.json()["worker_id"]
            try:
                served_by: set[str] = set()
                served = 0
                while served_by != {"0", "1"} and time.monotonic() - accepted_at < 5.0:
                    status, headers, _ = post(gw.url, CHAT, chat_body("late-model"))
                    if status == 200:
                        served += 1
                        served_by.add(headers["x-smg-process"])
                    else:
                        assert status == 503, status  # known but not yet ready
                elapsed = time.monotonic() - accepted_at
                assert served_by == {"0", "1"}
                assert elapsed < 1.0, (
                    f"both processes routed to the new worker after {elapsed:.3f} s"
                )
                assert inference_count(late.url) == served

                duplicate = gw.admin("POST", "/workers", json={"url": late.url})
                assert duplicate.status_code == 409, duplicate.text
                assert_error_shape(duplicate.json(), duplicate.json()["error"]["code"])

                one = gw.admin("GET", f"/workers/{worker_id}")
                assert one.status_code == 200
                assert (one.json()["id"], one.json()["url"]) == (worker_id, late.url)
                assert [m["id"] for m in one.json()["models"]] == ["late-model"]

                patch = {"priority": 90, "labels": {"zone": "b", "tier": "gold"}}
                assert gw.admin("PATCH", f"/workers/{worker_id}", json=patch).status_code == 202
                patched = gw.admin("GET", f"/workers/{worker_id}").json()
                assert patched["priority"] == 90
                assert patched["labels"] == {"zone": "b", "tier": "gold"}

                only = workers(gw, model="late-model")
                assert [w["id"] for w in only] == [worker_id]
                assert {w["url"] for w in workers(gw, model="mock-model")} == set(fleet.main.urls)
            finally:
                gw.admin("DELETE", f"/workers/{worker_id}")
                wait_until(lambda: worker_with_url(gw, late.url) is None, 5, "late worker gone")


# --- no ready worker, timeouts -------------------------------------------------------------------


@pytest.fixture(scope="class")
def sick() -> Iterator[tuple[Gateway, str]]:
    with mockutil.start_mock_workers(1, "--model", "sick-model", "--health-fail") as mock:
        args = [
            "--worker-urls",
            mock.url,
            "--request-timeout-secs",
            "1",
            "--worker-startup-check-interval",
            "1",
            "--health-check-interval-secs",
            "1",
            "--health-success-threshold",
            "1",
        ]
        with started(Gateway(args, processes=1)) as gw:
            yield gw, mock.url


def make_ready(sick: tuple[Gateway, str]) -> tuple[Gateway, str]:
    gw, url = sick
    mockutil.set_config(url, healthy=True)
    wait_until(lambda: get(gw.url, "/readiness")[0] == 200, 5.0, "readiness 200")
    return sick


class TestFaults:
    def test_not_ready_without_a_ready_worker(self, sick: tuple[Gateway, str]) -> None:
        gw, _url = sick
        assert mockutil.request("GET", gw.url + "/liveness")[::2] == (200, b"OK")
        status, _headers, body = get(gw.url, "/readiness")
        assert status == 503
        assert body["reason"] == "insufficient healthy workers"  # as 1.13
        for model in (None, "sick-model"):
            status, headers, answer = post(gw.url, CHAT, chat_body(model))
            assert status == 503, answer
            assert headers["x-smg-error-code"] == answer["error"]["code"]
            assert_error_shape(answer, "no_available_workers")
            # The Rust SMG 1.13's words and Retry-After for a fleet with no ready worker.
            assert answer["error"]["message"] == (
                "All workers are unavailable (circuit breaker open or unhealthy)"
            )
            assert headers["retry-after"] == "1"

    def test_ready_once_a_worker_is(self, sick: tuple[Gateway, str]) -> None:
        gw, _url = make_ready(sick)
        assert post(gw.url, CHAT, chat_body("sick-model"))[0] == 200

    def test_worker_hang_is_504(self, sick: tuple[Gateway, str]) -> None:
        gw, url = make_ready(sick)
        before = mockutil.stats(url)["disconnects"]
        started_at = time.monotonic()
        status, headers, answer = post(
            gw.url, CHAT, chat_body("sick-model"), {"x-mock-ttft-ms": "10000"}
        )
        elapsed = time.monotonic() - started_at
        assert status == 504, answer
        assert headers["x-smg-error-code"] == "upstream_timeout"
        assert_error_shape(answer, "upstream_timeout")
        assert 0.9 < elapsed < 2.0, elapsed
        # The upstream request is abandoned, not left running on the worker.
        wait_until(lambda: mockutil.stats(url)["disconnects"] > before, 2.0, "upstream closed")
        wait_in_flight_zero(gw, 2.0)

    def test_stream_hang_is_504(self, sick: tuple[Gateway, str]) -> None:
        gw, url = make_ready(sick)
        mockutil.set_config(url, hang_rate=1.0)  # no response head at all
        try:
            with RawExchange(gw.url, CHAT, chat_body("sick-model", stream=True)) as ex:
                ex.finish(5.0)
                assert ex.status == 504
                assert ex.headers["x-smg-error-code"] == "upstream_timeout"
                assert_error_shape(ex.json(), "upstream_timeout")
                assert 0.9 < ex.head_at - ex.sent_at < 2.0
        finally:
            mockutil.set_config(url, hang_rate=0.0)
        wait_in_flight_zero(gw, 2.0)

    def test_stalled_stream_is_cut_at_the_timeout(self, sick: tuple[Gateway, str]) -> None:
        """The 200 head is already out, so the only honest signal left is to end the
        connection without the closing chunk (and without `[DONE]`)."""
        gw, _url = make_ready(sick)
        headers = {"x-mock-ttft-ms": "10000"}
        with RawExchange(gw.url, CHAT, chat_body("sick-model", stream=True), headers) as ex:
            ex.finish(5.0)
            assert ex.status == 200
            assert ex.eof and not ex.complete
            assert "[DONE]" not in ex.data
            assert 0.9 < ex.last_read_at - ex.sent_at < 2.0
        # So a client library reports the cut instead of ending the stream quietly.
        stream = openai_client(gw).chat.completions.create(
            model="sick-model",
            messages=MESSAGES,
            stream=True,
            extra_headers=headers,
        )
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            list(stream)
        wait_in_flight_zero(gw, 2.0)


# --- health transitions, 502, drain on delete ----------------------------------------------------


@dataclasses.dataclass
class HealthFleet:
    gw: Gateway
    stable: mockutil.MockWorkers
    flaky: mockutil.MockWorkers
    drainer: mockutil.MockWorkers


@pytest.fixture(scope="class")
def health_fleet() -> Iterator[HealthFleet]:
    with (
        mockutil.start_mock_workers(1, "--model", "mock-model") as stable,
        mockutil.start_mock_workers(1, "--model", "flaky-model") as flaky,
        mockutil.start_mock_workers(1, "--model", "drain-model") as drainer,
    ):
        args = [
            "--worker-urls",
            stable.url,
            flaky.url,
            drainer.url,
            "--policy",
            "round_robin",
            "--health-check-interval-secs",
            "1",
            "--health-failure-threshold",
            "2",
            "--health-success-threshold",
            "1",
            "--worker-startup-check-interval",
            "1",
        ]
        with started(Gateway(args, processes=2)) as gw:
            for url in (stable.url, flaky.url, drainer.url):
                wait_healthy(gw, url, True)
            yield HealthFleet(gw, stable, flaky, drainer)


class TestHealth:
    def test_killed_worker_502_then_not_ready_then_back(self, health_fleet: HealthFleet) -> None:
        gw, url = health_fleet.gw, health_fleet.flaky.url
        port = urlsplit(url).port
        assert post(gw.url, CHAT, chat_body("flaky-model"))[0] == 200
        health_fleet.flaky.proc.kill()
        health_fleet.flaky.proc.wait(5)
        # Before the health checks notice: the connection is refused.
        status, headers, answer = post(gw.url, CHAT, chat_body("flaky-model"))
        assert status == 502, answer
        assert headers["x-smg-error-code"].startswith("upstream_")
        assert_error_shape(answer, headers["x-smg-error-code"])

        wait_healthy(gw, url, False, timeout=6.0)
        status, _headers, answer = post(gw.url, CHAT, chat_body("flaky-model"))
        assert status == 503, answer
        for _ in range(10):  # round robin over the ready workers only
            status, _headers, answer = post(gw.url, CHAT, chat_body(None))
            assert status == 200, answer
        wait_in_flight_zero(gw, 2.0)

        with mockutil.start_mock_workers(1, "--model", "flaky-model", "--port", str(port)) as again:
            assert again.url == url
            wait_healthy(gw, url, True, timeout=6.0)
            assert post(gw.url, CHAT, chat_body("flaky-model"))[0] == 200
            for _ in range(12):
                assert post(gw.url, CHAT, chat_body(None))[0] == 200
                if inference_count(url) >= 2:
                    break
            assert inference_count(url) >= 2, "model-less traffic never reached the worker"

    def test_delete_drains_then_removes(self, health_fleet: HealthFleet) -> None:
        gw, url = health_fleet.gw, health_fleet.drainer.url
        worker = worker_with_url(gw, url)
        assert worker is not None and worker["is_healthy"]
        headers = {"x-mock-itl-ms": "250", "x-mock-output-len": "6"}
        with RawExchange(gw.url, CHAT, chat_body("drain-model", stream=True), headers) as ex:
            assert ex.read_until(lambda e: len(e.content_events()) >= 1, 5.0)
            deleted = gw.admin("DELETE", f"/workers/{worker['id']}")
            assert deleted.status_code == 202, deleted.text
            answered = inference_count(url)
            for _ in range(5):
                status, _headers, answer = post(gw.url, CHAT, chat_body("drain-model"))
                assert status in (503, 404), answer
            listed = worker_with_url(gw, url)
            assert listed is not None and listed["status"] == "draining"
            ex.finish(10.0)
            assert ex.complete and ex.status == 200
            assert len(ex.content_events()) == 6
            assert ex.data[-1] == "[DONE]"
        assert inference_count(url) == answered + 1  # only the stream that was in flight
        wait_until(lambda: worker_with_url(gw, url) is None, 3.0, "drained worker removed")
        status, _headers, answer = post(gw.url, CHAT, chat_body("drain-model"))
        assert status == 404 and answer["error"]["code"] == "model_not_found"


# --- `smg launch --mock-workers 2`: data-plane crash, in-flight accounting -------------------------


def _children(gw: Gateway) -> list[psutil.Process]:
    assert gw.process is not None
    return psutil.Process(gw.process.pid).children()


def dataplane_pids(gw: Gateway) -> set[int]:
    """Direct children of the launch process that listen on the gateway port."""
    pids = set()
    for child in _children(gw):
        with contextlib.suppress(psutil.Error):
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == gw.port:
                    pids.add(child.pid)
    return pids


def serving_pid(gw: Gateway, client_port: int) -> int | None:
    """The data-plane process holding the server side of our connection."""
    for child in _children(gw):
        with contextlib.suppress(psutil.Error):
            for conn in child.net_connections(kind="tcp"):
                if conn.laddr.port == gw.port and conn.raddr and conn.raddr.port == client_port:
                    return child.pid
    return None


@pytest.fixture(scope="class")
def mock_gateway() -> Iterator[Gateway]:
    # Short breaker timeout: the chaos test's forced 500s open the breakers (as they must),
    # and the tests after it need the workers back.
    args = ["--mock-workers", "2", "--cb-timeout-duration-secs", "1"]
    with started(Gateway(args, processes=2)) as gw:
        gw.wait_ready()
        yield gw


SLOW_STREAM = {"x-mock-itl-ms": "200", "x-mock-output-len": "50"}


class TestMockWorkersGateway:
    def test_mock_workers_serve_chat_completions(self, mock_gateway: Gateway) -> None:
        client = openai_client(mock_gateway)
        model = next(iter(client.models.list())).id
        chat = client.chat.completions.create(model=model, messages=MESSAGES)
        assert chat.choices[0].message.content
        wait_until(lambda: len(workers(mock_gateway)) == 2, 5.0, "two mock workers listed")

    def test_in_flight_back_to_zero_after_chaos(self, mock_gateway: Gateway) -> None:
        gw = mock_gateway
        urls = [w["url"] for w in workers(gw)]
        for url in urls:
            wait_healthy(gw, url, True)
            mockutil.set_config(url, error_rate=0.3)
        pids = dataplane_pids(gw)
        statuses: list[int] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            kind = i % 6
            status = -1
            if kind == 0:  # a 500 on every try: retried, then relayed (issue 7 retries)
                status = post(gw.url, CHAT, chat_body(), {"x-mock-status": "500"})[0]
            elif kind == 1:  # a full fast stream
                headers = {"x-mock-itl-ms": "2", "x-mock-output-len": "8"}
                with RawExchange(gw.url, CHAT, chat_body(stream=True), headers) as ex:
                    status = ex.finish(5.0).status
            elif kind == 2:  # disconnect mid-stream
                headers = {"x-mock-itl-ms": "50", "x-mock-output-len": "40"}
                with RawExchange(gw.url, CHAT, chat_body(stream=True), headers) as ex:
                    ex.read_until(lambda e: len(e.events) >= 1, 2.0)
                    status = ex.status
            elif kind == 3:  # worker hangs, client gives up
                headers = {"x-mock-ttft-ms": "5000"}
                with RawExchange(gw.url, CHAT, chat_body(), headers) as ex:
                    ex.read_until(lambda e: e.status != 0, 0.1)
            elif kind == 4:  # client leaves half-way through its body
                with RawExchange(gw.url, CHAT, b'{"model": "mo', declared_length=500):
                    pass
            else:
                status = post(gw.url, CHAT, chat_body("nobody-serves-this"))[0]
            with lock:
                statuses.append(status)

        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(one, range(200)))
            assert len(statuses) == 200
            assert 500 in statuses and 200 in statuses and 404 in statuses
            wait_in_flight_zero(gw, 5.0)
            for url in urls:
                wait_until(lambda u=url: mockutil.stats(u)["in_flight"] == 0, 3.0, "worker idle")
            assert dataplane_pids(gw) == pids, "a data-plane process died during the run"
        finally:
            for url in urls:
                mockutil.set_config(url, error_rate=0.0)

        # The forced 500s may have opened breakers: half-open trials close them again, and
        # the tests after this one need every worker back in routing.
        # Each probe a new prompt: under cache_aware (the default) a repeated prompt goes
        # to the worker that holds it, so a half-open worker would never get its trial.
        probe = iter(range(10**6))

        def breakers_closed() -> bool:
            content = f"breaker probe {next(probe)}"
            post(gw.url, CHAT, chat_body(messages=[{"role": "user", "content": content}]))
            states = [
                float(line.rsplit(" ", 1)[1])
                for line in gw.metrics().splitlines()
                if line.startswith("smg_worker_cb_state{")
            ]
            return len(states) == 2 and all(state == 0 for state in states)

        wait_until(breakers_closed, 15.0, "every breaker closed again")
        assert post(gw.url, CHAT, chat_body())[0] == 200

    def test_killed_dataplane_process_is_replaced(self, mock_gateway: Gateway) -> None:
        gw = mock_gateway
        before = dataplane_pids(gw)
        assert len(before) == 2
        streams = [
            RawExchange(gw.url, CHAT, chat_body(stream=True), SLOW_STREAM).read_head()
            for _ in range(6)
        ]
        try:
            victim = streams[0]
            index = victim.headers["x-smg-process"]
            victim_pid = serving_pid(gw, victim.local_port)
            assert victim_pid in before
            assert in_flight_total(gw) == 6, [s.status for s in streams]
            os.kill(victim_pid, signal.SIGKILL)
            victim.read_until(lambda e: False, 3.0)
            assert victim.eof and not victim.complete
        finally:
            for stream in streams:
                stream.close()
        # Its counters could never be decremented by the dead process: they were zeroed.
        wait_in_flight_zero(gw, 5.0)

        def replaced() -> bool:
            pids = dataplane_pids(gw)
            return len(pids) == 2 and victim_pid not in pids

        wait_until(replaced, 10.0, "a replacement data-plane process")
        new_pid = (dataplane_pids(gw) - before).pop()

        def served_by_replacement() -> bool:
            with RawExchange(gw.url, CHAT, chat_body(stream=True), SLOW_STREAM) as ex:
                ex.read_head()
                return (
                    ex.headers["x-smg-process"] == index
                    and serving_pid(gw, ex.local_port) == new_pid
                )

        wait_until(served_by_replacement, 10.0, f"process index {index} served by pid {new_pid}")
        wait_in_flight_zero(gw, 5.0)


# --- shutdown and start-up ----------------------------------------------------------------------


def test_sigterm_drains_an_open_stream() -> None:
    gw = Gateway(["--mock-workers", "1", "--shutdown-grace-period-secs", "15"], processes=2)
    with started(gw):
        gw.wait_ready()
        assert gw.process is not None
        group = gw.process.pid
        headers = {"x-mock-itl-ms": "300", "x-mock-output-len": "6"}
        with RawExchange(gw.url, CHAT, chat_body(stream=True), headers) as ex:
            assert ex.read_until(lambda e: len(e.content_events()) >= 1, 5.0)
            gw.signal(signal.SIGTERM)
            signalled = time.monotonic()

            def readiness_503() -> bool:
                with contextlib.suppress(OSError):
                    status, _headers, body = get(gw.url, "/readiness")
                    return status == 503 and bool(body["reason"])
                return False

            wait_until(readiness_503, 1.0, "readiness 503 while the listener is still open")
            ex.finish(10.0)
            assert ex.complete and ex.status == 200
            assert len(ex.content_events()) == 6
            assert ex.data[-1] == "[DONE]"
            assert time.monotonic() - signalled > 1.0  # it outlived the listener linger
        assert gw.wait(20.0) == 0

        def group_gone() -> bool:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(group_gone, 5.0, "every process of the gateway's group to exit")


def test_port_in_use_fails_fast() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--host", "127.0.0.1", "--port", str(port), "--processes", "1"]
        code, err, took = run_launch([*args, "--prometheus-port", str(free_port())])
    assert code != 0
    assert took < 10.0
    assert str(port) in err and "in use" in err.lower(), err


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--request-timeout-secs", "0", "request_timeout_secs"),
        ("--max-payload-size", "lots", "max_payload_size"),
        ("--model-alias", "no-equals-sign", "model_alias"),
    ],
)
def test_bad_config_value_exits_2_naming_the_key(flag: str, value: str, key: str) -> None:
    code, err, _took = run_launch(["--host", "127.0.0.1", "--port", "0", flag, value])
    assert code == 2, err
    assert key in err, err
