"""Command-line flags: `vllm bench serve`'s names and defaults, SGLang's shared-prefix
flags, and smg's own (client processes, error threshold, overhead mode)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from smg.bench.backends import BACKENDS
from smg.bench.datasets import DATASETS


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _processes(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number or 'auto'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smg bench",
        description=(
            "Benchmark an OpenAI-compatible endpoint (flags as `vllm bench serve`). "
            "Sub-commands: `smg bench compare A.json B.json`, `smg bench stub`, "
            "`smg bench calibrate`, `smg bench plot RESULT.json...`. See docs/bench.md."
        ),
    )
    t = p.add_argument_group("target")
    t.add_argument("--base-url", help="server base URL (else http://HOST:PORT)")
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("--endpoint", help="API path (default depends on --backend)")
    t.add_argument("--backend", default="openai", choices=list(BACKENDS))
    t.add_argument("--model", help="model name (default: first of GET /v1/models)")
    t.add_argument("--served-model-name", help="model name sent in requests, if not --model")
    t.add_argument("--tokenizer", help="local tokenizer.json or a directory holding one")
    t.add_argument("--tokenizer-mode", default="auto", help="accepted for compatibility")
    t.add_argument("--trust-remote-code", action="store_true", help="accepted; no effect")
    t.add_argument("--header", nargs="*", metavar="KEY=VALUE", help="extra request headers")
    t.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="seconds")
    t.add_argument("--insecure", action="store_true", help="skip TLS verification")
    t.add_argument("--ready-check-timeout-sec", type=int, default=0)
    t.add_argument("--request-id-prefix", default="bench-", help="X-Request-Id prefix")

    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=list(DATASETS))
    d.add_argument(
        "--dataset-path", help="local file (or hf directory) for sharegpt, timed_trace, custom, hf"
    )
    d.add_argument("--num-prompts", type=int, default=1000)
    d.add_argument("--input-len", type=int, help="sets --random-input-len")
    d.add_argument("--output-len", type=int, help="sets every dataset's output length")
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0)
    d.add_argument("--random-prefix-len", type=int, default=0)
    d.add_argument("--sharegpt-output-len", type=int)
    d.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    d.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    d.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    d.add_argument("--prefix-repetition-output-len", type=int, default=128)
    d.add_argument("--gsp-num-groups", type=int, default=64)
    d.add_argument("--gsp-prompts-per-group", type=int, default=16)
    d.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    d.add_argument("--gsp-question-len", type=int, default=128)
    d.add_argument("--gsp-output-len", type=int, default=256)
    d.add_argument("--timed-trace-chunk-hash-size", type=int, default=16)
    d.add_argument("--timed-trace-sec-multiplier", type=float, default=1.0)
    d.add_argument("--self-timed", action=argparse.BooleanOptionalAction, default=None)
    d.add_argument("--disable-shuffle", action="store_true")
    d.add_argument("--no-oversample", action="store_true")
    d.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("load")
    r.add_argument(
        "--request-rate", type=_rate_list, default=float("inf"), help="req/s, or a sweep: 1,2,4"
    )
    r.add_argument("--burstiness", type=float, default=1.0)
    r.add_argument("--max-concurrency", type=_concurrency_list, help="N, or a sweep: 1,8,32")
    r.add_argument("--ramp-up-strategy", choices=["linear", "exponential"])
    r.add_argument("--ramp-up-start-rps", type=float)
    r.add_argument("--ramp-up-end-rps", type=float)
    r.add_argument("--num-warmups", type=int, default=0)
    r.add_argument("--ignore-eos", action="store_true")
    r.add_argument("--disable-stream", "--no-stream", action="store_true", dest="disable_stream")
    r.add_argument("--disable-tqdm", action="store_true", help="no live display (as --no-progress)")

    s = p.add_argument_group("sampling overrides (merged into each request body)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--min-p", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--logprobs", type=int)
    s.add_argument("--extra-body", type=_json_object, help="JSON object merged into bodies")

    o = p.add_argument_group("results")
    o.add_argument("--percentile-metrics", help="comma list of ttft,tpot,itl,e2el")
    o.add_argument("--metric-percentiles", default="99", help="comma list, e.g. 50,90,99")
    o.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="e.g. ttft:500 tpot:50")
    o.add_argument("--save-result", action="store_true")
    o.add_argument("--save-detailed", action="store_true")
    o.add_argument("--append-result", action="store_true")
    o.add_argument("--result-dir")
    o.add_argument("--result-filename")
    o.add_argument("--label")
    o.add_argument("--metadata", nargs="*", metavar="KEY=VALUE")

    h = p.add_argument_group("smg: honesty and scale")
    h.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="fraction of failed requests above which the run is invalid (exit 1)",
    )
    h.add_argument(
        "--client-processes",
        type=_processes,
        default=1,
        help="client processes (N or auto); requests are split round-robin",
    )

    v = p.add_argument_group("smg: overhead mode")
    v.add_argument("--overhead", action="store_true", help="pair direct vs gateway requests")
    v.add_argument("--direct-url", help="worker base URL (direct path)")
    v.add_argument("--gateway-url", help="gateway base URL")
    v.add_argument("--gateway-pid", type=int, help="gateway supervisor PID (else by port)")
    v.add_argument(
        "--worker-url",
        action="append",
        default=[],
        help="worker base URL whose GET /mock/stats counts requests (repeatable)",
    )
    # Part 2's flag groups, one function each (smg/bench/<module>.py implements them).
    _live_flags(p)
    _report_flags(p)
    _sweep_flags(p)
    _embedded_flags(p)
    _workload_flags(p)
    return p


def _live_flags(p: argparse.ArgumentParser) -> None:
    """The live display while a run goes (smg/bench/live.py)."""
    g = p.add_argument_group("smg: live display")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no live display: a plain status line every 5 s instead (as --disable-tqdm,"
        " or when stdout is not a terminal)",
    )


def _report_flags(p: argparse.ArgumentParser) -> None:
    """--plot: the HTML report (smg/bench/report.py)."""
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the HTML report (default: beside the saved result, else "
        "smg-bench-DATE.html in --result-dir or here); records per-request data",
    )


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    """Sweeps over rates or concurrencies, and the SLO search (smg/bench/sweep.py)."""
    g = p.add_argument_group("smg: sweeps and the SLO search (docs/bench.md)")
    g.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="METRIC_STAT:MS",
        help="latency bound a point must meet, e.g. ttft_p99:500 e2el_median:2000 (repeatable)",
    )
    g.add_argument(
        "--search",
        choices=["request-rate", "max-concurrency"],
        help="find the highest rate or concurrency meeting every --slo (double, then bisect)",
    )
    g.add_argument("--search-min", type=float, default=1.0, help="first value tried (default 1)")
    g.add_argument(
        "--search-max", type=float, default=1024.0, help="highest value tried (default 1024)"
    )
    g.add_argument(
        "--search-precision",
        type=float,
        default=0.1,
        help="stop bisecting when (high - low) / low <= this (request rate; concurrency stops at 1)",
    )


def _rate_list(text: str) -> float | list[float]:
    """One rate (as before), or a comma list: a sweep (smg/bench/sweep.py)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number or a comma list, e.g. 1,2,4") from None
    return values[0] if len(values) == 1 else values


