"""`--cors-allowed-origins`: which CORS headers an answer carries (pure, no I/O).

The answers are the Rust SMG 1.13's, measured with the same requests (tower-http's CORS
layer there):

- flag unset: no CORS handling at all (no headers; OPTIONS is an ordinary request).
- a list of origins: every answer carries ``vary: origin`` and
  ``access-control-expose-headers: x-request-id,traceparent,tracestate``, plus
  ``access-control-allow-origin: <origin>`` when the request's ``Origin`` equals one of
  the list byte for byte (no case folding, no trailing-slash tolerance).
- ``*`` alone: every answer carries ``access-control-allow-origin: *`` and
  ``access-control-expose-headers: *``, with or without an ``Origin``; no ``vary``.

Any OPTIONS request is a preflight, answered by the gateway itself (200, empty body, no
credential asked, no worker touched) with the methods, headers and max-age below. No
``access-control-allow-credentials`` in either mode (1.13 sends none).
"""

from __future__ import annotations

_METHODS = b"GET,POST,PATCH,DELETE,OPTIONS"
_HEADERS = b"content-type,authorization,anthropic-version,anthropic-beta,traceparent,tracestate"
_EXPOSE = b"x-request-id,traceparent,tracestate"
MAX_AGE_SECS = 3600

_VARY = b"vary: origin\r\n"
_LIST_PREFLIGHT = (
    _VARY
    + b"access-control-allow-methods: "
    + _METHODS
    + b"\r\naccess-control-allow-headers: "
    + _HEADERS
    + b"\r\naccess-control-max-age: %d\r\n" % MAX_AGE_SECS
)
_LIST_EXPOSE = b"access-control-expose-headers: " + _EXPOSE + b"\r\n"
_ANY_PREFLIGHT = (
    b"access-control-allow-methods: *\r\naccess-control-allow-headers: *\r\n"
    b"access-control-max-age: %d\r\naccess-control-allow-origin: *\r\n" % MAX_AGE_SECS
)
_ANY_RESPONSE = b"access-control-expose-headers: *\r\naccess-control-allow-origin: *\r\n"


class Cors:
    """The header lines (CRLF-terminated bytes) each answer gets; built once per process.

    Only an allowed origin is ever echoed, so no client-chosen bytes reach a response head
    (an Origin with CR/LF could not be in the list: the configuration refuses such values).
    """

    __slots__ = ("_allowed", "_any")

    def __init__(self, origins: list[str]) -> None:
        self._any = origins == ["*"]
        self._allowed = frozenset(origin.encode("latin-1") for origin in origins)

    @classmethod
    def from_config(cls, origins: list[str]) -> Cors | None:
        """None when the flag is unset: the data plane then pays one None check."""
        return cls(origins) if origins else None

    def preflight(self, origin: bytes | None) -> bytes:
        """Headers of the answer to an OPTIONS request."""
        if self._any:
            return _ANY_PREFLIGHT
        if origin is not None and origin in self._allowed:
            return _LIST_PREFLIGHT + b"access-control-allow-origin: " + origin + b"\r\n"
        return _LIST_PREFLIGHT

    def response(self, origin: bytes | None) -> bytes:
        """Headers added to every other answer (proxied, streamed, local, errors, 401s)."""
        if self._any:
            return _ANY_RESPONSE
        if origin is not None and origin in self._allowed:
            return _VARY + b"access-control-allow-origin: " + origin + b"\r\n" + _LIST_EXPOSE
        return _VARY + _LIST_EXPOSE
