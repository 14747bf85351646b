"""An in-memory Kubernetes API (kmock's KubernetesEmulator) on a loopback port, for tests.

It runs in its own thread's event loop, so both in-process asyncio tests and a
subprocess (`smg launch` given KUBECONFIG=api.kubeconfig) can talk to it. The test drives
it over HTTP like kubectl (create, merge-patch, delete pods) and reads back the requests
it received (`api.requests()`: method, path, query).

kmock quirks: it ignores labelSelector, resourceVersion and timeoutSeconds (a watch
replays every existing object as ADDED, then follows changes); a DELETE of a pod with
finalizers only sets deletionTimestamp (a graceful deletion), removing them deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import kmock

from tests.gatewayutil import free_port

NS = "llm"


def pod(
    name: str,
    ip: str | None,
    labels: Mapping[str, str],
    *,
    ready: bool = True,
    uid: str | None = None,
    annotations: Mapping[str, str] | None = None,
    namespace: str = NS,
    rv: int = 1,
    finalizers: list[str] | None = None,
) -> dict[str, Any]:
    """A pod as the API returns it (only the fields discovery reads)."""
    status: dict[str, Any] = {
        "phase": "Running" if ready else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"uid-{name}",
        "labels": dict(labels),
        "resourceVersion": str(rv),
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    if finalizers:
        meta["finalizers"] = finalizers
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


class KubeApi:
    """kmock's emulator served on 127.0.0.1:<free port> from a background thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._started: Future[None] = Future()
        self._stop: asyncio.Event | None = None
        self.emulator: Any = None
        self._rv = 100
        self.faults: list[str] = []
        self.list_faults: list[str] = []

    def start(self) -> KubeApi:
        self._thread.start()
        self._served = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        self._started.result(timeout=10)
        return self

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with (
                kmock.KubernetesEmulator() as emulator,
                kmock.Server(emulator, host="127.0.0.1", port=self.port),
            ):
                emulator.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True)
                # Faults first, for a watch while one is queued (a reaction whose payload
                # declines is disabled for good: the filter decides instead).
                emulator[self._faulted] << self._react
                emulator[self._list_faulted] << self._react_list
                self.emulator = emulator
                self._started.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    def _faulted(self, request: Any) -> bool:
        return request.action == kmock.action.WATCH and bool(self.faults)

    def _react(self, request: Any) -> Any:
        fault = self.faults.pop(0)
        if fault == "gone":  # the resourceVersion watched from expired: an ERROR event
            status = {"kind": "Status", "code": 410, "reason": "Expired",
                      "message": "too old resource version: 1 (200)"}  # fmt: skip
            return ({"type": "ERROR", "object": status},)
        if fault == "end":  # the stream ends (a dropped connection, a server timeout)
            bookmark = {"kind": "Pod", "metadata": {"resourceVersion": self._next_rv()}}
            return ({"type": "BOOKMARK", "object": bookmark},)
        raise AssertionError(f"unknown fault {fault!r}")

    def _list_faulted(self, request: Any) -> bool:
        return request.action == kmock.action.LIST and bool(self.list_faults)

    def _react_list(self, request: Any) -> Any:
        fault = self.list_faults.pop(0)
        if fault == "paged":  # page one holds the first pod; the emulator serves the rest
            items = [o.raw for o in self.emulator.objects.values() if not o.deleted][:1]
            meta = {"resourceVersion": "...", "continue": "page-2"}
            return {"kind": "PodList", "metadata": meta, "items": items}
        if fault == "forbidden":  # RBAC: the service account may not list pods
            status = {"kind": "Status", "code": 403, "reason": "Forbidden",
                      "message": 'pods is forbidden: User "system:serviceaccount:llm:smg" '
                                 'cannot list resource "pods"'}  # fmt: skip
            return kmock.Response(status=403, payload=status)
        raise AssertionError(f"unknown list fault {fault!r}")

    def list_fault(self, *faults: str) -> None:
        """The next list requests get these, in order: "paged" (a continue token),
        "forbidden" (403)."""
        self.run(lambda: self.list_faults.extend(faults))

    def fault(self, *faults: str) -> None:
        """The next watch requests get these, in order: "gone" (410), "end" (EOF)."""
        self.run(lambda: self.faults.extend(faults))

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            with contextlib.suppress(Exception):
                self._served.result(timeout=10)  # the server and its client closed

        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> KubeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call `fn` on the emulator's loop (to add reactions safely)."""

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [
                        {
                            "name": "kmock",
                            "context": {"cluster": "kmock", "user": "test", "namespace": NS},
                        }
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return path

    # -- kubectl-like writes ---------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def create(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = self._next_rv()
        ns = obj["metadata"]["namespace"]
        r = httpx.post(f"{self.url}/api/v1/namespaces/{ns}/pods", json=obj, timeout=5)
        assert r.status_code in (200, 201), r.text

    def patch(self, name: str, patch: dict[str, Any], namespace: str = NS) -> None:
        patch.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
        r = httpx.patch(
            f"{self.url}/api/v1/namespaces/{namespace}/pods/{name}",
            content=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
            timeout=5,
        )
        assert r.status_code == 200, r.text

    def set_ready(self, name: str, ready: bool, namespace: str = NS) -> None:
        status = {
            "phase": "Running" if ready else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        self.patch(name, {"status": status}, namespace)

    def delete(self, name: str, namespace: str = NS) -> None:
        r = httpx.delete(f"{self.url}/api/v1/namespaces/{namespace}/pods/{name}", timeout=5)
        assert r.status_code == 200, r.text

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(METHOD, path, query) of every request the API received, in order."""

        def read() -> list[tuple[str, str, dict[str, str]]]:
            return [(r.method.value, r.url.path, dict(r.params)) for r in self.emulator]

        return self.run(read)
