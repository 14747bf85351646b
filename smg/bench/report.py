"""The HTML report: `smg bench --plot` and `smg bench plot RESULT.json...`.

One self-contained HTML file (inline CSS and plain SVG from svg.py; no script, no CDN,
no network): the summary table, TTFT / ITL / E2E histograms and CDFs, throughput and
concurrency over time, a per-request timeline, per-worker spread, several results
overlaid, and sweep documents as latency-against-throughput curves with SLO bounds.
Everything above `write_report` is pure (dicts in, strings out).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any

from smg.bench import svg
from smg.bench.reqdata import (
    cdf_points,
    concurrency_over_time,
    distributions,
    histogram,
    quantile,
    rate_over_time,
    requests_of,
    sample_rows,
    token_times,
)

HIST_BINS = 40
METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
_STAT_KEY = re.compile(r"^(mean|median|std|p[0-9.]+)_(ttft|tpot|itl|e2el)_ms$")

# -- charts --------------------------------------------------------------------------


Item = tuple[str, dict[str, Any]]


def _runs(items: Sequence[Item]) -> list[Item]:
    """The runs to draw: results as given; an overhead result as its two sides."""
    out: list[Item] = []
    for name, doc in items:
        if "smg_sweep" in doc:
            continue
        if doc.get("smg_mode") == "overhead":
            out.extend(
                (f"{name} {side}", doc[side]) for side in ("direct", "gateway") if side in doc
            )
        else:
            out.append((name, doc))
    return out


def distribution_charts(runs: Sequence[Item]) -> list[str]:
    dists = [(name, distributions(r)) for name, r in runs]
    charts = []
    for key, label in METRICS:
        have = [(i, name, d[key]) for i, (name, d) in enumerate(dists) if d.get(key)]
        if not have:
            continue
        for _, _, vals in have:
            vals.sort()  # once: quantiles and CDFs read the sorted lists
        lowest = min(vals[0] for _, _, vals in have)
        highest = max(vals[-1] for _, _, vals in have)
        lo = min(0.0, lowest)
        hi = max(quantile(vals, 0.995) for _, _, vals in have) or highest or 1.0
        xt = svg.ticks(lo, hi)
        # The tail beyond the 99.5th percentile would squash the bins: it is counted in
        # the last bin, and the axis label says so.
        over = f"; above {svg.fmt(xt[-1])} in the last bin" if highest > xt[-1] else ""
        hists = [(i, name, *histogram(vals, xt[0], xt[-1], HIST_BINS)) for i, name, vals in have]
        tallest = max(max(counts) for *_, counts in hists)
        unit = "gaps" if key == "itl" else "requests"
        ch = svg.Chart(f"{label} histogram", f"{label} (ms{over})", unit, lo, hi, 0, tallest or 1)
        for i, name, edges, counts in hists:
            ch.steps(name, edges, counts, svg.color(i))
        charts.append(ch.render())
        cdf = svg.Chart(f"{label} CDF", f"{label} (ms)", "% at or below", lo, highest, 0, 100)
        for i, name, vals in have:
            cdf.line(svg.Series(name, cdf_points(vals), svg.color(i)))
        charts.append(cdf.render())
    return charts


def time_charts(runs: Sequence[Item]) -> list[str]:
    reqs = [(i, name, r, requests_of(r)) for i, (name, r) in enumerate(runs)]
    reqs = [(i, name, r, q) for i, name, r, q in reqs if q and q.start]
    if not reqs:
        return []
    t_end = max(max(q.end) for _, _, _, q in reqs) or 1.0
    out = []
    done = svg.Chart("Requests completed per second", "time (s)", "req/s", 0, t_end, 0, 1)
    series = [
        (i, name, rate_over_time([e for e, ok in zip(q.end, q.ok) if ok], t_end))
        for i, name, _, q in reqs
    ]
    out.append(_lines(done, series))
    toks = [(i, name, rate_over_time(token_times(r, q), t_end)) for i, name, r, q in reqs]
    toks = [(i, name, pts) for i, name, pts in toks if any(v for _, v in pts)]
    if toks:
        out.append(
            _lines(svg.Chart("Output tokens per second", "time (s)", "tok/s", 0, t_end, 0, 1), toks)
        )
    conc = [(i, name, concurrency_over_time(q.start, q.end, t_end)) for i, name, _, q in reqs]
    out.append(
        _lines(
            svg.Chart(
                "Requests in flight (peak per interval)", "time (s)", "requests", 0, t_end, 0, 1
            ),
            conc,
        )
    )
    return out


def _lines(proto: svg.Chart, series: list[tuple[int, str, list[tuple[float, float]]]]) -> str:
    top = max((v for _, _, pts in series for _, v in pts), default=1.0) or 1.0
    ch = svg.Chart(proto.title, proto.xlabel, proto.ylabel, proto.xlo, proto.xhi, 0, top)
    for i, name, pts in series:
        ch.line(svg.Series(name, pts, svg.color(i)))
    return ch.render()


def timeline_charts(runs: Sequence[Item]) -> list[str]:
    out = []
    for name, r in runs:
        q = requests_of(r)
        if not q or not q.start:
            continue
        rows = sample_rows(q)
        spans = []
        for i in rows:
            tip = f"request {i}: {q.start[i]:.3f}-{q.end[i]:.3f} s"
            if not q.ok[i]:
                tip += f", failed ({q.error[i] or 'error'})"
            if q.worker[i]:
                tip += f", worker {q.worker[i]}"
            if q.ok[i]:
                spans.append(svg.Span(q.start[i], q.end[i], svg.PALETTE[0], tip))
            else:
                spans.append(svg.Span(q.start[i], q.end[i], svg.FAIL, tip, min_width=4.0))
        n, failed = len(q.start), q.ok.count(False)
        kept = sum(1 for i in rows if not q.ok[i])
        shown = (
            "" if len(rows) == n else f", {len(rows)} of {n} shown: {kept} failed, the rest sampled"
        )
        title = f"{name}: per-request timeline ({n} requests, {failed} failed{shown})"
        legend = [("succeeded", svg.PALETTE[0]), ("failed", svg.FAIL)]
        out.append(svg.gantt(title, spans, "time (s)", legend))
    return out


def worker_charts(items: Sequence[Item]) -> list[str]:
    """Per-worker spread: overhead mode's /mock/stats counts; per-request `worker` when known."""
    out = []
    for name, doc in items:
        spread = (doc.get("smg_overhead") or {}).get("worker_requests") or {}
        if spread:
            cats = list(spread)
            out.append(
                svg.bars(
                    f"{name}: requests per worker",
                    cats,
                    [(name, svg.color(0), [float(spread[c]) for c in cats])],
                    "requests",
                )
            )
    for name, r in _runs(items):
        q = requests_of(r)
        if not q or not any(q.worker):
            continue
        counts = Counter(w for w in q.worker if w)
        cats = sorted(counts)
        failed = Counter(w for w, ok in zip(q.worker, q.ok) if w and not ok)
        out.append(
            svg.bars(
                f"{name}: requests per worker",
                cats,
                [
                    ("all", svg.color(0), [float(counts[c]) for c in cats]),
                    ("failed", svg.FAIL, [float(failed[c]) for c in cats]),
                ],
                "requests",
            )
        )
    return out


