"""The control plane with gRPC workers, through a real `smg launch` against a fake engine
(a grpc.server in this test process, on a loopback port the OS picked) that serves one
backend's service: detection of both backends, discovery into /workers, HealthCheck
flapping and timeouts, GetLoads into /get_loads, FlushCache, the tokenizer bundle
(Ready only once it loads; a bad sha256 keeps the worker Pending with a clear log line).
Also the EngineClient against the same fake: generation, errors, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpcmockutil
import httpx
import pytest
from gatewayutil import Gateway, running_gateway, wait_until
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vll
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vll_grpc

from smg.grpc.client import EngineClient, detect_backend
from smg.grpc.types import EngineError, GenerateInput, SamplingParams

LLAMA3_EOS = [128001, 128008, 128009]


class FakeEngine:
    """One backend's service with scripted answers; every RPC is counted by name."""

    def __init__(self, backend: str, *, served_model_name: str = "fake-model") -> None:
        self.backend = backend
        self.pb: Any = vll if backend == "vllm" else sgl
        self.served_model_name = served_model_name
        self.healthy = True
        self.health_delay = 0.0
        self.model_info_delay = 0.0
        self.loads = [(3, 2, 0.5, 120.0, 64)]  # running, waiting, usage, throughput, tokens
        self.flush_ok = True
        self.bundle: tuple[bytes, str] | None = None
        self.stream_tokens = [5, 6, 7]
        self.fail_generate: grpc.StatusCode | None = None
        self.calls: dict[str, int] = {}
        self.aborted: list[str] = []
        self.cancelled = threading.Event()
        self.last_generate: Any = None
        self.last_metadata: dict[str, str] = {}
        self._lock = threading.Lock()

    def count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    # --- the RPCs (shared by both services; the servicer classes below bind them) ---------

    def HealthCheck(self, request: Any, context: Any) -> Any:
        self.count("HealthCheck")
        if self.health_delay:
            time.sleep(self.health_delay)
        return self.pb.HealthCheckResponse(healthy=self.healthy, message="ok")

    def GetModelInfo(self, request: Any, context: Any) -> Any:
        self.count("GetModelInfo")
        time.sleep(self.model_info_delay)
        return self.pb.GetModelInfoResponse(
            model_path="/models/fake",
            served_model_name=self.served_model_name,
            max_context_length=4096,
            max_req_input_len=4000,
            vocab_size=128256,
            eos_token_ids=LLAMA3_EOS,
            bos_token_id=128000,
            is_generation=True,
            default_sampling_params_json='{"temperature": 0.6}',
        )

    def GetServerInfo(self, request: Any, context: Any) -> Any:
        self.count("GetServerInfo")
        if self.backend == "sglang":
            return sgl.GetServerInfoResponse(server_type="grpc", sglang_version="0.5.9")
        return vll.GetServerInfoResponse(server_type="vllm-grpc")

    def GetLoads(self, request: Any, context: Any) -> Any:
        self.count("GetLoads")
        ranks = [
            self.pb.SchedulerLoad(
                dp_rank=i,
                num_running_reqs=r,
                num_waiting_reqs=w,
                token_usage=u,
                gen_throughput=t,
                num_waiting_uncached_tokens=q,
            )
            for i, (r, w, u, t, q) in enumerate(self.loads)
        ]
        return self.pb.GetLoadsResponse(dp_rank_count=len(ranks), loads=ranks)

    def FlushCache(self, request: Any, context: Any) -> Any:
        self.count("FlushCache")
        return common_pb2.FlushCacheResponse(success=self.flush_ok, message="flushed")

    def GetTokenizer(self, request: Any, context: Any) -> Iterator[Any]:
        self.count("GetTokenizer")
        if self.bundle is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no tokenizer here")
        data, digest = self.bundle  # type: ignore[misc]
        size = 1024
        for start in range(0, len(data), size):
            end = min(start + size, len(data))
            yield common_pb2.GetTokenizerChunk(
                data=data[start:end], sha256=digest if end == len(data) else ""
            )

    def Generate(self, request: Any, context: Any) -> Iterator[Any]:
        self.count("Generate")
        self.last_generate = request
        self.last_metadata = dict(context.invocation_metadata())
        context.add_callback(self.cancelled.set)
        if self.fail_generate is not None:
            context.abort(self.fail_generate, "scripted failure")
        pb = self.pb
        tokens = self.stream_tokens
        for i, token in enumerate(tokens):
            total = i + 1 if self.backend == "sglang" else 1  # SGLang counts cumulatively
            yield pb.GenerateResponse(
                chunk=pb.GenerateStreamChunk(
                    token_ids=[token], prompt_tokens=3, completion_tokens=total
                )
            )
        # As both servicers do: the complete repeats the last chunk's tokens.
        yield pb.GenerateResponse(
            complete=pb.GenerateComplete(
                output_ids=tokens[-1:],
                finish_reason="stop",
                prompt_tokens=3,
                completion_tokens=len(tokens) if self.backend == "sglang" else 1,
                matched_token_id=128009,
            )
        )

    def Abort(self, request: Any, context: Any) -> Any:
        self.count("Abort")
        ids = list(request.request_ids) if self.backend == "vllm" else [request.request_id]
        self.aborted.extend(ids)
        return self.pb.AbortResponse()


