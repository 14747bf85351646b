#!/usr/bin/env python3
"""Side-by-side benchmark: this repo's gateway, the Rust SMG 1.13, and the stub alone.

Every system is driven by the same client, payloads, connection count, duration and cores,
against the same C upstream stub (stub.c). Maximum throughput comes from wrk (closed loop);
latency percentiles come from loadgen.c at a fixed, open-loop rate set to a fraction of the
Rust SMG's measured maximum. See README.md for the full procedure.

    python native_bench/run.py --gateways direct,rust --rounds 3 --duration 5
    python native_bench/run.py --gateways smg,rust --tls            # both serve TLS
    python native_bench/run.py --gateways smg,rust --api-key KEY    # both require the key
    python native_bench/run.py all      # every scenario, one table (bench_all.py)

Standard library plus psutil (and trustme for --tls, from the repo's test extras).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # pragma: no cover - depends on the interpreter
    sys.exit(
        "run.py needs psutil: run it with the repo's venv (.venv/bin/python) or pip install psutil"
    )

# tests/gatewayutil.free_port: the one port picker (no port handed out twice lately).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import (
    GATEWAY_LABELS,
    PAYLOADS,
    RATIO_PAIRS,
    CoreLayout,
    Measurement,
    ParseError,
    core_layout,
    cpu_delta,
    fixed_rate_for,
    format_cpu_list,
    markdown_report,
    median_or_none,
    paired_ratios,
    parse_cpu_list,
    parse_loadgen_summary,
    parse_wrk_summary,
    rotation,
    split_load,
    void_reasons,
)
from gatewayutil import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / "build"
LOGS = BUILD / "logs"
OFFLINE = BUILD / "offline"
PAYLOAD_DIR = HERE / "payloads"
RUST_VERSION = "1.13.0"
HOST = "127.0.0.1"
STUB_MARKER = b"chatcmpl-stub"
STOP_GRACE_S = 5.0
# The smg-base gateway: this repo with retries, breakers, admission and overload protection
# switched off, to measure what they cost (issue 7: at least 90% of the throughput without).
SMG_BASE_ARGS = (
    "--disable-retries --disable-circuit-breaker --max-concurrent-requests 0 "
    "--disable-worker-overload-protection"
)

# Launches the Rust SMG's CLI where its setproctitle dependency is missing (an offline install
# from the lone wheel): the module only renames the process, so a no-op stands in for it.
RUST_SHIM = (
    "import sys, types\n"
    "m = types.ModuleType('setproctitle')\n"
    "m.setproctitle = lambda title: None\n"
    "sys.modules.setdefault('setproctitle', m)\n"
    "from smg.cli import main\n"
    "main(sys.argv[1:])\n"
)


class BenchError(RuntimeError):
    """A problem the runner reports plainly and stops on."""


class GatewayError(RuntimeError):
    """A gateway that would not start or answer; voids that system's round."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes


def pinned(cores: Sequence[int]) -> Callable[[], None]:
    """preexec_fn that pins the child before exec, so every thread it starts inherits it."""
    cpu_set = set(cores)

    def apply() -> None:
        os.sched_setaffinity(0, cpu_set)

    return apply


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGTERM to the process group this runner created for it, then SIGKILL."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=STOP_GRACE_S)
        # Children that outlived their parent (a supervisor killed first) share the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def start_proc(
    name: str,
    argv: Sequence[str],
    cores: Sequence[int],
    log_path: Path | None,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdout_pipe: bool = False,
) -> Proc:
    out: Any
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("wb")
    else:
        out = subprocess.DEVNULL
    try:
        popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if stdout_pipe else out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=pinned(cores),
        )
    except OSError as exc:
        raise GatewayError(f"cannot start {name}: {exc}") from exc
    finally:
        if log_path is not None:
            out.close()
    return Proc(name, popen, log_path)


