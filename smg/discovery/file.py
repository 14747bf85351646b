"""File discovery (`--discovery-provider file`): workers listed in a JSON manifest.

The format and its rules are the Rust SMG 1.13's (its file provider, tried on the 1.13
binary; the source mirror has none):

    {"version": 1, "workers": [{"url": "http://10.0.0.5:8000"}, ...]}

- `version` is required and must be 1; top-level fields other than `version` and
  `workers` are refused, and so is a missing `workers`.
- A worker takes `id`, `url` (required), `worker_type` (regular|prefill|decode|encode),
  `bootstrap_port`, `model_id`, `kv_connector`, `kv_role`, `kv_engine_id`; any other field
  is refused. smg has no vLLM KV connectors: a non-null `kv_*` is refused.
- `id` is the worker's stable key (default: the URL as written). Two entries with one id,
  or two ids naming one endpoint (URL normalised), are refused.
- Outside PD mode `worker_type` must be regular (or absent); in PD mode it is required
  and must be prefill or decode. `bootstrap_port` applies to prefill (and encode) only.
- A URL without a scheme (`host:port`) is probed for HTTP and gRPC when it is added, as
  1.13 does (smg.discovery.detect; the 1.13 binary registers a gRPC engine's bare
  host:port as grpc://); it is checked here as http://.
- Anything refused refuses the whole manifest: the workers registered stay as they are
  (the last good manifest), the reason is logged, and counted
  (`smg_discovery_snapshot_errors_total{reason="invalid"}`; `"unreadable"` for a file that
  cannot be read, e.g. not there yet).

The manifest is reread every --discovery-check-interval-secs (default 30) and as soon as
it changes: inotify on the manifest's directory through `watchfiles` (so an atomic rename
over it and a file created after start-up are seen), or, if inotify is unavailable or the
directory does not exist yet, a stat of the file every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson

from smg.config import DISCOVERY_CHECK_INTERVAL_DEFAULT, ConfigError, GatewayConfig
from smg.discovery.reconcile import Reconciler
from smg.workers_spec import WorkerSpec, validate_worker_spec

__all__ = [
    "MAX_MANIFEST_BYTES",
    "SOURCE",
    "FileProvider",
    "ManifestError",
    "parse_manifest",
]

log = logging.getLogger("smg.discovery")

SOURCE = "file"
MAX_MANIFEST_BYTES = 16 << 20
_TOP_FIELDS = ("version", "workers")
_WORKER_FIELDS = (
    "id",
    "url",
    "worker_type",
    "bootstrap_port",
    "model_id",
    "kv_connector",
    "kv_role",
    "kv_engine_id",
)
_WORKER_TYPES = ("regular", "prefill", "decode", "encode")
_STAT_POLL_SECS = 1.0
_WATCH_RETRY_SECS = 1.0


class ManifestError(Exception):
    """A manifest refused as a whole; the message says where and why."""


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {orjson.dumps(value).decode()}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_manifest(raw: bytes, *, pd: bool = False) -> dict[str, WorkerSpec]:
    """The workers a manifest lists, {id: spec} in file order, or ManifestError.

    `pd`: the gateway runs prefill/decode disaggregation (worker_type rules differ)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"invalid type: {_type_name(data)}, expected a JSON object")
    if "version" not in data:
        raise ManifestError("missing field `version`")
    version = data["version"]
    if not _is_int(version) or version < 0:
        raise ManifestError(f"invalid type: {_type_name(version)}, expected u64")
    if version != 1:
        raise ManifestError(f"unsupported version {version}; this gateway reads version 1")
    for name in data:
        if name not in _TOP_FIELDS:
            raise ManifestError(f"unknown field `{name}`, expected `version` or `workers`")
    if "workers" not in data:
        raise ManifestError("missing field `workers`")
    workers = data["workers"]
    if not isinstance(workers, list):
        raise ManifestError(f"invalid type: {_type_name(workers)}, expected a sequence")
    out: dict[str, WorkerSpec] = {}
    by_url: dict[str, str] = {}
    for i, item in enumerate(workers):
        try:
            key, spec, endpoint = _worker(item, pd)
        except ManifestError as exc:
            raise ManifestError(f"workers[{i}]: {exc}") from None
        if key in out:
            raise ManifestError(f"workers[{i}]: duplicate id {key!r}")
        other = by_url.get(endpoint)
        if other is not None:
            raise ManifestError(
                f"workers[{i}]: {key!r} and {other!r} name the same endpoint {endpoint}"
            )
        out[key] = spec
        by_url[endpoint] = key
    return out


