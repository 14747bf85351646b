"""Pure parts of `run.py all`: the scenario plan, the core plan of the scaling series, the
rows of the side-by-side table (from each tool's own JSON), and the Markdown and HTML views.

Nothing here starts a process or opens a socket; bench_all.py runs the tools.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchlib import format_cpu_list, paired_ratios

SCENARIOS: tuple[str, ...] = ("http", "tls", "cache", "grpc")
SCALING_PROCESSES: tuple[int, ...] = (1, 2, 4, 8)
SCALING_MIN_CORES = 16
# The two ratios of the table: numerator, denominator (the system names each tool uses are
# mapped onto these three first).
TABLE_RATIOS: tuple[tuple[str, str], ...] = (("smg", "rust"), ("smg", "direct"))
SYSTEM_LABELS = {"direct": "direct", "smg": "smg", "rust": "Rust SMG 1.13"}


# ----------------------------------------------------------------------------- scenario plan


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    title: str
    tool: str  # a script beside this file
    argv: tuple[str, ...]  # its arguments, --out excluded (the runner adds it)


def plan_scenarios(
    names: Sequence[str],
    *,
    quick: bool,
    rounds: int,
    duration: int,
    rust: bool,
    rust_venv: str,
) -> list[ScenarioSpec]:
    """The tool and arguments of each scenario, in the order given.

    Every HTTP-side scenario is one run.py invocation, so the systems alternate round by round
    inside it (run.py rotates the order each round). --quick: one round of 1 s, no warm-up,
    no fixed-rate phase, the smallest cache and gRPC workloads (a harness check, not a number).
    """
    http_gws = "direct,smg,rust" if rust else "direct,smg"
    timing = (
        ["--rounds", "1", "--duration", "1", "--warmup", "0", "--fixed-rate-fraction", "0"]
        if quick
        else ["--rounds", str(rounds), "--duration", str(duration), "--fixed-rate-fraction", "0"]
    )
    rust_args = ["--rust-venv", rust_venv]
    out: list[ScenarioSpec] = []
    for name in names:
        if name == "http":
            payloads = "chat,stream" if quick else "chat,completion,stream"
            argv = ["--gateways", http_gws, "--payloads", payloads, *timing, *rust_args]
            out.append(ScenarioSpec(name, "HTTP, plain", "run.py", tuple(argv)))
        elif name == "tls":
            payloads = "chat" if quick else "chat,stream"
            argv = ["--gateways", http_gws, "--payloads", payloads, "--tls", *timing, *rust_args]
            out.append(
                ScenarioSpec(name, "HTTPS on both gateways (direct: plain)", "run.py", tuple(argv))
            )
        elif name == "cache":
            systems = "smg-p4,rust" if rust else "smg-p4"
            argv = ["--systems", systems, *rust_args]
            argv += (
                ["--smoke"]
                if quick
                else ["--seeds", ",".join(str(s) for s in range(1, rounds + 1))]
            )
            out.append(
                ScenarioSpec(name, "cache-aware shared prefix", "cache_bench.py", tuple(argv))
            )
        elif name == "grpc":
            gws = "rust,smg-p2" if rust else "smg-p2"
            argv = ["--gateways", gws, "--rust-smg", f"{rust_venv}/bin/smg", "--input-lens"]
            # A length listed k times is k rounds (grpc_bench runs Rust, then smg, per entry).
            argv += ["256", "--output-len", "32", "--smoke"] if quick else ["1024"] * rounds
            out.append(
                ScenarioSpec(
                    name, "gRPC streaming; each round Rust, then smg", "grpc_bench.py", tuple(argv)
                )
            )
        else:
            raise ValueError(f"unknown scenario {name!r}; pick from {', '.join(SCENARIOS)}")
    return out


# ----------------------------------------------------------------------------- scaling plan


@dataclass(frozen=True)
class ScalingStep:
    processes: int
    gateway: tuple[int, ...]  # smg's processes, or the Rust SMG's threads: the same cores
    stub: tuple[int, ...]
    client: tuple[int, ...]

    def run_args(self) -> list[str]:
        """run.py's arguments that place this step on its cores."""
        return [
            "--gateway-cores",
            format_cpu_list(self.gateway),
            "--stub-cores",
            format_cpu_list(self.stub),
            "--client-cores",
            format_cpu_list(self.client),
            "--smg-processes",
            str(self.processes),
        ]


@dataclass(frozen=True)
class ScalingPlan:
    steps: tuple[ScalingStep, ...]
    skipped: str | None  # why there are no steps


