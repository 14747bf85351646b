"""HTTP/2 wire pieces shared by the mock's server (smg.mock_worker.h2fast) and the data
plane's client (smg.grpc.h2client): frame types and flags (RFC 9113 section 6), the frame
header, and HPACK literals that need no encoder state (RFC 7541 section 6.2.2: literal
without indexing, no Huffman), so a header block can be built once and reused."""

from __future__ import annotations

import struct
from typing import Any

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
(
    DATA,
    HEADERS,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    PUSH_PROMISE,
    PING,
    GOAWAY,
    WINDOW_UPDATE,
    CONTINUATION,
) = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((ftype, flags))
        + struct.pack(">I", sid)
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A header field literal without indexing, new name, no Huffman."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


# SETTINGS identifiers (RFC 9113 6.5.2) both ends read.
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5


def settings_values(payload: bytes) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a SETTINGS frame's payload (RFC 9113 6.5.1)."""
    return [struct.unpack_from(">HI", payload, i) for i in range(0, len(payload) - 5, 6)]


def apply_settings(conn: Any, payload: bytes) -> None:
    """A peer's SETTINGS frame applied to a connection, the client's or the mock
    server's: each has `peer_window` (SETTINGS_INITIAL_WINDOW_SIZE, whose change moves
    every open stream's `send_window` by the difference, RFC 9113 6.9.2),
    `peer_max_frame` and `peer_max_streams`, and `streams` by id."""
    for key, value in settings_values(payload):
        if key == SETTINGS_INITIAL_WINDOW_SIZE:
            delta = value - conn.peer_window
            conn.peer_window = value
            for st in conn.streams.values():
                st.send_window += delta
        elif key == SETTINGS_MAX_FRAME_SIZE:
            conn.peer_max_frame = value
        elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
            conn.peer_max_streams = value


def header_fragment(flags: int, payload: bytes) -> bytes:
    """A HEADERS frame's header-block fragment: its padding and priority fields dropped
    (RFC 9113 6.2)."""
    if flags & PADDED:
        payload = payload[1 : len(payload) - payload[0]]
    if flags & PRIORITY_FLAG:
        payload = payload[5:]
    return payload


def window_increment(payload: bytes) -> int:
    """A WINDOW_UPDATE frame's increment (RFC 9113 6.9; the reserved bit dropped)."""
    return struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
