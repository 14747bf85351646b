"""smg.discovery.kubernetes against kmock's in-memory Kubernetes API on loopback: the
list/watch informer feeds the reconciler (a recording fake here) the workers the pods
call for; a broken watch resumes, a 410 relists; the Helm chart's Role grants exactly
the verbs the provider uses."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from smg.discovery.kubepods import KubeRules
from smg.discovery.kubernetes import KubernetesDiscovery, load_client_config
from smg.workers_spec import WorkerSpec
from tests.kmockutil import NS, KubeApi, pod

LBL = {"app": "llm"}
RULES = KubeRules(selector=LBL, port=8000, namespace=NS)


class RecordingSink:
    """Stands in for Reconciler: keeps each desired set applied and each failure."""

    def __init__(self) -> None:
        self.applied: list[dict[str, WorkerSpec]] = []
        self.failures: list[str] = []

    async def apply(self, source: str, desired: Mapping[str, WorkerSpec]) -> None:
        assert source == "kubernetes"
        self.applied.append(dict(desired))

    def failed(self, source: str, reason: str, kind: str = "invalid") -> None:
        assert source == "kubernetes"
        self.failures.append(reason)

    def current(self) -> list[str]:
        """The URLs of the last set applied."""
        return sorted(s.url for s in self.applied[-1].values()) if self.applied else []


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def running(
    api: KubeApi,
    tmp_path: Path,
    body: Callable[[KubernetesDiscovery, RecordingSink], Awaitable[None]],
    rules: KubeRules = RULES,
    wait_synced: bool = True,
) -> RecordingSink:
    """Run discovery (client from a kubeconfig naming `api`) around `body`."""
    sink = RecordingSink()

    async def main() -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
            mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            client = await load_client_config()
        disc = KubernetesDiscovery(rules, sink, interval=0.5, debounce=0.05, api_client=client)
        task = asyncio.create_task(disc.run())
        try:
            if wait_synced:
                await until(lambda: disc.synced or task.done(), "the first list")
            await body(disc, sink)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
        if task.done() and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]

    asyncio.run(main())
    return sink


W = "127.0.0.{}:8000"  # bare, as the provider hands it on (the reconciler detects)


def test_pods_created_made_ready_relabelled_and_deleted_gracefully(tmp_path: Path) -> None:
    with KubeApi() as api:
        api.create(pod("w1", "127.0.0.11", LBL))
        api.create(pod("w2", "127.0.0.12", LBL, ready=False))
        api.create(pod("web", "127.0.0.13", {"app": "web"}))

        async def body(disc: KubernetesDiscovery, sink: RecordingSink) -> None:
            await until(lambda: sink.current() == [W.format(11)], "w1 only")
            spec = sink.applied[-1]["uid-w1:8000"]
            assert spec.labels == {"smg.ai/pod-name": "w1", "smg.ai/pod-uid": "uid-w1"}
            api.set_ready("w2", True)
            await until(lambda: sink.current() == [W.format(11), W.format(12)], "w2 ready")
            api.patch("w1", {"metadata": {"labels": {"app": "other"}}})
            await until(lambda: sink.current() == [W.format(12)], "w1 relabelled away")
            # A graceful deletion: deletionTimestamp first (kmock: a finalizer holds the
            # pod), the worker leaves at once; the DELETED event later changes nothing.
            api.patch("w2", {"metadata": {"finalizers": ["test/grace"]}})
            api.delete("w2")
            await until(lambda: sink.current() == [], "w2 drained at deletionTimestamp")
            assert any("w2" in str(k) for k in disc.pods)  # still terminating
            api.patch("w2", {"metadata": {"finalizers": []}})
            await until(lambda: not any(k[1] == "w2" for k in disc.pods), "w2 gone")
            assert sink.current() == []
            assert sink.failures == []

        running(api, tmp_path, body)
        reqs = api.requests()
    lists = [q for m, p, q in reqs if m == "GET" and p == f"/api/v1/namespaces/{NS}/pods"]
    assert lists[0].get("labelSelector") == "app=llm"
    assert "watch" not in lists[0]
    watches = [q for q in lists if q.get("watch") == "true"]
    assert watches and all(q["labelSelector"] == "app=llm" for q in watches)


def test_a_broken_watch_resumes_from_the_last_resource_version(tmp_path: Path) -> None:
    with KubeApi() as api:
        api.create(pod("w1", "127.0.0.11", LBL))

        async def body(disc: KubernetesDiscovery, sink: RecordingSink) -> None:
            await until(lambda: sink.current() == [W.format(11)], "w1")
            api.create(pod("w2", "127.0.0.12", LBL))  # seen by the resumed watch
            await until(lambda: sink.current() == [W.format(11), W.format(12)], "w2")

        api.fault("end")  # the first watch ends after one bookmark (resourceVersion 102)
        api.list_fault("paged")  # and the list comes in two pages
        running(api, tmp_path, body)
        reqs = api.requests()
    watches = [q for m, _, q in reqs if q.get("watch") == "true"]
    lists = [q for m, _, q in reqs if m == "GET" and "watch" not in q]
    # One list, in two pages (limit 500, then the continue token), never relisted.
    assert lists == [
        {"labelSelector": "app=llm", "limit": "500"},
        {"labelSelector": "app=llm", "limit": "500", "continue": "page-2"},
    ]
    assert len(watches) >= 2
    # The first watch starts at the list's version; the second resumes from the version
    # of the bookmark that ended the first.
    assert watches[0]["resourceVersion"] == "..."  # kmock's list resourceVersion
    assert watches[1]["resourceVersion"] == "102"  # w1 was 101, the bookmark 102


def test_a_410_gone_relists(tmp_path: Path) -> None:
    with KubeApi() as api:
        api.create(pod("w1", "127.0.0.11", LBL))
        api.fault("gone")

        async def body(disc: KubernetesDiscovery, sink: RecordingSink) -> None:
            await until(lambda: len(lists_seen(api)) >= 2, "a relist after 410")
            await until(lambda: sink.current() == [W.format(11)], "w1")
            assert sink.failures == []  # a 410 is routine, not an error

        running(api, tmp_path, body)


def test_an_api_error_is_reported_backed_off_and_recovered_from(tmp_path: Path) -> None:
    with KubeApi() as api:
        api.create(pod("w1", "127.0.0.11", LBL))
        api.list_fault("forbidden", "forbidden")

        async def body(disc: KubernetesDiscovery, sink: RecordingSink) -> None:
            await until(lambda: sink.current() == [W.format(11)], "w1 after two 403s")

        sink = running(api, tmp_path, body, wait_synced=False)
        lists = lists_seen(api)
    assert len(sink.failures) == 2
    assert sink.failures[0].startswith("RuntimeError: list answered 403")
    assert "cannot list resource" in sink.failures[0]
    assert len(lists) == 3  # two refused, then one (0.5 s and 1 s apart: backed off)


def lists_seen(api: KubeApi) -> list[dict[str, str]]:
    return [q for m, _, q in api.requests() if m == "GET" and "watch" not in q]


# A request to the API -> the RBAC verb it needs (kmock classifies GETs by path/query).
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create",
         "UPDATE": "patch", "DELETE": "delete"}  # fmt: skip


def test_the_charts_role_grants_exactly_the_verbs_discovery_uses(tmp_path: Path) -> None:
    """Every path of the informer (list, watch, a watch that ends and resumes, a 410 and
    its relist) against the API; the verbs of the requests it made are the Role's."""
    with KubeApi() as api:
        api.create(pod("w1", "127.0.0.11", LBL))
        api.fault("end", "gone")
        before = len(api.requests())  # the test's own writes are not discovery's

        async def body(disc: KubernetesDiscovery, sink: RecordingSink) -> None:
            await until(lambda: len(lists_seen(api)) >= 2, "a relist after 410")
            await until(lambda: sink.current() == [W.format(11)], "w1")

        running(api, tmp_path, body)
        used = api.run(lambda: [r.action.value for r in api.emulator][before:])
    verbs = sorted({VERBS[a] for a in used})
    assert verbs == ["list", "watch"]
    manifests = (Path(__file__).parents[1] / "deploy" / "kubernetes" / "smg.yaml").read_text()
    roles = [d for d in yaml.safe_load_all(manifests) if d and d.get("kind") == "Role"]
    assert [r["rules"] for r in roles] == [
        [{"apiGroups": [""], "resources": ["pods"], "verbs": verbs}]
    ]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.mark.parametrize("trusted", [True, False])
