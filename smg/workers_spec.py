"""Worker specs of the admin API (`POST /workers`, `PUT`/`PATCH /workers/{id}`).

Field names, enum spellings and defaults follow the Rust SMG's `WorkerSpec` and
`WorkerUpdateRequest` (crates/protocols/src/worker.rs): priority 50, cost 1.0,
worker_type regular|prefill|decode|encode, connection_mode http|grpc (zmq is Rust-only).
Two deliberate differences: `model_id` names the served model directly (Rust's spec takes
`models: [ModelCard]` and silently ignores `model_id`), and unknown fields are refused
rather than ignored, so a misspelt field is a 400 instead of a silent no-op.

Pure code: bytes in, validated struct or SpecError (a ConfigError: key + reason) out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import msgspec

from smg.config import ConfigError, mask_secret, normalize_worker_url
from smg.providers import parse_provider, provider_from_url

__all__ = [
    "CONNECTION_MODES",
    "DEFAULT_WORKER_COST",
    "DEFAULT_WORKER_PRIORITY",
    "MAX_SPEC_BYTES",
    "RUNTIME_TYPES",
    "WORKER_TYPES",
    "HealthCheckUpdate",
    "SpecError",
    "WorkerPatch",
    "WorkerSpec",
    "apply_worker_patch",
    "mask_secret",
    "parse_worker_patch",
    "parse_worker_spec",
    "public_worker_spec",
    "spec_is_external",
    "validate_worker_patch",
    "validate_worker_spec",
]

DEFAULT_WORKER_PRIORITY = 50
DEFAULT_WORKER_COST = 1.0
WORKER_TYPES: tuple[str, ...] = ("regular", "prefill", "decode", "encode")
CONNECTION_MODES: tuple[str, ...] = ("http", "grpc")
# Rust RuntimeType's spellings (FromStr: any case; "tensorrt-llm" is trtllm), canonical form
# first. "external" is an external provider's API (smg.control.external), not an engine.
RUNTIME_TYPES: tuple[str, ...] = (
    "unspecified",
    "sglang",
    "vllm",
    "trtllm",
    "mlx",
    "tokenspeed",
    "external",
)
_RUNTIME_ALIASES = {"tensorrt-llm": "trtllm"}
_SCHEME_MODE = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}
_BOOTSTRAP_TYPES = frozenset({"prefill", "encode"})
_U32_MAX = 2**32 - 1
_MAX_BODY = 1 << 20

# Size limits of the variable-length fields. Every registered spec is published in the
# shared worker directory, whose buffer is sized from these limits times the table
# capacity (smg.shm.directory.max_entry_bytes), so any spec that passes them fits.
MAX_URL_BYTES = 2048
MAX_MODEL_ID_BYTES = 512
MAX_API_KEY_BYTES = 2048
MAX_PROVIDER_BYTES = 64  # a custom provider's name (smg.providers)
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 128  # ASCII only (see _LABEL_KEY_RE), so also bytes
MAX_LABEL_VALUE_BYTES = 1024
# The whole spec, msgpack-encoded as the directory stores it: labels, URL, key and the
# rest together. 64 labels of 1 KiB each pass the per-label limits but not this one.
MAX_SPEC_BYTES = 16 * 1024

_spec_encoder = msgspec.msgpack.Encoder()

# Rust WorkerSpec fields smg does not take (yet): named in the error instead of "unknown".
_RUST_ONLY_FIELDS = frozenset(
    {
        "models",
        "runtime",
        "dp_base_url",
        "dp_rank",
        "dp_size",
        "kv_connector",
        "kv_role",
        "kv_engine_id",
        "kv_block_size",
        "http_pool",
        "resilience",
        "max_connection_attempts",
        "load_monitor_interval_secs",
        "multimodal_tensor_transport",
        "multimodal_shm_min_bytes",
        "zmq_handshake_address",
    }
)


class SpecError(ConfigError):
    """A refused worker spec or patch; the admin API answers 400 with key and reason."""


class HealthCheckUpdate(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Per-worker health-check overrides; None keeps the gateway-wide value."""

    timeout_secs: int | None = None
    check_interval_secs: int | None = None
    success_threshold: int | None = None
    failure_threshold: int | None = None
    disable_health_check: bool | None = None


class WorkerSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of `POST /workers` and `PUT /workers/{id}`.

    After validate_worker_spec, `url` is normalised and `connection_mode` is set.
    """

    url: str
    model_id: str | None = None
    worker_type: str = "regular"
    connection_mode: str | None = None
    api_key: str | None = None
    labels: dict[str, str] = {}
    priority: int = DEFAULT_WORKER_PRIORITY
    cost: float = DEFAULT_WORKER_COST
    bootstrap_port: int | None = None
    health: HealthCheckUpdate | None = None
    # Rust RuntimeType (canonical lowercase after validation); "external" makes the worker
    # an external provider's API. Neither it nor `provider` can be changed by PATCH.
    runtime_type: str | None = None
    # An external worker's provider as given (smg.providers.parse_provider: aliases folded,
    # else a custom name); the resolved provider is the record's (smg.control.external).
    provider: str | None = None


class WorkerPatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Body of `PATCH /workers/{id}`: the fields Rust's WorkerUpdateRequest may change.

    None keeps the current value; `labels` are merged into the existing ones and `health`
    overrides only the fields it names (both as in the Rust SMG).
    """

    priority: int | None = None
    cost: float | None = None
    labels: dict[str, str] | None = None
    api_key: str | None = None
    health: HealthCheckUpdate | None = None


_SPEC_FIELDS = frozenset(WorkerSpec.__struct_fields__)
_PATCHABLE = frozenset(WorkerPatch.__struct_fields__)  # what changes in place

# ---------------------------------------------------------------------------------------
# Field checks shared by specs and patches: each returns a reason or None.

_Check = Callable[[Any], "str | None"]


def _priority(v: int) -> str | None:
    return None if 0 <= v <= _U32_MAX else f"must be 0-{_U32_MAX}, got {v}"


def _cost(v: float) -> str | None:
    if not math.isfinite(v) or v < 0:
        return f"must be a finite number >= 0, got {v}"
    return None


def _api_key(v: str) -> str | None:
    # Sent in an Authorization header: CR/LF or other controls would inject headers.
    if not v or v != v.strip() or not all(0x21 <= ord(c) <= 0x7E for c in v):
        return "must be non-empty visible ASCII without surrounding whitespace"
    if len(v) > MAX_API_KEY_BYTES:
        return f"must be at most {MAX_API_KEY_BYTES} characters, got {len(v)}"
    return None


_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")


def _labels(v: dict[str, str]) -> str | None:
    if len(v) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels, got {len(v)}"
    for key, value in v.items():
        if not _LABEL_KEY_RE.match(key):
            return (
                f"label key {key!r} must be 1-128 characters of letters, digits, '_.-/', "
                "starting with a letter or digit"
            )
        if len(value.encode("utf-8", "surrogatepass")) > MAX_LABEL_VALUE_BYTES or any(
            ord(c) < 0x20 for c in value
        ):
            return (
                f"label {key!r}: value must be at most {MAX_LABEL_VALUE_BYTES} bytes "
                "of UTF-8 without controls"
            )
    return None


def _model_id(v: str) -> str | None:
    if not v or v != v.strip() or len(v.encode("utf-8", "surrogatepass")) > MAX_MODEL_ID_BYTES:
        return (
            f"must be a non-empty model name of at most {MAX_MODEL_ID_BYTES} bytes "
            "without surrounding whitespace"
        )
    return None


def _provider(v: str) -> str | None:
    # Keyed on by the data plane's key rule and shown in /workers: visible ASCII only.
    if not v or len(v) > MAX_PROVIDER_BYTES or not all(0x21 <= ord(c) <= 0x7E for c in v):
        return f"must be 1-{MAX_PROVIDER_BYTES} characters of visible ASCII, got {v!r}"
    return None


def _runtime_type(v: str) -> str | None:
    if _canonical_runtime(v) is None:
        return f"must be one of {', '.join(RUNTIME_TYPES)} (or tensorrt-llm), got {v!r}"
    return None


def _canonical_runtime(v: str) -> str | None:
    lower = v.lower()
    lower = _RUNTIME_ALIASES.get(lower, lower)
    return lower if lower in RUNTIME_TYPES else None


def spec_is_external(runtime_type: str | None, url: str) -> bool:
    """Whether a worker is an external provider's API (Rust ClassifyWorkerTypeStep): its
    runtime_type says "external", or none is given and the URL's host is a known
    provider's (api.openai.com, api.anthropic.com, ...)."""
    if runtime_type is not None and _canonical_runtime(runtime_type) != "unspecified":
        return _canonical_runtime(runtime_type) == "external"
    return provider_from_url(url) is not None


