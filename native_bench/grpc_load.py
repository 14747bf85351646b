#!/usr/bin/env python3
"""Direct gRPC load on the mock engine: output tokens/s with no gateway in between.

Starts `smg mock-worker --grpc` (itl 0: as fast as it goes) with --processes K for each K
asked, then drives it from several client processes (grpc.aio; one channel each), keeping
`--concurrency` Generate streams open in total for `--seconds`, each asking `--tokens` output
tokens with ignore_eos (one token per chunk), and counts the tokens received.

    .venv/bin/python native_bench/grpc_load.py --processes 1 2 4 --clients 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import grpc_bench  # noqa: E402  (the model dir and the mock starter)


async def _client(
    target: str, backend: str, streams: int, tokens: int, seconds: float
) -> dict[str, Any]:
    import grpc
    from smg_grpc_proto.generated import (
        sglang_scheduler_pb2,
        sglang_scheduler_pb2_grpc,
        vllm_engine_pb2,
        vllm_engine_pb2_grpc,
    )

    channel = grpc.aio.insecure_channel(target)
    if backend == "vllm":
        pb, stub = vllm_engine_pb2, vllm_engine_pb2_grpc.VllmEngineStub(channel)
        params = pb.SamplingParams(
            max_tokens=tokens, ignore_eos=True, n=1, temperature=1.0, top_p=1.0
        )
    else:
        pb, stub = sglang_scheduler_pb2, sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        params = pb.SamplingParams(
            max_new_tokens=tokens, ignore_eos=True, n=1, temperature=1.0, top_p=1.0
        )
    prompt = pb.TokenizedInput(input_ids=list(range(1000, 1128)))
    end = time.monotonic() + seconds
    counts = {"tokens": 0, "requests": 0, "errors": 0}

    async def loop(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            req = pb.GenerateRequest(
                request_id=f"{os.getpid()}-{i}-{n}",
                tokenized=prompt,
                sampling_params=params,
                stream=True,
            )
            n += 1
            try:
                async for msg in stub.Generate(req):
                    if msg.HasField("chunk"):
                        counts["tokens"] += len(msg.chunk.token_ids)
                counts["requests"] += 1
            except grpc.aio.AioRpcError:
                counts["errors"] += 1

    await asyncio.gather(*(loop(i) for i in range(streams)))
    await channel.close()
    return counts


class RawClient(asyncio.Protocol):
    """A bare HTTP/2 gRPC client for the vLLM mock: one connection, `streams` Generate calls
    kept open, tokens counted from the first byte of each message (0x0a: a chunk) without
    decoding protobuf, so the client costs a few microseconds per token."""

    def __init__(
        self, path: str, body: bytes, streams: int, end: float, done: asyncio.Future[None]
    ) -> None:
        from smg.mock_worker.h2fast import PREFACE, SETTINGS, WINDOW_UPDATE, _literal, frame

        self.frame, self.WINDOW_UPDATE = frame, WINDOW_UPDATE
        self.headers = (
            b"\x83\x86"  # :method POST, :scheme http
            + _literal(":path", path)
            + _literal(":authority", "mock")
            + _literal("content-type", "application/grpc")
            + _literal("te", "trailers")
        )
        self.body = b"\x00" + struct.pack(">I", len(body)) + body
        self.streams, self.end, self.done = streams, end, done
        self.preface = (
            PREFACE
            + frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1 << 30))
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30))
        )
        self.buf = bytearray()
        self.next_sid = 1
        self.open: dict[int, bytearray] = {}
        self.unacked = 0
        self.counts = {"tokens": 0, "requests": 0, "errors": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        out = [self.preface]
        for _ in range(self.streams):
            out.append(self._start())
        transport.write(b"".join(out))

    def _start(self) -> bytes:
        sid = self.next_sid
        self.next_sid += 2
        self.open[sid] = bytearray()
        return self.frame(1, 0x4, sid, self.headers) + self.frame(0, 0x1, sid, self.body)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        out: list[bytes] = []
        while n - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if n - pos < 9 + length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            body = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if ftype == 0:  # DATA
                self.unacked += length
                acc = self.open.get(sid)
                if acc is None:
                    continue
                acc += body
                i = 0
                while len(acc) - i >= 5:
                    mlen = int.from_bytes(acc[i + 1 : i + 5], "big")
                    if len(acc) - i < 5 + mlen:
                        break
                    if mlen and acc[i + 5] == 0x0A:
                        self.counts["tokens"] += 1
                    i += 5 + mlen
                del acc[:i]
            elif ftype == 1 and flags & 0x1:  # trailers
                if self.open.pop(sid, None) is not None:
                    ok = b"grpc-status\x010" in body
                    self.counts["requests" if ok else "errors"] += 1
                    if time.monotonic() < self.end:
                        out.append(self._start())
            elif ftype == 4 and not flags & 0x1:  # SETTINGS
                out.append(self.frame(4, 0x1, 0))
            elif ftype == 6 and not flags & 0x1:  # PING
                out.append(self.frame(6, 0x1, 0, bytes(body)))
        del buf[:pos]
        if self.unacked > 1 << 20:
            out.append(self.frame(self.WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        if out:
            self.t.write(b"".join(out))
        if not self.open and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _raw_client(target: str, streams: int, tokens: int, seconds: float) -> dict[str, Any]:
    from smg_grpc_proto.generated import vllm_engine_pb2 as pb

    req = pb.GenerateRequest(
        request_id="load",
        tokenized=pb.TokenizedInput(input_ids=list(range(1000, 1128))),
        sampling_params=pb.SamplingParams(
            max_tokens=tokens, ignore_eos=True, n=1, temperature=1.0, top_p=1.0
        ),
        stream=True,
    )
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    host, port = target.rsplit(":", 1)
    client = RawClient(
        "/vllm.grpc.engine.VllmEngine/Generate",
        req.SerializeToString(),
        streams,
        time.monotonic() + seconds,
        done,
    )
    transport, _ = await loop.create_connection(lambda: client, host, int(port))
    await done
    transport.close()
    return client.counts


def _client_proc(args: tuple[str, str, int, int, float, Any, str]) -> None:
    target, backend, streams, tokens, seconds, out, kind = args
    if kind == "raw":
        out.put(asyncio.run(_raw_client(target, streams, tokens, seconds)))
    else:
        out.put(asyncio.run(_client(target, backend, streams, tokens, seconds)))


def measure(
    model_dir: Path,
    backend: str,
    processes: int,
    clients: int,
    concurrency: int,
    tokens: int,
    seconds: float,
    kind: str = "raw",
) -> dict[str, Any]:
    mock = grpc_bench.start_mock(model_dir, backend, processes=processes, itl_ms=0.0)
    try:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        per = [
            concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)
        ]
        procs = [
            ctx.Process(
                target=_client_proc, args=((mock.target, backend, n, tokens, seconds, out, kind),)
            )
            for n in per
        ]
        cpu0 = grpc_bench.tree_cpu_seconds(mock.proc.pid)
        start = time.monotonic()
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 120) for _ in procs]
        wall = time.monotonic() - start
        cpu = grpc_bench.tree_cpu_seconds(mock.proc.pid) - cpu0
        for p in procs:
            p.join(30)
    finally:
        mock.stop()
    total = sum(r["tokens"] for r in results)
    return {
        "backend": backend,
        "mock_processes": processes,
        "client": kind,
        "client_processes": clients,
        "concurrency": concurrency,
        "tokens_per_request": tokens,
        "seconds": round(wall, 2),
        "tokens": total,
        "requests": sum(r["requests"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "tokens_per_s": round(total / wall),
        "mock_cpu_s": round(cpu, 2),
        "mock_cpu_us_per_token": round(cpu / total * 1e6, 1) if total else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=("vllm", "sglang"), default="vllm")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="mock processes")
    ap.add_argument("--clients", type=int, default=2, help="load client processes")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--client",
        choices=("raw", "aio"),
        default="raw",
        help="raw: a bare HTTP/2 client (vllm only); aio: grpc.aio with protobuf decoding",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.client == "raw" and args.backend != "vllm":
        ap.error("--client raw speaks the vLLM service only")
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpc-load-") as tmp:
        model_dir = grpc_bench.make_model_dir(Path(tmp) / "llama3")
        for k in args.processes:
            row = measure(
                model_dir,
                args.backend,
                k,
                args.clients,
                args.concurrency,
                args.tokens,
                args.seconds,
                args.client,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