def _servicer(engine: FakeEngine) -> Any:
    base = (
        vll_grpc.VllmEngineServicer
        if engine.backend == "vllm"
        else sgl_grpc.SglangSchedulerServicer
    )
    names = ["HealthCheck", "GetModelInfo", "GetServerInfo", "GetLoads", "FlushCache",
             "GetTokenizer", "Generate", "Abort"]  # fmt: skip
    return type("Servicer", (base,), {n: staticmethod(getattr(engine, n)) for n in names})()


@contextlib.contextmanager
def fake_engine(
    backend: str, *, credentials: grpc.ServerCredentials | None = None, **kwargs: Any
) -> Iterator[tuple[FakeEngine, int]]:
    engine = FakeEngine(backend, **kwargs)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    if backend == "vllm":
        vll_grpc.add_VllmEngineServicer_to_server(_servicer(engine), server)
    else:
        sgl_grpc.add_SglangSchedulerServicer_to_server(_servicer(engine), server)
    # The OS picks a free port.
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        yield engine, port
    finally:
        server.stop(0).wait(5)


def make_bundle(files: dict[str, bytes]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _worker(gw: Gateway) -> dict[str, Any]:
    workers = gw.admin("GET", "/workers").json()["workers"]
    assert len(workers) == 1
    return workers[0]


def _readiness(gw: Gateway) -> int:
    return httpx.get(gw.url + "/readiness", timeout=5.0).status_code


FAST = ["--health-check-interval-secs", "1", "--health-check-timeout-secs", "1"]
NO_TOKENIZER = ["--disable-tokenizer-autoload"]


# --- control plane ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_backend_is_detected_and_discovered(backend: str) -> None:
    # SGLang answers with no served model name: the model path names the model.
    name = "fake-model" if backend == "vllm" else ""
    with fake_engine(backend, served_model_name=name) as (engine, port):
        url = f"grpc://127.0.0.1:{port}"
        with running_gateway(["--worker-urls", url, *FAST, *NO_TOKENIZER], processes=1) as gw:
            gw.wait_ready(30.0)
            worker = _worker(gw)
            assert worker["url"] == url
            assert worker["connection_mode"] == "grpc"
            assert worker["engine"] == backend
            assert worker["runtime_type"] == backend
            assert worker["is_healthy"] is True
            model = name or "/models/fake"
            assert [m["id"] for m in worker["models"]] == [model]
            assert worker["models"][0]["context_length"] == 4096
            grpc_info = worker["grpc"]
            assert grpc_info["backend"] == backend
            assert grpc_info["eos_token_ids"] == LLAMA3_EOS
            assert grpc_info["max_context_length"] == 4096
            assert grpc_info["default_sampling_params_json"] == '{"temperature": 0.6}'
            assert grpc_info["tokenizer_dir"] == ""  # autoload disabled: nothing fetched
            assert engine.calls["GetModelInfo"] >= 1
            assert engine.calls["HealthCheck"] >= 1
            assert "GetTokenizer" not in engine.calls


def test_health_flaps_and_a_slow_health_check_times_out() -> None:
    with fake_engine("vllm") as (engine, port):
        args = ["--worker-urls", f"grpc://127.0.0.1:{port}", *FAST, *NO_TOKENIZER,
                "--health-failure-threshold", "1", "--health-success-threshold", "1"]  # fmt: skip
        with running_gateway(args, processes=1) as gw:
            gw.wait_ready(30.0)
            engine.healthy = False  # answers, but says unhealthy: not Ready (Rust reads it)
            wait_until(lambda: _worker(gw)["is_healthy"] is False, 15.0, "unhealthy")
            assert _readiness(gw) == 503
            engine.healthy = True
            wait_until(lambda: _worker(gw)["is_healthy"] is True, 15.0, "healthy again")
            assert _readiness(gw) == 200
            engine.health_delay = 2.5  # past --health-check-timeout-secs 1
            wait_until(lambda: _worker(gw)["is_healthy"] is False, 20.0, "timed out")
            engine.health_delay = 0.0
            wait_until(lambda: _worker(gw)["is_healthy"] is True, 20.0, "answering again")


def test_get_loads_feeds_the_load_view() -> None:
    with fake_engine("sglang") as (engine, port):
        engine.loads = [(3, 2, 0.5, 120.0, 64), (1, 0, 0.25, 30.0, 0)]
        args = ["--worker-urls", f"grpc://127.0.0.1:{port}", *FAST, *NO_TOKENIZER,
                "--load-monitor-interval", "1"]  # fmt: skip
        with running_gateway(args, processes=1) as gw:
            gw.wait_ready(30.0)
            wait_until(lambda: _worker(gw)["backend_load"]["valid"], 15.0, "a GetLoads poll")
            load = _worker(gw)["backend_load"]
            assert (load["running"], load["waiting"], load["waiting_tokens"]) == (4, 2, 64)
            assert load["token_usage"] == pytest.approx(0.375)
            assert load["throughput"] == pytest.approx(150.0)
            loads = gw.admin("GET", "/get_loads").json()["loads"]
            assert len(loads) == 1
            assert loads[0]["num_running_reqs"] == 4
            assert loads[0]["num_waiting_reqs"] == 2
            assert loads[0]["worker"] == f"grpc://127.0.0.1:{port}"
            assert _worker(gw)["engine_load"]["version"] == "0.5.9"  # GetServerInfo's
            assert engine.calls["GetLoads"] >= 1


def test_flush_cache_is_the_flushcache_rpc() -> None:
    with fake_engine("vllm") as (engine, port):
        url = f"grpc://127.0.0.1:{port}"
        with running_gateway(["--worker-urls", url, *FAST, *NO_TOKENIZER], processes=1) as gw:
            gw.wait_ready(30.0)
            answer = gw.admin("POST", "/flush_cache")
            assert answer.status_code == 200
            assert answer.json()["workers"] == [
                {"worker": url, "status": 200, "ok": True, "message": "flushed"}
            ]
            assert engine.calls["FlushCache"] == 1
            engine.flush_ok = False  # refused (requests in flight): SGLang HTTP's 400
            answer = gw.admin("POST", "/flush_cache")
            assert answer.status_code == 206  # 1.13's partial_success
            assert answer.json()["status"] == "partial_success"
            assert answer.json()["failed"] == [
                {"worker": url, "error": f"flush_cache failed for worker {url}: HTTP 400"}
            ]
            assert answer.json()["workers"][0]["status"] == 400


def test_a_grpc_worker_added_over_the_admin_api_is_accepted() -> None:
    with (
        fake_engine("sglang") as (_engine, port),
        running_gateway([*FAST, *NO_TOKENIZER], processes=1) as gw,
    ):
        answer = gw.admin("POST", "/workers", json={"url": f"grpc://127.0.0.1:{port}"})
        assert answer.status_code == 202
        wait_until(lambda: _worker(gw)["is_healthy"], 20.0, "the added worker Ready")
        assert _worker(gw)["engine"] == "sglang"


def test_unprobed_grpc_worker_is_ready_only_once_discovered() -> None:
    with fake_engine("vllm") as (engine, port):
        engine.model_info_delay = 1.5
        args = ["--worker-urls", f"grpc://127.0.0.1:{port}", "--disable-health-check",
                *NO_TOKENIZER]  # fmt: skip
        with running_gateway(args, processes=1) as gw:
            gw.wait_ready(30.0)
            worker = _worker(gw)
            assert (worker["engine"], worker["status"]) == ("vllm", "ready")
            assert worker["grpc"]["max_context_length"] == 4096


def test_a_local_model_path_means_no_bundle_fetch(tmp_path: Path) -> None:
    with fake_engine("vllm") as (engine, port):
        engine.bundle = make_bundle({"tokenizer.json": b"{}"})
        args = ["--worker-urls", f"grpc://127.0.0.1:{port}", *FAST, "--model-path", str(tmp_path)]
        with running_gateway(args, processes=1) as gw:
            gw.wait_ready(30.0)
            assert _worker(gw)["grpc"]["tokenizer_dir"] == ""
            assert "GetTokenizer" not in engine.calls


def test_a_bundle_with_a_bad_sha256_keeps_the_worker_pending(tmp_path: Path) -> None:
    with fake_engine("vllm") as (engine, port):
        data, _digest = make_bundle({"tokenizer.json": b"{}"})
        engine.bundle = (data, "0" * 64)
        env = {"SMG__TOKENIZER_CACHE": str(tmp_path / "cache")}
        args = ["--worker-urls", f"grpc://127.0.0.1:{port}", *FAST]
        with running_gateway(args, processes=1, env=env) as gw:
            wait_until(lambda: engine.calls.get("GetTokenizer", 0) >= 2, 20.0, "two fetches")
            worker = _worker(gw)
            assert worker["status"] == "pending"
            assert worker["is_healthy"] is False
            assert _readiness(gw) == 503
            logs = gw.logs()
            assert "tokenizer bundle not loaded" in logs
            assert "sha256 mismatch" in logs
            # The same failure is logged once at ERROR, not at every probe.
            assert logs.count("sha256 mismatch") == 1
            cache = tmp_path / "cache"
            assert not cache.exists() or not any(cache.iterdir())


def test_the_bundle_is_fetched_before_the_worker_turns_ready(tmp_path: Path) -> None:
    with fake_engine("sglang") as (engine, port):
        files = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}"}
        engine.bundle = make_bundle(files)
        env = {"SMG__TOKENIZER_CACHE": str(tmp_path / "cache")}
        args = ["--worker-urls", f"grpc://127.0.0.1:{port}", *FAST]
        with running_gateway(args, processes=1, env=env) as gw:
            gw.wait_ready(30.0)
            tokenizer_dir = Path(_worker(gw)["grpc"]["tokenizer_dir"])
            assert tokenizer_dir.is_relative_to(tmp_path / "cache")
            assert (tokenizer_dir / "tokenizer.json").read_bytes() == files["tokenizer.json"]
            assert engine.calls["GetTokenizer"] == 1


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_with_the_grpc_mock_the_real_tokenizer_bundle_is_fetched(
    backend: str, tmp_path: Path
) -> None:
    """`smg mock-worker --grpc` (C1's mock) serving the real Llama-3 tokenizer dir; smg has
    no local tokenizer, so it fetches the bundle before the worker turns Ready."""
    model_dir = grpcmockutil.llama3_dir(tmp_path / "llama3")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    with grpcmockutil.start_grpc_mock(model_dir, backend=backend) as mock:
        args = ["--worker-urls", mock.url, *FAST, "--load-monitor-interval", "1"]
        with running_gateway(args, processes=1, env=env) as gw:
            gw.wait_ready(30.0)
            worker = _worker(gw)
            assert worker["engine"] == backend
            assert [m["id"] for m in worker["models"]] == ["llama3"]
            info = worker["grpc"]
            assert info["backend"] == backend
            assert sorted(info["eos_token_ids"]) == grpcmockutil.LLAMA3_EOS
            bundle = Path(info["tokenizer_dir"])
            assert bundle.is_relative_to(tmp_path / "xdg" / "smg" / "tokenizers")
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                assert (bundle / name).read_bytes() == (model_dir / name).read_bytes()
            wait_until(lambda: _worker(gw)["backend_load"]["valid"], 15.0, "a GetLoads poll")


