"""The `/wasm` admin API's pure parts (smg.wasm.registry), the control plane's add/remove
(smg.control.wasm_admin, with a stand-in compiler and registry) and a data plane's chain
(smg.wasm.chain, with stand-in runners). The error texts are the Rust SMG 1.13 binary's,
tried with the same bytes. End to end through `smg launch`: tests/test_wasm_e2e.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from smg.control.wasm_admin import WasmAdmin, module_totals
from smg.httpwire import HttpError
from smg.shm.directory import (
    MAX_WASM_MODULES,
    Directory,
    WasmModuleEntry,
    decode_directory,
    encode_directory,
    wasm_bytes,
)
from smg.wasm import registry as reg
from smg.wasm.chain import WasmChain, reject_status
from smg.wasm.types import Continue, Limits, Modify, Reject, WasmTrap

# --- POST /wasm bodies -------------------------------------------------------------------------


def _body(**module: Any) -> bytes:
    base = {
        "name": "m",
        "file_path": "/tmp/m.wasm",
        "module_type": "Middleware",
        "attach_points": [{"Middleware": "OnRequest"}],
    }
    return orjson.dumps({"modules": [{**base, **module}]})


def test_parse_add_body_reads_descriptors() -> None:
    body = orjson.dumps(
        {
            "modules": [
                {
                    "name": "a",
                    "file_path": "/x/a.wasm",
                    "module_type": "Middleware",
                    "attach_points": [{"Middleware": "OnRequest"}, {"Middleware": "OnResponse"}],
                }
            ]
        }
    )
    assert reg.parse_add_body(body) == [
        reg.Descriptor("a", "/x/a.wasm", "Middleware", ("OnRequest", "OnResponse"))
    ]
    assert reg.parse_add_body(b'{"modules":[]}') == []


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"nope", 400, "Failed to parse the request body as JSON"),
        (b"{}", 422, "missing field `modules`"),
        (_body(module_type="Other"), 422, "unknown variant `Other`, expected `Middleware`"),
        (
            _body(attach_points=["OnRequest"]),
            422,
            "modules[0].attach_points[0]: unknown variant `OnRequest`, expected `Middleware`",
        ),
        (_body(attach_points=[{"Middleware": "OnBoot"}]), 422, "unknown variant `OnBoot`"),
    ],
)
def test_parse_add_body_refuses_other_shapes(body: bytes, status: int, message: str) -> None:
    with pytest.raises(reg.BodyError) as err:
        reg.parse_add_body(body)
    assert err.value.status == status
    assert message in str(err.value)


def test_missing_field_is_named() -> None:
    raw = orjson.loads(_body())
    del raw["modules"][0]["attach_points"]
    with pytest.raises(reg.BodyError) as err:
        reg.parse_add_body(orjson.dumps(raw))
    assert str(err.value) == (
        "Failed to deserialize the JSON body into the target type: "
        "modules[0]: missing field `attach_points`"
    )


@pytest.mark.parametrize(
    ("name", "path", "message"),
    [
        ("", "/a/m.wasm", "Module name cannot be empty"),
        ("m", "", "Module file path cannot be empty"),
        ("m", "rel.wasm", "Module file path must be absolute, got: rel.wasm"),
        ("m", "/a/../m.wasm", "Path traversal (..) not allowed in module file path"),
        ("m", "/a/m.txt", "Module file must have .wasm extension"),
        ("m", "/etc/m.wasm", "Access to /etc/ directory is not allowed"),
        ("m", "/proc/1/m.wasm", "Access to /proc/ directory is not allowed"),
    ],
)
def test_descriptor_checks_in_1_13_words(name: str, path: str, message: str) -> None:
    with pytest.raises(reg.StepFailed) as err:
        reg.check_descriptor_text(reg.Descriptor(name, path, "Middleware", ()))
    assert str(err.value) == (
        f"Workflow failed at step validate_descriptor: Step failed: validate_descriptor - {message}"
    )


def test_descriptor_checks_pass_a_good_path() -> None:
    reg.check_descriptor_text(reg.Descriptor("m", "/a/./M.WASM", "Middleware", ()))


def test_invalid_component_words_are_given_once() -> None:
    hint = (
        ". Hint: The WASM file must be in component format. If you're using wit-bindgen, use "
        "'wasm-tools component new' to wrap the WASM module into a component."
    )
    prefix = (
        "Workflow failed at step validate_wasm_component: Step failed: validate_wasm_component - "
    )
    assert str(reg.invalid_component("expected `(`")) == (
        prefix + "Invalid WASM component: expected `(`" + hint
    )
    already = "Invalid WASM component: expected `(`" + hint
    assert str(reg.invalid_component(already)) == prefix + already


def test_uuid7_is_time_ordered_version_7() -> None:
    one = reg.uuid7(1_700_000_000_000 * 1_000_000)
    two = reg.uuid7(1_700_000_000_001 * 1_000_000)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", one)
    assert one[:13] == "018bcfe5-6800" and two[:13] == "018bcfe5-6801"
    assert reg.canonical_uuid(one.upper()) == one
    assert reg.canonical_uuid("notauuid") is None


def _entry(n: int, points: tuple[str, ...] = ("OnRequest",), **kw: Any) -> WasmModuleEntry:
    fields: dict[str, Any] = {
        "module_id": f"00000000-0000-7000-8000-{n:012d}",
        "name": f"m{n}",
        "file_path": f"/w/m{n}.wasm",
        "sha256": f"{n:064x}",
        "size_bytes": 11,
        "created_at_ns": 1_700_000_000_123_456_789,
        "attach_points": points,
        "artifact_path": f"/run/m{n}.cwasm",
        "artifact_sha256": "0" * 64,
    }
    fields.update(kw)
    return WasmModuleEntry(**fields)


def test_list_view_in_1_13_shape() -> None:
    entry = _entry(1, ("OnRequest", "OnResponse"))
    totals = {entry.module_id: reg.ModuleTotals(4, 1, 0.010, 0.006), "gone": reg.ModuleTotals(2)}
    assert reg.list_view([entry], totals) == {
        "modules": [
            {
                "module_uuid": entry.module_id,
                "module_meta": {
                    "name": "m1",
                    "file_path": "/w/m1.wasm",
                    "sha256_hash": f"{1:064x}",
                    "size_bytes": 11,
                    "created_at": "2023-11-14T22:13:20.123456789Z",
                    "last_accessed_at": "2023-11-14T22:13:20.123456789Z",
                    "access_count": 4,
                    "attach_points": [{"Middleware": "OnRequest"}, {"Middleware": "OnResponse"}],
                },
            }
        ],
        "metrics": {
            "total_executions": 6,
            "successful_executions": 5,
            "failed_executions": 1,
            "total_execution_time_ms": 10,
            "max_execution_time_ms": 6,
            "average_execution_time_ms": pytest.approx(10 / 6),
        },
    }
    # No execution yet: no average (1.13 leaves the field out).
    assert reg.list_view([], {})["metrics"] == {
        "total_executions": 0,
        "successful_executions": 0,
        "failed_executions": 0,
        "total_execution_time_ms": 0,
        "max_execution_time_ms": 0,
    }


def test_module_list_round_trips_the_directory_and_fits_its_bound() -> None:
    entries = tuple(
        _entry(i, name="n" * 256, file_path="/" + "p" * 4095, artifact_path="/" + "a" * 4095)
        for i in range(MAX_WASM_MODULES)
    )
    blob = encode_directory(Directory(entries=[], wasm=entries))
    assert decode_directory(blob).wasm == entries
    assert len(blob) <= wasm_bytes() + len(encode_directory(Directory(entries=[])))
    # A directory written before the field existed decodes with no modules.
    assert decode_directory(encode_directory(Directory(entries=[]))).wasm == ()


# --- the control plane's add and remove ---------------------------------------------------------


class FakeRegistry:
    """`Registry`'s WASM part: the published list (publish_wasm may be made to fail)."""

    def __init__(self) -> None:
        self.wasm: tuple[WasmModuleEntry, ...] = ()
        self.published: list[tuple[WasmModuleEntry, ...]] = []
        self.full = False

    def publish_wasm(self, modules: tuple[WasmModuleEntry, ...]) -> None:
        if self.full:
            raise HttpError(400, "WORKER_DIRECTORY_FULL", "no room")
        self.wasm = modules
        self.published.append(modules)


