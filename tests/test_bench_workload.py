"""`smg bench` workload extras: --profile, --lora-modules, local dataset files
(`--dataset-name custom|hf`), and their per-request fields in the detailed result.

The end-to-end tests run the real command (`python -m smg bench`) against a mock worker
(`smg mock-worker`) on a loopback port it picks; the rest test the pure pieces exactly.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import mockutil
import pytest

from smg.bench import datasets, workload
from smg.bench.args import build_parser
from smg.bench.backends import BodyOptions, build_body
from smg.bench.calibrate import start_stub
from smg.bench.tokenizer import WordTokenizer

TOK = WordTokenizer()
BENCH_TIMEOUT = 120.0


def bench(args: list[str], tmp_path: Path) -> tuple[int, dict[str, Any], str]:
    """Runs `python -m smg bench ARGS --save-result` and returns (exit code, result, output)."""
    name = "r.json"
    cmd = [sys.executable, "-m", "smg", "bench", *args]
    cmd += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT)
    path = tmp_path / name
    result = json.loads(path.read_text()) if path.exists() else {}
    return proc.returncode, result, proc.stdout + proc.stderr


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def words(n: int, seed: int) -> str:
    """n distinct word-tokenizer tokens: the prompt is exactly n tokens long."""
    return TOK.decode([seed * 100 + k for k in range(n)])


# -- LoRA adapters -----------------------------------------------------------------------


def test_round_robin_adapters_cycle_in_order() -> None:
    got = workload.assign_adapters(["a", "b", "c"], 7, "round-robin", seed=5)
    assert got == ["a", "b", "c", "a", "b", "c", "a"]


def test_random_adapters_are_seeded_and_spread_over_all_names() -> None:
    names = ["a", "b", "c"]
    first = workload.assign_adapters(names, 600, "random", seed=0)
    assert workload.assign_adapters(names, 600, "random", seed=0) == first
    assert workload.assign_adapters(names, 600, "random", seed=1) != first
    counts = Counter(first)
    assert set(counts) == set(names)
    # Uniform choice: each name near 200 of 600 (the seed is fixed, so this cannot flake;
    # the bound is about 4.5 standard deviations).
    assert all(150 <= c <= 250 for c in counts.values()), counts
    assert workload.adapter_summary(["b", "a", "b"]) == {"a": 1, "b": 2}


def test_lora_requests_carry_adapter_names_the_mock_sees(tmp_path: Path) -> None:
    with mockutil.start_mock_workers(1) as mocks:
        args = ["--base-url", mocks.url, "--model", "base", "--num-prompts", "60"]
        args += ["--random-input-len", "8", "--random-output-len", "2", "--save-detailed"]
        args += ["--lora-modules", "ad-a", "ad-b", "ad-c", "--seed", "3"]
        code, r, out = bench(args, tmp_path)
        seen = mockutil.stats(mocks.url)["requests_by_model"]
    assert code == 0, out
    per_request = r["smg_request_models"]
    assert len(per_request) == 60
    assert per_request == workload.assign_adapters(["ad-a", "ad-b", "ad-c"], 60, "random", 3)
    assert r["smg_lora"] == {
        "modules": ["ad-a", "ad-b", "ad-c"],
        "assignment": "random",
        "requests": dict(sorted(Counter(per_request).items())),
    }
    assert set(r["smg_lora"]["requests"]) == {"ad-a", "ad-b", "ad-c"}
    assert seen == r["smg_lora"]["requests"]  # the server saw exactly those names
    assert r["model_id"] == "base"


def test_lora_modules_round_robin_through_chat(tmp_path: Path) -> None:
    with mockutil.start_mock_workers(1) as mocks:
        args = ["--base-url", mocks.url, "--model", "base", "--backend", "openai-chat"]
        args += ["--num-prompts", "6", "--random-input-len", "4", "--random-output-len", "1"]
        args += ["--lora-modules", "x", "y", "--lora-assignment", "round-robin"]
        code, r, out = bench(args, tmp_path)
        seen = mockutil.stats(mocks.url)["requests_by_model"]
    assert code == 0, out
    assert seen == {"x": 3, "y": 3}
    assert "smg_request_models" not in r  # per-request names only with --save-detailed


def test_lora_adapter_goes_to_sglang_generate_as_lora_path() -> None:
    opts = BodyOptions(model="base", stream=False, lora="ad-1")
    body = json.loads(build_body("sglang", "hi", 2, opts))
    assert body["lora_path"] == "ad-1"
    assert json.loads(build_body("openai", "hi", 2, BodyOptions(model="ad-1")))["model"] == "ad-1"
    assert "lora_path" not in json.loads(build_body("sglang", "hi", 2, BodyOptions(model="b")))


# -- the profiler ------------------------------------------------------------------------


@pytest.mark.parametrize("procs", ["1", "2"])
def test_profile_brackets_the_measured_requests(tmp_path: Path, procs: str) -> None:
    with mockutil.start_mock_workers(1) as mocks:
        args = ["--base-url", mocks.url, "--model", "m", "--num-prompts", "12"]
        args += ["--random-input-len", "4", "--random-output-len", "2", "--request-rate", "200"]
        args += ["--num-warmups", "2", "--client-processes", procs, "--profile"]
        code, r, out = bench(args, tmp_path)
        events = mockutil.stats(mocks.url)["profile_events"]
    assert code == 0, out
    # Started once after the 2 warm-ups, stopped once after all 12 measured requests.
    assert [(e["event"], e["inference_answered"]) for e in events] == [("start", 2), ("stop", 14)]
    assert r["smg_profile"]["start"]["ok"] is True
    assert r["smg_profile"]["stop"]["status"] == 200
    assert "Profiler started" in out and "Profiler stopped" in out


def test_profile_unsupported_by_the_server_warns_and_the_run_goes_on(tmp_path: Path) -> None:
    proc, port = start_stub()  # `smg bench stub` has no /start_profile
    try:
        args = ["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "5"]
        args += ["--random-input-len", "4", "--random-output-len", "2", "--profile"]
        code, r, out = bench(args, tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert code == 0, out
    assert r["completed"] == 5
    assert r["smg_profile"]["start"]["ok"] is False
    assert r["smg_profile"]["start"]["status"] == 404
    # As vLLM's bench: /stop_profile is still sent after the run.
    assert r["smg_profile"]["stop"]["status"] == 404
    warned = [w for w in r["smg_warnings"] if w.startswith("--profile: POST")]
    assert len(warned) == 2 and "/start_profile failed (HTTP 404)" in warned[0]


def test_mock_worker_counts_profile_calls_in_order() -> None:
    with mockutil.start_mock_workers(1) as mocks:
        for path in ("/start_profile", "/stop_profile", "/start_profile"):
            status, _, _ = mockutil.request("POST", mocks.url + path)
            assert status == 200
        events = mockutil.stats(mocks.url)["profile_events"]
    assert [e["event"] for e in events] == ["start", "stop", "start"]


# -- local dataset files: pure parts -------------------------------------------------------


def test_custom_dataset_reads_prompts_lengths_and_output_len() -> None:
    rows = [{"prompt": words(3, 1)}, {"prompt": words(5, 2)}, {"prompt": words(7, 3)}]
    reqs, info = datasets.custom_dataset(TOK, rows, 3, output_len=9, shuffle=False)
    assert [r.prompt for r in reqs] == [row["prompt"] for row in rows]
    assert [r.prompt_len for r in reqs] == [3, 5, 7]
    assert [r.expected_output_len for r in reqs] == [9, 9, 9]
    assert info.notes == []
    more, info = datasets.custom_dataset(TOK, rows, 5, output_len=9, seed=4)
    assert len(more) == 5 and info.notes == ["oversampled 2 prompts to reach 5"]
    assert {r.prompt for r in more} <= {row["prompt"] for row in rows}
    fewer, _ = datasets.custom_dataset(TOK, rows, 5, output_len=9, oversample=False)
    assert len(fewer) == 3
    templated, _ = datasets.custom_dataset(
        TOK, rows[:1], 1, shuffle=False, template=lambda p: f"<u> {p} <a>"
    )
    assert templated[0].prompt == f"<u> {rows[0]['prompt']} <a>"
    assert templated[0].prompt_len == 5
    with pytest.raises(ValueError, match=r"f.jsonl:2: each line needs a string 'prompt'"):
        datasets.custom_dataset(TOK, [{"prompt": "a"}, {"text": "b"}], 2, source="f.jsonl")


def test_hf_rows_pick_conversation_prompt_turns_and_completion_columns() -> None:
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert datasets.row_prompt(share, None) == ("q", "a")
    assert datasets.row_prompt(chat, None) == ("hi", "yo")
    assert datasets.row_prompt({"turns": ["first", "second"]}, None) == ("first", None)
    assert datasets.row_prompt({"prompt": "p", "answer": "x"}, None) == ("p", "x")
    assert datasets.row_prompt({"question": "p"}, None) == ("p", None)
    assert datasets.row_prompt({"body": "p"}, None) is None
    assert datasets.row_prompt({"body": "p", "prompt": "q"}, "body") == ("p", None)


def test_hf_dataset_output_lengths_and_filter() -> None:
    rows = [
        {"conversations": [{"value": words(6, 1)}, {"value": words(8, 2)}]},
        {"conversations": [{"value": words(2, 3)}, {"value": words(8, 4)}]},  # prompt < 4
        {"prompt": words(5, 5)},  # no completion: 256
        {"other": "x"},  # no prompt column
    ]
    reqs, info = datasets.hf_dataset(TOK, rows, 10, shuffle=False, oversample=False)
    assert [(r.prompt_len, r.expected_output_len) for r in reqs] == [(6, 8), (5, 256)]
    assert info.notes == ["skipped 2 rows (no prompt column, or filtered by length)"]
    fixed, _ = datasets.hf_dataset(TOK, rows, 10, output_len=3, shuffle=False, oversample=False)
    assert [(r.prompt_len, r.expected_output_len) for r in fixed] == [(6, 3), (2, 3), (5, 3)]
    with pytest.raises(ValueError, match="no usable rows"):
        datasets.hf_dataset(TOK, [{"other": "x"}], 1)


def test_data_files_choose_split_and_subset_and_refuse_hub_ids(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    (root / "extra").mkdir()
    for rel in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"):
        (root / rel).write_bytes(b"")
    (root / "data/test.jsonl").write_text("")
    (root / "extra/validation").mkdir()
    (root / "extra/validation/rows.jsonl").write_text("")
    (root / "README.md").write_text("")
    files = workload.data_files(str(root), None, "train")
    assert [Path(f).name for f in files] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert [Path(f).name for f in workload.data_files(str(root), None, "test")] == ["test.jsonl"]
    assert len(workload.data_files(str(root), None, None)) == 4  # README.md is no data
    sub = workload.data_files(str(root), "extra", "validation")
    assert [Path(f).name for f in sub] == ["rows.jsonl"]
    with pytest.raises(
        workload.WorkloadError, match=r"no \.jsonl, \.json or \.parquet files for split 'dev'"
    ):
        workload.data_files(str(root), None, "dev")
    with pytest.raises(workload.WorkloadError, match=r"Hugging Face hub id.*never downloads"):
        workload.data_files("lmsys/lmsys-chat-1m", None, None)
    lone = str(root / "data/test.jsonl")
    assert workload.data_files(lone, None, "train") == [lone]  # as `datasets` names it
    with pytest.raises(workload.WorkloadError, match="a single file is split 'train'"):
        workload.data_files(lone, None, "test")
    with pytest.raises(workload.WorkloadError, match="no such file or directory"):
        workload.data_files(str(tmp_path / "absent.jsonl"), None, None)


def test_read_rows_json_lines_and_json_list(tmp_path: Path) -> None:
    lines = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    assert workload.read_rows(str(lines)) == [{"prompt": "x"}, {"prompt": "y"}]
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps([{"prompt": "z"}]))
    assert workload.read_rows(str(listed)) == [{"prompt": "z"}]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(workload.WorkloadError, match=r"c.jsonl:2: not a JSON line"):
        workload.read_rows(str(bad))


def test_chat_template_from_tokenizer_config(tmp_path: Path) -> None:
    config = {
        "bos_token": {"content": "<s>"},
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    render = workload.chat_template(str(tmp_path))
    assert render is not None
    assert render("hello") == "<s>[user]hello[assistant]"
    assert workload.chat_template(None) is None
    assert workload.chat_template(str(tmp_path / "nothing")) is None


def test_custom_dataset_applies_the_template_except_for_chat_backends(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}{% endfor %} <bot>"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": words(3, 1)}])
    argv = ["--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts", "1"]
    args = build_parser().parse_args([*argv, "--tokenizer", str(tok_dir)])
    reqs, info = workload.local_dataset(args, TOK, chat_backend=False)
    assert reqs[0].prompt == f"<user> {words(3, 1)} <bot>"
    assert reqs[0].prompt_len == 5 and reqs[0].expected_output_len == 256
    assert info.notes == ["chat template applied"]
    plain, info = workload.local_dataset(args, TOK, chat_backend=True)
    assert plain[0].prompt == words(3, 1)
    assert info.notes == ["prompts sent as written (no chat template)"]
    args = build_parser().parse_args([*argv, "--tokenizer", str(tok_dir), "--skip-chat-template"])
    assert workload.local_dataset(args, TOK, chat_backend=False)[0][0].prompt == words(3, 1)


def test_bad_workload_flags_exit_2() -> None:
    cases = [
        (["--dataset-name", "custom"], "needs --dataset-path"),
        (["--hf-split", "train"], "need --dataset-name hf"),
        (["--custom-output-len", "0"], "--custom-output-len must be > 0"),
        (["--lora-modules", ""], "non-empty adapter names"),
        (["--dataset-name", "hf", "--dataset-path", "org/name"], "never downloads"),
        (
            [
                "--overhead",
                "--direct-url",
                "http://127.0.0.1:9",
                "--gateway-url",
                "http://127.0.0.1:9",
                "--profile",
            ],
            "do not apply to --overhead",
        ),
    ]
    for extra, message in cases:
        cmd = [sys.executable, "-m", "smg", "bench", "--model", "m", "--port", "9", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, (extra, proc.stderr)


def test_output_len_sets_the_local_datasets_lengths() -> None:
    args = build_parser().parse_args(["--output-len", "7"])
    from smg.bench.serve import resolve_lengths

    resolve_lengths(args)
    assert (args.custom_output_len, args.hf_output_len) == (7, 7)
    assert isinstance(args, argparse.Namespace)


# -- local dataset files: end to end ---------------------------------------------------------


def test_custom_jsonl_end_to_end(tmp_path: Path) -> None:
    prompts = [words(n, n) for n in (3, 4, 5, 6)]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    with mockutil.start_mock_workers(1) as mocks:
        args = ["--base-url", mocks.url, "--model", "m", "--dataset-name", "custom"]
        args += ["--dataset-path", str(path), "--num-prompts", "4", "--custom-output-len", "3"]
        args += ["--disable-shuffle", "--save-detailed"]
        code, r, out = bench(args, tmp_path)
        last = mockutil.stats(mocks.url)["last_request_by_route"]["/v1/completions"]
    assert code == 0, out
    assert r["input_lens"] == [3, 4, 5, 6]
    assert r["output_lens"] == [3, 3, 3, 3]
    assert r["total_input_tokens"] == 18
    sent = json.loads(base64.b64decode(last["body_b64"]))
    assert sent["prompt"] in prompts and sent["max_tokens"] == 3
    assert "prompts sent as written (no chat template)" in r["smg_dataset"]["notes"]


def test_hf_parquet_directory_with_split_end_to_end(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="parquet needs pyarrow (pip install pyarrow)")
    import pyarrow.parquet as pq

    root = tmp_path / "local-hf" / "data"
    root.mkdir(parents=True)
    train = [
        {
            "conversations": [
                {"from": "human", "value": words(5, i)},
                {"from": "gpt", "value": words(4, i + 50)},
            ]
        }
        for i in range(1, 4)
    ]
    pq.write_table(pa.Table.from_pylist(train), root / "train-00000-of-00001.parquet")
    write_jsonl(root / "test.jsonl", [{"prompt": words(9, 7)}] * 3)
    with mockutil.start_mock_workers(1) as mocks:
        args = ["--base-url", mocks.url, "--model", "m", "--dataset-name", "hf"]
        args += ["--dataset-path", str(tmp_path / "local-hf"), "--hf-split", "train"]
        args += ["--num-prompts", "3", "--save-detailed"]
        code, r, out = bench(args, tmp_path)
    assert code == 0, out
    assert r["completed"] == 3
    assert r["input_lens"] == [5, 5, 5]  # the train rows, never the 9-token test rows
    assert r["output_lens"] == [4, 4, 4]  # the completion turn's length
    assert "3 rows from 1 file(s)" in r["smg_dataset"]["notes"]