# --- EngineClient against the fake ------------------------------------------------------------


def _input(stream: bool = True) -> GenerateInput:
    return GenerateInput("req-7", [1, 2, 3], SamplingParams(max_tokens=8), stream=stream)


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_client_generate_detect_and_management(backend: str) -> None:
    async def run(port: int) -> None:
        target = f"127.0.0.1:{port}"
        assert await detect_backend(target, timeout=5.0) == backend
        client = EngineClient(target, backend, api_key="k-1")
        try:
            outs = [o async for o in client.generate(_input(), timeout=10.0)]
            assert [o.token_ids for o in outs] == [[5], [6], [7], []]
            assert [o.completion_tokens for o in outs] == [1, 2, 3, 3]
            assert outs[-1].finished and outs[-1].matched_stop == 128009
            assert await client.health(5.0) is True
            info = await client.model_info(5.0)
            assert (info.backend, info.max_context_length) == (backend, 4096)
            load = await client.loads(5.0)
            assert (load.running, load.waiting, load.valid) == (3, 2, True)
            await client.abort(["req-7"])
        finally:
            await client.close()

    with fake_engine(backend) as (engine, port):
        asyncio.run(run(port))
        assert engine.aborted == ["req-7"]
        sent = engine.last_generate
        assert sent.request_id == "req-7" and list(sent.tokenized.input_ids) == [1, 2, 3]
        assert engine.last_metadata["authorization"] == "Bearer k-1"