def _concurrency_list(text: str) -> int | list[int]:
    """One concurrency cap (as before), or a comma list: a sweep."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected an integer or a comma list, e.g. 1,8,32"
        ) from None
    return values[0] if len(values) == 1 else values


def _embedded_flags(p: argparse.ArgumentParser) -> None:
    """--embedded: mock workers and an smg gateway started by the bench (smg/bench/embedded.py)."""
    from smg.bench.embedded import DEFAULT_MOCK_ARGS

    e = p.add_argument_group("smg: embedded gateway")
    e.add_argument(
        "--embedded",
        action="store_true",
        help="start mock workers and an smg gateway on 127.0.0.1, benchmark them, stop them",
    )
    e.add_argument("--embedded-workers", type=int, default=2, help="mock workers (default 2)")
    e.add_argument(
        "--embedded-processes",
        type=int,
        default=1,
        help="the gateway's --processes (default 1: the client needs a core too)",
    )
    e.add_argument(
        "--mock-worker-args",
        default=DEFAULT_MOCK_ARGS,
        help=f"flags for `smg mock-worker` (default {DEFAULT_MOCK_ARGS!r})",
    )
    e.add_argument("--gateway-args", default="", help="extra `smg launch` flags, one string")


def _workload_flags(p: argparse.ArgumentParser) -> None:
    """--profile, --lora-modules and local dataset files (smg/bench/workload.py)."""
    w = p.add_argument_group("workload: profiler, LoRA adapters, local dataset files")
    w.add_argument(
        "--profile",
        action="store_true",
        help="POST /start_profile before the measured requests and /stop_profile after",
    )
    w.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME",
        help="LoRA adapter names: each request's model is one of them (see --lora-assignment)",
    )
    w.add_argument(
        "--lora-assignment",
        default="random",
        choices=["random", "round-robin"],
        help="random (seeded by --seed) or round-robin over --lora-modules",
    )
    w.add_argument(
        "--custom-output-len",
        type=int,
        default=256,
        help="output tokens per request for --dataset-name custom",
    )
    w.add_argument(
        "--skip-chat-template",
        action="store_true",
        help="custom dataset: send prompts without the tokenizer's chat template",
    )
    w.add_argument("--hf-split", help="hf dataset: the split's files in a local directory")
    w.add_argument("--hf-subset", help="hf dataset: a sub-folder of the local directory")
    w.add_argument("--hf-name", help="accepted for compatibility (nothing is downloaded)")
    w.add_argument("--hf-output-len", type=int, help="hf dataset: output tokens per request")
    w.add_argument(
        "--hf-prompt-column",
        help="hf dataset: the prompt column (default: the first of conversations, "
        "conversation, messages, prompt, question, problem, instruction, text, input, turns)",
    )


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"invalid {what} {item!r}: use KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        try:
            name, value = item.split(":", 1)
            ms = float(value)
        except ValueError:
            raise ValueError(f"invalid --goodput {item!r}: use METRIC:MS") from None
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"invalid --goodput metric {name!r}: use ttft, tpot or e2el")
        if ms < 0:
            raise ValueError(f"invalid --goodput value {item!r}: must be >= 0")
        out[name] = ms
    return out


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "logprobs",
    )
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    out.update(args.extra_body or {})
    return out
