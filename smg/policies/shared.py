"""Routing state shared by every process of one gateway (issue 9).

The supervisor creates it before any fork (`SharedRouting.create`), so every child
inherits the same anonymous shared mappings; data-plane processes build their policy with
it (`make_policy(..., shared=...)`), tests pass None (a policy that needs a structure and
gets None keeps a private copy instead). One optional attribute per shared structure.
"""

from __future__ import annotations

from dataclasses import dataclass

from smg.policies.bucket import BucketShare
from smg.shm.keytable import KeyTable
from smg.shm.prefix import PrefixIndex, entries_for


@dataclass
class SharedRouting:
    # cache_aware: per-process regions of block-chain hash -> worker (smg.shm.prefix).
    prefix_index: PrefixIndex | None = None
    # manual / --routing-key-override: routing key -> worker pins (smg.shm.keytable).
    sticky_keys: KeyTable | None = None
    # bucket (--prefill-policy): per-process request rings and the control plane's
    # published boundaries (smg.policies.bucket).
    bucket: BucketShare | None = None
    # This process's data-plane slot, set by each child after the fork (its own copy):
    # the region it writes in per-process tables (a live reload's replacement has
    # another slot than its predecessor, so the two never write one region).
    slot: int = 0

    @classmethod
    def create(cls, cfg: object, slots: int) -> SharedRouting:
        """Both structures, for `slots` data-plane process slots, whatever --policy says: a
        worker's `policy` label may ask for cache_aware or manual at run time, and a reload
        may switch the policy or turn --routing-key-override on. An anonymous mapping's
        pages cost memory only once written, so an unused structure is (nearly) free."""
        max_tree_size = getattr(cfg, "max_tree_size", None) or 67108864
        return cls(
            prefix_index=PrefixIndex.create(slots, entries_for(int(max_tree_size))),
            sticky_keys=KeyTable.create(slots),
            bucket=BucketShare.create(slots),
        )
