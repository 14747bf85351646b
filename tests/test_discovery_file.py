"""File discovery: the manifest rules (pure, the 1.13 binary's messages), the discovery
flags, and `smg launch --processes 2 --discovery-provider file` end to end with mock
workers: a manifest created late, added, changed, broken, emptied; requests follow it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smg.config import ConfigError, load_config, remove_unhealthy
from smg.discovery.file import FileProvider, ManifestError, parse_manifest
from smg.workers_spec import WorkerSpec
from tests import mockutil
from tests.gatewayutil import promtool_check, running_gateway, wait_until

# --- the manifest ------------------------------------------------------------------------


def _parse(doc: Any, *, pd: bool = False) -> dict[str, WorkerSpec]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_manifest(raw, pd=pd)


def _refused(doc: Any, *, pd: bool = False) -> str:
    with pytest.raises(ManifestError) as info:
        _parse(doc, pd=pd)
    return str(info.value)


def test_manifest_workers_by_id_in_order() -> None:
    specs = _parse(
        {
            "version": 1,
            "workers": [
                {"url": "http://127.0.0.1:8000/"},
                {"id": "b", "url": "127.0.0.1:8001", "model_id": "m"},
            ],
        }
    )
    assert list(specs) == ["http://127.0.0.1:8000/", "b"]
    a, b = specs.values()
    assert (a.url, a.worker_type, a.model_id, a.connection_mode) == (
        "http://127.0.0.1:8000",
        "regular",
        None,
        "http",
    )
    # A bare host:port stays bare: the reconciler detects HTTP or gRPC when it adds it.
    assert (b.url, b.model_id, b.connection_mode) == ("127.0.0.1:8001", "m", None)
    assert _parse({"version": 1, "workers": []}) == {}


def test_manifest_pd_roles() -> None:
    specs = _parse(
        {
            "version": 1,
            "workers": [
                {"url": "http://127.0.0.1:8000", "worker_type": "prefill", "bootstrap_port": 9000},
                {"url": "http://127.0.0.1:8001", "worker_type": "decode"},
            ],
        },
        pd=True,
    )
    assert [(s.worker_type, s.bootstrap_port) for s in specs.values()] == [
        ("prefill", 9000),
        ("decode", None),
    ]


@pytest.mark.parametrize(
    ("doc", "pd", "message"),
    [
        ({"workers": []}, False, "missing field `version`"),
        (
            {"version": 2, "workers": []},
            False,
            "unsupported version 2; this gateway reads version 1",
        ),
        ({"version": "1", "workers": []}, False, 'invalid type: string "1", expected u64'),
        ({"version": 1}, False, "missing field `workers`"),
        (
            {"version": 1, "extra": 2, "workers": []},
            False,
            "unknown field `extra`, expected `version` or `workers`",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1", "bogus": 1}]},
            False,
            "workers[0]: unknown field `bogus`, expected one of `id`, `url`, `worker_type`, "
            "`bootstrap_port`, `model_id`, `kv_connector`, `kv_role`, `kv_engine_id`",
        ),
        (
            {
                "version": 1,
                "workers": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:1"}],
            },
            False,
            "workers[1]: duplicate id 'http://127.0.0.1:1'",
        ),
        (
            {
                "version": 1,
                "workers": [
                    {"id": "a", "url": "http://127.0.0.1:1"},
                    {"id": "b", "url": "http://127.0.0.1:1/"},
                ],
            },
            False,
            "workers[1]: 'b' and 'a' name the same endpoint http://127.0.0.1:1",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1", "worker_type": "prefill"}]},
            False,
            "workers[0]: worker_type 'prefill' is not used in regular routing",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1", "worker_type": "bogus"}]},
            False,
            "workers[0]: unknown variant `bogus`, expected one of `regular`, `prefill`, "
            "`decode`, `encode`",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1", "bootstrap_port": 9000}]},
            False,
            "workers[0]: bootstrap_port applies only to encode and prefill workers, not regular",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1"}]},
            True,
            "workers[0]: worker_type is required in prefill-decode routing",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1", "worker_type": "encode"}]},
            True,
            "workers[0]: worker_type 'encode' is not used in prefill-decode routing",
        ),
        (
            {
                "version": 1,
                "workers": [
                    {"url": "http://127.0.0.1:1", "worker_type": "decode", "bootstrap_port": 1}
                ],
            },
            True,
            "workers[0]: bootstrap_port applies only to encode and prefill workers, not decode",
        ),
        (
            {"version": 1, "workers": [{"url": "http://127.0.0.1:1", "kv_connector": "nixl"}]},
            False,
            "workers[0]: kv_connector: smg has no vLLM KV connectors (leave it out)",
        ),
        (
            {"version": 1, "workers": [{"url": "ftp://127.0.0.1:1"}]},
            False,
            "workers[0]: url: ",
        ),
        ([], False, "invalid type: sequence, expected a JSON object"),
    ],
)
def test_manifest_refusals(doc: Any, pd: bool, message: str) -> None:
    assert _refused(doc, pd=pd).startswith(message)


def test_manifest_not_json() -> None:
    assert _refused(b"not json").startswith("not valid JSON: ")


# --- the flags (the 1.13 binary refuses the same command lines) ---------------------------


@pytest.mark.parametrize(
    ("argv", "key", "reason"),
    [
        (
            ["--service-discovery", "--discovery-provider", "file"],
            "discovery_provider",
            "not allowed with argument --service-discovery",
        ),
        (["--discovery-provider", "file"], "discovery_provider", "file needs --discovery-file"),
        (
            ["--discovery-file", "m.json"],
            "discovery_file",
            "--discovery-file and --discovery-check-interval-secs apply only to "
            "--discovery-provider file",
        ),
        (
            [
                "--discovery-provider",
                "file",
                "--discovery-file",
                "m",
                "--discovery-check-interval-secs",
                "0",
            ],
            "discovery_check_interval_secs",
            "must be > 0, got 0",
        ),
        (
            ["--discovery-provider", "file", "--discovery-file", "m", "--model-id-from", "bogus"],
            "model_id_from",
            "Invalid model-id-from value 'bogus'. Expected: namespace, label:<key>, or "
            "annotation:<key>",
        ),
        (["--selector", "app"], "selector", "'app' is not key=value"),
        (["--router-selector", "a=b"], "router_selector", "smg has no HA mesh mode"),
        (["--encode-selector", "a=b"], "encode_selector", "smg has no EPD mode"),
        (
            ["--kv-connector-annotation", "x"],
            "kv_connector_annotation",
            "smg reads no vLLM KV connector annotations (only the default is accepted)",
        ),
        (["--service-discovery-port", "0"], "service_discovery_port", "must be a port number"),
    ],
)
def test_discovery_flag_refusals(argv: list[str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, {})
    assert info.value.key == key
    assert info.value.reason.startswith(reason)


def test_remove_unhealthy_follows_discovery() -> None:
    file_args = ["--discovery-provider", "file", "--discovery-file", "m.json"]
    assert remove_unhealthy(load_config(file_args, {})) is True
    assert remove_unhealthy(load_config([], {})) is False
    assert remove_unhealthy(load_config([*file_args, "--no-remove-unhealthy-workers"], {})) is False
    assert remove_unhealthy(load_config(["--remove-unhealthy-workers"], {})) is True
    cfg = load_config([*file_args, "--discovery-check-interval-secs", "5"], {})
    assert (cfg.discovery_file, cfg.discovery_check_interval_secs) == ("m.json", 5)


# --- end to end ---------------------------------------------------------------------------

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _write(path: Path, doc: Any) -> None:
    """Replace the manifest atomically, as a config-management tool does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    os.replace(tmp, path)


