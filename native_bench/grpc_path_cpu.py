#!/usr/bin/env python3
"""CPU of smg's gRPC request path in one process, without sockets (the part of a gRPC
request's CPU that is Python overhead, measurable on a noisy box: process CPU time, the
best of several rounds). Per request, as GrpcExchange._serve/_generate run it:

    setup   prepare_chat, Defaults, parser plan, request proto built and serialized,
            writer and choice states made, the stream's first chunk (writer.start): the
            first-token path outside rendering and tokenizing;
    tokens  --tokens serialized vLLM GenerateResponse chunks (one token each, as the
            mock sends them) read (chunk_output), normalized, through _Run.add and the
            writer to SSE bytes, in batches of --batch messages; then the complete and
            the last chunk: the per-token path.

The prompt is tokenized once, outside the timing (tokenizing is measured elsewhere:
native_bench/grpc_tokenize.py). --parsers qwen: the qwen tool parser and qwen3 reasoning
parser on, the reply text of grpc_bench's parser mode, `tools` in the request. The SSE
bytes of the whole run are hashed: two revisions must print the same digest.

    .venv/bin/python native_bench/grpc_path_cpu.py --requests 300
    PYTHONPATH=/path/to/other/tree .venv/bin/python native_bench/grpc_path_cpu.py
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpc_bench  # noqa: E402  (the model dir, the parser-mode reply text)


def _chunks(pb: Any, ids: list[int], prompt: int) -> list[bytes]:
    """The mock's stream for `ids`: a chunk per token, then the complete (last token)."""
    out = []
    for token in ids[:-1]:
        msg = pb.GenerateResponse()
        c = msg.chunk
        c.token_ids.append(token)
        c.prompt_tokens = prompt
        c.completion_tokens = 1
        out.append(msg.SerializeToString())
    msg = pb.GenerateResponse()
    done = msg.complete
    done.output_ids.append(ids[-1])
    done.finish_reason = "stop"
    done.prompt_tokens = prompt
    done.completion_tokens = len(ids)
    out.append(msg.SerializeToString())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="messages per socket read")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parsers", choices=["qwen"], default=None)
    opts = ap.parse_args()

    import smg
    from smg.grpc import protos
    from smg.grpc.frontend import Stages, _Run
    from smg.grpc.protos import StreamNormalizer, build_generate_request, chunk_output
    from smg.grpc.types import GenerateInput
    from smg.grpc.workers import _default_template_factory
    from smg.tokenizer import load_tokenizer
    from smg.tokenizer.bytelevel import byte_tables

    print(f"smg from {Path(smg.__file__).parent}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="grpc-path-cpu-"))
    model_dir = grpc_bench.make_model_dir(tmp / "llama3")
    tok = load_tokenizer(str(model_dir))
    byte_tables(tok)
    tok.enable_fast_path()
    template = _default_template_factory(tok)
    pb = protos.vll
    rng = random.Random(0)
    words = [tok.decode([rng.randrange(1000, 100000)]) for _ in range(600)]
    prompt_text = "".join(words)
    body: dict[str, Any] = {
        "model": "llama3",
        "messages": [{"role": "user", "content": prompt_text}],
        "max_tokens": opts.tokens,
        "stream": True,
    }
    if opts.parsers:
        reply = grpc_bench.reply_text(opts.parsers, opts.tokens, lambda t: len(tok.encode(t)))
        out_ids = [*tok.encode(reply), tok.eos_token_ids[0]]
        body["tools"] = [grpc_bench.TOOL]
        stages = Stages(*grpc_bench.PARSER_FAMILIES[opts.parsers])
    else:
        body["ignore_eos"] = True
        out_ids = [rng.randrange(1000, 100000) for _ in range(opts.tokens)]
        stages = Stages()
    stream = _chunks(pb, out_ids, 1024)
    batches = [stream[i : i + opts.batch] for i in range(0, len(stream), opts.batch)]
    ids = stages.prompt_ids(
        stages.prepare("chat", body, stages.defaults(tok, None)), tok, template
    )[0]

    class _Spec:
        labels: dict[str, str] = {}

    class _Entry:  # the directory entry fields the parser selector reads
        grpc = None
        models = ["llama3"]
        spec = _Spec()

    entry: Any = _Entry()
    digest = hashlib.sha256()

    def one(r: int, sink: Any) -> tuple[float, float]:
        t0 = time.process_time()
        prepared = stages.prepare("chat", body, stages.defaults(tok, None))
        stages.apply_limits(prepared, len(ids), 131072)
        request_id = f"chatcmpl-{r:08d}"
        req = GenerateInput(
            request_id=request_id, input_ids=ids, sampling=prepared.sampling,
            stream=True, text=prompt_text,
        )  # fmt: skip
        sent = len(build_generate_request("vllm", req).SerializeToString())
        plan = stages.parsers(prepared, entry, template, "llama3")
        run = _Run(stages, prepared, tok, len(ids), plan)
        writer = stages.writer(prepared, request_id, "llama3", 1700000000, tok)
        writer.prompt_tokens = len(ids)
        if plan is not None:
            writer.use_parsers()
        feed = StreamNormalizer().feed
        t1 = time.process_time()
        first = True
        for raw in batches:
            events = []
            outs = []
            for m in raw:
                out = chunk_output("vllm", m)
                if out is None:
                    out = protos.output_from("vllm", pb.GenerateResponse.FromString(m))
                out = feed(out)
                if out is not None:
                    outs.append(out)
            for out in outs:
                d = run.add(out)
                b = writer.delta(d)
                if b:
                    events.append(b)
            if first:
                sink(writer.start())
                first = False
            sink(b"".join(events))
        sink(writer.end(stages.usage(*run.usage())))
        t2 = time.process_time()
        assert sent > len(ids)  # the request was built (the ids are in it)
        return t1 - t0, t2 - t1

    outs: list[bytes] = []
    one(0, outs.append)  # warm
    # Tool call ids are random (uuid4): masked so that two runs compare.
    digest.update(re.sub(rb"chatcmpl-tool-[0-9a-f]{32}", b"chatcmpl-tool-X", b"".join(outs)))
    best_setup = best_tokens = float("inf")
    for _ in range(opts.rounds):
        s_sum = t_sum = 0.0
        for r in range(opts.requests):
            s, t = one(r, lambda _b: None)
            s_sum += s
            t_sum += t
        best_setup = min(best_setup, s_sum / opts.requests)
        best_tokens = min(best_tokens, t_sum / opts.requests)
    print(
        f"setup {best_setup * 1e6:.1f} us/request, tokens {best_tokens * 1e6:.1f} us/request "
        f"({best_tokens * 1e6 / opts.tokens:.2f} us/token), sse sha256 {digest.hexdigest()[:16]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