def _compile(data: bytes, points: list[str]) -> bytes:
    if not data.startswith(b"(component"):
        raise ValueError("expected `(`")
    return b"artifact:" + data


def _admin(tmp_path: Path, enabled: bool = True) -> tuple[WasmAdmin, FakeRegistry, list[bytes]]:
    registry = FakeRegistry()
    compiled: list[bytes] = []

    def compile_once(data: bytes, points: list[str]) -> bytes:
        compiled.append(data)
        return _compile(data, points)

    admin = WasmAdmin(registry, enabled, 4242, compile_once)  # type: ignore[arg-type]
    return admin, registry, compiled


def _post(admin: WasmAdmin, modules: list[dict[str, Any]]) -> tuple[int, Any]:
    body = orjson.dumps({"modules": modules})
    status, _headers, answer = asyncio.run(admin.route("POST", "/wasm", body, None))
    return status, orjson.loads(answer)


def _module(name: str, path: Path, *points: str) -> dict[str, Any]:
    return {
        "name": name,
        "file_path": str(path),
        "module_type": "Middleware",
        "attach_points": [{"Middleware": p} for p in points],
    }


def test_add_compiles_once_writes_the_artifact_and_publishes(tmp_path: Path) -> None:
    admin, registry, compiled = _admin(tmp_path)
    source = tmp_path / "a.wasm"
    source.write_bytes(b"(component)")
    try:
        status, answer = _post(admin, [_module("a", source, "OnRequest", "OnResponse")])
        assert status == 200
        module_id = answer["modules"][0]["add_result"]["Success"]
        assert answer == {
            "modules": [
                {
                    **_module("a", source, "OnRequest", "OnResponse"),
                    "add_result": {"Success": module_id},
                }
            ]
        }
        assert compiled == [b"(component)"]
        (entry,) = registry.wasm
        assert entry.module_id == module_id and entry.name == "a"
        assert entry.attach_points == ("OnRequest", "OnResponse")
        assert entry.sha256 == hashlib.sha256(b"(component)").hexdigest()
        assert Path(entry.artifact_path).read_bytes() == b"artifact:(component)"
        assert entry.artifact_sha256 == hashlib.sha256(b"artifact:(component)").hexdigest()
        assert os.stat(admin.run_dir).st_mode & 0o777 == 0o700  # type: ignore[arg-type]
        # The same bytes again (another name): refused as 1.13 does, not compiled again.
        status, answer = _post(admin, [_module("b", source, "OnRequest")])
        assert status == 400
        assert answer["modules"][0]["add_result"] == {
            "Error": "Workflow failed at step check_duplicate: Step failed: check_duplicate - "
            "Duplicate SHA256 hash detected: module with same sha256 already exists: "
            + entry.sha256
        }
        assert compiled == [b"(component)"]
        # Removal: the list without it, the artifact gone; a second removal is 400.
        path = f"/wasm/{module_id}"
        assert asyncio.run(admin.route("DELETE", path, b"", None)) == (
            200,
            [("content-type", "text/plain; charset=utf-8")],
            b"Module removed successfully",
        )
        assert registry.wasm == () and not Path(entry.artifact_path).exists()
        status, _h, text = asyncio.run(admin.route("DELETE", path, b"", None))
        assert (status, text) == (
            400,
            b"Workflow failed at step find_module_to_remove: Step failed: find_module_to_remove"
            b" - Module with UUID " + module_id.encode() + b" not found",
        )
    finally:
        admin.cleanup()
    assert not os.path.exists(admin.run_dir)  # type: ignore[arg-type]


