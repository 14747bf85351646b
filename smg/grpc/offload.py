"""Rendering and tokenizing a large prompt off the event loop, on a bounded thread pool.

A data-plane process serves every stream of its connections from one loop: a 32K-token
prompt rendered and tokenized inline holds that loop for tens of milliseconds, and every
other stream's next token waits that long. Above `threshold` bytes of request body the
work moves to a small ThreadPoolExecutor: `tokenizers`' encode releases the GIL (it runs
in Rust), so the loop keeps running in parallel; jinja rendering holds the GIL, but in a
thread it is preempted every `sys.getswitchinterval()` (5 ms) instead of blocking the loop
for its whole duration. Below the threshold the thread hand-off (~50-100 us) costs more
than it saves, so small prompts stay inline. See native_bench/offload_bench.py for the
measurement that set the numbers.

The pool is bounded (`workers` threads); a request over the threshold waits its turn in
the executor's queue rather than starting more threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from smg.config import GatewayConfig

T = TypeVar("T")

# Request bodies above this many bytes are rendered and tokenized on the pool (measured:
# native_bench/offload_bench.py; about 1 ms of inline work on this box's slow cores).
DEFAULT_THRESHOLD = 16 * 1024
DEFAULT_WORKERS = 2


class Offload:
    def __init__(self, threshold: int = DEFAULT_THRESHOLD, workers: int = DEFAULT_WORKERS) -> None:
        self.threshold = threshold
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None  # made on first use (after the fork)
        self.offloaded = 0
        self.inline = 0

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> Offload:
        return cls()

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="smg-tokenize")
        return self._pool

    async def run(self, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, inline when `size` is at most the threshold, else on the
        pool (the caller awaits either way)."""
        if size <= self.threshold:
            self.inline += 1
            return fn(*args, **kwargs)
        self.offloaded += 1
        loop = asyncio.get_running_loop()
        call = partial(fn, *args, **kwargs) if kwargs else partial(fn, *args)
        return await loop.run_in_executor(self.pool(), call)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
