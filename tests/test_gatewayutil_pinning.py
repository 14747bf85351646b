"""gatewayutil.pinned_clients against a real `smg launch --processes 2`: it hands back the
number of keep-alive clients asked for on each data-plane process, every later request of
a client is answered by the process it was pinned to, and asking for a process the
gateway does not have fails within its bounds, saying how far it got."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.gatewayutil import Gateway, interleaved, pinned_clients, running_gateway

pytestmark = pytest.mark.timeout(120)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with running_gateway(["--mock-workers", "1"], processes=2) as gw:
        gw.wait_ready()
        yield gw


def test_clients_per_process_stay_on_their_process(gateway: Gateway) -> None:
    with pinned_clients(gateway.url, 3) as pinned:
        assert sorted(pinned) == ["0", "1"]
        assert [len(pinned["0"]), len(pinned["1"])] == [3, 3]
        for process, clients in pinned.items():
            for client in clients:
                for _ in range(4):  # chat (through a worker) and a local GET alike
                    chat = client.post("/v1/chat/completions", json=CHAT)
                    assert chat.status_code == 200, chat.text
                    assert chat.headers["x-smg-process"] == process
                    models = client.get("/v1/models")
                    assert models.headers["x-smg-process"] == process
        # Six distinct connections: no two clients share one.
        assert len({id(client) for clients in pinned.values() for client in clients}) == 6


def test_interleaved_takes_turns_by_process(gateway: Gateway) -> None:
    with pinned_clients(gateway.url, 2) as pinned:
        order = [client.get("/health").headers["x-smg-process"] for client in interleaved(pinned)]
        assert order == ["0", "1", "0", "1"]


def test_clients_are_closed_on_exit(gateway: Gateway) -> None:
    with pinned_clients(gateway.url, 1) as pinned:
        clients = [client for group in pinned.values() for client in group]
    assert clients and all(client.is_closed for client in clients)


def test_a_process_the_gateway_lacks_fails_within_the_bounds(gateway: Gateway) -> None:
    began = time.monotonic()
    with (
        pytest.raises(AssertionError, match=r"got \{'0': 1, '1': 1, '2': 0\} after 30 new") as err,
        pinned_clients(gateway.url, 1, processes=3, attempts=30),
    ):
        pass
    assert "1 connection(s) per process wanted on ['0', '1', '2']" in str(err.value)
    assert time.monotonic() - began < 20.0
