"""`smg bench stub`: a minimal, fast OpenAI-compatible server for calibrating the client.

It answers /v1/completions, /v1/chat/completions, /generate (SGLang), /v1/embeddings
and GET /v1/models straight from an asyncio protocol with httptools, so it costs far
less per request than a real server and the client's own limits show. With
--ttft-ms/--itl-ms it paces the stream; with both 0 a whole stream goes in one write.
Chat streams start with a role-only chunk, end with a usage chunk and `[DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
from typing import Any

import httptools
import orjson

from smg.bench.runner import new_loop, run_interruptibly


class StubConfig:
    def __init__(
        self,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        output_len: int = 16,
        tokens_per_chunk: int = 1,
        error_rate: float = 0.0,
        seed: int = 0,
        model: str = "stub-model",
    ) -> None:
        self.ttft = ttft_ms / 1000.0
        self.itl = itl_ms / 1000.0
        self.output_len = output_len
        self.tokens_per_chunk = max(1, tokens_per_chunk)
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.model = model
        self.requests = 0


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            return int(body[key])
    sp = body.get("sampling_params")
    if isinstance(sp, dict) and isinstance(sp.get("max_new_tokens"), int):
        return int(sp["max_new_tokens"])
    return default


def stream_events(path: str, model: str, n_tokens: int, per_chunk: int) -> list[bytes]:
    """SSE events for one streamed response (pure; also used by the tests)."""
    events: list[bytes] = []
    n_chunks = (n_tokens + per_chunk - 1) // per_chunk
    if path.endswith("/chat/completions"):
        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model}
        events.append(
            _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        )
        for i in range(n_chunks):
            k = min(per_chunk, n_tokens - i * per_chunk)
            delta = {"content": "tok " * k}
            events.append(_sse({**base, "choices": [{"index": 0, "delta": delta}]}))
        events.append(
            _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        )
        usage = {"prompt_tokens": 1, "completion_tokens": n_tokens, "total_tokens": n_tokens + 1}
        events.append(_sse({**base, "choices": [], "usage": usage}))
    elif path.endswith("/generate"):
        text = ""
        for i in range(n_chunks):
            k = min(per_chunk, n_tokens - i * per_chunk)
            text += "tok " * k
            meta = {"prompt_tokens": 1, "completion_tokens": min(n_tokens, (i + 1) * per_chunk)}
            events.append(_sse({"text": text, "meta_info": meta}))
    else:
        base = {"id": "c", "object": "text_completion", "created": 0, "model": model}
        for i in range(n_chunks):
            k = min(per_chunk, n_tokens - i * per_chunk)
            events.append(_sse({**base, "choices": [{"index": 0, "text": "tok " * k}]}))
        usage = {"prompt_tokens": 1, "completion_tokens": n_tokens, "total_tokens": n_tokens + 1}
        events.append(_sse({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def whole_body(path: str, model: str, n_tokens: int) -> bytes:
    usage = {"prompt_tokens": 1, "completion_tokens": n_tokens, "total_tokens": n_tokens + 1}
    text = "tok " * n_tokens
    if path.endswith("/embeddings"):
        return orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0]}],
                "model": model,
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )
    if path.endswith("/generate"):
        return orjson.dumps(
            {"text": text, "meta_info": {"prompt_tokens": 1, "completion_tokens": n_tokens}}
        )
    if path.endswith("/chat/completions"):
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        return orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion",
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )
    return orjson.dumps(
        {
            "id": "c",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": text}],
            "usage": usage,
        }
    )


class StubProtocol(asyncio.Protocol):
    def __init__(self, cfg: StubConfig) -> None:
        self.cfg = cfg
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.loop = asyncio.get_event_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond(
                400,
                b'{"error":{"message":"bad request","type":"invalid_request_error","code":400}}',
            )
            self.transport.close()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        raw, self.body = b"".join(self.body), []
        path = url.split(b"?", 1)[0].decode("latin-1")
        try:
            self._handle(path, raw)
        except Exception as exc:  # a request never kills the stub
            msg = {"error": {"message": str(exc), "type": "internal_error", "code": 500}}
            self._respond(500, orjson.dumps(msg))

    def _respond(self, status: int, body: bytes) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
            status,
            reason.get(status, b"Error"),
            len(body),
        )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head + body)

    def _handle(self, path: str, raw: bytes) -> None:
        cfg = self.cfg
        if path == "/v1/models":
            data = {
                "object": "list",
                "data": [{"id": cfg.model, "object": "model", "root": cfg.model}],
            }
            self._respond(200, orjson.dumps(data))
            return
        known = ("/v1/completions", "/v1/chat/completions", "/generate", "/v1/embeddings")
        if path not in known:
            err = {"error": {"message": f"no route {path}", "type": "not_found", "code": 404}}
            self._respond(404, orjson.dumps(err))
            return
        cfg.requests += 1
        body = orjson.loads(raw) if raw else {}
        if cfg.error_rate and cfg.rng.random() < cfg.error_rate:
            err = {"error": {"message": "injected", "type": "internal_error", "code": 500}}
            self._respond(500, orjson.dumps(err))
            return
        n = max(1, _max_tokens(body, cfg.output_len))
        stream = bool(body.get("stream")) and not path.endswith("/embeddings")
        if not stream:
            self._respond(200, whole_body(path, cfg.model, n))
            return
        events = stream_events(path, cfg.model, n, cfg.tokens_per_chunk)
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        transport = self.transport
        assert transport is not None
        if cfg.ttft == 0 and cfg.itl == 0:
            transport.write(head + b"".join(_chunked(e) for e in events) + b"0\r\n\r\n")
            return
        transport.write(head)
        lead = 1 if path.endswith("/chat/completions") else 0
        if lead:
            transport.write(_chunked(events[0]))
        # Role chunk goes at once; the first content chunk at TTFT, then one per ITL;
        # trailing events (finish, usage, [DONE]) go with the last content chunk. Each
        # write schedules the next, so chunks can never be reordered by the timer heap.
        n_content = (n + cfg.tokens_per_chunk - 1) // cfg.tokens_per_chunk
        pieces = [
            *events[lead : lead + n_content - 1],
            b"".join(events[lead + n_content - 1 :]),
        ]
        t0 = self.loop.time() + cfg.ttft
        self.loop.call_at(t0, self._write_next, pieces, 0, t0)

    def _write_next(self, pieces: list[bytes], i: int, t0: float) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        last = i == len(pieces) - 1
        t.write(_chunked(pieces[i]) + (b"0\r\n\r\n" if last else b""))
        if not last:
            self.loop.call_at(t0 + (i + 1) * self.cfg.itl, self._write_next, pieces, i + 1, t0)


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(cfg: StubConfig, sock: socket.socket, ready: Any = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(cfg), sock=sock)
    if ready is not None:
        ready(sock.getsockname()[1])
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="smg bench stub", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--output-len", type=int, default=16, help="tokens when the body gives none")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="stub-model")
    args = p.parse_args(argv)
    cfg = StubConfig(
        args.ttft_ms,
        args.itl_ms,
        args.output_len,
        args.tokens_per_chunk,
        args.error_rate,
        args.seed,
        args.model,
    )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"smg bench stub: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    loop = new_loop()

    def ready(port: int) -> None:
        print(f"listening on {args.host}:{port}", flush=True)

    try:
        run_interruptibly(loop, serve(cfg, sock, ready))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0
