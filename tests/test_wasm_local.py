"""OnResponse (and OnRequest) modules on the answers smg makes itself, end to end: `smg launch
--enable-wasm --processes 1` in front of the gRPC mock (Qwen3 template, the qwen tool parser),
the real MCP server tests/mcpserver.py over stdio, the in-memory history store.

1.13 runs its WASM middleware on every route of its protected router (server.rs: the
proxied serving routes, /v1/conversations/..., GET/DELETE /v1/responses/{id},
/v1/tokenize, /v1/detokenize), whatever answers them: here a gRPC worker's answer (made by
smg from the engine's tokens), the history store's, the tokenizer's and the MCP loop's.
The MCP loop's own model calls are not seen (1.13's loop posts to its worker directly).
One process, so a module added is seen by every later request once it has been seen once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from grpcmockutil import GrpcMock

from smg.httpwire import error_body
from smg.wasm.chain import LocalAnswer, local_answer
from smg.wasm.types import Modify, Reject, WasmResponse, WasmTrap
from tests.gatewayutil import Gateway, wait_until
from tests.mcputil import ADD_CALL as CALL
from tests.mcputil import CALC_TOOLS as TOOLS
from tests.mcputil import QWEN3 as MODEL
from tests.mcputil import grpc_calc_gateway
from tests.test_wasm_admin import FakeRunner, _chain, _entry
from tests.test_wasm_e2e import _add, _guest, _ids, _remove_all, _set_header
from tests.test_wasm_runtime import REJECT_403, REJECT_502, TRAP

OFF = {"chat_template_kwargs": {"enable_thinking": False}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **OFF}
SEEN = "x-wasm-seen"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, GrpcMock]]:
    with grpc_calc_gateway(
        tmp_path_factory.mktemp("wasmlocal"), "--enable-wasm", processes=1
    ) as served:
        yield served


@pytest.fixture
def seen(served: tuple[Gateway, GrpcMock], tmp_path: Path) -> Iterator[tuple[Gateway, GrpcMock]]:
    """A module that sets `x-wasm-seen: 1` on every answer it sees (and lets every request
    on), loaded; removed after the test."""
    gw, mock = served
    path = tmp_path / "seen.wasm"
    path.write_text(_guest(SEEN, "1", on_response=_set_header(SEEN, "1")))
    added = _add(gw, [("seen", path, ("OnRequest", "OnResponse"))])
    assert added.status_code == 200, added.text
    try:
        # Loaded: the gateway's own error on a proxied route (seen before this change too).
        wait_until(lambda: _bad_json(gw).headers.get(SEEN) == "1", 20, "the module loaded")
        yield gw, mock
    finally:
        _remove_all(gw)


def _tokenize(gw: Gateway) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/tokenize",
        json={"model": MODEL, "prompt": "hi", "add_special_tokens": False},
        timeout=30,
    )


def _bad_json(gw: Gateway) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", content=b"{", timeout=30)


def _invocations(gw: Gateway, module: str) -> float:
    total = 0.0
    for line in httpx.get(gw.metrics_url, timeout=10).text.splitlines():
        if line.startswith("smg_wasm_invocations_total{") and f'module="{module}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_grpc_workers_answers_pass_on_response(seen: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = seen
    mock.reply("Hello there.")
    try:
        ok = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert ok.status_code == 200, ok.text
        assert ok.headers[SEEN] == "1"
        assert ok.json()["choices"][0]["message"]["content"] == "Hello there."
        assert ok.headers["x-request-id"] and ok.headers["content-type"] == "application/json"
        # An error the gRPC path answers itself (GrpcExchange._fail): seen too.
        bad = httpx.post(
            gw.url + "/v1/chat/completions",
            json={**CHAT, "max_tokens": 5, "min_tokens": 10},
            timeout=30,
        )
        assert bad.status_code == 400, bad.text
        assert bad.headers[SEEN] == "1" and bad.headers["x-smg-error-code"]
        assert bad.json()["error"]["code"] == bad.headers["x-smg-error-code"]
        # A stream is relayed untouched (as 1.13 skips OnResponse for event streams).
        streamed = httpx.post(
            gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30
        )
        assert streamed.status_code == 200 and SEEN not in streamed.headers
        assert streamed.text.rstrip().endswith("data: [DONE]")
    finally:
        mock.reply(CALL)


def test_tokenize_and_detokenize_pass_on_response(seen: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = seen
    tokens = _tokenize(gw)
    assert tokens.status_code == 200 and tokens.headers[SEEN] == "1"
    ids = tokens.json()["tokens"]
    back = httpx.post(gw.url + "/v1/detokenize", json={"model": MODEL, "tokens": ids}, timeout=30)
    assert back.status_code == 200 and back.headers[SEEN] == "1"
    assert back.json()["prompt"] == "hi"


def test_history_routes_pass_on_response(seen: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = seen
    made = httpx.post(gw.url + "/v1/conversations", json={"metadata": {"k": "v"}}, timeout=30)
    assert made.status_code == 200 and made.headers[SEEN] == "1"
    conv = made.json()["id"]
    for method, path in (
        ("GET", f"/v1/conversations/{conv}"),
        ("GET", f"/v1/conversations/{conv}/items"),
        ("GET", "/v1/responses/resp_unknown"),  # the store's 404: an error answer, seen too
        ("DELETE", f"/v1/conversations/{conv}"),
    ):
        answer = httpx.request(method, gw.url + path, timeout=30)
        assert answer.headers.get(SEEN) == "1", (method, path, answer.status_code)
    assert httpx.get(gw.url + "/v1/responses/resp_unknown", timeout=30).status_code == 404


def test_mcp_loop_answer_passes_on_response_once(seen: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = seen
    before = _invocations(gw, "seen")
    made = httpx.post(
        gw.url + "/v1/responses",
        json={
            "model": MODEL,
            "input": "What is 2 + 3?",
            "tools": TOOLS,
            "max_tool_calls": 1,
            **OFF,
        },
        timeout=60,
    )
    assert made.status_code == 200, made.text
    assert made.headers[SEEN] == "1"
    body = made.json()
    assert [item["type"] for item in body["output"]] == ["mcp_list_tools", "mcp_call", "mcp_call"]
    # The loop's two model calls (loopback) are not seen, neither their requests nor their
    # answers: one OnRequest and one OnResponse call, for the client's request.
    assert _invocations(gw, "seen") - before == 2
    stored = httpx.get(gw.url + "/v1/responses/" + body["id"], timeout=30)
    assert stored.status_code == 200 and stored.headers[SEEN] == "1"
    deleted = httpx.delete(gw.url + "/v1/responses/" + body["id"], timeout=30)
    assert deleted.status_code == 200 and deleted.headers[SEEN] == "1"


def test_on_response_reject_and_trap_on_local_answers(
    served: tuple[Gateway, GrpcMock], tmp_path: Path
) -> None:
    gw, _mock = served
    rejecter = tmp_path / "rejecter.wasm"
    rejecter.write_text(_guest("a", "b", on_response=REJECT_502))
    added = _add(gw, [("rejecter", rejecter, ("OnResponse",))])
    assert added.status_code == 200, added.text
    try:
        # 1.13: a reject answers its status with the answer so far.
        wait_until(lambda: _tokenize(gw).status_code == 502, 20, "the rejecter loaded")
        assert _tokenize(gw).json()["tokens"]
        _remove_all(gw)
        trapper = tmp_path / "trapper.wasm"
        trapper.write_text(_guest("c", "d", on_response=TRAP))
        (trapper_id,) = _ids(_add(gw, [("trapper", trapper, ("OnResponse",))]))
        assert trapper_id
        wait_until(lambda: _tokenize(gw).status_code == 500, 20, "the trapper loaded")
        failed = httpx.post(gw.url + "/v1/conversations", json={}, timeout=30)
        assert failed.status_code == 500
        assert failed.headers["x-smg-error-code"] == "wasm_module_failed"
        assert failed.json()["error"]["code"] == "wasm_module_failed"
        assert "trapper" in failed.json()["error"]["message"]
    finally:
        _remove_all(gw)


def test_on_request_runs_on_local_routes(served: tuple[Gateway, GrpcMock], tmp_path: Path) -> None:
    """1.13's middleware runs OnRequest there too: a rejecting module answers 403 before the
    store or the tokenizer is asked."""
    gw, _mock = served
    path = tmp_path / "gate.wasm"
    path.write_text(_guest("a", "b", on_request=REJECT_403))
    assert _add(gw, [("gate", path, ("OnRequest",))]).status_code == 200
    try:
        wait_until(lambda: _tokenize(gw).status_code == 403, 20, "the gate loaded")
        for method, route in (("POST", "/v1/conversations"), ("GET", "/v1/responses/resp_x")):
            answer = httpx.request(method, gw.url + route, json={}, timeout=30)
            assert answer.status_code == 403, (route, answer.text)
            assert answer.json()["error"]["code"] == "wasm_rejected"
    finally:
        _remove_all(gw)


# --- local_answer (pure) -----------------------------------------------------------------------


def _one(runner: FakeRunner) -> Any:
    entry = _entry(1, ("OnResponse",))
    return _chain({entry.module_id: runner}, [entry])


EXTRA = b"x-smg-error-code: not_found\r\nx-request-id: r1\r\nallow: GET\r\n"


def test_local_answer_shows_the_answer_and_keeps_it_on_continue() -> None:
    runner = FakeRunner()
    got = local_answer(_one(runner), 404, b"application/json", EXTRA, b"{}", "not_found")
    assert got == LocalAnswer(404, b"application/json", EXTRA, b"{}", "not_found")
    # The content type and the lines, less the gateway's own (x-request-id).
    assert runner.seen == [
        WasmResponse(
            404,
            [("content-type", "application/json"), ("x-smg-error-code", "not_found"),
             ("allow", "GET")],
            b"{}",
        )
    ]  # fmt: skip


def test_local_answer_applies_a_modify() -> None:
    action = Modify(299, [("content-type", "text/plain"), ("x-a", "1")], [], ["allow"], b"new")
    got = local_answer(_one(FakeRunner(response=action)), 404, b"application/json", EXTRA, b"{}")
    lines = b"x-smg-error-code: not_found\r\nx-a: 1\r\n"
    assert got == LocalAnswer(299, b"text/plain", lines, b"new", "not_found")
    # A reject answers its status with the answer so far (1.13).
    got = local_answer(_one(FakeRunner(response=Reject(502))), 200, b"application/json", b"", b"x")
    assert got == LocalAnswer(502, b"application/json", b"", b"x", "")


def test_local_answer_of_a_failed_module_is_500() -> None:
    chain = _one(FakeRunner(response=WasmTrap("boom", "trap")))
    got = local_answer(chain, 200, b"application/json", b"", b"{}")
    message = "WASM module 'm1' failed: boom"
    assert got == LocalAnswer(
        500,
        b"application/json",
        b"x-smg-error-code: wasm_module_failed\r\n",
        error_body(500, "wasm_module_failed", message),
        "wasm_module_failed",
    )
