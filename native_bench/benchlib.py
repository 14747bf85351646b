"""Pure parts of the benchmark runner: parsing tool output, schedules, statistics, reports.

Nothing here starts a process or opens a socket; run.py wraps these in the process layer.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WRK_MARKER = "WRK_SUMMARY "
LOADGEN_MARKER = "LOADGEN_SUMMARY "

SOCKET_ERROR_KEYS = ("connect_errors", "read_errors", "write_errors", "timeouts")


@dataclass(frozen=True)
class Payload:
    name: str
    path: str
    file: str
    # Key of the stub's /stub/stats counter that this payload increments.
    stub_counter: str


PAYLOADS: dict[str, Payload] = {
    "chat": Payload("chat", "/v1/chat/completions", "chat.json", "chat"),
    "completion": Payload("completion", "/v1/completions", "completion.json", "completion"),
    "stream": Payload("stream", "/v1/chat/completions", "stream.json", "chat_stream"),
}

GATEWAY_LABELS: dict[str, str] = {
    "direct": "direct (stub only)",
    "smg": "smg (this repo)",
    "smg-base": "smg, resilience off",
    "smg-igw": "smg, --enable-igw",
    "rust": "Rust SMG 1.13",
}
# Paired per-round ratios reported when both systems ran.
RATIO_PAIRS: tuple[tuple[str, str], ...] = (
    ("smg", "rust"),
    ("rust", "direct"),
    ("smg", "direct"),
    ("smg", "smg-base"),
    ("smg-base", "rust"),
    # Issue 14: self-hosted HTTP workers must not get slower in IGW mode (>= 0.95).
    ("smg-igw", "smg"),
)


class ParseError(ValueError):
    """A tool's output lacked its summary line or the line was not valid JSON."""


