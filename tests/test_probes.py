"""Probes against a tiny aiohttp server on 127.0.0.1 (port 0) that answers, hangs, returns
garbage or wants a bearer key."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from smg.control import probes
from smg.policies.base import BackendLoad
from tests.gatewayutil import free_port

KEY = "sekret-key"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOADS = orjson.dumps(
    {
        "timestamp": "2026-03-02T10:15:00+00:00",
        "version": "0.5.6",
        "loads": [
            {
                "dp_rank": 0,
                "num_running_reqs": 3,
                "num_waiting_reqs": 1,
                "token_usage": 0.2,
                "gen_throughput": 100.0,
            },
            {
                "dp_rank": 1,
                "num_running_reqs": 1,
                "num_waiting_reqs": 0,
                "token_usage": 0.4,
                "gen_throughput": 50.0,
            },
        ],
    }
)
SGLANG_METRICS = (
    "# TYPE sglang:num_running_reqs gauge\n"
    'sglang:num_running_reqs{model_name="m",tp_rank="0"} 7\n'
    'sglang:num_queue_reqs{model_name="m",tp_rank="0"} 2\n'
    'sglang:token_usage{model_name="m",tp_rank="0"} 0.5\n'
    'sglang:gen_throughput{model_name="m",tp_rank="0"} 42.0\n'
)
VLLM_METRICS = (
    'vllm:num_requests_running{engine="0",model_name="m"} 4.0\n'
    'vllm:num_requests_waiting{engine="0",model_name="m"} 6.0\n'
    'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
)
GET_LOAD = orjson.dumps([{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 9}])
HTML = "<html><body><h1>502 Bad Gateway</h1></body></html>"


class Server:
    """Records every request (method, path, query, Authorization) it receives."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.seen: list[tuple[str, str, str, str | None]] = []
        self.release = asyncio.Event()  # lets hanging handlers finish at shutdown
        self.url = ""

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.seen.append(
                (
                    request.method,
                    request.path,
                    request.query_string,
                    request.headers.get("Authorization"),
                )
            )
            return await handler(request)

        self.app.middlewares.append(record)

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.app.router.add_route(method, path, handler)

    def text(self, path: str, body: str | bytes, status: int = 200, method: str = "GET") -> None:
        async def handler(_: web.Request) -> web.Response:
            data = body.encode() if isinstance(body, str) else body
            return web.Response(body=data, status=status)

        self.route(method, path, handler)

    def hang(self, path: str) -> None:
        async def handler(_: web.Request) -> web.Response:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.release.wait(), timeout=10)
            return web.Response(text="late")

        self.route("GET", path, handler)

    def paths(self) -> list[str]:
        return [p for _, p, _, _ in self.seen]


@contextlib.asynccontextmanager
async def serve(server: Server) -> AsyncIterator[str]:
    runner = web.AppRunner(server.app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        addresses = runner.addresses
        assert addresses and addresses[0][0] == "127.0.0.1" and addresses[0][1] > 0
        server.url = f"http://127.0.0.1:{addresses[0][1]}"
        yield server.url
    finally:
        server.release.set()
        await runner.cleanup()


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout=30)

    return asyncio.run(bounded())


def secured(server: Server, path: str, body: str | bytes, method: str = "GET") -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.Response(body=body.encode() if isinstance(body, str) else body)

    server.route(method, path, handler)


# --- health -----------------------------------------------------------------------------


def test_probe_health_statuses() -> None:
    async def main() -> None:
        s = Server()
        s.text("/health", "OK")
        s.text("/ready", "", status=204)
        s.text("/sick", "no", status=503)
        s.text("/moved", "", status=302)
        s.text("/big", b"x" * (2 * 1024 * 1024))
        async with serve(s) as url, aiohttp.ClientSession() as session:
            assert await probes.probe_health(session, url)
            assert await probes.probe_health(session, url + "/", "/ready")
            assert not await probes.probe_health(session, url, "/sick")
            assert not await probes.probe_health(session, url, "/missing")
            assert not await probes.probe_health(session, url, "/moved")  # redirects not followed
            assert await probes.probe_health(session, url, "/big")  # status only, body unread
        assert s.paths() == ["/health", "/ready", "/sick", "/missing", "/moved", "/big"]
        assert all(auth is None for *_, auth in s.seen)

    run(main())


