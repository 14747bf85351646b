"""native_bench/bpe_misses.py runs: every stage measured, the batched BPE ways checked
against the per-piece ids (the script asserts it) on the benchmark's prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bpe_misses


def test_small_run_reports_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert bpe_misses.main(["--prompts", "6", "--rounds", "1", "--input-len", "256"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0].lstrip("| ") for line in out.splitlines()[3:]]
    assert rows == ["findall", "lookup", "bpe: per piece", "bpe: one encode", "bpe: joined"]
    assert "misses a prompt" in out.splitlines()[0]