def _manifest(*workers: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "workers": list(workers)}


def _workers(gw: Any) -> dict[str, dict[str, Any]]:
    answer = gw.admin("GET", "/workers")
    assert answer.status_code == 200, answer.text
    return {w["url"]: w for w in answer.json()["workers"]}


def _discovered(gw: Any) -> dict[str, tuple[str | None, str | None, str]]:
    return {
        url: (w["labels"].get("smg.ai/discovery-id"), w.get("model_id"), w["status"])
        for url, w in _workers(gw).items()
        if w["labels"].get("smg.ai/discovery-provider") == "file"
    }


def _chats(urls: list[str]) -> dict[str, int]:
    return {u: mockutil.stats(u)["requests_by_route"].get("/v1/chat/completions", 0) for u in urls}


def _send(gw: Any, n: int, model: str = "mock-model") -> None:
    with httpx.Client(base_url=gw.url, timeout=10.0) as client:
        for _ in range(n):
            answer = client.post("/v1/chat/completions", json={**CHAT, "model": model})
            assert answer.status_code == 200, answer.text


def _sent_to(gw: Any, n: int, urls: list[str]) -> list[int]:
    """Send `n` chats through `gw`: how many each of `urls` served."""
    before = _chats(urls)
    _send(gw, n)
    after = _chats(urls)
    return [after[u] - before[u] for u in urls]