def scaling_plan(
    available: Sequence[int],
    processes: Sequence[int] = SCALING_PROCESSES,
    min_cores: int = SCALING_MIN_CORES,
) -> ScalingPlan:
    """Disjoint cores for the gateway, the stub and the load generator, per process count.

    The gateway takes the first `p` cores of a pool as large as the largest `p` (so every
    step's gateway cores are a prefix of the same pool and the load side never moves); the
    stub and the client split the remaining cores, the stub the lower half.
    """
    avail = sorted(set(available))
    if len(avail) < min_cores:
        return ScalingPlan(
            (), f"needs {min_cores} or more cores; this machine lets us use {len(avail)}"
        )
    if not processes or min(processes) < 1:
        raise ValueError("process counts must be positive")
    top = max(processes)
    rest = avail[top:]
    if len(rest) < 2:
        return ScalingPlan((), f"{len(avail)} cores leave fewer than 2 for the stub and client")
    half = len(rest) // 2
    stub, client = tuple(rest[:half]), tuple(rest[half:])
    steps = tuple(ScalingStep(p, tuple(avail[:p]), stub, client) for p in sorted(set(processes)))
    return ScalingPlan(steps, None)


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table: a scenario's case, the systems' medians, the two ratios."""

    scenario: str
    case: str
    metric: str
    values: dict[str, float | None]
    ratios: dict[str, dict[str, float] | None]  # "smg/rust" -> median, low, high, n
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _ratio_dict(numer: Mapping[int, float | None], denom: Mapping[int, float | None]) -> Any:
    rs = paired_ratios(numer, denom)
    return asdict(rs) if rs is not None else None


def _cpu_per_1k(runs: Sequence[Mapping[str, Any]], gateway: str, payload: str) -> list[float]:
    """Gateway CPU seconds per 1,000 requests of each clean run (steadier than req/s)."""
    return [
        m["gateway_cpu_s"] / m["requests"] * 1000.0
        for m in runs
        if m["gateway"] == gateway
        and m["payload"] == payload
        and not m["void"]
        and m.get("gateway_cpu_s") is not None
        and m.get("requests")
    ]


def rows_from_run(scenario: str, data: Mapping[str, Any]) -> list[Row]:
    """run.py's results JSON: per payload, median req/s and the per-round paired ratios."""
    gateways = data["settings"]["gateways"]
    rows: list[Row] = []
    for payload in data["settings"]["payloads"]:
        per_round: dict[str, dict[int, float | None]] = {g: {} for g in gateways}
        voids: list[str] = []
        for m in data["max_runs"]:
            if m["payload"] != payload or m["gateway"] not in per_round:
                continue
            per_round[m["gateway"]][m["round"]] = None if m["void"] else float(m["rps"])
            if m["void"]:
                voids.append(f"{m['gateway']} r{m['round'] + 1}: {'; '.join(m['void'])}")
        values = {
            g: (statistics.median(v) if (v := [x for x in per_round[g].values() if x]) else None)
            for g in gateways
        }
        ratios = {
            f"{a}/{b}": _ratio_dict(per_round[a], per_round[b])
            for a, b in TABLE_RATIOS
            if a in per_round and b in per_round
        }
        note = ("void: " + " | ".join(voids)) if voids else ""
        cpu = {
            g: statistics.median(c) if (c := _cpu_per_1k(data["max_runs"], g, payload)) else None
            for g in gateways
            if g != "direct"
        }
        rows.append(Row(scenario, payload, "req/s", values, ratios, note, {"cpu_s_per_1k": cpu}))
    return rows


def rows_from_cache(data: Mapping[str, Any]) -> list[Row]:
    """cache_bench.py's JSON: req/s paired by seed (smg-p4 against rust), hit rates beside."""
    systems = {s["system"]: s for s in data["systems"]}
    smg, rust = systems.get("smg-p4"), systems.get("rust")
    values = {"smg": smg["rps"] if smg else None, "rust": rust["rps"] if rust else None}
    ratios: dict[str, Any] = {}
    if smg and rust:
        ratios["smg/rust"] = _ratio_dict(
            dict(enumerate(smg["rps_per_seed"])), dict(enumerate(rust["rps_per_seed"]))
        )
    hits = {k: f"{v['hit_rate']:.1%}" for k, v in (("smg", smg), ("rust", rust)) if v}
    errors = sum(s["errors"] for s in data["systems"])
    note = "hit rate " + ", ".join(f"{k} {v}" for k, v in hits.items())
    if errors:
        note += f"; {errors} failed requests"
    for s in data.get("skipped", []):
        note += f"; {s['system']} skipped: {s['reason']}"
    extra = {"hit_rate": {k: v["hit_rate"] for k, v in (("smg", smg), ("rust", rust)) if v}}
    return [Row("cache", "shared-prefix chat stream", "req/s", values, ratios, note, extra)]


