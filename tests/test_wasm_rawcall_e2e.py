"""The gateway's OnRequest path on the parsed request's bytes (WasmChain.run_request_parsed),
end to end: `smg launch --enable-wasm` with two data-plane processes, a module echoing the
method, path and query it was shown into headers and its body as the body, the worker seeing them
(the headers' own values: tests/test_wasm_rawcall.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_wasm_runtime import ECHO_REQUEST, guest

from tests import test_wasm_e2e as e2e
from tests.gatewayutil import Gateway, wait_until
from tests.test_wasm_e2e import CHAT, _add, _ids, _remove_all

# test_wasm_e2e's fixtures: one gateway over the OpenAI fake, two data-plane processes.
fake = e2e.fake
gateway = e2e.gateway
pinned = e2e.pinned


def test_each_process_shows_the_module_the_parsed_request(
    gateway: Gateway, fake: Any, pinned: Any, tmp_path: Path
) -> None:
    echo = tmp_path / "echo.wasm"
    # The echo without its headers-add (the fake refuses the duplicate lines it would make):
    # method, path, query and request id as headers (the gateway drops x-request-id on its
    # way up), the body as the body.
    no_add = ECHO_REQUEST.replace(
        "(i32.store (i32.const 36) (local.get $hl))", "(i32.store (i32.const 36) (i32.const 0))"
    )
    assert no_add != ECHO_REQUEST
    echo.write_text(guest(on_request=no_add))
    url = gateway.url + "/v1/chat/completions?a=1&b=%C3%A9"
    headers = {"X-Mixed-Case": "Val"}
    try:
        added = _add(gateway, [("echo", echo, ("OnRequest",))])
        assert added.status_code == 200, added.text
        assert len(_ids(added)) == 1

        def echoed() -> bool:
            fake.clear()
            answers = [pinned.post(url, json=CHAT, headers=headers) for _ in range(4)]
            seen = [r for r in fake.seen() if r["method"] == "POST"]
            return all(a.status_code == 200 for a in answers) and all(
                s["headers"].get("x-method") == "POST" for s in seen
            ) and len({a.headers["x-smg-process"] for a in answers}) == 2  # fmt: skip

        wait_until(echoed, 10, "both processes run the echo module")
        fake.clear()
        for _ in range(4):
            answer = pinned.post(url, json=CHAT, headers=headers)
            assert answer.status_code == 200
            got = fake.seen()[-1]
            assert got["headers"]["x-method"] == "POST"
            assert got["headers"]["x-path"] == "/v1/chat/completions"
            assert got["headers"]["x-query"] == "a=1&b=%C3%A9"
            assert got["headers"]["x-mixed-case"] == "Val"  # the request's own, kept
            assert got["body"]["messages"] == CHAT["messages"]  # the body, echoed back
    finally:
        _remove_all(gateway)
