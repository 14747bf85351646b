"""The shared-memory worker table: a thin object over one anonymous shared mapping.

The supervisor creates it before forking, so every child inherits the same pages and no
named segment exists for a crash to leave behind or for a resource tracker to unlink.
Who writes what:

- control plane: rows (identity generation, status, backend load), the directory, the
  routing generation;
- data-plane process *p*: only its own in-flight slot of each row, and its process slot;
- root supervisor: process slots of dead children, zeroing their in-flight slots, and
  evening out sequence words a killed control plane left odd (it is the only writer then);
- any process, through atomic operations only (`atomic`): the gateway-wide words
  (admission, rate limit) and each row's health block (breaker, last contact).
"""

from __future__ import annotations

import mmap

import atomicshm

from smg.shm import layout
from smg.shm.directory import Directory, decode_directory, encode_directory
from smg.shm.layout import Geometry, ProcSlot, Row


class WorkerTable:
    def __init__(self, buf: mmap.mmap | bytearray, geo: Geometry) -> None:
        self.buf = buf
        self.geo = geo
        self._view = memoryview(buf)
        self._words = layout.words_of(buf)
        self._inflight = self._view[
            geo.inflight_offset : geo.inflight_offset + geo.capacity * geo.slots * 8
        ].cast("q")
        self.capacity = geo.capacity
        self.slots = geo.slots
        # Atomic load/store/fetch-add/compare-and-swap on the mapping (GCC builtins, ~30-60
        # ns a call); used for the words several processes change (see smg.shm.layout).
        self.atomic = atomicshm.AtomicView(buf)

    @classmethod
    def create(
        cls, capacity: int, slots: int, supervisor_pid: int, *, anonymous: bool = True
    ) -> WorkerTable:
        geo = layout.geometry(capacity, slots)
        buf: mmap.mmap | bytearray
        # mmap(-1, n) is MAP_SHARED | MAP_ANONYMOUS: shared with forked children, gone
        # with the last process that maps it.
        buf = mmap.mmap(-1, geo.total_size) if anonymous else bytearray(geo.total_size)
        layout.init_header(buf, geo, supervisor_pid)
        table = cls(buf, geo)
        table.publish_directory(Directory(entries=[]))
        return table

    # --- rows ----------------------------------------------------------------------------

    def read_row(self, row: int) -> Row:
        return layout.read_row(
            self.buf, self.geo.rows_offset + row * layout.ROW_SIZE, words=self._words
        )

    def write_row(self, row: int, value: Row) -> None:
        layout.write_row(
            self.buf, self.geo.rows_offset + row * layout.ROW_SIZE, value, words=self._words
        )

    def repair_sequences(self) -> int:
        """Even out sequence words a killed writer left odd; only with no writer alive."""
        return layout.repair_sequence_words(self.buf, self.geo)

    # --- in-flight counters ----------------------------------------------------------------

    def in_flight(self, row: int) -> int:
        start = row * self.slots
        return sum(self._inflight[start : start + self.slots])

    def set_in_flight(self, proc: int, row: int, value: int) -> None:
        self._inflight[row * self.slots + proc] = value

    def zero_process(self, proc: int) -> None:
        """Zero a dead process's slots; only safe once that process no longer runs."""
        for row in range(self.capacity):
            self._inflight[row * self.slots + proc] = 0

    def total_in_flight(self) -> int:
        return sum(self._inflight)

    # --- directory ---------------------------------------------------------------------------

    def publish_directory(self, directory: Directory) -> int:
        return layout.write_directory(self.buf, self.geo, encode_directory(directory))

    def directory_generation(self) -> int:
        return layout.directory_generation(self.buf)

    def read_directory(self) -> tuple[int, Directory]:
        generation, blob = layout.read_directory(self.buf, self.geo)
        return generation, decode_directory(blob)

    # --- header fields -------------------------------------------------------------------------

    def routing_generation(self) -> int:
        return layout.routing_generation(self.buf)

    def bump_routing_generation(self) -> int:
        return layout.bump_routing_generation(self.buf)

    def gateway_state(self) -> int:
        return layout.gateway_state(self.buf)

    def set_gateway_state(self, state: int) -> None:
        layout.set_gateway_state(self.buf, state)

    # --- process slots ---------------------------------------------------------------------------

    def write_proc(
        self, index: int, pid: int, state: int, started: float, reason: str = ""
    ) -> None:
        layout.write_proc(self.buf, self.geo, index, pid, state, started, reason)

    def read_proc(self, index: int) -> ProcSlot:
        return layout.read_proc(self.buf, self.geo, index)

    # --- offsets of atomic words (use with `self.atomic`) -------------------------------------

    def global_offset(self, word: int) -> int:
        return layout.global_offset(self.geo, word)

    def proc_word_offset(self, index: int, word: int) -> int:
        return layout.proc_word_offset(self.geo, index, word)

    def health_offset(self, row: int, word: int = 0) -> int:
        return layout.health_offset(self.geo, row, word)
