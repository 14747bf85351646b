"""`run.py all --quick` end to end: every scenario as the real tools run it (the C stub, wrk,
smg, the Rust SMG 1.13 when its venv is here, the mock workers, the gRPC mock engine), then
the three outputs read back and checked against each other."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RUST_VENV = HERE / ".venv-rust"

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install -y wrk)"
)
needs_cc = pytest.mark.skipif(
    (shutil.which("cc") or shutil.which("gcc")) is None, reason="needs a C compiler"
)


@needs_wrk
@needs_cc
def test_all_quick_writes_table_json_and_html(tmp_path: Path) -> None:
    rust = (RUST_VENV / "bin" / "smg").exists()
    argv = [sys.executable, str(HERE / "run.py"), "all", "--quick", "--out-dir", str(tmp_path)]
    if not rust:
        argv += ["--rust-venv", str(tmp_path / "no-rust-here")]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    md = (tmp_path / "summary.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert md == res.stdout.rstrip("\n") + "\n"  # the table also goes to stdout

    assert [s["name"] for s in doc["scenarios"]] == ["http", "tls", "cache", "grpc"]
    assert all(s["status"] == "ok" for s in doc["scenarios"]), doc["scenarios"]
    for s in doc["scenarios"]:
        assert (tmp_path / s["result_file"]).is_file()  # each tool's own JSON beside
    cases = [(r["scenario"], r["case"]) for r in doc["rows"]]
    assert cases == [
        ("http", "chat"),
        ("http", "stream"),
        ("tls", "chat"),
        ("cache", "shared-prefix chat stream"),
        ("grpc", "prompt 256 tokens"),
    ]
    for r in doc["rows"]:
        assert r["values"]["smg"] and r["values"]["smg"] > 0, r
        if rust:
            assert r["values"]["rust"] and r["ratios"]["smg/rust"]["n"] == 1, r
        else:
            assert "smg/rust" not in r["ratios"] or r["ratios"]["smg/rust"] is None
    for r in doc["rows"][:3]:  # the HTTP and TLS rows also have the stub alone
        sd = r["ratios"]["smg/direct"]
        assert sd["median"] == pytest.approx(r["values"]["smg"] / r["values"]["direct"])
    # The TLS run really served HTTPS from both gateways.
    tls_run = json.loads((tmp_path / "tls.json").read_text())
    assert tls_run["settings"]["tls"] is True
    if not rust:
        assert any("Rust SMG left out" in n for n in doc["notes"])

    # The table's rows are the JSON's rows, each with the ratio it computed.
    table = [ln for ln in md.splitlines() if re.match(r"\| (http|tls|cache|grpc) \|", ln)]
    assert len(table) == len(doc["rows"])
    http_chat = doc["rows"][0]["ratios"]["smg/direct"]["median"]
    assert f"{http_chat:.2f}x (1 run)" in table[0]
    assert "scaling series: skipped: needs 16 or more cores" in md or doc["host"]["cpus"] >= 16

    # The HTML report: one chart per ratio kind, bars for each row that has it, no network.
    assert page.count("<svg") == (2 if rust else 1)
    bars = sum(bool(r["ratios"].get(k)) for r in doc["rows"] for k in ("smg/rust", "smg/direct"))
    assert page.count("<rect") == bars == (8 if rust else 3)  # cache and gRPC have no direct
    assert not re.search(r"(src|href)=['\"]?https?:", page)

    # --rerender rebuilds the same rows from the tools' JSON left in the directory.
    import bench_all

    assert bench_all.rerender(tmp_path)["rows"] == doc["rows"]


def test_scaling_series_runs_each_step_on_its_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The series' orchestration with a 16-core plan (this box has fewer): one run.py per
    process count with the step's cores, smg and Rust alike, rows read back per step."""
    import alllib
    import bench_all

    plan = alllib.scaling_plan(range(16))
    monkeypatch.setattr(bench_all.alllib, "scaling_plan", lambda avail: plan)
    calls: list[list[str]] = []

    def fake_run_tool(python: str, tool: str, argv: list[str], out: Path, timeout: float):
        calls.append([tool, *argv])
        p = int(argv[argv.index("--smg-processes") + 1])
        runs = [
            {"gateway": g, "payload": "chat", "round": 0, "rps": rps, "void": []}
            for g, rps in (("smg", 1000.0 * p), ("rust", 400.0 * p))
        ]
        settings = {"gateways": ["smg", "rust"], "payloads": ["chat"]}
        out.write_text(json.dumps({"settings": settings, "max_runs": runs}))
        return 0, ""

    monkeypatch.setattr(bench_all, "run_tool", fake_run_tool)
    args = bench_all.parse_args(["--quick"])
    doc, rows = bench_all.run_scaling(args, True, tmp_path)
    assert doc["status"] == "ok" and len(doc["plan"]) == 4
    assert [c[0] for c in calls] == ["run.py"] * 4
    for call, step in zip(calls, plan.steps, strict=True):
        assert call[call.index("--gateways") + 1] == "smg,rust"
        assert call[-len(step.run_args()) :] == step.run_args()
    assert [r.case for r in rows] == [
        "1 core, chat",
        "2 cores, chat",
        "4 cores, chat",
        "8 cores, chat",
    ]
    assert [r.ratios["smg/rust"]["median"] for r in rows] == [2.5] * 4
    assert [r.values["smg"] for r in rows] == [1000.0, 2000.0, 4000.0, 8000.0]


@needs_wrk
@needs_cc
def test_a_scenario_past_its_time_is_stopped_with_everything_it_started(tmp_path: Path) -> None:
    import psutil

    # 30 s runs against an 8 s limit: stopped in the middle of its first measured run.
    argv = [sys.executable, str(HERE / "run.py"), "all", "--scenarios", "tls", "--rounds", "1"]
    argv += ["--duration", "30", "--no-rust", "--scenario-timeout", "8", "--out-dir", str(tmp_path)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    (s,) = doc["scenarios"]
    assert s["rc"] == 124 and s["status"] in ("failed", "partial")
    assert s["note"].startswith("timed out")
    assert (
        "- tls (HTTPS on both gateways (direct: plain)): " in (tmp_path / "summary.md").read_text()
    )
    found = re.search(r"stub on port (\d+)", (tmp_path / "tls.log").read_text())
    assert found, "the stub had not started within the 8 s"
    port = int(found.group(1))
    left = []  # a gateway pointed at that stub, or the stub itself still listening
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"127.0.0.1:{port}" in cmd:
            left.append(cmd)
        elif str(HERE / "build" / "stub") in cmd:
            with contextlib.suppress(psutil.Error):
                if any(c.laddr.port == port for c in p.net_connections("tcp")):
                    left.append(cmd)
    assert not left, left


@pytest.mark.parametrize(
    "argv", [["--scenarios", "http,h2"], ["--rounds", "0"], ["--duration", "0"]]
)
def test_bad_flags_exit_2(argv: list[str]) -> None:
    import bench_all

    with pytest.raises(SystemExit) as exc:
        bench_all.parse_args(argv)
    assert exc.value.code == 2
