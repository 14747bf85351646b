"""native_bench/parser_bench.py: every family's text streams to the whole-text parse with
its calls (the bench refuses to time a parse that went wrong), and the rows' shape."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parser_bench as pb  # noqa: E402


def test_every_family_parses_its_text_and_is_timed(tmp_path: Path) -> None:
    from grpcmockutil import llama3_dir
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(llama3_dir(tmp_path / "l3") / "tokenizer.json"))
    rows = pb.run(list(pb.FAMILIES), 0.0, tokenizer)  # one pass each: the checks run
    assert [r["family"] for r in rows] == [*pb.FAMILIES, "content", "passthrough"]
    for row in rows:
        assert row["passes"] == 1
        assert row["pieces"] > 10 and row["chars_per_s"] > 0
    text = pb.markdown({"date": "d", "machine": "m", "python": "3", "seconds": 0, "rows": rows})
    assert text.count("\n| ") == len(rows) + 1  # header + a line per row


def test_pieces_are_the_text_cut_at_token_starts(tmp_path: Path) -> None:
    from grpcmockutil import llama3_dir
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(llama3_dir(tmp_path / "l3") / "tokenizer.json"))
    text, _, _ = pb.family_text("kimik2")
    pieces = pb.pieces_of(text, tokenizer)
    assert "".join(pieces) == text
    tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    # A token inside a multi-byte character shares its start: at most one piece a token.
    assert all(pieces) and tokens - 5 <= len(pieces) <= tokens
