"""Command-line options and the runtime-mutable part of a mock worker's configuration.

Pure code: argument parsing and validation of `POST /mock/config` updates; no sockets.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

ENGINES = ("sglang", "vllm")
DEFAULT_PORT = {"sglang": 30000, "vllm": 8000}  # the engines' own default ports
MAX_OUTPUT_LEN = 1_000_000  # bounds the work one request can ask for


@dataclasses.dataclass(frozen=True)
class Options:
    """Fixed for the life of the process (set on the command line)."""

    engine: str = "sglang"
    model: str = "mock-model"
    host: str = "127.0.0.1"
    port: int = 30000  # 0: every worker binds an ephemeral port
    count: int = 1
    api_key: str | None = None
    auth_health: bool = False  # also require the key on /health and /health_generate
    strict_model: bool = False  # 404 when the request names another model
    exit_after: int | None = None
    seed: int | None = None
    max_model_len: int = 32768
    max_total_tokens: int = 131072  # the KV "capacity" token_usage is derived from
    max_running_requests: int = 256
    embedding_dim: int = 16
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    root_path: str = ""  # every route served under this prefix (a worker behind a path proxy)
    # TLS, with vLLM's/uvicorn's flag names: serve https with this pair; with ssl_cert_reqs
    # 2 (ssl.CERT_REQUIRED) a client must present a certificate chaining to ssl_ca_certs.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0
    # Simulated prefix cache per worker, in tokens (0: none; see prefix_cache.py).
    prefix_cache_tokens: int = 0
    # Initial values of the runtime config (see RuntimeConfig).
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_len: int = 16
    eos_prob: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    health_fail: bool = False
    prefill_us_per_token: float = 0.0
    crash_rate: float = 0.0
    # Prefill/decode disaggregation (pd.py): None, "prefill" or "decode".
    pd_role: str | None = None
    bootstrap_port: int = 8998  # SGLang's --disaggregation-bootstrap-port default; 0: ephemeral
    pd_wait_s: float = 5.0  # how long a decode waits for its prefill's KV
    # A streamed decode's head: "early" at once as SGLang's StreamingResponse (a KV failure
    # is then an in-band error event), "ready" only once its room is ready (then a 500).
    pd_stream_head: str = "early"
    # Data parallelism as SGLang reports it (/server_info dp_size): with dp_size > 1 a
    # request's `data_parallel_rank` must lie in [0, dp_size) (else 400); /mock/stats
    # counts the ranks requests carried ("none": no rank).
    dp_size: int = 1


@dataclasses.dataclass
class RuntimeConfig:
    """What `POST /mock/config` may change while the worker runs (one per worker)."""

    healthy: bool = True
    error_rate: float = 0.0
    hang_rate: float = 0.0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_len: int = 16
    eos_prob: float = 0.0
    waiting: int = 0  # fake engine queue depth reported by the load endpoints
    token_usage: float | None = None  # None: derived from the in-flight requests
    # Added to the time to first token per prompt token not served from the prefix cache.
    prefill_us_per_token: float = 0.0
    # Fraction of inference requests on which the whole process dies (os._exit) at the
    # time of the first token, without answering: an engine crashing mid-request.
    crash_rate: float = 0.0

    @classmethod
    def from_options(cls, opts: Options) -> RuntimeConfig:
        return cls(
            healthy=not opts.health_fail,
            error_rate=opts.error_rate,
            hang_rate=opts.hang_rate,
            ttft_ms=opts.ttft_ms,
            itl_ms=opts.itl_ms,
            output_len=opts.output_len,
            eos_prob=opts.eos_prob,
            prefill_us_per_token=opts.prefill_us_per_token,
            crash_rate=opts.crash_rate,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fraction(v: Any) -> bool:
    return _is_number(v) and 0.0 <= v <= 1.0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_OUTPUT_LEN


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _usage(v: Any) -> bool:
    return v is None or _fraction(v)


# field -> (validator, description used in the error message)
_UPDATE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "healthy": (_bool, "a boolean"),
    "error_rate": (_fraction, "a number in [0, 1]"),
    "hang_rate": (_fraction, "a number in [0, 1]"),
    "ttft_ms": (_non_negative, "a non-negative number"),
    "itl_ms": (_non_negative, "a non-negative number"),
    "output_len": (_count, f"an integer in [0, {MAX_OUTPUT_LEN}]"),
    "eos_prob": (_fraction, "a number in [0, 1]"),
    "waiting": (_count, f"an integer in [0, {MAX_OUTPUT_LEN}]"),
    "token_usage": (_usage, "null or a number in [0, 1]"),
    "prefill_us_per_token": (_non_negative, "a non-negative number"),
    "crash_rate": (_fraction, "a number in [0, 1]"),
}


def apply_rules(
    cfg: object, update: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]
) -> str | None:
    """Validate `update` (a JSON object) as a whole against `rules` (field -> (check,
    description)), then set its fields on `cfg`. Returns an error message or None.
    Shared by the HTTP mock's and the gRPC mock's config endpoints."""
    if not isinstance(update, dict):
        return "body must be a JSON object"
    for key, value in update.items():
        rule = rules.get(key)
        if rule is None:
            return f"unknown field {key!r}; known: {', '.join(sorted(rules))}"
        check, what = rule
        if not check(value):
            return f"{key} must be {what}"
    for key, value in update.items():
        setattr(cfg, key, value)
    return None


def apply_update(cfg: RuntimeConfig, update: Any) -> str | None:
    """Validate `update` as a whole, then apply it. Returns an error message or None."""
    return apply_rules(cfg, update, _UPDATE_RULES)


def _fraction_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1]")
    return value


def non_negative_arg(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError("must be a non-negative number")
    return value


def int_arg(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}]")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smg mock-worker",
        description=(
            "Mock SGLang/vLLM HTTP server(s) for demos, benchmarks and gateway tests. "
            "Token counts are whitespace-separated words; by default a request gets "
            "exactly min(max_tokens, --output-len) output tokens."
        ),
    )
    p.add_argument("--engine", choices=ENGINES, default="sglang", help="engine to emulate")
    p.add_argument("--model", default="mock-model", help="served model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port",
        type=int_arg(0, 65535),
        default=None,
        help="first port (default: 30000 for sglang, 8000 for vllm); 0 binds ephemeral ports",
    )
    p.add_argument(
        "--count",
        type=int_arg(1, 1024),
        default=1,
        help="number of workers (consecutive ports from --port); one "
        "'MOCK_WORKER_URL <url>' line per worker is printed once all listen",
    )
    p.add_argument("--ttft-ms", type=non_negative_arg, default=0.0, help="time to first token")
    p.add_argument("--itl-ms", type=non_negative_arg, default=0.0, help="time between tokens")
    p.add_argument(
        "--output-len",
        type=int_arg(0, MAX_OUTPUT_LEN),
        default=16,
        help="output tokens when the request sets no lower max_tokens",
    )
    p.add_argument(
        "--eos-prob",
        type=_fraction_arg,
        default=0.0,
        help="per-token chance to stop early (finish_reason 'stop') unless ignore_eos",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int_arg(0, 2**40),
        default=0,
        help="simulated prefix cache per worker, in tokens (16-token blocks, LRU); answers "
        "report usage.prompt_tokens_details.cached_tokens; 0 (default): no cache",
    )
    p.add_argument(
        "--prefill-us-per-token",
        type=non_negative_arg,
        default=0.0,
        help="microseconds added to the time to first token per prompt token not served "
        "from the prefix cache (all prompt tokens without a cache)",
    )
    p.add_argument("--error-rate", type=_fraction_arg, default=0.0, help="fraction answered 500")
    p.add_argument("--hang-rate", type=_fraction_arg, default=0.0, help="fraction never answered")
    p.add_argument(
        "--crash-rate",
        type=_fraction_arg,
        default=0.0,
        help="fraction of inference requests on which the whole process exits (status 1) "
        "at the time of the first token, without answering: an engine dying mid-request",
    )
    p.add_argument(
        "--pd-role",
        choices=("prefill", "decode"),
        default=None,
        help="prefill/decode disaggregation role (SGLang style, --engine sglang): every "
        "inference request must carry bootstrap_host and bootstrap_room (400 otherwise; "
        "bootstrap_port null: --bootstrap-port); a prefill answers one token and serves its rooms on --bootstrap-port; "
        "a decode answers only once its room's prefill is done (500 otherwise)",
    )
    p.add_argument(
        "--bootstrap-port",
        type=int_arg(0, 65535),
        default=None,
        help="SGLang's --disaggregation-bootstrap-port (default 8998). A prefill's bootstrap "
        "server listens there (one port per worker, consecutive; 0: ephemeral); a "
        "'MOCK_WORKER_BOOTSTRAP <url> <port>' line follows each worker's URL line. Both "
        "roles take it for a request whose bootstrap_port is null, as SGLang does",
    )
    p.add_argument(
        "--pd-stream-head",
        choices=("early", "ready"),
        default="early",
        help="with --pd-role decode, a streamed answer's head: early (at once, as SGLang; a "
        "failed KV transfer is then an in-band error event and [DONE]) or ready (once the "
        "prefill's room is ready; a failure is then a 500)",
    )
    p.add_argument(
        "--pd-wait-s",
        type=non_negative_arg,
        default=5.0,
        help="with --pd-role decode: how long a request waits for its prefill's KV "
        "(its room 'ready' at the bootstrap server) before failing with 500",
    )
    p.add_argument(
        "--dp-size",
        type=int_arg(1, 1024),
        default=1,
        help="the dp_size /server_info reports (SGLang --dp-size); requests' "
        "data_parallel_rank is checked against it and counted in /mock/stats",
    )
    p.add_argument(
        "--exit-after",
        type=int_arg(1, 2**62),
        default=None,
        help="exit the process once N inference requests have been answered",
    )
    p.add_argument("--health-fail", action="store_true", help="start unhealthy (/health 503)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route except /health, "
        "/health_generate and /mock/*",
    )
    p.add_argument(
        "--auth-health", action="store_true", help="with --api-key, also protect /health*"
    )
    p.add_argument(
        "--strict-model",
        action="store_true",
        help="answer 404 when a request names a model other than --model",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the fault/EOS dice")
    p.add_argument("--max-model-len", type=int_arg(1, 2**31), default=32768)
    p.add_argument("--max-total-tokens", type=int_arg(1, 2**40), default=131072)
    p.add_argument(
        "--max-running-requests",
        type=int_arg(0, 2**31),
        default=256,
        help="reported in /server_info and loads (0: an engine that reports no running window)",
    )
    p.add_argument("--embedding-dim", type=int_arg(1, 65536), default=16)
    p.add_argument("--max-header-bytes", type=int_arg(1024, 2**24), default=64 * 1024)
    p.add_argument("--max-body-bytes", type=int_arg(1024, 2**31), default=64 * 1024 * 1024)
    p.add_argument(
        "--root-path",
        default="",
        help="serve every route under this path prefix, as vLLM's --root-path behind a proxy",
    )
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", default=None, help="private key (PEM) of --ssl-certfile")
    p.add_argument(
        "--ssl-ca-certs", default=None, help="CA file (PEM) client certificates must chain to"
    )
    p.add_argument(
        "--ssl-cert-reqs",
        type=int_arg(0, 2),
        default=0,
        help="client certificates: 0 none, 1 optional, 2 required (ssl.CERT_* as uvicorn)",
    )
    return p


def parse_options(argv: list[str]) -> Options:
    """Parse argv; argparse raises SystemExit on --help or a bad flag."""
    ns = build_parser().parse_args(argv)
    port = DEFAULT_PORT[ns.engine] if ns.port is None else ns.port
    if port != 0 and port + ns.count - 1 > 65535:
        build_parser().error(f"--port {port} with --count {ns.count} runs past port 65535")
    if ns.api_key == "":
        build_parser().error("--api-key must not be empty")
    root_path = ns.root_path.rstrip("/")
    if root_path and not root_path.startswith("/"):
        build_parser().error("--root-path must start with /")
    if (ns.ssl_certfile is None) != (ns.ssl_keyfile is None):
        build_parser().error("--ssl-certfile and --ssl-keyfile go together")
    if (ns.ssl_ca_certs is not None or ns.ssl_cert_reqs) and ns.ssl_certfile is None:
        build_parser().error("--ssl-ca-certs and --ssl-cert-reqs need --ssl-certfile")
    if ns.ssl_cert_reqs and ns.ssl_ca_certs is None:
        build_parser().error("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs")
    if ns.pd_role is not None and ns.engine != "sglang":
        build_parser().error(
            "--pd-role is SGLang-style PD over HTTP (--engine sglang); vLLM PD is the gRPC "
            "mock's (kv_transfer_params)"
        )
    if ns.bootstrap_port is not None and ns.pd_role is None:
        build_parser().error("--bootstrap-port needs --pd-role")
    bootstrap_port = 8998 if ns.bootstrap_port is None else ns.bootstrap_port
    if ns.pd_role == "decode" and bootstrap_port == 0:
        build_parser().error("--bootstrap-port 0 (ephemeral) is for a prefill only")
    if ns.pd_role == "prefill" and bootstrap_port and bootstrap_port + ns.count - 1 > 65535:
        build_parser().error(
            f"--bootstrap-port {bootstrap_port} with --count {ns.count} runs past port 65535"
        )
    return Options(
        engine=ns.engine,
        model=ns.model,
        host=ns.host,
        port=port,
        count=ns.count,
        api_key=ns.api_key,
        auth_health=ns.auth_health,
        strict_model=ns.strict_model,
        exit_after=ns.exit_after,
        seed=ns.seed,
        max_model_len=ns.max_model_len,
        max_total_tokens=ns.max_total_tokens,
        max_running_requests=ns.max_running_requests,
        embedding_dim=ns.embedding_dim,
        max_header_bytes=ns.max_header_bytes,
        max_body_bytes=ns.max_body_bytes,
        root_path=root_path,
        ttft_ms=ns.ttft_ms,
        itl_ms=ns.itl_ms,
        output_len=ns.output_len,
        eos_prob=ns.eos_prob,
        error_rate=ns.error_rate,
        hang_rate=ns.hang_rate,
        health_fail=ns.health_fail,
        prefix_cache_tokens=ns.prefix_cache_tokens,
        prefill_us_per_token=ns.prefill_us_per_token,
        crash_rate=ns.crash_rate,
        pd_role=ns.pd_role,
        bootstrap_port=bootstrap_port,
        pd_wait_s=ns.pd_wait_s,
        pd_stream_head=ns.pd_stream_head,
        dp_size=ns.dp_size,
        ssl_certfile=ns.ssl_certfile,
        ssl_keyfile=ns.ssl_keyfile,
        ssl_ca_certs=ns.ssl_ca_certs,
        ssl_cert_reqs=ns.ssl_cert_reqs,
    )
