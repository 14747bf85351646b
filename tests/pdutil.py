"""Start PD (prefill/decode) mock workers for tests: `smg mock-worker --pd-role ...`.

    with pdutil.start_prefill(bootstrap_port=0) as p, pdutil.start_decode(wait_s=2) as d:
        # p.url / p.bootstrap_port / d.url; give the gateway `--prefill p.url p.bootstrap_port
        # --decode d.url`
        ...
        assert pdutil.room_states(p) == {room: "ready"}
        pdutil.set_faults(p.url, ttft_ms=200)  # a slow prefill; crash_rate=1.0: it dies

gRPC (grpc_pd.py: SGLang disaggregated_params, vLLM NIXL kv_transfer_params):

    model = grpcmockutil.llama3_dir(tmp_path / "m")
    with pdutil.start_grpc_prefill(model, "vllm") as p, pdutil.start_grpc_decode(model, "vllm") as d:
        # --prefill p.url p.bootstrap_port --decode d.url; p.pd_stats()["rooms"]

smg in front of them (`smg launch --processes 2 --pd-disaggregation`, ready):

    with pdutil.pd_gateway(p, d, *pdutil.admission_args(1, queue_size=1)) as gateway:
    with pdutil.grpc_pd_gateway(p, d, model) as gateway:
        answers = pdutil.staggered_posts(gateway.url, "/generate", body, (0.0, 0.3, 0.6))
        pdutil.assert_queue_timeout_and_full(answers, gateway.metrics())

The Rust SMG 1.13 in front of them (skip a test when RUST_SMG does not exist):

    with pdutil.rust_gateway([*p.prefill_args(), *d.decode_args()], *pdutil.ONE_SHOT) as url:

Each start_* returns a PdMocks (a MockWorkers with `role` and, for a prefill, one
bootstrap port per worker); leaving the `with` block stops the process (or call stop()).
The bootstrap protocol (smg/mock_worker/pd.py): GET /pd/rooms/{room} (200 with
{"room","state","age_s"} / 404) and GET /pd/rooms ({"rooms": [...]}, oldest first) on
the prefill's bootstrap port; state: "prefilling", "ready" or "failed".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests import mockutil
from tests.gatewayutil import Gateway, free_port, running_gateway
from tests.mockutil import MockWorkers

BOOTSTRAP_PREFIX = "MOCK_WORKER_BOOTSTRAP "


class PdMocks(MockWorkers):
    """A mock-worker process in a PD role; `bootstrap_ports[i]` belongs to `urls[i]`."""

    def __init__(self, mocks: MockWorkers, role: str, bootstrap_ports: list[int]) -> None:
        super().__init__(mocks.proc, mocks.urls, mocks._reader)
        self.role = role
        self.bootstrap_ports = bootstrap_ports

    def __enter__(self) -> PdMocks:
        return self

    @property
    def bootstrap_port(self) -> int:
        return self.bootstrap_ports[0]

    def prefill_args(self) -> list[str]:
        """`--prefill URL PORT ...` for a gateway's command line (a prefill only)."""
        out: list[str] = []
        for url, port in zip(self.urls, self.bootstrap_ports, strict=True):
            out += ["--prefill", url, str(port)]
        return out

    def decode_args(self) -> list[str]:
        out: list[str] = []
        for url in self.urls:
            out += ["--decode", url]
        return out


def _start(role: str, count: int, args: list[str], timeout: float) -> PdMocks:
    argv = ["--pd-role", role, *args]
    proc = subprocess.Popen(mockutil.mock_command(count, argv), stdout=subprocess.PIPE)
    lines, reader = mockutil.start_reader(proc)
    mocks = MockWorkers(proc, [], reader)
    ports: list[int] = []
    want_ports = count if role == "prefill" else 0
    deadline = time.monotonic() + timeout
    try:
        while len(mocks.urls) < count or len(ports) < want_ports:
            late = f"{role} mock printed {len(mocks.urls)}/{count} URLs in time"
            line = mockutil.next_line(lines, proc, deadline, late, f"{role} mock")
            if line.startswith(mockutil.URL_PREFIX):
                mocks.urls.append(line[len(mockutil.URL_PREFIX) :].strip())
            elif line.startswith(BOOTSTRAP_PREFIX):
                ports.append(int(line.split()[-1]))
        for url in mocks.urls:
            mockutil.wait_answering(url, deadline)
    except BaseException:
        mocks.stop()
        raise
    return PdMocks(mocks, role, ports)