def tree_cpu(pid: int) -> dict[int, float]:
    """User+system CPU seconds of a process and all its descendants, by pid."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[int, float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[p.pid] = t.user + t.system
    return out


def http_call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    api_key: str | None = None,
) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(HOST, port, timeout=timeout, context=tls)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------- build, tools


def build_native(force: bool = False) -> dict[str, Path]:
    """Compiles stub.c and loadgen.c into build/ when missing or older than their source."""
    BUILD.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    out: dict[str, Path] = {}
    for name in ("stub", "loadgen"):
        src, binary = HERE / f"{name}.c", BUILD / name
        stale = not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime
        if force or stale:
            if shutil.which(cc) is None:
                if binary.exists():
                    log(f"no C compiler ({cc}); using the existing {binary}")
                    out[name] = binary
                    continue
                raise BenchError(f"no C compiler ({cc}) to build {src}; apt-get install -y gcc")
            cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(binary), str(src)]
            log("building: " + " ".join(cmd))
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise BenchError(f"compiling {src} failed:\n{res.stderr}")
        out[name] = binary
    return out


def resolve_wrk(explicit: str | None) -> tuple[Path, dict[str, str]]:
    """Finds wrk: --wrk, then PATH, then an offline copy under build/offline/."""
    candidates = [explicit] if explicit else [shutil.which("wrk"), str(OFFLINE / "wrk")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            wrk = Path(c).resolve()
            env = dict(os.environ)
            if wrk.parent != Path("/usr/bin"):
                # A carried wrk brings its libluajit beside it.
                env["LD_LIBRARY_PATH"] = os.pathsep.join(
                    p for p in (str(wrk.parent), env.get("LD_LIBRARY_PATH", "")) if p
                )
            res = subprocess.run([str(wrk), "-v"], capture_output=True, text=True, env=env)
            text = res.stdout + res.stderr
            if "wrk" not in text or "error while loading" in text:
                raise BenchError(f"{wrk} does not run here:\n{text.strip()}")
            return wrk, env
    raise BenchError(
        "wrk not found. Install it with: apt-get install -y wrk  (or pass --wrk PATH; "
        "`run.py --prepare-offline` copies it with its libluajit into build/offline/)"
    )


def wrk_version(wrk: Path, env: dict[str, str]) -> str:
    res = subprocess.run([str(wrk), "-v"], capture_output=True, text=True, env=env)
    return (res.stdout + res.stderr).splitlines()[0].strip() if res.stdout + res.stderr else "?"


# ----------------------------------------------------------------------------- TLS


@dataclass
class TlsFiles:
    """A throw-away CA and a certificate for 127.0.0.1, made at run time (--tls); both
    gateways serve this same pair, and the runner's own probes trust the CA."""

    directory: Path
    cert: Path
    key: Path
    client: ssl.SSLContext

    @classmethod
    def make(cls) -> TlsFiles:
        try:
            import trustme
        except ImportError as exc:
            raise BenchError(
                "--tls needs trustme: run with the repo's venv (pip install -e '.[test]')"
            ) from exc
        directory = Path(tempfile.mkdtemp(prefix="smg-bench-tls-"))
        ca = trustme.CA()
        issued = ca.issue_cert(HOST, "localhost")
        cert, key = directory / "cert.pem", directory / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        client = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
        return cls(directory, cert, key, client)

    def args(self) -> list[str]:
        return ["--tls-cert-path", str(self.cert), "--tls-key-path", str(self.key)]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# ----------------------------------------------------------------------------- the Rust SMG


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def rust_probe(venv: Path) -> dict[str, Any] | None:
    """What the venv holds: the Rust SMG's version and whether setproctitle imports."""
    py = venv_python(venv)
    if not py.exists():
        return None
    code = (
        "import importlib.util, json\n"
        "import smg.smg_rs as r\n"
        "print(json.dumps({'version': r.get_version_string(),"
        " 'setproctitle': importlib.util.find_spec('setproctitle') is not None}))\n"
    )
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd="/")
    if res.returncode != 0:
        return None
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None
    return info if isinstance(info, dict) else None


def make_venv(venv: Path) -> list[str]:
    """Creates the venv; returns the pip command that installs into it."""
    res = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if res.returncode == 0 and (venv / "bin" / "pip").exists():
        return [str(venv_python(venv)), "-m", "pip"]
    # No ensurepip here (Debian without python3-venv): install with this interpreter's pip.
    shutil.rmtree(venv, ignore_errors=True)
    res = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise BenchError(f"cannot create {venv}: {res.stderr.strip()}")
    return [sys.executable, "-m", "pip", "--python", str(venv_python(venv))]


