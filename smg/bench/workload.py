"""Workload extras of `smg bench`: local dataset files (vLLM's `custom` and `hf`), LoRA
adapter names per request (`--lora-modules`) and the engines' profiler (`--profile`).

Nothing here downloads: a dataset path must be a local file or directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import ssl
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from smg.bench import datasets
from smg.bench.tokenizer import Tokenizer

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WorkloadError(ValueError):
    """Bad workload flags or files; serve turns it into a usage error (exit 2)."""


def validate(args: argparse.Namespace) -> None:
    if args.lora_modules is not None:
        names = [n for n in args.lora_modules if n.strip()]
        if len(names) != len(args.lora_modules) or not names:
            raise WorkloadError("--lora-modules needs non-empty adapter names")
    if getattr(args, "overhead", False) and (args.profile or args.lora_modules):
        # Overhead mode pairs identical requests direct and through the gateway.
        raise WorkloadError("--profile and --lora-modules do not apply to --overhead")
    if args.custom_output_len <= 0:
        raise WorkloadError("--custom-output-len must be > 0")
    if args.hf_output_len is not None and args.hf_output_len <= 0:
        raise WorkloadError("--hf-output-len must be > 0")
    hf_only = (args.hf_split, args.hf_subset, args.hf_prompt_column, args.hf_name)
    if args.dataset_name != "hf" and any(v is not None for v in hf_only):
        raise WorkloadError(
            "--hf-split/--hf-subset/--hf-name/--hf-prompt-column need --dataset-name hf"
        )


# -- reading local files -----------------------------------------------------------------


def _refuse_missing(path: str) -> None:
    if os.path.exists(path):
        return
    if _HUB_ID.match(path):
        raise WorkloadError(
            f"--dataset-path {path!r} is not a local file or directory; it looks like a Hugging "
            "Face hub id, and smg bench never downloads datasets: fetch it first (e.g. "
            f"`huggingface-cli download --repo-type dataset {path} --local-dir DIR`) and pass DIR"
        )
    raise WorkloadError(f"--dataset-path {path!r}: no such file or directory")


def read_json_lines(path: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
            if not isinstance(row, dict):
                raise WorkloadError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def read_parquet(path: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq  # only for .parquet paths: an optional dependency
    except ImportError as exc:
        raise WorkloadError(
            f"{path}: reading parquet needs the 'pyarrow' package (pip install pyarrow)"
        ) from exc
    try:
        return list(pq.read_table(path).to_pylist())
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise WorkloadError(f"{path}: not a readable parquet file ({exc})") from exc


def read_rows(path: str) -> list[dict[str, Any]]:
    """One data file: parquet, a JSON list of objects, or JSON lines."""
    if path.endswith(".parquet"):
        return read_parquet(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path}: not valid JSON ({exc})") from exc
            if not all(isinstance(r, dict) for r in data):
                raise WorkloadError(f"{path}: expected a JSON list of objects")
            return list(data)
    return read_json_lines(path)


def _split_of(rel: str) -> set[str]:
    """Split names a data file's relative path can stand for: its folders and the leading
    word of its name (`train-00000-of-00001.parquet`, `test.jsonl`, `data/validation/x`)."""
    parts = rel.replace(os.sep, "/").split("/")
    stem = re.split(r"[-_.]", parts[-1], maxsplit=1)[0]
    return {stem, *parts[:-1]}


def data_files(path: str, subset: str | None, split: str | None) -> list[str]:
    """The data files of a local dataset: the file itself, or the JSON lines / JSON /
    parquet files under the directory (`--hf-subset` picks a sub-folder, `--hf-split`
    the files named or filed for that split), sorted by path."""
    _refuse_missing(path)
    if os.path.isfile(path):
        # `datasets` names a lone data file's split "train"; anything else would be ignored.
        if subset or split not in (None, "train"):
            raise WorkloadError(
                "--hf-subset and --hf-split choose files inside a directory "
                "(a single file is split 'train')"
            )
        return [path]
    root = os.path.join(path, subset) if subset else path
    if not os.path.isdir(root):
        raise WorkloadError(f"--hf-subset {subset!r}: no folder {root}")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(DATA_SUFFIXES)]
    if split:
        found = [f for f in found if split in _split_of(os.path.relpath(f, root))]
    if not found:
        what = f" for split {split!r}" if split else ""
        raise WorkloadError(f"{root}: no .jsonl, .json or .parquet files{what}")
    return found


# -- chat template (custom dataset) -----------------------------------------------------


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def chat_template(tokenizer_path: str | None) -> Callable[[str], str] | None:
    """The tokenizer's chat template as prompt -> text, as vLLM's custom dataset applies it
    (one user message, generation prompt added). None when the tokenizer has none."""
    if not tokenizer_path or not os.path.isdir(tokenizer_path):
        return None
    config_path = os.path.join(tokenizer_path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    from smg.chat.template import ChatTemplate, select_template

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    source = select_template(config, tools=False)
    if source is None:
        return None
    template = ChatTemplate(
        source,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
    )

    def render(prompt: str) -> str:
        return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)

    return render


def local_dataset(
    args: argparse.Namespace, tok: Tokenizer, chat_backend: bool
) -> tuple[list[datasets.SampleRequest], datasets.DatasetInfo]:
    """`--dataset-name custom|hf --dataset-path PATH`."""
    if args.dataset_name == "custom":
        files = data_files(args.dataset_path, None, None)
        rows = read_rows(files[0])
        # A chat backend's server applies the template itself: templating here would apply
        # it twice (vLLM does, unless --skip-chat-template).
        template = (
            None if args.skip_chat_template or chat_backend else chat_template(args.tokenizer)
        )
        samples, info = datasets.custom_dataset(
            tok,
            rows,
            args.num_prompts,
            args.custom_output_len,
            args.seed,
            shuffle=not args.disable_shuffle,
            oversample=not args.no_oversample,
            template=template,
            source=files[0],
        )
        info.notes.append(
            "chat template applied" if template else "prompts sent as written (no chat template)"
        )
        return samples, info
    files = data_files(args.dataset_path, args.hf_subset, args.hf_split)
    rows = [row for f in files for row in read_rows(f)]
    samples, info = datasets.hf_dataset(
        tok,
        rows,
        args.num_prompts,
        args.hf_output_len,
        args.seed,
        shuffle=not args.disable_shuffle,
        oversample=not args.no_oversample,
        column=args.hf_prompt_column,
        source=args.dataset_path,
    )
    info.notes.append(f"{len(rows)} rows from {len(files)} file(s)")
    return samples, info


# -- LoRA adapters -----------------------------------------------------------------------


def assign_adapters(names: list[str], n: int, how: str, seed: int) -> list[str]:
    """The adapter (model name) of each of n requests: vLLM's --lora-assignment, `random`
    (uniform, independently per request, from a generator seeded with --seed and used for
    nothing else, so prompts and arrivals stay as without adapters) or `round-robin`."""
    if how == "round-robin":
        return [names[i % len(names)] for i in range(n)]
    rng = random.Random(f"lora:{seed}")
    return [rng.choice(names) for _ in range(n)]


def adapter_summary(models: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(models).items()))


# -- the profiler ------------------------------------------------------------------------


def post_profile(
    url: str, headers: dict[str, str], insecure: bool, timeout: float = 60.0
) -> dict[str, Any]:
    """POST URL with an empty body, as vLLM's bench: {"url", "status", "ok", "error"}."""
    hdrs = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    req = urllib.request.Request(url, data=b"", headers=hdrs, method="POST")
    ctx = None
    if url.startswith("https://"):
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            resp.read()
            return {"url": url, "status": resp.status, "ok": resp.status == 200, "error": None}
    except urllib.error.HTTPError as exc:
        return {"url": url, "status": exc.code, "ok": False, "error": f"HTTP {exc.code}"}
    except (OSError, ValueError) as exc:
        return {"url": url, "status": 0, "ok": False, "error": str(exc) or type(exc).__name__}


