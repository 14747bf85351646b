"""`smg bench --embedded`: start mock workers and an smg gateway, benchmark them."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def embedded_target(args: argparse.Namespace) -> Iterator[None]:
    """With --embedded: start the gateway (and its mock workers), point `args` at it, stop
    it afterwards. Otherwise nothing."""
    yield