def _worker(item: Any, pd: bool) -> tuple[str, WorkerSpec, str]:
    """(key, spec, the endpoint's normalised URL, for duplicates)."""
    if not isinstance(item, dict):
        raise ManifestError(f"invalid type: {_type_name(item)}, expected a worker object")
    for name in item:
        if name not in _WORKER_FIELDS:
            expected = ", ".join(f"`{f}`" for f in _WORKER_FIELDS)
            raise ManifestError(f"unknown field `{name}`, expected one of {expected}")
    if "url" not in item:
        raise ManifestError("missing field `url`")
    for name in ("id", "url", "model_id", "worker_type"):
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            raise ManifestError(f"{name}: invalid type: {_type_name(value)}, expected a string")
    if item["url"] is None:
        raise ManifestError("url: invalid type: null, expected a string")
    for name in ("kv_connector", "kv_role", "kv_engine_id"):
        if item.get(name) is not None:
            raise ManifestError(f"{name}: smg has no vLLM KV connectors (leave it out)")
    worker_type = item.get("worker_type")
    if worker_type is not None and worker_type not in _WORKER_TYPES:
        expected = ", ".join(f"`{t}`" for t in _WORKER_TYPES)
        raise ManifestError(f"unknown variant `{worker_type}`, expected one of {expected}")
    if pd:
        if worker_type is None:
            raise ManifestError("worker_type is required in prefill-decode routing")
        if worker_type not in ("prefill", "decode"):
            raise ManifestError(
                f"worker_type {worker_type!r} is not used in prefill-decode routing"
            )
    elif worker_type not in (None, "regular"):
        raise ManifestError(f"worker_type {worker_type!r} is not used in regular routing")
    kind = worker_type or "regular"
    port = item.get("bootstrap_port")
    if port is not None:
        if not _is_int(port) or not 0 <= port <= 65535:
            raise ManifestError(f"bootstrap_port: invalid value: {_type_name(port)}, expected u16")
        if kind not in ("prefill", "encode"):
            raise ManifestError(
                f"bootstrap_port applies only to encode and prefill workers, not {kind}"
            )
    url: str = item["url"]
    spec = WorkerSpec(url=url, model_id=item.get("model_id"), worker_type=kind, bootstrap_port=port)
    try:
        # A bare host:port is checked as http:// and handed on bare: the reconciler
        # detects its connection mode (HTTP or gRPC) when it adds it.
        checked = validate_worker_spec(
            spec if "://" in url else msgspec.structs.replace(spec, url="http://" + url)
        )
    except ConfigError as exc:
        raise ManifestError(f"{exc.key}: {exc.reason}") from None
    key = item.get("id")
    return (url if key is None else key), (checked if "://" in url else spec), checked.url


@dataclass
class _Read:
    """One read of the manifest: the bytes, or why there are none."""

    raw: bytes | None
    error: str | None = None


def _read(path: Path) -> _Read:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        return _Read(None, exc.strerror or str(exc))
    if len(raw) > MAX_MANIFEST_BYTES:
        return _Read(None, f"larger than {MAX_MANIFEST_BYTES} bytes")
    return _Read(raw)


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileProvider:
    """Rereads the manifest on change and every `interval` seconds; feeds the Reconciler."""

    def __init__(
        self, path: Path, interval: float, reconciler: Reconciler, *, pd: bool = False
    ) -> None:
        self.path = path
        self.interval = interval
        self.reconciler = reconciler
        self.pd = pd
        self.changed = asyncio.Event()
        self._last_raw: bytes | None = None
        self._applied_once = False
        self.watch_mode = "none"  # inotify | stat (what the watcher uses now)

    @classmethod
    def from_config(cls, cfg: GatewayConfig, reconciler: Reconciler) -> FileProvider:
        assert cfg.discovery_file is not None
        interval = cfg.discovery_check_interval_secs or DISCOVERY_CHECK_INTERVAL_DEFAULT
        return cls(
            Path(cfg.discovery_file).absolute(),
            float(interval),
            reconciler,
            pd=bool(getattr(cfg, "pd_disaggregation", False)),
        )

    async def run(self) -> None:
        log.info(
            "file discovery: manifest %s, reread on change and every %gs",
            self.path,
            self.interval,
        )
        watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            while True:
                self.changed.clear()
                try:
                    await self.sync()
                except Exception:  # a bug must not end discovery: log it, try next time
                    log.exception("file discovery: sync of %s failed", self.path)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), self.interval)
        finally:
            watcher.cancel()

    async def sync(self) -> None:
        """Read, parse and apply the manifest once (a refused one changes nothing)."""
        read = await asyncio.to_thread(_read, self.path)
        after = "keeping the last good manifest" if self._applied_once else "no workers yet"
        if read.raw is None:
            self.reconciler.failed(
                SOURCE,
                f"cannot read discovery manifest {self.path}: {read.error}; {after}",
                "unreadable",
            )
            return
        try:
            desired = parse_manifest(read.raw, pd=self.pd)
        except ManifestError as exc:
            self.reconciler.failed(
                SOURCE, f"invalid discovery manifest {self.path}: {exc}; {after}", "invalid"
            )
            return
        if read.raw != self._last_raw:
            log.info("discovery manifest %s lists %d worker(s)", self.path, len(desired))
            self._last_raw = read.raw
        await self.apply(desired)

    async def apply(self, desired: Mapping[str, WorkerSpec]) -> None:
        await self.reconciler.apply(SOURCE, desired)
        self._applied_once = True

    async def _watch(self) -> None:
        """Set `changed` when the manifest may have changed: inotify on its directory
        (watchfiles), else a stat every second; the inotify watch is retried every second
        while it cannot be set (the directory does not exist yet)."""
        try:
            import watchfiles
        except ImportError:  # pragma: no cover - watchfiles is a dependency
            watchfiles = None
        name = self.path.name
        last = _stat_key(self.path)
        while True:
            if watchfiles is not None and self.path.parent.is_dir():
                self.watch_mode = "inotify"
                log.info("file discovery: watching %s with inotify", self.path.parent)
                try:
                    async for changes in watchfiles.awatch(
                        self.path.parent,
                        watch_filter=lambda _change, changed: Path(changed).name == name,
                        debounce=50,
                        step=20,
                        rust_timeout=1000,
                        recursive=False,
                    ):
                        if changes:
                            self.changed.set()
                except (OSError, RuntimeError) as exc:
                    log.warning(
                        "cannot watch discovery manifest %s (%s); checking it every %gs",
                        self.path,
                        exc,
                        _STAT_POLL_SECS,
                    )
            # No inotify: compare the file's stat every second (a replaced file has a new
            # inode; an edit in place a new mtime or size), and retry the watch.
            self.watch_mode = "stat"
            await asyncio.sleep(_STAT_POLL_SECS)
            now = _stat_key(self.path)
            if now != last:
                last = now
                self.changed.set()
