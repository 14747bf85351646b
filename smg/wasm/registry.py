"""The `/wasm` admin API's pure parts, in the Rust SMG 1.13's shapes and words.

`POST /wasm` takes `{"modules": [{name, file_path, module_type, attach_points}]}` and answers
each descriptor back with an `add_result` (`{"Success": uuid}` or `{"Error": message}`): 200
when every module was added, 400 when one was not (the others are still added, as 1.13
does). `GET /wasm` lists `{"modules": [{module_uuid, module_meta}], "metrics": {...}}`;
`DELETE /wasm/{uuid}` answers 200 `Module removed successfully` (text), 400 for a bad or
unknown id. The error texts are 1.13's (its workflow's "Workflow failed at step ..." words),
checked against the 1.13 binary with the same bytes.

Where smg differs (on purpose): a body that is not the request's shape answers in the
OpenAI error shape (1.13 answers text/plain) with 1.13's status (400 not JSON, 422 wrong
shape); modules run in the order they were added (1.13: a hash map's order).

The I/O (reading the file, compiling, writing the artifact, publishing) is
`smg.control.wasm_admin`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import orjson

from smg.shm.directory import (
    MAX_WASM_MODULES,
    MAX_WASM_NAME_BYTES,
    MAX_WASM_PATH_BYTES,
    WasmModuleEntry,
)

MODULE_TYPES = ("Middleware",)
# 1.13's MiddlewareAttachPoint variants (OnError is accepted and stored; nothing calls it,
# as in 1.13).
ATTACH_POINTS = ("OnRequest", "OnResponse", "OnError")
# 1.13's BLOCKED_PATH_PREFIXES: system directories a module is never read from.
BLOCKED_PREFIXES = (
    "/etc/",
    "/proc/",
    "/sys/",
    "/dev/",
    "/boot/",
    "/root/",
    "/var/log/",
    "/var/run/",
)
REMOVED_TEXT = b"Module removed successfully"


class BodyError(Exception):
    """The POST body is not `{"modules": [...]}` of descriptors: (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StepFailed(Exception):
    """A module was not added: the message is 1.13's, with its workflow step's name."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"Workflow failed at step {step}: Step failed: {step} - {message}")


@dataclass(frozen=True)
class Descriptor:
    name: str
    file_path: str
    module_type: str
    attach_points: tuple[str, ...]  # "OnRequest", "OnResponse", "OnError"

    def echo(self) -> dict[str, Any]:
        """The descriptor as 1.13 answers it back (before `add_result`)."""
        return {
            "name": self.name,
            "file_path": self.file_path,
            "module_type": self.module_type,
            "attach_points": [{"Middleware": point} for point in self.attach_points],
        }


_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


def parse_add_body(body: bytes) -> list[Descriptor]:
    """The descriptors of a POST /wasm body; BodyError (400 not JSON, 422 not the shape)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BodyError(422, _DESERIALIZE + "expected a JSON object")
    modules = data.get("modules")
    if modules is None:
        raise BodyError(422, _DESERIALIZE + "missing field `modules`")
    if not isinstance(modules, list):
        raise BodyError(422, _DESERIALIZE + "modules: expected a sequence")
    return [_descriptor(i, raw) for i, raw in enumerate(modules)]


def _descriptor(index: int, raw: Any) -> Descriptor:
    where = f"modules[{index}]"
    if not isinstance(raw, dict):
        raise BodyError(422, _DESERIALIZE + f"{where}: expected struct WasmModuleDescriptor")
    for field in ("name", "file_path", "module_type", "attach_points"):
        if field not in raw:
            raise BodyError(422, _DESERIALIZE + f"{where}: missing field `{field}`")
    for field in ("name", "file_path"):
        if not isinstance(raw[field], str):
            raise BodyError(422, _DESERIALIZE + f"{where}.{field}: expected a string")
    module_type = raw["module_type"]
    if module_type not in MODULE_TYPES:
        raise BodyError(
            422,
            _DESERIALIZE
            + f"{where}.module_type: unknown variant `{module_type}`, expected `Middleware`",
        )
    points = raw["attach_points"]
    if not isinstance(points, list):
        raise BodyError(422, _DESERIALIZE + f"{where}.attach_points: expected a sequence")
    parsed: list[str] = []
    for j, point in enumerate(points):
        at = f"{where}.attach_points[{j}]"
        if not isinstance(point, dict) or list(point) != ["Middleware"]:
            raise BodyError(
                422, _DESERIALIZE + f"{at}: unknown variant `{point}`, expected `Middleware`"
            )
        value = point["Middleware"]
        if value not in ATTACH_POINTS:
            raise BodyError(
                422,
                _DESERIALIZE
                + f"{at}.Middleware: unknown variant `{value}`, expected one of "
                + ", ".join(f"`{p}`" for p in ATTACH_POINTS),
            )
        if value not in parsed:
            parsed.append(value)
    return Descriptor(raw["name"], raw["file_path"], module_type, tuple(parsed))


def check_descriptor_text(descriptor: Descriptor) -> None:
    """1.13's checks on the descriptor's strings, in its order (StepFailed); the file's own
    checks (exists, not empty, symlink target) are `check_resolved`."""
    step = "validate_descriptor"
    if not descriptor.name:
        raise StepFailed(step, "Module name cannot be empty")
    if not descriptor.file_path:
        raise StepFailed(step, "Module file path cannot be empty")
    # smg's own bounds: the list is published in a fixed-size shared buffer.
    if len(descriptor.name.encode("utf-8", "surrogatepass")) > MAX_WASM_NAME_BYTES:
        raise StepFailed(step, f"Module name is longer than {MAX_WASM_NAME_BYTES} bytes")
    if len(descriptor.file_path.encode("utf-8", "surrogatepass")) > MAX_WASM_PATH_BYTES:
        raise StepFailed(step, f"Module file path is longer than {MAX_WASM_PATH_BYTES} bytes")
    path = descriptor.file_path
    if not path.startswith("/"):
        raise StepFailed(step, f"Module file path must be absolute, got: {path}")
    parts = path.split("/")
    if ".." in parts:
        raise StepFailed(step, "Path traversal (..) not allowed in module file path")
    # Rust's Path::components() drops a "." except at the start; an absolute path has none
    # there, so "/a/./b.wasm" passes 1.13's check: so here.
    if not _has_wasm_extension(path):
        raise StepFailed(step, "Module file must have .wasm extension")
    prefix = blocked_prefix(path)
    if prefix is not None:
        raise StepFailed(step, f"Access to {prefix} directory is not allowed")


def check_resolved(size: int, canonical: str) -> None:
    """1.13's checks after the file was found: not empty, its real path not in a blocked
    directory and still a .wasm file."""
    step = "validate_descriptor"
    if size == 0:
        raise StepFailed(step, "Module file size cannot be 0")
    prefix = blocked_prefix(canonical)
    if prefix is not None:
        raise StepFailed(step, f"Path resolves to blocked directory {prefix} (via symlink)")
    if not _has_wasm_extension(canonical):
        raise StepFailed(step, "Symlink target must be a .wasm file")


def blocked_prefix(path: str) -> str | None:
    return next((p for p in BLOCKED_PREFIXES if path.startswith(p)), None)


def _has_wasm_extension(path: str) -> bool:
    suffix = PurePosixPath(path).suffix
    return suffix.lower() == ".wasm" and PurePosixPath(path).name != ".wasm"


def check_duplicate(sha256: str, entries: Iterable[WasmModuleEntry]) -> None:
    if any(entry.sha256 == sha256 for entry in entries):
        raise StepFailed(
            "check_duplicate",
            "Duplicate SHA256 hash detected: module with same sha256 already exists: " + sha256,
        )


def check_room(entries: tuple[WasmModuleEntry, ...]) -> None:
    if len(entries) >= MAX_WASM_MODULES:
        raise StepFailed(
            "register_module", f"Failed to register module: at most {MAX_WASM_MODULES} modules"
        )


def invalid_component(reason: str) -> StepFailed:
    """1.13's words for bytes that are not a loadable component (the runtime's message
    as it is when it has them already)."""
    if reason.startswith("Invalid WASM component: "):
        return StepFailed("validate_wasm_component", reason)
    return StepFailed(
        "validate_wasm_component",
        f"Invalid WASM component: {reason}. Hint: The WASM file must be in component "
        "format. If you're using wit-bindgen, use 'wasm-tools component new' to wrap the "
        "WASM module into a component.",
    )


def not_found(module_id: str) -> str:
    return str(StepFailed("find_module_to_remove", f"Module with UUID {module_id} not found"))


def uuid7(now_ns: int | None = None) -> str:
    """A UUID version 7 (time-ordered, as 1.13's Uuid::now_v7): 48 bits of Unix
    milliseconds, then random bits."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    value = (ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def canonical_uuid(raw: str) -> str | None:
    """`raw` as a lower-case hyphenated UUID, or None when it is not one (1.13: 400)."""
    import uuid

    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


def add_result(descriptor: Descriptor, module_id: str | None, error: str | None) -> dict:
    result = {"Success": module_id} if error is None else {"Error": error}
    return {**descriptor.echo(), "add_result": result}


def _iso(ns: int) -> str:
    """1.13's timestamps: RFC 3339 with nanoseconds, `Z`."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


@dataclass
class ModuleTotals:
    """One module's executions, all data-plane processes together."""

    executions: int = 0
    failed: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0


def list_view(
    entries: Iterable[WasmModuleEntry], totals: dict[str, ModuleTotals]
) -> dict[str, Any]:
    """GET /wasm in 1.13's shape. `access_count` is the module's executions;
    `last_accessed_at` stays its creation time (smg does not stamp each call)."""
    modules = []
    all_totals = ModuleTotals()
    for entry in entries:
        mine = totals.get(entry.module_id, ModuleTotals())
        modules.append(
            {
                "module_uuid": entry.module_id,
                "module_meta": {
                    "name": entry.name,
                    "file_path": entry.file_path,
                    "sha256_hash": entry.sha256,
                    "size_bytes": entry.size_bytes,
                    "created_at": _iso(entry.created_at_ns),
                    "last_accessed_at": _iso(entry.created_at_ns),
                    "access_count": mine.executions,
                    "attach_points": [{"Middleware": p} for p in entry.attach_points],
                },
            }
        )
    for mine in totals.values():  # removed modules' executions count too, as in 1.13
        all_totals.executions += mine.executions
        all_totals.failed += mine.failed
        all_totals.seconds += mine.seconds
        all_totals.max_seconds = max(all_totals.max_seconds, mine.max_seconds)
    metrics: dict[str, Any] = {
        "total_executions": all_totals.executions,
        "successful_executions": all_totals.executions - all_totals.failed,
        "failed_executions": all_totals.failed,
        "total_execution_time_ms": int(all_totals.seconds * 1000),
        "max_execution_time_ms": int(all_totals.max_seconds * 1000),
    }
    if all_totals.executions:
        metrics["average_execution_time_ms"] = all_totals.seconds * 1000 / all_totals.executions
    return {"modules": modules, "metrics": metrics}


def artifact_name(module_id: str) -> str:
    return f"{module_id}.cwasm"
