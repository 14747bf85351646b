"""smg.discovery.reconcile: the pure plan, and the Reconciler against a real registry (an
in-memory worker table; registration and drain-then-remove are the test's own, as the
control plane's would be)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from smg.control.registry import Registry, WorkerRecord
from smg.control.worker_state import HealthThresholds, WorkerStatus
from smg.discovery.reconcile import (
    HASH_LABEL,
    ID_LABEL,
    SOURCE_LABEL,
    Plan,
    Reconciler,
    mark,
    plan,
    spec_hash,
)
from smg.promtext import Family
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec, validate_worker_spec


def test_plan_adds_new_removes_gone_and_replaces_changed() -> None:
    current = {"a": "h1", "b": "h2", "c": "h3"}
    desired = {"a": "h1", "b": "h2x", "d": "h4"}
    assert plan(current, desired) == Plan(add=("b", "d"), remove=("b", "c"))
    assert plan(current, current) == Plan(add=(), remove=())
    assert plan({}, {"z": "1", "y": "2"}) == Plan(add=("y", "z"), remove=())
    assert plan({"z": "1"}, {}) == Plan(add=(), remove=("z",))


def test_spec_hash_ignores_own_labels_and_label_order() -> None:
    spec = WorkerSpec(url="http://127.0.0.1:1", labels={"b": "2", "a": "1"})
    same = WorkerSpec(url="http://127.0.0.1:1", labels={"a": "1", "b": "2"})
    assert spec_hash(spec) == spec_hash(same)
    marked = mark(spec, "file", "w1")
    assert marked.labels[SOURCE_LABEL] == "file"
    assert marked.labels[ID_LABEL] == "w1"
    assert marked.labels[HASH_LABEL] == spec_hash(spec) == spec_hash(marked)
    assert len(marked.labels[HASH_LABEL]) == 64
    assert spec_hash(WorkerSpec(url="http://127.0.0.1:1", model_id="m")) != spec_hash(
        WorkerSpec(url="http://127.0.0.1:1")
    )


class Harness:
    """A Reconciler over a real Registry; removal waits for `drained` when it is cleared."""

    def __init__(self, detect: Any = None) -> None:
        table = WorkerTable.create(8, 2, supervisor_pid=1, anonymous=False)
        self.registry = Registry(table, HealthThresholds(), health_check_disabled=True)
        self.tasks: list[asyncio.Task[Any]] = []
        self.drained = asyncio.Event()
        self.drained.set()
        self.removed: list[str] = []
        self.reconciler = Reconciler(
            self.registry,
            self.registry.add,
            self.remove,
            self.spawn,
            drain_wait_secs=5.0,
            **({} if detect is None else {"detect": detect, "detect_timeout_secs": 0.5}),
        )

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    async def remove(self, record: WorkerRecord) -> None:
        await self.drained.wait()
        self.registry.remove(record.worker_id)
        self.removed.append(record.spec.url)

    async def settle(self) -> None:
        for _ in range(100):
            pending = [t for t in self.tasks if not t.done()]
            if not pending:
                return
            await asyncio.wait(pending, timeout=0.1)
        raise AssertionError("reconciler tasks did not finish")

    def urls(self) -> dict[str, tuple[str | None, str | None, str]]:
        return {
            r.spec.url: (
                r.spec.labels.get(SOURCE_LABEL),
                r.spec.labels.get(ID_LABEL),
                r.status.label,
            )
            for r in self.registry.workers.values()
        }


def _sync(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest asyncio plugin here)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


def _spec(url: str, **fields: Any) -> WorkerSpec:
    return WorkerSpec(url=url, **fields)


def _family(families: list[Family], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    (family,) = [f for f in families if f.name == name]
    return {(s.suffix, *s.labels): s.value for s in family.samples}  # type: ignore[misc]


@_sync
async def test_apply_adds_then_is_idempotent() -> None:
    h = Harness()
    await h.reconciler.apply(
        "file", {"w1": _spec("http://127.0.0.1:9001"), "w2": _spec("http://127.0.0.2:9002")}
    )
    await h.settle()
    assert h.urls() == {
        "http://127.0.0.1:9001": ("file", "w1", "ready"),
        "http://127.0.0.2:9002": ("file", "w2", "ready"),
    }
    ids = set(h.registry.workers)
    await h.reconciler.apply(
        "file", {"w1": _spec("http://127.0.0.1:9001"), "w2": _spec("http://127.0.0.2:9002")}
    )
    await h.settle()
    assert set(h.registry.workers) == ids  # nothing re-registered
    families = h.reconciler.families()
    assert _family(families, "smg_discovery_registrations_total") == {
        ("", ("source", "file"), ("result", "success")): 2
    }
    assert _family(families, "smg_discovery_workers_discovered") == {("", ("source", "file")): 2}
    sync = _family(families, "smg_discovery_sync_duration_seconds")
    # Timed: the sync that changed something (as 1.13), not the idempotent one.
    assert sync[("_count", ("source", "file"))] == 1
    assert sync[("_bucket", ("source", "file"), ("le", "+Inf"))] == 1
    assert sync[("_bucket", ("source", "file"), ("le", "7200"))] == 1
    assert len(sync) == 29 + 1 + 2  # 1.13's 29 bounds, +Inf, then _sum and _count
    (last,) = _family(families, "smg_discovery_last_sync_timestamp_seconds").values()
    assert last > 1.7e9


@_sync
async def test_changed_spec_is_drained_then_registered_again() -> None:
    h = Harness()
    await h.reconciler.apply("file", {"w1": _spec("http://127.0.0.1:9001")})
    await h.settle()
    (old,) = h.registry.workers.values()
    h.drained.clear()  # the old worker has a request in flight: its drain waits
    await h.reconciler.apply("file", {"w1": _spec("http://127.0.0.1:9001", model_id="m2")})
    await asyncio.sleep(0.2)
    assert old.status == WorkerStatus.DRAINING
    assert list(h.registry.workers.values()) == [old]  # the new one waits for the URL
    # A reread meanwhile changes nothing (the add is pending, the old one draining).
    await h.reconciler.apply("file", {"w1": _spec("http://127.0.0.1:9001", model_id="m2")})
    h.drained.set()
    await h.settle()
    (new,) = h.registry.workers.values()
    assert new.worker_id != old.worker_id
    assert new.spec.model_id == "m2"
    assert new.spec.labels[HASH_LABEL] != old.spec.labels[HASH_LABEL]
    assert h.removed == ["http://127.0.0.1:9001"]
    families = h.reconciler.families()
    assert _family(families, "smg_discovery_deregistrations_total") == {
        ("", ("source", "file"), ("reason", "reconciled")): 1
    }
    assert _family(families, "smg_discovery_registrations_total") == {
        ("", ("source", "file"), ("result", "success")): 2
    }


@_sync
async def test_gone_workers_are_removed_and_admin_workers_never_touched() -> None:
    h = Harness()
    admin = h.registry.add(validate_worker_spec(_spec("http://127.0.0.1:9100")))
    await h.reconciler.apply(
        "file",
        {
            "w1": _spec("http://127.0.0.1:9001"),
            # Already registered through the admin API: left as it is, counted as a failure.
            "dup": _spec("http://127.0.0.1:9100", model_id="other"),
        },
    )
    await h.settle()
    assert h.urls() == {
        "http://127.0.0.1:9100": (None, None, "ready"),
        "http://127.0.0.1:9001": ("file", "w1", "ready"),
    }
    assert h.registry.get(admin.worker_id) is admin and admin.spec.model_id is None
    await h.reconciler.apply("file", {})
    await h.settle()
    assert h.urls() == {"http://127.0.0.1:9100": (None, None, "ready")}
    assert h.removed == ["http://127.0.0.1:9001"]
    regs = _family(h.reconciler.families(), "smg_discovery_registrations_total")
    assert regs == {
        ("", ("source", "file"), ("result", "success")): 1,
        ("", ("source", "file"), ("result", "failure")): 1,
    }


@_sync
async def test_sources_are_independent_and_bad_specs_refused_alone() -> None:
    h = Harness()
    await h.reconciler.apply(
        "kubernetes",
        {
            "pod-a": _spec("http://127.0.0.1:9001"),
            "bad": _spec("ftp://127.0.0.1:1"),
            "bad\nkey": _spec("http://127.0.0.1:9003"),  # cannot be a label value
            "k" * 1025: _spec("http://127.0.0.1:9004"),  # too long for one
        },
    )
    await h.reconciler.apply("file", {"w1": _spec("http://127.0.0.1:9002")})
    await h.settle()
    await h.reconciler.apply("file", {})
    await h.settle()
    assert h.urls() == {"http://127.0.0.1:9001": ("kubernetes", "pod-a", "ready")}
    families = h.reconciler.families()
    assert _family(families, "smg_discovery_workers_discovered") == {
        ("", ("source", "file")): 0,
        ("", ("source", "kubernetes")): 1,
    }
    assert (
        _family(families, "smg_discovery_registrations_total")[
            ("", ("source", "kubernetes"), ("result", "failure"))
        ]
        == 3
    )


@_sync
async def test_failed_counts_and_keeps_the_workers(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    await h.reconciler.apply("file", {"w1": _spec("http://127.0.0.1:9001")})
    h.reconciler.failed("file", "invalid discovery manifest m.json: missing field `version`")
    h.reconciler.failed("file", "cannot read m.json", "unreadable")
    h.reconciler.failed("file", "again", "invalid")
    await h.settle()
    assert h.urls() == {"http://127.0.0.1:9001": ("file", "w1", "ready")}
    assert _family(h.reconciler.families(), "smg_discovery_snapshot_errors_total") == {
        ("", ("source", "file"), ("reason", "invalid")): 2,
        ("", ("source", "file"), ("reason", "unreadable")): 1,
    }
    assert "missing field `version`" in caplog.text


@_sync
async def test_state_is_read_back_from_the_registry() -> None:
    """A new Reconciler (a replaced control plane) sees the workers the last one added."""
    h = Harness()
    await h.reconciler.apply("file", {"w1": _spec("http://127.0.0.1:9001")})
    fresh = Reconciler(h.registry, h.registry.add, h.remove, h.spawn)
    assert list(fresh.current("file")) == ["w1"]
    await fresh.apply("file", {"w1": _spec("http://127.0.0.1:9001")})
    await h.settle()
    assert len(h.registry.workers) == 1
    assert fresh.families()[0].samples == []  # nothing registered by this one


@_sync
async def test_a_bare_host_port_is_registered_in_the_mode_that_answers() -> None:
    """1.13's DetectConnectionModeStep: HTTP and gRPC probed, HTTP first; neither: not
    registered, counted, tried again next pass; a registered one is not probed again."""
    answers = {"127.0.0.1:9001": "http", "127.0.0.2:9002": "grpc", "127.0.0.3:9003": None}
    probed: list[tuple[str, float]] = []

    async def detect(target: str, timeout: float) -> str | None:
        probed.append((target, timeout))
        return answers[target]

    h = Harness(detect)
    desired = {
        "a": _spec("127.0.0.1:9001"),
        "b": _spec("127.0.0.2:9002"),
        "c": _spec("127.0.0.3:9003"),
        "d": _spec("http://127.0.0.4:9004"),  # a scheme is honoured: no probe
    }
    await h.reconciler.apply("file", desired)
    assert sorted(probed) == [
        ("127.0.0.1:9001", 0.5),
        ("127.0.0.2:9002", 0.5),
        ("127.0.0.3:9003", 0.5),
    ]
    assert h.urls() == {
        "http://127.0.0.1:9001": ("file", "a", "ready"),
        "grpc://127.0.0.2:9002": ("file", "b", "pending"),  # gRPC: until discovered
        "http://127.0.0.4:9004": ("file", "d", "ready"),
    }
    modes = {r.spec.url: r.spec.connection_mode for r in h.registry.workers.values()}
    assert modes["grpc://127.0.0.2:9002"] == "grpc"
    regs = _family(h.reconciler.families(), "smg_discovery_registrations_total")
    assert regs == {
        ("", ("source", "file"), ("result", "success")): 3,
        ("", ("source", "file"), ("result", "failure")): 1,
    }
    # Next pass: only the one that did not answer is probed; now it answers gRPC.
    probed.clear()
    answers["127.0.0.3:9003"] = "grpc"
    await h.reconciler.apply("file", desired)
    assert probed == [("127.0.0.3:9003", 0.5)]
    assert "grpc://127.0.0.3:9003" in h.urls()
    probed.clear()
    await h.reconciler.apply("file", desired)
    assert probed == []
    assert len(h.urls()) == 4
    # Gone from the source: drained and removed under the URL it was registered with.
    await h.reconciler.apply("file", {k: v for k, v in desired.items() if k != "b"})
    await h.settle()
    assert h.removed == ["grpc://127.0.0.2:9002"]
    assert probed == []
