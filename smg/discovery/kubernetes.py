"""Kubernetes pod discovery: list, then watch the pods, and hand the control plane's
reconciler the workers they call for (smg.discovery.kubepods has the pure rules).

The loop, as 1.13's level-triggered informer (model_gateway/src/service_discovery.rs):
- LIST pods (the namespace, or every namespace without --service-discovery-namespace;
  the labelSelector pushed down to the API), keep them by namespace/name, then WATCH
  from the list's resourceVersion. Each event updates the store and asks for a pass.
- A watch that ends (its server-side timeout, a dropped connection) resumes from the last
  resourceVersion seen; a 410 Gone (that version expired) or any other API error
  relists. Errors back off (0.5 s doubling to 30 s) and are reported to
  `sink.failed("kubernetes", reason)`.
- A pass computes the desired workers from the whole store and calls
  `sink.apply("kubernetes", desired)`; passes run on change (bursts coalesced over
  `debounce` seconds, 1 s as 1.13) and every `interval` seconds (60 s, 1.13's fixed
  value), so a failed add is retried without any new event.

Only `list` and `watch` on pods are used: deploy/helm's Role grants exactly those
(tests/test_discovery_kubernetes.py checks it against the requests made).
The client is kubernetes_asyncio: in-cluster config (the service account's token and CA)
when KUBERNETES_SERVICE_HOST is set, else the kubeconfig (KUBECONFIG or ~/.kube/config).
Watch streams are read raw (`_preload_content=False`): the pods stay the API's JSON (no
model objects), and `watch=true` is sent lowercase as the API spells it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

from smg.config import GatewayConfig, selector_map
from smg.discovery.kubepods import KubeRules, ModelIdFrom, desired_workers
from smg.workers_spec import WorkerSpec

log = logging.getLogger("smg.discovery.kubernetes")

SOURCE = "kubernetes"
# 1.13 reconciles its pod store every 60 s besides each change (fixed: its
# --discovery-check-interval-secs is the file provider's).
CHECK_INTERVAL_SECS = 60.0
WATCH_TIMEOUT_SECS = 290  # server-side end of each watch, as 1.13 asks (then we rewatch)
LIST_PAGE = 500
MIN_WATCH_SECS = 5.0  # a watch ending sooner counts as a failing one (backed off)
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0


class Sink(Protocol):
    """What the provider feeds: smg.discovery.reconcile.Reconciler."""

    async def apply(self, source: str, desired: Mapping[str, WorkerSpec]) -> None: ...

    def failed(self, source: str, reason: str, kind: str = "invalid") -> None: ...


def rules_from_config(cfg: GatewayConfig) -> KubeRules:
    """The pod rules from the discovery flags (validated by smg.config)."""
    raw = cfg.model_id_from
    return KubeRules(
        selector=selector_map(cfg.selector),
        port=cfg.service_discovery_port,
        namespace=cfg.service_discovery_namespace,
        pd=bool(getattr(cfg, "pd_disaggregation", False)),
        prefill_selector=selector_map(cfg.prefill_selector),
        decode_selector=selector_map(cfg.decode_selector),
        model_id_from=ModelIdFrom.parse(raw) if raw else None,
    )


async def run(cfg: GatewayConfig, sink: Sink) -> None:
    """The provider's task in the control plane (smg.discovery.provider_coroutine)."""
    rules = rules_from_config(cfg)
    log.info(
        "kubernetes discovery: namespace %s, labelSelector %r, every %.0fs",
        rules.namespace or "(all)",
        rules.list_label_selector(),
        CHECK_INTERVAL_SECS,
    )
    await KubernetesDiscovery(rules, sink, interval=CHECK_INTERVAL_SECS).run()


class WatchExpired(Exception):
    """410 Gone: the resourceVersion watched from is too old; relist."""


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


