"""The setup the end-to-end tests over the OpenAI fake share: the fake as a module-scoped
fixture, and `smg launch` with it as the one self-hosted HTTP worker (health checks off),
handed over once it answers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from providerfakes import FakeProvider

from tests.gatewayutil import Gateway, running_gateway, wait_until


def openai_fake(model: str) -> Any:
    """A module-scoped fixture named `fake`: the OpenAI fake serving `model`, stopped after
    the module. Assign it at module level: `fake = openai_fake(MODEL)`."""

    @pytest.fixture(scope="module", name="fake")
    def fake() -> Iterator[FakeProvider]:
        with FakeProvider("openai", [model]) as provider:
            yield provider

    return fake


@contextlib.contextmanager
def gateway_over(
    fake: FakeProvider,
    args: list[str],
    ready: Callable[[Gateway], bool],
    what: str,
    **launch: object,
) -> Iterator[Gateway]:
    """`smg launch --worker-urls <fake> --disable-health-check *args` (`launch`: Gateway's
    keywords), yielded once `ready(gateway)` holds (20 s at most; `what` names it)."""
    with running_gateway(
        ["--worker-urls", fake.url, "--disable-health-check", *args], **launch
    ) as gw:
        wait_until(lambda: ready(gw), 20, what)
        yield gw
