"""native_bench/prompt_files.py and grpc_bench --prompt-files: the prompts made once, in
parallel, reach `smg bench` as the custom dataset it reads, in order, at their lengths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import grpc_bench as gb  # noqa: E402
import prompt_files as pf  # noqa: E402
from grpcmockutil import llama3_dir  # noqa: E402

from smg.bench import serve  # noqa: E402
from smg.bench.args import build_parser  # noqa: E402
from smg.bench.tokenizer import load_tokenizer  # noqa: E402


def test_chunk_sizes_and_seeds() -> None:
    assert pf.chunk_sizes(150, 64) == [64, 64, 22]
    assert pf.chunk_sizes(64, 64) == [64]
    assert pf.chunk_sizes(0, 64) == []
    with pytest.raises(ValueError):
        pf.chunk_sizes(5, 0)
    assert pf.chunk_seed(0, "sat", 2) == "0:sat:2"
    assert pf.chunk_seed(0, "sat", 2) != pf.chunk_seed(0, "half", 2)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("prompts")
    model = llama3_dir(root / "llama3")
    paths = pf.write_prompt_files(model, 64, 8, {"sat": 70, "half": 3}, 0, root / "p", 2)
    return model, paths


def _prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text("utf-8").splitlines()]


def test_files_hold_distinct_prompts_of_the_asked_length(
    made: tuple[Path, dict[str, Path]],
) -> None:
    model, paths = made
    assert sorted(paths) == ["half", "sat"]
    assert paths["sat"].name == "sat-64.jsonl"
    sat, half = _prompts(paths["sat"]), _prompts(paths["half"])
    assert (len(sat), len(half)) == (70, 3)  # 70: two chunks (64 + 6), in chunk order
    tok = load_tokenizer(str(model))
    assert {tok.count(p) for p in sat + half} == {64}
    assert len(set(sat + half)) == 73  # no run repeats another's prompt
    # The same seed, the same prompts: both gateways are sent the same work.
    again = pf.write_prompt_files(model, 64, 8, {"sat": 70}, 0, model.parent / "again", 1)
    assert _prompts(again["sat"]) == sat


def _load_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: Any, rate: Any) -> list:
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        (tmp_path / "x.json").write_text('{"completed": 1}')
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(gb.subprocess, "run", fake_run)
    result = gb.run_load(args, 1234, tmp_path, 64, 3, rate, tmp_path, "x")
    assert result == {"completed": 1, "bench_exit": 0}
    return seen[0]


def test_grpc_bench_sends_the_files_to_smg_bench_in_order(
    made: tuple[Path, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, paths = made
    args = gb.parse_args(["--prompt-files", "--output-len", "8", "--rust-smg", "/x"])
    assert args.prompt_files
    args.prompt_paths = {(64, use): path for use, path in paths.items()}
    sat_argv = _load_argv(tmp_path, monkeypatch, args, None)
    half_argv = _load_argv(tmp_path, monkeypatch, args, 5.0)
    assert sat_argv[sat_argv.index("--dataset-path") + 1] == str(paths["sat"])
    assert half_argv[half_argv.index("--dataset-path") + 1] == str(paths["half"])
    # What smg bench makes of that argv: the file's prompts, in order, 64 + 8 tokens each.
    bench = build_parser().parse_args(sat_argv[sat_argv.index("bench") + 1 :])
    bench.tokenizer = str(model)
    serve.resolve_lengths(bench)
    serve.validate(bench)
    samples, _ = serve.build_dataset(bench, load_tokenizer(str(model)))
    assert [s.prompt for s in samples] == _prompts(paths["sat"])[:3]
    assert {(s.prompt_len, s.expected_output_len) for s in samples} == {(64, 8)}


def test_grpc_bench_without_the_flag_keeps_the_random_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = gb.parse_args(["--rust-smg", "/x"])
    assert not args.prompt_files
    argv = _load_argv(tmp_path, monkeypatch, args, None)
    i = argv.index("--dataset-name")
    assert argv[i : i + 4] == ["--dataset-name", "random", "--random-input-len", "64"]
    assert "--dataset-path" not in argv