def test_add_answers_each_module_and_keeps_the_good_ones(tmp_path: Path) -> None:
    admin, registry, _compiled = _admin(tmp_path)
    good = tmp_path / "good.wasm"
    good.write_bytes(b"(component (core module))")
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"not wasm")
    empty = tmp_path / "zero.wasm"
    empty.write_bytes(b"")
    try:
        status, answer = _post(
            admin,
            [
                _module("bad", bad, "OnRequest"),
                _module("zero", empty, "OnResponse"),
                _module("missing", tmp_path / "missing.wasm"),
                _module("good", good, "OnRequest"),
            ],
        )
        assert status == 400
        results = [m["add_result"] for m in answer["modules"]]
        assert results[0] == {
            "Error": "Workflow failed at step validate_wasm_component: Step failed: "
            "validate_wasm_component - Invalid WASM component: expected `(`. Hint: The WASM "
            "file must be in component format. If you're using wit-bindgen, use 'wasm-tools "
            "component new' to wrap the WASM module into a component."
        }
        assert results[1] == {
            "Error": "Workflow failed at step validate_descriptor: Step failed: "
            "validate_descriptor - Module file size cannot be 0"
        }
        assert results[2] == {
            "Error": "Workflow failed at step validate_descriptor: Step failed: "
            f"validate_descriptor - Failed to access file {tmp_path}/missing.wasm: "
            "No such file or directory (os error 2)"
        }
        assert list(results[3]) == ["Success"]
        assert [e.name for e in registry.wasm] == ["good"]
    finally:
        admin.cleanup()