def start_prefill(
    count: int = 1, *args: str, bootstrap_port: int = 0, timeout: float = 15.0
) -> PdMocks:
    """Prefill workers; bootstrap ports from `bootstrap_port` (0: ephemeral, read back)."""
    return _start("prefill", count, ["--bootstrap-port", str(bootstrap_port), *args], timeout)


# A streamed decode's head: "early" (at once, as SGLang: a failed KV transfer is then an
# in-band error event after a 200) or "ready" (only once the prefill's room is ready).
STREAM_HEAD = "early"


def start_decode(
    count: int = 1,
    *args: str,
    wait_s: float = 5.0,
    stream_head: str | None = None,
    timeout: float = 15.0,
) -> PdMocks:
    """Decode workers; each request waits up to `wait_s` for its prefill's KV."""
    head = STREAM_HEAD if stream_head is None else stream_head
    argv = ["--pd-wait-s", str(wait_s), "--pd-stream-head", head, *args]
    return _start("decode", count, argv, timeout)


def bootstrap_url(prefill: PdMocks, index: int = 0) -> str:
    return f"http://127.0.0.1:{prefill.bootstrap_ports[index]}"


def rooms(prefill: PdMocks, index: int = 0) -> list[dict[str, Any]]:
    """Every room worker `index` of `prefill` still records, oldest first."""
    status, data = mockutil.request_json("GET", bootstrap_url(prefill, index) + "/pd/rooms")
    assert status == 200, data
    return data["rooms"]


def room_states(prefill: PdMocks, index: int = 0) -> dict[int, str]:
    """room -> "prefilling" | "ready" | "failed" for worker `index` of `prefill`."""
    return {r["room"]: r["state"] for r in rooms(prefill, index)}


def room_state(prefill: PdMocks, room: int, index: int = 0) -> str | None:
    """One room's state, None when that prefill never saw it."""
    status, data = mockutil.request_json("GET", f"{bootstrap_url(prefill, index)}/pd/rooms/{room}")
    return data["state"] if status == 200 else None


def kv_failures(decode_url: str) -> int:
    """Requests this decode worker failed for want of their prefill's KV."""
    return mockutil.stats(decode_url)["pd"]["kv_failures"]


def set_faults(url: str, **fields: Any) -> dict[str, Any]:
    """POST /mock/config: ttft_ms, itl_ms, error_rate, hang_rate, crash_rate, healthy, ..."""
    return mockutil.set_config(url, **fields)


def pd_body(body: dict[str, Any], room: int, bootstrap_port: int, host: str = "127.0.0.1") -> dict:
    """`body` with the bootstrap fields a PD router injects (one request, one room)."""
    return {
        **body,
        "bootstrap_host": host,
        "bootstrap_port": bootstrap_port,
        "bootstrap_room": room,
    }


# --- gRPC PD mocks ------------------------------------------------------------------------------


class GrpcPdMock:
    """A gRPC mock engine in a PD role: `url` (grpc://), `control` (http://) and, for a
    prefill, `bootstrap_port`."""

    def __init__(self, proc: subprocess.Popen[bytes], reader: Any, role: str) -> None:
        self.proc = proc
        self._reader = reader
        self.role = role
        self.url = ""
        self.control = ""
        self.bootstrap_port = 0

    def __enter__(self) -> GrpcPdMock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> int | None:
        return mockutil.stop_with_reader(self.proc, self._reader, timeout)

    def stats(self) -> dict[str, Any]:
        status, data = mockutil.request_json("GET", self.control + "/stats")
        assert status == 200, data
        return data

    def pd_stats(self) -> dict[str, Any]:
        """{"role", "bootstrap_port", "rooms" (a prefill's, oldest first), "kv_failures"}."""
        return self.stats()["pd"]

    def config(self, **fields: Any) -> dict[str, Any]:
        """POST /config: ttft_ms, itl_ms, fail_next, fail_code, delay_ms, ... (grpc_options)."""
        status, data = mockutil.request_json("POST", self.control + "/config", fields)
        assert status == 200, data
        return data


