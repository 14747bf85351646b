"""The OnRequest path on the parsed request's bytes (ModuleRunner.on_request_raw,
smg.wasm._fastcall.call_request_raw, WasmChain.run_request_parsed) against the str path it
replaces in the gateway: a module sees exactly the same WIT values (every field echoed back by
a module), answers the same, fails the same, and the chain's outcome is the same."""

from __future__ import annotations

from typing import Any

import pytest
from test_wasm_fastcall import _pair
from test_wasm_runtime import ECHO_REQUEST, REJECT_403, TRAP, guest

from smg.shm.directory import WasmModuleEntry
from smg.wasm import runtime
from smg.wasm.chain import WasmChain, decoded, module_view
from smg.wasm.runtime import ModuleRunner
from smg.wasm.types import CONTINUE, Limits, WasmRequest, WasmTrap

LIMITS = Limits(max_body_bytes=2 * 1024 * 1024)

# (method, path, query, headers as parsed, body, request id): the edges of the decoding.
CASES: list[tuple[bytes, str, str, list[tuple[bytes, bytes]], bytes, bytes]] = [
    (
        b"POST",
        "/v1/chat/completions",
        "a=1&b=2",
        [(b"content-type", b"application/json"), (b"x-api-key", b"sk-1")],
        b'{"model":"m"}\x00\xff',
        b"req-123",
    ),
    (b"GET", "/", "", [], b"", b""),
    # Latin-1 names: str.lower() moves U+00C0-U+00DE but U+00D7; upper-case ASCII (a line
    # the parser did not lower-case); an empty value; values with a tab (shown), a control
    # character, DEL or a non-ASCII byte (not shown).
    (
        b"P\xd6ST",
        "/p\u00e9/\U0001f600",
        "q=\u00e9",
        [
            (b"X-Upper", b"V"),
            (bytes(range(0xBF, 0x100)), b"all"),
            (b"x-empty", b""),
            (b"x-tab", b"a\tb"),
            (b"x-ctl", b"a\x01b"),
            (b"x-del", b"a\x7fb"),
            (b"x-latin", b"caf\xe9"),
            (b"x-space", b" ~ "),
        ],
        bytes(range(256)),
        b"rid-\xe9\xff",
    ),
    # A lone surrogate in the path (str.encode("utf-8", "replace"): "?" on both paths).
    (b"POST", "/a\udcffb", "\ud800", [(b"k", b"v")] * 40, b"x" * (1024 * 1024), b"r"),
]


def _str_request(case: tuple[Any, ...], now: int) -> WasmRequest:
    method, path, query, raw, body, rid = case
    return WasmRequest(
        method.decode("latin-1"), path, query, module_view(decoded(raw)), body,
        rid.decode("latin-1"), now,
    )  # fmt: skip


def _outcome(call: Any, *args: Any) -> Any:
    try:
        return ("action", call(*args))
    except WasmTrap as e:
        return ("trap", str(e), e.kind)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_module_sees_the_same_values_through_the_raw_path(case: int) -> None:
    fast, slow = _pair(guest(on_request=ECHO_REQUEST), LIMITS)
    now = 1_700_000_001_234 + case
    raw = _outcome(fast.on_request_raw, *CASES[case], now)
    assert raw[0] == "action"
    assert raw == _outcome(fast.on_request, _str_request(CASES[case], now))
    assert raw == _outcome(slow.on_request, _str_request(CASES[case], now))
    # Without the extension on_request_raw takes the str path: the same again.
    assert raw == _outcome(slow.on_request_raw, *CASES[case], now)


def test_the_raw_path_shows_what_the_gateway_decodes() -> None:
    """Not just the same as the str path: the values themselves."""
    fast, _ = _pair(guest(on_request=ECHO_REQUEST), LIMITS)
    action = fast.on_request_raw(*CASES[2], 7)
    assert action.headers_set == [  # type: ignore[union-attr]
        ("x-method", "P\u00d6ST"),
        ("x-path", "/p\u00e9/\U0001f600"),
        ("x-query", "q=\u00e9"),
        ("x-request-id", "rid-\u00e9\u00ff"),
    ]
    lowered = "".join(chr(c) for c in range(0xBF, 0x100)).lower()
    assert lowered[1] == "\u00e0" and "\u00d7" in lowered and "\u00de" not in lowered
    assert action.headers_add == [  # type: ignore[union-attr]
        ("x-upper", "V"),
        (lowered, "all"),
        ("x-empty", ""),
        ("x-tab", "a\tb"),
        ("x-space", " ~ "),
    ]
    assert action.body_replace == bytes(range(256))  # type: ignore[union-attr]
    assert action.status == 7  # type: ignore[union-attr]