def test_probe_health_hang_times_out() -> None:
    async def main() -> None:
        s = Server()
        s.hang("/health")
        async with serve(s) as url, aiohttp.ClientSession() as session:
            t0 = time.monotonic()
            assert not await probes.probe_health(session, url, timeout_s=0.3)
            assert time.monotonic() - t0 < 3.0

    run(main())


def test_probe_health_connection_errors_are_false() -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            assert not await probes.probe_health(session, f"http://127.0.0.1:{free_port()}")
            assert not await probes.probe_health(session, "not a url")
            assert not await probes.probe_health(session, "ftp://127.0.0.1:1")
        # A closed session is the caller's bug, but still no exception escapes.
        assert not await probes.probe_health(session, "http://127.0.0.1:1")

    run(main())


def test_probe_health_bearer_key() -> None:
    async def main() -> None:
        s = Server()
        secured(s, "/health", "OK")
        async with serve(s) as url, aiohttp.ClientSession() as session:
            assert not await probes.probe_health(session, url)
            assert not await probes.probe_health(session, url, api_key="wrong")
            assert await probes.probe_health(session, url, api_key=KEY)
        assert [auth for *_, auth in s.seen] == [None, "Bearer wrong", f"Bearer {KEY}"]

    run(main())


# --- load -------------------------------------------------------------------------------


def test_scrape_sglang_v1_loads_first() -> None:
    async def main() -> None:
        s = Server()
        s.text("/v1/loads", LOADS)
        s.text("/metrics", SGLANG_METRICS)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            found = await probes.scrape_load_from(session, url, "sglang")
        assert found is not None
        load, endpoint = found
        assert endpoint == "/v1/loads"
        assert load == BackendLoad(
            running=4, waiting=1, token_usage=0.30000000000000004, throughput=150.0, valid=True
        )
        assert s.seen[0][:3] == ("GET", "/v1/loads", "include=core")
        assert s.paths() == ["/v1/loads"]

    run(main())


def test_scrape_sglang_falls_back_to_metrics_then_get_load() -> None:
    async def main() -> None:
        a = Server()  # no /v1/loads at all
        a.text("/metrics", SGLANG_METRICS)
        b = Server()  # /v1/loads answers HTML, /metrics is broken, /get_load works
        b.text("/v1/loads", HTML)
        b.text("/metrics", "oops", status=500)
        b.text("/get_load", GET_LOAD)
        async with serve(a) as url_a, serve(b) as url_b, aiohttp.ClientSession() as session:
            found_a = await probes.scrape_load_from(session, url_a, "sglang")
            found_b = await probes.scrape_load_from(session, url_b, "sglang")
        assert found_a == (BackendLoad(7, 2, 0.5, 42.0, True), "/metrics")
        assert a.paths() == ["/v1/loads", "/metrics"]
        assert found_b == (BackendLoad(3, 2, 0.0, 0.0, True), "/get_load")
        assert b.paths() == ["/v1/loads", "/metrics", "/get_load"]

    run(main())


def test_scrape_vllm_only_reads_metrics() -> None:
    async def main() -> None:
        s = Server()
        s.text("/v1/loads", LOADS)  # must not be asked
        s.text("/metrics", VLLM_METRICS)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            found = await probes.scrape_load_from(session, url, "vllm")
        assert found == (BackendLoad(4, 6, 0.25, 0.0, True), "/metrics")
        assert s.paths() == ["/metrics"]

    run(main())


