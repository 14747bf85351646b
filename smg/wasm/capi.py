"""smg:gateway values <-> wasmtime's C API component values (wasmtime_component_val_t), fast.

wasmtime-py's generic converters build values field by field through ctypes and lower a list<u8> with one
Python call per byte (~1 us per byte). Here an argument is packed with `struct` into ONE Python-owned bytearray
(the C API only reads arguments: nothing goes through wasmtime's allocator, nothing is freed after), the body's
32-byte-per-byte list shape written with two strided slice copies; a result is read back with `string_at` and
`struct` and then freed once by the caller (wasmtime_component_val_delete).

C layouts (wasmtime 50, x86-64/aarch64; checked against wasmtime-py's ctypes definitions at import):
val = {u8 kind; 7 pad; union of (at +8)} = 32 bytes; a string, list or record in the union is {size_t size;
T *data}; a variant is {name discriminant (size, data); val *payload}; an option is a val * (NULL for none).
A record entry = {name (size, data); val} = 48 bytes.
"""

from __future__ import annotations

import ctypes
import struct
from ctypes import addressof, string_at
from typing import Any

from wasmtime import _ffi as ffi

from smg.wasm.types import CONTINUE, Action, Modify, Reject, WasmRequest, WasmResponse, WasmTrap

VAL = ffi.wasmtime_component_val_t
_ENTRY = ffi.wasmtime_component_valrecord_entry_t
VAL_SIZE = 32
ENTRY_SIZE = 48
if (ctypes.sizeof(VAL), VAL.of.offset, ctypes.sizeof(_ENTRY), _ENTRY.val.offset) != (32, 8, 48, 16):
    raise ImportError("unexpected wasmtime C API value layout")  # pragma: no cover

K_U8 = ffi.WASMTIME_COMPONENT_U8.value
K_U16 = ffi.WASMTIME_COMPONENT_U16.value
K_U64 = ffi.WASMTIME_COMPONENT_U64.value
K_STRING = ffi.WASMTIME_COMPONENT_STRING.value
K_LIST = ffi.WASMTIME_COMPONENT_LIST.value
K_RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
K_VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value
K_OPTION = ffi.WASMTIME_COMPONENT_OPTION.value

_V = struct.Struct("<B7xQQQ")  # a val: kind and the union's first three words
_E = struct.Struct("<QQB7xQQQ")  # an entry: name size, name data, then its val
_U8_KIND = bytes((K_U8,))

_STATIC: list[Any] = []


def _static(text: bytes) -> tuple[int, int]:
    """(len, address) of a field name in memory that lives as long as the process."""
    buf = ctypes.create_string_buffer(text, len(text))
    _STATIC.append(buf)
    return len(text), addressof(buf)


_REQUEST_NAMES = [
    _static(n) for n in (b"method", b"path", b"query", b"headers", b"body", b"request-id")
]
_NOW = _static(b"now-epoch-ms")
_RESPONSE_NAMES = [_static(n) for n in (b"status", b"headers", b"body")]
_NAME = _static(b"name")
_VALUE = _static(b"value")


class Packed:
    """An argument value in Python-owned memory; keep it alive until the call returns."""

    __slots__ = ("anchor", "buf", "val")

    def __init__(self, buf: bytearray, anchor: Any) -> None:
        self.buf = buf
        self.anchor = (
            anchor  # the ctypes view that pins `buf` (a bytearray with an export cannot move)
        )
        self.val = VAL.from_address(addressof(anchor))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def _layout(
    n_fields: int, headers: list[tuple[str, str]], body: bytes, strings: list[bytes]
) -> tuple[bytearray, Any, int, list[tuple[bytes, bytes]], int, int, int]:
    # A WIT string must be valid UTF-8 (the C API would abort on one that is not): lone surrogates become "?".
    hs = [(_utf8(n), _utf8(v)) for n, v in headers]
    for n, v in hs:
        strings.append(n)
        strings.append(v)
    o_hv = VAL_SIZE + n_fields * ENTRY_SIZE
    o_he = o_hv + len(hs) * VAL_SIZE
    o_body = o_he + len(hs) * 2 * ENTRY_SIZE
    o_str = o_body + len(body) * VAL_SIZE
    blob = b"".join(strings)
    buf = bytearray(o_str + len(blob))
    buf[o_str:] = blob
    anchor = ctypes.c_char.from_buffer(buf)
    return buf, anchor, addressof(anchor), hs, o_hv, o_body, o_str


def _pack_list_headers(
    buf: bytearray, base: int, hs: list[tuple[bytes, bytes]], o_hv: int, p: int
) -> int:
    """The header list's records at o_hv, their entries after them; strings from address p on. Returns p."""
    o_he = o_hv + len(hs) * VAL_SIZE
    for i, (n, v) in enumerate(hs):
        e = o_he + i * 2 * ENTRY_SIZE
        _V.pack_into(buf, o_hv + i * VAL_SIZE, K_RECORD, 2, base + e, 0)
        _E.pack_into(buf, e, _NAME[0], _NAME[1], K_STRING, len(n), p, 0)
        p += len(n)
        _E.pack_into(buf, e + ENTRY_SIZE, _VALUE[0], _VALUE[1], K_STRING, len(v), p, 0)
        p += len(v)
    return p


def _pack_body(buf: bytearray, o_body: int, body: bytes) -> None:
    n = len(body)
    if n:
        end = o_body + n * VAL_SIZE
        buf[o_body:end:VAL_SIZE] = _U8_KIND * n
        buf[o_body + 8 : end : VAL_SIZE] = body


