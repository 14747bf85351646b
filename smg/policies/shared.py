"""Routing structures shared by every process, created by the supervisor before it forks.

One optional attribute per structure; a policy that needs one and gets None (tests, a
single process) keeps a private copy instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smg.shm.keytable import KeyTable


@dataclass
class SharedRouting:
    prefix_index: Any | None = None  # cache_aware's shared prefix index (cache engineer)
    sticky_keys: KeyTable | None = None  # sticky routing-key pins (manual, --routing-key-override)
    # This process's data-plane slot, set by each child after the fork (its own copy):
    # the region it writes in per-process tables (a live reload's replacement has
    # another slot than its predecessor, so the two never write one region).
    slot: int = 0

    @classmethod
    def create(cls, cfg: object, slots: int) -> SharedRouting:
        """`slots`: data-plane process slots (one region each in the per-process tables)."""
        shared = cls()
        # Always made, whatever --policy says: a worker's `policy` label may ask for manual
        # at run time, and a reload may turn --routing-key-override on. An anonymous
        # mapping's pages cost memory only once written, so an unused table is free.
        shared.sticky_keys = KeyTable.create(slots)
        return shared
