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

    def start(self) -> KubeApi:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
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
                self.emulator = emulator
                self._started.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

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
            return [(str(r.method).upper(), str(r.url.path), dict(r.params)) for r in self.emulator]

        return self.run(read)
