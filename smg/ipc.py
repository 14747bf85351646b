"""The local channel between processes: length-prefixed msgpack frames over Unix sockets.

Sockets live in the abstract namespace (Linux), named after the root supervisor's pid, so
nothing is left on disk when a process dies. Only admin requests, metric scrapes and
control messages use it; the routing path never does.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

_LENGTH = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def control_plane_address(root_pid: int) -> str:
    return f"\0smg-{root_pid}-control"


def dataplane_address(root_pid: int, index: int) -> str:
    return f"\0smg-{root_pid}-dp-{index}"


async def read_frame(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(_LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is larger than {MAX_FRAME}")
    return _decoder.decode(await reader.readexactly(length))


def encode_frame(message: Any) -> bytes:
    payload = _encoder.encode(message)
    return _LENGTH.pack(len(payload)) + payload


async def call(address: str, message: Any, timeout: float) -> Any:
    """One request, one answer, on a fresh connection (admin traffic is rare)."""

    async def _call() -> Any:
        # uvloop refuses abstract-namespace paths as strings; a connected socket works.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            writer.write(encode_frame(message))
            await writer.drain()
            return await read_frame(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(_call(), timeout)


Handler = Callable[[Any], Awaitable[Any]]


async def serve(address: str, handler: Handler) -> asyncio.AbstractServer:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    message = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                writer.write(encode_frame(await handler(message)))
                await writer.drain()
        except Exception:  # a broken peer must not take the server down
            return
        finally:
            writer.close()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(128)
    sock.setblocking(False)
    return await asyncio.start_unix_server(on_client, sock=sock)
