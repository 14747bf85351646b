"""`prefix_hash`: requests sharing a prompt prefix go to the same worker (KV-cache reuse).

Rust source: model_gateway/src/policies/prefix_hash.rs (lightseekorg/smg). The first
--prefix-token-count tokens are hashed (xxh3-64) onto the consistent-hash ring (the one
consistent_hashing uses, placed by worker URL); over HTTP the text is not tokenized and
four times as many characters are hashed instead; in gRPC mode the gateway tokenized the
prompt and the first --prefix-token-count token ids (`RouteRequest.token_ids`, 4 bytes
each) are hashed. A worker is overloaded when its load
(requests in flight, all processes) is above the mean load (counting the incoming
request) times --prefix-hash-load-factor AND more than
--prefix-hash-balance-abs-threshold over that mean; an overloaded worker is passed over
by walking the ring clockwise to the next one that is not. If every worker is
overloaded the ring's first choice is kept. Without prompt text: the least loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from smg.policies.base import LoadView, Policy, RouteRequest
from smg.policies.consistent_hashing import HashRing

CHARS_PER_TOKEN = 4  # untokenized requests hash this many characters per token
TOKEN_BYTES = 4  # RouteRequest.token_ids: array("I") bytes


def token_prefix_position(token_ids: bytes, prefix_token_count: int) -> int:
    return xxhash.xxh3_64_intdigest(token_ids[: prefix_token_count * TOKEN_BYTES])


def prefix_position(text: str, prefix_token_count: int) -> int:
    prefix = text[: prefix_token_count * CHARS_PER_TOKEN]
    return xxhash.xxh3_64_intdigest(prefix.encode("utf-8", "surrogatepass"))


def overloaded(load: int, total: int, workers: int, factor: float, abs_threshold: int) -> bool:
    """Whether `load` is too far above the mean of `total` over `workers` (the incoming
    request counted), both relatively and absolutely."""
    if total == 0 or workers == 0:
        return False
    mean = (total + 1) / workers
    return load > mean * factor and load - mean > abs_threshold


class PrefixHashPolicy(Policy):
    name = "prefix_hash"
    needs_text = True

    def __init__(self, prefix_token_count: int, load_factor: float, abs_threshold: int) -> None:
        self.prefix_token_count = prefix_token_count
        self.load_factor = load_factor
        self.abs_threshold = abs_threshold
        self.ring = HashRing(())

    def on_directory(self, workers: dict[int, tuple[int, str]]) -> None:
        self.ring = HashRing((row, url) for row, (_gen, url) in workers.items())

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        loads = {row: view.in_flight(row) for row in rows}
        tokens = request.token_ids
        text = request.text
        if tokens or text:
            position = (
                token_prefix_position(tokens, self.prefix_token_count)
                if tokens
                else prefix_position(text, self.prefix_token_count)  # type: ignore[arg-type]
            )
            total = sum(loads.values())
            n = len(rows)
            first: int | None = None
            for row in self.ring.walk(position):
                if row not in loads:
                    continue
                if first is None:
                    first = row
                if not overloaded(loads[row], total, n, self.load_factor, self.abs_threshold):
                    return row
            if first is not None:
                return first
        return min(rows, key=loads.__getitem__)
