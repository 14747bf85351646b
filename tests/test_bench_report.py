"""The HTML report: pure chart code with exact values, the report from fixture dicts, and
`smg bench --plot` / `smg bench plot` end to end against the stub, looked at in headless
Chromium."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from smg.bench import report, reqdata, svg
from smg.bench.calibrate import start_stub

# -- svg.py: ticks, scales, paths ----------------------------------------------------


def test_nice_ticks() -> None:
    assert svg.ticks(0, 7.3) == [0, 2, 4, 6, 8]
    assert svg.ticks(3, 97) == [0, 20, 40, 60, 80, 100]
    assert svg.ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert svg.ticks(0.5, 0.5) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # a flat range gets width
    assert svg.ticks(0, 12.5) == [0, 2.5, 5, 7.5, 10, 12.5]
    assert svg.nice_step(940, 5) == 200
    assert [svg.fmt(v) for v in (2.0, 0.25, 1234567.0, 0.123456)] == [
        "2",
        "0.25",
        "1234567",
        "0.1235",
    ]


def test_line_path_has_exact_coordinates() -> None:
    ch = svg.Chart("t", "x", "y", 0, 10, 0, 10)  # 640x300; plot area x 64..624, y 256..44
    assert ch.xt == [0, 2, 4, 6, 8, 10] and ch.yt == ch.xt
    ch.line(svg.Series("s", [(0, 0), (5, 10), (10, 5)], "#123456"))
    out = ch.render()
    assert '<path d="M64,256L344,44L624,150" fill="none" stroke="#123456"' in out
    assert out.count('class="tick"') == 12  # six ticks per axis
    assert '<text x="60" y="44" text-anchor="end" dy="0.32em" class="tick">10</text>' in out
    assert "<title>s</title>" in out and '<rect x="64" y="26"' in out  # legend row


def test_histogram_steps_and_bars() -> None:
    edges, counts = reqdata.histogram([0, 0.5, 1, 2.9, 3, 10, -1], 0, 3, 3)
    assert edges == [0, 1, 2, 3] and counts == [3, 1, 3]  # outliers land in the end bins
    ch = svg.Chart("h", "x", "y", 0, 3, 0, 3)  # x ticks 0..3 by 0.5, y 0..3 by 0.5
    ch.steps("a", edges, counts, "#000")
    body = ch.body[0]
    assert 'd="M64,256V44H250.7V185.3H437.3V44H624V256Z"' in body
    out = svg.bars("b", ["w1", "w2"], [("n", "#111", [2.0, 1.0])], "requests")
    # Slot 280 px per category, a bar 80 % of it; 2 -> top of the 0..2 axis.
    assert '<rect x="92" y="44" width="224" height="212" fill="#111">' in out
    assert '<rect x="372" y="150" width="224" height="106" fill="#111">' in out


def test_cdf_rates_and_concurrency() -> None:
    assert reqdata.cdf_points([3, 1, 2]) == [(1, 100 / 3), (2, 200 / 3), (3, 100.0)]
    big = reqdata.cdf_points(list(range(10_000)), max_points=5)
    assert big == [(0, 0.01), (2500, 25.01), (5000, 50.01), (7499, 75.0), (9999, 100.0)]
    assert reqdata.rate_over_time([0.1, 0.2, 1.5], 2.0, bins=2) == [(0.5, 2.0), (1.5, 1.0)]
    pts = reqdata.concurrency_over_time([0, 0.5, 2.0], [1.0, 1.5, 3.0], 3.0, bins=3)
    assert pts == [(0.5, 2.0), (1.5, 1.0), (2.5, 1.0)]
    # Back to back (one ends as the next starts) is one in flight, not two.
    assert reqdata.concurrency_over_time([0, 1], [1, 2], 2.0, bins=1) == [(1.0, 1.0)]
    assert reqdata.quantile([1, 2, 3, 4], 0.5) == 2.5


def test_timeline_sampling_keeps_failures() -> None:
    req = reqdata.Requests(
        [float(i) for i in range(10)],
        [i + 0.5 for i in range(10)],
        [i not in (3, 7) for i in range(10)],
        [None] * 10,
        [None] * 10,
    )
    assert reqdata.sample_rows(req, cap=4) == [0, 3, 7, 9]
    assert reqdata.sample_rows(req, cap=20) == list(range(10))


def test_requests_from_vllm_detailed_lists() -> None:
    r = {"start_times": [0.0, 1.0], "latencies": [0.5, 0.0], "errors": ["", "boom"]}
    q = reqdata.requests_of(r)
    assert q is not None
    assert q.end == [0.5, 1.0] and q.ok == [True, False] and q.error == [None, "boom"]
    # vllm's own file: raw perf_counter starts, no latencies (TTFT + gaps stand in).
    v = {
        "start_times": [100.5, 100.0],
        "ttfts": [0.25, 0.0],
        "itls": [[0.125, 0.125], []],
        "output_lens": [3, 0],
        "errors": ["", "Bad Request"],
    }
    q = reqdata.requests_of(v)
    assert q is not None and q.start == [0.5, 0.0] and q.end == [1.0, 0.0]
    assert reqdata.distributions(v) == {
        "ttft": [250.0],
        "itl": [125.0, 125.0],
        "tpot": [125.0],
        "e2el": [500.0],
    }
    assert report._slo_key("ttft_p99") == "p99_ttft_ms"


# -- the report from fixture dicts -----------------------------------------------------


def fake_result(n: int, ttft: float, fail_every: int = 0, label: str = "a") -> dict[str, Any]:
    ok = [not (fail_every and i % fail_every == fail_every - 1) for i in range(n)]
    start = [i * 0.01 for i in range(n)]
    lat = [ttft + 0.04 if good else 0.0 for good in ok]
    return {
        "label": label,
        "completed": ok.count(True),
        "failed": ok.count(False),
        "duration": start[-1] + ttft + 0.04,
        "request_throughput": 100.0,
        "output_throughput": 500.0,
        "median_ttft_ms": ttft * 1000,
        "p99_ttft_ms": ttft * 1000 + 1,
        "median_e2el_ms": (ttft + 0.04) * 1000,
        "smg_valid": True,
        "ttfts": [ttft if good else 0.0 for good in ok],
        "itls": [[0.01] * 4 if good else [] for good in ok],
        "output_lens": [5 if good else 0 for good in ok],
        "latencies": lat,
        "errors": ["" if good else "http_500" for good in ok],
        "smg_requests": {
            "start": start,
            "end": [s + (la or 0.001) for s, la in zip(start, lat)],
            "ok": ok,
            "error": [None if good else "http_500" for good in ok],
            "worker": [f"w{i % 2}" for i in range(n)],
        },
    }


def svgs(html: str) -> list[str]:
    return re.findall(r"<svg .*?</svg>", html, flags=re.S)


def test_report_overlays_results() -> None:
    a, b = fake_result(50, 0.02, fail_every=10), fake_result(50, 0.05, label="b")
    html = report.render_html([("base", a), ("new", b)])
    charts = svgs(html)
    # TTFT/TPOT/ITL/E2E (histogram + CDF each), 3 over time, 2 worker spreads, 2 timelines.
    assert len(charts) == 8 + 3 + 2 + 2
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    table = html[html.index("<table>") : html.index("</table>")]
    assert "<th>base</th><th>new</th>" in table
    assert "<td>Successful requests</td><td>45</td><td>50</td>" in table
    assert "<td>Median TTFT (ms)</td><td>20.00</td><td>50.00</td>" in table
    cdf = next(c for c in charts if 'aria-label="TTFT CDF"' in c)
    assert svg.color(0) in cdf and svg.color(1) in cdf and ">new</text>" in cdf
    timeline = next(c for c in charts if "base: per-request timeline" in c)
    assert timeline.count(f'fill="{svg.FAIL}"><title>request') == 5
    assert "failed (http_500)" in timeline
    workers = next(c for c in charts if "base: requests per worker" in c)
    assert "all w0: 25</title>" in workers and "failed w1: 5</title>" in workers


def test_big_run_timeline_is_capped() -> None:
    r = fake_result(10_000, 0.01, fail_every=1000)
    html = report.render_html([("big", r)])
    timeline = next(c for c in svgs(html) if "per-request timeline" in c)
    assert timeline.count("<title>request ") == reqdata.GANTT_CAP
    assert timeline.count(f'fill="{svg.FAIL}"><title>request') == 10
    assert "400 of 10000 shown: 10 failed, the rest sampled" in timeline
    assert len(html) < 3_000_000


def test_sweep_document_and_overhead_result() -> None:
    points = []
    for rate, tput, p99 in ((1, 1.0, 100.0), (2, 1.9, 300.0), (4, 3.0, 900.0)):
        res = {
            "request_throughput": tput,
            "p99_ttft_ms": p99,
            "p99_e2el_ms": p99 * 2,
            "smg_valid": True,
            "ttfts": [p99 / 2000, p99 / 1000],  # detailed lists: the points overlay
        }
        points.append({"value": rate, "result": res, "meets_slo": p99 <= 500})
    doc = {
        "smg_sweep": {
            "variable": "request_rate",
            "slo": {"ttft_p99": 500.0},
            "search": None,
            "points": points,
        }
    }
    over = {
        "smg_mode": "overhead",
        "smg_overhead": {
            "pairs": 10,
            "added_e2el_ms": {"mean": 1.5, "median": 1.2, "p99": 3.0},
            "added_ttft_ms": {"mean": 1.0, "median": 0.9, "p99": 2.0},
            "worker_requests": {"http://127.0.0.1:1": 6, "http://127.0.0.1:2": 4},
        },
        "direct": fake_result(10, 0.01),
        "gateway": fake_result(10, 0.012),
    }
    html = report.render_html([("sw", doc), ("oh", over)])
    curve = next(c for c in svgs(html) if "p99_ttft_ms against throughput" in c)
    # x 0..3 -> 64..624; y 0..1000 (ticks by 200) -> 256..44; the bound at 500 -> y 150.
    assert '<path d="M250.7,234.8L418.7,192.4L624,65.2" fill="none"' in curve
    assert '<line x1="64" y1="150" x2="624" y2="150" stroke="#d62728"' in curve
    assert curve.count("<circle") == 2 and curve.count("(misses the SLO)") == 1
    load = next(c for c in svgs(html) if "Throughput against request_rate" in c)
    # x 0..4 -> 64..624 (140 px a unit); y 0..3 (ticks by 0.5) -> 256..44.
    assert '<path d="M204,185.3L344,121.7L624,44" fill="none"' in load
    cdf = next(c for c in svgs(html) if 'aria-label="TTFT CDF"' in c)
    assert all(f">sw {v}</text>" in cdf for v in (1, 2, 4)) and ">oh direct</text>" in cdf
    assert "<td>4</td><td>3.00</td>" in html and "<td>no</td>" in html  # sweep table
    assert "gateway overhead (10 pairs)" in html and "<td>added E2EL (ms)</td><td>1.50</td>" in html
    assert "oh: requests per worker" in html
    assert "oh direct: per-request timeline" in html and "oh gateway: per-request timeline" in html


def test_report_without_detail_says_so() -> None:
    html = report.render_html([("plain", {"completed": 3, "median_ttft_ms": 1.0})])
    assert svgs(html) == [] and "run with --save-detailed or --plot" in html


# -- end to end --------------------------------------------------------------------------


def smg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smg", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct pixel values in a sample (RGB/RGBA PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, ctype = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and ctype in (2, 6)
    raw, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            raw += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(raw)
    bpp = 3 if ctype == 2 else 4
    stride = 1 + width * bpp
    # Row filters change raw bytes, but a blank page still has few distinct values.
    sample = {
        pixels[i : i + bpp]
        for r in range(0, height, 7)
        for i in range(r * stride + 1, (r + 1) * stride, bpp * 5)
    }
    return width, height, len(sample)


def chromium_shot(exe: str, url: str, png: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            exe,
            *report.headless_flags(str(profile)),
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={png}",
            "--window-size=1400,3000",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def console_lines(stderr: str) -> list[str]:
    """The page's console output and uncaught errors, as Chromium logs them to stderr."""
    return [ln for ln in stderr.splitlines() if re.search(r":CONSOLE[:(]|Uncaught", ln)]


