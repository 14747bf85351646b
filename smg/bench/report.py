"""The HTML report: `smg bench --plot` and `smg bench plot RESULT.json...`."""

from __future__ import annotations

import argparse
from typing import Any


def report_if_asked(args: argparse.Namespace, docs: list[dict[str, Any]]) -> None:
    """With --plot: write the report of this run's documents."""


def main(argv: list[str]) -> int:
    """`smg bench plot RESULT.json... [-o REPORT.html]`."""
    raise SystemExit("smg bench plot: not built yet")
