"""Rendering and tokenizing a large prompt off the event loop, on a bounded thread pool.

A data-plane process serves every stream of its connections from one loop: a 32K-token
prompt rendered and tokenized inline holds that loop for 130-280 ms on the dev box, and
every other stream's next token waits that long. Above `threshold` bytes of request body
the work moves to a small ThreadPoolExecutor. What runs there must let go of the GIL to
help: `tokenizers`' `encode_batch` does (it runs in Rust without the GIL), its `encode`
does not (tokenizers 0.23, measured: a thread in `encode` stalls the loop for its whole
run); jinja rendering holds the GIL but is cheap (0.1-2 ms for 32K tokens of chat) and in
a thread it is preempted every `sys.getswitchinterval()` (5 ms). Below the threshold the
thread hand-off costs more than it saves, so small prompts stay inline.
native_bench/grpc_offload_bench.py measures it: p99 inter-token gap of 32 streams (10 ms
apart) while a 32K-token chat prompt arrives every 500 ms: inline 126-173 ms, offloaded
with `encode` 82-100 ms, offloaded with `encode_batch` 13-14 ms. Llama-3-style tokenizers
encode through smg.tokenizer.fastpath (plain Python, preempted every switch interval)
there too: the same gaps (offload-fast mode) at half the CPU.

The pool is bounded (`workers` threads); a request over the threshold waits its turn in
the executor's queue rather than starting more threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from smg.config import GatewayConfig

T = TypeVar("T")

# Request bodies above this many bytes are rendered and tokenized on the pool. Measured
# on the 2-core dev box (Llama-3 tokenizer, Llama-3.1 template): a 4 KiB prompt costs
# ~0.9 ms (render 40 us + encode 0.85 ms), 16 KiB ~4.7 ms, 32K tokens 130-280 ms; the
# thread hand-off costs ~0.1 ms, so from ~8 KiB on the loop gains more than it pays.
DEFAULT_THRESHOLD = 8 * 1024
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
        # SMG__GRPC_OFFLOAD_BYTES: the threshold, for measuring (a huge value: never).
        raw = os.environ.get("SMG__GRPC_OFFLOAD_BYTES", "")
        threshold = int(raw) if raw.isdigit() else DEFAULT_THRESHOLD
        return cls(threshold=threshold)

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
