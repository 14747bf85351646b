"""WASM modules end to end: `smg launch --processes 2 --enable-wasm` in front of the OpenAI fake
(tests/providerfakes.py, as a self-hosted HTTP worker). Modules are added and removed with
POST /wasm and DELETE /wasm/{id}; every request is pinned to each data-plane process in turn
(PinnedTransport), so both processes are shown to load (and drop) what the control plane
compiled. The components are component-model text (smg.wasm.watwrap), which the control
plane compiles as it would a binary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from providerfakes import FakeProvider

from smg.wasm.watwrap import component_wat
from tests.fakegateway import gateway_over, openai_fake
from tests.gatewayutil import Gateway, promtool_check, running_gateway, wait_until
from tests.test_conversations_e2e import PinnedTransport, _hx
from tests.test_wasm_runtime import _CONTINUE, _REALLOC, _REQ, _RESP, REJECT_403, TRAP

MODEL = "gpt-4o"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _set_header(name: str, value: str) -> str:
    """A modify action setting one header (name and value in data at 300 and 340)."""
    return (
        "(i32.store8 (i32.const 16) (i32.const 2))"
        f"(i32.store (i32.const 64) (i32.const 300)) (i32.store (i32.const 68) (i32.const {len(name)}))"
        f"(i32.store (i32.const 72) (i32.const 340)) (i32.store (i32.const 76) (i32.const {len(value)}))"
        "(i32.store (i32.const 24) (i32.const 64)) (i32.store (i32.const 28) (i32.const 1))"
        "(i32.const 16)"
    )


def _guest(name: str, value: str, on_request: str = _CONTINUE, on_response: str = _CONTINUE) -> str:
    extra = f'(data (i32.const 300) "{name}") (data (i32.const 340) "{value}")'
    return component_wat(f"{_REALLOC}\n{extra}\n{_REQ}\n{on_request})\n{_RESP}\n{on_response})")


fake = openai_fake(MODEL)


@pytest.fixture(scope="module")
def gateway(fake: FakeProvider) -> Iterator[Gateway]:
    def ready(gw: Gateway) -> bool:
        return _chat(httpx.Client(), gw).status_code == 200

    with gateway_over(fake, ["--enable-wasm"], ready, "the fake answers") as gw:
        yield gw


@pytest.fixture
def pinned(gateway: Gateway) -> Iterator[Any]:
    # The openai SDK's httpx (PinnedTransport is one of its transports).
    with _hx.Client(transport=PinnedTransport(gateway.url), timeout=30.0) as client:
        yield client


def _chat(client: Any, gw: Gateway, **extra: Any) -> Any:
    return client.post(gw.url + "/v1/chat/completions", json={**CHAT, **extra})


def _add(gw: Gateway, modules: list[tuple[str, Path, tuple[str, ...]]]) -> httpx.Response:
    return gw.admin(
        "POST",
        "/wasm",
        json={
            "modules": [
                {
                    "name": name,
                    "file_path": str(path),
                    "module_type": "Middleware",
                    "attach_points": [{"Middleware": p} for p in points],
                }
                for name, path, points in modules
            ]
        },
    )


def _ids(answer: httpx.Response) -> list[str]:
    return [m["add_result"]["Success"] for m in answer.json()["modules"]]


def _remove_all(gw: Gateway) -> None:
    for module in gw.admin("GET", "/wasm").json()["modules"]:
        assert gw.admin("DELETE", "/wasm/" + module["module_uuid"]).status_code == 200


def _both(pinned: Any, gw: Gateway, check: Any, **extra: Any) -> bool:
    """`check` holds for an answer from each of the two processes."""
    return all(check(_chat(pinned, gw, **extra)) for _ in range(2))


def test_modules_change_requests_and_answers_in_every_process(
    gateway: Gateway, fake: FakeProvider, pinned: Any, tmp_path: Path
) -> None:
    tagger = tmp_path / "tagger.wasm"
    tagger.write_text(_guest("x-wasm-tag", "on", on_request=_set_header("x-wasm-tag", "on")))
    logger = tmp_path / "logger.wasm"
    logger.write_text(
        _guest("x-smg-wasm-logged", "1", on_response=_set_header("x-smg-wasm-logged", "1"))
    )
    try:
        added = _add(
            gateway, [("tagger", tagger, ("OnRequest",)), ("logger", logger, ("OnResponse",))]
        )
        assert added.status_code == 200, added.text
        tagger_id, logger_id = _ids(added)
        listed = gateway.admin("GET", "/wasm").json()
        assert [(m["module_uuid"], m["module_meta"]["name"]) for m in listed["modules"]] == [
            (tagger_id, "tagger"),
            (logger_id, "logger"),
        ]
        # Both processes load them within a second (the directory's generation).
        started = time.monotonic()
        wait_until(
            lambda: _both(pinned, gateway, lambda a: a.headers.get("x-smg-wasm-logged") == "1"),
            5,
            "both processes run the OnResponse module",
        )
        assert time.monotonic() - started < 3.0  # generous: the sweep looks every 0.25 s
        fake.clear()
        for _ in range(2):
            answer = _chat(pinned, gateway)
            assert answer.status_code == 200
            assert answer.headers["x-smg-wasm-logged"] == "1"
            assert answer.json()["choices"][0]["message"]["role"] == "assistant"
        posts = [r for r in fake.seen() if r["method"] == "POST"]
        assert [r["headers"].get("x-wasm-tag") for r in posts] == ["on", "on"]
        # The gateway's own answers on a serving route go through OnResponse too (1.13).
        missing = _chat(pinned, gateway, model="no-such-model")
        assert missing.status_code == 404 and missing.headers["x-smg-wasm-logged"] == "1"
        assert missing.json()["error"]["code"] == "model_not_found"
        assert missing.headers["x-smg-error-code"] == "model_not_found"
        # A stream: the request is still tagged; OnResponse does not apply (as 1.13).
        fake.clear()
        with pinned.stream(
            "POST", gateway.url + "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as stream:
            text = stream.read().decode()
            assert stream.status_code == 200 and "x-smg-wasm-logged" not in stream.headers
        assert "data: [DONE]" in text
        assert fake.seen()[-1]["headers"].get("x-wasm-tag") == "on"
        # The same bytes again are refused (1.13: duplicate sha256).
        again = _add(gateway, [("tagger2", tagger, ("OnRequest",))])
        assert again.status_code == 400
        assert "Duplicate SHA256 hash detected" in again.json()["modules"][0]["add_result"]["Error"]
        # Each data-plane process loaded each module once, from the artifact.
        logs = gateway.logs()
        assert logs.count(f"WASM module tagger ({tagger_id}) loaded") == 2
        assert logs.count(f"WASM module logger ({logger_id}) loaded") == 2
        metrics = gateway.admin("GET", "/wasm").json()["metrics"]
        assert metrics["total_executions"] >= 7 and metrics["failed_executions"] == 0
    finally:
        _remove_all(gateway)
    wait_until(
        lambda: _both(pinned, gateway, lambda a: "x-smg-wasm-logged" not in a.headers),
        5,
        "both processes dropped the modules",
    )


def test_reject_and_trap_fail_only_their_requests_and_removal_restores(
    gateway: Gateway, fake: FakeProvider, pinned: Any, tmp_path: Path
) -> None:
    rejecter = tmp_path / "rejecter.wasm"
    rejecter.write_text(_guest("a", "b", on_request=REJECT_403))
    trapper = tmp_path / "trapper.wasm"
    trapper.write_text(_guest("c", "d", on_request=TRAP))
    try:
        logger = tmp_path / "logger3.wasm"
        logger.write_text(_guest("x-logged", "1", on_response=_set_header("x-logged", "1")))
        rejecter_id, _logger_id = _ids(
            _add(gateway, [("rejecter", rejecter, ("OnRequest",)), ("l", logger, ("OnResponse",))])
        )
        wait_until(
            lambda: _both(pinned, gateway, lambda a: a.status_code == 403),
            5,
            "both processes reject",
        )
        fake.clear()
        answer = _chat(pinned, gateway)
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "wasm_rejected"
        assert answer.json()["error"]["message"] == (
            "The request was rejected by WASM module 'rejecter'"
        )
        assert "x-logged" not in answer.headers  # a reject answers at once (1.13)
        assert [r for r in fake.seen() if r["method"] == "POST"] == []  # never reached it
        assert gateway.admin("DELETE", f"/wasm/{rejecter_id}").status_code == 200
        started = time.monotonic()
        wait_until(
            lambda: _both(pinned, gateway, lambda a: a.status_code == 200), 5, "rejecter gone"
        )
        assert time.monotonic() - started < 3.0  # generous: the sweep looks every 0.25 s
        (trapper_id,) = _ids(_add(gateway, [("trapper", trapper, ("OnRequest",))]))
        wait_until(
            lambda: _both(pinned, gateway, lambda a: a.status_code == 500), 5, "trapper runs"
        )
        answer = _chat(pinned, gateway)
        assert answer.status_code == 500 and "x-logged" not in answer.headers
        error = answer.json()["error"]
        assert error["code"] == "wasm_module_failed"
        assert error["message"].startswith("WASM module 'trapper' failed: ")
        # A body over the modules' 10 MiB limit is refused before any module runs (1.13: 400).
        big = pinned.post(
            gateway.url + "/v1/chat/completions",
            content=b'{"model":"gpt-4o","pad":"' + b"x" * (10 << 20) + b'"}',
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 400 and big.json()["error"]["code"] == "request_too_large"
        # The processes live on: other routes answer, and the module's failures are counted.
        assert httpx.get(gateway.url + "/v1/models", timeout=5).status_code == 200
        listed = gateway.admin("GET", "/wasm").json()
        module = listed["modules"][-1]
        assert module["module_uuid"] == trapper_id and module["module_meta"]["access_count"] >= 3
        assert listed["metrics"]["failed_executions"] >= 3
        page = httpx.get(gateway.metrics_url, timeout=5).text
        traps = [
            line
            for line in page.splitlines()
            if line.startswith("smg_wasm_traps_total{") and trapper_id in line
        ]
        assert traps and all('kind="trap"' in line and 'module="trapper"' in line for line in traps)
        assert sum(float(line.rsplit(" ", 1)[1]) for line in traps) >= 3
        promtool_check(page)
    finally:
        _remove_all(gateway)
    wait_until(lambda: _both(pinned, gateway, lambda a: a.status_code == 200), 5, "all gone")


def test_admin_errors_in_1_13_words(gateway: Gateway, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"not wasm")
    answer = _add(gateway, [("bad", bad, ("OnRequest",))])
    assert answer.status_code == 400
    error = answer.json()["modules"][0]["add_result"]["Error"]
    assert error.startswith(
        "Workflow failed at step validate_wasm_component: Step failed: "
        "validate_wasm_component - Invalid WASM component: "
    )
    assert error.count("Invalid WASM component") == 1 and error.count("Hint:") == 1
    missing = "01a223b9-10ff-7615-b26e-72ebb544cd75"
    answer = gateway.admin("DELETE", f"/wasm/{missing}")
    assert (answer.status_code, answer.text) == (
        400,
        "Workflow failed at step find_module_to_remove: Step failed: find_module_to_remove - "
        f"Module with UUID {missing} not found",
    )
    assert gateway.admin("GET", "/wasm").json()["modules"] == []


def test_without_enable_wasm_posting_is_refused(fake: FakeProvider, tmp_path: Path) -> None:
    module = tmp_path / "m.wasm"
    module.write_text(_guest("a", "b"))
    with running_gateway(["--worker-urls", fake.url, "--disable-health-check"], processes=1) as gw:
        answer = _add(gw, [("m", module, ("OnRequest",))])
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "wasm_disabled"
        assert gw.admin("GET", "/wasm").json()["modules"] == []


def test_a_replacement_data_plane_loads_the_modules(
    gateway: Gateway, pinned: Any, tmp_path: Path
) -> None:
    """A data-plane process that crashed is replaced by a new fork, which loads the published
    modules from their artifacts before it serves (the module list is in the directory)."""
    import os
    import signal

    from tests.gatewayutil import pid_serving

    logger = tmp_path / "logger2.wasm"
    logger.write_text(
        _guest("x-smg-wasm-seen", "1", on_response=_set_header("x-smg-wasm-seen", "1"))
    )
    try:
        (module_id,) = _ids(_add(gateway, [("logger2", logger, ("OnResponse",))]))
        wait_until(
            lambda: _both(pinned, gateway, lambda a: a.headers.get("x-smg-wasm-seen") == "1"),
            5,
            "both processes run it",
        )
        old = pid_serving(gateway, "1")
        assert old
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: pid_serving(gateway, "1") not in (0, old), 20, "process 1 replaced")
        assert _both(pinned, gateway, lambda a: a.headers.get("x-smg-wasm-seen") == "1")
        assert gateway.logs().count(f"WASM module logger2 ({module_id}) loaded") == 3
    finally:
        _remove_all(gateway)