@dataclass
class Profiler:
    """--profile: /start_profile just before the measured requests (after warm-ups and
    connection set-up), /stop_profile after the last one, also when the run fails."""

    base_url: str
    headers: dict[str, str]
    insecure: bool
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def _call(self, which: str) -> None:
        print(f"{'Starting' if which == 'start' else 'Stopping'} profiler...")
        got = post_profile(f"{self.base_url}/{which}_profile", self.headers, self.insecure)
        self.calls[which] = got
        if got["ok"]:
            print(f"Profiler {'started' if which == 'start' else 'stopped'}")
        else:
            # vLLM's bench goes on without a profile; so does this, but says why.
            msg = f"--profile: POST {got['url']} failed ({got['error']}); the run continues"
            print(f"smg bench: {msg}")
            self.warnings.append(msg)

    def start(self) -> None:
        self._call("start")

    def stop(self) -> None:
        if "start" in self.calls and "stop" not in self.calls:
            self._call("stop")

    def record(self) -> dict[str, Any]:
        return {"start": self.calls.get("start"), "stop": self.calls.get("stop")}


@contextlib.contextmanager
def profiling(
    args: argparse.Namespace, base_url: str, headers: dict[str, str]
) -> Iterator[Profiler | None]:
    if not args.profile:
        yield None
        return
    prof = Profiler(base_url, headers, args.insecure)
    try:
        yield prof
    finally:
        prof.stop()


# -- the result ---------------------------------------------------------------------------


def add_to_result(
    result: dict[str, Any],
    args: argparse.Namespace,
    models: list[str] | None,
    prof: Profiler | None,
) -> None:
    """smg_lora (adapters, assignment, requests per adapter), smg_profile (each call's
    status), and with --save-detailed `smg_request_models` (the model name each request
    carried, request order, parallel to vLLM's per-request lists)."""
    if models is not None:
        result["smg_lora"] = {
            "modules": list(args.lora_modules),
            "assignment": args.lora_assignment,
            "requests": adapter_summary(models),
        }
        if args.save_detailed:
            result["smg_request_models"] = list(models)
    if prof is not None:
        result["smg_profile"] = prof.record()
        result.setdefault("smg_warnings", []).extend(prof.warnings)
