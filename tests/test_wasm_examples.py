"""The example components (examples/wasm/) in smg's runtime: each gives the expected actions, exactly.

Built offline: the WAT examples from their text, the Python guest with componentize-py (cached per inputs).
The fault fixtures (trap, spin, hog) fail only their own call, with the kind the metrics count.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from smg.wasm.runtime import ModuleRunner, compile_component
from smg.wasm.types import Continue, Limits, Modify, Reject, WasmRequest, WasmResponse, WasmTrap
from tests.wasmutil import (
    AUTH_KEY,
    EXAMPLES,
    SIZE_LIMIT,
    WAT,
    component_bytes,
    componentize_py,
    py_guard_component,
)

LIMITS = Limits()


def runner(name: str, limits: Limits = LIMITS) -> ModuleRunner:
    return ModuleRunner(None, compile_component(component_bytes(name), limits), limits)


def request(
    path: str = "/v1/chat/completions",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"{}",
    method: str = "POST",
    request_id: str = "req-1",
) -> WasmRequest:
    return WasmRequest(method, path, "", headers or [], body, request_id, 1_700_000_000_000)


def response(status: int = 200) -> WasmResponse:
    return WasmResponse(status, [("content-type", "application/json")], b'{"ok":true}')


def test_build_script_writes_the_component(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("build_wat", EXAMPLES / "build_wat.py")
    assert spec is not None and spec.loader is not None
    build_wat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_wat)
    for name in WAT:
        out = build_wat.build(WAT[name], tmp_path / f"{name}.wasm")
        assert (
            out.read_bytes()[:8] == b"\0asm\x0d\x00\x01\x00"
        )  # a component (layer 1), not a core module
        assert out.read_bytes() == component_bytes(name)


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/v1/chat/completions", [], Reject(401)),
        ("/v1/chat/completions", [("authorization", f"Bearer {AUTH_KEY}")], Continue()),
        ("/v1/models", [("authorization", f"ApiKey {AUTH_KEY}")], Continue()),
        ("/api/x", [("x-api-key", AUTH_KEY)], Continue()),
        (
            "/v1/completions",
            [("Authorization", f"Bearer {AUTH_KEY}")],
            Continue(),
        ),  # names case-insensitive
        ("/v1/completions", [("authorization", "Bearer wrong")], Reject(401)),
        ("/v1/completions", [("authorization", f"Bearer {AUTH_KEY}x")], Reject(401)),
        (
            "/v1/completions",
            [("authorization", f"bearer {AUTH_KEY}")],
            Reject(401),
        ),  # the prefix is exact
        # no Bearer/ApiKey prefix: x-api-key decides; a prefixed wrong key is final (1.13's and_then/or_else)
        ("/v1/completions", [("authorization", "Basic abc"), ("x-api-key", AUTH_KEY)], Continue()),
        ("/v1/completions", [("authorization", "Bearer no"), ("x-api-key", AUTH_KEY)], Reject(401)),
        ("/health", [], Continue()),
        ("/generate", [], Continue()),
    ],
)
def test_auth(path: str, headers: list[tuple[str, str]], expected: object) -> None:
    assert runner("auth").on_request(request(path, headers)) == expected


def test_auth_on_response_continues() -> None:
    assert runner("auth").on_response(response(401)) == Continue()


def test_logger_tags_request_and_response() -> None:
    mod = runner("logger")
    for rid in (
        "req-1",
        "chatcmpl-" + "x" * 200,
    ):  # a fresh instance per call: each sees only its own id
        assert mod.on_request(request(request_id=rid)) == Modify(
            headers_add=[("x-request-id", rid), ("x-wasm-processed", "true")]
        )
    assert mod.on_response(response(200)) == Modify(headers_add=[("x-smg-wasm-logged", "true")])
    assert mod.on_response(response(500)) == Modify(
        status=503, headers_add=[("x-smg-wasm-logged", "true")]
    )


def test_size_limit() -> None:
    mod = runner("size_limit")
    assert mod.on_request(request(body=b"x" * SIZE_LIMIT)) == Continue()
    assert mod.on_request(request(body=b"x" * (SIZE_LIMIT + 1))) == Reject(413)
    assert mod.on_request(request(body=b"x" * 1_000_000)) == Reject(413)
    assert mod.on_request(request(body=b"", method="GET")) == Continue()


def test_noop() -> None:
    mod = runner("noop")
    assert mod.on_request(request()) == Continue()
    assert mod.on_response(response()) == Continue()


def test_trap_fails_only_its_call() -> None:
    mod = runner("trap")
    with pytest.raises(WasmTrap) as err:
        mod.on_request(request(headers=[("x-trap", "1")]))
    assert err.value.kind == "trap"
    assert "unreachable" in str(err.value)
    assert mod.on_request(request()) == Continue()


def test_spin_is_stopped_by_the_execution_limit() -> None:
    limits = Limits(max_execution_ms=300)
    mod = runner("spin", limits)
    start = time.monotonic()
    with pytest.raises(WasmTrap) as err:
        mod.on_request(request(headers=[("x-spin", "1")]))
    elapsed = time.monotonic() - start
    assert err.value.kind == "timeout"
    assert 0.2 <= elapsed < 3.0, elapsed
    assert mod.on_request(request()) == Continue()


def test_hog_is_refused_by_the_memory_limit() -> None:
    # 100 MiB more than the module has: refused under 64 MiB (a trap), granted under 256 MiB
    with pytest.raises(WasmTrap) as err:
        runner("hog").on_request(request(headers=[("x-hog", "1")]))
    assert err.value.kind == "trap"
    assert runner("hog").on_request(request()) == Continue()
    roomy = Limits(max_memory_bytes=256 * 1024 * 1024)
    assert runner("hog", roomy).on_request(request(headers=[("x-hog", "1")])) == Continue()


@pytest.fixture(scope="module")
def py_guard() -> ModuleRunner:
    if componentize_py() is None:
        pytest.skip("componentize-py is not installed")
    path, _build_s = py_guard_component()
    return ModuleRunner(None, compile_component(path.read_bytes(), LIMITS), LIMITS)


def test_python_guest(py_guard: ModuleRunner) -> None:
    checked = Modify(headers_set=[("x-smg-py-guard", "checked")])
    assert py_guard.on_request(request(body=b'{"model": "mock-model"}')) == checked
    assert py_guard.on_request(request(body=b'{"model": "other"}')) == Reject(403)
    assert py_guard.on_request(request(body=b"[1]")) == Reject(403)
    assert py_guard.on_request(request(body=b"not json")) == Reject(400)
    assert py_guard.on_request(request("/v1/models", body=b"", method="GET")) == checked
    assert py_guard.on_response(response()) == Modify(headers_add=[("x-smg-py-guard", "seen")])
