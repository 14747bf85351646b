"""deploy/grafana/smg.json and deploy/prometheus/alerts.yaml (issue 12).

Every PromQL expression of the dashboard (panel targets, template-variable queries) and of
the alerts names only metrics a running `smg launch` exports (a small PromQL tokenizer
finds the names; a scrape after plain, streaming and failing requests says what is
exported); promtool parses every expression (`check rules`) and runs the alerts' unit tests
(`test rules`). promtool is optional here (CI installs it): those checks skip without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gatewayutil import running_gateway

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "smg.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
CHAT = "/v1/chat/completions"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# --- a small PromQL tokenizer: the metric names an expression reads --------------------------

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<matchers>\{(?:"(?:[^"\\]|\\.)*"|[^}"])*\})
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+)(?:ms|[smhdwy])*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<open>\()
    | (?P<close>\))
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
# Followed by a parenthesised list of label names, not of expressions.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregation operators: `sum by (le) (...)` puts the label list before the parenthesis.
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Identifiers of `expr` that name series: not a function (followed by `(`), an
    aggregation, a keyword, nor a label (inside `{...}` or a by/on/... list)."""
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "string", "matchers", "range")
    ]
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][0] if i + 1 < len(tokens) else None
        i += 1
        if kind != "ident":
            continue
        word = text.lower()
        if word in _LABEL_LISTS:
            if following == "open":  # skip the label names up to the closing parenthesis
                while i < len(tokens) and tokens[i][0] != "close":
                    i += 1
                i += 1
            continue
        if word in _AGGREGATIONS or word in _KEYWORDS or following == "open":
            continue
        names.add(text)
    return names


_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(.*?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S
)


def variable_expression(query: str) -> str | None:
    """The PromQL in a Grafana Prometheus variable query: label_values(expr, label)'s expr
    (None for label_values(label), which reads no metric), else the query itself."""
    if query.lstrip().startswith("label_values("):
        match = _LABEL_VALUES.match(query)
        return match.group(1) if match else None
    return query


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_expressions() -> list[str]:
    board = dashboard()
    exprs = [
        target["expr"]
        for panel in walk_panels(board["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        expr = variable_expression(text)
        if expr is not None:
            exprs.append(expr)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_expressions() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, for promtool."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (CI installs it: apt-get install prometheus)")
    return found


# --- pure: the tokenizer ------------------------------------------------------------------------


def test_metric_names_of_expressions() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (job, le) (rate(smg_a_bucket{x="b}", le!="1"}[5m])))'
        " > on (job, instance) group_left () (0.5 * smg_b)"
    ) == {"smg_a_bucket", "smg_b"}
    assert metric_names(
        "sum(rate(smg_c_total[$__rate_interval])) by (code) / ignoring(x) smg_d"
    ) == {
        "smg_c_total",
        "smg_d",
    }
    assert metric_names(
        "count((smg_h == 1) unless on (worker) (smg_s == 1)) or vector(0) offset 1h"
    ) == {"smg_h", "smg_s"}
    assert metric_names("topk(3, max without (process) (smg_e)) and bool 1e3") == {"smg_e"}
    assert metric_names('{__name__="smg_x"}') == set()  # the name as a matcher: not read
    assert variable_expression('label_values(smg_f{job=~"$job"}, instance)') == (
        'smg_f{job=~"$job"}'
    )
    assert variable_expression("label_values(job)") is None
    assert variable_expression("up") == "up"


