"""Logs: the JSON line shape, per-process rotated files, the access log, and no secret in
any log line or admin answer (pure code first, then real `smg launch` runs).

The Rust SMG 1.13 facts (its `--log-json --log-dir DIR --log-level debug` run): JSON lines
with `timestamp`, `level` (upper case), `message`, the event's fields, `target`; one file
`DIR/smg.YYYY-MM-DD` rolled daily; a `finished processing request` line per request with
its status and latency.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import gatewayutil
import httpx
import pytest
from gatewayutil import Gateway, leaked_secrets, run_launch, running_gateway, secret, wait_until
from mockutil import request, start_mock_workers

from smg.config import load_config
from smg.logs import (
    JsonFormatter,
    ProcessStamp,
    SizeRotatingFileHandler,
    TextFormatter,
    access_fields,
    child_log_file,
)

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def record(message: str = "hello %s", **extra: Any) -> logging.LogRecord:
    args = ("x",) if "%s" in message else None
    rec = logging.LogRecord("smg.test", logging.WARNING, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_shape() -> None:
    rec = record(request_id="chatcmpl-1", worker="http://w:1", status=502, level="clash")
    ProcessStamp(3).filter(rec)
    line = json.loads(JsonFormatter().format(rec))
    assert list(line)[:3] == ["timestamp", "level", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
    assert line["level"] == "WARN"  # tracing's name, as 1.13 writes it
    assert line["message"] == "hello x"
    assert line["request_id"] == "chatcmpl-1"
    assert line["worker"] == "http://w:1"
    assert line["status"] == 502
    assert line["field_level"] == "clash"  # a field never overwrites the line's own keys
    assert line["target"] == "smg.test"
    assert line["process"] == 3
    assert line["pid"] == os.getpid()
    # Unstamped (the supervisor before any set-up), and a value JSON cannot hold.
    line = json.loads(JsonFormatter().format(record(blob=b"\x00")))
    assert line["process"] == "supervisor"
    assert line["blob"] == "b'\\x00'"


def test_text_line_carries_process_and_fields() -> None:
    rec = record(request_id="req-1", status=200)
    ProcessStamp("control").filter(rec)
    text = TextFormatter().format(rec)
    assert " WARNING [" in text
    assert f"[{os.getpid()} smg.test] hello x process=control request_id=req-1 status=200" in text


def test_access_fields() -> None:
    fields = access_fields(
        "POST", "/v1/chat/completions", 200, "", "http://w:1", 0.0123456, b"chatcmpl-7", 42, None
    )
    assert fields == {
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "error_code": None,
        "worker": "http://w:1",
        "duration_ms": 12.346,
        "request_id": "chatcmpl-7",
        "bytes_in": 42,
        "bytes_out": None,
    }
    # Every key can be a LogRecord extra (a clash with a record attribute raises).
    assert not set(fields) & set(logging.makeLogRecord({}).__dict__)


def test_child_files_are_per_process_by_slot() -> None:
    assert child_log_file("control", -1) == "control.log"
    assert child_log_file("dataplane", 0) == "dataplane-0.log"
    assert child_log_file("dataplane", 4) == "dataplane-4.log"


def test_rotation_keeps_the_descriptor_and_bounds_backups(tmp_path: Path) -> None:
    path = tmp_path / "dataplane-0.log"
    handler = SizeRotatingFileHandler(str(path), max_bytes=300, backup_count=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    assert handler.stream is not None
    fd = handler.stream.fileno()
    try:
        for i in range(40):
            handler.emit(record(f"line {i:03d} " + "x" * 40))
        assert handler.stream.fileno() == fd  # faulthandler's descriptor stays valid
    finally:
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dataplane-0.log", "dataplane-0.log.1", "dataplane-0.log.2"]
    # Newest last: the current file ends with the last line; backups hold older whole lines.
    current = path.read_text().splitlines()
    assert current[-1].startswith("line 039 ")
    older = (tmp_path / "dataplane-0.log.1").read_text().splitlines()
    assert older and int(older[-1][5:8]) < int(current[0][5:8])
    for name in names:
        assert (tmp_path / name).stat().st_size <= 300 + 50
        assert all(
            re.fullmatch(r"line \d{3} x{40}", ln)
            for ln in (tmp_path / name).read_text().splitlines()
        )


def test_rotation_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "smg.log"
    handler = SizeRotatingFileHandler(str(path), max_bytes=100, backup_count=0)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for _ in range(10):
            handler.emit(record("y" * 30))
    finally:
        handler.close()
    assert [p.name for p in tmp_path.iterdir()] == ["smg.log"]
    assert path.stat().st_size < 100


def test_log_rotation_flags_are_validated() -> None:
    cfg = load_config(["--log-max-bytes", "4096", "--log-backup-count", "2"], env={})
    assert (cfg.log_max_bytes, cfg.log_backup_count) == (4096, 2)
    assert load_config([], env={}).log_max_bytes == 100 * 1024 * 1024
    with pytest.raises(Exception, match="log_max_bytes"):
        load_config(["--log-max-bytes", "-1"], env={})


# --- end to end -----------------------------------------------------------------------------


def json_lines(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """Every line of every file, parsed: a line two processes interleaved would not parse."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(directory.iterdir()):
        out[path.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_per_process_json_files_access_log_and_rotation(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    with (
        start_mock_workers(1) as mocks,
        running_gateway(
            [
                "--worker-urls",
                mocks.url,
                "--log-json",
                "--log-dir",
                str(log_dir),
                "--access-log",
                "--log-max-bytes",
                "8192",
                "--log-backup-count",
                "2",
            ],
            processes=2,
        ) as gw,
    ):
        gw.wait_ready()
        ids: dict[str, tuple[int, str]] = {}  # request id -> (status, x-smg-process)
        with httpx.Client(base_url=gw.url, timeout=10.0) as client:
            for i in range(120):
                path = "/v1/chat/completions" if i % 3 else "/no/such/route"
                answer = client.post(path, json=CHAT)
                ids[answer.headers["x-request-id"]] = (
                    answer.status_code,
                    answer.headers["x-smg-process"],
                )
        assert {status for status, _p in ids.values()} == {200, 404}
        # The console still gets the lines.
        deadline = time.monotonic() + 10.0
        while gw.logs().count('"target":"smg.access"') < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.logs().count('"target":"smg.access"') >= len(ids)
    files = json_lines(log_dir)  # every process has stopped: every line is written
    names = set(files)
    assert {"smg.log", "control.log", "dataplane-0.log", "dataplane-1.log"} <= names
    # Rotated by size, backups bounded: at most .1 and .2 per process.
    assert any(name.endswith(".log.1") for name in names), names
    assert not [n for n in names if re.search(r"\.log\.([3-9]|\d\d)$", n)], names
    # One writer per file: each file's lines come from one process.
    for name, lines in files.items():
        stamps = {line["process"] for line in lines}
        if name.startswith("smg.log"):
            assert stamps == {"supervisor"}, name
        elif name.startswith("control.log"):
            assert stamps == {"control"}, name
        else:
            index = int(name.split("-")[1].split(".")[0])
            assert stamps <= {index}, name  # slot == listener index at start-up
        assert len({line["pid"] for line in lines}) <= 1, name
        for line in lines:
            assert {"timestamp", "level", "message", "target", "process", "pid"} <= set(line)
    # The access log: one line per answered request, rotated ones included (the oldest
    # may have been rotated out: at least the newest third is there).
    access = {
        line["request_id"]: line
        for lines in files.values()
        for line in lines
        if line["target"] == "smg.access"
    }
    kept = [rid for rid in ids if rid in access]
    assert len(kept) >= len(ids) // 3
    assert list(ids)[-1] in access
    for rid in kept:
        line = access[rid]
        status, process = ids[rid]
        assert line["status"] == status
        assert line["process"] == int(process)
        assert line["message"] == "finished processing request"
        assert line["method"] == "POST"
        assert line["duration_ms"] >= 0
        assert line["bytes_in"] == len(json.dumps(CHAT, separators=(",", ":")))
        if status == 200:
            assert line["path"] == "/v1/chat/completions"
            assert line["worker"] == mocks.url
            assert line["error_code"] is None
        else:
            assert line["path"] == "/no/such/route"
            assert line["worker"] is None
            assert line["error_code"] == "unknown_url"
            assert line["bytes_out"] > 0


def test_access_log_off_by_default(tmp_path: Path) -> None:
    with (
        start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, "--log-dir", str(tmp_path)]) as gw,
    ):
        gw.wait_ready()
        assert request("POST", gw.url + "/v1/chat/completions", CHAT)[0] == 200
        text = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "finished processing request" not in text
    assert "finished processing request" not in gw.logs()
    assert "smg ready on" in (tmp_path / "smg.log").read_text()
    # Plain text lines carry the process: the supervisor's, the control plane's.
    assert re.search(r"INFO \[\d+ smg\.supervisor\] smg ready on .* process=supervisor", gw.logs())


