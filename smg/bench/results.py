"""Result files (JSON + CSV summary), run metadata and the printed summary."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shlex
import socket
import subprocess
from datetime import UTC, datetime
from typing import Any

import smg

SECRET_HEADERS = ("authorization", "api-key", "x-api-key", "cookie")


def redact_argv(argv: list[str]) -> list[str]:
    """Hide values of secret-looking --header KEY=VALUE items."""
    out: list[str] = []
    for item in argv:
        key = item.split("=", 1)[0].strip().lower() if "=" in item else ""
        out.append(f"{item.split('=', 1)[0]}=<redacted>" if key in SECRET_HEADERS else item)
    return out


def git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(smg.__file__)))
    try:
        res = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_metadata(argv: list[str]) -> dict[str, Any]:
    return {
        "command": "smg bench " + shlex.join(redact_argv(argv)),
        "smg_version": smg.__version__,
        "smg_commit": git_commit(),
        "machine": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def result_filename(
    label: str,
    request_rate: float,
    max_concurrency: int | None,
    model: str,
    date: str,
    ramp: tuple[str, float, float] | None = None,
) -> str:
    """vllm's naming: {label}-{rate}qps[-concurrencyN]-{model}-{date}.json."""
    conc = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    base = model.split("/")[-1]
    if ramp:
        return f"{label}-ramp-up-{ramp[0]}-{ramp[1]}qps-{ramp[2]}qps{conc}-{base}-{date}.json"
    return f"{label}-{request_rate}qps{conc}-{base}-{date}.json"


def flat_scalars(result: dict[str, Any]) -> dict[str, Any]:
    """Scalar fields, with nested dicts of scalars flattened as parent.child."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, dict):
            if depth >= 3:
                return
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[prefix] = value

    walk("", result, 0)
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else None)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def save(result: dict[str, Any], path: str, append: bool = False) -> str:
    """Writes the JSON (one object; appended as a new line with append) and a CSV
    summary beside it; returns the CSV path."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    mode = "a" if append else "w"
    with open(path, mode, encoding="utf-8") as f:
        if append and f.tell() != 0:
            f.write("\n")
        json.dump(_json_safe(result), f)
    csv_path = os.path.splitext(path)[0] + ".csv"
    row = flat_scalars(_json_safe(result))
    new = not (append and os.path.exists(csv_path))
    with open(csv_path, mode if not new else "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
    return csv_path


def load(path: str) -> dict[str, Any]:
    """Reads a result file; with several appended results, returns the last."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise
        data = json.loads(lines[-1])
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a benchmark result object")
    return data


_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
_HEADERS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def summary_text(result: dict[str, Any], percentiles: list[float]) -> str:
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: Any, fmt: str = "{:<10}") -> None:
        lines.append(("{:<40} " + fmt).format(label, value))

    row("Successful requests:", result.get("completed"))
    row("Failed requests:", result.get("failed"))
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    if result.get("request_rate") not in (None, "inf"):
        row("Request rate configured (RPS):", float(result["request_rate"]), "{:<10.2f}")
    row("Benchmark duration (s):", result.get("duration", 0.0), "{:<10.2f}")
    row("Total input tokens:", result.get("total_input_tokens"))
    if "total_output_tokens" in result:
        row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result.get("request_throughput", 0.0), "{:<10.2f}")
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"], "{:<10.2f}")
    if "output_throughput" in result:
        row("Output token throughput (tok/s):", result["output_throughput"], "{:<10.2f}")
        row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], "{:<10.2f}")
        row("Peak concurrent requests:", result["max_concurrent_requests"], "{:<10.2f}")
    row("Total token throughput (tok/s):", result.get("total_token_throughput", 0.0), "{:<10.2f}")
    for key, name in _NAMES.items():
        if f"mean_{key}_ms" not in result:
            continue
        lines.append(f"{_HEADERS[key]:-^50}")
        row(f"Mean {name} (ms):", result[f"mean_{key}_ms"], "{:<10.2f}")
        row(f"Median {name} (ms):", result[f"median_{key}_ms"], "{:<10.2f}")
        for p in percentiles:
            label = str(int(p)) if int(p) == p else str(p)
            if f"p{label}_{key}_ms" in result:
                row(f"P{label} {name} (ms):", result[f"p{label}_{key}_ms"], "{:<10.2f}")
    lines.append("{:-^50}".format("smg: client and validity"))
    client = result.get("smg_client") or {}
    if client:
        row("Client processes:", client.get("processes"))
        row("Client CPU, busiest process (%):", client.get("cpu_percent_max", 0.0), "{:<10.1f}")
        lag = client.get("send_lag_ms") or {}
        row("Send lag p99 (ms):", lag.get("p99", 0.0), "{:<10.3f}")
    failures = result.get("smg_failures") or {}
    if failures.get("by_error"):
        row("Failures by cause:", json.dumps(failures["by_error"], sort_keys=True), "{}")
        row("Failures by status:", json.dumps(failures.get("by_status", {}), sort_keys=True), "{}")
    short = result.get("smg_short_outputs")
    if short and short.get("requests"):
        row(
            "Short outputs (ignore_eos):",
            f"{short['requests']} req, -{short['missing_tokens']} tok",
            "{}",
        )
    row("Valid run:", "yes" if result.get("smg_valid", True) else "NO", "{}")
    for reason in result.get("smg_invalid_reasons") or []:
        lines.append(f"  invalid: {reason}")
    for warning in result.get("smg_warnings") or []:
        lines.append(f"  WARNING: {warning}")
    lines.append("=" * 50)
    return "\n".join(lines)
