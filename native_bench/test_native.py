"""Tests of the C stub and the C load generator, compiled into a temporary directory."""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchlib import parse_loadgen_summary

HERE = Path(__file__).resolve().parent
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("native")
    built: dict[str, Path] = {}
    for name in ("stub", "loadgen"):
        binary = out / name
        subprocess.run(
            [
                str(CC),
                "-O2",
                "-Wall",
                "-Werror",
                "-pthread",
                "-o",
                str(binary),
                str(HERE / f"{name}.c"),
            ],
            check=True,
            timeout=120,
        )
        built[name] = binary
    return built


@pytest.fixture
def stub(binaries: dict[str, Path], tmp_path: Path) -> Iterator[tuple[int, Path]]:
    log = tmp_path / "probes.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [str(binaries["stub"]), "--port", "0", "--threads", "2", "--log-probes"],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "stub did not report its port"
        parts = proc.stdout.readline().decode().split()
        assert parts[0] == "LISTENING" and parts[1] == "127.0.0.1"
        yield int(parts[2]), log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def exchange(port: int, data: bytes, expect_close: bool = True) -> bytes:
    """Sends raw bytes and reads until the server closes (or 2 s of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                chunks.append(d)
        except TimeoutError:
            assert not expect_close, "server did not close the connection"
    return b"".join(chunks)


def stats(port: int) -> dict[str, int]:
    raw = exchange(port, b"GET /stub/stats HTTP/1.1\r\nConnection: close\r\n\r\n")
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_pipelined_requests_are_answered_in_order(stub: tuple[int, Path]) -> None:
    port, _ = stub
    body = b'{"model":"m"}'
    req = (
        b"GET /health HTTP/1.1\r\n\r\n"
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n"
    ) % (len(body), body, len(body), body)
    raw = exchange(port, req)
    statuses = re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", raw)
    assert statuses == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 404 Not Found",
    ]
    assert raw.index(b'"text_completion"') < raw.index(b'"chat.completion"')
    assert b'"error":{"message":"Not found"' in raw


@pytest.mark.parametrize("flag", [b'"stream":true', b'"stream" : true', b'"stream":\ttrue'])
def test_stream_flag_gives_sixteen_sse_chunks(stub: tuple[int, Path], flag: bytes) -> None:
    port, _ = stub
    body = b'{"model":"m",' + flag + b"}"
    req = b"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    raw = exchange(port, req % (len(body), body))
    head, payload = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert b"text/event-stream" in head
    events = [line for line in payload.split(b"\r\n") if line.startswith(b"data: ")]
    assert len(events) == 17
    assert events[-1] == b"data: [DONE]\n\n"
    assert all(b'"chat.completion.chunk"' in e for e in events[:16])
    assert b'"finish_reason":"stop"' in events[15]
    assert payload.endswith(b"0\r\n\r\n")


def test_stream_false_and_chunked_request_body(stub: tuple[int, Path]) -> None:
    port, _ = stub
    plain = b'{"stream": false}'
    raw = exchange(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (len(plain), plain),
    )
    assert b"Content-Length:" in raw and b'"chat.completion"' in raw
    # "stream":true split across two request chunks.
    chunked = b'7\r\n{"strea\r\na\r\nm": true }\r\n0\r\n\r\n'
    raw = exchange(
        port,
        b"POST /v1/completions HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked,
    )
    assert raw.count(b"data: ") == 17 and b'"text_completion"' in raw


def test_probe_routes_and_log(stub: tuple[int, Path]) -> None:
    port, log = stub
    for path, needle in [
        (b"/v1/models", b'"owned_by":"sglang"'),
        (b"/server_info", b'"dp_size":1'),
        (b"/get_server_info", b'"dp_size":1'),
        (b"/model_info", b'"is_generation":true'),
        (b"/v1/loads?include=core", b'"dp_rank_count":1'),
        (b"/metrics", b"sglang:token_usage"),
        (b"/health", b"200 OK"),
    ]:
        raw = exchange(port, b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK"), path
        assert needle in raw, path
    assert stats(port)["probe"] == 7
    text = log.read_text()
    assert "GET /v1/loads?include=core" in text and "GET /metrics" in text


def test_malformed_and_http2_preface_get_400_and_close(stub: tuple[int, Path]) -> None:
    port, _ = stub
    raw = exchange(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request")
    assert b'"type":"invalid_request_error"' in raw
    raw = exchange(port, b"garbage\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")


def test_loadgen_closed_and_open_loop_counts_match_the_stub(
    binaries: dict[str, Path], stub: tuple[int, Path]
) -> None:
    port, _ = stub
    base = [
        str(binaries["loadgen"]),
        "--port",
        str(port),
        "--path",
        "/v1/chat/completions",
        "--body",
        str(HERE / "payloads" / "stream.json"),
        "--connections",
        "8",
        "--duration",
        "1",
    ]
    before = stats(port)["chat_stream"]
    closed = parse_loadgen_summary(
        subprocess.run(
            [*base, "--rate", "0"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    )
    opened = parse_loadgen_summary(
        subprocess.run(
            [*base, "--rate", "500", "--warmup", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    after = stats(port)["chat_stream"]
    for s in (closed, opened):
        for key in (
            "non2xx",
            "connect_errors",
            "read_errors",
            "write_errors",
            "timeouts",
            "parse_errors",
        ):
            assert s[key] == 0, (key, s)
    assert closed["completed"] > 100
    # Open loop: 500/s for 1 s of warm-up plus 1 s measured, all sent and all answered.
    assert opened["sent"] == opened["completed"] == 1000
    assert opened["recorded"] == 500
    assert opened["achieved_rate"] == pytest.approx(500.0)
    assert (
        0
        < opened["latency_us"]["p50"]
        <= opened["latency_us"]["p99"]
        <= opened["latency_us"]["max"]
    )
    assert after - before == closed["completed"] + opened["completed"]


def test_loadgen_reports_refused_connections(binaries: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on port now; the run must fail loudly instead of reporting a rate.
    res = subprocess.run(
        [
            str(binaries["loadgen"]),
            "--port",
            str(port),
            "--path",
            "/",
            "--body",
            str(HERE / "payloads" / "chat.json"),
            "--duration",
            "1",
            "--connections",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert "could not connect" in res.stderr
