"""WASM middleware types (pure): the WIT world `smg:gateway` as Python values, 1.13's JSON names, the limits,
and how an action changes a request or a response.

1.13 facts (crates/wasm/src/module.rs, config.rs; model_gateway/src/middleware/wasm.rs):
- module_type is the serde name "Middleware"; an attach point is the externally tagged enum
  `{"Middleware": "OnRequest"}` / `{"Middleware": "OnResponse"}` (1.13 also names "OnError", never implemented:
  its runtime answers "OnError attach point not yet implemented").
- Limits: 1024 pages (64 MiB) memory, 1000 ms execution (epoch ticks of 100 ms), 1 MiB stack, 10 MiB body.
- Headers given to a module: names as the HTTP library holds them (lowercase), values that are visible ASCII only.
- A modify action applies headers-set (replace every value of the name), then headers-add (append), then
  headers-remove; a name or value that is not a valid header is skipped. On a request, `status` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

MODULE_TYPES: tuple[str, ...] = ("Middleware",)
ATTACH_POINTS: tuple[str, ...] = ("OnRequest", "OnResponse")
# The WIT interfaces a component exports for each attach point, and the function in it.
EXPORTS: dict[str, tuple[str, str]] = {
    "OnRequest": ("smg:gateway/middleware-on-request", "on-request"),
    "OnResponse": ("smg:gateway/middleware-on-response", "on-response"),
}

WASM_PAGE = 65536


class WasmError(Exception):
    """A module that cannot be used: not a component, wrong exports, bad limits (the admin API's 400)."""


class WasmTrap(Exception):
    """A module trapped, ran out of time or memory, or returned an unusable action: its request fails (500)."""

    def __init__(self, message: str, kind: str = "trap") -> None:
        super().__init__(message)
        # "trap" | "timeout" | "memory" | "stack" | "invalid": for metrics labels and the error message.
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    max_memory_bytes: int = 64 * 1024 * 1024
    max_execution_ms: int = 1000
    max_stack_bytes: int = 1024 * 1024
    max_body_bytes: int = 10 * 1024 * 1024

    def validate(self) -> None:
        """1.13's WasmRuntimeConfig::validate bounds, in bytes."""
        if not WASM_PAGE <= self.max_memory_bytes <= 65536 * WASM_PAGE:
            raise WasmError("max_memory_bytes must be between 64 KiB and 4 GiB")
        if not 0 < self.max_execution_ms <= 300_000:
            raise WasmError("max_execution_ms must be between 1 and 300000")
        if not 64 * 1024 <= self.max_stack_bytes <= 16 * 1024 * 1024:
            raise WasmError("max_stack_bytes must be between 64 KiB and 16 MiB")
        if not 0 < self.max_body_bytes <= 100 * 1024 * 1024:
            raise WasmError("max_body_bytes must be between 1 byte and 100 MiB")


class WasmRequest(NamedTuple):
    """A NamedTuple, not a frozen dataclass: built for every call on the request path, and a frozen
    dataclass's __init__ sets each field through object.__setattr__ (measured: ~2 us of ~4 per call here)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    request_id: str
    now_epoch_ms: int


class WasmResponse(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Reject:
    status: int


@dataclass(frozen=True)
class Modify:
    status: int | None = None
    headers_set: list[tuple[str, str]] = field(default_factory=list)
    headers_add: list[tuple[str, str]] = field(default_factory=list)
    headers_remove: list[str] = field(default_factory=list)
    body_replace: bytes | None = None


Action = Continue | Reject | Modify
CONTINUE = Continue()


def parse_attach_point(value: Any) -> str:
    """1.13's JSON form `{"Middleware": "OnRequest"}` -> "OnRequest"; WasmError otherwise."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, point),) = value.items()
        if kind == "Middleware" and point in ATTACH_POINTS:
            return point
        if kind == "Middleware" and point == "OnError":
            raise WasmError("OnError attach point not yet implemented")
    raise WasmError(
        f"invalid attach point {value!r}: expected {{'Middleware': 'OnRequest' | 'OnResponse'}}"
    )


def attach_point_json(point: str) -> dict[str, str]:
    return {"Middleware": point}


# RFC 9110 token characters: what the `http` crate accepts in a header name (1.13 skips anything else).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def valid_header_name(name: str) -> bool:
    return bool(name) and name.isascii() and all(c in _TCHAR for c in name.encode())


def valid_header_value(value: str) -> bool:
    """The `http` crate's HeaderValue::from_str: visible ASCII, space and tab; no other control characters."""
    return value.isascii() and all(c == 9 or 32 <= c < 127 for c in value.encode())


def headers_for_module(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What a module sees: lowercase names, only values `to_str()` accepts (1.13's build_wasm_headers...)."""
    return [(n.lower(), v) for n, v in headers if all(c == 9 or 32 <= c < 127 for c in v.encode())]


def apply_headers(headers: list[tuple[str, str]], action: Modify) -> list[tuple[str, str]]:
    """headers-set, then headers-add, then headers-remove (1.13's apply_modify_action_to_headers); names
    compare case-insensitively and are stored lowercase as the `http` crate does; invalid entries are skipped."""
    out = list(headers)
    for name, value in action.headers_set:
        if valid_header_name(name) and valid_header_value(value):
            low = name.lower()
            first = next((i for i, (n, _) in enumerate(out) if n.lower() == low), None)
            kept = [(n, v) for n, v in out if n.lower() != low]
            # `insert` replaces in place (the first entry's position), as HeaderMap does.
            pos = first if first is not None else len(kept)
            kept.insert(min(pos, len(kept)), (low, value))
            out = kept
    for name, value in action.headers_add:
        if valid_header_name(name) and valid_header_value(value):
            out.append((name.lower(), value))
    for name in action.headers_remove:
        if valid_header_name(name):
            low = name.lower()
            out = [(n, v) for n, v in out if n.lower() != low]
    return out


def apply_to_request(req: WasmRequest, action: Action) -> WasmRequest | int:
    """The request after an OnRequest action, or the status to answer with for a reject (1.13: a status that is
    not a valid HTTP status (100..999) becomes 400). A modify's `status` does not apply to a request."""
    if isinstance(action, Continue):
        return req
    if isinstance(action, Reject):
        return action.status if 100 <= action.status <= 999 else 400
    headers = apply_headers(req.headers, action)
    body = action.body_replace if action.body_replace is not None else req.body
    return WasmRequest(
        req.method, req.path, req.query, headers, body, req.request_id, req.now_epoch_ms
    )


def apply_to_response(resp: WasmResponse, action: Action) -> tuple[WasmResponse, bool]:
    """The response after an OnResponse action and whether the chain stops (a reject: 1.13 answers the
    rejected status with the current headers and body and runs no later module). An invalid status is 400 for a
    reject and ignored for a modify (1.13: `unwrap_or`)."""
    if isinstance(action, Continue):
        return resp, False
    if isinstance(action, Reject):
        status = action.status if 100 <= action.status <= 999 else 400
        return WasmResponse(status, resp.headers, resp.body), True
    status = resp.status
    if action.status is not None and 100 <= action.status <= 999:
        status = action.status
    headers = apply_headers(resp.headers, action)
    body = action.body_replace if action.body_replace is not None else resp.body
    return WasmResponse(status, headers, body), False
