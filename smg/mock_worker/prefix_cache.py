"""A simulated engine prefix cache (pure: no sockets, no clocks).

Real engines reuse the KV cache of a prompt prefix they computed before (SGLang's radix
cache, vLLM's automatic prefix caching) and report how much of the prompt they reused as
`usage.prompt_tokens_details.cached_tokens`. The mock imitates that at block granularity:

- Tokens are the mock's tokens (whitespace-separated words; token ids as written).
- The prompt is cut into blocks of `BLOCK_TOKENS`; block i is named by a chained xxhash
  (xxh3_64 of its text, seeded with block i-1's hash), so a name identifies the whole
  prefix up to that block and is stable across processes and runs.
- Only full blocks of the first n-1 tokens are cached: as in vLLM, the last prompt token
  is always computed (its logits start the output), so a repeated prompt never reports
  all of its tokens as cached.
- Lookup walks the blocks in order and stops at the first miss (a prefix match). Then
  every block of the prompt is stored or refreshed, last block first, so within one
  prompt the first blocks are the most recently used; eviction takes the least recently
  used block, i.e. a chain is trimmed from its tail, as a radix cache evicts leaves
  first. Capacity is in tokens, rounded down to whole blocks.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import xxhash

BLOCK_TOKENS = 16
_ROOT_SEED = 0


def block_hashes(tokens: Sequence[str], block: int = BLOCK_TOKENS) -> list[int]:
    """Chained hashes of the full blocks covering tokens[: len(tokens) - 1]."""
    usable = max(0, len(tokens) - 1) // block * block
    out: list[int] = []
    seed = _ROOT_SEED
    hash_ = xxhash.xxh3_64_intdigest
    for start in range(0, usable, block):
        # The separator keeps ["ab", "c"] and ["a", "bc"] apart.
        seed = hash_("\x1f".join(tokens[start : start + block]).encode(), seed)
        out.append(seed)
    return out


@dataclasses.dataclass
class CacheStats:
    """Counters since the start or the last reset (what /mock/stats shows)."""

    requests: int = 0  # prompts looked up
    hits: int = 0  # prompts with at least one cached block
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evicted_blocks: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dataclasses.asdict(self)
        out["hit_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return out


class PrefixCache:
    """An LRU over prompt blocks; `lookup(tokens)` returns the cached prefix length."""

    def __init__(self, capacity_tokens: int, block: int = BLOCK_TOKENS) -> None:
        if capacity_tokens < 0 or block < 1:
            raise ValueError("capacity_tokens must be >= 0 and block >= 1")
        self.block = block
        self.capacity_blocks = capacity_tokens // block
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.stats = CacheStats()

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block

    @property
    def used_tokens(self) -> int:
        return len(self._blocks) * self.block

    def clear(self) -> None:
        """Drop every block (an engine's /flush_cache); the counters stay."""
        self._blocks.clear()

    def reset(self) -> None:
        """Drop every block and zero the counters (a fresh worker)."""
        self._blocks.clear()
        self.stats = CacheStats()

    def lookup(self, tokens: Sequence[str]) -> int:
        """Cached tokens of this prompt; then store its blocks. Counts it in the stats."""
        hashes = block_hashes(tokens, self.block)
        blocks = self._blocks
        hit = 0
        for h in hashes:
            if h not in blocks:
                break
            hit += 1
        # Last block first: the prompt's first blocks end up most recently used.
        move = blocks.move_to_end
        for h in reversed(hashes):
            if h in blocks:
                move(h)
            else:
                blocks[h] = None
        evicted = 0
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
            evicted += 1
        cached = hit * self.block
        st = self.stats
        st.requests += 1
        st.hits += cached > 0
        st.prompt_tokens += len(tokens)
        st.cached_tokens += cached
        st.evicted_blocks += evicted
        return cached