def _summary_line(text: str, marker: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        idx = line.find(marker)
        if idx >= 0:
            try:
                value = json.loads(line[idx + len(marker) :])
            except json.JSONDecodeError as exc:
                raise ParseError(f"bad {marker.strip()} line: {exc}") from exc
            if not isinstance(value, dict):
                raise ParseError(f"{marker.strip()} is not a JSON object")
            return value
    raise ParseError(f"no {marker.strip()} line in output")


def parse_wrk_summary(text: str) -> dict[str, Any]:
    """Reads post.lua's summary line and derives requests/s from wrk's own duration."""
    s = _summary_line(text, WRK_MARKER)
    duration_s = s["duration_us"] / 1e6
    s["duration_s"] = duration_s
    s["rps"] = s["requests"] / duration_s if duration_s > 0 else 0.0
    return s


def parse_loadgen_summary(text: str) -> dict[str, Any]:
    s = _summary_line(text, LOADGEN_MARKER)
    if s.get("mode") == "closed":
        # Closed loop: the rate is what came back, as with wrk.
        s["rps"] = s["recorded"] / s["duration_s"] if s["duration_s"] > 0 else 0.0
        s["requests"] = s["recorded"]
    return s


def void_reasons(
    result: Mapping[str, Any], stub_delta: int | None = None, *, min_requests: int = 1
) -> list[str]:
    """Why a measured run cannot count; empty when it is clean.

    Any non-2xx answer or socket error voids the run. stub_delta is how many matching requests
    the stub saw during the run: every completed request went through the stub before its
    answer came back, so fewer means the gateway answered without the worker.
    """
    reasons: list[str] = []
    non2xx = max(int(result.get("non2xx", 0)), int(result.get("status_ge_400", 0)))
    if non2xx:
        reasons.append(f"{non2xx} non-2xx")
    for key in (*SOCKET_ERROR_KEYS, "parse_errors", "unsent"):
        n = int(result.get(key, 0))
        if n:
            reasons.append(f"{n} {key.replace('_', ' ')}")
    requests = int(result.get("requests", result.get("recorded", 0)))
    if requests < min_requests:
        reasons.append(f"only {requests} requests")
    if stub_delta is not None and stub_delta < requests:
        reasons.append(f"stub saw {stub_delta} of {requests} requests")
    return reasons


def rotation(gateways: Sequence[str], round_index: int) -> list[str]:
    """Round r starts with the r-th system, so each one takes every position in turn."""
    if not gateways:
        return []
    k = round_index % len(gateways)
    return [*gateways[k:], *gateways[:k]]


def parse_cpu_list(spec: str) -> list[int]:
    """Parses a taskset-style list such as "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo_s, hi_s = part.split("-", 1)
            lo, hi = int(lo_s), int(hi_s)
            if lo > hi:
                raise ValueError(f"bad CPU range {part!r}")
            cpus.update(range(lo, hi + 1))
        else:
            cpus.add(int(part))
    if not cpus or min(cpus) < 0:
        raise ValueError(f"bad CPU list {spec!r}")
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The inverse of parse_cpu_list, with runs collapsed."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@dataclass(frozen=True)
class CoreLayout:
    mode: str  # "shared" or "split"
    gateway: tuple[int, ...]
    load: tuple[int, ...]  # stub and load generator
    stub_threads: int
    client_threads: int
    # Disjoint cores for the stub and the client inside `load` (--stub-cores/--client-cores,
    # the scaling series); empty: both share all of `load`.
    stub_only: tuple[int, ...] = ()
    client_only: tuple[int, ...] = ()

    @property
    def stub(self) -> tuple[int, ...]:
        return self.stub_only or self.load

    @property
    def client(self) -> tuple[int, ...]:
        return self.client_only or self.load


def split_load(
    layout: CoreLayout, stub_cores: Sequence[int], client_cores: Sequence[int]
) -> CoreLayout:
    """The layout with the stub and the client on their own cores (one thread per core)."""
    stub, client = tuple(sorted(set(stub_cores))), tuple(sorted(set(client_cores)))
    if set(stub) & set(client):
        raise ValueError("--stub-cores and --client-cores overlap")
    if (set(stub) | set(client)) & set(layout.gateway):
        raise ValueError("--stub-cores/--client-cores overlap the gateway cores")
    return CoreLayout(
        "split",
        layout.gateway,
        tuple(sorted(set(stub) | set(client))),
        len(stub),
        len(client),
        stub,
        client,
    )


def core_layout(
    available: Sequence[int],
    mode: str = "auto",
    gateway_cores: Sequence[int] | None = None,
    load_cores: Sequence[int] | None = None,
    stub_threads: int | None = None,
    client_threads: int | None = None,
) -> CoreLayout:
    """Decides which cores the gateway and the load side (stub + client) may use.

    Shared: everything on every core (a small machine, where splitting would starve one side).
    Split: the gateway gets the first half, the stub and the client the rest, so the client's
    and the stub's cycles are not taken from the gateway.
    """
    avail = sorted(set(available))
    if not avail:
        raise ValueError("no CPUs available")
    if gateway_cores or load_cores:
        if not (gateway_cores and load_cores):
            raise ValueError("--gateway-cores and --load-cores go together")
        missing = (set(gateway_cores) | set(load_cores)) - set(avail)
        if missing:
            raise ValueError(f"CPUs {format_cpu_list(missing)} are not available to this process")
        gw, ld = tuple(sorted(set(gateway_cores))), tuple(sorted(set(load_cores)))
        chosen = "split" if not set(gw) & set(ld) else "shared"
    else:
        if mode == "auto":
            mode = "split" if len(avail) >= 4 else "shared"
        if mode == "shared":
            gw = ld = tuple(avail)
        elif mode == "split":
            if len(avail) < 2:
                raise ValueError("--cores split needs at least 2 CPUs")
            k = len(avail) // 2
            gw, ld = tuple(avail[:k]), tuple(avail[k:])
        else:
            raise ValueError(f"unknown --cores mode {mode!r}")
        chosen = mode
    if chosen == "shared":
        default_stub, default_client = 1, 1
    else:
        default_stub = max(1, len(ld) // 2)
        default_client = max(1, len(ld) - default_stub)
    return CoreLayout(
        mode=chosen,
        gateway=gw,
        load=ld,
        stub_threads=stub_threads or default_stub,
        client_threads=client_threads or default_client,
    )


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds a process tree spent between two snapshots (pid -> user+system seconds).

    A process born in between counts in full; one that died in between is lost, which the
    runner avoids by keeping process trees fixed while measuring.
    """
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


@dataclass
class RatioSummary:
    median: float
    low: float
    high: float
    n: int


def paired_ratios(
    numer: Mapping[int, float | None], denom: Mapping[int, float | None]
) -> RatioSummary | None:
    """Median and range of numer/denom over rounds where both systems have a clean number.

    Pairing by round cancels drift in machine load between rounds.
    """
    ratios = [
        n / d
        for r, n in numer.items()
        if n is not None and (d := denom.get(r)) is not None and d > 0
    ]
    if not ratios:
        return None
    return RatioSummary(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def median_or_none(values: Iterable[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


@dataclass
class Measurement:
    """One measured run of one system on one payload."""

    gateway: str
    payload: str
    round: int
    rps: float
    requests: int
    void: list[str] = field(default_factory=list)
    gateway_cpu_s: float | None = None
    stub_cpu_s: float | None = None
    latency_us: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def clean_rps(self) -> float | None:
        return None if self.void else self.rps

    def cpu_per_1k(self, which: str = "gateway") -> float | None:
        cpu = self.gateway_cpu_s if which == "gateway" else self.stub_cpu_s
        if cpu is None or self.requests <= 0:
            return None
        return cpu / self.requests * 1000.0


def fixed_rate_for(
    medians: Mapping[str, float | None], fraction: float, reference: str = "rust"
) -> tuple[float, str] | None:
    """Rate for the latency runs: a fraction of the reference system's median maximum.

    Without a clean reference number it falls back to the slowest measured gateway (the
    direct stub only when nothing else ran), so no system is pushed past what was measured.
    """
    ref = medians.get(reference)
    if ref:
        return fraction * ref, reference
    gateways = {k: v for k, v in medians.items() if v and k != "direct"}
    if gateways:
        name = min(gateways, key=lambda k: gateways[k] or 0.0)
        return fraction * (gateways[name] or 0.0), name
    if medians.get("direct"):
        return fraction * (medians["direct"] or 0.0), "direct"
    return None


def _fmt_rps(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _fmt_cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_report(
    gateways: Sequence[str],
    payloads: Sequence[str],
    rounds: int,
    max_runs: Sequence[Measurement],
    fixed_runs: Sequence[Measurement],
    fixed_rates: Mapping[str, tuple[float, str]],
    header: str = "",
) -> str:
    """Markdown tables: requests/s per round, median, ratios, CPU cost, fixed-rate latency."""
    lines: list[str] = []
    if header:
        lines += [header, ""]
    by_key = {(m.gateway, m.payload, m.round): m for m in max_runs}
    for payload in payloads:
        p = PAYLOADS[payload]
        lines.append(f"### {payload}: POST {p.path} ({p.file})")
        lines.append("")
        round_cols = " | ".join(f"r{r + 1}" for r in range(rounds))
        lines.append(
            f"| system | {round_cols} | median req/s | gateway CPU s / 1k req | stub CPU s / 1k req |"
        )
        lines.append("|---" * (rounds + 4) + "|")
        medians: dict[str, float | None] = {}
        per_round: dict[str, dict[int, float | None]] = {}
        for gw in gateways:
            cells = []
            per_round[gw] = {}
            cpu_g: list[float | None] = []
            cpu_s: list[float | None] = []
            for r in range(rounds):
                m = by_key.get((gw, payload, r))
                if m is None:
                    cells.append("-")
                    per_round[gw][r] = None
                    continue
                per_round[gw][r] = m.clean_rps
                cells.append(_fmt_rps(m.rps) + (f" (void: {'; '.join(m.void)})" if m.void else ""))
                if not m.void:
                    cpu_g.append(m.cpu_per_1k("gateway"))
                    cpu_s.append(m.cpu_per_1k("stub"))
            medians[gw] = median_or_none(per_round[gw].values())
            gcpu = median_or_none(cpu_g) if gw != "direct" else None
            lines.append(
                f"| {GATEWAY_LABELS.get(gw, gw)} | {' | '.join(cells)} | "
                f"{_fmt_rps(medians[gw])} | {_fmt_cpu(gcpu)} | {_fmt_cpu(median_or_none(cpu_s))} |"
            )
        lines.append("")
        sizes = []
        for gw in gateways:
            per = [
                m.raw["bytes"] / m.requests
                for m in max_runs
                if m.gateway == gw and m.payload == payload and m.requests and "bytes" in m.raw
            ]
            if per:
                sizes.append(f"{GATEWAY_LABELS.get(gw, gw)} {median_or_none(per):,.0f}")
        if sizes:
            # A gateway that truncates or rewrites bodies shows up here.
            lines.append("- response bytes per request, headers included: " + ", ".join(sizes))
        for a, b in RATIO_PAIRS:
            if a in gateways and b in gateways:
                rs = paired_ratios(per_round[a], per_round[b])
                label = f"{a}/{b}"
                if rs is None:
                    lines.append(f"- ratio {label}: no round with clean numbers for both")
                else:
                    lines.append(
                        f"- ratio {label}: median {rs.median:.3f} "
                        f"(range {rs.low:.3f}-{rs.high:.3f} over {rs.n} rounds)"
                    )
        lines.append("")
    if fixed_runs:
        lines.append("### latency at a fixed request rate (open loop, from scheduled send time)")
        lines.append("")
        lines.append(
            "| payload | rate req/s (basis) | system | achieved req/s | p50 ms | p90 ms | p99 ms "
            "| p99.9 ms | max backlog | gateway CPU s / 1k req |"
        )
        lines.append("|---" * 10 + "|")
        for m in fixed_runs:
            rate, basis = fixed_rates.get(m.payload, (0.0, "?"))
            lat = m.latency_us
            name = GATEWAY_LABELS.get(m.gateway, m.gateway)
            if m.void:
                name += f" (void: {'; '.join(m.void)})"
            lines.append(
                f"| {m.payload} | {rate:,.0f} ({basis}) | {name} | {_fmt_rps(m.rps)} | "
                f"{_fmt_ms(lat.get('p50'))} | {_fmt_ms(lat.get('p90'))} | "
                f"{_fmt_ms(lat.get('p99'))} | {_fmt_ms(lat.get('p99_9'))} | "
                f"{m.raw.get('max_backlog', '-')} | {_fmt_cpu(m.cpu_per_1k('gateway'))} |"
            )
        lines.append("")
    return "\n".join(lines)