def _health_checks(h: HealthCheckUpdate) -> tuple[str, str] | None:
    for field in ("timeout_secs", "check_interval_secs", "success_threshold", "failure_threshold"):
        value = getattr(h, field)
        if value is not None and not 1 <= value <= _U32_MAX:
            return f"health.{field}", f"must be >= 1, got {value}"
    return None


_FIELD_CHECKS: dict[str, _Check] = {
    "priority": _priority,
    "cost": _cost,
    "api_key": _api_key,
    "labels": _labels,
    "model_id": _model_id,
    "provider": _provider,
    "runtime_type": _runtime_type,
}


def _check_fields(obj: WorkerSpec | WorkerPatch) -> None:
    for field, check in _FIELD_CHECKS.items():
        value = getattr(obj, field, None)
        if value is not None:
            reason = check(value)
            if reason:
                raise SpecError(field, reason)
    health = obj.health
    if health is not None:
        bad = _health_checks(health)
        if bad:
            raise SpecError(*bad)


# ---------------------------------------------------------------------------------------
# Validation


def validate_worker_spec(spec: WorkerSpec) -> WorkerSpec:
    """Check a spec and return it normalised (canonical URL, connection_mode resolved)."""
    if not isinstance(spec.url, str):
        raise SpecError("url", "must be a string")
    _check_fields(spec)
    external = spec_is_external(spec.runtime_type, spec.url)
    raw_url = spec.url
    if external and raw_url and "://" not in raw_url:
        raw_url = "https://" + raw_url  # a provider's API is https (api.openai.com)
    try:
        url = normalize_worker_url(raw_url, "url")
    except ConfigError as exc:
        raise SpecError(exc.key, exc.reason) from None
    if len(url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        raise SpecError("url", f"must be at most {MAX_URL_BYTES} bytes")
    if spec.worker_type not in WORKER_TYPES:
        raise SpecError(
            "worker_type", f"must be one of {', '.join(WORKER_TYPES)}, got {spec.worker_type!r}"
        )
    mode = _SCHEME_MODE[url.partition("://")[0]]
    if spec.connection_mode is not None:
        if spec.connection_mode not in CONNECTION_MODES:
            extra = (
                " (zmq workers are not supported by smg)" if spec.connection_mode == "zmq" else ""
            )
            raise SpecError(
                "connection_mode",
                f"must be one of {', '.join(CONNECTION_MODES)}, got {spec.connection_mode!r}"
                + extra,
            )
        if spec.connection_mode != mode:
            raise SpecError(
                "connection_mode",
                f"{spec.connection_mode!r} does not match the URL scheme (which means {mode!r})",
            )
    if spec.bootstrap_port is not None:
        if not 1 <= spec.bootstrap_port <= 65535:
            raise SpecError("bootstrap_port", f"must be 1-65535, got {spec.bootstrap_port}")
        if spec.worker_type not in _BOOTSTRAP_TYPES:
            raise SpecError(
                "bootstrap_port",
                f"applies to prefill and encode workers only, not {spec.worker_type!r}",
            )
    runtime = _canonical_runtime(spec.runtime_type) if spec.runtime_type is not None else None
    if external:
        if mode != "http":
            raise SpecError("url", "an external worker is an HTTP API: use http:// or https://")
        if spec.worker_type != "regular":
            raise SpecError("worker_type", "an external worker is a regular worker")
    elif spec.provider is not None:
        raise SpecError(
            "provider", 'applies to external workers only (set runtime_type: "external")'
        )
    provider = parse_provider(spec.provider) if spec.provider is not None else None
    return _within_budget(
        msgspec.structs.replace(
            spec, url=url, connection_mode=mode, runtime_type=runtime, provider=provider
        )
    )


def _within_budget(spec: WorkerSpec) -> WorkerSpec:
    size = len(_spec_encoder.encode(spec))
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            "body",
            f"the worker spec takes {size} bytes encoded, more than the {MAX_SPEC_BYTES} "
            "a worker may use (labels, url, api_key and model_id together)",
        )
    return spec


def validate_worker_patch(patch: WorkerPatch) -> WorkerPatch:
    """Check a patch with the same field rules as validate_worker_spec."""
    _check_fields(patch)
    return patch