def test_scrape_unknown_engine_tries_all_and_reads_either_metrics() -> None:
    async def main() -> None:
        s = Server()
        s.text("/metrics", VLLM_METRICS)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            found = await probes.scrape_load_from(session, url, "unknown")
            assert found == (BackendLoad(4, 6, 0.25, 0.0, True), "/metrics")
            # Nothing is remembered: the next call walks the same list again.
            assert await probes.scrape_load_from(session, url, "unknown") == found
        assert s.paths() == ["/v1/loads", "/metrics"] * 2

    run(main())


def test_scrape_endpoint_override_and_total_failure() -> None:
    async def main() -> None:
        s = Server()
        s.text("/v1/loads", LOADS)
        s.text("/metrics", "up 1\n")  # Prometheus, but no engine gauges
        s.text("/get_load", "[]")
        async with serve(s) as url, aiohttp.ClientSession() as session:
            assert (
                await probes.scrape_load_from(session, url, "sglang", endpoints=["/metrics"])
                is None
            )
            assert s.paths() == ["/metrics"]
            s.seen.clear()
            assert await probes.scrape_load_from(session, url, "vllm") is None
            found = await probes.scrape_load_from(session, url, "vllm", endpoints=("/v1/loads",))
            assert found is not None and found[1] == "/v1/loads"
            port = free_port()
            dead = f"http://127.0.0.1:{port}"
            assert await probes.scrape_load_from(session, dead, "sglang", timeout_s=1) is None

    run(main())


def test_scrape_hanging_endpoint_times_out_then_falls_back() -> None:
    async def main() -> None:
        s = Server()
        s.hang("/v1/loads")
        s.text("/metrics", SGLANG_METRICS)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            t0 = time.monotonic()
            found = await probes.scrape_load_from(session, url, "sglang", timeout_s=0.3)
            assert time.monotonic() - t0 < 3.0
        assert found is not None and found[1] == "/metrics"

    run(main())


def test_scrape_oversized_body_is_unusable() -> None:
    async def main() -> None:
        s = Server()
        huge = SGLANG_METRICS + "# padding " + "x" * (probes.MAX_BODY_BYTES + 10) + "\n"
        s.text("/metrics", huge)
        s.text("/get_load", GET_LOAD)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            found = await probes.scrape_load_from(session, url, "sglang")
        assert found is not None and found[1] == "/get_load"

    run(main())


def test_scrape_with_bearer_key() -> None:
    async def main() -> None:
        s = Server()
        secured(s, "/v1/loads", LOADS)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            assert await probes.scrape_load_from(session, url, "sglang") is None
            s.seen.clear()
            found = await probes.scrape_load_from(session, url, "sglang", api_key=KEY)
        assert found is not None and found[0].running == 4
        assert s.seen == [("GET", "/v1/loads", "include=core", f"Bearer {KEY}")]

    run(main())


# --- discovery ------------------------------------------------------------------------


def _models(owned_by: str, *ids: str, max_len: int | None = None) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": i,
                    "object": "model",
                    "created": 0,
                    "owned_by": owned_by,
                    "root": i,
                    "max_model_len": max_len,
                }
                for i in ids
            ],
        }
    )


SERVER_INFO = orjson.dumps(
    {
        "model_path": "org/model",
        "tp_size": 1,
        "dp_size": 2,
        "context_length": 8192,
        "version": "0.5.6",
        "internal_states": [{}],
        "mem_fraction_static": 0.8,
    }
)


def test_discover_sglang() -> None:
    async def main() -> None:
        s = Server()
        s.text("/v1/models", _models("sglang", "org/model", max_len=8192))
        s.text("/server_info", SERVER_INFO)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            info = await probes.discover_backend(session, url)
        assert info.engine == "sglang"
        assert info.model_ids == ["org/model"] and info.owned_by == "sglang"
        assert info.server_info == {
            "model_path": "org/model",
            "tp_size": 1,
            "dp_size": 2,
            "context_length": 8192,
            "version": "0.5.6",
        }
        assert info.version == "0.5.6" and info.max_model_len == 8192
        assert sorted(s.paths()) == ["/server_info", "/v1/models", "/version"]

    run(main())