def test_answers_traps_and_limits_are_the_same() -> None:
    case = CASES[0]
    for wat in (guest(on_request=REJECT_403), guest(on_request=TRAP), guest()):
        fast, slow = _pair(wat, LIMITS)
        assert _outcome(fast.on_request_raw, *case, 1) == _outcome(
            slow.on_request, _str_request(case, 1)
        )
    # The body limit: refused before the module runs, as on_request.
    small = Limits(max_body_bytes=10)
    fast, _ = _pair(guest(on_request=ECHO_REQUEST), small)
    got = _outcome(fast.on_request_raw, b"POST", "/", "", [], b"x" * 11, b"r", 1)
    assert got == _outcome(fast.on_request, WasmRequest("POST", "/", "", [], b"x" * 11, "r", 1))
    assert got[0] == "trap" and got[2] == "body"
    # A trap fails that call only: the next one runs.
    trap, _ = _pair(guest(on_request=TRAP), LIMITS)
    for _ in range(3):
        assert _outcome(trap.on_request_raw, *case, 1)[0] == "trap"
    assert fast.on_request_raw(b"GET", "/", "", [], b"", b"r", 1).body_replace == b""  # type: ignore[union-attr]


def test_bad_arguments_raise_type_errors() -> None:
    fast, _ = _pair(guest(), LIMITS)
    assert runtime._fast is not None
    ok = [b"POST", "/", "", [(b"a", b"b")], b"", b"r", 1]
    assert fast.on_request_raw(*ok) is CONTINUE
    for at, bad in ((3, [("a", "b")]), (3, [(b"a",)]), (3, ((b"a", b"b"),)), (0, "POST"), (5, "r")):
        args = list(ok)
        args[at] = bad
        with pytest.raises(TypeError):
            fast.on_request_raw(*args)


# --- the chain ---------------------------------------------------------------------------------


def _entry(module_id: str) -> WasmModuleEntry:
    return WasmModuleEntry(module_id, module_id, "f", "s", 1, 0, ("OnRequest",), "a", "b")


class StrOnly:
    """A runner without on_request_raw: the chain takes the str path for it."""

    def __init__(self, inner: ModuleRunner) -> None:
        self.inner = inner

    def on_request(self, req: WasmRequest) -> Any:
        return self.inner.on_request(req)


def _chain(runners: list[Any]) -> WasmChain:
    by_id = {str(i): r for i, r in enumerate(runners)}

    def load(entry: WasmModuleEntry) -> Any:
        runner = by_id[entry.module_id]
        if isinstance(runner, Exception):
            raise runner
        return runner

    chain = WasmChain(load, LIMITS)
    chain.sync([_entry(i) for i in by_id])
    return chain


def _both(chain: WasmChain, case: tuple[Any, ...]) -> tuple[Any, Any]:
    method, path, query, raw, body, rid = case
    parsed = chain.run_request_parsed(method, path, query, raw, body, rid)
    plain = chain.run_request(
        method.decode("latin-1"), path, query, decoded(raw), body, rid.decode("latin-1")
    )
    return parsed, plain


def _key(outcome: Any) -> Any:
    # now-epoch-ms differs between two runs: the echo puts its low bits in no header, only in
    # the (request-side unused) status, so the outcome compares whole.
    return (outcome.status, outcome.body, outcome.module, outcome.message, outcome.failed,
            outcome.changed, outcome.headers if outcome.changed else None)  # fmt: skip


def test_the_chain_outcome_is_the_same_through_the_parsed_path() -> None:
    noop = ModuleRunner(None, runtime.compile_component(guest().encode(), LIMITS), LIMITS)
    echo = ModuleRunner(
        None, runtime.compile_component(guest(on_request=ECHO_REQUEST).encode(), LIMITS), LIMITS
    )
    reject = ModuleRunner(
        None, runtime.compile_component(guest(on_request=REJECT_403).encode(), LIMITS), LIMITS
    )
    chains = [
        [noop],
        [noop, noop],
        [noop, echo, echo],  # a modify, then the str path for the rest
        [echo, noop],
        [noop, reject, echo],
        [noop, StrOnly(echo), noop],
        [noop, ValueError("not loaded"), noop],
    ]
    for runners in chains:
        for case in CASES:
            parsed, plain = _both(_chain(runners), case)
            assert _key(parsed) == _key(plain), (runners, case[:3])
    parsed, _ = _both(_chain([noop, noop]), CASES[0])
    assert (parsed.status, parsed.changed, parsed.failed) == (0, False, False)
    failed, _ = _both(_chain([noop, ValueError("x")]), CASES[0])
    assert failed.failed and failed.status == 500


def test_the_chain_counts_the_same_through_the_parsed_path() -> None:
    noop = ModuleRunner(None, runtime.compile_component(guest().encode(), LIMITS), LIMITS)
    trap = ModuleRunner(
        None, runtime.compile_component(guest(on_request=TRAP).encode(), LIMITS), LIMITS
    )
    chain = _chain([noop, trap])
    for _ in range(3):
        assert chain.run_request_parsed(*CASES[0]).failed
    stats = [chain.stats[i][1] for i in ("0", "1")]
    assert [s.invocations for s in stats] == [3, 3]
    assert stats[1].traps == {"trap": 3} and stats[0].traps == {}
    assert stats[0].seconds > 0 and stats[0].max_seconds > 0
