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

# The route whose errors take Anthropic's shape instead of OpenAI's (the Rust SMG does so
# for its own errors and for the worker's).
ANTHROPIC_ROUTE = "/v1/messages"


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")
    return line


def error_type(status: int) -> str:
    """OpenAI's `type` for an error status, as the Rust SMG 1.13 sets it (observed: 400, 404,
    405 -> invalid_request_error; 500 -> server_error)."""
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


# Anthropic's error types per status, as the Rust SMG 1.13 writes them on /v1/messages
# (each observed with a worker answering that status); other 4xx and 5xx fall back below.
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    found = _ANTHROPIC_TYPES.get(status)
    if found is not None:
        return found
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def invalid_url(method: str, path: str) -> str:
    """The Rust SMG 1.13's message for a 404 `unknown_url` and a 405 `method_not_allowed`."""
    return f"Invalid URL ({method} {path})"


def error_body(status: int, code: str, message: str) -> bytes:
    """The OpenAI error shape, with the Rust SMG's `type` per status and `code`."""
    return orjson.dumps(
        {"error": {"type": error_type(status), "code": code, "message": message, "param": None}}
    )


def anthropic_error_body(
    status: int, message: str, request_id: bytes, error_kind: str | None = None
) -> bytes:
    """Anthropic's error shape: `{"type":"error","error":{type,message},"request_id"}`."""
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": error_kind or anthropic_error_type(status), "message": message},
            "request_id": request_id.decode("latin-1"),
        }
    )


def anthropic_rewrite(status: int, body: bytes, request_id: bytes) -> bytes:
    """A worker's error answer on /v1/messages, rewritten as the Rust SMG 1.13 does.

    The message is taken from `error.message`, a string `error`, a top-level `message`, the
    `error` object itself (serialised) or a non-JSON body's text, else the status phrase; a
    body already in Anthropic's shape keeps its own error type.
    """
    kind: str | None = None
    message: str | None = None
    try:
        doc = orjson.loads(body) if body else None
        parsed = True
    except (orjson.JSONDecodeError, RecursionError):
        doc = None
        parsed = False
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            text = error.get("message")
            if isinstance(text, str):
                message = text
                if doc.get("type") == "error" and isinstance(error.get("type"), str):
                    kind = error["type"]
            else:
                message = orjson.dumps(error).decode()
        elif isinstance(error, str):
            message = error
        elif isinstance(doc.get("message"), str):
            message = doc["message"]
    elif not parsed:
        message = body.decode("utf-8", "replace")
    if not message:
        message = REASONS.get(status, "Unknown Status Code")
    return anthropic_error_body(status, message, request_id, kind)


def build_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    extra_headers: bytes = b"",
    keep_alive: bool = True,
    head_only: bool = False,
) -> bytes:
    """A complete response with a Content-Length body; `extra_headers` is raw header lines.

    `head_only` (an answer to HEAD) keeps the headers GET would get, Content-Length
    included, and leaves the body out.
    """
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
            b"" if head_only else body,
        )
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    extra_headers: bytes = b"",
    keep_alive: bool = True,
    request_id: bytes | None = None,
    anthropic: bool = False,
    head_only: bool = False,
) -> bytes:
    """An error answer with `x-smg-error-code`; with `request_id`, also `x-request-id`.

    `anthropic` (the request came on /v1/messages) gives Anthropic's body shape, which
    carries the request id too.
    """
    headers = b"x-smg-error-code: " + code.encode("latin-1") + b"\r\n"
    if request_id is not None:
        headers += b"x-request-id: " + request_id + b"\r\n"
    if anthropic:
        body = anthropic_error_body(status, message, request_id or b"")
    else:
        body = error_body(status, code, message)
    return build_response(
        status,
        body,
        extra_headers=headers + extra_headers,
        keep_alive=keep_alive,
        head_only=head_only,
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


def origin_form(target: bytes) -> bytes:
    """The origin form (`/path?query`) of a request target: an absolute-form target
    (`http://host/path`, RFC 9112 3.2.2) is routed by its path, as the Rust SMG does."""
    if target[:1] == b"/":
        return target
    scheme_end = target.find(b"://")
    if scheme_end <= 0:
        return target  # authority form (CONNECT) or garbage: matches no route
    start = scheme_end + 3
    ends = [i for i in (target.find(b"/", start), target.find(b"?", start)) if i >= 0]
    if not ends:
        return b"/"
    rest = target[min(ends) :]
    return rest if rest[:1] == b"/" else b"/" + rest