def test_plot_end_to_end_with_chromium(tmp_path: Path) -> None:
    proc, port = start_stub(["--error-rate", "0.2", "--seed", "1", "--itl-ms", "1"])
    try:
        base = ["--base-url", f"http://127.0.0.1:{port}", "--model", "stub-model"]
        common = ["--num-prompts", "40", "--random-input-len", "16", "--random-output-len", "6"]
        common += ["--max-error-rate", "1", "--result-dir", str(tmp_path), "--save-result"]
        first = smg(
            *base, *common, "--max-concurrency", "4", "--result-filename", "a.json", "--plot"
        )
        second = smg(
            *base,
            *common,
            "--request-rate",
            "200",
            "--result-filename",
            "b.json",
            "--save-detailed",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert f"report: {tmp_path / 'a.html'}" in first.stdout
    a = json.loads((tmp_path / "a.json").read_text())
    req = a["smg_requests"]
    assert all(len(req[k]) == 40 for k in ("start", "end", "ok", "error", "worker"))
    assert req["ok"].count(False) == a["failed"] > 0  # the stub failed some, on purpose
    assert all(e == "http_500" for e, ok in zip(req["error"], req["ok"]) if not ok)
    assert all(0 <= s <= e for s, e in zip(req["start"], req["end"]))
    b = json.loads((tmp_path / "b.json").read_text())
    assert len(b["smg_requests"]["ok"]) == 40 and not (tmp_path / "b.html").exists()
    single = (tmp_path / "a.html").read_text()
    assert len(svgs(single)) >= 10 and "run: per-request timeline" in single

    out = tmp_path / "both.html"
    both = smg("plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(out))
    assert both.returncode == 0, both.stderr
    html = out.read_text()
    assert "<th>a</th><th>b</th>" in html and "b: per-request timeline" in html
    assert smg("plot", str(tmp_path / "missing.json")).returncode == 2

    exe = report.find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    url = "file://" + str(out)
    # The console check itself: a page that logs and throws is caught by it.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); nope();</script></body></html>")
    bad_run = chromium_shot(exe, "file://" + str(bad), tmp_path / "bad.png", profile)
    assert len(console_lines(bad_run.stderr)) == 2, bad_run.stderr[-2000:]
    assert png_size_and_colours(tmp_path / "bad.png")[2] < 5  # a blank page reads as blank
    run = chromium_shot(exe, url, shot, profile)
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_lines(run.stderr) == []
    w, h, colours = png_size_and_colours(shot)
    assert (w, h) == (1400, 3000) and colours > 20
    dom = subprocess.run(
        [exe, *report.headless_flags(str(profile)), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    ).stdout
    drawn = svgs(dom)
    assert len(drawn) == len(svgs(html)) >= 10
    assert all(re.search(r"<(path|rect|circle) ", c) for c in drawn)

    png = smg("plot", str(tmp_path / "a.json"), "-o", str(tmp_path / "p.html"), "--png")
    assert png.returncode == 0, png.stderr
    assert png_size_and_colours(tmp_path / "p.png")[2] > 20
    assert os.path.getsize(tmp_path / "p.png") > 10_000


def test_overhead_mode_plot_shows_worker_spread(tmp_path: Path) -> None:
    import mockutil

    out = tmp_path / "oh.html"
    with (
        mockutil.start_mock_workers(1, "--ttft-ms", "1") as direct,
        mockutil.start_mock_workers(1, "--ttft-ms", "1") as gw,
    ):
        run = smg(
            "--overhead",
            "--direct-url",
            direct.url,
            "--gateway-url",
            gw.url,
            "--worker-url",
            direct.url,
            "--worker-url",
            gw.url,
            "--backend",
            "openai-chat",
            "--num-prompts",
            "12",
            "--random-input-len",
            "16",
            "--random-output-len",
            "3",
            "--model",
            "mock-model",
            "--label",
            "oh",
            "--plot",
            str(out),
        )
    assert run.returncode == 0, run.stderr
    assert f"report: {out}" in run.stdout
    html = out.read_text()
    spread = next(c for c in svgs(html) if "oh: requests per worker" in c)
    assert f"oh {direct.url}: 12</title>" in spread and f"oh {gw.url}: 12</title>" in spread
    assert "oh: gateway overhead (12 pairs)" in html
    for side in ("direct", "gateway"):
        timeline = next(c for c in svgs(html) if f"oh {side}: per-request timeline" in c)
        assert timeline.count("<title>request ") == 12


def test_default_report_paths(tmp_path: Path) -> None:
    from smg.bench.args import build_parser

    doc = {"date": "20260101-120000", "model_id": "org/m"}
    plain = build_parser().parse_args(["--plot", "--result-dir", str(tmp_path)])
    assert plain.plot == ""
    assert report.default_path(plain, doc) == str(tmp_path / "smg-bench-20260101-120000.html")
    named = build_parser().parse_args(["--plot", "--save-result", "--result-filename", "x.json"])
    assert report.default_path(named, doc) == "x.html"
    auto = build_parser().parse_args(["--plot", "--save-result", "--label", "L"])
    assert report.default_path(auto, doc) == "L-infqps-m-20260101-120000.html"
    assert build_parser().parse_args([]).plot is None


def test_page_height_and_legend_fit() -> None:
    chart = '<svg width="640" height="{}"></svg>'
    block = '<div class="charts">' + "".join(chart.format(h) for h in (300, 280, 100)) + "</div>"
    # Two charts a row at 1400 px: rows of 300 and 100 (+14 gap each) under a 200 px head.
    assert report.page_height(block) == 200 + 314 + 114
    assert report.page_height("<h2>x</h2>" + block, width=700) == 200 + 60 + 314 + 294 + 114
    ch = svg.Chart("t", "x", "y", 0, 1, 0, 1)
    for k in range(4):
        ch.line(svg.Series(f"a-very-long-result-file-name-{k}", [(0, 0), (1, 1)], svg.color(k)))
    out = ch.render()
    # 560 px for 4 entries: names cut to 18 characters, the last still inside the chart.
    assert ">a-very-long-resul…</text>" in out and '<text x="486" y="34"' in out