def lower_request(req: WasmRequest) -> Packed:
    scalars = [_utf8(req.method), _utf8(req.path), _utf8(req.query), _utf8(req.request_id)]
    buf, anchor, base, hs, o_hv, o_body, o_str = _layout(7, req.headers, req.body, list(scalars))
    _V.pack_into(buf, 0, K_RECORD, 7, base + VAL_SIZE, 0)
    p = base + o_str
    e = VAL_SIZE
    for (nlen, naddr), s in zip((_REQUEST_NAMES[0], _REQUEST_NAMES[1], _REQUEST_NAMES[2]), scalars):
        _E.pack_into(buf, e, nlen, naddr, K_STRING, len(s), p, 0)
        p += len(s)
        e += ENTRY_SIZE
    rid = scalars[3]
    rid_p = p
    p += len(rid)
    _E.pack_into(buf, e, *_REQUEST_NAMES[3], K_LIST, len(hs), base + o_hv, 0)
    _E.pack_into(buf, e + ENTRY_SIZE, *_REQUEST_NAMES[4], K_LIST, len(req.body), base + o_body, 0)
    _E.pack_into(buf, e + 2 * ENTRY_SIZE, *_REQUEST_NAMES[5], K_STRING, len(rid), rid_p, 0)
    _E.pack_into(buf, e + 3 * ENTRY_SIZE, *_NOW, K_U64, req.now_epoch_ms & 0xFFFFFFFFFFFFFFFF, 0, 0)
    _pack_list_headers(buf, base, hs, o_hv, p)
    _pack_body(buf, o_body, req.body)
    return Packed(buf, anchor)


def lower_response(resp: WasmResponse) -> Packed:
    buf, anchor, base, hs, o_hv, o_body, o_str = _layout(3, resp.headers, resp.body, [])
    _V.pack_into(buf, 0, K_RECORD, 3, base + VAL_SIZE, 0)
    e = VAL_SIZE
    _E.pack_into(buf, e, *_RESPONSE_NAMES[0], K_U16, resp.status & 0xFFFF, 0, 0)
    _E.pack_into(buf, e + ENTRY_SIZE, *_RESPONSE_NAMES[1], K_LIST, len(hs), base + o_hv, 0)
    _E.pack_into(
        buf, e + 2 * ENTRY_SIZE, *_RESPONSE_NAMES[2], K_LIST, len(resp.body), base + o_body, 0
    )
    _pack_list_headers(buf, base, hs, o_hv, base + o_str)
    _pack_body(buf, o_body, resp.body)
    return Packed(buf, anchor)


# --- lifting --------------------------------------------------------------------------------------------------


def _malformed() -> WasmTrap:
    return WasmTrap("module returned a malformed action", "invalid")


def _val(addr: int) -> tuple[int, int, int, int]:
    return _V.unpack(string_at(addr, VAL_SIZE))


def _str(kind: int, size: int, data: int) -> str:
    if kind != K_STRING:
        raise _malformed()
    return string_at(data, size).decode("utf-8", "replace") if size else ""


def _list(kind: int, size: int, data: int) -> bytes:
    """The raw 32-byte values of a list."""
    if kind != K_LIST:
        raise _malformed()
    return string_at(data, size * VAL_SIZE) if size else b""


def _headers(kind: int, size: int, data: int) -> list[tuple[str, str]]:
    raw = _list(kind, size, data)
    out = []
    for off in range(0, len(raw), VAL_SIZE):
        _, n, entries, _ = _V.unpack_from(raw, off)
        if n != 2:
            raise _malformed()
        pair = string_at(entries, 2 * ENTRY_SIZE)
        _, _, k1, s1, d1, _ = _E.unpack_from(pair, 0)
        _, _, k2, s2, d2, _ = _E.unpack_from(pair, ENTRY_SIZE)
        out.append((_str(k1, s1, d1), _str(k2, s2, d2)))
    return out


def lift_action(result: Any) -> Action:
    """The action in `result` (a VAL the call filled); the caller frees it."""
    kind, dsize, dptr, payload = _V.unpack(string_at(addressof(result), VAL_SIZE))
    if kind != K_VARIANT:
        raise _malformed()
    tag = string_at(dptr, dsize)
    if tag == b"continue":
        return CONTINUE
    if not payload:
        raise _malformed()
    if tag == b"reject":
        _, status, _, _ = _val(payload)
        return Reject(status & 0xFFFF)
    if tag != b"modify":
        raise WasmTrap(f"module returned an unknown action {tag!r}", "invalid")
    rkind, n, entries, _ = _val(payload)
    if rkind != K_RECORD or n != 5:
        raise _malformed()
    raw = string_at(entries, 5 * ENTRY_SIZE)
    f = [_E.unpack_from(raw, i * ENTRY_SIZE)[2:] for i in range(5)]
    status = None
    if f[0][1]:  # option<u16>: the payload pointer
        status = _val(f[0][1])[1] & 0xFFFF
    body = None
    if f[4][1]:
        bk, bn, bd, _ = _val(f[4][1])
        body = _list(bk, bn, bd)[8::VAL_SIZE]
    remove = []
    hraw = _list(*f[3][:3])
    for off in range(0, len(hraw), VAL_SIZE):
        sk, sn, sd, _ = _V.unpack_from(hraw, off)
        remove.append(_str(sk, sn, sd))
    return Modify(
        status=status,
        headers_set=_headers(*f[1][:3]),
        headers_add=_headers(*f[2][:3]),
        headers_remove=remove,
        body_replace=body,
    )