def _slo_key(name: str) -> str:
    """`ttft_p99` (the --slo spelling) -> `p99_ttft_ms` (the result key)."""
    metric, _, stat = name.partition("_")
    return f"{stat}_{metric}_ms"


def sweep_charts(items: Sequence[Item]) -> list[str]:
    sweeps = [
        (i, name, doc["smg_sweep"]) for i, (name, doc) in enumerate(items) if "smg_sweep" in doc
    ]
    if not sweeps:
        return []
    slo: dict[str, float] = {}
    for _, _, sw in sweeps:
        slo.update(sw.get("slo") or {})
    keys = [_slo_key(k) for k in slo] or []
    first = [p["result"] for _, _, sw in sweeps for p in sw.get("points") or []]
    if not keys:
        for metric in ("ttft", "itl", "e2el"):
            found = sorted(
                {
                    k
                    for r in first
                    for k in r
                    if _STAT_KEY.match(k) and k.endswith(f"_{metric}_ms") and k.startswith("p")
                }
            )
            keys.append(found[-1] if found else f"median_{metric}_ms")
    out = []
    for key in keys:
        pts_all = [
            (p["result"].get("request_throughput"), p["result"].get(key))
            for _, _, sw in sweeps
            for p in sw.get("points") or []
        ]
        pts_all = [
            (x, y) for x, y in pts_all if isinstance(x, int | float) and isinstance(y, int | float)
        ]
        if not pts_all:
            continue
        bound = next((v for k, v in slo.items() if _slo_key(k) == key), None)
        ytop = max([y for _, y in pts_all] + ([bound] if bound is not None else []))
        ch = svg.Chart(
            f"{key} against throughput",
            "request throughput (req/s)",
            key,
            0,
            max(x for x, _ in pts_all),
            0,
            ytop or 1.0,
        )
        for i, name, sw in sweeps:
            pts, marks = [], []
            for p in sw.get("points") or []:
                r = p["result"]
                x, y = r.get("request_throughput"), r.get(key)
                if not isinstance(x, int | float) or not isinstance(y, int | float):
                    continue
                pts.append((x, y))
                tip = f"{name}: {sw.get('variable')} {p.get('value')}: {x:.4g} req/s, {y:.4g} ms"
                marks.append((x, y, tip, p.get("meets_slo") is False))
            ch.line(svg.Series(name, sorted(pts), svg.color(i)))
            for x, y, tip, missed in marks:  # markers over the line
                if missed:
                    ch.marker(x, y, svg.FAIL, tip + " (misses the SLO)", cross=True)
                else:
                    ch.marker(x, y, svg.color(i), tip)
        if bound is not None:
            ch.hline(bound, svg.FAIL, f"SLO bound {key} <= {bound:g} ms")
            ch.legend.append((f"SLO {key} <= {bound:g}", svg.FAIL))
        out.append(ch.render())
    load = load_chart(sweeps)
    return out + ([load] if load else [])