def test_in_cluster_config_uses_the_service_accounts_token_and_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    """KUBERNETES_SERVICE_HOST/PORT set: https to that address, verified against the
    service account's ca.crt, with its token as the bearer (kmock behind a TLS proxy)."""
    trustme = pytest.importorskip("trustme")
    ca, stranger = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token-1")
    (ca if trusted else stranger).cert_pem.write_to_path(str(sa / "ca.crt"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    sink = RecordingSink()
    with KubeApi() as api:
        api.create(pod("w1", "127.0.0.11", LBL))

        async def main() -> None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(ctx)

            async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
                ur, uw = await asyncio.open_connection("127.0.0.1", api.port)
                await asyncio.gather(_pipe(cr, uw), _pipe(ur, cw), return_exceptions=True)

            server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
            port = server.sockets[0].getsockname()[1]
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
            client = await load_client_config(str(sa))
            disc = KubernetesDiscovery(RULES, sink, interval=0.5, debounce=0.05, api_client=client)
            task = asyncio.create_task(disc.run())
            try:
                if trusted:
                    await until(lambda: sink.current() == [W.format(11)], "w1 over TLS")
                else:
                    await until(lambda: sink.failures, "a refused certificate")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await client.close()
                server.close()

        asyncio.run(main())
        auth = api.run(lambda: [r.headers.get("Authorization") for r in api.emulator][1:])
    if trusted:
        assert auth and set(auth) == {"Bearer sa-token-1"}
        assert sink.failures == []
    else:
        assert auth == []  # nothing reached the API
        assert "CERTIFICATE_VERIFY_FAILED" in sink.failures[0]
