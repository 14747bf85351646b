"""`smg mock-worker --grpc` options and its runtime-mutable config (pure: no sockets).

smg mock-worker --grpc --host 127.0.0.1 --port P --grpc-backend vllm|sglang
    --tokenizer-path DIR --model NAME --max-context-length N [--processes K]
    [--itl-ms X] [--ttft-ms Y] [--output-mode echo|random|text:<...>] [--eos-after N]
    [--control-port Q] [--prefix-cache-tokens N] [--dp-size N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import grpc

from smg.mock_worker.grpc_script import parse_output_mode
from smg.mock_worker.options import apply_rules, int_arg, non_negative_arg

BACKENDS = ("vllm", "sglang")
STATUS_NAMES = frozenset(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)


@dataclasses.dataclass(frozen=True)
class GrpcOptions:
    backend: str = "vllm"
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port (shared by every process with --processes)
    tokenizer_path: str = ""
    model: str = "mock-model"
    model_path: str = ""  # what GetModelInfo reports as model_path ("" -> the tokenizer path)
    max_context_length: int = 8192
    processes: int = 1
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_mode: str = "random"
    eos_after: int | None = None
    control_port: int | None = None  # None: no control server; 0: an ephemeral one
    prefix_cache_tokens: int = 0
    health_fail: bool = False
    impl: str = "fast"  # "fast": smg/mock_worker/h2fast.py; "aio": grpc.aio (the reference)
    child: bool = False  # internal: one of --processes' children (prints no URL line)
    pd_role: str | None = None  # "prefill" | "decode" (grpc_pd.py); None: plain
    bootstrap_port: int = 8998  # SGLang's --disaggregation-bootstrap-port default; 0: ephemeral
    pd_wait_s: float = 5.0
    kv_connector: str = "nixl"  # vLLM PD: "nixl" (params relayed) or "mooncake" (push-based)
    # Data parallelism as GetServerInfo reports it (SGLang server_args.dp_size, vLLM
    # data_parallel_size): a request's data_parallel_rank outside [0, dp_size) is refused;
    # /stats "requests_by_dp_rank" counts the ranks received (as the HTTP mock's --dp-size).
    dp_size: int = 1


@dataclasses.dataclass
class GrpcRuntime:
    """What `POST /config` may change while the mock runs."""

    healthy: bool = True
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    delay_ms: float = 0.0  # before every unary answer and before Generate's first message
    fail_next: int = 0  # fail this many of the next Generate calls ...
    fail_code: str = "UNAVAILABLE"  # ... with this gRPC status ...
    fail_after_tokens: int = 0  # ... after this many tokens of choice 0 (0: before the first)
    fail_message: str = "mock failure"
    waiting: int = 0  # GetLoads' num_waiting_reqs
    output_mode: str = "random"  # as --output-mode
    eos_after: int | None = None  # as --eos-after

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**31


def _mode_ok(v: Any) -> bool:
    try:
        parse_output_mode(v)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "healthy": (lambda v: isinstance(v, bool), "a boolean"),
    "ttft_ms": (_num, "a non-negative number"),
    "itl_ms": (_num, "a non-negative number"),
    "delay_ms": (_num, "a non-negative number"),
    "fail_next": (_int, "a non-negative integer"),
    "fail_code": (lambda v: v in STATUS_NAMES, "a gRPC status code name such as UNAVAILABLE"),
    "fail_after_tokens": (_int, "a non-negative integer"),
    "fail_message": (lambda v: isinstance(v, str), "a string"),
    "waiting": (_int, "a non-negative integer"),
    "output_mode": (_mode_ok, "echo, random, text:<string> or reply:<string>"),
    "eos_after": (lambda v: v is None or _int(v), "null or a non-negative integer"),
}


def apply_update(cfg: GrpcRuntime, update: Any) -> str | None:
    """Validate the whole update, then apply it; an error message or None."""
    return apply_rules(cfg, update, _RULES)


def _mode(text: str) -> str:
    try:
        parse_output_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smg mock-worker --grpc",
        description="Mock vLLM/SGLang gRPC engine: streams token ids at a set pace.",
    )
    p.add_argument("--grpc", action="store_true", required=True, help="serve gRPC")
    p.add_argument("--grpc-backend", choices=BACKENDS, default="vllm", help="the service served")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_arg(0, 65535), default=0, help="0: an ephemeral port")
    p.add_argument("--tokenizer-path", required=True, help="directory with tokenizer.json")
    p.add_argument("--model", default="mock-model", help="served_model_name")
    p.add_argument("--model-path", default="", help="GetModelInfo model_path")
    p.add_argument("--max-context-length", type=int_arg(1, 2**31 - 1), default=8192)
    p.add_argument(
        "--processes",
        type=int_arg(1, 64),
        default=1,
        help="serving processes on one SO_REUSEPORT port (stats and config are per process)",
    )
    p.add_argument("--ttft-ms", type=non_negative_arg, default=0.0, help="time to first token")
    p.add_argument("--itl-ms", type=non_negative_arg, default=0.0, help="time between tokens")
    p.add_argument(
        "--output-mode",
        type=_mode,
        default="random",
        help="echo (the prompt's ids), random (seeded by the request's seed), text:<string> "
        "(repeated), reply:<string> (once, then EOS)",
    )
    p.add_argument(
        "--reply-file",
        default=None,
        help="answer every request with this file's text (as plain text, one token per "
        "message), then finish 'stop': --output-mode reply:<the file's text>",
    )
    p.add_argument(
        "--eos-after",
        type=int_arg(0, 2**31),
        default=None,
        help="end each choice with the EOS id after N tokens (unless ignore_eos)",
    )
    p.add_argument(
        "--control-port",
        type=int_arg(0, 65535),
        default=None,
        help="HTTP control port for tests (GET /stats, POST /config, POST /reset); 0: ephemeral",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int_arg(0, 2**40),
        default=0,
        help="simulated prefix cache (16-token blocks, LRU) for cached_tokens; 0: none",
    )
    p.add_argument("--health-fail", action="store_true", help="start unhealthy")
    p.add_argument(
        "--grpc-impl",
        choices=("fast", "aio"),
        default="fast",
        help="server: fast (a minimal HTTP/2 server, ~10x less CPU per token) or aio (grpc.aio)",
    )
    p.add_argument(
        "--pd-role",
        choices=("prefill", "decode"),
        default=None,
        help="prefill/decode disaggregation role (grpc_pd.py): sglang checks "
        "disaggregated_params and bootstrap rooms, vllm NIXL-style kv_transfer_params; "
        "served with --grpc-impl aio",
    )
    p.add_argument(
        "--bootstrap-port",
        type=int_arg(0, 65535),
        default=None,
        help="a prefill's bootstrap server port (default 8998; 0: ephemeral), announced as "
        "'MOCK_WORKER_BOOTSTRAP <url> <port>'; an sglang decode's port for bootstrap_port 0",
    )
    p.add_argument(
        "--pd-wait-s",
        type=non_negative_arg,
        default=5.0,
        help="how long a decode waits for its prefill before failing (INTERNAL)",
    )
    p.add_argument(
        "--kv-connector",
        choices=("nixl", "mooncake"),
        default="nixl",
        help="vllm PD: the KV connector GetServerInfo reports and the mock checks "
        "(nixl: the prefill's kv_transfer_params relayed; mooncake: a router-minted "
        "transfer_id, remote_engine_id and remote_bootstrap_addr)",
    )
    p.add_argument(
        "--dp-size",
        type=int_arg(1, 1024),
        default=1,
        help="the dp_size GetServerInfo reports; a Generate's data_parallel_rank outside "
        "[0, N) is refused (INVALID_ARGUMENT); /stats requests_by_dp_rank counts the ranks",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_grpc_options(argv: list[str]) -> GrpcOptions:
    """Parse argv; argparse raises SystemExit on --help or a bad flag."""
    ns = build_parser().parse_args(argv)
    if ns.processes > 1 and ns.control_port is not None:
        build_parser().error("--control-port needs --processes 1 (stats are per process)")
    if ns.bootstrap_port is not None and ns.pd_role is None:
        build_parser().error("--bootstrap-port needs --pd-role")
    if ns.pd_role is not None and ns.processes > 1:
        build_parser().error("--pd-role needs --processes 1 (one bootstrap server, one book)")
    if ns.pd_role is not None and ns.grpc_impl == "fast" and "--grpc-impl" in argv:
        build_parser().error("--pd-role is served by --grpc-impl aio")
    bootstrap_port = 8998 if ns.bootstrap_port is None else ns.bootstrap_port
    if ns.pd_role == "decode" and bootstrap_port == 0:
        build_parser().error("--bootstrap-port 0 (ephemeral) is for a prefill only")
    output_mode = ns.output_mode
    if ns.reply_file is not None:
        try:
            with open(ns.reply_file, encoding="utf-8") as f:
                output_mode = "reply:" + f.read()
        except (OSError, UnicodeDecodeError) as e:
            build_parser().error(f"--reply-file: {e}")
    return GrpcOptions(
        backend=ns.grpc_backend,
        host=ns.host,
        port=ns.port,
        tokenizer_path=ns.tokenizer_path,
        model=ns.model,
        model_path=ns.model_path,
        max_context_length=ns.max_context_length,
        processes=ns.processes,
        ttft_ms=ns.ttft_ms,
        itl_ms=ns.itl_ms,
        output_mode=output_mode,
        eos_after=ns.eos_after,
        control_port=ns.control_port,
        prefix_cache_tokens=ns.prefix_cache_tokens,
        health_fail=ns.health_fail,
        impl="aio" if ns.pd_role is not None else ns.grpc_impl,
        child=ns.child,
        pd_role=ns.pd_role,
        bootstrap_port=bootstrap_port,
        pd_wait_s=ns.pd_wait_s,
        kv_connector=ns.kv_connector,
        dp_size=ns.dp_size,
    )
