"""Sweeps over request rates or concurrencies, and the SLO search."""

from __future__ import annotations

import argparse
from typing import Any


def run_plan(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Run what the flags ask for: one run (its result dict), or a sweep or search (one
    sweep document whose points hold each run's result)."""
    from smg.bench.serve import run_benchmark

    return [run_benchmark(args, argv)]


def docs_valid(docs: list[dict[str, Any]]) -> bool:
    """Every run behind these documents is valid (smg_valid)."""
    return all(bool(doc.get("smg_valid")) for doc in docs)
