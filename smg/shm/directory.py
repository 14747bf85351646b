"""The worker directory: identity data that changes rarely (URLs, model ids, labels, keys).

It is published as one encoded blob with a generation; data-plane processes decode it
again only when the generation moves, so the per-request cost is one integer read.

Each entry carries the worker's whole registered spec, so a control plane that replaces a
crashed one restores every field as it was registered (or last patched). `url`, `model_id`
and `api_key` are copied out of the spec because the data plane reads them per request.

The buffer is sized so that a full table of workers at the validator's limits fits
(`max_entry_bytes`): a spec that passes `validate_worker_spec` can always be published,
and discovered model lists are bounded here (`bound_models`) for the same reason.
"""

from __future__ import annotations

import msgspec

from smg.grpc.types import GrpcModelInfo
from smg.workers_spec import (
    MAX_API_KEY_BYTES,
    MAX_MODEL_ID_BYTES,
    MAX_PROVIDER_BYTES,
    MAX_SPEC_BYTES,
    MAX_URL_BYTES,
    WorkerSpec,
)

# A worker's discovered model list is cut to this many encoded bytes (SGLang and vLLM
# list one model plus its LoRA adapters; 8 KiB is over a hundred typical ids).
MAX_MODELS_BYTES = 8 * 1024
MAX_ENGINE_BYTES = 16  # "sglang", "vllm", "openai", "unknown"
# Room for the model aliases (--model-aliases, set at start-up) and the container.
ALIASES_BYTES = 1 << 20
_STR_HEADER = 5  # msgpack: the largest string header (str32)
# A gRPC worker's model facts (`GrpcModelInfo`), encoded, at most (`bound_grpc_info`).
MAX_GRPC_INFO_BYTES = 16 * 1024
MAX_PD_WINDOW = 2**32 - 1  # a decode's running window is cut to this (an entry's bound)


class DirectoryEntry(msgspec.Struct, array_like=True, frozen=True):
    row: int
    generation: int  # the row's generation when this worker took it
    worker_id: str
    url: str  # spec.url
    model_id: str | None  # spec.model_id: the model it was registered for (None: any)
    models: tuple[str, ...]  # the models the worker serves (discovered or given)
    api_key: str | None  # spec.api_key
    engine: str
    context_length: int | None  # discovered (max_model_len / context_length), None if unknown
    spec: WorkerSpec
    # gRPC workers only: the model facts and the tokenizer bundle's directory.
    grpc: GrpcModelInfo | None = None
    # External workers only (runtime_type external): the provider (smg.providers: openai,
    # xai, anthropic, gemini or a custom name). None: a self-hosted engine.
    provider: str | None = None
    # --dp-aware rank workers only (smg.dp): this worker's rank and its engine's dp_size;
    # `url` is then the engine's URL and the rank goes into every body sent to it.
    dp_rank: int | None = None
    dp_size: int | None = None
    # Decode workers only: the running window PD dispatch is gated by (0: none reported,
    # never gated; smg.control.registry.pd_window, smg.dataplane.pd_window).
    pd_window: int = 0


# WASM modules (`POST /wasm`, smg.wasm.registry): how many, and their strings' bounds, so
# the list always fits the buffer (WASM_BYTES).
MAX_WASM_MODULES = 64
MAX_WASM_NAME_BYTES = 256
MAX_WASM_PATH_BYTES = 4096


class WasmModuleEntry(msgspec.Struct, array_like=True, frozen=True):
    """A WASM module every data-plane process runs: published with the directory, so a
    process loads (or drops) it when the directory's generation moves, and a replacement
    control plane restores the list. The list's order is the order modules run in."""

    module_id: str  # a UUID (1.13's module_uuid)
    name: str
    file_path: str  # as registered (shown by GET /wasm)
    sha256: str  # of the module file, hex
    size_bytes: int
    created_at_ns: int
    attach_points: tuple[str, ...]  # "OnRequest", "OnResponse", "OnError"
    artifact_path: str  # the compiled component (Component.serialize), loaded as is
    artifact_sha256: str  # checked before the artifact is deserialized