def apply_worker_patch(spec: WorkerSpec, patch: WorkerPatch) -> WorkerSpec:
    """The spec after a (validated) PATCH, with the Rust SMG's merge rules; SpecError if
    the result is over MAX_SPEC_BYTES."""
    labels = dict(spec.labels)
    if patch.labels is not None:
        labels.update(patch.labels)
    health = spec.health
    if patch.health is not None:
        merged = msgspec.structs.asdict(health) if health is not None else {}
        merged.update(
            {k: v for k, v in msgspec.structs.asdict(patch.health).items() if v is not None}
        )
        health = HealthCheckUpdate(**merged)
    return _within_budget(
        msgspec.structs.replace(
            spec,
            priority=spec.priority if patch.priority is None else patch.priority,
            cost=spec.cost if patch.cost is None else patch.cost,
            labels=labels,
            api_key=spec.api_key if patch.api_key is None else patch.api_key,
            health=health,
        )
    )


def replaced_worker_spec(current: WorkerSpec, new: WorkerSpec) -> WorkerSpec:
    """The spec after a (validated) `PUT /workers/{id}` body `new` for the same URL.

    1.13 registers the worker again with the whole new spec. smg replaces in place what
    PATCH may change, whole (labels and health replaced, not merged; no key given drops
    the key), and refuses (SpecError) a change to what registration decided: the model,
    type, connection, runtime, provider or bootstrap port (one not given keeps its value)."""
    for name in WorkerSpec.__struct_fields__:
        if name in _PATCHABLE or name == "url":
            continue
        value = getattr(new, name)
        if value is not None and value != getattr(current, name):
            raise SpecError(
                name,
                f"cannot change in place ({getattr(current, name)!r} -> {value!r}); "
                "use DELETE + POST instead",
            )
    return _within_budget(
        msgspec.structs.replace(current, **{name: getattr(new, name) for name in _PATCHABLE})
    )


def public_worker_spec(spec: WorkerSpec) -> dict[str, Any]:
    """The spec as a response body fragment: the api_key is never returned (as in Rust)."""
    out = msgspec.to_builtins(spec)
    out.pop("api_key", None)
    if spec.health is None:
        out.pop("health", None)
    if spec.bootstrap_port is None:
        out.pop("bootstrap_port", None)
    for field in ("runtime_type", "provider"):  # the record's resolved values are shown
        out.pop(field, None)
    return out


# ---------------------------------------------------------------------------------------
# Parsing


_AT_RE = re.compile(r" - at `\$(.*)`$")
_FIELD_RE = re.compile(r"(unknown|required) field `([^`]*)`")


def _spec_error(exc: msgspec.ValidationError, patch: bool) -> SpecError:
    msg = str(exc)
    at = _AT_RE.search(msg)
    path = at.group(1).lstrip(".") if at else ""
    reason = _AT_RE.sub("", msg)
    named = _FIELD_RE.search(reason)
    if named:
        kind, name = named.groups()
        key = f"{path}.{name}" if path else name
        if kind == "required":
            return SpecError(key, "is required")
        if not path and patch and name in _SPEC_FIELDS:
            return SpecError(
                key,
                "cannot be changed with PATCH /workers/{id}; use PUT /workers/{id} "
                "or DELETE + POST",
            )
        if not path and name == "models":
            return SpecError(key, "is not supported; name the model with model_id")
        if not path and name in _RUST_ONLY_FIELDS:
            return SpecError(key, "is a Rust SMG worker field that smg does not support")
        return SpecError(key, "unknown field")
    key = path.replace("[...]", "") or "body"
    return SpecError(key, reason)


def _decode(body: bytes, tp: type[Any], patch: bool) -> Any:
    if len(body) > _MAX_BODY:
        raise SpecError("body", f"larger than {_MAX_BODY} bytes")
    try:
        return msgspec.json.decode(body, type=tp)
    except msgspec.ValidationError as exc:
        raise _spec_error(exc, patch) from None
    except msgspec.DecodeError as exc:
        raise SpecError("body", f"not valid JSON: {exc}") from None


def parse_worker_spec(body: bytes) -> WorkerSpec:
    """Decode and validate a `POST /workers` (or PUT) body; SpecError on any problem."""
    return validate_worker_spec(_decode(body, WorkerSpec, patch=False))


def parse_worker_patch(body: bytes) -> WorkerPatch:
    """Decode and validate a `PATCH /workers/{id}` body; SpecError on any problem."""
    return validate_worker_patch(_decode(body, WorkerPatch, patch=True))
