"""A scripted HTTP/2 peer's two chores, for tests that stand in for a gRPC engine on a
raw socket: split what the client sent into frames, and write one complete Generate
answer (tests/test_grpc_h2client.py, tests/test_grpc_keepalive.py)."""

from __future__ import annotations

import struct

from smg_grpc_proto.generated import vllm_engine_pb2 as vll

from smg.grpc.h2wire import END_HEADERS, END_STREAM, HEADERS, PREFACE, _literal, frame

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


def take_frames(buf: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of `buf` (the client preface skipped) and the rest."""
    if buf.startswith(PREFACE):
        buf = buf[len(PREFACE) :]
    frames: list[Frame] = []
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            break
        sid = int.from_bytes(buf[5:9], "big")
        frames.append((buf[3], buf[4], sid, buf[9 : 9 + length]))
        buf = buf[9 + length :]
    return frames, buf


def generate_answer(sid: int, output_ids: list[int]) -> bytes:
    """A finished GenerateResponse on stream `sid`: headers, one message, grpc-status 0."""
    msg = vll.GenerateResponse(
        complete=vll.GenerateComplete(output_ids=output_ids, finish_reason="stop")
    ).SerializeToString()
    head = b"\x88" + _literal("content-type", "application/grpc")
    return (
        frame(HEADERS, END_HEADERS, sid, head)
        + frame(0, 0, sid, b"\x00" + struct.pack(">I", len(msg)) + msg)
        + frame(HEADERS, END_HEADERS | END_STREAM, sid, _literal("grpc-status", "0"))
    )
