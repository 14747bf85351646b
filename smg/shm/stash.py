"""A small shared buffer that outlives the process writing it: one writer at a time, a
later process reads what the last one left (the control plane's folded metric totals,
which must survive a control-plane crash).

Double-buffered: the writer fills the inactive half, then flips one 8-byte word (the
active half and its length). A writer killed mid-write leaves the active half whole.
Readers only run when no writer does (the next control plane, once the last is gone).
Pure code over a buffer (an anonymous shared mmap in production, a bytearray in tests).
"""

from __future__ import annotations

import mmap
import struct

_POINTER = struct.Struct("<II")  # active half, length
HEADER = 64


class Stash:
    def __init__(self, buf: mmap.mmap | bytearray) -> None:
        self.buf = buf
        self.half = (len(buf) - HEADER) // 2

    @classmethod
    def create(cls, size: int = 4 * 1024 * 1024) -> Stash:
        # MAP_SHARED | MAP_ANONYMOUS: inherited by every child forked after this.
        return cls(mmap.mmap(-1, size))

    def write(self, blob: bytes) -> bool:
        """Store `blob`; False (nothing changed) when it does not fit."""
        if len(blob) > self.half:
            return False
        active, _length = _POINTER.unpack_from(self.buf, 0)
        target = 1 - active if active in (0, 1) else 0
        start = HEADER + target * self.half
        self.buf[start : start + len(blob)] = blob
        # One aligned 8-byte store flips half and length together.
        self.buf[0:8] = _POINTER.pack(target, len(blob))
        return True

    def read(self) -> bytes:
        active, length = _POINTER.unpack_from(self.buf, 0)
        if active not in (0, 1) or length > self.half:
            return b""
        start = HEADER + active * self.half
        return bytes(self.buf[start : start + length])
