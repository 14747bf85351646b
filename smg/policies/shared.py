"""Routing state shared by every process of one gateway (issue 9).

The supervisor creates it before any fork (`SharedRouting.create`), so every child
inherits the same anonymous shared mappings; data-plane processes build their policy with
it (`make_policy(..., shared=...)`), tests pass None. One optional attribute per shared
structure; a structure the configured policy does not use is not created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smg.shm.prefix import PrefixIndex, entries_for


@dataclass
class SharedRouting:
    # cache_aware: per-process regions of block-chain hash -> worker (smg.shm.prefix).
    prefix_index: PrefixIndex | None = None
    # manual / sticky sessions: routing key -> worker (owned by the sticky-key work).
    sticky_keys: Any = None
    # This process's table slot (the region it writes), set by the data-plane process
    # after the fork on its own copy of this object; 0 elsewhere.
    slot: int = 0

    @classmethod
    def create(cls, cfg: object, slots: int) -> SharedRouting:
        """The structures `cfg`'s policy needs, for `slots` data-plane process slots."""
        shared = cls()
        if getattr(cfg, "policy", None) == "cache_aware":
            max_tree_size = getattr(cfg, "max_tree_size", None) or 67108864
            shared.prefix_index = PrefixIndex.create(slots, entries_for(int(max_tree_size)))
        return shared
