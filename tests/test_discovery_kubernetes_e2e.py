"""Kubernetes discovery end to end: `smg launch --processes 2 --service-discovery` against
kmock's in-memory Kubernetes API (tests/kmockutil.py, reached through a kubeconfig), with
a mock worker behind each pod IP (127.0.0.x loopback addresses; the `smg.ai/worker-ports`
annotation names the mock's port). Requests follow the pods; a rolling replacement of
every worker (new pods Ready before the old ones terminate) fails no request."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from smg.config import GatewayConfig
from tests import mockutil
from tests.gatewayutil import Gateway, running_gateway, wait_until
from tests.kmockutil import NS, KubeApi, pod

LBL = {"app": "llm"}
CHAT = "/v1/chat/completions"
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class PodFleet:
    """Pods in the emulated API, each backed by one mock worker on its own loopback IP."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.mocks: dict[str, mockutil.MockWorkers] = {}
        self.urls: dict[str, str] = {}

    def start(
        self,
        name: str,
        ip: str,
        *,
        ready: bool = True,
        namespace: str = NS,
        annotations: dict[str, str] | None = None,
        **labels: str,
    ) -> str:
        mocks = mockutil.start_mock_workers(1, "--host", ip)
        self.mocks[name] = mocks
        port = mocks.url.rsplit(":", 1)[1]
        self.urls[name] = f"http://{ip}:{port}"
        assert mocks.url == self.urls[name]
        self.api.create(
            pod(
                name,
                ip,
                labels or LBL,
                ready=ready,
                namespace=namespace,
                annotations={**(annotations or {}), "smg.ai/worker-ports": port},
            )
        )
        return self.urls[name]

    def served(self, name: str) -> int:
        return int(mockutil.stats(self.urls[name])["requests_by_route"].get(CHAT, 0))

    def stop_all(self) -> None:
        for mocks in self.mocks.values():
            mocks.stop()


@contextlib.contextmanager
def cluster(
    tmp_path: Path,
    extra: tuple[str, ...] = ("--service-discovery-namespace", NS),
    selector: tuple[str, ...] = ("--selector", "app=llm"),
) -> Iterator[tuple[KubeApi, PodFleet, Gateway]]:
    with KubeApi() as api:
        fleet = PodFleet(api)
        args = ["--service-discovery", *selector, "--policy", "round_robin", *extra]
        env = {"KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kubeconfig"))}
        try:
            with running_gateway(args, processes=2, env=env) as gw:
                yield api, fleet, gw
        finally:
            fleet.stop_all()


def workers(gw: Gateway) -> dict[str, dict[str, Any]]:
    """The gateway's ready workers by URL."""
    answer = httpx.get(gw.url + "/workers", timeout=5).json()
    return {w["url"]: w for w in answer["workers"] if w["status"] == "ready"}


def serving(gw: Gateway, urls: set[str]) -> None:
    wait_until(lambda: set(workers(gw)) == urls, 20, f"the gateway serving exactly {urls}")


def chat(client: httpx.Client) -> int:
    return client.post(CHAT, json=BODY).status_code


def test_requests_follow_the_pods(tmp_path: Path) -> None:
    with cluster(tmp_path) as (api, fleet, gw):
        w1 = fleet.start("w1", "127.0.0.21")
        w2 = fleet.start("w2", "127.0.0.22", ready=False)
        fleet.start("web", "127.0.0.23", app="web")  # not selected
        serving(gw, {w1})
        labels = workers(gw)[w1]["labels"]
        assert labels["smg.ai/pod-name"] == "w1"
        assert labels["smg.ai/pod-uid"] == "uid-w1"
        assert labels["smg.ai/discovery-provider"] == "kubernetes"
        assert labels["smg.ai/discovery-id"] == "uid-w1:" + w1.rsplit(":", 1)[1]  # as 1.13
        with gw.client() as client:
            assert [chat(client) for _ in range(6)] == [200] * 6
            assert (fleet.served("w1"), fleet.served("w2"), fleet.served("web")) == (6, 0, 0)

            api.set_ready("w2", True)
            serving(gw, {w1, w2})
            assert [chat(client) for _ in range(20)] == [200] * 20
            assert fleet.served("w2") > 0 and fleet.served("w1") + fleet.served("w2") == 26

            api.patch("w1", {"metadata": {"labels": {"app": "retired"}}})
            serving(gw, {w2})
            before = fleet.served("w1")
            assert [chat(client) for _ in range(6)] == [200] * 6
            assert fleet.served("w1") == before

            # Unready (its readiness probe failing): drained and removed, as the 1.13
            # binary does; Ready again: back.
            api.set_ready("w2", False)
            api.patch("w1", {"metadata": {"labels": {"app": "llm"}}})
            serving(gw, {w1})
            api.set_ready("w2", True)
            serving(gw, {w1, w2})
        assert 'smg_discovery_workers_discovered{source="kubernetes"} 2' in gw.metrics()