def test_client_maps_errors_and_cancels_on_early_exit() -> None:
    async def run(engine: FakeEngine, port: int) -> None:
        client = EngineClient(f"grpc://127.0.0.1:{port}", "vllm")
        try:
            engine.fail_generate = grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(EngineError) as info:
                async for _ in client.generate(_input(), timeout=10.0):
                    pass
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert info.value.message == "scripted failure"
            assert info.value.before_first_token is True
            engine.fail_generate = None
            engine.stream_tokens = list(range(100, 200))
            stream = client.generate(_input(), timeout=10.0)
            first = await stream.__anext__()
            assert first.token_ids == [100]
            await stream.aclose()  # the consumer stops: the call is cancelled
            await asyncio.to_thread(engine.cancelled.wait, 10.0)
            assert engine.cancelled.is_set()
        finally:
            await client.close()
        # Nobody listens: UNAVAILABLE, before the first token.
        dead = EngineClient("127.0.0.1:1", "vllm")
        try:
            with pytest.raises(EngineError) as info:
                async for _ in dead.generate(_input(), timeout=5.0):
                    pass
            assert info.value.code == "UNAVAILABLE"
            with pytest.raises(EngineError) as info:
                await detect_backend("127.0.0.1:1", timeout=3.0)
            assert info.value.code == "UNAVAILABLE"
        finally:
            await dead.close()

    with fake_engine("vllm") as (engine, port):
        asyncio.run(run(engine, port))