def _start_grpc(
    model_dir: Path, backend: str, role: str, args: list[str], timeout: float
) -> GrpcPdMock:
    argv = [
        sys.executable, "-m", "smg", "mock-worker", "--grpc", "--grpc-backend", backend,
        "--port", "0", "--control-port", "0", "--tokenizer-path", str(model_dir),
        "--model", "llama3", "--pd-role", role, *args,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    lines, reader = mockutil.start_reader(proc)
    mock = GrpcPdMock(proc, reader, role)
    deadline = time.monotonic() + timeout
    try:
        while not mock.url or (role == "prefill" and not mock.bootstrap_port):
            line = mockutil.next_line(lines, proc, deadline, f"{role} gRPC mock: no URL", role)
            if line.startswith("MOCK_CONTROL_URL "):
                mock.control = line.split()[1]
            elif line.startswith(mockutil.URL_PREFIX):
                mock.url = line.split()[1]
            elif line.startswith(BOOTSTRAP_PREFIX):
                mock.bootstrap_port = int(line.split()[-1])
    except BaseException:
        mock.stop()
        raise
    return mock


def start_grpc_prefill(
    model_dir: Path, backend: str, *args: str, bootstrap_port: int = 0, timeout: float = 30.0
) -> GrpcPdMock:
    """A gRPC prefill engine (`backend` "sglang" or "vllm") serving `model_dir`'s tokenizer."""
    extra = ["--bootstrap-port", str(bootstrap_port), *args]
    return _start_grpc(model_dir, backend, "prefill", extra, timeout)


def start_grpc_decode(
    model_dir: Path, backend: str, *args: str, wait_s: float = 5.0, timeout: float = 30.0
) -> GrpcPdMock:
    return _start_grpc(model_dir, backend, "decode", ["--pd-wait-s", str(wait_s), *args], timeout)


# --- the Rust SMG 1.13 in PD mode ----------------------------------------------------------

# The Rust SMG 1.13 binary, to check the mocks (and smg) against; tests skip without it.
RUST_SMG = Path(os.environ.get("SMG_RUST_BIN", "/work/main/native_bench/.venv-rust/bin/smg"))


@contextlib.contextmanager
def rust_smg(args: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """The Rust SMG 1.13 (`smg launch ... *args`) on a free port, ready; stopped on leaving."""
    port = free_port()
    argv = [str(RUST_SMG), "launch", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prometheus-port", str(free_port())]
    # No shutdown grace: it would hold every stop 5 s although nothing is in flight.
    argv += ["--log-level", "warn", "--shutdown-grace-period-secs", "0", *args]
    # The binary is its own venv's Python entry point (`from smg.cli import main`): a
    # PYTHONPATH naming this checkout (how a worktree's tests reach its code) would load
    # this smg in its place.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**base, **(env or {})}
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if mockutil.request("GET", url + "/readiness", timeout=1.0)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"Rust SMG not ready: {log.read()[-2000:]!r}")
                time.sleep(0.1)
            yield url
        finally:
            mockutil.stop_process(proc, 10)


@contextlib.contextmanager
def rust_gateway(
    pd_args: list[str], *extra: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The Rust SMG 1.13 in PD mode on a free port, ready; stopped on leaving."""
    with rust_smg(["--pd-disaggregation", *pd_args, *extra], env) as url:
        yield url


# One attempt per request and no breaker, so a fault test sees exactly one PD dispatch.
ONE_SHOT = ("--disable-retries", "--disable-circuit-breaker")


# --- smg in PD mode ------------------------------------------------------------------------


@contextlib.contextmanager
def pd_gateway(prefill: PdMocks, decode: PdMocks, *extra: str) -> Iterator[Gateway]:
    """`smg launch --processes 2 --pd-disaggregation` in front of HTTP PD mocks, ready."""
    args = ["--pd-disaggregation", *prefill.prefill_args(), *decode.decode_args(), *extra]
    with running_gateway(args, processes=2) as gateway:
        gateway.wait_ready()
        yield gateway


@contextlib.contextmanager
def grpc_pd_gateway(
    prefill: GrpcPdMock, decode: GrpcPdMock, model_dir: Path, *extra: str
) -> Iterator[Gateway]:
    """`smg launch --processes 2 --pd-disaggregation` in front of gRPC PD mocks serving
    `model_dir`'s tokenizer, ready."""
    args = [
        "--pd-disaggregation", "--prefill", prefill.url, str(prefill.bootstrap_port),
        "--decode", decode.url, "--model-path", str(model_dir), *extra,
    ]  # fmt: skip
    with running_gateway(args, processes=2) as gateway:
        gateway.wait_ready(timeout=30)
        yield gateway


def admission_args(
    queue_timeout_s: int, *, queue_size: int | None = None, inflight: int = 1
) -> list[str]:
    """1.13's prefill admission flags: `inflight` prefills at once per worker; the others
    queue (up to `queue_size`, gateway-wide) for at most `queue_timeout_s`."""
    args = ["--prefill-max-inflight-requests-per-worker", str(inflight)]
    args += ["--prefill-queue-timeout-secs", str(queue_timeout_s)]
    if queue_size is not None:
        args += ["--prefill-queue-size", str(queue_size)]
    return args


def staggered_posts(
    url: str,
    path: str,
    body: dict[str, Any],
    delays: tuple[float, ...] | list[float],
    clients: list[httpx.Client] | None = None,
) -> list[httpx.Response]:
    """POST `body` once per delay, each after sleeping its delay and on its own connection,
    all at once; in order. Request i goes on `clients[i]` when given (connections pinned to
    processes: gatewayutil.pinned_clients), else on a new connection (the kernel's hash
    picks its process)."""

    def one(index: int, delay: float) -> httpx.Response:
        time.sleep(delay)
        if clients is not None:
            return clients[index].post(path, json=body)
        with httpx.Client(base_url=url, timeout=30.0) as client:
            return client.post(path, json=body)

    with concurrent.futures.ThreadPoolExecutor(len(delays)) as pool:
        return list(pool.map(one, range(len(delays)), delays))


# 1.13's 429 answers from prefill admission: (code, message); the type is rate_limit_error.
QUEUE_TIMEOUT = ("pd_prefill_queue_timeout", "Timed out waiting for Prefill admission")
QUEUE_FULL = ("pd_prefill_queue_full", "Prefill admission queue is full")


def metric_sum(metrics: str, prefix: str, *parts: str) -> float:
    """The sum of every sample (all processes) whose line starts with `prefix` and
    contains every one of `parts`."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(prefix) and all(part in line for part in parts)
    )


def assert_queue_timeout_and_full(answers: list[httpx.Response], metrics: str) -> None:
    """Three requests 0.3 s apart on one prefill slot held 2.5 s (admission_args(1,
    queue_size=1)): the first is served; the second waits 1 s in the queue and gets 1.13's
    429 pd_prefill_queue_timeout; the third finds the queue full (a timeout is accepted for
    it too, as these tests took it while the queue bound was per process)."""
    assert answers[0].status_code == 200, answers[0].text
    for answer in answers[1:]:
        assert answer.status_code == 429, answer.text
        error = answer.json()["error"]
        assert answer.headers["x-smg-error-code"] == error["code"]
        assert error["type"] == "rate_limit_error"
        assert (error["code"], error["message"]) in {QUEUE_TIMEOUT, QUEUE_FULL}
    assert answers[1].json()["error"]["code"] == QUEUE_TIMEOUT[0]
    assert 0.9 <= answers[1].elapsed.total_seconds() < 2.4
    assert metric_sum(metrics, "smg_pd_prefill_admission_rejections_total{") == 2
