"""`run.py all`'s pure parts: the scenario plan, the scaling series' core plan, the rows read
from each tool's JSON, and the Markdown and HTML views (exact values, no process)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import alllib
import pytest
from benchlib import core_layout, split_load


def test_scaling_plan_on_16_cores_keeps_gateway_stub_and_client_apart() -> None:
    plan = alllib.scaling_plan(range(16))
    assert plan.skipped is None
    assert [(s.processes, s.gateway, s.stub, s.client) for s in plan.steps] == [
        (1, (0,), (8, 9, 10, 11), (12, 13, 14, 15)),
        (2, (0, 1), (8, 9, 10, 11), (12, 13, 14, 15)),
        (4, (0, 1, 2, 3), (8, 9, 10, 11), (12, 13, 14, 15)),
        (8, tuple(range(8)), (8, 9, 10, 11), (12, 13, 14, 15)),
    ]
    assert plan.steps[3].run_args() == [
        "--gateway-cores",
        "0-7",
        "--stub-cores",
        "8-11",
        "--client-cores",
        "12-15",
        "--smg-processes",
        "8",
    ]


def test_scaling_plan_uses_the_cores_it_is_given_and_splits_the_rest() -> None:
    avail = [*range(2, 20), 40, 41]  # 20 cores, not numbered from 0
    plan = alllib.scaling_plan(avail)
    last = plan.steps[-1]
    assert last.gateway == tuple(range(2, 10))
    assert last.stub == (10, 11, 12, 13, 14, 15) and last.client == (16, 17, 18, 19, 40, 41)
    for s in plan.steps:
        assert not set(s.gateway) & set(s.stub) and not set(s.stub) & set(s.client)


@pytest.mark.parametrize("n", [1, 2, 8, 15])
def test_scaling_plan_is_skipped_with_a_note_under_16_cores(n: int) -> None:
    plan = alllib.scaling_plan(range(n))
    assert plan.steps == ()
    assert plan.skipped == f"needs 16 or more cores; this machine lets us use {n}"


def test_split_load_gives_stub_and_client_their_own_cores() -> None:
    base = core_layout(range(16), gateway_cores=[0, 1], load_cores=range(8, 16))
    lay = split_load(base, [8, 9, 10, 11], [12, 13, 14, 15])
    assert (lay.stub, lay.client, lay.stub_threads, lay.client_threads) == (
        (8, 9, 10, 11),
        (12, 13, 14, 15),
        4,
        4,
    )
    assert base.stub == base.client == tuple(range(8, 16))  # unsplit: both share `load`
    with pytest.raises(ValueError, match="overlap"):
        split_load(base, [8, 9], [9, 10])
    with pytest.raises(ValueError, match="gateway"):
        split_load(base, [1], [12])


def test_plan_scenarios_quick_and_full() -> None:
    quick = alllib.plan_scenarios(
        alllib.SCENARIOS, quick=True, rounds=3, duration=5, rust=True, rust_venv="/r"
    )
    assert [(s.name, s.tool) for s in quick] == [
        ("http", "run.py"),
        ("tls", "run.py"),
        ("cache", "cache_bench.py"),
        ("grpc", "grpc_bench.py"),
    ]
    http, tls, cache, grpc = quick
    assert http.argv[:4] == ("--gateways", "direct,smg,rust", "--payloads", "chat,stream")
    assert "--tls" in tls.argv and "--tls" not in http.argv
    assert http.argv[http.argv.index("--rounds") + 1] == "1"
    assert "--smoke" in cache.argv and "smg-p4,rust" in cache.argv
    assert grpc.argv[grpc.argv.index("--rust-smg") + 1] == "/r/bin/smg"
    full_grpc = alllib.plan_scenarios(
        ["grpc"], quick=False, rounds=3, duration=5, rust=True, rust_venv="/r"
    )[0]
    assert full_grpc.argv[-4:] == ("--input-lens", "1024", "1024", "1024")
    full = alllib.plan_scenarios(
        ["http", "cache"], quick=False, rounds=3, duration=5, rust=False, rust_venv="/r"
    )
    assert full[0].argv[:4] == ("--gateways", "direct,smg", "--payloads", "chat,completion,stream")
    assert full[0].argv[full[0].argv.index("--duration") + 1] == "5"
    assert full[1].argv[:2] == ("--systems", "smg-p4") and "1,2,3" in full[1].argv
    with pytest.raises(ValueError, match="unknown scenario"):
        alllib.plan_scenarios(["h2"], quick=True, rounds=1, duration=1, rust=True, rust_venv="")


def _m(gw: str, payload: str, r: int, rps: float, void: list[str] | None = None) -> dict:
    # 1,000 requests per run; the gateway's CPU seconds grow with the round.
    cpu = None if gw == "direct" else 0.05 * (r + 1) * (4 if gw == "rust" else 1)
    return {
        "gateway": gw,
        "payload": payload,
        "round": r,
        "rps": rps,
        "void": void or [],
        "requests": 1000,
        "gateway_cpu_s": cpu,
    }


RUN_JSON: dict[str, Any] = {
    "settings": {"gateways": ["direct", "smg", "rust"], "payloads": ["chat"]},
    "max_runs": [
        _m("direct", "chat", 0, 40000.0),
        _m("smg", "chat", 0, 20000.0),
        _m("rust", "chat", 0, 5000.0),
        _m("smg", "chat", 1, 18000.0),
        _m("rust", "chat", 1, 6000.0),
        _m("direct", "chat", 1, 36000.0),
        _m("rust", "chat", 2, 7000.0),
        _m("direct", "chat", 2, 30000.0),
        _m("smg", "chat", 2, 1.0, ["3 non-2xx"]),
    ],
}


def test_rows_from_run_pairs_rounds_and_drops_void_runs() -> None:
    (row,) = alllib.rows_from_run("http", RUN_JSON)
    assert row.values == {"direct": 36000.0, "smg": 19000.0, "rust": 6000.0}
    assert row.ratios["smg/rust"] == {"median": 3.5, "low": 3.0, "high": 4.0, "n": 2}
    assert row.ratios["smg/direct"] == {"median": 0.5, "low": 0.5, "high": 0.5, "n": 2}
    assert row.note == "void: smg r3: 3 non-2xx"
    # CPU per 1k requests: medians of the clean runs (smg's void round 3 left out).
    assert row.extra["cpu_s_per_1k"] == {"smg": pytest.approx(0.075), "rust": pytest.approx(0.4)}


def test_rows_from_cache_and_grpc() -> None:
    cache = {
        "systems": [
            {
                "system": "smg-p4",
                "rps": 750.0,
                "rps_per_seed": [700, 800],
                "hit_rate": 0.873,
                "errors": 0,
            },
            {
                "system": "rust",
                "rps": 500.0,
                "rps_per_seed": [350, 400],
                "hit_rate": 0.71,
                "errors": 0,
            },
        ],
        "skipped": [],
    }
    (row,) = alllib.rows_from_cache(cache)
    assert row.values == {"smg": 750.0, "rust": 500.0}
    assert row.ratios["smg/rust"] == {"median": 2.0, "low": 2.0, "high": 2.0, "n": 2}
    assert row.note == "hit rate smg 87.3%, rust 71.0%"
    grpc = {
        "rows": [
            {"gateway": "rust", "input_len": 1024, "saturation": {"output_throughput": 50000.0}},
            {
                "gateway": "smg-p2",
                "input_len": 1024,
                "saturation": {"output_throughput": 35000.0, "failed": 0},
            },
            {"gateway": "rust", "input_len": 8192, "error": "not ready"},
            {"gateway": "smg-p2", "input_len": 8192, "saturation": {"output_throughput": 9.0}},
        ]
    }
    a, b = alllib.rows_from_grpc(grpc)
    assert a.case == "prompt 1024 tokens" and a.values == {"smg": 35000.0, "rust": 50000.0}
    assert a.ratios["smg/rust"] == {"median": 0.7, "low": 0.7, "high": 0.7, "n": 1}
    assert b.ratios["smg/rust"] is None and b.note == "rust r1 error: not ready"
    three_rounds = {
        "rows": [
            {"gateway": g, "input_len": 1024, "saturation": {"output_throughput": v}}
            for g, v in (
                ("rust", 100.0),
                ("smg-p2", 80.0),
                ("rust", 200.0),
                ("smg-p2", 100.0),
                ("rust", 100.0),
                ("smg-p2", 90.0),
            )
        ]
    }
    (c,) = alllib.rows_from_grpc(three_rounds)
    assert c.values == {"smg": 90.0, "rust": 100.0}
    assert c.ratios["smg/rust"] == {"median": 0.8, "low": 0.5, "high": 0.9, "n": 3}


def _doc() -> dict[str, Any]:
    from dataclasses import asdict

    rows = alllib.rows_from_run("http", RUN_JSON)
    return {
        "started_at": "2026-11-28 14:00 UTC",
        "quick": False,
        "host": {"cpus": 2, "loadavg_at_start": [1.5, 0, 0], "loadavg_at_end": [2.25, 0, 0]},
        "scenarios": [{"name": "http", "title": "HTTP, plain", "status": "ok", "note": ""}],
        "scaling": {"status": "skipped", "note": "needs 16 or more cores; ..."},
        "rows": [asdict(r) for r in rows],
        "notes": ["Rust SMG left out: x"],
    }


def test_markdown_table_lines() -> None:
    md = alllib.markdown_table(_doc())
    lines = md.splitlines()
    assert (
        lines[0]
        == "## native_bench all: 2026-11-28 14:00 UTC, 2 CPUs, loadavg 1.50 at start / 2.25 at end"
    )
    assert lines[4] == (
        "| http | chat | req/s | 36,000 | 19,000 | 6,000 | 3.50x (3.00-4.00, n=2) "
        "| 0.50x (0.50-0.50, n=2) | 0.075 / 0.4 |"
    )
    assert "- http (HTTP, plain): ok" in lines
    assert "- scaling series: skipped: needs 16 or more cores; ..." in lines
    assert "- http chat: void: smg r3: 3 non-2xx" in lines
    assert lines[-1] == "- Rust SMG left out: x"


def test_ratio_svg_geometry() -> None:
    svg = alllib.ratio_svg([("a", {"median": 2.0, "low": 1.0, "high": 4.0, "n": 3}), ("b", None)])
    # Scale: 0..4.2 over 420 px from x=300; one bar (b has no ratio), a dashed line at 1.0.
    assert svg.count("<rect") == 1
    assert 'width="200.0"' in svg  # 2.0 / 4.2 * 420
    assert 'x1="400.0" x2="700.0"' in svg  # the range 1.0-4.0
    assert 'x1="400.0" x2="400.0" y1="0"' in svg  # the 1.0 reference
    root = ET.fromstring(svg)  # well-formed SVG
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_html_report_is_self_contained() -> None:
    doc = _doc()
    page = alllib.html_report(doc, alllib.markdown_table(doc))
    assert page.count("<svg") == 2  # smg/rust and smg/direct
    assert not re.search(r"(src|href)=['\"]?https?:", page)
    assert "<script" not in page and "http | chat" in page
    assert "<td>3.50x (3.00-4.00, n=2)</td>" in page and page.count("<tr>") == 2
