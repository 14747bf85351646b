"""The policy interface: pure selection logic over a read-only view of worker load.

A policy never touches sockets or shared memory directly: it reads load through a
`LoadView`, which the data plane backs with the shared-memory table and tests back
with an in-memory fake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec


class BackendLoad(msgspec.Struct, frozen=True):
    """What the load monitor last read from a worker's own load endpoint."""

    running: int = 0  # requests the engine is running
    waiting: int = 0  # requests queued inside the engine
    token_usage: float = 0.0  # KV-cache usage, 0.0-1.0
    throughput: float = 0.0  # generation tokens/s the engine reports, 0 if unknown
    valid: bool = False  # False until a scrape succeeded (then only in-flight counts apply)
    # Added for least_load / power_of_two (Rust `num_waiting_uncached_tokens`, summed over DP
    # ranks): prompt tokens queued and not served from cache; 0 = not reported, and the
    # policies then estimate the queue as waiting * mean_prefill_tokens.
    waiting_tokens: int = 0
    # When the monitor stored this scrape (any clock; only changes matter). A new value
    # tells a policy a fresh poll arrived, so its "dispatched since the last poll" tally
    # for the worker restarts from zero, as Rust's update_loads does.
    updated: float = 0.0


class LoadView(Protocol):
    def in_flight(self, row: int) -> int:
        """Requests this gateway has in flight to the worker, summed over all processes."""
        ...

    def backend_load(self, row: int) -> BackendLoad:
        """The worker's last backend-reported load."""
        ...


class RouteRequest(msgspec.Struct):
    """What routing knows about one request (parsed once, cheaply)."""

    model: str | None = None
    stream: bool = False
    text: str | None = None  # prompt text, only extracted for policies that need it
    prompt_tokens: int | None = None  # token count when known (gRPC mode)
    # gRPC mode: the prompt's token ids as `array("I", ids).tobytes()` (4 bytes a token);
    # prefix policies hash these instead of `text` when present.
    token_ids: bytes | None = None
    # X-SMG-Routing-Key (or the first valid --routing-key-headers value); only read when
    # the policy uses keys (`uses_routing_key`) or --routing-key-override is on.
    routing_key: str | None = None
    # X-SMG-Target-Worker, read under the same condition: a worker id, URL or index.
    target_worker: str | None = None
    # True once an attempt of this request failed (set by the data plane before it asks
    # for the next worker): sticky policies then route around the pinned worker without
    # moving the pin, as the Rust SMG keeps a pin while its worker stays healthy.
    retry: bool = False


class NoEligibleWorker(LookupError):
    """Raised by select() when the policy vetoes every row (least_load's waiting-queue
    cap): Rust returns no worker and the request goes to the admission queue."""


class Policy:
    """Base class: choose one of `rows` (worker table rows, all routable).

    One instance serves every model in a process. State that depends on the candidate
    list is kept per `request.model` (round_robin's rotation, as Rust's per-model policy
    registry does); state about a worker is keyed by row and shared across models
    (least_load's and power_of_two's since-poll tallies: a worker has one queue, whatever
    model filled it).
    """

    name: str = "base"
    needs_text: bool = False  # True makes the data plane extract the prompt text
    needs_backend_loads: bool = False  # True: the load monitor must poll the workers
    # True makes the data plane read the routing-key and target-worker headers.
    uses_routing_key: bool = False
    # consistent_hashing: with no routing key, use authorization / x-forwarded-for /
    # cookie as the key (Rust 1.13's implicit session affinity).
    implicit_key: bool = False

    def on_directory(self, workers: dict[int, tuple[int, str]]) -> None:
        """The fleet changed: row -> (generation, url) of every registered worker (ring
        and sticky policies key workers by URL and check a pinned row's generation)."""

    def select(self, rows: Sequence[int], view: LoadView, request: RouteRequest) -> int:
        raise NotImplementedError

    def on_dispatch(self, row: int) -> None:
        """Called after the data plane sent a request to `row` (optional bookkeeping)."""

    def on_complete(self, row: int) -> None:
        """Called when a request to `row` ended, however it ended."""
