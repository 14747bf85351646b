"""HTTP/1.1 response framing (pure bytes helpers)."""

from __future__ import annotations

from http import HTTPStatus

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
EVENT_STREAM = b"text/event-stream; charset=utf-8"

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"

_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status\r\n" % status
    return line


# Precomputed for the hot path: a keep-alive 200 with a JSON body.
_OK_JSON_HEAD = status_line(200) + b"content-type: application/json\r\ncontent-length: "


def ok_json(body: bytes) -> bytes:
    return b"%s%d\r\n\r\n%s" % (_OK_JSON_HEAD, len(body), body)


def response(
    status: int, body: bytes, content_type: bytes = JSON, close: bool = False, extra: bytes = b""
) -> bytes:
    """A complete response with a content-length body. `extra`: raw header lines."""
    return b"%scontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n%s" % (
        status_line(status),
        content_type,
        len(body),
        b"connection: close\r\n" if close else b"",
        extra,
        body,
    )


def stream_head(chunked: bool, close: bool) -> bytes:
    """Head of an SSE response; without chunking the body ends when the connection closes."""
    return b"%scontent-type: %s\r\ncache-control: no-cache\r\n%s%s\r\n" % (
        status_line(200),
        EVENT_STREAM,
        b"transfer-encoding: chunked\r\n" if chunked else b"",
        b"connection: close\r\n" if close else b"",
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
