"""Ctrl-C during a bench run (smg.bench.runner.run_interruptibly): a SIGINT that lands
while a protocol callback runs must end the run. uvloop catches a KeyboardInterrupt raised
inside `data_received`, logs it and closes that one connection, so `smg bench` went on
(CI saw `test_interrupted_run_stops_gateway_and_workers[SIGINT]` time out, 2 runs in 40
here)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from smg.bench.runner import new_loop, run_interruptibly, run_on_new_loop


@pytest.fixture
def sigint_at_default() -> Iterator[None]:
    """SIGINT at Python's default, as in a terminal: a runner started in the background of a
    non-interactive shell (CI) has it ignored, inherited; restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def _interrupted_inside_data_received(wait_s: float) -> str:
    loop = asyncio.get_running_loop()
    received = loop.create_future()

    class Interrupting(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            # Python runs a signal's handler at the next bytecode boundary: in here.
            for _ in range(10_000):
                pass
            if not received.done():
                received.set_result(None)

    server = await loop.create_server(Interrupting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await asyncio.wait_for(received, 5)
        await asyncio.sleep(wait_s)  # the interrupt ends this long before
        writer.close()
        return "ran on"
    finally:
        server.close()


@pytest.mark.usefixtures("sigint_at_default")
def test_sigint_inside_a_protocol_callback_ends_the_run() -> None:
    loop = new_loop()
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_interruptibly(loop, _interrupted_inside_data_received(3.0))
    finally:
        loop.close()
    assert time.monotonic() - began < 2.5
    # Python's own handler is back for what follows.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("sigint_at_default")
def test_a_run_that_swallows_its_cancellation_still_ends_as_interrupted() -> None:
    async def stubborn() -> str:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:
            return "swallowed"
        return "ran on"

    with pytest.raises(KeyboardInterrupt):
        run_on_new_loop(stubborn())


def test_an_ignored_sigint_stays_ignored_and_the_run_completes() -> None:
    async def quick() -> int:
        await asyncio.sleep(0.01)
        return 7

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run_on_new_loop(quick()) == 7
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
