"""The `/wasm` admin routes on the control plane (the I/O around `smg.wasm.registry`).

A module is validated and compiled here once (`smg.wasm.runtime.compile_component`, in a
thread: a large component takes seconds), its artifact written to this gateway's private
run directory, and the list published with the worker directory, whose generation every
data-plane process watches: they load the artifact, never compiling again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from smg.httpwire import HttpError, error_body, invalid_url
from smg.shm.directory import WasmModuleEntry
from smg.wasm import registry as reg

if TYPE_CHECKING:
    from smg.control.registry import Registry
    from smg.promtext import Family

log = logging.getLogger("smg.control.wasm")

AdminAnswer = tuple[int, list[tuple[str, str]], bytes]
_JSON = [("content-type", "application/json")]
_TEXT = [("content-type", "text/plain; charset=utf-8")]
# A module file larger than this is refused before it is read (smg's bound; 1.13 has none).
MAX_MODULE_BYTES = 256 << 20

# (module bytes, the attach points it must serve) -> the serialized artifact
Compile = Callable[[bytes, list[str]], bytes]


def _default_compile(data: bytes, points: list[str]) -> bytes:
    from smg.wasm.runtime import compile_component
    from smg.wasm.types import Limits

    return compile_component(data, Limits(), points)


class WasmAdmin:
    def __init__(
        self, registry: Registry, enabled: bool, root_pid: int, compile: Compile | None = None
    ) -> None:
        self.registry = registry
        self.enabled = enabled
        self.root_pid = root_pid
        # This gateway's private directory of artifacts (mode 0700), made on the first add.
        self.run_dir: str | None = None
        self.compile = compile or _default_compile
        # One change at a time: an add's duplicate check sees every earlier add.
        self.lock = asyncio.Lock()

    async def route(
        self, method: str, path: str, body: bytes, families: list[Family] | None
    ) -> AdminAnswer:
        if path == "/wasm":
            if method == "GET":
                totals = module_totals(families or [])
                return _json(200, reg.list_view(self.registry.wasm, totals))
            if method == "POST":
                return await self._add(body)
            return _error(405, "method_not_allowed", invalid_url(method, "/wasm"), "POST,GET")
        raw = path[len("/wasm/") :]
        if method != "DELETE":
            return _error(405, "method_not_allowed", invalid_url(method, path), "DELETE")
        module_id = reg.canonical_uuid(raw)
        if module_id is None or "/" in raw:
            return _error(400, "bad_request", f"Invalid module id '{raw}' (expected a UUID)")
        async with self.lock:
            return self._remove(module_id)

    async def _add(self, body: bytes) -> AdminAnswer:
        if not self.enabled:
            # 1.13 registers modules without --enable-wasm and never runs them; a module that
            # silently does nothing (an auth module!) is worse than a clear refusal.
            return _error(
                400,
                "wasm_disabled",
                "WASM modules run only when the gateway starts with --enable-wasm",
            )
        try:
            descriptors = reg.parse_add_body(body)
        except reg.BodyError as exc:
            code = "invalid_json" if exc.status == 400 else "invalid_request"
            return _error(exc.status, code, str(exc))
        results = []
        status = 200
        async with self.lock:
            for descriptor in descriptors:
                try:
                    module_id = await self._add_one(descriptor)
                    results.append(reg.add_result(descriptor, module_id, None))
                except reg.StepFailed as exc:
                    status = 400
                    results.append(reg.add_result(descriptor, None, str(exc)))
        return _json(status, {"modules": results})

    async def _add_one(self, descriptor: reg.Descriptor) -> str:
        reg.check_descriptor_text(descriptor)
        path = descriptor.file_path
        step = "validate_descriptor"
        try:
            size = os.stat(path).st_size
            canonical = os.path.realpath(path, strict=True)
        except OSError as exc:
            raise reg.StepFailed(step, f"Failed to access file {path}: {_os_error(exc)}") from None
        reg.check_resolved(size, canonical)
        if size > MAX_MODULE_BYTES:
            raise reg.StepFailed(step, f"Module file is larger than {MAX_MODULE_BYTES} bytes")
        try:
            with open(canonical, "rb") as f:
                data = f.read(MAX_MODULE_BYTES + 1)
        except OSError as exc:
            raise reg.StepFailed(
                "load_wasm_bytes", f"Failed to read WASM file {path}: {_os_error(exc)}"
            ) from None
        sha256 = hashlib.sha256(data).hexdigest()
        reg.check_duplicate(sha256, self.registry.wasm)
        reg.check_room(self.registry.wasm)
        try:
            # OnError is accepted and stored as 1.13 does; nothing calls it, nothing checks it.
            points = [p for p in descriptor.attach_points if p != "OnError"]
            artifact = await asyncio.to_thread(self.compile, data, points)
        except Exception as exc:  # WasmError, or anything the compiler raised
            raise reg.invalid_component(str(exc)) from None
        # Checked again: the compile ran outside the event loop (the lock held).
        reg.check_duplicate(sha256, self.registry.wasm)
        module_id = reg.uuid7()
        if self.run_dir is None:
            self.run_dir = tempfile.mkdtemp(prefix=f"smg-{self.root_pid}-wasm-")
        artifact_path = os.path.join(self.run_dir, reg.artifact_name(module_id))
        tmp = artifact_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(artifact)
        os.replace(tmp, artifact_path)  # a data plane never reads a half-written artifact
        entry = WasmModuleEntry(
            module_id=module_id,
            name=descriptor.name,
            file_path=path,
            sha256=sha256,
            size_bytes=len(data),
            created_at_ns=time.time_ns(),
            attach_points=descriptor.attach_points,
            artifact_path=artifact_path,
            artifact_sha256=hashlib.sha256(artifact).hexdigest(),
        )
        try:
            self.registry.publish_wasm((*self.registry.wasm, entry))
        except HttpError as exc:
            os.unlink(artifact_path)
            raise reg.StepFailed("register_module", exc.message) from None
        log.info("WASM module %s added as %s (%d bytes)", descriptor.name, module_id, len(data))
        return module_id

    def _remove(self, module_id: str) -> AdminAnswer:
        entry = next((e for e in self.registry.wasm if e.module_id == module_id), None)
        if entry is None:
            return 400, _TEXT, reg.not_found(module_id).encode()
        self.registry.publish_wasm(tuple(e for e in self.registry.wasm if e is not entry))
        # The data planes that loaded it hold it in memory; one that has not yet has no
        # need of it any more (the list it will read no longer names it).
        with contextlib.suppress(OSError):
            os.unlink(entry.artifact_path)
        log.info("WASM module %s (%s) removed", entry.name, module_id)
        return 200, _TEXT, reg.REMOVED_TEXT

    def cleanup(self) -> None:
        """At shutdown: the artifacts of the published modules and their directories (a
        control plane that crashed leaves them for its replacement, which cleans up)."""
        dirs = set()
        for entry in self.registry.wasm:
            dirs.add(os.path.dirname(entry.artifact_path))
            with contextlib.suppress(OSError):
                os.unlink(entry.artifact_path)
        if self.run_dir is not None:
            dirs.add(self.run_dir)
        for path in dirs:
            with contextlib.suppress(OSError):  # not empty or gone: left as it is
                os.rmdir(path)


def module_totals(families: list[Family]) -> dict[str, reg.ModuleTotals]:
    """Each module's executions from the data planes' series (`smg.wasm.chain`)."""
    totals: dict[str, reg.ModuleTotals] = {}
    for family in families:
        name = family.name
        if not name.startswith("smg_wasm_"):
            continue
        for sample in family.samples:
            module_id = dict(sample.labels).get("module_id")
            if module_id is None:
                continue
            mine = totals.setdefault(module_id, reg.ModuleTotals())
            if name == "smg_wasm_invocations_total":
                mine.executions += int(sample.value)
            elif name == "smg_wasm_traps_total":
                mine.failed += int(sample.value)
            elif name == "smg_wasm_execution_seconds_total":
                mine.seconds += float(sample.value)
            elif name == "smg_wasm_execution_seconds_max":
                mine.max_seconds = max(mine.max_seconds, float(sample.value))
    return totals


def _os_error(exc: OSError) -> str:
    """An OS error as Rust prints one: `No such file or directory (os error 2)`."""
    return f"{exc.strerror} (os error {exc.errno})" if exc.errno else str(exc)


def _json(status: int, payload: Any) -> AdminAnswer:
    return status, _JSON, orjson.dumps(payload)


def _error(status: int, code: str, message: str, allow: str | None = None) -> AdminAnswer:
    headers = [*_JSON, ("x-smg-error-code", code)]
    if allow:
        headers.append(("allow", allow))
    return status, headers, error_body(status, code, message)
