"""Sweeps over request rates or concurrencies, and the SLO search.

`--request-rate 1,2,4` or `--max-concurrency 1,8,32` run one benchmark per value, one after
another with the same seed (so the same prompts and, scaled by the rate, the same
schedule), and print one table. `--search request-rate|max-concurrency` with `--slo`
bounds finds the highest value whose run meets every bound: it doubles from
`--search-min` until a point fails or `--search-max` is reached, then bisects. The pieces
that decide (SLO parsing and checking, the search, the table) are pure; `run_plan` does
the running and saving.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from smg.bench import results
from smg.bench.metrics import GEN_METRICS
from smg.bench.stats import percentile_label

VARIABLES = {"request-rate": "request_rate", "max-concurrency": "max_concurrency"}
# Bisection halves the bracket each step and doubling doubles the value, so a search
# needs about log2(max/min) + log2(1/precision) points; this only guards a bug.
MAX_SEARCH_POINTS = 200
_STAT = re.compile(r"^(mean|median|p\d+(?:\.\d+)?)$")


class SloError(ValueError):
    """A --slo item that cannot be understood."""


# ---------------------------------------------------------------- SLO bounds (pure)


def parse_slo(items: Sequence[str]) -> dict[str, float]:
    """`ttft_p99:500` (or the result key's own order, `p99_ttft`, with or without `_ms`)
    -> {"ttft_p99": 500.0}. Metrics: ttft, tpot, itl, e2el; statistics: mean, median,
    pNN. Bounds are milliseconds; a later item for the same name wins."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition(":")
        if not sep or not name:
            raise SloError(f"invalid --slo {item!r}: use METRIC_STAT:MS, e.g. ttft_p99:500")
        try:
            bound = float(value)
        except ValueError:
            raise SloError(f"invalid --slo {item!r}: {value!r} is not a number") from None
        if not (math.isfinite(bound) and bound >= 0):
            raise SloError(f"invalid --slo {item!r}: the bound must be >= 0 ms")
        out[slo_name(name)] = bound
    return out


def slo_name(name: str) -> str:
    """The canonical `metric_stat` form of an SLO name (pNN written as the result does)."""
    text = name.strip().lower()
    text = text.removesuffix("_ms")
    parts = text.split("_")
    if len(parts) == 2:
        if parts[0] in GEN_METRICS and _STAT.match(parts[1]):
            metric, stat = parts
        elif parts[1] in GEN_METRICS and _STAT.match(parts[0]):
            stat, metric = parts
        else:
            metric = stat = ""
        if metric:
            if stat.startswith("p"):
                p = float(stat[1:])
                if not 0 <= p <= 100:
                    raise SloError(f"invalid --slo {name!r}: percentile {p:g} is not in [0, 100]")
                stat = "p" + percentile_label(p)
            return f"{metric}_{stat}"
    raise SloError(
        f"invalid --slo metric {name!r}: use ttft, tpot, itl or e2el with mean, median or pNN,"
        " e.g. ttft_p99 or e2el_median"
    )


def result_key(name: str) -> str:
    """`ttft_p99` -> the result's key `p99_ttft_ms`."""
    metric, stat = name.split("_")
    return f"{stat}_{metric}_ms"


def slo_percentiles(slo: dict[str, float]) -> list[float]:
    """The percentiles the bounds read (each must be computed by the run)."""
    out: list[float] = []
    for name in slo:
        stat = name.split("_")[1]
        if stat.startswith("p") and float(stat[1:]) not in out:
            out.append(float(stat[1:]))
    return out


def meets_slo(result: dict[str, Any], slo: dict[str, float]) -> bool:
    """A valid run whose every bounded statistic is at or under its bound. An invalid run,
    or a statistic that is missing or NaN (no successful request), does not meet."""
    if not result.get("smg_valid"):
        return False
    for name, bound in slo.items():
        value = result.get(result_key(name))
        if not isinstance(value, (int, float)) or math.isnan(value) or value > bound:
            return False
    return True


# ---------------------------------------------------------------- the search (pure)


@dataclass
class LimitSearch:
    """Highest value meeting the SLO: start at `start`, double while points meet (up to
    `cap`), then bisect between the highest meeting (`low`) and the lowest failing
    (`high`) value. A rate stops when (high - low) / low <= precision; an integer
    (concurrency) when high - low <= 1. Feed each run's verdict with `feed`; `next_value`
    is None when done, and `low` is then the answer (None: not even `start` met)."""

    start: float
    cap: float
    precision: float
    integer: bool = False
    low: float | None = None
    high: float | None = None

    def next_value(self) -> float | None:
        if self.high is None:
            if self.low is None:
                return self.start
            if self.low >= self.cap:
                return None  # the cap itself met: the answer is the cap
            return min(self.low * 2, self.cap)
        if self.low is None:
            return None  # the first value failed: nothing tried meets
        if self.integer:
            if self.high - self.low <= 1:
                return None
            return (int(self.low) + int(self.high)) // 2
        if (self.high - self.low) <= self.precision * self.low:
            return None
        return (self.low + self.high) / 2

    def feed(self, value: float, ok: bool) -> None:
        if ok:
            self.low = value if self.low is None else max(self.low, value)
        else:
            self.high = value if self.high is None else min(self.high, value)


def walk(search: LimitSearch, verdict: Callable[[float], Any]) -> list[tuple[float, bool]]:
    """Runs a search to its end, asking `verdict(value)` (truthy: the point met) for each
    value it tries (a real run, or the tests' fake server); returns the points in order."""
    seen: list[tuple[float, bool]] = []
    for _ in range(MAX_SEARCH_POINTS):
        value = search.next_value()
        if value is None:
            break
        ok = bool(verdict(value))
        search.feed(value, ok)
        seen.append((value, ok))
    return seen


# ---------------------------------------------------------------- the table (pure)


def tail_percentile(percentiles: Sequence[float]) -> str | None:
    """The table's tail column: p99 when computed, else the highest percentile computed."""
    if 99.0 in percentiles:
        return "99"
    return percentile_label(max(percentiles)) if percentiles else None


def _num(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _value(value: Any) -> str:
    return "inf" if value in (math.inf, "inf") else f"{float(value):g}"


def table_rows(doc: dict[str, Any], tail: str | None) -> list[list[str]]:
    """Header and one row per point (in the order run) of a sweep document."""
    sweep = doc["smg_sweep"]
    head = [sweep["variable"], "req/s", "out tok/s"]
    stats = [("median", "p50")] + ([(f"p{tail}", f"p{tail}")] if tail else [])
    for label in ("TTFT", "ITL", "E2E"):
        head += [f"{label} {shown}" for _key, shown in stats]
    head += ["goodput", "errors", "valid", "SLO met"]
    rows = [head]
    for point in sweep["points"]:
        r = point["result"]
        row = [
            _value(point["value"]),
            _num(r.get("request_throughput"), 2),
            _num(r.get("output_throughput"), 1),
        ]
        for metric in ("ttft", "itl", "e2el"):
            row += [_num(r.get(f"{key}_{metric}_ms"), 1) for key, _shown in stats]
        met = point.get("meets_slo")
        row += [
            _num(r.get("request_goodput"), 2),
            str(r.get("failed", 0)),
            "yes" if r.get("smg_valid") else "NO",
            "-" if met is None else ("yes" if met else "no"),
        ]
        rows.append(row)
    return rows


def table_text(doc: dict[str, Any], tail: str | None = "99") -> str:
    """The sweep's table: columns right-aligned, the first left-aligned."""
    rows = table_rows(doc, tail)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def answer_text(doc: dict[str, Any]) -> str | None:
    """The search's (or an SLO-checked sweep's) conclusion, one line."""
    sweep = doc["smg_sweep"]
    var = sweep["variable"]
    bounds = _bounds(sweep["slo"])
    search = sweep.get("search")
    if search is not None:
        best = search["result"]
        if best is None:
            return f"search: no {var} tried meets {bounds} (not even {_value(search['start'])})"
        if search["high"] is None:
            return (
                f"search: highest {var} meeting {bounds}: {_value(best)}"
                f" (the --search-max cap; the limit may be higher)"
            )
        return (
            f"search: highest {var} meeting {bounds}: {_value(best)}"
            f" (the next tried, {_value(search['high'])}, did not)"
        )
    if not sweep["slo"]:
        return None
    met = [p["value"] for p in sweep["points"] if p["meets_slo"]]
    if not met:
        return f"sweep: no {var} meets {bounds}"
    return f"sweep: highest {var} meeting {bounds}: {_value(max(met))}"


# ---------------------------------------------------------------- flags


@dataclass
class SweepPlan:
    variable: str  # "request_rate" | "max_concurrency"
    values: list[float] | None  # a sweep's values; None for a search
    search: LimitSearch | None
    slo: dict[str, float]


def plan_of(args: argparse.Namespace) -> SweepPlan | None:
    """What the flags ask for (None: one plain run). Adds the percentiles and metrics the
    --slo bounds read to --metric-percentiles / --percentile-metrics, so every bound can
    be checked. Raises UsageError (serve's) for flags that do not fit together."""
    from smg.bench.serve import UsageError

    rates = args.request_rate if isinstance(args.request_rate, list) else None
    concs = args.max_concurrency if isinstance(args.max_concurrency, list) else None
    try:
        slo = parse_slo(args.slo)
    except SloError as exc:
        raise UsageError(str(exc)) from exc
    if rates is not None and concs is not None:
        raise UsageError("sweep one of --request-rate and --max-concurrency, not both")
    if args.search and (rates is not None or concs is not None):
        raise UsageError("--search chooses its own values: give no comma list with it")
    if args.search and not slo:
        raise UsageError("--search needs at least one --slo bound, e.g. --slo ttft_p99:500")
    if any(v <= 0 for v in rates or []):
        raise UsageError("--request-rate values must be > 0")
    if any(v <= 0 for v in concs or []):
        raise UsageError("--max-concurrency values must be > 0")
    sweeping_rate = rates is not None or args.search == "request-rate"
    if sweeping_rate and args.ramp_up_strategy:
        raise UsageError("a rate sweep or search cannot be combined with --ramp-up-strategy")
    if sweeping_rate and args.dataset_name == "timed_trace" and args.self_timed is not False:
        raise UsageError("a timed trace keeps its own times: add --no-self-timed to sweep rates")
    if slo:
        _add_slo_statistics(args, slo)
    if rates is not None:
        return SweepPlan("request_rate", list(rates), None, slo)
    if concs is not None:
        return SweepPlan("max_concurrency", [float(v) for v in concs], None, slo)
    if args.search:
        return SweepPlan(VARIABLES[args.search], None, _search_of(args), slo)
    return None


def _search_of(args: argparse.Namespace) -> LimitSearch:
    from smg.bench.serve import UsageError

    integer = args.search == "max-concurrency"
    start, cap = args.search_min, args.search_max
    if not (math.isfinite(start) and start > 0):
        raise UsageError("--search-min must be > 0")
    if not (math.isfinite(cap) and cap >= start):
        raise UsageError("--search-max must be finite and >= --search-min")
    if not (math.isfinite(args.search_precision) and args.search_precision > 0):
        raise UsageError("--search-precision must be > 0 (relative, e.g. 0.1)")
    if integer:
        start, cap = float(max(1, math.ceil(start))), float(max(1, math.floor(cap)))
        if cap < start:
            raise UsageError("--search-max must be >= --search-min (whole concurrencies)")
    return LimitSearch(start, cap, args.search_precision, integer)


def _add_slo_statistics(args: argparse.Namespace, slo: dict[str, float]) -> None:
    from smg.bench.backends import kind_of
    from smg.bench.serve import UsageError

    metrics = sorted({name.split("_")[0] for name in slo})
    if kind_of(args.backend) == "embeddings" and metrics != ["e2el"]:
        raise UsageError("an embeddings run measures only e2el: use e2el_* --slo bounds")
    text = args.metric_percentiles or ""
    have = [p.strip() for p in text.split(",") if p.strip()]
    try:
        have_f = [float(p) for p in have]
    except ValueError:
        return  # serve.metric_config reports the bad list before any run
    extra = [percentile_label(p) for p in slo_percentiles(slo) if p not in have_f]
    args.metric_percentiles = ",".join(have + extra)
    if args.percentile_metrics:
        chosen = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
        args.percentile_metrics = ",".join(chosen + [m for m in metrics if m not in chosen])


# ---------------------------------------------------------------- running


def run_plan(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Run what the flags ask for: one run (its result dict), or a sweep or search (one
    sweep document whose points hold each run's result)."""
    from smg.bench.serve import metric_config, run_benchmark, validate

    sp = plan_of(args)
    if sp is None:
        result = run_benchmark(args, argv)
        slo = parse_slo(args.slo)
        if slo:
            print(f"SLO {_bounds(slo)}: {'met' if meets_slo(result, slo) else 'NOT met'}")
        return [result]
    # Every point's flags are checked before the first point runs.
    first = sp.values[0] if sp.values else sp.search.start  # type: ignore[union-attr]
    probe = _point_args(args, sp.variable, first)
    validate(probe)
    metric_config(probe, False)
    per_point_files = not args.result_filename
    points: list[dict[str, Any]] = []

    def run_point(value: float) -> bool | None:
        pa = _point_args(args, sp.variable, value)
        if not per_point_files:
            pa.save_result = pa.append_result = False  # the name given is the sweep's
        print(f"\n=== {sp.variable} = {_value(value)} (point {len(points) + 1}) ===")
        result = run_benchmark(pa, argv)
        met = meets_slo(result, sp.slo) if sp.slo else None
        points.append({"value": _plain(value, sp.variable), "result": result, "meets_slo": met})
        return met

    if sp.search is None:
        for value in sp.values or []:
            run_point(value)
        search_doc = None
    else:
        walk(sp.search, run_point)  # a point that failed or met no bound (None) fails
        s = sp.search
        search_doc = {
            "precision": s.precision if not s.integer else 1,
            "start": _plain(s.start, sp.variable),
            "max": _plain(s.cap, sp.variable),
            "low": None if s.low is None else _plain(s.low, sp.variable),
            "high": None if s.high is None else _plain(s.high, sp.variable),
            "result": None if s.low is None else _plain(s.low, sp.variable),
        }
    doc = {
        "smg_sweep": {
            "variable": sp.variable,
            "slo": sp.slo,
            "search": search_doc,
            "points": points,
            "goodput": _goodput(args),
            "label": args.label,
            "smg_run": results.run_metadata(argv),
        }
    }
    tail = tail_percentile([float(p) for p in args.metric_percentiles.split(",") if p.strip()])
    print("\n" + "{:=^50}".format(" Sweep (latencies in ms) ") + "\n" + table_text(doc, tail))
    line = answer_text(doc)
    if line:
        print(line)
    save_sweep(args, doc)
    return [doc]


def _bounds(slo: dict[str, float]) -> str:
    return ", ".join(f"{k} <= {v:g} ms" for k, v in slo.items())


def _goodput(args: argparse.Namespace) -> dict[str, float]:
    from smg.bench.args import parse_goodput

    return parse_goodput(args.goodput)


def _plain(value: float, variable: str) -> float | int:
    return int(value) if variable == "max_concurrency" else value


def _point_args(args: argparse.Namespace, variable: str, value: float) -> argparse.Namespace:
    pa = copy.copy(args)
    setattr(pa, variable, _plain(value, variable))
    pa.search = None  # a point is one plain run (serve.validate refuses --search)
    return pa


def save_sweep(args: argparse.Namespace, doc: dict[str, Any]) -> str | None:
    """Writes the sweep document where --save-result would save (--result-filename, else
    `{label}-sweep-{variable}-{model}-{date}.json`) and a CSV beside it with one row per
    point (the point's value, whether it met the SLO, and the run's scalar keys)."""
    if not (args.save_result or args.append_result):
        return None
    sweep = doc["smg_sweep"]
    first = sweep["points"][0]["result"] if sweep["points"] else {}
    model = str(first.get("model_id") or "model").split("/")[-1]
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.result_filename or (
        f"{args.label or args.backend}-sweep-{sweep['variable']}-{model}-{date}.json"
    )
    path = os.path.join(args.result_dir, name) if args.result_dir else name
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    append = bool(args.append_result)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        if append and f.tell() != 0:
            f.write("\n")
        json.dump(results._json_safe(doc), f)
    rows = [
        {"value": p["value"], "meets_slo": p["meets_slo"], **results.flat_scalars(p["result"])}
        for p in results._json_safe(sweep["points"])
    ]
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    csv_path = os.path.splitext(path)[0] + ".csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"saved sweep {path} and {csv_path}")
    return path


def docs_valid(docs: list[dict[str, Any]]) -> bool:
    """Every run behind these documents is valid (smg_valid); for a search, the answer
    exists (its overloaded points may fail: that is how the limit is found)."""
    for doc in docs:
        sweep = doc.get("smg_sweep")
        if sweep is None:
            if not doc.get("smg_valid"):
                return False
        elif sweep.get("search") is not None:
            if sweep["search"]["result"] is None:
                return False
        elif not all(p["result"].get("smg_valid") for p in sweep["points"]):
            return False
    return True
