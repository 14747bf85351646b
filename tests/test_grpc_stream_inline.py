"""A running gRPC stream's batches are written inline (GrpcExchange._generate, no
coroutine per batch): the client's back-pressure still pauses the task mid-stream, and
the bytes are those of the general path."""

from __future__ import annotations

import asyncio

from tests.test_grpc_frontend import Rig, Script, out, rig, split_chunks

__all__ = ["rig"]  # the fixture, shared with test_grpc_frontend


def test_back_pressure_mid_stream_pauses_the_task(rig: Rig) -> None:
    outputs = [out(0, [1]), out(0, [2]), out(0, [3], finished=True)]
    rig.client(0).scripts.append(Script(list(outputs)))
    rig.client(1).scripts.append(Script(list(outputs)))
    conn, exchange = rig.start({"prompt": "p", "stream": True})
    transport = exchange.upstream.transport
    transport.pause_reading()  # full before the head: the head path waits
    rig.loop.run_until_complete(asyncio.sleep(0.02))
    _head, chunks = split_chunks(bytes(conn.out) + b"0\r\n\r\n")
    assert chunks == [b"data: start\n\ndata: 0 <1> -\n\n"]
    # Drained, and full again at once: the next batch is written inline, then waits.
    transport.resume_reading()
    transport.pause_reading()
    rig.loop.run_until_complete(asyncio.sleep(0.02))
    _head, chunks = split_chunks(bytes(conn.out) + b"0\r\n\r\n")
    assert chunks == [b"data: start\n\ndata: 0 <1> -\n\n", b"data: 0 <2> -\n\n"]
    assert not exchange.finished
    transport.resume_reading()
    rig.run(exchange)
    _head, chunks = split_chunks(bytes(conn.out))
    assert chunks[:2] == [b"data: start\n\ndata: 0 <1> -\n\n", b"data: 0 <2> -\n\n"]
    assert len(chunks) == 4