API_KEY = secret("logs-api-key-a7f3e91c22")
TENANT_KEY = secret("logs-tenant-key-0bd84e6f")
CP_ADMIN_KEY = secret("logs-cp-admin-key-5c71aa90")
CP_USER_KEY = secret("logs-cp-user-key-e2d9c413")
WRONG_KEY = secret("logs-wrong-key-9e6b20d7f5")


def test_no_secret_in_any_log_line_or_admin_answer(tmp_path: Path) -> None:
    assert gatewayutil.SESSION_LOG_DIR is not None  # conftest.py collects the session's logs
    log_dir = tmp_path / "logs"
    args = [
        "--api-key",
        API_KEY,
        "--tenant-api-key",
        f"team-a:{TENANT_KEY}",
        "--control-plane-api-keys",
        f"ops:Ops:admin:{CP_ADMIN_KEY}",
        f"viewer:Viewer:user:{CP_USER_KEY}",
        "--log-json",
        "--log-dir",
        str(log_dir),
        "--access-log",
        "--log-level",
        "debug",
    ]
    with start_mock_workers(1) as mocks, running_gateway(["--worker-urls", mocks.url, *args]) as gw:
        gw.wait_ready()
        answers: list[str] = []
        for key, want in ((API_KEY, 200), (TENANT_KEY, 200), (WRONG_KEY, 401), (None, 401)):
            for name in ("Authorization", "x-api-key"):
                if key is None:
                    headers = {}
                else:
                    headers = {name: f"Bearer {key}" if name == "Authorization" else key}
                status, got, body = request("POST", gw.url + "/v1/chat/completions", CHAT, headers)
                assert status == want, (want, body)
                answers.append(json.dumps(got) + body.decode())
        # With control-plane keys configured only they open the admin routes (as in 1.13).
        admin = {"Authorization": f"Bearer {CP_ADMIN_KEY}"}
        for path in ("/workers", "/get_server_info", "/v1/models"):
            status, got, body = request("GET", gw.url + path, None, admin, timeout=10.0)
            assert status == 200, (path, body)
            answers.append(json.dumps(got) + body.decode())
        status, _got, body = request(
            "GET", gw.url + "/workers", None, {"Authorization": f"Bearer {WRONG_KEY}"}
        )
        assert status == 401
        # A worker added with its own key: the key is accepted, never shown again.
        worker_key = secret("logs-worker-own-key-3f0e2b")
        status, _got, body = request(
            "POST",
            gw.url + "/workers",
            {"url": "http://127.0.0.1:9", "api_key": worker_key},
            admin,
            timeout=10.0,
        )
        assert status == 202, body
        answers.append(body.decode())
        status, _got, body = request("GET", gw.url + "/workers", None, admin, timeout=10.0)
        assert status == 200
        answers.append(body.decode())
        answers.append(httpx.get(gw.metrics_url, timeout=10.0).text)
        console = gw.logs()
    secrets = [API_KEY, TENANT_KEY, CP_ADMIN_KEY, CP_USER_KEY, WRONG_KEY, worker_key]
    for i, text in enumerate(answers):
        for value in secrets:
            assert value not in text, f"admin/serving answer #{i} carries a secret"
    assert '"target":"smg.access"' in console  # the debug run did log requests
    found = leaked_secrets(str(log_dir), {value: "test_logging" for value in secrets})
    assert found == [], found
    assert all(value not in console for value in secrets)
    # Every file parses (and the debug level was on: the lines are there to grep).
    assert sum(len(v) for v in json_lines(log_dir).values()) > 10


