"""Live reload (SIGHUP): what may change live (pure), and end to end under load: zero
failed requests while every data-plane process is replaced, the new settings in force
afterwards, an invalid file refused with the old settings kept, counters that only grow."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from gatewayutil import Gateway, wait_until
from mockutil import start_mock_workers

from smg.config import GatewayConfig
from smg.reload import RESTART_ONLY, needs_rollout, plan_reload, worker_list_changes

pytestmark = pytest.mark.timeout(180)

CHAT_BODY = b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}'
STREAM_BODY = (
    b'{"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
)
BIG_BODY = b'{"model": "mock-model", "messages": [{"role": "user", "content": "%s"}]}' % (
    b"x" * 400
)


# --- pure -----------------------------------------------------------------------------------


def test_restart_only_settings_keep_their_running_value() -> None:
    old = GatewayConfig(port=30000, processes=2, policy="round_robin", max_payload_size=1000)
    new = GatewayConfig(port=31000, processes=4, policy="random", max_payload_size=200)
    plan = plan_reload(old, new)
    assert plan.cfg.port == 30000 and plan.cfg.processes == 2
    assert plan.cfg.policy == "random" and plan.cfg.max_payload_size == 200
    assert plan.kept == [("port", 30000, 31000), ("processes", 2, 4)]
    assert plan.changed == ["policy", "max_payload_size"]
    assert needs_rollout(plan.changed)


def test_nothing_changed_plans_nothing() -> None:
    plan = plan_reload(GatewayConfig(), GatewayConfig())
    assert plan.changed == [] and plan.kept == []


def test_control_only_changes_leave_the_data_plane_running() -> None:
    plan = plan_reload(
        GatewayConfig(), GatewayConfig(health_check_interval_secs=5, worker_urls=["http://a:1"])
    )
    assert plan.changed == ["worker_urls", "health_check_interval_secs"]
    assert not needs_rollout(plan.changed)


def test_every_restart_only_name_is_a_setting() -> None:
    assert set(RESTART_ONLY) <= set(GatewayConfig.__struct_fields__)


def test_worker_list_changes() -> None:
    added, removed = worker_list_changes(
        ["http://a:1", "http://b:1", "http://b:1"], ["http://b:1", "http://c:1"]
    )
    assert added == ["http://c:1"] and removed == ["http://a:1"]
    assert worker_list_changes([], []) == ([], [])


# --- end to end -------------------------------------------------------------------------------


class Load:
    """Client threads sending chat requests until stopped: half on keep-alive connections,
    half on a new connection per request, and one thread of streams on a keep-alive
    connection. Records every failure (exception, non-200, a stream without its end)."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.stop_event = threading.Event()
        self.sent = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
            for i in range(threads)
        ]
        self.threads.append(threading.Thread(target=self._streams, daemon=True))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(30.0)

    def _run(self, keep_alive: bool) -> None:
        client = httpx.Client(base_url=self.url, timeout=20.0) if keep_alive else None
        try:
            while not self.stop_event.is_set():
                try:
                    if client is not None:
                        answer = client.post("/v1/chat/completions", content=CHAT_BODY)
                    else:
                        answer = httpx.post(
                            self.url + "/v1/chat/completions",
                            content=CHAT_BODY,
                            headers={"connection": "close"},
                            timeout=20.0,
                        )
                    failure = "" if answer.status_code == 200 else f"status {answer.status_code}"
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                with self.lock:
                    self.sent += 1
                    if failure:
                        self.failures.append(failure)
        finally:
            if client is not None:
                client.close()

    def _streams(self) -> None:
        with httpx.Client(base_url=self.url, timeout=20.0) as client:
            while not self.stop_event.is_set():
                try:
                    with client.stream(
                        "POST", "/v1/chat/completions", content=STREAM_BODY
                    ) as answer:
                        text = b"".join(answer.iter_bytes())
                    failure = (
                        ""
                        if answer.status_code == 200 and text.rstrip().endswith(b"data: [DONE]")
                        else f"stream status {answer.status_code}: {text[-80:]!r}"
                    )
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                with self.lock:
                    self.sent += 1
                    if failure:
                        self.failures.append(failure)