async def load_client_config(service_account_dir: str = SERVICE_ACCOUNT_DIR) -> Any:
    """A kubernetes_asyncio ApiClient: in a pod (KUBERNETES_SERVICE_HOST set) the service
    account's token and CA (the token reread as the kubelet rotates it), else the
    kubeconfig (KUBECONFIG, else ~/.kube/config)."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(
            client_configuration=configuration,
            token_filename=os.path.join(service_account_dir, "token"),
            cert_filename=os.path.join(service_account_dir, "ca.crt"),
        )
    else:
        # KUBECONFIG read now: the library reads it once, at import.
        await config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return client.ApiClient(configuration)


def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class KubernetesDiscovery:
    """The pod informer feeding `sink`; `run()` until cancelled."""

    def __init__(
        self,
        rules: KubeRules,
        sink: Sink,
        interval: float = 30.0,
        debounce: float = 1.0,
        api_client: Any = None,
    ) -> None:
        self.rules = rules
        self.sink = sink
        self.interval = interval
        self.debounce = debounce
        self._api_client = api_client
        self.pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.synced = False  # the first list has landed
        self._changed = asyncio.Event()
        self.passes = 0

    # -- API calls -------------------------------------------------------------------

    def _call(self, core: Any, **kwargs: Any) -> Any:
        selector = self.rules.list_label_selector()
        if selector:
            kwargs["label_selector"] = selector
        if self.rules.namespace:
            return core.list_namespaced_pod(self.rules.namespace, **kwargs)
        return core.list_pod_for_all_namespaces(**kwargs)

    async def _list(self, core: Any) -> str:
        """The whole pod list, in pages of LIST_PAGE (1.13 pages by 500 too); the store is
        replaced only once every page has arrived."""
        pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        token = ""
        for _page in range(100_000):  # bounded: a list never has that many pages
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            resp = await self._call(core, **kwargs)
            try:
                raw = await resp.read()
                if resp.status == 410:  # the continue token expired: start over
                    raise WatchExpired("list continue token expired")
                if resp.status != 200:
                    raise RuntimeError(f"list answered {resp.status}: {raw[:200]!r}")
                body = json.loads(raw)
            finally:
                resp.release()
            pods.update((_key(p), p) for p in body.get("items") or ())
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                break
        self.pods = pods
        self.synced = True
        self._changed.set()
        return str(meta.get("resourceVersion") or "")

    async def _watch(self, core: Any, version: str) -> str:
        """Follow one watch stream; returns the last resourceVersion seen when it ends."""
        kwargs: dict[str, Any] = {
            "watch": "true",  # lowercase: the query the API (and kmock) expects
            "allow_watch_bookmarks": "true",
            "timeout_seconds": WATCH_TIMEOUT_SECS,
            "_preload_content": False,
        }
        if version:
            kwargs["resource_version"] = version
        resp = await self._call(core, **kwargs)
        try:
            if resp.status == 410:
                raise WatchExpired(f"watch from resourceVersion {version!r}: 410 Gone")
            if resp.status != 200:
                raise RuntimeError(f"watch answered {resp.status}: {(await resp.read())[:200]!r}")
            while True:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                # lands as a line arrives, and the task would then read on forever.
                async with asyncio.timeout(WATCH_TIMEOUT_SECS + 30):
                    line = await resp.content.readline()
                if not line:
                    return version
                if line.strip():
                    version = self._event(json.loads(line), version)
        finally:
            resp.release()

    def _event(self, event: Mapping[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(str(obj.get("message") or "410 Gone"))
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self.pods[_key(obj)] = obj
            self._changed.set()
        elif kind == "DELETED":
            old = self.pods.get(_key(obj))
            uid = (obj.get("metadata") or {}).get("uid")
            if old is not None and (old.get("metadata") or {}).get("uid") in (None, uid):
                del self.pods[_key(obj)]
                self._changed.set()
        return str(rv) if rv else version

    # -- loops -----------------------------------------------------------------------

    async def _informer(self) -> None:
        from kubernetes_asyncio import client

        api = self._api_client
        backoff = BACKOFF_START
        version = ""
        try:
            while True:
                started = time.monotonic()
                try:
                    if api is None:  # a missing or bad kubeconfig is retried like the API
                        api = await load_client_config()
                    core = client.CoreV1Api(api)
                    if not version:
                        version = await self._list(core)
                        log.info("kubernetes discovery: listed %d pod(s)", len(self.pods))
                    version = await self._watch(core, version)
                except asyncio.CancelledError:
                    raise
                except WatchExpired as exc:
                    log.info("kubernetes discovery: %s; relisting", exc)
                    version = ""
                except Exception as exc:  # any API or connection error: back off, relist
                    reason = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("kubernetes discovery: %s; retrying in %.1fs", reason, backoff)
                    self.sink.failed(SOURCE, reason, "unreadable")
                    version = ""
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                # A watch that ran a while (its timeout, a dropped connection, a 410):
                # again at once. One ending as soon as it began, again and again (a proxy
                # closing it, a 410 on every watch), backs off instead of spinning.
                if time.monotonic() - started >= MIN_WATCH_SECS:
                    backoff = BACKOFF_START
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            if api is not None and self._api_client is None:
                await api.close()

    async def _reconciler(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval):  # (not wait_for: see _watch)
                    await self._changed.wait()
            except TimeoutError:
                pass  # the periodic pass
            else:
                await asyncio.sleep(self.debounce)  # coalesce a burst (a rollout, a relist)
            if not self.synced:
                continue  # never reconcile an empty store before the first list
            self._changed.clear()
            await self.reconcile()

    async def reconcile(self) -> None:
        """One pass: the desired workers from the whole store, to the sink."""
        desired = desired_workers(self.pods.values(), self.rules)
        self.passes += 1
        try:
            await self.sink.apply(SOURCE, desired)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next pass retries
            log.exception("kubernetes discovery: apply failed")
            self.sink.failed(SOURCE, f"apply: {type(exc).__name__}: {exc}"[:300])

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._informer())
            group.create_task(self._reconciler())
