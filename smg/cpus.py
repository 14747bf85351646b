"""How many CPUs this process may use: CPU affinity and the cgroup CPU quota.

Pure file reading (no config types): `smg.config` uses it for the default of
`--processes`, and tests point it at a fake cgroup tree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["PROCESS_CAP", "cgroup_cpu_limit", "default_processes"]

# More data-plane processes than this buys little (the upstream workers, not the proxy,
# are the bottleneck) and each one holds its own keep-alive pools to every worker.
PROCESS_CAP = 16


def _walk_up(mount: Path, rel: str) -> Iterable[Path]:
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    for i in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:i])


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs the cgroup CPU quota allows (e.g. 1.5), or None when there is no quota.

    Reads cgroup v2 `cpu.max` (also under the hybrid `unified/` mount) and cgroup v1
    `cpu.cfs_quota_us`/`cpu.cfs_period_us`, for this process's cgroup and every ancestor
    up to the mount (a parent's quota caps its children), and returns the tightest.
    When the listed path is not visible (a container's namespaced mount) the mount
    root itself is read.
    """
    text = _read(proc_cgroup) or "0::/"
    limits: list[float] = []
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and controllers == "":
            for mount in (root, root / "unified"):
                for d in _walk_up(mount, rel):
                    raw = _read(d / "cpu.max")
                    if raw:
                        quota, _, period = raw.partition(" ")
                        if quota != "max":
                            try:
                                q, p = float(quota), float(period or "100000")
                            except ValueError:
                                continue
                            if q > 0 and p > 0:
                                limits.append(q / p)
        elif "cpu" in controllers.split(","):
            mounts = {root / controllers, root / "cpu", root / "cpu,cpuacct"}
            for mount in sorted(mounts):
                for d in _walk_up(mount, rel):
                    quota_s = _read(d / "cpu.cfs_quota_us")
                    period_s = _read(d / "cpu.cfs_period_us")
                    if quota_s is None or period_s is None:
                        continue
                    try:
                        q, p = float(quota_s), float(period_s)
                    except ValueError:
                        continue
                    if q > 0 and p > 0:
                        limits.append(q / p)
    return min(limits) if limits else None


def default_processes() -> int:
    """Data-plane processes by default: the CPUs this process may actually use.

    CPU affinity (`sched_getaffinity`) intersected with the cgroup quota, rounded up,
    at least 1, at most PROCESS_CAP (16).
    """
    return min(available_cores(), PROCESS_CAP)


def available_cores() -> int:
    """CPUs this process may use: affinity intersected with the cgroup quota, rounded up,
    at least 1 (as Rust's `available_parallelism` counts them); not capped."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