class Directory(msgspec.Struct, array_like=True):
    entries: list[DirectoryEntry]
    aliases: dict[str, str] = {}
    # True once the first control plane registered the start-up workers: from then on
    # the table is the truth, and a replacement restores from it only.
    seeded: bool = False
    wasm: tuple[WasmModuleEntry, ...] = ()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Directory)


def encode_directory(directory: Directory) -> bytes:
    return _encoder.encode(directory)


def decode_directory(blob: bytes) -> Directory:
    if not blob:
        return Directory(entries=[])
    return _decoder.decode(blob)


def _encoded_str(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass")) + _STR_HEADER


def bound_models(models: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A discovered model list cut to what one directory entry has room for: ids longer
    than MAX_MODEL_ID_BYTES are dropped, and ids past MAX_MODELS_BYTES are left out."""
    kept: list[str] = []
    used = 0
    for model in models:
        size = _encoded_str(model)
        if not model or size - _STR_HEADER > MAX_MODEL_ID_BYTES:
            continue
        if used + size > MAX_MODELS_BYTES:
            break
        kept.append(model)
        used += size
    return tuple(kept)


def bound_grpc_info(info: GrpcModelInfo) -> GrpcModelInfo:
    """`info` cut to MAX_GRPC_INFO_BYTES encoded: the engine's default sampling
    parameters go first (the gateway's own defaults stand in), then the EOS list is cut."""
    if len(_encoder.encode(info)) <= MAX_GRPC_INFO_BYTES:
        return info
    info = msgspec.structs.replace(info, default_sampling_params_json="")
    while len(_encoder.encode(info)) > MAX_GRPC_INFO_BYTES and info.eos_token_ids:
        info = msgspec.structs.replace(info, eos_token_ids=info.eos_token_ids[:-1])
    if len(_encoder.encode(info)) > MAX_GRPC_INFO_BYTES:  # absurd paths or names
        info = GrpcModelInfo(backend=info.backend)
    return info


def max_entry_bytes() -> int:
    """An upper bound of one encoded entry: the fixed part measured with the largest
    integers, plus every variable part at the most the validator and `bound_models` allow
    (the spec is stored encoded as it is, so MAX_SPEC_BYTES bounds it exactly)."""
    big = 2**64 - 1
    fixed = DirectoryEntry(
        row=big,
        generation=big,
        worker_id="0" * 36,
        url="",
        model_id="",
        models=(),
        api_key="",
        engine="",
        context_length=big,
        spec=WorkerSpec(url=""),
        dp_rank=big,
        dp_size=big,
        pd_window=MAX_PD_WINDOW,
    )
    return (
        len(_encoder.encode(fixed))
        + MAX_SPEC_BYTES
        + MAX_URL_BYTES
        + MAX_MODEL_ID_BYTES
        + MAX_API_KEY_BYTES
        + MAX_MODELS_BYTES
        + MAX_ENGINE_BYTES
        + MAX_GRPC_INFO_BYTES
        + MAX_PROVIDER_BYTES
        + 6 * _STR_HEADER  # the five copied strings' and the model list's headers
    )


def wasm_bytes() -> int:
    """An upper bound of the encoded WASM module list (MAX_WASM_MODULES of the largest)."""
    big = 2**64 - 1
    fixed = WasmModuleEntry("0" * 36, "", "", "0" * 64, big, big, ("OnResponse",) * 3, "", "0" * 64)
    one = len(_encoder.encode(fixed)) + MAX_WASM_NAME_BYTES + 2 * MAX_WASM_PATH_BYTES
    return _STR_HEADER + MAX_WASM_MODULES * (one + 3 * _STR_HEADER)


def directory_capacity(workers: int) -> int:
    """Bytes one directory buffer needs for `workers` entries of the largest size."""
    return ALIASES_BYTES + wasm_bytes() + workers * max_entry_bytes()
