"""`smg bench --embedded`: start mock workers and an smg gateway, benchmark them.

    smg bench --embedded --num-prompts 200 --request-rate 50

starts `smg launch --mock-workers N` on 127.0.0.1 (the gateway's port and its metrics
port picked by the OS), waits for its `SMG_READY` line and a 200 from `/readiness`, points
the run at it and turns the report (`--plot`) on unless asked otherwise. Everything it
started is stopped afterwards: on success, on an error, on Ctrl-C, and (through the
kernel's parent-death signal) when `smg bench` itself is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

READY_PREFIX = "SMG_READY "
# A vLLM-like pace, so a first run shows real TTFT and ITL figures rather than zeros; the
# mock's largest --output-len, so each request's max_tokens decides its length (the mock
# answers min(max_tokens, --output-len) tokens, 16 by default).
DEFAULT_MOCK_ARGS = "--ttft-ms 50 --itl-ms 10 --output-len 1000000"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class EmbeddedError(Exception):
    """The gateway did not start; `usage` when its flags were refused (exit 2)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def refusals(args: argparse.Namespace, defaults: argparse.Namespace) -> list[str]:
    """Flags that do not combine with --embedded (it picks its own target)."""
    out = []
    if args.base_url:
        out.append("--base-url")
    if args.host != defaults.host:
        out.append("--host")
    if args.port != defaults.port:
        out.append("--port")
    if args.overhead:
        out.append("--overhead")
    return out


def launch_command(args: argparse.Namespace, python: str = sys.executable) -> list[str]:
    """The `smg launch` command line for the embedded gateway (pure)."""
    return [
        python,
        "-m",
        "smg",
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--prometheus-port",
        "0",
        "--processes",
        str(args.embedded_processes),
        "--mock-workers",
        str(args.embedded_workers),
        "--mock-worker-args",
        args.mock_worker_args,
        *shlex.split(args.gateway_args or ""),
    ]


def plot_by_default(args: argparse.Namespace) -> None:
    """The issue: an embedded run "shows the result and the report". `--plot` (the report's
    flag) unset is None; "" asks for the report at its default path."""
    if getattr(args, "plot", "absent") is None:
        args.plot = ""


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    log_path: str
    url: str = ""

    def log_tail(self, limit: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as handle:
            return handle.read()[-limit:].decode("utf-8", "replace")
        return ""

    def stop(self) -> None:
        """SIGTERM (the supervisor drains and stops its workers), then SIGKILL to the
        whole process group for anything left."""
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _die_with_parent() -> None:
    from smg.supervisor import die_with_parent

    die_with_parent(signal.SIGTERM)


def start_gateway(args: argparse.Namespace) -> Gateway:
    fd, log_path = tempfile.mkstemp(prefix="smg-bench-embedded-", suffix=".log")
    # Its own session: a Ctrl-C in the terminal reaches smg bench only, which then stops
    # the gateway in order (and the process group can be killed as a whole).
    proc = subprocess.Popen(
        launch_command(args),
        stdin=subprocess.DEVNULL,
        stdout=fd,
        stderr=fd,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    os.close(fd)
    gw = Gateway(proc, log_path)
    try:
        gw.url = _wait_ready_line(gw)
        _wait_readiness(gw)
    except BaseException:
        gw.stop()
        with contextlib.suppress(OSError):
            os.unlink(log_path)  # its tail is in the error message
        raise
    return gw


def _wait_ready_line(gw: Gateway) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(gw.log_path, "rb") as handle:
            for raw in handle.read().split(b"\n"):
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith(READY_PREFIX):
                    return line[len(READY_PREFIX) :].strip()
        code = gw.process.poll()
        if code is not None:
            raise EmbeddedError(
                f"the embedded gateway exited with status {code}:\n{gw.log_tail()}",
                usage=code == 2,
            )
        time.sleep(0.05)
    raise EmbeddedError(f"the embedded gateway did not start in {START_TIMEOUT_S:.0f} s")


def _wait_readiness(gw: Gateway) -> None:
    """/readiness answers 200 once a worker is healthy and routable."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(gw.url + "/readiness", timeout=2.0) as answer:
                if answer.status == 200:
                    return
                last = f"status {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        if gw.process.poll() is not None:
            break
        time.sleep(0.1)
    raise EmbeddedError(f"the embedded gateway never became ready ({last}):\n{gw.log_tail()}")


@contextlib.contextmanager
def embedded_target(args: argparse.Namespace) -> Iterator[None]:
    """With --embedded: start the gateway (and its mock workers), point `args` at it, stop
    it afterwards. Otherwise nothing."""
    if not getattr(args, "embedded", False):
        yield
        return
    from smg.bench.args import build_parser
    from smg.bench.serve import UsageError

    bad = refusals(args, build_parser().parse_args([]))
    if bad:
        raise UsageError(f"--embedded starts its own gateway; drop {', '.join(bad)}")
    if args.embedded_workers < 1 or args.embedded_processes < 1:
        raise UsageError("--embedded-workers and --embedded-processes must be >= 1")
    try:
        gw = start_gateway(args)
    except EmbeddedError as exc:
        if exc.usage:
            raise UsageError(str(exc)) from None
        raise RuntimeError(str(exc)) from None
    failed = False
    try:
        args.base_url = gw.url
        plot_by_default(args)
        print(
            f"embedded: smg gateway {gw.url} (pid {gw.process.pid}, "
            f"{args.embedded_processes} process(es)) with {args.embedded_workers} mock "
            f"worker(s) [{args.mock_worker_args}]",
            flush=True,
        )
        yield
    except KeyboardInterrupt:
        print("embedded: interrupted; stopping the gateway", file=sys.stderr, flush=True)
        raise
    except BaseException:
        failed = True
        raise
    finally:
        gw.stop()
        if failed:  # the gateway's side of the story, for the error being reported
            print(f"embedded: gateway log kept at {gw.log_path}", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                os.unlink(gw.log_path)