def _metric(text: str, series: str) -> float:
    """The value of one exact series (name and labels as written), 0 when absent."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == series:
            return float(value)
    return 0.0


def _gateway_args(manifest: Path, check_interval: str, *extra: str) -> list[str]:
    """`smg launch` watching `manifest`, rereading it every `check_interval` s, health-checking
    every second."""
    return [
        "--discovery-provider", "file", "--discovery-file", str(manifest),
        "--discovery-check-interval-secs", check_interval,
        "--health-check-interval-secs", "1", *extra,
    ]  # fmt: skip


def test_file_discovery_end_to_end(tmp_path: Path) -> None:
    manifest = tmp_path / "workers.json"  # created after start-up
    with mockutil.start_mock_workers(3) as mocks:
        a, b, c = mocks.urls
        # A long interval: every change below must be seen through inotify, not the timer.
        args = _gateway_args(manifest, "300")
        with running_gateway(args, processes=2) as gw:
            assert _discovered(gw) == {}
            wait_until(lambda: "with inotify" in gw.logs(), 10, "the inotify watch")
            # An admin-API worker: discovery never touches it.
            answer = gw.admin("POST", "/workers", json={"url": c, "model_id": "admin-model"})
            assert answer.status_code == 202, answer.text
            # ... and it cannot pass for a discovered one (the reconciler would remove it).
            forged = {"url": b, "labels": {"smg.ai/discovery-provider": "file"}}
            answer = gw.admin("POST", "/workers", json=forged)
            assert answer.status_code == 400, answer.text
            assert "'smg.ai/discovery-provider' is set by service discovery only" in answer.text
            admin_id = gw.admin("GET", "/workers").json()["workers"][0]["id"]
            patch = {"labels": {"smg.ai/discovery-id": "wa"}}
            answer = gw.admin("PATCH", f"/workers/{admin_id}", json=patch)
            assert answer.status_code == 400, answer.text
            assert "'smg.ai/discovery-id' is set by service discovery only" in answer.text

            # Late file: picked up.
            _write(manifest, _manifest({"id": "wa", "url": a}))
            wait_until(lambda: _discovered(gw) == {a: ("wa", "mock-model", "ready")}, 15, "a")
            assert _sent_to(gw, 4, [a, b]) == [4, 0]

            # Add b, remove a: requests follow the file.
            _write(manifest, _manifest({"id": "wb", "url": b}))
            wait_until(lambda: _discovered(gw) == {b: ("wb", "mock-model", "ready")}, 15, "b")
            assert _sent_to(gw, 4, [a, b]) == [0, 4]

            # A changed spec (model id) at the same URL: removed, then registered again.
            (old_id,) = [w["id"] for u, w in _workers(gw).items() if u == b]
            _write(manifest, _manifest({"id": "wb", "url": b, "model_id": "renamed"}))
            wait_until(lambda: _discovered(gw) == {b: ("wb", "renamed", "ready")}, 15, "renamed")
            assert _workers(gw)[b]["id"] != old_id
            _send(gw, 2, model="renamed")

            # A broken manifest keeps the last good set, logged and counted.
            _write(manifest, b'{"workers": []}')
            wait_until(
                lambda: (
                    _metric(
                        gw.metrics(),
                        'smg_discovery_snapshot_errors_total{source="file",reason="invalid"}',
                    )
                    >= 1
                ),
                15,
                "the error counted",
            )
            assert _discovered(gw) == {b: ("wb", "renamed", "ready")}
            assert "missing field `version`" in gw.logs()
            _send(gw, 1, model="renamed")

            # Emptied: discovered workers go, the admin worker stays.
            _write(manifest, _manifest())
            wait_until(lambda: _discovered(gw) == {}, 15, "empty")
            assert _workers(gw)[c]["model_id"] == "admin-model"
            assert "smg.ai/discovery-provider" not in _workers(gw)[c]["labels"]

            text = gw.metrics()
            promtool_check(text)
            parsed = {f.name for f in text_string_to_metric_families(text)}
            assert {
                "smg_discovery_registrations",
                "smg_discovery_deregistrations",
                "smg_discovery_snapshot_errors",
                "smg_discovery_workers_discovered",
                "smg_discovery_sync_duration_seconds",
                "smg_discovery_last_sync_timestamp_seconds",
            } <= parsed
            assert _metric(text, 'smg_discovery_workers_discovered{source="file"}') == 0
            assert (
                _metric(text, 'smg_discovery_registrations_total{source="file",result="success"}')
                == 3
            )
            assert (
                _metric(
                    text, 'smg_discovery_deregistrations_total{source="file",reason="reconciled"}'
                )
                == 3
            )
            assert _metric(text, 'smg_discovery_last_sync_timestamp_seconds{source="file"}') > (
                time.time() - 60
            )


def test_unhealthy_discovered_worker_is_removed_and_added_back(tmp_path: Path) -> None:
    """--remove-unhealthy-workers is on under discovery (unset, as 1.13): a Failed
    discovered worker is removed, the next reread registers it again, and it serves once
    healthy."""
    manifest = tmp_path / "workers.json"
    with mockutil.start_mock_workers(1) as mocks:
        (a,) = mocks.urls
        _write(manifest, _manifest({"id": "wa", "url": a}))
        args = _gateway_args(
            manifest, "1", "--health-failure-threshold", "1", "--health-success-threshold", "1"
        )
        with running_gateway(args, processes=2) as gw:
            wait_until(lambda: _discovered(gw) == {a: ("wa", "mock-model", "ready")}, 15, "a")
            (first,) = [w["id"] for w in _workers(gw).values()]
            mockutil.set_config(a, healthy=False)
            wait_until(lambda: first not in {w["id"] for w in _workers(gw).values()}, 20, "removal")
            assert "removing unhealthy worker " + a in gw.logs()
            mockutil.set_config(a, healthy=True)
            wait_until(lambda: _discovered(gw) == {a: ("wa", "mock-model", "ready")}, 20, "back")
            assert _workers(gw)[a]["id"] != first
            _send(gw, 2)


# --- the provider's loop, without a gateway ------------------------------------------------


class _Recorder:
    """Stands in for the Reconciler: what the provider handed over, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def apply(self, source: str, desired: dict[str, WorkerSpec]) -> None:
        self.events.append(("apply", sorted(s.url for s in desired.values())))

    def failed(self, source: str, reason: str, kind: str = "invalid") -> None:
        self.events.append(("failed", kind))