def load_chart(sweeps: Sequence[tuple[int, str, dict[str, Any]]]) -> str | None:
    """Achieved throughput (solid) and goodput (dashed, with --goodput) against the swept
    value (offered rate or concurrency)."""
    series = []
    for i, name, sw in sweeps:
        pts = sorted(
            (float(p["value"]), p["result"])
            for p in sw.get("points") or []
            if isinstance(p.get("value"), int | float) and math.isfinite(p["value"])
        )
        for key, label, dashed in (
            ("request_throughput", "req/s", False),
            ("request_goodput", "goodput", True),
        ):
            xy = [(x, r[key]) for x, r in pts if isinstance(r.get(key), int | float)]
            if xy:
                series.append(svg.Series(f"{name} {label}", xy, svg.color(i), dashed, markers=True))
    if not series:
        return None
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    variable = str(sweeps[0][2].get("variable") or "value")
    ch = svg.Chart(
        f"Throughput against {variable}", variable, "req/s", 0, max(xs), 0, max(ys) or 1.0
    )
    for s in series:
        ch.line(s)
    return ch.render()


def sweep_tables(items: Sequence[Item]) -> list[str]:
    out = []
    for name, doc in items:
        sw = doc.get("smg_sweep")
        if not sw:
            continue
        head = [
            "value",
            "req/s",
            "goodput",
            "out tok/s",
            "p99 TTFT ms",
            "p99 E2EL ms",
            "meets SLO",
            "valid",
        ]
        rows = []
        for p in sw.get("points") or []:
            r = p["result"]
            meets = {True: "yes", False: "no", None: "-"}[p.get("meets_slo")]
            rows.append(
                [
                    _cell(p.get("value")),
                    _cell(r.get("request_throughput")),
                    _cell(r.get("request_goodput")),
                    _cell(r.get("output_throughput")),
                    _cell(r.get("p99_ttft_ms")),
                    _cell(r.get("p99_e2el_ms")),
                    meets,
                    "yes" if r.get("smg_valid") else "NO",
                ]
            )
        search = sw.get("search")
        note = ""
        if search:
            note = f" search over [{search.get('low')}, {search.get('high')}] to {search.get('precision')}: best {search.get('result')}"
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in (sw.get("slo") or {}).items())
        out.append(
            f"<h3>{escape(name)}: sweep over {escape(str(sw.get('variable')))}{escape(note)}</h3>"
            + (f"<p>SLO: {escape(slo)}</p>" if slo else "")
            + _table(head, rows)
        )
    return out


# -- HTML ----------------------------------------------------------------------------

