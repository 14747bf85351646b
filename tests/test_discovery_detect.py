"""A discovered worker given as a bare host:port is probed for HTTP and gRPC, as the Rust
SMG 1.13 does (its DetectConnectionModeStep; the 1.13 binary, given a file manifest listing a
gRPC engine's bare host:port, registers `grpc://host:port`, connection_mode grpc): the probe
itself against real servers, then `smg launch --discovery-provider file` with a gRPC mock
engine and an HTTP mock worker, both listed bare, each serving a chat."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from smg.discovery.detect import detect_connection_mode
from tests import grpcmockutil, mockutil
from tests.gatewayutil import free_port, running_gateway, wait_until


def _bare(url: str) -> str:
    return url.partition("://")[2].rstrip("/")


def _discovered(gw: Any) -> dict[str, tuple[str, str, str]]:
    answer = gw.admin("GET", "/workers")
    assert answer.status_code == 200, answer.text
    return {
        w["url"]: (w["labels"]["smg.ai/discovery-id"], w["connection_mode"], w["status"])
        for w in answer.json()["workers"]
        if w["labels"].get("smg.ai/discovery-provider") == "file"
    }


def _chat(gw: Any, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=60.0)


def test_bare_host_port_is_detected_as_http_or_grpc(tmp_path: Path) -> None:
    model_dir = grpcmockutil.llama3_dir(tmp_path / "llama3")
    with (
        grpcmockutil.start_grpc_mock(model_dir, backend="sglang", model="llama3") as grpc_mock,
        mockutil.start_mock_workers(1) as http_mocks,
    ):
        (http_url,) = http_mocks.urls
        grpc_target, http_target = grpc_mock.target, _bare(http_url)
        closed = f"127.0.0.1:{free_port()}"

        async def probe() -> list[str | None]:
            return list(
                await asyncio.gather(
                    *(detect_connection_mode(t, 2.0) for t in (grpc_target, http_target, closed))
                )
            )

        assert asyncio.run(probe()) == ["grpc", "http", None]

        manifest = tmp_path / "workers.json"
        doc = {"version": 1, "workers": [{"url": grpc_target}, {"url": http_target}]}
        manifest.write_text(json.dumps(doc))
        args = [
            *("--discovery-provider", "file", "--discovery-file", str(manifest)),
            *("--tokenizer-path", str(model_dir)),
            # Below _chat's 60 s: a request the gateway cannot complete is answered 504
            # (the body says so) rather than read as a client timeout.
            *("--request-timeout-secs", "45"),
        ]
        with running_gateway(args, processes=2) as gw:
            expected = {
                f"grpc://{grpc_target}": (grpc_target, "grpc", "ready"),
                f"http://{http_target}": (http_target, "http", "ready"),
            }
            wait_until(lambda: _discovered(gw) == expected, 30.0, "both workers ready")
            answer = _chat(gw, "llama3")  # through the gRPC front to the engine
            assert answer.status_code == 200, answer.text
            assert answer.json()["object"] == "chat.completion"
            assert grpc_mock.stats()["generate"] == 1
            answer = _chat(gw, "mock-model")
            assert answer.status_code == 200, answer.text
            counts = mockutil.stats(http_url)["requests_by_route"]
            assert counts.get("/v1/chat/completions") == 1