class KeepAliveProbe:
    """One raw keep-alive connection sending a request whenever the last answer is in,
    until the server closes it: every answer's status and whether it said
    `Connection: close`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20.0)
        self.answers: list[tuple[int, bool]] = []
        self.closed_by_server = False
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(CHAT_BODY), CHAT_BODY)
        )
        buffered = b""
        try:
            while not self.stop_event.is_set():
                self.sock.sendall(request)
                while b"\r\n\r\n" not in buffered:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        self.closed_by_server = True
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").lower().split("\r\n")
                length = next(int(x.split(":")[1]) for x in lines if x.startswith("content-length"))
                while len(buffered) < length:
                    buffered += self.sock.recv(65536)
                buffered = buffered[length:]
                close = "connection: close" in lines
                self.answers.append((int(lines[0].split()[1]), close))
                if close:
                    self.closed_by_server = self.sock.recv(1) == b""
                    return
                time.sleep(0.01)
        except OSError:
            return

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(20.0)
        self.sock.close()


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values


def counters_only(text: str) -> dict[str, float]:
    """Every counter and histogram series (gauges may go down)."""
    kinds = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
    out = {}
    for series, value in metric_values(text).items():
        name = series.split("{", 1)[0]
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and kinds.get(name[: -len(suffix)]) == "histogram":
                name = name[: -len(suffix)]
        if kinds.get(name) in ("counter", "histogram"):
            out[series] = value
    return out


def assert_no_counter_went_back(before: str, after: str) -> None:
    old, new = counters_only(before), counters_only(after)
    assert old, "no counters in /metrics"
    went_back = {s: (v, new.get(s)) for s, v in old.items() if new.get(s, -1.0) < v}
    assert not went_back, went_back


def post_status(gw: Gateway, body: bytes) -> int:
    return httpx.post(gw.url + "/v1/chat/completions", content=body, timeout=20.0).status_code


def test_sighup_under_load_applies_the_new_config_with_zero_failures(tmp_path: Path) -> None:
    config = tmp_path / "smg.yaml"
    with start_mock_workers(2) as mocks:
        first, second = mocks.urls
        config.write_text(f"worker-urls: [{first}]\nmax-payload-size: 100000\n")
        gw = Gateway(["--config", str(config)], processes=2).start()
        try:
            gw.wait_ready()
            assert post_status(gw, BIG_BODY) == 200
            with Load(gw.url) as load:
                wait_until(lambda: load.sent >= 50, 30.0, "load to flow")
                probe = KeepAliveProbe(gw.port)
                wait_until(lambda: len(probe.answers) >= 3, 20.0, "the keep-alive probe")
                before = gw.metrics()
                config.write_text(f"worker-urls: [{first}, {second}]\nmax-payload-size: 200\n")
                gw.signal(signal.SIGHUP)
                wait_until(
                    lambda: "every data-plane process runs the new configuration" in gw.logs(),
                    90.0,
                    "the rollout",
                )
                sent_at_end = load.sent
                wait_until(lambda: load.sent >= sent_at_end + 50, 30.0, "load after the reload")
                probe.stop()
            assert load.failures == [], (load.failures[:5], len(load.failures), load.sent)
            # The old process's keep-alive connection: every answer 200, the last one with
            # `Connection: close`, then closed by the server.
            assert probe.answers[-1] == (200, True), probe.answers[-3:]
            assert all(answer == (200, False) for answer in probe.answers[:-1])
            assert probe.closed_by_server
            # The new settings are in force in every process (several new connections).
            assert [post_status(gw, BIG_BODY) for _ in range(6)] == [413] * 6
            workers = {w["url"] for w in gw.admin("GET", "/workers").json()["workers"]}
            assert workers == {first, second}
            after = gw.metrics()
            assert_no_counter_went_back(before, after)
            values = metric_values(after)
            assert values['smg_config_reloads_total{result="success"}'] == 1
            assert values['smg_config_reloads_total{result="failure"}'] == 0
            assert values['smg_dataplane_restarts_total{reason="reload"}'] == 2
            assert values['smg_dataplane_restarts_total{reason="crash"}'] == 0

            # An invalid file: refused, counted, the running settings stay.
            config.write_text(f"worker-urls: [{first}]\nmax-payload-size: -5\n")
            gw.signal(signal.SIGHUP)
            wait_until(
                lambda: (
                    metric_values(gw.metrics()).get('smg_config_reloads_total{result="failure"}')
                    == 1
                ),
                30.0,
                "the refused reload to be counted",
            )
            assert "configuration reload refused" in gw.logs()
            assert [post_status(gw, BIG_BODY) for _ in range(4)] == [413] * 4
            assert [post_status(gw, CHAT_BODY) for _ in range(4)] == [200] * 4
            workers = {w["url"] for w in gw.admin("GET", "/workers").json()["workers"]}
            assert workers == {first, second}
            final = metric_values(gw.metrics())
            assert final['smg_dataplane_restarts_total{reason="reload"}'] == 2
        finally:
            gw.stop()
            gw.close_log()


def test_reload_whose_new_process_cannot_start_goes_back(tmp_path: Path) -> None:
    config = tmp_path / "smg.yaml"
    marker = tmp_path / "fail-start"
    config.write_text("max-payload-size: 100000\n")
    gw = Gateway(
        ["--config", str(config), "--mock-workers", "1"],
        processes=2,
        env={"SMG__TEST_HOOKS": "1", "SMG__TEST_FAIL_START_FILE": str(marker)},
    ).start()
    try:
        gw.wait_ready()
        config.write_text("max-payload-size: 200\n")
        marker.write_text("")
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: "going back to the previous configuration" in gw.logs(), 30.0, "the failure"
        )
        values = metric_values(gw.metrics())
        assert values['smg_config_reloads_total{result="failure"}'] == 1
        assert values['smg_config_reloads_total{result="success"}'] == 0
        # The old processes kept serving with the old settings.
        assert [post_status(gw, BIG_BODY) for _ in range(4)] == [200] * 4
        # A later reload that can start applies.
        marker.unlink()
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: "every data-plane process runs the new configuration" in gw.logs(),
            60.0,
            "the second rollout",
        )
        assert [post_status(gw, BIG_BODY) for _ in range(4)] == [413] * 4
        values = metric_values(gw.metrics())
        assert values['smg_config_reloads_total{result="success"}'] == 1
    finally:
        gw.stop()
        gw.close_log()