_SUMMARY = (
    ("Valid run", "smg_valid"),
    ("Successful requests", "completed"),
    ("Failed requests", "failed"),
    ("Benchmark duration (s)", "duration"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Request goodput (req/s)", "request_goodput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Peak output token throughput (tok/s)", "max_output_tokens_per_s"),
    ("Peak concurrent requests", "max_concurrent_requests"),
    ("Total token throughput (tok/s)", "total_token_throughput"),
)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else str(v)
    return str(v)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def summary_table(runs: Sequence[Item]) -> str:
    """vLLM's headline numbers, one column per run."""
    stat_keys: list[str] = []
    for metric, _ in METRICS:
        for _, r in runs:
            for k in r:
                m = _STAT_KEY.match(k)
                if m and m.group(2) == metric and m.group(1) != "std" and k not in stat_keys:
                    stat_keys.append(k)
    rows = [
        [label] + [_cell(r.get(key)) for _, r in runs]
        for label, key in _SUMMARY
        if any(key in r for _, r in runs)
    ]
    for k in stat_keys:
        stat, metric = _STAT_KEY.match(k).groups()  # type: ignore[union-attr]
        rows.append(
            [f"{stat.capitalize()} {metric.upper()} (ms)"] + [_cell(r.get(k)) for _, r in runs]
        )
    return _table(["metric", *[name for name, _ in runs]], rows)


def overhead_tables(items: Sequence[Item]) -> list[str]:
    out = []
    for name, doc in items:
        o = doc.get("smg_overhead")
        if not o:
            continue
        rows = []
        for metric in ("e2el", "ttft"):
            s = o.get(f"added_{metric}_ms") or {}
            rows.append(
                [
                    f"added {metric.upper()} (ms)",
                    _cell(s.get("mean")),
                    _cell(s.get("median")),
                    _cell(s.get("p99")),
                ]
            )
        out.append(
            f"<h3>{escape(name)}: gateway overhead ({o.get('pairs')} pairs)</h3>"
            + _table(["", "mean", "median", "p99"], rows)
        )
    return out


CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #e4e4e4}
.title{font-size:13px;font-weight:600}.tick{font-size:10px;fill:#555}.label{font-size:11px;fill:#333}
.legend{font-size:10px}.grid{stroke:#eee}.axis{stroke:#444;fill:none}
.note{color:#666}
"""


def render_html(items: Sequence[Item]) -> str:
    """The report of these results and sweep documents (several are overlaid)."""
    runs = _runs(items)
    sweep_points = [
        (f"{name} {p.get('value')}", p["result"])
        for name, doc in items
        if "smg_sweep" in doc
        for p in doc["smg_sweep"].get("points") or []
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>smg bench report: {escape(', '.join(n for n, _ in items))}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<h1>smg bench report</h1><p class="note">{escape(", ".join(n for n, _ in items))} '
        f"(written {datetime.now().strftime('%Y-%m-%d %H:%M:%S')})</p>",
    ]
    table_runs = runs + sweep_points
    if table_runs:
        parts.append("<h2>Summary</h2>" + summary_table(table_runs))
    sections = [
        ("Sweeps: latency against throughput", [*sweep_tables(items), _grid(sweep_charts(items))]),
        ("Gateway overhead", overhead_tables(items)),
        # A sweep's points overlay here too: how the distributions shift with load.
        ("Distributions", [_grid(distribution_charts(runs + sweep_points))]),
        ("Over time", [_grid(time_charts(runs))]),
        ("Per-worker spread", [_grid(worker_charts(items))]),
        ("Per-request timeline", [_grid(timeline_charts(runs))]),
    ]
    for title, blocks in sections:
        blocks = [b for b in blocks if b]
        if blocks:
            parts.append(f"<h2>{escape(title)}</h2>" + "".join(blocks))
    if runs and not any(requests_of(r) or r.get("ttfts") or r.get("latencies") for _, r in runs):
        parts.append(
            '<p class="note">No per-request data in these results: run with --save-detailed or --plot for the charts.</p>'
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _grid(charts: list[str]) -> str:
    return f'<div class="charts">{"".join(charts)}</div>' if charts else ""


# -- I/O -----------------------------------------------------------------------------


def write_report(path: str, items: Sequence[Item]) -> str:
    """Writes the report; returns its path."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(items))
    return path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def page_height(html: str, width: int = 1400) -> int:
    """About how tall the page is at `width` px, so one screenshot holds it all: each chart
    block wraps its charts (640 px + gaps) into rows; a table row is ~24 px."""
    per_row = max(1, (width - 48) // 654)
    total = 200 + 26 * html.count("<tr>") + 60 * (html.count("<h2>") + html.count("<h3>"))
    for block in html.split('<div class="charts">')[1:]:
        block = block.split("</div>", 1)[0]
        heights = [int(h) for h in re.findall(r'<svg [^>]*?height="(\d+)"', block)]
        total += sum(max(heights[i : i + per_row]) + 14 for i in range(0, len(heights), per_row))
    return min(30000, total)


def screenshot(html_path: str, png_path: str, width: int = 1400, timeout: float = 60.0) -> None:
    """PNG of the whole report through headless Chromium (Debian's `chromium`)."""
    with open(html_path, encoding="utf-8") as f:
        size = (width, page_height(f.read(), width))
    exe = find_chromium()
    if exe is None:
        raise OSError("--png needs chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="smg-chromium-") as profile:
        cmd = [
            exe,
            *headless_flags(profile),
            f"--screenshot={os.path.abspath(png_path)}",
            f"--window-size={size[0]},{size[1]}",
            "file://" + os.path.abspath(html_path),
        ]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not os.path.exists(png_path):
        raise OSError(f"chromium screenshot failed: {proc.stderr.decode(errors='replace')[-500:]}")


def headless_flags(profile: str) -> list[str]:
    # No sandbox (containers, root), no GPU, and nothing that reaches the network.
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]


def default_path(args: argparse.Namespace, doc: dict[str, Any]) -> str:
    """Next to the saved result (same name, .html), else smg-bench-<date>.html in
    --result-dir or the current directory."""
    from smg.bench.serve import result_path

    saved = result_path(args, doc) if "smg_sweep" not in doc else None
    if doc.get("smg_mode") == "overhead" and (args.save_result or args.append_result):
        # overhead.py names its file this way.
        model = str(doc.get("model_id", "")).split("/")[-1]
        saved = os.path.join(
            args.result_dir or "",
            args.result_filename or f"{args.label or 'overhead'}-{model}.json",
        )
    if saved is None and args.result_filename:
        saved = os.path.join(args.result_dir or "", args.result_filename)
    if saved is not None:
        return os.path.splitext(saved)[0] + ".html"
    date = doc.get("date") or datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(args.result_dir or "", f"smg-bench-{date}.html")


def report_if_asked(args: argparse.Namespace, docs: list[dict[str, Any]]) -> None:
    """With --plot: write the report of this run's documents."""
    if getattr(args, "plot", None) is None or not docs:
        return
    path = args.plot or default_path(args, docs[-1])
    items = [(_doc_name(args, doc, i, len(docs)), doc) for i, doc in enumerate(docs)]
    print(f"report: {write_report(path, items)}")


def _doc_name(args: argparse.Namespace, doc: dict[str, Any], i: int, n: int) -> str:
    name = str(doc.get("label") or args.label or "run")
    return name if n == 1 else f"{name} {i + 1}"


def _name(path: str, taken: set[str]) -> str:
    base = os.path.splitext(os.path.basename(path))[0]
    name, k = base, 2
    while name in taken:
        name, k = f"{base} ({k})", k + 1
    taken.add(name)
    return name


def main(argv: list[str]) -> int:
    """`smg bench plot RESULT.json... [-o REPORT.html] [--png]`."""
    from smg.bench.results import load

    p = argparse.ArgumentParser(
        prog="smg bench plot",
        description="HTML report of smg bench (or vllm bench serve) result files; several are overlaid.",
    )
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument(
        "-o", "--output", default="smg-bench-report.html", help="report path (default: %(default)s)"
    )
    p.add_argument("--png", action="store_true", help="also write a PNG beside it (needs chromium)")
    args = p.parse_args(argv)
    items: list[Item] = []
    taken: set[str] = set()
    for path in args.results:
        try:
            items.append((_name(path, taken), load(path)))
        except (OSError, ValueError) as exc:
            print(f"smg bench plot: {path}: {exc}", file=sys.stderr)
            return 2
    out = write_report(args.output, items)
    print(f"report: {out}")
    if args.png:
        png = os.path.splitext(out)[0] + ".png"
        try:
            screenshot(out, png)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"smg bench plot: {exc}", file=sys.stderr)
            return 1
        print(f"png: {png}")
    return 0