def test_symlink_to_a_non_wasm_file_is_refused(tmp_path: Path) -> None:
    admin, registry, _compiled = _admin(tmp_path)
    target = tmp_path / "real.bin"
    target.write_bytes(b"(component)")
    link = tmp_path / "link.wasm"
    link.symlink_to(target)
    status, answer = _post(admin, [_module("l", link, "OnRequest")])
    assert status == 400 and registry.wasm == ()
    assert answer["modules"][0]["add_result"]["Error"].endswith(
        "Symlink target must be a .wasm file"
    )


def test_a_list_that_does_not_fit_is_refused_and_nothing_written(tmp_path: Path) -> None:
    admin, registry, _compiled = _admin(tmp_path)
    registry.full = True
    source = tmp_path / "a.wasm"
    source.write_bytes(b"(component)")
    try:
        status, answer = _post(admin, [_module("a", source, "OnRequest")])
        assert status == 400 and registry.wasm == ()
        assert answer["modules"][0]["add_result"]["Error"].endswith("register_module - no room")
        assert os.listdir(admin.run_dir) == []  # type: ignore[arg-type]
    finally:
        admin.cleanup()


def test_without_enable_wasm_adding_is_refused_listing_answers(tmp_path: Path) -> None:
    admin, _registry, compiled = _admin(tmp_path, enabled=False)
    source = tmp_path / "a.wasm"
    source.write_bytes(b"(component)")
    status, _headers, body = asyncio.run(
        admin.route("POST", "/wasm", orjson.dumps({"modules": [_module("a", source)]}), None)
    )
    assert status == 400 and compiled == []
    assert orjson.loads(body)["error"]["code"] == "wasm_disabled"
    status, _h, body = asyncio.run(admin.route("GET", "/wasm", b"", None))
    assert status == 200 and orjson.loads(body)["modules"] == []


def test_bad_ids_and_methods(tmp_path: Path) -> None:
    admin, _registry, _compiled = _admin(tmp_path)
    status, _h, body = asyncio.run(admin.route("DELETE", "/wasm/notauuid", b"", None))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_request"
    status, headers, _b = asyncio.run(admin.route("PUT", "/wasm", b"", None))
    assert status == 405 and ("allow", "POST,GET") in headers
    status, _h, body = asyncio.run(admin.route("POST", "/wasm", b"nope", None))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_json"


