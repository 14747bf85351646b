"""GET /health_generate on the HTTP PD router, as 1.13's (pd_router.rs health_generate):
one pair, a prefill and a decode from the available workers, both asked at once; 200 with
a text line naming the pair when both answer 2xx, else 503 health_generate_failed whose
message lists each failure in 1.13's words (a Rust `{:?}` of the list)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from smg.dataplane.pool_leg import PoolLeg

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.upstream import WorkerPool

PATH = "/health_generate"
NO_ANSWER = 0  # a probe's status when the worker did not answer (connection, timeout)


def status_text(status: int) -> str:
    """The status as the http crate's StatusCode displays it ("503 Service Unavailable")."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} <unknown status code>"


def failure(kind: str, url: str, status: int) -> str | None:
    """One leg's entry in 1.13's failure list (None: it passed). A worker that did not
    answer reads as reqwest's send error."""
    if 200 <= status < 300:
        return None
    if status == NO_ANSWER:
        return f"{kind} {url} error: error sending request for url ({url}{PATH})"
    return f"{kind} {url} returned status {status_text(status)}"


def rust_debug(items: list[str]) -> str:
    """A Vec<String>'s `{:?}`: ["a", "b"] with quotes and backslashes escaped."""
    quoted = ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items)
    return "[" + ", ".join(quoted) + "]"


def verdict(prefill_url: str, p_status: int, decode_url: str, d_status: int) -> tuple[int, str]:
    """(200, the text body) or (503, the health_generate_failed message)."""
    errors = [
        text
        for text in (
            failure("Prefill", prefill_url, p_status),
            failure("Decode", decode_url, d_status),
        )
        if text is not None
    ]
    if errors:
        return 503, f"Health generate failed: {rust_debug(errors)}"
    return 200, (
        f"Health generate passed on selected pair: prefill={prefill_url}, decode={decode_url}"
    )


class HealthProbe(PoolLeg):
    """One worker's GET /health_generate; `on_done(status)` once (NO_ANSWER if none)."""

    __slots__ = ("on_done",)

    def __init__(
        self, app: DataPlane, pool: WorkerPool, head: bytes, on_done: Callable[[int], None]
    ) -> None:
        super().__init__(app, pool, head, b"")
        self.on_done = on_done  # only the status counts, as in 1.13: the body is dropped

    def flush(self) -> None:
        if self.complete and not self.done:
            self._release()
            self._finish(self.status)

    def _failed(self) -> None:
        if not self.done:
            self._drop()
            self._finish(NO_ANSWER)

    def abort(self) -> None:
        """Out of time: the request is dropped and reads as not answered."""
        self._failed()

    def _finish(self, status: int) -> None:
        self.done = True
        self.on_done(status)


async def probe_pair(
    app: DataPlane, legs: list[tuple[WorkerPool, bytes]], timeout: float
) -> list[int]:
    """Each (pool, request head)'s GET at once; their statuses (NO_ANSWER for one that did
    not answer within `timeout`)."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[int]] = []
    probes: list[HealthProbe] = []
    for pool, head in legs:
        future: asyncio.Future[int] = loop.create_future()
        probe = HealthProbe(app, pool, head, lambda s, f=future: f.done() or f.set_result(s))
        futures.append(future)
        probes.append(probe)
        probe.start()
    try:
        await asyncio.wait(futures, timeout=timeout)
    finally:  # out of time, or cancelled (the client left): the requests are dropped
        for probe in probes:
            probe.abort()  # a no-op for one that finished
    return [f.result() for f in futures]


class Pending:
    """Sits in `conn.exchange` while a pair is asked, so that a client leaving stops the
    probes at once (`client_gone`) rather than at the request timeout."""

    __slots__ = ("task",)
    upstream = None  # (what the client connection's back-pressure looks at)

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def client_gone(self) -> None:
        if self.task is not None:
            self.task.cancel()
