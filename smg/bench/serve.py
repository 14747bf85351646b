"""`smg bench ...`: build prompts, run the load, compute and save the result."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson

from smg.bench import arrivals, datasets, live, metrics, results, workload
from smg.bench.args import build_parser, parse_goodput, parse_kv, sampling_overrides
from smg.bench.backends import BACKENDS, BodyOptions, base_headers, build_body, kind_of
from smg.bench.http import Target, build_request, fetch, parse_url
from smg.bench.runner import (
    Outcome,
    Prepared,
    RunSpec,
    raise_fd_limit,
    run_multiprocess,
    run_on_new_loop,
)
from smg.bench.tokenizer import Tokenizer, count_many, load_tokenizer

# One client process, measured on this project's 2-core dev machine against the stub
# (`smg bench calibrate`), sustains about these rates; `--client-processes auto` divides by them.
PROC_REQS_PER_S = 4000.0
PROC_CHUNKS_PER_S = 40000.0


class UsageError(Exception):
    """Bad flags or inputs: exit 2 with a message."""


@dataclass
class Plan:
    samples: list[datasets.SampleRequest]
    offsets: list[float]
    rates: list[float]
    info: datasets.DatasetInfo


def resolve_lengths(args: argparse.Namespace) -> None:
    if args.input_len is not None:
        args.random_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.output_len
        args.sharegpt_output_len = args.output_len
        args.prefix_repetition_output_len = args.output_len
        args.gsp_output_len = args.output_len
        args.custom_output_len = args.output_len
        args.hf_output_len = args.output_len


def validate(args: argparse.Namespace) -> None:
    # Comma lists and --search are sweeps: sweep.run_plan runs each point with one value
    # and no --search; whatever else gets here with them (the overhead mode) cannot sweep.
    lists = isinstance(args.request_rate, list) or isinstance(args.max_concurrency, list)
    if lists or getattr(args, "search", None):
        raise UsageError(
            "comma lists of --request-rate / --max-concurrency and --search are"
            " sweeps, which --overhead does not run"
        )
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise UsageError("--max-concurrency must be > 0")
    if args.num_prompts <= 0:
        raise UsageError("--num-prompts must be > 0")
    if args.request_rate <= 0:
        raise UsageError("--request-rate must be > 0")
    if args.burstiness <= 0:
        raise UsageError("--burstiness must be > 0")
    if args.ramp_up_strategy is not None:
        if args.request_rate != math.inf:
            raise UsageError("with --ramp-up-strategy, leave --request-rate unset")
        if args.ramp_up_start_rps is None or args.ramp_up_end_rps is None:
            raise UsageError("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps")
        if args.ramp_up_start_rps < 0 or args.ramp_up_start_rps > args.ramp_up_end_rps:
            raise UsageError("ramp-up rates must satisfy 0 <= start <= end")
        if args.ramp_up_strategy == "exponential" and args.ramp_up_start_rps == 0:
            raise UsageError("exponential ramp-up needs --ramp-up-start-rps > 0")
        if args.ramp_up_strategy == "linear" and args.ramp_up_end_rps == 0:
            raise UsageError("ramp-up needs --ramp-up-end-rps > 0")
    needs_path = args.dataset_name in datasets.PATH_DATASETS
    if needs_path and not args.dataset_path:
        raise UsageError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    if not needs_path and args.dataset_path:
        raise UsageError(f"--dataset-name {args.dataset_name} takes no --dataset-path")
    if args.self_timed is not None and args.dataset_name != "timed_trace":
        raise UsageError("--self-timed only applies to --dataset-name timed_trace")
    if not 0.0 <= args.max_error_rate <= 1.0:
        raise UsageError("--max-error-rate must be within [0, 1]")
    try:
        workload.validate(args)
    except workload.WorkloadError as exc:
        raise UsageError(str(exc)) from exc
    if kind_of(args.backend) == "embeddings" and args.disable_stream is False:
        args.disable_stream = True


def build_dataset(args: argparse.Namespace, tok: Tokenizer) -> tuple[list[Any], Any]:
    name = args.dataset_name
    if name == "random":
        return datasets.random_dataset(
            tok,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.random_prefix_len,
            args.seed,
        )
    if name == "prefix_repetition":
        return datasets.prefix_repetition_dataset(
            tok,
            args.num_prompts,
            args.prefix_repetition_prefix_len,
            args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes,
            args.prefix_repetition_output_len,
            args.seed,
        )
    if name == "generated-shared-prefix":
        return datasets.shared_prefix_dataset(
            tok,
            args.gsp_num_groups,
            args.gsp_prompts_per_group,
            args.gsp_system_prompt_len,
            args.gsp_question_len,
            args.gsp_output_len,
            args.seed,
        )
    if name in ("custom", "hf"):
        try:
            return workload.local_dataset(args, tok, kind_of(args.backend) == "chat")
        except workload.WorkloadError as exc:
            raise UsageError(str(exc)) from exc
    if name == "sharegpt":
        return datasets.sharegpt_dataset(
            tok,
            args.dataset_path,
            args.num_prompts,
            args.sharegpt_output_len,
            args.seed,
            shuffle=not args.disable_shuffle,
            oversample=not args.no_oversample,
        )
    return datasets.timed_trace_dataset(
        tok,
        args.dataset_path,
        args.num_prompts,
        args.timed_trace_chunk_hash_size,
        args.timed_trace_sec_multiplier,
        seed=args.seed,
    )


def plan(args: argparse.Namespace, tok: Tokenizer) -> Plan:
    samples, info = build_dataset(args, tok)
    self_timed = args.dataset_name == "timed_trace" and args.self_timed is not False
    if self_timed:
        offsets = arrivals.trace_offsets([s.timestamp or 0.0 for s in samples])
        rates = [0.0] * len(samples)
    else:
        ramp = None
        if args.ramp_up_strategy:
            ramp = (args.ramp_up_strategy, args.ramp_up_start_rps, args.ramp_up_end_rps)
        offsets, rates = arrivals.schedule(
            len(samples), args.request_rate, args.burstiness, args.seed, ramp
        )
    return Plan(samples, offsets, rates, info)


def prepare(
    samples: list[datasets.SampleRequest],
    backend: str,
    target: Target,
    path: str,
    opts: BodyOptions,
    headers: dict[str, str],
    id_prefix: str,
    target_index: int = 0,
    index_offset: int = 0,
    models: list[str] | None = None,
) -> list[Prepared]:
    """`models`: a model name per request (--lora-modules), else opts.model for all."""
    kind = kind_of(backend)
    out = []
    for i, s in enumerate(samples):
        o = opts if models is None else replace(opts, model=models[i], lora=models[i])
        body = build_body(backend, s.prompt, s.expected_output_len, o)
        hdrs = dict(headers)
        hdrs["X-Request-Id"] = f"{id_prefix}{index_offset + i}"
        data = build_request("POST", target, path, hdrs, body)
        out.append(Prepared(index_offset + i, target_index, data, kind, opts.stream))
    return out


def choose_processes(args: argparse.Namespace, mean_output_len: float) -> int:
    if args.client_processes != "auto":
        return int(args.client_processes)
    rate = args.request_rate if args.ramp_up_strategy is None else (args.ramp_up_end_rps or 1.0)
    if math.isinf(rate):
        return 1
    chunks = 0.0 if args.disable_stream else rate * mean_output_len
    need = max(rate / PROC_REQS_PER_S, chunks / PROC_CHUNKS_PER_S)
    return max(1, min(os.cpu_count() or 1, math.ceil(need)))


def prewarm_size(args: argparse.Namespace, n: int, procs: int) -> int:
    """Connections opened before the clock starts, per process: the concurrency cap, or
    every request for an unpaced burst, or a modest 64 for a paced run without a cap
    (more open on demand and stay pooled)."""
    if args.max_concurrency is not None:
        want = args.max_concurrency
    elif math.isinf(args.request_rate) and args.ramp_up_strategy is None:
        want = n
    else:
        want = 64
    return max(1, min(want, n, 4096) // max(procs, 1))


async def _first_model(base_url: str, headers: dict[str, str]) -> str:
    status, body = await fetch(base_url + "/v1/models", headers=headers)
    if status != 200:
        raise UsageError(f"GET {base_url}/v1/models returned {status}; pass --model")
    data = orjson.loads(body).get("data") or []
    if not data:
        raise UsageError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


def resolve_model(args: argparse.Namespace, base_url: str, headers: dict[str, str]) -> str:
    if args.model:
        return str(args.model)
    try:
        return str(run_on_new_loop(_first_model(base_url, headers)))
    except (TimeoutError, OSError, ValueError, KeyError) as exc:
        raise UsageError(f"could not list models at {base_url} ({exc}); pass --model") from exc


def wait_ready(url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    """Sends one small request until it succeeds (vllm's --ready-check-timeout-sec)."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status, _ = await fetch(url, "POST", body, headers, timeout=max(1.0, timeout))
                if status == 200:
                    return
                last = f"status {status}"
            except (TimeoutError, OSError) as exc:
                last = str(exc) or type(exc).__name__
            await asyncio.sleep(0.5)
        raise UsageError(f"endpoint {url} not ready within {timeout:.0f} s ({last})")

    run_on_new_loop(poll())


def count_outputs(outcomes: list[Outcome], n: int, tok: Tokenizer) -> list[int | None]:
    """Tokenizer counts of generated text for successful requests without usage."""
    counted: list[int | None] = [None] * n
    todo = [o for o in outcomes if o.success and o.usage_out is None]
    for o, c in zip(todo, count_many(tok, [o.text for o in todo])):
        counted[o.index] = c
    return counted


def base_of(args: argparse.Namespace) -> str:
    if args.base_url:
        return str(args.base_url).rstrip("/")
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"http://{host}:{args.port}"


def header_dict(args: argparse.Namespace) -> dict[str, str]:
    try:
        return base_headers(parse_kv(args.header, "--header"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def metric_config(args: argparse.Namespace, embeddings: bool) -> metrics.MetricConfig:
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise UsageError("--metric-percentiles must be numbers, e.g. 50,90,99") from None
    if any(not 0 <= p <= 100 for p in percentiles):
        raise UsageError("--metric-percentiles must be within [0, 100]")
    chosen = args.percentile_metrics or ",".join(metrics.GEN_METRICS)
    names = [m.strip() for m in chosen.split(",") if m.strip()]
    bad = [m for m in names if m not in metrics.GEN_METRICS]
    if bad:
        raise UsageError(f"--percentile-metrics: unknown {bad}; use ttft,tpot,itl,e2el")
    try:
        goodput = parse_goodput(args.goodput)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return metrics.MetricConfig(
        percentile_metrics=names,
        percentiles=percentiles,
        goodput_ms=goodput,
        embeddings=embeddings,
        ignore_eos=args.ignore_eos,
        max_error_rate=args.max_error_rate,
        # The report draws from the per-request lists, so --plot records them too.
        detailed=args.save_detailed or getattr(args, "plot", None) is not None,
    )


def run(argv: list[str]) -> int:
    from smg.bench.embedded import embedded_target
    from smg.bench.report import report_if_asked
    from smg.bench.sweep import docs_valid, run_plan

    args = build_parser().parse_args(argv)
    try:
        # --embedded: mock workers and a gateway started here; the run targets them.
        with embedded_target(args):
            if args.overhead:
                from smg.bench.overhead import run_overhead

                return run_overhead(args, argv)
            # One run, a sweep, or an SLO search: a list of result documents (a run's
            # result dict, or a sweep document holding its points' results).
            docs = run_plan(args, argv)
            report_if_asked(args, docs)
    except UsageError as exc:
        print(f"smg bench: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"smg bench: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a client process failed
        print(f"smg bench: {exc}", file=sys.stderr)
        return 1
    return 0 if docs_valid(docs) else 1


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    resolve_lengths(args)
    validate(args)
    base_url = base_of(args)
    backend = args.backend
    kind = kind_of(backend)
    embeddings = kind == "embeddings"
    path = args.endpoint or BACKENDS[backend][1]
    target = parse_url(base_url)
    headers = header_dict(args)
    cfg = metric_config(args, embeddings)
    if args.dataset_name in ("random", "timed_trace") and kind in ("completions", "chat"):
        args.ignore_eos = True  # as vllm: random prompts should run to the asked length
        cfg.ignore_eos = True
    try:
        tok = load_tokenizer(args.tokenizer)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    model = resolve_model(args, base_url, headers)
    pl = plan(args, tok)
    for note in pl.info.notes:
        print(f"dataset: {note}")
    if pl.info.mismatch:
        print(f"dataset: prompts total {pl.info.mismatch:+d} tokens off the asked lengths")
    opts = BodyOptions(
        model=args.served_model_name or model,
        stream=not args.disable_stream,
        ignore_eos=args.ignore_eos,
        extra_body=sampling_overrides(args) or None,
    )
    full_path = target.base_path + path
    models = None
    if args.lora_modules:
        models = workload.assign_adapters(
            args.lora_modules, len(pl.samples), args.lora_assignment, args.seed
        )
    preps = prepare(
        pl.samples,
        backend,
        target,
        full_path,
        opts,
        headers,
        args.request_id_prefix,
        models=models,
    )
    warm = prepare(
        [pl.samples[0]] * args.num_warmups, backend, target, full_path, opts, headers, "warmup-"
    )
    if args.ready_check_timeout_sec > 0:
        first = build_body(backend, pl.samples[0].prompt, 1, opts)
        wait_ready(base_url + path, first, headers, args.ready_check_timeout_sec)
    mean_out = sum(s.expected_output_len for s in pl.samples) / len(pl.samples)
    procs = choose_processes(args, mean_out)
    fd_soft, _ = raise_fd_limit()
    spec = RunSpec(
        [target], preps, pl.offsets, args.max_concurrency, args.request_timeout, warm, args.insecure
    )
    spec.prewarm = prewarm_size(args, len(preps), procs)
    print(
        f"smg bench: {len(preps)} requests to {base_url}{path} ({backend}), rate "
        f"{args.request_rate}, burstiness {args.burstiness}, max concurrency "
        f"{args.max_concurrency}, {procs} client process(es)"
    )
    watch = live.display_for(args, len(preps), procs)
    with workload.profiling(args, base_url, headers) as prof:
        before = prof.start if prof is not None else None
        outcomes, pstats, start = run_multiprocess(spec, procs, watch, before)
    outcomes.sort(key=lambda o: o.index)
    duration = max((o.t_done for o in outcomes), default=start) - start
    counted = count_outputs(outcomes, len(pl.samples), tok)
    body = metrics.compute(
        outcomes,
        [s.prompt_len for s in pl.samples],
        [s.expected_output_len for s in pl.samples],
        counted,
        duration,
        cfg,
    )
    client, warnings = metrics.client_report(outcomes, pstats, fd_soft)
    result = assemble(args, argv, model, body, client, warnings, pl)
    workload.add_to_result(result, args, models, prof)
    print(results.summary_text(result, list(cfg.percentiles)))
    save_if_asked(args, result, model)
    return result


def assemble(
    args: argparse.Namespace,
    argv: list[str],
    model: str,
    body: dict[str, Any],
    client: dict[str, Any],
    warnings: list[str],
    pl: Plan,
) -> dict[str, Any]:
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    head: dict[str, Any] = {
        "date": date,
        "endpoint_type": args.backend,
        "backend": args.backend,
        "label": args.label,
        "model_id": model,
        "tokenizer_id": args.tokenizer or "smg-word-tokenizer",
        "num_prompts": len(pl.samples),
    }
    try:
        head.update(parse_kv(args.metadata, "--metadata"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    head["request_rate"] = args.request_rate if args.request_rate < math.inf else "inf"
    head["burstiness"] = args.burstiness
    head["max_concurrency"] = args.max_concurrency
    if args.ramp_up_strategy:
        head["ramp_up_strategy"] = args.ramp_up_strategy
        head["ramp_up_start_rps"] = args.ramp_up_start_rps
        head["ramp_up_end_rps"] = args.ramp_up_end_rps
    result = {**head, **body}
    result["smg_client"] = client
    short = result.get("smg_short_outputs") or {}
    if short.get("requests"):
        warnings.append(
            f"{short['requests']} request(s) returned fewer tokens than asked with ignore_eos"
            f" ({short['missing_tokens']} tokens missing in total)"
        )
    result["smg_warnings"] = warnings
    result["smg_dataset"] = {
        "name": args.dataset_name,
        "seed": args.seed,
        "prompt_token_mismatch": pl.info.mismatch,
        "notes": pl.info.notes,
    }
    result["smg_run"] = results.run_metadata(argv)
    return result


def result_path(args: argparse.Namespace, result: dict[str, Any]) -> str | None:
    """Where --save-result / --append-result write this result (None: not saved)."""
    if not (args.save_result or args.append_result):
        return None
    ramp = None
    if args.ramp_up_strategy:
        ramp = (args.ramp_up_strategy, args.ramp_up_start_rps, args.ramp_up_end_rps)
    name = args.result_filename or results.result_filename(
        args.label or args.backend,
        args.request_rate,
        args.max_concurrency,
        str(result["model_id"]),
        result["date"],
        ramp,
    )
    return os.path.join(args.result_dir, name) if args.result_dir else name


def save_if_asked(args: argparse.Namespace, result: dict[str, Any], model: str) -> None:
    path = result_path(args, result)
    if path is None:
        return
    csv_path = results.save(result, path, append=args.append_result)
    print(f"saved {path} and {csv_path}")
