#!/usr/bin/env python3
"""Cache-aware routing benchmark: prefix-cache hit rate, balance, req/s and TTFT.

The fixed workload of issue 9: 64 groups x 16 prompts; each group shares a generated
2,048-token system prompt and each prompt adds its own 128-token question; 16 output tokens;
1,024 streamed chat requests at concurrency 32, in a shuffled order per seed (3 seeds).
Eight mock workers run in ONE mock process (`smg mock-worker --count 8`), each with a
simulated prefix cache holding 25% of the distinct prefix tokens and a prefill cost per
uncached prompt token, so a routing policy that keeps a group on one worker sees hits and a
shorter time to first token.

Systems, one after another on the same mock workers (caches and counters reset before each
measured run, and every gateway started fresh per seed so none remembers an earlier run):

    smg-p4      this repo, --processes 4, --policy from --smg-policy (default cache_aware)
    smg-p1      this repo, --processes 1
    rust        the Rust SMG 1.13, --policy cache_aware, default overload protection
    rust-noovl  the Rust SMG 1.13, --policy cache_aware --disable-worker-overload-protection

Per system: hit rate (sum of cached / sum of prompt tokens, from the mocks' /mock/stats),
imbalance (largest share of requests x number of workers; 1.0 is even), req/s, median and
p90 TTFT. A markdown table goes to stdout and beside the JSON file.

    .venv/bin/python native_bench/cache_bench.py                       # the full run
    .venv/bin/python native_bench/cache_bench.py --systems smg-p4 --smoke   # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as nb  # noqa: E402  (native_bench's own helpers: processes, ports, the Rust SMG)

SYSTEMS = ("smg-p4", "smg-p1", "rust", "rust-noovl")
MOCK_URL_PREFIX = "MOCK_WORKER_URL "
BLOCK_TOKENS = 16  # the mock's cache block (smg/mock_worker/prefix_cache.py)


# ----------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Workload:
    groups: int = 64
    per_group: int = 16
    system_tokens: int = 2048
    question_tokens: int = 128
    output_tokens: int = 16
    concurrency: int = 32
    cache_fraction: float = 0.25  # of the distinct prefix tokens, per worker
    workers: int = 8

    @property
    def requests(self) -> int:
        return self.groups * self.per_group

    @property
    def distinct_prefix_tokens(self) -> int:
        return self.groups * self.system_tokens

    @property
    def cache_tokens(self) -> int:
        return int(self.distinct_prefix_tokens * self.cache_fraction)

    @property
    def ideal_hit_rate(self) -> float:
        """Every group on one worker that never evicts it: all but its first prompt hit the
        system prompt's full blocks (the mock caches whole blocks only)."""
        cached = (self.per_group - 1) * (self.system_tokens // BLOCK_TOKENS * BLOCK_TOKENS)
        prompt = self.per_group * (self.system_tokens + self.question_tokens)
        return cached / prompt


@dataclass(frozen=True)
class Prompt:
    group: int
    index: int
    system: str
    question: str


def _words(rng: random.Random, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(n)
    )


def make_prompts(w: Workload) -> list[Prompt]:
    """The same texts for every seed and system (only the order changes with the seed)."""
    out: list[Prompt] = []
    for g in range(w.groups):
        system = _words(random.Random(f"system-{g}"), w.system_tokens)
        for i in range(w.per_group):
            question = _words(random.Random(f"question-{g}-{i}"), w.question_tokens)
            out.append(Prompt(g, i, system, question))
    return out


def shuffled(prompts: Sequence[Prompt], seed: int) -> list[Prompt]:
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order


def chat_body(p: Prompt, w: Workload) -> bytes:
    return json.dumps(
        {
            "model": "mock-model",
            "messages": [
                {"role": "system", "content": p.system},
                {"role": "user", "content": p.question},
            ],
            "max_tokens": w.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


@dataclass
class RunResult:
    """One seed of one system."""

    seed: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    ttft_ms: list[float] = field(repr=False)
    per_worker: list[dict[str, int]]  # requests, prompt_tokens, cached_tokens per worker
    client_cached_tokens: int  # from the streamed usage chunks, as a cross-check

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


def imbalance(requests_per_worker: Sequence[int]) -> float:
    """Largest share of the requests x number of workers: 1.0 is even, N is all on one."""
    total = sum(requests_per_worker)
    if total == 0:
        return 0.0
    return max(requests_per_worker) / total * len(requests_per_worker)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def summarize(name: str, runs: Sequence[RunResult], policy: str) -> dict[str, Any]:
    """One system's line: hit rate over every seed's tokens, medians over seeds."""
    prompt = sum(wk["prompt_tokens"] for r in runs for wk in r.per_worker)
    cached = sum(wk["cached_tokens"] for r in runs for wk in r.per_worker)
    ttft = [t for r in runs for t in r.ttft_ms]
    return {
        "system": name,
        "policy": policy,
        "seeds": [r.seed for r in runs],
        "requests": sum(r.requests for r in runs),
        "errors": sum(r.errors for r in runs),
        "hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_per_seed": [
            (
                sum(wk["cached_tokens"] for wk in r.per_worker)
                / max(1, sum(wk["prompt_tokens"] for wk in r.per_worker))
            )
            for r in runs
        ],
        "imbalance": statistics.median(
            imbalance([wk["requests"] for wk in r.per_worker]) for r in runs
        )
        if runs
        else 0.0,
        "imbalance_per_seed": [imbalance([wk["requests"] for wk in r.per_worker]) for r in runs],
        "rps": statistics.median(r.rps for r in runs) if runs else 0.0,
        "rps_per_seed": [r.rps for r in runs],
        "ttft_median_ms": percentile(ttft, 0.5),
        "ttft_p90_ms": percentile(ttft, 0.9),
        "requests_per_worker": [
            sum(r.per_worker[i]["requests"] for r in runs) for i in range(len(runs[0].per_worker))
        ]
        if runs
        else [],
        "client_cached_tokens": sum(r.client_cached_tokens for r in runs),
        "mock_cached_tokens": cached,
        "mock_prompt_tokens": prompt,
    }


def markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"Cache-aware benchmark ({report['date']}, {report['host']}): {w['groups']} groups x "
        f"{w['per_group']} prompts, {w['system_tokens']}-token system prompt + "
        f"{w['question_tokens']}-token question, {w['output_tokens']} output tokens, "
        f"{w['requests']} requests/seed at concurrency {w['concurrency']}, {w['workers']} mock "
        f"workers x {w['cache_tokens']} cached tokens, prefill {report['mock']['prefill_us']} "
        f"us/uncached token, seeds {report['seeds']}. Ideal hit rate "
        f"{w['ideal_hit_rate']:.1%}.",
        "",
        "| system | policy | hit rate | imbalance | req/s | TTFT p50 ms | TTFT p90 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["systems"]:
        p50, p90 = s["ttft_median_ms"], s["ttft_p90_ms"]
        lines.append(
            f"| {s['system']} | {s['policy']} | {s['hit_rate']:.1%} | {s['imbalance']:.2f} | "
            f"{s['rps']:.0f} | {'-' if p50 is None else f'{p50:.1f}'} | "
            f"{'-' if p90 is None else f'{p90:.1f}'} | {s['errors']} |"
        )
    for s in report.get("skipped", []):
        lines.append(f"| {s['system']} | - | skipped: {s['reason']} | | | | | |")
    return "\n".join(lines) + "\n"


def usage_cached_tokens(tail: bytes) -> int:
    """usage.prompt_tokens_details.cached_tokens of the stream's usage event (0 if none)."""
    for event in reversed(tail.split(b"\n\n")):
        event = event.strip()
        if event.startswith(b"data:") and b'"usage"' in event:
            try:
                usage = json.loads(event[5:]).get("usage") or {}
            except ValueError:
                return 0
            details = usage.get("prompt_tokens_details") or {}
            return int(details.get("cached_tokens") or 0)
    return 0


# ----------------------------------------------------------------------------- the client


async def _one(
    session: Any, url: str, body: bytes, ttfts: list[float], timeout: float
) -> tuple[bool, int]:
    """One streamed request: (ok, cached tokens from the usage chunk)."""
    import aiohttp

    start = time.perf_counter()
    first: float | None = None
    tail = b""
    try:
        async with session.post(
            url,
            data=body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                await resp.read()
                return False, 0
            async for chunk in resp.content.iter_any():
                if first is None and b"data:" in chunk:
                    first = time.perf_counter()
                tail = (tail + chunk)[-4096:]
    except (aiohttp.ClientError, TimeoutError):
        return False, 0
    if first is None or b"[DONE]" not in tail:
        return False, 0
    ttfts.append((first - start) * 1000.0)
    return True, usage_cached_tokens(tail)


async def drive(url: str, bodies: Sequence[bytes], concurrency: int, timeout: float) -> dict:
    import aiohttp

    ttfts: list[float] = []
    ok = errors = cached = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def loop(session: Any) -> None:
        nonlocal ok, errors, cached
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            good, c = await _one(session, url, body, ttfts, timeout)
            if good:
                ok += 1
                cached += c
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(loop(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"ok": ok, "errors": errors, "wall_s": wall, "ttft_ms": ttfts, "cached": cached}


# ----------------------------------------------------------------------------- processes


def http_json(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    port = parts.port or 80
    status, data = nb.http_call(port, method, parts.path or "/", body, timeout=5.0)
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data


class Mocks:
    """The one mock process hosting every worker."""

    def __init__(self, py: Path, w: Workload, args: argparse.Namespace, logs: Path) -> None:
        argv = [
            str(py),
            "-m",
            "smg",
            "mock-worker",
            "--host",
            nb.HOST,
            "--port",
            "0",
            "--count",
            str(w.workers),
            "--output-len",
            str(w.output_tokens),
            "--prefix-cache-tokens",
            str(w.cache_tokens),
            "--prefill-us-per-token",
            str(args.prefill_us),
            "--ttft-ms",
            str(args.ttft_ms),
            "--itl-ms",
            str(args.itl_ms),
            "--max-total-tokens",
            str(10**9),  # token_usage stays ~0: overload protection reacts to load, not size
        ]
        self.proc = nb.start_proc(
            "mock-worker",
            argv,
            sorted(os.sched_getaffinity(0)),
            logs / "mock-worker.log",
            cwd=nb.REPO,
            stdout_pipe=True,
        )
        self.urls: list[str] = []
        assert self.proc.popen.stdout is not None
        deadline = time.monotonic() + 30
        while len(self.urls) < w.workers:
            line = self.proc.popen.stdout.readline().decode()
            if not line:
                raise nb.BenchError(f"mock worker exited:\n{self.proc.log_tail()}")
            if line.startswith(MOCK_URL_PREFIX):
                self.urls.append(line[len(MOCK_URL_PREFIX) :].strip())
            if time.monotonic() > deadline:
                raise nb.BenchError("mock worker did not print its URLs in 30 s")

    def reset(self) -> None:
        for url in self.urls:
            status, _ = http_json(url + "/mock/reset", "POST", b"")
            if status != 200:
                raise nb.BenchError(f"{url}/mock/reset answered {status}")

    def per_worker(self) -> list[dict[str, int]]:
        out = []
        for url in self.urls:
            status, snap = http_json(url + "/mock/stats")
            if status != 200 or not isinstance(snap, dict) or snap.get("prefix_cache") is None:
                raise nb.BenchError(f"{url}/mock/stats: {status} {str(snap)[:200]}")
            pc = snap["prefix_cache"]
            out.append(
                {
                    "requests": int(snap["inference_answered"]),
                    "prompt_tokens": int(pc["prompt_tokens"]),
                    "cached_tokens": int(pc["cached_tokens"]),
                }
            )
        return out

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class System:
    name: str
    argv_prefix: list[str]
    extra: list[str]
    policy: str
    cwd: Path
    env: dict[str, str] | None = None

    def argv(self, urls: Sequence[str], port: int, prom: int) -> list[str]:
        return [
            *self.argv_prefix,
            "launch",
            "--worker-urls",
            *urls,
            "--host",
            nb.HOST,
            "--port",
            str(port),
            "--policy",
            self.policy,
            "--log-level",
            "warn",
            "--prometheus-port",
            str(prom),
            "--prometheus-host",
            nb.HOST,
            *self.extra,
        ]


def smg_policy_or_fallback(py: Path, wanted: str) -> str:
    """smg refuses a policy it does not implement yet; then measure round_robin instead."""
    code = "from smg.config import IMPLEMENTED_POLICIES as P; print(' '.join(P))"
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=nb.REPO)
    implemented = res.stdout.split()
    if wanted in implemented:
        return wanted
    nb.log(
        f"NOTE: smg does not implement --policy {wanted} yet (implemented: "
        f"{', '.join(implemented) or '?'}); measuring smg with round_robin as a baseline"
    )
    return "round_robin"


def wait_gateway(proc: nb.Proc, port: int, workers: int, timeout: float) -> None:
    """Ready: three good chat answers in a row, and /workers lists every worker (the Rust
    SMG answers before it has registered them all)."""
    probe = json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    ).encode()
    deadline = time.monotonic() + timeout
    good = 0
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise nb.GatewayError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            status, body = nb.http_call(port, "POST", "/v1/chat/completions", probe, 5.0)
            if status == 200:
                good += 1
                if good >= 3 and registered(port) >= workers:
                    return
                continue
            last = f"chat {status}: {body[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        good = 0
        time.sleep(0.2)
    raise nb.GatewayError(f"{proc.name} not ready in {timeout:.0f}s ({last})\n{proc.log_tail()}")


def registered(port: int) -> int:
    """Workers the gateway lists as healthy on GET /workers (both gateways serve it)."""
    try:
        status, body = nb.http_call(port, "GET", "/workers", None, 5.0)
    except OSError:
        return 0
    if status != 200:
        return 0
    try:
        data = json.loads(body)
    except ValueError:
        return 0
    items = data.get("workers", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        return 0
    return sum(1 for it in items if not isinstance(it, dict) or it.get("is_healthy", True))


def run_system(
    system: System,
    mocks: Mocks,
    w: Workload,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    logs: Path,
    timeout: float,
    settle_s: float = 0.0,
) -> list[RunResult]:
    results = []
    for seed in seeds:
        port, prom = nb.free_port(), nb.free_port()
        proc = nb.start_proc(
            system.name,
            system.argv(mocks.urls, port, prom),
            sorted(os.sched_getaffinity(0)),
            logs / f"{system.name}-seed{seed}.log",
            cwd=system.cwd,
            env=system.env,
        )
        try:
            wait_gateway(proc, port, w.workers, 60.0)
            time.sleep(settle_s)
            mocks.reset()  # after the readiness probes: fresh caches and counters
            bodies = [chat_body(p, w) for p in shuffled(prompts, seed)]
            url = f"http://{nb.HOST}:{port}/v1/chat/completions"
            out = asyncio.run(drive(url, bodies, w.concurrency, timeout))
            per_worker = mocks.per_worker()
        finally:
            proc.stop()
        r = RunResult(
            seed=seed,
            requests=len(bodies),
            ok=out["ok"],
            errors=out["errors"],
            wall_s=out["wall_s"],
            ttft_ms=out["ttft_ms"],
            per_worker=per_worker,
            client_cached_tokens=out["cached"],
        )
        nb.log(
            f"{system.name} seed {seed}: {r.ok}/{r.requests} ok, {r.rps:.0f} req/s, hit "
            f"{sum(x['cached_tokens'] for x in per_worker) / max(1, sum(x['prompt_tokens'] for x in per_worker)):.1%}, "
            f"requests/worker {[x['requests'] for x in per_worker]}"
        )
        results.append(r)
    return results


def build_systems(args: argparse.Namespace, tmp: Path) -> tuple[list[System], list[dict]]:
    systems: list[System] = []
    skipped: list[dict[str, str]] = []
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in wanted:
        if name not in SYSTEMS:
            raise nb.BenchError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    if any(n.startswith("smg") for n in wanted):
        py = nb.resolve_smg_python(args.smg_python)
        policy = smg_policy_or_fallback(py, args.smg_policy)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(nb.REPO), env.get("PYTHONPATH", "")) if p
        )
        extra = args.smg_extra_args.split()
        for name, procs in (("smg-p4", 4), ("smg-p1", 1)):
            if name in wanted:
                systems.append(
                    System(
                        name,
                        [str(py), "-m", "smg"],
                        ["--processes", str(procs), *extra],
                        policy,
                        nb.REPO,
                        env,
                    )
                )
    if any(n.startswith("rust") for n in wanted):
        venv = Path(args.rust_venv)
        try:
            info = nb.ensure_rust_venv(venv, Path(args.rust_wheel) if args.rust_wheel else None)
        except nb.BenchError as exc:
            for name in wanted:
                if name.startswith("rust"):
                    skipped.append({"system": name, "reason": f"no Rust SMG: {exc}"[:200]})
            info = None
        if info is not None:
            prefix = nb.rust_prefix(venv, info)
            variants = (("rust", []), ("rust-noovl", ["--disable-worker-overload-protection"]))
            for name, extra in variants:
                if name in wanted:
                    # Not the repo root: this repo's `smg` package would shadow the Rust one.
                    systems.append(System(name, prefix, extra, "cache_aware", tmp))
    return systems, skipped


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS)
    )
    ap.add_argument(
        "--smg-policy", default="cache_aware", help="smg's --policy (default cache_aware)"
    )
    ap.add_argument("--smg-extra-args", default="", help="more smg launch flags")
    ap.add_argument("--smg-python", default=None, help="interpreter with this repo's smg")
    default_rust = nb.REPO.parent / "main" / "native_bench" / ".venv-rust"
    if not default_rust.exists():
        default_rust = HERE / ".venv-rust"
    ap.add_argument("--rust-venv", default=str(default_rust))
    ap.add_argument("--rust-wheel", default=None)
    ap.add_argument("--seeds", default="1,2,3", help="comma list; each shuffles the order")
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--question-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument(
        "--prefill-us", type=float, default=50.0, help="mock prefill per uncached token"
    )
    ap.add_argument("--ttft-ms", type=float, default=1.0, help="mock base time to first token")
    ap.add_argument("--itl-ms", type=float, default=1.0, help="mock time between tokens")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument(
        "--settle-s", type=float, default=0.0, help="wait after a gateway is ready, before a run"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run for a test: 4 groups x 4 prompts, 256+32 tokens, 1 seed, concurrency 4",
    )
    ap.add_argument("--out", default=str(HERE / "build" / "cache_bench.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.groups, args.per_group = 4, 4
        args.system_tokens, args.question_tokens = 256, 32
        args.concurrency, args.workers = 4, 2
        if args.seeds == "1,2,3":
            args.seeds = "1"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    w = Workload(
        groups=args.groups,
        per_group=args.per_group,
        system_tokens=args.system_tokens,
        question_tokens=args.question_tokens,
        output_tokens=args.output_tokens,
        concurrency=args.concurrency,
        cache_fraction=args.cache_fraction,
        workers=args.workers,
    )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    logs = out.parent / "cache_bench_logs"
    logs.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(w)
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmpdir:
        try:
            systems, skipped = build_systems(args, Path(tmpdir))
            py = nb.resolve_smg_python(args.smg_python)
            mocks = Mocks(py, w, args, logs)
        except nb.BenchError as exc:
            print(f"cache_bench: {exc}", file=sys.stderr)
            return 2
        summaries = []
        try:
            for system in systems:
                nb.log(f"{system.name}: policy {system.policy}, seeds {seeds}")
                try:
                    runs = run_system(
                        system, mocks, w, prompts, seeds, logs, args.request_timeout, args.settle_s
                    )
                except nb.GatewayError as exc:
                    skipped.append({"system": system.name, "reason": str(exc).splitlines()[0]})
                    nb.log(f"{system.name} skipped: {exc}")
                    continue
                summaries.append(summarize(system.name, runs, system.policy))
        finally:
            mocks.stop()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{os.cpu_count()} CPUs",
        "workload": {
            **asdict(w),
            "requests": w.requests,
            "distinct_prefix_tokens": w.distinct_prefix_tokens,
            "cache_tokens": w.cache_tokens,
            "ideal_hit_rate": w.ideal_hit_rate,
        },
        "mock": {"prefill_us": args.prefill_us, "ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms},
        "seeds": seeds,
        "systems": summaries,
        "skipped": skipped,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    nb.log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if summaries and not any(s["errors"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
