"""The worker directory: identity data that changes rarely (URLs, model ids, labels, keys).

It is published as one encoded blob with a generation; data-plane processes decode it
again only when the generation moves, so the per-request cost is one integer read.
"""

from __future__ import annotations

import msgspec


class DirectoryEntry(msgspec.Struct, array_like=True, frozen=True):
    row: int
    generation: int  # the row's generation when this worker took it
    worker_id: str
    url: str
    model_id: str | None  # the model the worker was registered for (None: any it serves)
    models: tuple[str, ...]  # the models the worker serves (discovered or given)
    worker_type: str
    connection_mode: str
    api_key: str | None
    labels: dict[str, str]
    priority: int
    cost: float
    engine: str


class Directory(msgspec.Struct, array_like=True):
    entries: list[DirectoryEntry]
    aliases: dict[str, str] = {}


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Directory)


def encode_directory(directory: Directory) -> bytes:
    return _encoder.encode(directory)


def decode_directory(blob: bytes) -> Directory:
    if not blob:
        return Directory(entries=[])
    return _decoder.decode(blob)