def test_provider_directory_created_late_then_periodic_reread(tmp_path: Path) -> None:
    """No directory at start: stat polling, then inotify once it exists; a broken file is
    reported and the next good one applied; the timer rereads an unchanged file too."""

    async def scenario() -> list[tuple[str, Any]]:
        recorder = _Recorder()
        path = tmp_path / "later" / "m.json"
        provider = FileProvider(path, 1.0, recorder)  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(provider.run())
        try:
            await asyncio.sleep(0.3)
            assert provider.watch_mode == "stat"
            path.parent.mkdir()
            _write(path, _manifest({"url": "http://127.0.0.1:7001"}))
            await _until(lambda: ("apply", ["http://127.0.0.1:7001"]) in recorder.events)
            await _until(lambda: provider.watch_mode == "inotify")
            _write(path, b"{")
            await _until(lambda: recorder.events[-1] == ("failed", "invalid"))
            _write(path, _manifest())
            await _until(lambda: recorder.events[-1] == ("apply", []))
            count = len(recorder.events)
            await _until(lambda: len(recorder.events) > count, 3.0)  # the 1 s timer
            return recorder.events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    events = asyncio.run(scenario())
    assert events[0] == ("failed", "unreadable")
    assert events[-1] == ("apply", [])


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_reload_keeps_the_discovery_settings() -> None:
    """The provider runs with the start-up settings: a SIGHUP reports them as kept."""
    from smg.reload import plan_reload

    old = load_config(["--discovery-provider", "file", "--discovery-file", "a.json"], {})
    new = load_config(
        [
            "--discovery-provider",
            "file",
            "--discovery-file",
            "b.json",
            "--discovery-check-interval-secs",
            "5",
            "--no-remove-unhealthy-workers",
        ],
        {},
    )
    done = plan_reload(old, new)
    assert done.kept == [
        ("discovery_file", "a.json", "b.json"),
        ("discovery_check_interval_secs", None, 5),
    ]
    assert done.changed == ["remove_unhealthy_workers"]  # read live by the control plane
    assert (done.cfg.discovery_file, done.cfg.remove_unhealthy_workers) == ("a.json", False)