def test_module_totals_sum_the_processes() -> None:
    from smg.promtext import Family, Sample

    a = [("module_id", "A"), ("module", "a"), ("process", "0")]
    b = [("module_id", "A"), ("module", "a"), ("process", "1")]
    families = [
        Family("smg_wasm_invocations_total", "counter", "", [Sample("", a, 3), Sample("", b, 4)]),
        Family("smg_wasm_traps_total", "counter", "", [Sample("", a, 1)]),
        Family("smg_wasm_execution_seconds_total", "counter", "", [Sample("", b, 0.5)]),
        Family(
            "smg_wasm_execution_seconds_max", "gauge", "", [Sample("", a, 0.2), Sample("", b, 0.3)]
        ),
        Family("smg_http_requests_total", "counter", "", [Sample("", a, 99)]),
    ]
    assert module_totals(families) == {"A": reg.ModuleTotals(7, 1, 0.5, 0.3)}


# --- a data plane's chain ---------------------------------------------------------------------


_CONTINUE = Continue()


class FakeRunner:
    def __init__(self, request: Any = _CONTINUE, response: Any = _CONTINUE) -> None:
        self.request = request
        self.response = response
        self.seen: list[Any] = []

    def on_request(self, req: Any) -> Any:
        self.seen.append(req)
        if isinstance(self.request, Exception):
            raise self.request
        return self.request

    def on_response(self, resp: Any) -> Any:
        self.seen.append(resp)
        if isinstance(self.response, Exception):
            raise self.response
        return self.response


def _chain(runners: dict[str, Any], entries: list[WasmModuleEntry]) -> WasmChain:
    def load(entry: WasmModuleEntry) -> Any:
        runner = runners[entry.module_id]
        if isinstance(runner, Exception):
            raise runner
        return runner

    chain = WasmChain(load, Limits())
    chain.sync(entries)
    return chain


def test_reject_status() -> None:
    assert [reject_status(s) for s in (401, 99, 150, 200, 999, 1000)] == [
        401,
        400,
        400,
        200,
        999,
        400,
    ]


def test_request_modules_run_in_order_each_seeing_the_last() -> None:
    first = FakeRunner(Modify(None, [("x-one", "1")], [], ["authorization"], b"new body"))
    second = FakeRunner(Modify(None, [], [("x-two", "2")], [], None))
    e1, e2 = _entry(1), _entry(2)
    chain = _chain({e1.module_id: first, e2.module_id: second}, [e1, e2])
    headers = [("authorization", "k"), ("x-name", "caf\xc3\xa9")]  # a UTF-8 value, as latin-1
    out = chain.run_request("POST", "/v1/chat/completions", "a=1", headers, b"body", "rid")
    assert (out.status, out.changed, out.body) == (0, True, b"new body")
    # The header no module was shown (not visible ASCII, as 1.13) is kept all the same.
    assert out.headers == [("x-name", "caf\xc3\xa9"), ("x-one", "1"), ("x-two", "2")]
    seen = second.seen[0]
    assert (seen.method, seen.path, seen.query, seen.request_id) == (
        "POST",
        "/v1/chat/completions",
        "a=1",
        "rid",
    )
    assert seen.headers == [("x-one", "1")] and seen.body == b"new body"
    assert first.seen[0].body == b"body" and first.seen[0].headers == [("authorization", "k")]


def test_reject_stops_the_chain_and_is_counted() -> None:
    e1, e2 = _entry(1), _entry(2)
    later = FakeRunner()
    chain = _chain({e1.module_id: FakeRunner(Reject(401)), e2.module_id: later}, [e1, e2])
    out = chain.run_request("POST", "/p", "", [], b"", "r")
    assert (out.status, out.module, out.failed) == (401, "m1", False)
    assert later.seen == []
    stats = chain.stats[e1.module_id][1]
    assert (stats.invocations, stats.rejections, stats.traps) == (1, 1, {})


