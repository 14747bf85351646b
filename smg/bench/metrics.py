"""From per-request outcomes to the result dictionary (pure).

Keys shared with `vllm bench serve` keep vllm's names and meaning; smg's own
additions are prefixed `smg_`. Failed requests are counted by cause and left out of
every latency statistic and every token total.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smg.bench import stats
from smg.bench.runner import Outcome, ProcStats

GEN_METRICS = ("ttft", "tpot", "itl", "e2el")
LAG_WARN_MS = 5.0
CPU_WARN_PERCENT = 90.0


@dataclass
class MetricConfig:
    percentile_metrics: Sequence[str] = GEN_METRICS
    percentiles: Sequence[float] = (99.0,)
    goodput_ms: dict[str, float] = field(default_factory=dict)
    embeddings: bool = False
    ignore_eos: bool = False
    max_error_rate: float = 0.01
    detailed: bool = False


def output_tokens(o: Outcome, counted: int | None) -> int:
    """Server usage if reported, else the tokenizer's count of the text (`counted`),
    else the number of token events seen."""
    if o.usage_out is not None:
        return o.usage_out
    if counted is not None:
        return counted
    return o.tokens_seen


def compute(
    outcomes: Sequence[Outcome],
    prompt_lens: Sequence[int],
    expected_output_lens: Sequence[int],
    counted_output: Sequence[int | None],
    duration: float,
    cfg: MetricConfig,
) -> dict[str, Any]:
    """Outcomes must be sorted by index and aligned with the other sequences."""
    ok = [o for o in outcomes if o.success]
    failed = [o for o in outcomes if not o.success]
    dur = duration if duration > 0 else float("nan")

    input_lens: list[int] = []
    output_lens: list[int] = []
    ttfts: list[float] = []
    e2els: list[float] = []
    tpots: list[float] = []
    all_tpots: list[float] = []
    itls: list[float] = []
    token_times: list[float] = []
    short = 0
    short_missing = 0
    for o in outcomes:
        p_len = o.usage_in if o.usage_in is not None else prompt_lens[o.index]
        input_lens.append(p_len)
        if not o.success:
            output_lens.append(0)
            continue
        n_out = 0 if cfg.embeddings else output_tokens(o, counted_output[o.index])
        output_lens.append(n_out)
        e2els.append(o.latency)
        if cfg.embeddings:
            continue
        ttfts.append(o.ttft)
        t = stats.tpot(o.latency, o.ttft, n_out)
        if t is not None:
            tpots.append(t)
        all_tpots.append(t or 0.0)
        itls.extend(o.itl)
        if o.t_first is not None:
            t_tok = o.t_first
            token_times.append(t_tok)
            for gap in o.itl:
                t_tok += gap
                token_times.append(t_tok)
        if cfg.ignore_eos and n_out < expected_output_lens[o.index]:
            short += 1
            short_missing += expected_output_lens[o.index] - n_out

    total_in = sum(input_lens[i] for i, o in enumerate(outcomes) if o.success)
    total_out = sum(output_lens)
    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
    }
    if cfg.embeddings:
        result["total_input_sequences"] = len(ok)
        result["request_throughput"] = len(ok) / dur
        result["input_sequence_throughput"] = len(ok) / dur
        result["total_token_throughput"] = total_in / dur
    else:
        result["total_output_tokens"] = total_out
        result["request_throughput"] = len(ok) / dur
        good = stats.goodput_count(cfg.goodput_ms, ttfts, all_tpots, e2els)
        result["request_goodput"] = good / dur if cfg.goodput_ms else None
        result["output_throughput"] = total_out / dur
        result["total_token_throughput"] = (total_in + total_out) / dur
        origin = min((o.t_send for o in ok), default=0.0)
        result["max_output_tokens_per_s"] = stats.max_tokens_per_second(token_times, origin)
        result["max_concurrent_requests"] = stats.peak_concurrency((o.t_send, o.t_done) for o in ok)

    series = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    selected = ("e2el",) if cfg.embeddings else cfg.percentile_metrics
    for name in selected:
        summary = stats.summarize(series[name], cfg.percentiles)
        result[f"mean_{name}_ms"] = summary["mean"] * 1000
        result[f"median_{name}_ms"] = summary["median"] * 1000
        result[f"std_{name}_ms"] = summary["std"] * 1000
        for p in cfg.percentiles:
            label = stats.percentile_label(p)
            result[f"p{label}_{name}_ms"] = summary[f"p{label}"] * 1000

    if cfg.detailed:
        result["input_lens"] = input_lens
        result["output_lens"] = output_lens
        result["ttfts"] = [o.ttft if o.success else 0.0 for o in outcomes]
        result["itls"] = [o.itl if o.success else [] for o in outcomes]
        result["latencies"] = [o.latency if o.success else 0.0 for o in outcomes]
        origin = min((o.t_sched for o in outcomes), default=0.0)
        result["start_times"] = [o.t_send - origin for o in outcomes]
        result["smg_scheduled_times"] = [o.t_sched - origin for o in outcomes]
        result["queue_times"] = [o.queue for o in outcomes]
        result["generated_texts"] = [o.text for o in outcomes]
        result["errors"] = [_error_text(o) for o in outcomes]
        result["smg_send_lags"] = [o.lag for o in outcomes]
        # The report's per-request data (docs/bench.md "Result file"): seconds from the
        # same origin as start_times; `worker` stays None until a response names it.
        result["smg_requests"] = {
            "start": [o.t_send - origin for o in outcomes],
            "end": [o.t_done - origin for o in outcomes],
            "ok": [o.success for o in outcomes],
            "error": [None if o.success else (o.error or "unknown") for o in outcomes],
            "worker": [None] * len(outcomes),
        }

    n = len(outcomes)
    error_rate = len(failed) / n if n else 0.0
    by_error = Counter(o.error or "unknown" for o in failed)
    by_status = Counter(str(o.status) if o.status else "none" for o in failed)
    result["smg_failures"] = {"by_error": dict(by_error), "by_status": dict(by_status)}
    result["smg_error_rate"] = error_rate
    invalid: list[str] = []
    if n and not ok:
        invalid.append("no request succeeded")
    if error_rate > cfg.max_error_rate:
        invalid.append(
            f"error rate {error_rate:.2%} is above --max-error-rate {cfg.max_error_rate:.2%}"
        )
    result["smg_valid"] = not invalid
    result["smg_invalid_reasons"] = invalid
    if cfg.ignore_eos and not cfg.embeddings:
        result["smg_short_outputs"] = {"requests": short, "missing_tokens": short_missing}
    return result


def _error_text(o: Outcome) -> str:
    if o.success:
        return ""
    return f"{o.error}: {o.error_detail}" if o.error_detail else str(o.error)


def saturation_warnings(cpu: Sequence[tuple[float, float]], lag_p99_ms: float) -> list[str]:
    """The client-saturation rule, one source for the end-of-run report and the live
    display: cpu holds (percent of a core, seconds it was measured over) per process."""
    warnings: list[str] = []
    # Under half a second gives too few CPU ticks to judge.
    judged = [pct for pct, wall in cpu if wall >= 0.5]
    if judged and max(judged) > CPU_WARN_PERCENT:
        warnings.append(
            f"client CPU at {max(judged):.0f}% of a core (> {CPU_WARN_PERCENT:.0f}%): the client"
            " may be the bottleneck; add --client-processes"
        )
    if lag_p99_ms > LAG_WARN_MS:
        warnings.append(
            f"p99 send lag {lag_p99_ms:.1f} ms (> {LAG_WARN_MS:.0f} ms): requests left"
            " later than scheduled; the client could not keep up"
        )
    return warnings


def client_report(
    outcomes: Sequence[Outcome], procs: Sequence[ProcStats], fd_limit: int
) -> tuple[dict[str, Any], list[str]]:
    """The client's own health: CPU per process, send lag, queueing; and warnings."""
    lags = [o.lag for o in outcomes]
    queues = [o.queue for o in outcomes]
    lag = stats.summarize(lags, (99.0,))
    queue = stats.summarize(queues, (99.0,))
    per_proc = [
        {
            "pid": p.pid,
            "cpu_seconds": p.cpu_s,
            "wall_seconds": p.wall_s,
            "cpu_percent": 100.0 * p.cpu_s / p.wall_s if p.wall_s > 0 else 0.0,
            "peak_in_flight": p.peak_in_flight,
            "connections_opened": p.connections_opened,
        }
        for p in procs
    ]
    cpu_max = max((p["cpu_percent"] for p in per_proc), default=0.0)
    report = {
        "processes": len(procs),
        "cpu_percent_max": cpu_max,
        "cpu_seconds": sum(p.cpu_s for p in procs),
        "per_process": per_proc,
        "send_lag_ms": {k: v * 1000 for k, v in lag.items()},
        "queue_time_ms": {k: v * 1000 for k, v in queue.items()},
        "peak_in_flight": sum(p.peak_in_flight for p in procs),
        "fd_limit": fd_limit,
        "gc_frozen": True,
        "http_client": "smg (asyncio + httptools, keep-alive pool)",
        "warmup_failed": sum(p.warmup_failed for p in procs),
    }
    warnings = saturation_warnings(
        [(p["cpu_percent"], p["wall_seconds"]) for p in per_proc], lag["p99"] * 1000
    )
    if report["warmup_failed"]:
        warnings.append(f"{report['warmup_failed']} warmup request(s) failed")
    return report, warnings