def rows_from_grpc(data: Mapping[str, Any]) -> list[Row]:
    """grpc_bench.py's JSON: output tokens/s at saturation. A length listed k times in
    --input-lens is k rounds (each: the Rust SMG, then smg); round i of one pairs with round
    i of the other."""
    rows: list[Row] = []
    for n in sorted({r["input_len"] for r in data["rows"]}):
        per_round: dict[str, dict[int, float | None]] = {}
        cpus: dict[str, list[float]] = {}
        notes: list[str] = []
        for name, key in (("smg-p2", "smg"), ("rust", "rust")):
            found = [r for r in data["rows"] if r["input_len"] == n and r["gateway"] == name]
            if not found:
                continue
            per_round[key] = {}
            for i, r in enumerate(found):
                if "error" in r:
                    per_round[key][i] = None
                    notes.append(f"{key} r{i + 1} error: {r['error'][:80]}")
                    continue
                sat = r["saturation"]
                failed = sat.get("failed") or 0
                per_round[key][i] = None if failed else sat.get("output_throughput")
                if failed:
                    notes.append(f"{key} r{i + 1}: {failed} failed")
                elif sat.get("cpu_s_per_1000_req") is not None:
                    cpus.setdefault(key, []).append(sat["cpu_s_per_1000_req"])
        values = {
            k: (statistics.median(c) if (c := [v for v in runs.values() if v]) else None)
            for k, runs in per_round.items()
        }
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        ratios: dict[str, Any] = {}
        if "smg" in per_round and "rust" in per_round:
            ratios["smg/rust"] = _ratio_dict(per_round["smg"], per_round["rust"])
        rows.append(
            Row(
                "grpc",
                f"prompt {n} tokens",
                "out tok/s",
                values,
                ratios,
                "; ".join(notes),
                {"cpu_s_per_1k": cpu},
            )
        )
    return rows


def rows_from_scaling(results: Mapping[int, Mapping[str, Any]]) -> list[Row]:
    """The scaling series: one run.py result per process count (chat only)."""
    rows: list[Row] = []
    for p in sorted(results):
        for row in rows_from_run("scaling", results[p]):
            row.case = f"{p} core{'s' if p > 1 else ''}, {row.case}"
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- views


def fmt_value(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.2f}"


def fmt_ratio(r: Mapping[str, float] | None) -> str:
    if not r:
        return "-"
    if int(r["n"]) == 1:
        return f"{r['median']:.2f}x (1 run)"
    return f"{r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f}, n={int(r['n'])})"


def fmt_cpu(extra: Mapping[str, Any]) -> str:
    cpu = extra.get("cpu_s_per_1k") or {}
    if not any(cpu.get(k) is not None for k in ("smg", "rust")):
        return "-"
    return " / ".join("-" if cpu.get(k) is None else f"{cpu[k]:.3g}" for k in ("smg", "rust"))