def test_discover_vllm_with_key() -> None:
    async def main() -> None:
        s = Server()
        secured(s, "/v1/models", _models("vllm", "llama", "llama-lora", max_len=4096))
        secured(s, "/version", '{"version": "0.11.0"}')
        async with serve(s) as url, aiohttp.ClientSession() as session:
            info = await probes.discover_backend(session, url, api_key=KEY)
        assert info.engine == "vllm" and info.version == "0.11.0"
        assert info.model_ids == ["llama", "llama-lora"] and info.max_model_len == 4096
        assert info.server_info == {}
        # /server_info 404 → the deprecated /get_server_info is tried too.
        assert sorted(s.paths()) == ["/get_server_info", "/server_info", "/v1/models", "/version"]
        assert {auth for *_, auth in s.seen} == {f"Bearer {KEY}"}

    run(main())


def test_discover_old_sglang_via_get_server_info() -> None:
    async def main() -> None:
        s = Server()
        s.text("/v1/models", _models("someone", "m"))
        s.text("/get_server_info", SERVER_INFO)
        s.text("/version", HTML)  # a 200 that is not the vLLM answer
        async with serve(s) as url, aiohttp.ClientSession() as session:
            info = await probes.discover_backend(session, url)
        assert info.engine == "sglang" and info.server_info["model_path"] == "org/model"

    run(main())


def test_discover_openai_and_unknown() -> None:
    async def main() -> None:
        openai = Server()
        openai.text("/v1/models", _models("system", "gpt-4o-mini", "gpt-4o"))
        garbage = Server()
        garbage.text("/v1/models", HTML)
        garbage.text("/server_info", "[1, 2")
        slow = Server()
        slow.hang("/v1/models")
        slow.hang("/version")
        slow.hang("/server_info")
        async with (
            serve(openai) as url_o,
            serve(garbage) as url_g,
            serve(slow) as url_s,
            aiohttp.ClientSession() as session,
        ):
            info = await probes.discover_backend(session, url_o)
            assert info.engine == "openai" and info.model_ids == ["gpt-4o-mini", "gpt-4o"]
            assert info.owned_by == "system" and info.version is None
            assert (await probes.discover_backend(session, url_g)).engine == "unknown"
            t0 = time.monotonic()
            info = await probes.discover_backend(session, url_s, timeout_s=0.3)
            assert info == probes.BackendInfo(engine="unknown")
            assert time.monotonic() - t0 < 3.0  # the three requests run concurrently
            dead = await probes.discover_backend(session, f"http://127.0.0.1:{free_port()}")
            assert dead == probes.BackendInfo(engine="unknown")

    run(main())


# --- flush cache ------------------------------------------------------------------------


def test_flush_cache() -> None:
    async def main() -> None:
        ok = Server()
        secured(ok, "/flush_cache", "Cache flushed.\n", method="POST")
        busy = Server()
        busy.text("/flush_cache", "Flush cache failed.\n", status=400, method="POST")
        async with serve(ok) as url_ok, serve(busy) as url_busy, aiohttp.ClientSession() as session:
            assert await probes.flush_cache(session, url_ok, KEY) == (200, "Cache flushed.\n")
            status, _ = await probes.flush_cache(session, url_ok)
            assert status == 401
            assert await probes.flush_cache(session, url_busy) == (400, "Flush cache failed.\n")
            status, text = await probes.flush_cache(session, f"http://127.0.0.1:{free_port()}")
            assert status == 0 and text
        assert [m for m, *_ in ok.seen] == ["POST", "POST"]

    run(main())


def test_flush_cache_timeout() -> None:
    async def main() -> None:
        s = Server()

        async def slow(_: web.Request) -> web.Response:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(s.release.wait(), timeout=10)
            return web.Response(text="late")

        s.route("POST", "/flush_cache", slow)
        async with serve(s) as url, aiohttp.ClientSession() as session:
            status, text = await probes.flush_cache(session, url, timeout_s=0.3)
        assert status == 0 and "Timeout" in text

    run(main())