# --- grpcs:// with mutual TLS -----------------------------------------------------------------


def test_grpcs_worker_with_mutual_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("smg-client")
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.cert_chain_pems[0].write_to_path(str(cert_path))
    client_cert.private_key_pem.write_to_path(str(key_path))
    credentials = grpc.ssl_server_credentials(
        [(server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    with fake_engine("vllm", credentials=credentials) as (engine, port):
        url = f"grpcs://127.0.0.1:{port}"
        args = ["--worker-urls", url, *FAST, *NO_TOKENIZER, "--ca-cert-paths", str(ca_path),
                "--client-cert-path", str(cert_path), "--client-key-path", str(key_path)]  # fmt: skip
        with running_gateway(args, processes=1) as gw:
            gw.wait_ready(30.0)
            assert _worker(gw)["engine"] == "vllm"
            assert engine.calls["GetModelInfo"] >= 1

        async def without_client_certificate() -> str:
            roots = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
            client = EngineClient(url, "vllm", tls=roots)
            try:
                with pytest.raises(EngineError) as info:
                    await client.model_info(5.0)
                return info.value.code
            finally:
                await client.close()

        assert asyncio.run(without_client_certificate()) == "UNAVAILABLE"


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_client_against_the_grpc_mock_hands_each_token_out_once(
    backend: str, tmp_path: Path
) -> None:
    """Streamed or not, n=1 or 2: each choice's tokens once, one finished output per
    choice, a logprob per token, completion_tokens the choice's total."""

    async def run(target: str) -> list[tuple[bool, int, dict[int, int], list[Any], int]]:
        client = EngineClient(target, backend)
        seen = []
        try:
            for stream in (True, False):
                for n in (1, 2):
                    sampling = SamplingParams(max_tokens=10, ignore_eos=True, n=n, logprobs=2)
                    req = GenerateInput("r-1", [1, 2, 3, 4], sampling, stream=stream)
                    outs = [o async for o in client.generate(req, timeout=20.0)]
                    tokens: dict[int, int] = {}
                    for o in outs:
                        tokens[o.index] = tokens.get(o.index, 0) + len(o.token_ids)
                    finished = sorted(
                        (o.index, o.finish_reason, o.completion_tokens) for o in outs if o.finished
                    )
                    logprobs = sum(len(o.logprobs or []) for o in outs)
                    seen.append((stream, n, tokens, finished, logprobs))
        finally:
            await client.close()
        return seen

    model_dir = grpcmockutil.llama3_dir(tmp_path / "llama3")
    with grpcmockutil.start_grpc_mock(model_dir, backend=backend) as mock:
        seen = asyncio.run(run(mock.target))
    for stream, n, tokens, finished, logprobs in seen:
        assert tokens == {i: 10 for i in range(n)}, (stream, n)
        assert finished == [(i, "length", 10) for i in range(n)], (stream, n)
        assert logprobs == 10 * n, (stream, n)