def ensure_rust_venv(venv: Path, wheel: Path | None) -> dict[str, Any]:
    """Installs the Rust SMG into its own venv (never the repo's: both are called `smg`)."""
    info = rust_probe(venv)
    if info and wheel is None and str(info.get("version", "")).startswith("smg " + RUST_VERSION):
        return info
    if info and wheel is None:
        log(f"{venv} holds {info.get('version')}, not {RUST_VERSION}; reinstalling")
    if not venv_python(venv).exists():
        log(f"creating {venv}")
        pip = make_venv(venv)
    elif (venv / "bin" / "pip").exists():
        pip = [str(venv_python(venv)), "-m", "pip"]
    else:
        pip = [sys.executable, "-m", "pip", "--python", str(venv_python(venv))]
    if wheel is not None:
        if not wheel.is_file():
            raise BenchError(f"--rust-wheel {wheel} is not a file")
        # Offline: dependencies come only from wheels beside it; setproctitle is the one the
        # launcher needs, and the shim covers its absence.
        cmd = [*pip, "install", "-q", "--no-index", "--find-links", str(wheel.parent), str(wheel)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log("offline install with dependencies failed; installing the wheel alone")
            cmd = [*pip, "install", "-q", "--no-index", "--no-deps", str(wheel)]
            res = subprocess.run(cmd, capture_output=True, text=True)
    else:
        cmd = [*pip, "install", "-q", f"smg=={RUST_VERSION}"]
        log("installing: " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"installing the Rust SMG failed ({' '.join(cmd)}):\n{res.stderr}")
    info = rust_probe(venv)
    if not info:
        raise BenchError(f"the Rust SMG does not import from {venv} after installing it")
    return info


def rust_prefix(venv: Path, info: dict[str, Any]) -> list[str]:
    if info.get("setproctitle") and (venv / "bin" / "smg").exists():
        return [str(venv / "bin" / "smg")]
    return [str(venv_python(venv)), "-c", RUST_SHIM]


# ----------------------------------------------------------------------------- our gateway


def resolve_smg_python(explicit: str | None) -> Path:
    if explicit:
        found = shutil.which(explicit) or explicit
        return Path(found)
    venv_py = REPO / ".venv" / "bin" / "python"
    return venv_py if venv_py.exists() else Path(sys.executable)


def check_smg_python(py: Path) -> str:
    """Confirms py imports this repo's smg (not the Rust one); returns its `launch --help`."""
    code = (
        "import importlib.util, smg\n"
        "assert importlib.util.find_spec('smg.smg_rs') is None, 'this is the Rust smg'\n"
        "print(smg.__file__)\n"
    )
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise BenchError(f"{py} cannot import this repo's smg:\n{res.stderr.strip()}")
    helptext = subprocess.run(
        [str(py), "-m", "smg", "launch", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    return helptext.stdout + helptext.stderr


# ----------------------------------------------------------------------------- gateways


@dataclass
class GatewaySpec:
    name: str
    prefix: list[str]  # argv before `launch`; empty for direct
    extra: list[str]
    cwd: Path | None = None
    env: dict[str, str] | None = None
    prometheus_host: bool = True
    processes: int | None = None

    def argv(self, worker_url: str, port: int, prom_port: int) -> list[str]:
        argv = [
            *self.prefix,
            "launch",
            "--worker-urls",
            worker_url,
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        if self.processes is not None:
            argv += ["--processes", str(self.processes)]
        argv += ["--policy", "round_robin", "--log-level", "warn"]
        argv += ["--prometheus-port", str(prom_port)]
        if self.prometheus_host:
            argv += ["--prometheus-host", HOST]
        return argv + self.extra


def wait_ready(
    proc: Proc,
    port: int,
    timeout: float,
    probe_body: bytes,
    tls: ssl.SSLContext | None = None,
    api_key: str | None = None,
) -> float:
    """Waits for /readiness, then for three good chat answers in a row that came from the stub.

    /readiness alone is not enough: the Rust SMG answers it before its worker is registered.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    good = 0
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise GatewayError(
                f"{proc.name} exited with status {proc.popen.returncode} before it was ready; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        try:
            status, _ = http_call(port, "GET", "/readiness", timeout=2.0, tls=tls)
            if status not in (200, 404, 405):
                last = f"/readiness answered {status}"
                good = 0
                time.sleep(0.2)
                continue
            status, body = http_call(
                port, "POST", "/v1/chat/completions", probe_body, 5.0, tls, api_key
            )
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
            good = 0
            time.sleep(0.2)
            continue
        if status == 200 and STUB_MARKER in body:
            good += 1
            if good >= 3:
                return time.monotonic() - t0
            continue
        last = f"chat answered {status}: {body[:200]!r}"
        good = 0
        time.sleep(0.2)
    raise GatewayError(
        f"{proc.name} not ready after {timeout:.0f}s ({last}); log {proc.log_path}:\n"
        f"{proc.log_tail()}"
    )


# ----------------------------------------------------------------------------- the stub


@dataclass
class Stub:
    proc: Proc
    port: int
    probe_log: Path

    def stats(self) -> dict[str, int]:
        status, body = http_call(self.port, "GET", "/stub/stats", timeout=5.0)
        if status != 200:
            raise BenchError(f"stub /stub/stats answered {status}")
        data = json.loads(body)
        return {k: int(v) for k, v in data.items()}

    def probe_offset(self) -> int:
        return self.probe_log.stat().st_size if self.probe_log.exists() else 0

    def probes_since(self, offset: int) -> dict[str, int]:
        """Counts of "METHOD target" the stub logged since offset (non-inference requests)."""
        if not self.probe_log.exists():
            return {}
        with self.probe_log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        seen: dict[str, int] = {}
        for line in text.splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[0] == "PROBE" and "/stub/stats" not in parts[3]:
                key = f"{parts[2]} {parts[3]}"
            elif len(parts) >= 3 and parts[0] == "BAD":
                key = "unparsable: " + " ".join(parts[2:])
            else:
                continue
            seen[key] = seen.get(key, 0) + 1
        return seen


def start_stub(binary: Path, layout: CoreLayout) -> Stub:
    LOGS.mkdir(parents=True, exist_ok=True)
    probe_log = LOGS / "stub-probes.log"
    argv = [str(binary), "--host", HOST, "--port", "0", "--threads", str(layout.stub_threads)]
    argv.append("--log-probes")
    proc = start_proc("stub", argv, layout.stub, probe_log, stdout_pipe=True)
    assert proc.popen.stdout is not None
    ready, _, _ = select.select([proc.popen.stdout], [], [], 10.0)
    line = proc.popen.stdout.readline().decode() if ready else ""
    parts = line.split()
    if len(parts) != 3 or parts[0] != "LISTENING":
        proc.stop()
        raise BenchError(f"stub did not start (said {line!r}); log {probe_log}")
    return Stub(proc, int(parts[2]), probe_log)


# ----------------------------------------------------------------------------- load clients


def _parsed(parse: Callable[[str], dict[str, Any]], text: str, argv: list[str]) -> dict[str, Any]:
    try:
        return parse(text)
    except (ParseError, KeyError, TypeError) as exc:
        raise BenchError(f"unreadable output from {' '.join(argv)}: {exc}\n{text[-2000:]}") from exc


@dataclass
class Client:
    kind: str  # "wrk" or "loadgen"
    wrk: Path | None
    wrk_env: dict[str, str] | None
    loadgen: Path
    threads: int
    connections: int
    cores: tuple[int, ...]
    api_key: str | None = None  # sent as `Authorization: Bearer` (post.lua)

    def max_run(
        self, port: int, payload: str, duration: int, scheme: str = "http"
    ) -> dict[str, Any]:
        p = PAYLOADS[payload]
        body = PAYLOAD_DIR / p.file
        if self.kind == "wrk":
            assert self.wrk is not None
            argv = [
                str(self.wrk),
                "-t",
                str(self.threads),
                "-c",
                str(self.connections),
                "-d",
                f"{duration}s",
                "--timeout",
                "10s",
                "-s",
                str(HERE / "post.lua"),
                # https: wrk speaks TLS (OpenSSL) with keep-alive, certificate unchecked.
                f"{scheme}://{HOST}:{port}{p.path}",
                "--",
                str(body),
            ]
            env = {**(self.wrk_env or os.environ), "WRK_CHECK_STATUS": "1"}
            if self.api_key:
                env["WRK_API_KEY"] = self.api_key
            res = self._run(argv, duration, env)
            return _parsed(parse_wrk_summary, res, argv)
        argv = self._loadgen_argv(port, payload, rate=0.0, duration=duration, warmup=0)
        return _parsed(parse_loadgen_summary, self._run(argv, duration, None), argv)

    def fixed_run(
        self, port: int, payload: str, rate: float, duration: int, warmup: int
    ) -> dict[str, Any]:
        argv = self._loadgen_argv(port, payload, rate=rate, duration=duration, warmup=warmup)
        s = _parsed(parse_loadgen_summary, self._run(argv, duration + warmup, None), argv)
        s["rps"] = s["achieved_rate"]
        s["requests"] = s["recorded"]
        return s

    def _loadgen_argv(
        self, port: int, payload: str, rate: float, duration: int, warmup: int
    ) -> list[str]:
        p = PAYLOADS[payload]
        threads = max(1, min(self.threads, self.connections))
        return [
            str(self.loadgen),
            "--host",
            HOST,
            "--port",
            str(port),
            "--path",
            p.path,
            "--body",
            str(PAYLOAD_DIR / p.file),
            "--rate",
            f"{rate:.3f}",
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--connections",
            str(self.connections),
            "--threads",
            str(threads),
            "--timeout",
            "10",
        ]

    def _run(self, argv: list[str], duration: int, env: dict[str, str] | None) -> str:
        try:
            res = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=env,
                timeout=duration + 60,
                preexec_fn=pinned(self.cores),
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{Path(argv[0]).name} did not finish: {' '.join(argv)}") from exc
        if res.returncode != 0:
            raise BenchError(
                f"{Path(argv[0]).name} failed ({res.returncode}): {' '.join(argv)}\n"
                f"{res.stdout}\n{res.stderr}"
            )
        return res.stdout


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class Running:
    name: str
    proc: Proc | None
    port: int
    ready_s: float
    probe_offset: int
    scheme: str = "http"  # https for a gateway serving TLS (--tls); the stub is plain


class Bench:
    def __init__(self, args: argparse.Namespace, layout: CoreLayout) -> None:
        self.args = args
        self.layout = layout
        self.gateways: list[str] = args.gateways
        self.payloads: list[str] = args.payloads
        self.specs: dict[str, GatewaySpec] = {}
        self.versions: dict[str, str] = {}
        self.start_failures: dict[str, int] = {}
        self.probes: dict[str, dict[str, int]] = {}
        self.max_runs: list[Measurement] = []
        self.fixed_runs: list[Measurement] = []
        self.fixed_rates: dict[str, tuple[float, str]] = {}
        self.ready_times: dict[str, list[float]] = {}
        self.stub: Stub | None = None
        self.client: Client | None = None
        self.loadavg_at_start = os.getloadavg()
        self.tls: TlsFiles | None = None

    # -- setup

    def prepare(self) -> None:
        bins = build_native(self.args.rebuild)
        wrk, wrk_env = (None, None)
        if self.args.max_client == "wrk":
            wrk, wrk_env = resolve_wrk(self.args.wrk)
            self.versions["wrk"] = wrk_version(wrk, wrk_env)
        self.client = Client(
            kind=self.args.max_client,
            wrk=wrk,
            wrk_env=wrk_env,
            loadgen=bins["loadgen"],
            threads=self.layout.client_threads,
            connections=self.args.connections,
            cores=self.layout.client,
            api_key=self.args.api_key,
        )
        if self.args.tls:
            self.tls = TlsFiles.make()
            log(f"--tls: both gateways serve {self.tls.cert} (a CA made for this run)")
        # What every gateway gets: the same TLS pair, the same required key.
        common: list[str] = self.tls.args() if self.tls is not None else []
        if self.args.api_key:
            common += ["--api-key", self.args.api_key]
        if "rust" in self.gateways:
            venv = Path(self.args.rust_venv)
            wheel = Path(self.args.rust_wheel) if self.args.rust_wheel else None
            info = ensure_rust_venv(venv, wheel)
            self.versions["rust"] = str(info.get("version"))
            self.specs["rust"] = GatewaySpec(
                "rust",
                rust_prefix(venv, info),
                [*common, *self.args.rust_extra_args.split()],
                # Not the repo root: `python -c` puts the cwd first on sys.path, where this
                # repo's own `smg` package would shadow the Rust one.
                cwd=BUILD,
            )
        smg_variants = {
            "smg": self.args.smg_extra_args,
            "smg-base": self.args.smg_base_args,
            # The same gateway in IGW mode, in front of the same self-hosted stub.
            "smg-igw": f"--enable-igw {self.args.smg_extra_args}",
        }
        if any(name in self.gateways for name in smg_variants):
            py = resolve_smg_python(self.args.smg_python)
            helptext = check_smg_python(py)
            self.versions["smg_python"] = str(py)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
            )
            for name, extra in smg_variants.items():
                if name not in self.gateways:
                    continue
                self.specs[name] = GatewaySpec(
                    name,
                    [str(py), "-m", "smg"],
                    [*common, *extra.split()],
                    cwd=REPO,
                    env=env,
                    prometheus_host="--prometheus-host" in helptext,
                    processes=self.args.smg_processes or len(self.layout.gateway),
                )
        self.stub = start_stub(bins["stub"], self.layout)
        log(
            f"stub on port {self.stub.port} ({self.layout.stub_threads} threads, cores "
            f"{format_cpu_list(self.layout.stub)})"
        )

    # -- gateway lifecycle

    def start_gateway(self, name: str, round_label: str) -> Running:
        assert self.stub is not None
        offset = self.stub.probe_offset()
        if name == "direct":
            return Running(name, None, self.stub.port, 0.0, offset)
        spec = self.specs[name]
        port, prom = free_port(), free_port()
        while prom == port:
            prom = free_port()
        argv = spec.argv(f"http://{HOST}:{self.stub.port}", port, prom)
        log_path = LOGS / f"{name}-{round_label}.log"
        proc = start_proc(name, argv, self.layout.gateway, log_path, cwd=spec.cwd, env=spec.env)
        try:
            probe = (PAYLOAD_DIR / PAYLOADS["chat"].file).read_bytes()
            ready = wait_ready(
                proc,
                port,
                self.args.ready_timeout,
                probe,
                self.tls.client if self.tls is not None else None,
                self.args.api_key,
            )
        except BaseException:
            proc.stop()
            raise
        self.ready_times.setdefault(name, []).append(ready)
        log(f"{name} ready on port {port} after {ready:.2f}s (pid {proc.pid})")
        scheme = "https" if self.tls is not None else "http"
        return Running(name, proc, port, ready, offset, scheme)

    def stop_gateway(self, run: Running) -> None:
        assert self.stub is not None
        if run.proc is not None:
            run.proc.stop()
        seen = self.stub.probes_since(run.probe_offset)
        agg = self.probes.setdefault(run.name, {})
        for k, v in seen.items():
            agg[k] = agg.get(k, 0) + v

    def start_or_record_failure(self, name: str, label: str) -> Running | str:
        if self.start_failures.get(name, 0) >= 2:
            return f"skipped: {name} failed to start twice"
        try:
            try:
                run = self.start_gateway(name, label)
            except GatewayError as exc:
                if "exited" not in str(exc):
                    raise
                # Once more: the free port picked for it may have been taken in between.
                log(f"{name} exited while starting; trying once more")
                run = self.start_gateway(name, label)
        except GatewayError as exc:
            self.start_failures[name] = self.start_failures.get(name, 0) + 1
            log(f"ERROR {exc}")
            return f"failed to start: {str(exc).splitlines()[0]}"
        self.start_failures[name] = 0
        return run

    # -- measurement

    def snapshot(self, run: Running) -> tuple[dict[int, float], dict[int, float], dict[str, int]]:
        assert self.stub is not None
        gw = tree_cpu(run.proc.pid) if run.proc else {}
        try:
            stats = self.stub.stats()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise BenchError(f"the stub stopped answering /stub/stats: {exc}") from exc
        return gw, tree_cpu(self.stub.proc.pid), stats

    def measure(
        self, run: Running, payload: str, round_index: int, fixed_rate: float | None = None
    ) -> Measurement:
        assert self.client is not None
        args = self.args
        warmup: dict[str, Any] | None = None
        if fixed_rate is None and args.warmup > 0:
            warmup = self.client.max_run(run.port, payload, args.warmup, run.scheme)
        g0, s0, st0 = self.snapshot(run)
        if fixed_rate is None:
            res = self.client.max_run(run.port, payload, args.duration, run.scheme)
        else:
            res = self.client.fixed_run(
                run.port, payload, fixed_rate, args.fixed_duration, args.fixed_warmup
            )
        g1, s1, st1 = self.snapshot(run)
        counter = PAYLOADS[payload].stub_counter
        stub_delta = st1.get(counter, 0) - st0.get(counter, 0)
        if fixed_rate is not None:
            # Warm-up requests of the same run also reached the stub; compare with all sent.
            reasons = void_reasons(res, None)
            if stub_delta < res.get("completed", 0):
                reasons.append(f"stub saw {stub_delta} of {res.get('completed')} requests")
        else:
            reasons = void_reasons(res, stub_delta)
        if run.proc is not None and not run.proc.alive():
            reasons.append(f"gateway exited ({run.proc.popen.returncode})")
        if warmup is not None:
            w_reasons = void_reasons(warmup)
            if w_reasons:
                res["warmup_problems"] = w_reasons
        res["stub_delta"] = stub_delta
        res["stub_other"] = {
            k: st1.get(k, 0) - st0.get(k, 0) for k in st1 if k not in (counter, "threads")
        }
        if warmup is not None:
            res["warmup"] = warmup
        lat = {k: float(v) for k, v in res.get("latency_us", {}).items()}
        return Measurement(
            gateway=run.name,
            payload=payload,
            round=round_index,
            rps=float(res["rps"]),
            requests=int(res["requests"]),
            void=reasons,
            gateway_cpu_s=cpu_delta(g0, g1) if run.proc else None,
            stub_cpu_s=cpu_delta(s0, s1),
            latency_us=lat,
            raw=res,
        )

    def failed(self, name: str, payload: str, round_index: int, why: str) -> Measurement:
        return Measurement(name, payload, round_index, 0.0, 0, void=[why])

    def max_phase(self) -> None:
        args = self.args
        for r in range(args.rounds):
            order = rotation(self.gateways, r)
            log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
            for name in order:
                started = self.start_or_record_failure(name, f"r{r + 1}")
                if isinstance(started, str):
                    self.max_runs += [self.failed(name, p, r, started) for p in self.payloads]
                    continue
                try:
                    for payload in self.payloads:
                        m = self.measure(started, payload, r)
                        self.max_runs.append(m)
                        cpu = m.cpu_per_1k("gateway")
                        log(
                            f"  {name:6s} {payload:10s} {m.rps:10,.0f} req/s"
                            + (f"  cpu {cpu:.3f} s/1k" if cpu is not None else "")
                            + (f"  VOID: {'; '.join(m.void)}" if m.void else "")
                        )
                except BenchError as exc:
                    log(f"ERROR {exc}")
                    done = {m.payload for m in self.max_runs if m.round == r and m.gateway == name}
                    self.max_runs += [
                        self.failed(name, p, r, f"client error: {str(exc).splitlines()[0]}")
                        for p in self.payloads
                        if p not in done
                    ]
                finally:
                    self.stop_gateway(started)

    def medians(self, payload: str) -> dict[str, float | None]:
        return {
            gw: median_or_none(
                m.clean_rps for m in self.max_runs if m.gateway == gw and m.payload == payload
            )
            for gw in self.gateways
        }

    def fixed_phase(self) -> None:
        args = self.args
        if args.fixed_rate_fraction <= 0 and not args.fixed_rate:
            return
        if args.tls or args.api_key:
            # loadgen.c speaks plain HTTP without headers of its own choosing.
            log("--tls/--api-key: no fixed-rate latency phase (loadgen has neither)")
            return
        for payload in self.payloads:
            if args.fixed_rate:
                self.fixed_rates[payload] = (args.fixed_rate, "--fixed-rate")
                continue
            chosen = fixed_rate_for(self.medians(payload), args.fixed_rate_fraction)
            if chosen is None:
                log(f"no clean maximum for {payload}; skipping its fixed-rate run")
                continue
            rate, basis = chosen
            self.fixed_rates[payload] = (rate, f"{args.fixed_rate_fraction:g} x {basis} median")
        if not self.fixed_rates:
            return
        order = rotation(self.gateways, args.rounds)
        log(
            "fixed-rate latency: "
            + ", ".join(f"{p} {r:,.0f}/s" for p, (r, _) in self.fixed_rates.items())
        )
        for name in order:
            started = self.start_or_record_failure(name, "fixed")
            if isinstance(started, str):
                self.fixed_runs += [self.failed(name, p, -1, started) for p in self.fixed_rates]
                continue
            try:
                for payload, (rate, _) in self.fixed_rates.items():
                    m = self.measure(started, payload, -1, fixed_rate=rate)
                    self.fixed_runs.append(m)
                    lat = m.latency_us
                    log(
                        f"  {name:6s} {payload:10s} at {rate:,.0f}/s: p50 {lat.get('p50', 0) / 1000:.2f} "
                        f"p99 {lat.get('p99', 0) / 1000:.2f} p99.9 {lat.get('p99_9', 0) / 1000:.2f} ms"
                        + (f"  VOID: {'; '.join(m.void)}" if m.void else "")
                    )
            except BenchError as exc:
                log(f"ERROR {exc}")
            finally:
                self.stop_gateway(started)

    def close(self) -> None:
        if self.stub is not None:
            self.stub.proc.stop()
        if self.tls is not None:
            self.tls.remove()

    # -- results

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for payload in self.payloads:
            meds = self.medians(payload)
            per_round = {
                gw: {
                    m.round: m.clean_rps
                    for m in self.max_runs
                    if m.gateway == gw and m.payload == payload
                }
                for gw in self.gateways
            }
            ratios: dict[str, Any] = {}
            for a, b in RATIO_PAIRS:
                if a in per_round and b in per_round:
                    rs = paired_ratios(per_round[a], per_round[b])
                    ratios[f"{a}/{b}"] = asdict(rs) if rs else None
            cpu = {
                gw: median_or_none(
                    m.cpu_per_1k("gateway")
                    for m in self.max_runs
                    if m.gateway == gw and m.payload == payload and not m.void
                )
                for gw in self.gateways
            }
            out[payload] = {
                "median_rps": meds,
                "ratios": ratios,
                "gateway_cpu_s_per_1k": cpu,
                "fixed_rate": self.fixed_rates.get(payload),
            }
        return out

    def results(self, started_at: str) -> dict[str, Any]:
        args = self.args
        return {
            "started_at": started_at,
            "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
            "host": {
                "cpus_available": sorted(os.sched_getaffinity(0)),
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "loadavg_at_start": self.loadavg_at_start,
                "loadavg_at_end": os.getloadavg(),
            },
            "settings": {
                "gateways": self.gateways,
                "payloads": self.payloads,
                "rounds": args.rounds,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "connections": args.connections,
                "max_client": args.max_client,
                "client_threads": self.layout.client_threads,
                "stub_threads": self.layout.stub_threads,
                "layout": {
                    "mode": self.layout.mode,
                    "gateway_cores": format_cpu_list(self.layout.gateway),
                    "load_cores": format_cpu_list(self.layout.load),
                    "stub_cores": format_cpu_list(self.layout.stub),
                    "client_cores": format_cpu_list(self.layout.client),
                },
                "smg_processes": args.smg_processes or len(self.layout.gateway),
                "fixed_rate_fraction": args.fixed_rate_fraction,
                "fixed_duration_s": args.fixed_duration,
                "fixed_warmup_s": args.fixed_warmup,
                "tls": bool(args.tls),
                "api_key": bool(args.api_key),  # whether one was required; never the key
                "commands": {
                    name: spec.argv("http://127.0.0.1:STUB_PORT", 0, 0)
                    for name, spec in self.specs.items()
                },
            },
            "versions": self.versions,
            "gateway_ready_s": self.ready_times,
            "probes_seen_by_stub": self.probes,
            "max_runs": [asdict(m) for m in self.max_runs],
            "fixed_runs": [asdict(m) for m in self.fixed_runs],
            "summary": self.summary(),
        }

    def report(self) -> str:
        a = self.args
        smg = f"; smg --processes {self.specs['smg'].processes}" if "smg" in self.specs else ""
        if a.tls:
            smg += "; TLS on both gateways (direct stays plain HTTP)"
        if a.api_key:
            smg += "; --api-key on both gateways"
        load = f"; loadavg {self.loadavg_at_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} now"
        header = (
            f"## gateway benchmark: {', '.join(self.gateways)}; {a.rounds} rounds x {a.duration}s "
            f"(+{a.warmup}s warm-up), {a.connections} connections, client {a.max_client} "
            f"x{self.layout.client_threads} threads, stub x{self.layout.stub_threads} threads; "
            f"cores: {self.layout.mode} (gateway {format_cpu_list(self.layout.gateway)}, "
            f"load {format_cpu_list(self.layout.load)}){smg}{load}"
        )
        return markdown_report(
            self.gateways,
            self.payloads,
            a.rounds,
            self.max_runs,
            self.fixed_runs,
            self.fixed_rates,
            header,
        )


# ----------------------------------------------------------------------------- offline kit


def prepare_offline(dest: Path) -> None:
    """Gathers what a machine without network needs: the Rust SMG wheel and its setproctitle
    dependency for CPython 3.12 x86-64, and this machine's wrk with its libluajit."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_5_x86_64",
        "manylinux1_x86_64",
    ]
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"]
    plat = [f"--platform={p}" for p in platforms]
    for req in (f"smg=={RUST_VERSION}", "setproctitle"):
        cmd = [*base, str(dest), "--python-version", "3.12", "--implementation", "cp", *plat, req]
        log("running: " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"pip download {req} failed:\n{res.stderr}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed here: apt-get install -y wrk, then run again")
    shutil.copy2(wrk, dest / "wrk")
    ldd = subprocess.run(["ldd", wrk], capture_output=True, text=True).stdout
    for line in ldd.splitlines():
        if "luajit" in line and "=>" in line:
            lib = line.split("=>")[1].split("(")[0].strip()
            shutil.copy2(lib, dest / Path(lib).name)
    log(f"offline kit in {dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gateways",
        default="direct,smg,rust",
        help="any of direct,smg,smg-base,smg-igw,rust (smg-base: this repo with "
        "--smg-base-args; smg-igw: this repo with --enable-igw and --smg-extra-args)",
    )
    ap.add_argument(
        "--payloads", default="chat,completion,stream", help="any of " + ",".join(PAYLOADS)
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="client threads (default: by layout)")
    ap.add_argument("--stub-threads", type=int, default=None)
    ap.add_argument(
        "--smg-processes",
        type=int,
        default=None,
        help="our gateway's --processes (default: one per gateway core, as the Rust SMG sizes "
        "its runtime)",
    )
    ap.add_argument("--cores", default="auto", choices=("auto", "shared", "split"))
    ap.add_argument("--gateway-cores", default=None, help="e.g. 0-7 (with --load-cores)")
    ap.add_argument("--load-cores", default=None, help="e.g. 8-15: stub and client")
    ap.add_argument(
        "--stub-cores",
        default=None,
        help="e.g. 8-11, with --client-cores: the stub and the client on disjoint cores "
        "(a thread per core each); with --gateway-cores",
    )
    ap.add_argument("--client-cores", default=None, help="e.g. 12-15 (with --stub-cores)")
    ap.add_argument("--max-client", default="wrk", choices=("wrk", "loadgen"))
    ap.add_argument("--wrk", default=None, help="path to wrk (default: PATH, then build/offline)")
    ap.add_argument("--fixed-rate-fraction", type=float, default=0.5)
    ap.add_argument("--fixed-rate", type=float, default=None, help="explicit rate, req/s")
    ap.add_argument("--fixed-duration", type=int, default=None, help="default: --duration")
    ap.add_argument("--fixed-warmup", type=int, default=None, help="default: --warmup")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--rust-venv", default=str(HERE / ".venv-rust"))
    ap.add_argument("--rust-wheel", default=None, help="install the Rust SMG offline from this")
    ap.add_argument("--rust-extra-args", default="", help="appended to the Rust SMG's command")
    ap.add_argument("--smg-python", default=None, help="python whose -m smg is this repo's")
    ap.add_argument("--smg-extra-args", default="", help="appended to our gateway's command")
    ap.add_argument(
        "--smg-base-args",
        default=SMG_BASE_ARGS,
        help="the smg-base gateway's extra arguments (default: resilience switched off)",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="both gateways serve TLS with one certificate made for the run (trustme); wrk "
        "speaks https with keep-alive; no fixed-rate phase",
    )
    ap.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="both gateways require KEY; the client sends Authorization: Bearer KEY",
    )
    ap.add_argument("--out", default=None, help="results JSON (default: native_bench/results/)")
    ap.add_argument("--rebuild", action="store_true", help="recompile stub and loadgen")
    ap.add_argument(
        "--prepare-offline",
        metavar="DIR",
        nargs="?",
        const=str(OFFLINE),
        default=None,
        help="download wheels and copy wrk for a machine without network, then exit",
    )
    ap.add_argument("--report", metavar="JSON", default=None, help="re-print a saved run's tables")
    args = ap.parse_args(argv)
    args.gateways = [g.strip() for g in args.gateways.split(",") if g.strip()]
    args.payloads = [p.strip() for p in args.payloads.split(",") if p.strip()]
    for g in args.gateways:
        if g not in GATEWAY_LABELS:
            ap.error(f"unknown gateway {g!r}; pick from {', '.join(GATEWAY_LABELS)}")
    if len(set(args.gateways)) != len(args.gateways):
        ap.error("--gateways lists a system twice")
    for p in args.payloads:
        if p not in PAYLOADS:
            ap.error(f"unknown payload {p!r}; pick from {', '.join(PAYLOADS)}")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.connections < 1:
        ap.error("--rounds, --duration and --connections must be positive")
    if (args.tls or args.api_key) and args.max_client != "wrk":
        ap.error("--tls and --api-key need --max-client wrk (loadgen speaks plain HTTP only)")
    if args.api_key is not None and not args.api_key.strip():
        ap.error("--api-key must not be empty")
    if bool(args.stub_cores) != bool(args.client_cores):
        ap.error("--stub-cores and --client-cores go together")
    if args.stub_cores and not args.gateway_cores:
        ap.error("--stub-cores/--client-cores need --gateway-cores")
    if args.stub_cores and args.load_cores:
        ap.error(
            "--load-cores is the union of --stub-cores and --client-cores; give one or the other"
        )
    if args.fixed_duration is None:
        args.fixed_duration = args.duration
    if args.fixed_warmup is None:
        args.fixed_warmup = args.warmup
    return args


def layout_from_args(args: argparse.Namespace, available: Sequence[int]) -> CoreLayout:
    """The core layout the flags ask for, checked against the CPUs this process may use."""
    stub_cores = parse_cpu_list(args.stub_cores) if args.stub_cores else None
    client_cores = parse_cpu_list(args.client_cores) if args.client_cores else None
    load_cores = parse_cpu_list(args.load_cores) if args.load_cores else None
    if stub_cores and client_cores:
        load_cores = sorted(set(stub_cores) | set(client_cores))
    layout = core_layout(
        available,
        args.cores,
        parse_cpu_list(args.gateway_cores) if args.gateway_cores else None,
        load_cores,
        args.stub_threads,
        args.threads,
    )
    if stub_cores and client_cores:
        layout = split_load(layout, stub_cores, client_cores)
    if layout.client_threads > args.connections:
        layout = dataclasses.replace(layout, client_threads=args.connections)
    return layout


def report_from_json(path: Path) -> str:
    data = json.loads(path.read_text())
    st = data["settings"]
    runs = [Measurement(**m) for m in data["max_runs"]]
    fixed = [Measurement(**m) for m in data["fixed_runs"]]
    rates = {
        p: (float(s["fixed_rate"][0]), str(s["fixed_rate"][1]))
        for p, s in data["summary"].items()
        if s.get("fixed_rate")
    }
    header = f"## {path.name}: settings {json.dumps({k: st[k] for k in st if k != 'commands'})}"
    return markdown_report(st["gateways"], st["payloads"], st["rounds"], runs, fixed, rates, header)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["all"]:
        # Every side-by-side scenario in one run, one table (bench_all.py).
        import bench_all

        return bench_all.main(argv[1:])
    args = parse_args(argv)
    if args.report:
        print(report_from_json(Path(args.report)))
        return 0
    if args.prepare_offline:
        prepare_offline(Path(args.prepare_offline))
        return 0
    try:
        layout = layout_from_args(args, sorted(os.sched_getaffinity(0)))
    except ValueError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    now = dt.datetime.now()
    started_at = now.isoformat(timespec="seconds")
    stamp = now.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else HERE / "results" / f"results-{stamp}.json"
    bench = Bench(args, layout)
    log(
        f"layout {layout.mode}: gateway cores {format_cpu_list(layout.gateway)}, "
        f"stub+client cores {format_cpu_list(layout.load)}; loadavg {os.getloadavg()[0]:.2f}"
    )
    try:
        bench.prepare()
        bench.max_phase()
        bench.fixed_phase()
    except BenchError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run.py: interrupted; writing what was measured", file=sys.stderr)
    finally:
        bench.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench.results(started_at), indent=2) + "\n")
    report = bench.report()
    out.with_suffix(".md").write_text(report + "\n")
    print(report)
    log(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
