"""HTTP/1.1 wire helpers shared by the data plane: status lines, error bodies, header rules.

Pure functions over bytes; no sockets.
"""

from __future__ import annotations

import http

import orjson


class HttpError(Exception):
    """A refusal that becomes an OpenAI-shaped error response: status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

STATUS_LINES: dict[int, bytes] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("latin-1")
    for status in http.HTTPStatus
}
REASONS: dict[int, str] = {status.value: status.phrase for status in http.HTTPStatus}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")
    return line


def error_body(status: int, code: str, message: str) -> bytes:
    """The OpenAI error shape, with the Rust SMG's `type` (the status phrase) and `code`."""
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": REASONS.get(status, "Error"),
                "code": code,
                "param": None,
            }
        }
    )


def build_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    extra_headers: bytes = b"",
    keep_alive: bool = True,
) -> bytes:
    """A complete response with a Content-Length body; `extra_headers` is raw header lines."""
    return b"".join(
        (
            status_line(status),
            b"content-type: ",
            content_type,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
            extra_headers,
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
            body,
        )
    )


def error_response(
    status: int, code: str, message: str, *, extra_headers: bytes = b"", keep_alive: bool = True
) -> bytes:
    return build_response(
        status,
        error_body(status, code, message),
        extra_headers=b"x-smg-error-code: " + code.encode("latin-1") + b"\r\n" + extra_headers,
        keep_alive=keep_alive,
    )


def valid_request_id(value: bytes) -> bool:
    """1 to 128 visible ASCII characters, as the Rust SMG accepts."""
    return 0 < len(value) <= 128 and all(0x21 <= byte <= 0x7E for byte in value)


def request_id_prefix(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chatcmpl-"
    if path.endswith("/completions"):
        return "cmpl-"
    if path.endswith("/generate"):
        return "gnt-"
    if path.endswith("/responses"):
        return "resp-"
    if path.endswith("/messages"):
        return "msg_"
    return "req-"