def test_a_trap_or_a_module_that_did_not_load_fails_the_request() -> None:
    e1, e2 = _entry(1), _entry(2)
    chain = _chain({e1.module_id: FakeRunner(WasmTrap("wasm trap: unreachable"))}, [e1])
    out = chain.run_request("POST", "/p", "", [], b"", "r")
    assert (out.status, out.failed) == (500, True)
    assert out.message == "WASM module 'm1' failed: wasm trap: unreachable"
    assert chain.stats[e1.module_id][1].traps == {"trap": 1}
    chain = _chain({e1.module_id: FakeRunner(WasmTrap("1000 ms", "timeout"))}, [e1])
    chain.run_request("POST", "/p", "", [], b"", "r")
    chain.run_request("POST", "/p", "", [], b"", "r")
    assert chain.stats[e1.module_id][1].traps == {"timeout": 2}
    (family,) = [f for f in chain.families(3) if f.name == "smg_wasm_traps_total"]
    assert [
        (dict(s.labels)["kind"], dict(s.labels)["process"], s.value) for s in family.samples
    ] == [("timeout", "3", 2)]
    chain = _chain({e1.module_id: FakeRunner("not an action")}, [e1])
    out = chain.run_request("POST", "/p", "", [], b"", "r")
    assert (
        out.status == 500
        and out.message == "WASM module 'm1' failed: it answered str, not an action"
    )
    assert chain.stats[e1.module_id][1].traps == {"invalid": 1}
    chain = _chain({e2.module_id: OSError("artifact gone")}, [e2])
    out = chain.run_request("POST", "/p", "", [], b"", "r")
    assert out.status == 500
    assert out.message == (
        "WASM module 'm2' failed: it could not be loaded in this process (OSError: artifact gone)"
    )
    assert chain.stats[e2.module_id][1].traps == {"load": 1}


def test_sync_keeps_loaded_modules_and_follows_the_order() -> None:
    e1, e2, e3 = _entry(1), _entry(2, ("OnResponse",)), _entry(3)
    loads: list[str] = []

    def load(entry: WasmModuleEntry) -> Any:
        loads.append(entry.name)
        return FakeRunner()

    chain = WasmChain(load, Limits())
    assert not chain
    chain.sync([e1, e2])
    chain.sync([e3, e1, e2])
    assert loads == ["m1", "m2", "m3"]
    assert [m.entry.name for m in chain.on_request] == ["m3", "m1"]
    assert [m.entry.name for m in chain.on_response] == ["m2"]
    chain.run_request("POST", "/p", "", [], b"", "r")
    chain.sync([])
    assert not chain and chain.on_request == ()
    # A removed module's counts stay in the metrics.
    (family,) = [f for f in chain.families(0) if f.name == "smg_wasm_invocations_total"]
    assert {dict(s.labels)["module"]: s.value for s in family.samples} == {
        "m1": 1,
        "m2": 0,
        "m3": 1,
    }


def test_response_modules_change_status_headers_and_body() -> None:
    e1, e2 = _entry(1, ("OnResponse",)), _entry(2, ("OnResponse",))
    first = FakeRunner(response=Modify(203, [], [("x-logged", "1")], [], None))
    second = FakeRunner(response=Modify(None, [], [], [], b"{}"))
    chain = _chain({e1.module_id: first, e2.module_id: second}, [e1, e2])
    out = chain.run_response(200, [("content-type", "application/json")], b'{"a":1}')
    assert (out.status, out.response_status, out.body, out.changed) == (0, 203, b"{}", True)
    assert out.headers == [("content-type", "application/json"), ("x-logged", "1")]
    assert second.seen[0].status == 203
    chain = _chain({e1.module_id: FakeRunner(response=Reject(451))}, [e1])
    out = chain.run_response(200, [], b"x")
    assert (out.status, out.response_status, out.body) == (0, 451, b"x")