# --- the dashboard's shape ----------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"] == "smg-gateway"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = list(walk_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # Every series is filtered by the job/instance variables.
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_and_alerts_cover_what_the_issue_asks() -> None:
    used = set().union(*map(metric_names, dashboard_expressions()))
    for name in (
        "smg_http_responses_total",
        "smg_http_request_duration_seconds_bucket",
        "smg_router_ttft_seconds_bucket",
        "smg_gateway_overhead_seconds_bucket",
        "smg_worker_requests_active",
        "smg_worker_health",
        "smg_engine_running_requests",
        "smg_worker_cb_state",
        "smg_worker_retries_total",
        "smg_gateway_admission_queue_depth",
        "smg_gateway_admission_inflight",
        "smg_event_loop_lag_seconds_bucket",
        "smg_dataplane_heartbeat_age_seconds",
        "smg_dataplane_restarts_total",
        "smg_config_reloads_total",
    ):
        assert name in used, name
    alerts = {rule["alert"]: metric_names(rule["expr"]) for rule in alert_rules()}
    assert alerts == {
        "SmgNoReadyWorkers": {
            "smg_worker_health",
            "smg_worker_cb_state",
            "smg_dataplane_heartbeat_timeout_seconds",
        },
        "SmgNoReadyDataPlane": {"smg_dataplane_processes"},
        "SmgWorkerCircuitOpen": {"smg_worker_cb_state"},
        "SmgHighErrorRate": {"smg_http_responses_total"},
        "SmgHighGatewayOverhead": {"smg_gateway_overhead_seconds_bucket"},
        "SmgDataPlaneStalled": {
            "smg_dataplane_heartbeat_age_seconds",
            "smg_dataplane_heartbeat_timeout_seconds",
        },
        "SmgDataPlaneRestarts": {"smg_dataplane_restarts_total"},
        "SmgConfigReloadFailed": {"smg_config_reloads_total"},
        "SmgAdmissionQueueRejecting": {"smg_admission_queue_rejected_total"},
        "SmgAdmissionQueueBacklog": {"smg_gateway_admission_queue_depth"},
    }


# --- the alerts' shape and their unit tests ------------------------------------------------------


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in alert_rules():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    """alerts.test.yaml: each alert fires in some test whose input also holds a healthy
    instance ("good"); promtool compares the alerts exactly, so "good" stays silent."""
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    firing: dict[str, int] = {}
    for test in tests:
        has_good = any('instance="good"' in s["series"] for s in test["input_series"])
        for case in test["alert_rule_test"]:
            for alert in case["exp_alerts"]:
                assert alert["exp_labels"]["instance"] != "good", case
                assert alert["exp_labels"]["severity"], case
            if case["exp_alerts"] and has_good:
                firing[case["alertname"]] = firing.get(case["alertname"], 0) + 1
    assert set(firing) == {rule["alert"] for rule in alert_rules()}, firing


def test_promtool_checks_and_unit_tests_the_alerts() -> None:
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout, checked.stdout
    tested = subprocess.run(
        [tool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    tool = promtool()
    exprs = [as_promql(e) for e in dashboard_expressions()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"smg:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    checked = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout, checked.stdout


# --- against a running gateway -------------------------------------------------------------------


def exported_names(page: str) -> set[str]:
    """The series names an exposition page offers, from its # TYPE lines (printed for every
    family, samples or not): a histogram's _bucket/_sum/_count, other families' own name."""
    names: set[str] = set()
    for line in page.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _hash, _type, name, kind = line.split()
        if kind == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(name)
    return names


def test_every_metric_used_is_exported_by_a_running_gateway() -> None:
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    with running_gateway(["--mock-workers", "2"], processes=1) as gw:
        gw.wait_ready()
        with httpx.Client(base_url=gw.url, timeout=20.0) as client:
            assert client.post(CHAT, json=body).status_code == 200
            streamed = client.post(CHAT, json={**body, "stream": True})
            assert streamed.status_code == 200
            assert streamed.text.rstrip().endswith("data: [DONE]")
            assert client.post(CHAT, content=b"{not json").status_code == 400
            assert client.get("/no/such/path").status_code == 404
        page = gw.metrics()
    exported = exported_names(page)
    # A histogram samples line, to show the TYPE lines name what the samples carry.
    assert re.search(r"^smg_router_ttft_seconds_count\{.*\} 1$", page, re.M), page
    used = {
        name: source
        for source, exprs in (
            ("dashboard", dashboard_expressions()),
            ("alerts", alert_expressions()),
        )
        for expr in exprs
        for name in metric_names(expr)
    }
    missing = {name: source for name, source in used.items() if name not in exported}
    assert not missing, missing
