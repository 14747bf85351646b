"""gatewayutil.free_port never hands out a port it handed out lately, even when the kernel
offers a just-closed port again at once (CI saw two back-to-back calls give the Rust SMG
the same --port and --prometheus-port)."""

from __future__ import annotations

from typing import Any

import pytest

from tests import gatewayutil


class _Kernel:
    """socket.socket as far as free_port uses it, binding port 0 to scripted ports."""

    def __init__(self, offers: list[int]) -> None:
        self.offers = offers

    def __call__(self, *_args: Any) -> _Kernel:
        return self

    def __enter__(self) -> _Kernel:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def bind(self, _address: tuple[str, int]) -> None:
        return None

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.offers.pop(0))


def test_a_port_offered_again_at_once_is_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gatewayutil, "_RECENT_PORTS", type(gatewayutil._RECENT_PORTS)(maxlen=8))
    kernel = _Kernel([40001, 40001, 40001, 40002])
    monkeypatch.setattr(gatewayutil.socket, "socket", kernel)
    assert [gatewayutil.free_port(), gatewayutil.free_port()] == [40001, 40002]
    assert kernel.offers == []


def test_a_kernel_that_offers_only_handed_out_ports_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gatewayutil, "_RECENT_PORTS", type(gatewayutil._RECENT_PORTS)(maxlen=8))
    monkeypatch.setattr(gatewayutil.socket, "socket", _Kernel([40003] * 65))
    assert gatewayutil.free_port() == 40003
    with pytest.raises(RuntimeError, match="recently handed-out"):
        gatewayutil.free_port()


def test_real_ports_are_distinct() -> None:
    ports = [gatewayutil.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
