"""Overhead mode: the same requests direct to a worker and through the gateway, paired.

Request i is sent once to --direct-url and once to --gateway-url, back to back, with
the order alternating by i (so neither side always goes first). Added latency is the
distribution of the per-request differences gateway_i - direct_i (never a difference
of percentiles). The gateway's CPU seconds (supervisor and all its children) per
1,000 gateway requests and its memory as summed PSS come from /proc via psutil;
the spread over workers comes from the workers' own `GET /mock/stats` counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import orjson

from smg.bench import metrics, results, stats
from smg.bench.backends import BACKENDS, BodyOptions, kind_of
from smg.bench.http import fetch, parse_url
from smg.bench.runner import Outcome, RunSpec, raise_fd_limit, run_in_process, run_on_new_loop
from smg.bench.serve import (
    UsageError,
    header_dict,
    metric_config,
    plan,
    prepare,
    resolve_lengths,
    resolve_model,
    validate,
)
from smg.bench.tokenizer import load_tokenizer


def find_gateway(pid: int | None, port: int) -> list[Any]:
    """The gateway's processes: --gateway-pid and its descendants, or else the process
    listening on the gateway port, climbed to its topmost `smg` ancestor."""
    import psutil

    try:
        if pid is not None:
            root = psutil.Process(pid)
        else:
            listeners = [
                c.pid
                for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
            ]
            if not listeners:
                return []
            root = psutil.Process(listeners[0])
            for parent in root.parents():
                if any("smg" in part for part in parent.cmdline()):
                    root = parent
                else:
                    break
        return [root, *root.children(recursive=True)]
    except (psutil.Error, OSError):
        return []


def cpu_seconds(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def pss_bytes(procs: list[Any]) -> int | None:
    import psutil

    total = 0
    seen = False
    for p in procs:
        try:
            total += int(p.memory_full_info().pss)
            seen = True
        except (psutil.Error, AttributeError):
            continue
    return total if seen else None


def worker_count(stats_json: Any) -> int | None:
    """Requests a worker answered, from its /mock/stats (inference counter preferred)."""
    if not isinstance(stats_json, dict):
        return None
    for key in ("inference_answered", "total_requests", "requests", "request_count"):
        if isinstance(stats_json.get(key), int):
            return int(stats_json[key])
    return None


async def _worker_counts(urls: list[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for url in urls:
        try:
            status, body = await fetch(url.rstrip("/") + "/mock/stats", timeout=5.0)
            out[url] = worker_count(orjson.loads(body)) if status == 200 else None
        except (TimeoutError, OSError, ValueError):
            out[url] = None
    return out


def worker_counts(urls: list[str]) -> dict[str, int | None]:
    if not urls:
        return {}
    return run_on_new_loop(_worker_counts(urls))


def pair_report(direct: list[Outcome], gateway: list[Outcome], pcts: list[float]) -> dict[str, Any]:
    """Per-request differences (gateway - direct) over pairs where both succeeded."""
    pairs = [(d, g) for d, g in zip(direct, gateway) if d.success and g.success]
    out: dict[str, Any] = {"pairs": len(pairs)}
    for name, get in (("e2el", lambda o: o.latency), ("ttft", lambda o: o.ttft)):
        diffs = stats.paired_differences([get(d) for d, _ in pairs], [get(g) for _, g in pairs])
        out[f"added_{name}_ms"] = {k: v * 1000 for k, v in stats.summarize(diffs, pcts).items()}
    return out


def run_overhead(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        result = overhead_benchmark(args, argv)
        from smg.bench.report import report_if_asked

        report_if_asked(args, [result])
    except UsageError as exc:
        print(f"smg bench: {exc}", file=sys.stderr)
        return 2
    return 0 if result["smg_valid"] else 1


def overhead_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    if not args.direct_url or not args.gateway_url:
        raise UsageError("--overhead needs --direct-url and --gateway-url")
    resolve_lengths(args)
    validate(args)
    try:
        direct, gateway = parse_url(args.direct_url), parse_url(args.gateway_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    backend = args.backend
    kind = kind_of(backend)
    path = args.endpoint or BACKENDS[backend][1]
    headers = header_dict(args)
    cfg = metric_config(args, kind == "embeddings")
    if args.dataset_name in ("random", "timed_trace") and kind in ("completions", "chat"):
        args.ignore_eos = cfg.ignore_eos = True
    try:
        tok = load_tokenizer(args.tokenizer)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    model = resolve_model(args, args.direct_url.rstrip("/"), headers)
    pl = plan(args, tok)
    from smg.bench.args import sampling_overrides

    opts = BodyOptions(
        args.served_model_name or model,
        not args.disable_stream,
        args.ignore_eos,
        sampling_overrides(args) or None,
    )
    n = len(pl.samples)
    d_preps = prepare(
        pl.samples,
        backend,
        direct,
        direct.base_path + path,
        opts,
        headers,
        args.request_id_prefix + "direct-",
        0,
    )
    g_preps = prepare(
        pl.samples,
        backend,
        gateway,
        gateway.base_path + path,
        opts,
        headers,
        args.request_id_prefix + "gateway-",
        1,
    )
    preps, offsets = [], []
    for i in range(n):
        pair = (d_preps[i], g_preps[i]) if i % 2 == 0 else (g_preps[i], d_preps[i])
        for prep in pair:
            preps.append(dataclasses.replace(prep, index=len(preps)))
            offsets.append(pl.offsets[i])
    concurrency = args.max_concurrency or 1
    fd_soft, _ = raise_fd_limit()
    gw_procs = find_gateway(args.gateway_pid, gateway.port)
    cpu0 = cpu_seconds(gw_procs)
    workers0 = worker_counts(args.worker_url)
    spec = RunSpec([direct, gateway], preps, offsets, concurrency, args.request_timeout)
    spec.prewarm = concurrency
    print(
        f"smg bench --overhead: {n} pairs, direct {direct.url}, gateway {gateway.url}, "
        f"max concurrency {concurrency}"
    )
    outcomes, pstats, start = run_in_process(spec)
    gw_procs_after = find_gateway(args.gateway_pid, gateway.port) or gw_procs
    cpu1 = cpu_seconds(gw_procs_after)
    pss = pss_bytes(gw_procs_after)
    workers1 = worker_counts(args.worker_url)
    outcomes.sort(key=lambda o: o.index)

    by_side: dict[int, list[Outcome]] = {0: [], 1: []}
    for o in outcomes:
        by_side[o.target].append(dataclasses.replace(o, index=len(by_side[o.target])))
    duration = max((o.t_done for o in outcomes), default=start) - start
    prompt_lens = [s.prompt_len for s in pl.samples]
    expected = [s.expected_output_len for s in pl.samples]
    sides = {}
    for side, name in ((0, "direct"), (1, "gateway")):
        counted = [None] * n
        for o in by_side[side]:
            if o.success and o.usage_out is None:
                counted[o.index] = tok.count(o.text)
        sides[name] = metrics.compute(by_side[side], prompt_lens, expected, counted, duration, cfg)

    gw_requests = len(by_side[1])
    report = pair_report(by_side[0], by_side[1], [*cfg.percentiles, 50.0, 90.0])
    report["gateway_pids"] = [p.pid for p in gw_procs_after]
    report["gateway_cpu_seconds"] = cpu1 - cpu0 if gw_procs_after else None
    report["gateway_cpu_seconds_per_1k_requests"] = (
        (cpu1 - cpu0) * 1000 / gw_requests if gw_procs_after and gw_requests else None
    )
    report["gateway_pss_bytes"] = pss
    spread = {
        url: (workers1[url] - workers0[url])
        for url in args.worker_url
        if workers0.get(url) is not None and workers1.get(url) is not None
    }
    counts = [float(v) for v in spread.values()]
    report["worker_requests"] = spread
    report["worker_spread"] = stats.fairness(counts) if counts else None
    client, warnings = metrics.client_report(outcomes, pstats, fd_soft)
    valid = sides["direct"]["smg_valid"] and sides["gateway"]["smg_valid"]
    result: dict[str, Any] = {
        "date": results.run_metadata(argv)["date"],
        "backend": backend,
        "endpoint_type": backend,
        "label": args.label,
        "model_id": model,
        "num_prompts": n,
        "request_rate": args.request_rate if args.request_rate < math.inf else "inf",
        "max_concurrency": concurrency,
        "smg_mode": "overhead",
        "smg_overhead": report,
        "direct": sides["direct"],
        "gateway": sides["gateway"],
        "smg_client": client,
        "smg_warnings": warnings,
        "smg_valid": valid,
        "smg_run": results.run_metadata(argv),
    }
    print(overhead_text(result))
    if args.save_result or args.append_result:
        name = args.result_filename or f"{args.label or 'overhead'}-{model.split('/')[-1]}.json"
        import os

        out_path = os.path.join(args.result_dir, name) if args.result_dir else name
        csv_path = results.save(result, out_path, append=args.append_result)
        print(f"saved {out_path} and {csv_path}")
    return result


def overhead_text(result: dict[str, Any]) -> str:
    r = result["smg_overhead"]
    lines = ["{:=^50}".format(" Gateway Overhead (gateway - direct) ")]
    lines.append(f"{'Pairs (both succeeded):':<40} {r['pairs']}")
    for name in ("e2el", "ttft"):
        s = r[f"added_{name}_ms"]
        lines.append(
            f"{'Added ' + name.upper() + ' ms mean/median/p99:':<40} "
            f"{s['mean']:.3f} / {s['median']:.3f} / {s.get('p99', 0.0):.3f}"
        )
    cpu = r.get("gateway_cpu_seconds_per_1k_requests")
    lines.append(f"{'Gateway CPU s per 1k requests:':<40} {'n/a' if cpu is None else f'{cpu:.3f}'}")
    pss = r.get("gateway_pss_bytes")
    lines.append(
        f"{'Gateway memory (summed PSS, MiB):':<40} {'n/a' if pss is None else f'{pss / 2**20:.1f}'}"
    )
    if r.get("worker_spread"):
        lines.append(f"{'Worker requests:':<40} {r['worker_requests']}")
        lines.append(
            f"{'Spread (Jain index, 1 = even):':<40} {r['worker_spread']['jain_index']:.3f}"
        )
    for side in ("direct", "gateway"):
        s = result[side]
        lines.append(
            f"{side + ' completed/failed, median e2el ms:':<40} "
            f"{s['completed']}/{s['failed']}, {s.get('median_e2el_ms', 0.0):.3f}"
        )
    lines.append(f"{'Valid run:':<40} {'yes' if result['smg_valid'] else 'NO'}")
    for w in result.get("smg_warnings") or []:
        lines.append(f"  WARNING: {w}")
    lines.append("=" * 50)
    return "\n".join(lines)