def test_leak_report_names_the_file_not_the_secret(tmp_path: Path) -> None:
    value = "sekrit-value-for-report-test"
    (tmp_path / "a.log").write_text(f"line with {value}\n")
    (tmp_path / "b.log").write_text("clean\n")
    found = leaked_secrets(str(tmp_path), {value: "here.py:1"})
    assert found == [f"{tmp_path / 'a.log'}: contains the secret registered at here.py:1"]
    assert value not in "".join(found)


def test_unwritable_log_dir_is_a_clear_start_up_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err, _secs = run_launch(["--mock-workers", "1", "--log-dir", str(blocker / "logs")])
    assert code == 2
    assert f"smg launch: --log-dir {blocker / 'logs'}: Not a directory" in err
    assert "Traceback" not in err


def test_reload_replacement_writes_its_own_slot_file(tmp_path: Path) -> None:
    """During a SIGHUP reload listener 0's replacement runs beside the old process in the
    spare table slot: it writes dataplane-1.log, never the old process's file."""
    config = tmp_path / "smg.yaml"
    log_dir = tmp_path / "logs"
    with start_mock_workers(1) as mocks:
        config.write_text(f"worker-urls: [{mocks.url}]\nmax-payload-size: 100000\n")
        gw = Gateway(
            ["--config", str(config), "--log-json", "--log-dir", str(log_dir), "--access-log"],
            processes=1,
        ).start()
        try:
            gw.wait_ready()
            assert request("POST", gw.url + "/v1/chat/completions", CHAT)[0] == 200
            config.write_text(f"worker-urls: [{mocks.url}]\nmax-payload-size: 200000\n")
            gw.signal(signal.SIGHUP)
            wait_until(
                lambda: "every data-plane process runs the new configuration" in gw.logs(),
                60.0,
                "the rollout",
            )
            assert request("POST", gw.url + "/v1/chat/completions", CHAT)[0] == 200
        finally:
            gw.stop()
            gw.close_log()
    files = json_lines(log_dir)
    old, new = files["dataplane-0.log"], files["dataplane-1.log"]
    for lines in (old, new):
        access = [line for line in lines if line["target"] == "smg.access"]
        chats = [line for line in access if line["path"] == "/v1/chat/completions"]
        assert [line["status"] for line in chats] == [200]
        assert {line["process"] for line in lines} == {0}  # the listener index, both
    assert {line["pid"] for line in old}.isdisjoint({line["pid"] for line in new})