class _HeldExchange:
    """The part of an Exchange a ResponseHook touches: the worker's held headers."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.held_headers: list[tuple[bytes, bytes]] | None = headers


def test_response_hook_rewrites_a_whole_answer_and_passes_streams() -> None:
    from smg.wasm.chain import ResponseHook

    e1 = _entry(1, ("OnResponse",))
    runner = FakeRunner(response=Modify(201, [("x-smg-wasm-logged", "1")], [], ["x-drop"], None))
    chain = _chain({e1.module_id: runner}, [e1])
    hook = ResponseHook(chain, None, b"/v1/chat/completions", b"{}", False)
    assert (hook.upstream_path, hook.upstream_body) == (b"/v1/chat/completions", b"{}")
    assert not hasattr(hook, "settle")
    assert hook.feed(b"data: 1\n\n") == b"data: 1\n\n" and hook.finish() == b""
    exchange = _HeldExchange(
        [(b"content-type", b"application/json"), (b"x-drop", b"1"), (b"content-length", b"7")]
    )
    body = hook.response(200, b'{"a":1}')
    assert hook.wasm_answer(exchange, 200, body) == (201, b'{"a":1}')
    assert exchange.held_headers == [
        (b"content-type", b"application/json"),
        (b"x-smg-wasm-logged", b"1"),
    ]
    # The module saw the worker's headers but the framing ones.
    assert runner.seen[0].headers == [("content-type", "application/json"), ("x-drop", "1")]
    # A failing module: 500 in the OpenAI shape, the worker's headers dropped.
    chain = _chain({e1.module_id: FakeRunner(response=WasmTrap("out of fuel"))}, [e1])
    hook = ResponseHook(chain, None, b"/p", b"", False)
    exchange = _HeldExchange([(b"x-a", b"1")])
    status, answer = hook.wasm_answer(exchange, 200, b"{}")
    assert status == 500 and exchange.held_headers == []
    assert orjson.loads(answer)["error"] == {
        "message": "WASM module 'm1' failed: out of fuel",
        "type": "server_error",
        "code": "wasm_module_failed",
        "param": None,
    }


def test_registry_publishes_the_list_with_the_directory_and_a_replacement_restores_it() -> None:
    from smg.control.registry import Registry
    from smg.control.worker_state import HealthThresholds
    from smg.shm.table import WorkerTable
    from smg.workers_spec import WorkerSpec, validate_worker_spec

    table = WorkerTable.create(4, 2, supervisor_pid=1, anonymous=False)
    registry = Registry(table, HealthThresholds(), health_check_disabled=False)
    registry.add(validate_worker_spec(WorkerSpec(url="http://127.0.0.1:9001")))
    before = (table.directory_generation(), table.routing_generation())
    modules = (_entry(1), _entry(2, ("OnResponse",)))
    registry.publish_wasm(modules)
    # Data planes notice through the generations they already watch for workers.
    assert table.directory_generation() != before[0]
    assert table.routing_generation() == before[1] + 1
    _generation, directory = table.read_directory()
    assert directory.wasm == modules and len(directory.entries) == 1
    # A worker change publishes the list again, unchanged.
    registry.add(validate_worker_spec(WorkerSpec(url="http://127.0.0.1:9002")))
    assert table.read_directory()[1].wasm == modules
    replacement = Registry(table, HealthThresholds(), health_check_disabled=False)
    assert replacement.restore() == 2 and replacement.wasm == modules


def test_module_view_is_headers_for_module() -> None:
    from smg.wasm.chain import module_view
    from smg.wasm.types import headers_for_module

    headers = [
        ("a", "plain value"),
        ("b", "tab\there"),
        ("c", "caf\xe9"),
        ("d", "del\x7f"),
        ("e", "nul\x00"),
        ("f", ""),
        ("g", "~ !"),
        ("h", "line\r\nx: 1"),
    ]
    assert module_view(headers) == headers_for_module(headers)
    assert [n for n, _v in module_view(headers)] == ["a", "b", "f", "g"]


def test_a_module_add_waits_for_the_compile_not_the_admin_timeout() -> None:
    # POST /wasm compiles on the control plane (over 30 s for the Python guest on a loaded
    # box): a 503 at the plain admin bound would report a failure for a module that is
    # then added. Other admin calls keep the short bound.
    from smg.dataplane.app import ADMIN_TIMEOUT_S, WASM_ADD_TIMEOUT_S, _admin_timeout

    assert _admin_timeout("POST", "/wasm") == WASM_ADD_TIMEOUT_S == 600.0
    assert _admin_timeout("GET", "/wasm") == ADMIN_TIMEOUT_S == 30.0
    assert _admin_timeout("POST", "/workers") == ADMIN_TIMEOUT_S