def markdown_table(doc: Mapping[str, Any]) -> str:
    """The side-by-side table: every scenario's rows, then the notes."""
    lines = [
        f"## native_bench all: {doc['started_at']}, {doc['host']['cpus']} CPUs, loadavg "
        f"{doc['host']['loadavg_at_start'][0]:.2f} at start / {doc['host']['loadavg_at_end'][0]:.2f}"
        f" at end{' (--quick: a harness check, not a measurement)' if doc.get('quick') else ''}",
        "",
        "| scenario | case | metric | direct | smg | Rust SMG 1.13 | smg / Rust, median (range) "
        "| smg / direct, median (range) | gateway CPU s / 1k req, smg / Rust |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in doc["rows"]:
        v, ra = r["values"], r["ratios"]
        lines.append(
            f"| {r['scenario']} | {r['case']} | {r['metric']} | {fmt_value(v.get('direct'))} | "
            f"{fmt_value(v.get('smg'))} | {fmt_value(v.get('rust'))} | "
            f"{fmt_ratio(ra.get('smg/rust'))} | {fmt_ratio(ra.get('smg/direct'))} | "
            f"{fmt_cpu(r.get('extra') or {})} |"
        )
    lines.append("")
    for s in doc["scenarios"]:
        state = s["status"] + (f": {s['note']}" if s.get("note") else "")
        lines.append(f"- {s['name']} ({s['title']}): {state}")
    lines.append(
        f"- scaling series: {doc['scaling']['status']}"
        + (f": {doc['scaling']['note']}" if doc["scaling"].get("note") else "")
    )
    for r in doc["rows"]:
        if r.get("note"):
            lines.append(f"- {r['scenario']} {r['case']}: {r['note']}")
    for n in doc.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


BAR_W, BAR_H, LABEL_W = 420, 22, 300


def ratio_svg(items: Sequence[tuple[str, Mapping[str, float] | None]]) -> str:
    """Horizontal bars of ratios (median) with their range as a whisker, and a line at 1.0.

    The scale runs from 0 to the largest high (at least 1.25), so 1.0 always shows.
    """
    shown = [(label, r) for label, r in items if r]
    top = max([1.25, *(float(r["high"]) * 1.05 for _, r in shown)])
    height = BAR_H * max(1, len(shown)) + 24
    width = LABEL_W + BAR_W + 90

    def x(v: float) -> float:
        return LABEL_W + v / top * BAR_W

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">'
    ]
    for i, (label, r) in enumerate(shown):
        assert r is not None
        y = i * BAR_H + 4
        med, lo, hi = float(r["median"]), float(r["low"]), float(r["high"])
        color = "#2b7a3d" if med >= 1.0 else "#b3452c"
        parts.append(
            f'<text x="{LABEL_W - 6}" y="{y + 14}" text-anchor="end" font-size="12">'
            f"{html.escape(label)}</text>"
        )
        parts.append(
            f'<rect x="{LABEL_W}" y="{y + 3}" width="{x(med) - LABEL_W:.1f}" height="{BAR_H - 8}"'
            f' fill="{color}"><title>{html.escape(label)}: {med:.3f}</title></rect>'
        )
        parts.append(
            f'<line x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y + 10}" y2="{y + 10}" '
            'stroke="#111" stroke-width="1.5"/>'
        )
        for end in (lo, hi):
            parts.append(
                f'<line x1="{x(end):.1f}" x2="{x(end):.1f}" y1="{y + 5}" y2="{y + 15}" '
                'stroke="#111" stroke-width="1.5"/>'
            )
        parts.append(
            f'<text x="{x(max(hi, med)) + 6:.1f}" y="{y + 14}" font-size="12">{med:.2f}x</text>'
        )
    base = BAR_H * max(1, len(shown)) + 4
    parts.append(
        f'<line x1="{x(1.0):.1f}" x2="{x(1.0):.1f}" y1="0" y2="{base}" stroke="#555" '
        'stroke-dasharray="4 3"/>'
    )
    parts.append(
        f'<text x="{x(1.0):.1f}" y="{base + 14}" text-anchor="middle" font-size="11">1.0</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def html_table(doc: Mapping[str, Any]) -> str:
    """The Markdown table's rows as an HTML table."""
    head = [
        "scenario",
        "case",
        "metric",
        "direct",
        "smg",
        "Rust SMG 1.13",
        "smg / Rust, median (range)",
        "smg / direct, median (range)",
        "gateway CPU s / 1k req, smg / Rust",
    ]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in doc["rows"]:
        v, ra = r["values"], r["ratios"]
        cells = [
            r["scenario"],
            r["case"],
            r["metric"],
            fmt_value(v.get("direct")),
            fmt_value(v.get("smg")),
            fmt_value(v.get("rust")),
            fmt_ratio(ra.get("smg/rust")),
            fmt_ratio(ra.get("smg/direct")),
            fmt_cpu(r.get("extra") or {}),
        ]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def html_report(doc: Mapping[str, Any], markdown: str) -> str:
    """One self-contained page: a bar chart per ratio kind, the table, the Markdown."""
    sections = []
    for key, title in (("smg/rust", "smg / Rust SMG 1.13"), ("smg/direct", "smg / direct")):
        items = [(f"{r['scenario']}: {r['case']}", r["ratios"].get(key)) for r in doc["rows"]]
        if any(r for _, r in items):
            sections.append(
                f"<h2>{html.escape(title)}</h2><p>median over rounds; the whisker is the "
                f"range (min-max)</p>{ratio_svg(items)}"
            )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>native_bench all</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em;"
        "overflow:auto}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}"
        "table{border-collapse:collapse}</style></head><body><h1>native_bench: smg next to the Rust SMG 1.13</h1>"
        + "".join(sections)
        + f"<h2>Table</h2>{html_table(doc)}<h2>As Markdown, with the notes</h2>"
        + f"<pre>{html.escape(markdown)}</pre></body></html>\n"
    )