class Load:
    """Chat requests back to back from a few threads until stopped: every status kept."""

    def __init__(self, gw: Gateway, threads: int = 3) -> None:
        self.gw = gw
        self.statuses: list[int | str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with self.gw.client(timeout=10) as client:
            for _ in range(20_000):  # bounded; stopped long before
                if self._stop.is_set():
                    return
                try:
                    self.statuses.append(chat(client))
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def test_a_rolling_replacement_of_every_worker_fails_no_request(tmp_path: Path) -> None:
    with cluster(tmp_path) as (api, fleet, gw):
        old = {"a1": fleet.start("a1", "127.0.0.31"), "a2": fleet.start("a2", "127.0.0.32")}
        serving(gw, set(old.values()))
        new: dict[str, str] = {}
        frozen: dict[str, int] = {}
        with Load(gw) as load:
            for (old_name, old_url), (name, ip) in zip(
                old.items(), [("b1", "127.0.0.41"), ("b2", "127.0.0.42")], strict=True
            ):
                # The surge pod first, Ready; then the old one is deleted with a grace
                # period (its deletionTimestamp drains it; the pod goes after).
                new[name] = fleet.start(name, ip)
                serving(gw, {*old.values(), *new.values()} - set(frozen_urls(old, frozen)))
                api.patch(old_name, {"metadata": {"finalizers": ["kubernetes/grace"]}})
                api.delete(old_name)
                left = {*old.values(), *new.values()} - {old_url, *frozen_urls(old, frozen)}
                serving(gw, left)
                frozen[old_name] = fleet.served(old_name)
                api.patch(old_name, {"metadata": {"finalizers": []}})  # the pod is gone
            time.sleep(0.5)  # requests on the new fleet alone
        assert load.statuses, "no request was sent"
        failed = [s for s in load.statuses if s != 200]
        assert failed == [], f"{len(failed)} of {len(load.statuses)} requests failed: {failed[:5]}"
        assert len(load.statuses) >= 30
        # After each old worker left the gateway's list, no request reached it.
        assert {n: fleet.served(n) for n in old} == frozen
        assert all(fleet.served(n) > 0 for n in new)
        assert set(workers(gw)) == set(new.values())


def frozen_urls(old: dict[str, str], frozen: dict[str, int]) -> list[str]:
    return [old[name] for name in frozen]


def test_model_id_from_a_label_across_all_namespaces(tmp_path: Path) -> None:
    """No --service-discovery-namespace: every namespace (GET /api/v1/pods). The model id
    from the pod's label replaces the one the worker reports, as in the 1.13 binary (same
    pods, same answers: llama-x 200, the worker's own mock-model 404)."""
    with cluster(tmp_path, ("--model-id-from", "label:model")) as (api, fleet, gw):
        url = fleet.start("w1", "127.0.0.51", namespace="team-a", app="llm", model="llama-x")
        serving(gw, {url})
        assert workers(gw)[url]["model_id"] == "llama-x"
        with gw.client() as client:
            ok = client.post(CHAT, json={**BODY, "model": "llama-x"})
            assert ok.status_code == 200 and ok.json()["model"] == "llama-x"
            gone = client.post(CHAT, json=BODY)
            assert gone.status_code == 404
            assert gone.json()["error"]["code"] == "model_not_found"
        paths = {path for method, path, _ in api.requests() if method == "GET"}
        assert paths == {"/api/v1/pods"}


@pytest.mark.skipif(
    "pd_disaggregation" not in GatewayConfig.__struct_fields__,
    reason="PD disaggregation (issue 17, g-pc) is not in this tree yet",
)
def test_pd_roles_from_the_prefill_and_decode_selectors(tmp_path: Path) -> None:
    """--pd-disaggregation: prefill/decode pods by their selectors, the prefill's bootstrap
    port from `sglang.ai/bootstrap-port` (a decode gets none), the labelSelector the labels
    both role selectors share; as the 1.13 binary shows the same pods in /workers."""
    pd = ("--pd-disaggregation", "--service-discovery-namespace", NS)
    pd += ("--prefill-selector", "app=llm role=prefill", "--decode-selector", "app=llm role=decode")
    boot = {"sglang.ai/bootstrap-port": "8998"}
    with cluster(tmp_path, pd, selector=()) as (api, fleet, gw):
        pre = fleet.start("pre", "127.0.0.61", annotations=boot, app="llm", role="prefill")
        dec = fleet.start("dec", "127.0.0.62", annotations=boot, app="llm", role="decode")
        fleet.start("other", "127.0.0.63", app="llm", role="router")  # neither role
        serving(gw, {pre, dec})
        shown = {u: (w["worker_type"], w.get("bootstrap_port")) for u, w in workers(gw).items()}
        assert shown == {pre: ("prefill", 8998), dec: ("decode", None)}
        selectors = {q.get("labelSelector") for m, _, q in api.requests() if m == "GET"}
        assert selectors == {"app=llm"}
