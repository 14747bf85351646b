"""The local channel between processes: length-prefixed msgpack frames over Unix sockets.

Sockets live in the abstract namespace (Linux), named after the root supervisor's pid, so
nothing is left on disk when a process dies. Only admin requests, metric scrapes and
control messages use it; the routing path never does.

An abstract socket has no file permissions: any local user can connect to it (or bind a
name first). So both ends check the other's credentials (SO_PEERCRED, taken by the kernel
at connect and listen time): a server drops a peer of another user before reading a byte,
and a client refuses a server of another user (one squatting a name during a restart).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

_LENGTH = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid

log = logging.getLogger("smg.ipc")


class PeerRefused(ConnectionError):
    pass


def peer_uid(sock: socket.socket) -> int:
    """The effective uid of the process at the other end of a connected Unix socket."""
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return uid


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
            uid = peer_uid(sock)
            if uid != os.geteuid():
                raise PeerRefused(f"{address[1:]!r} is served by uid {uid}, not by this gateway")
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
    own_uid = os.geteuid()
    warned: set[int] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
        except OSError:
            uid = -1
        if uid != own_uid:
            if uid not in warned:  # once per uid: a refused peer must not flood the log
                warned.add(uid)
                log.warning("refused a connection from uid %d to %r", uid, address[1:])
            writer.close()
            return
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
