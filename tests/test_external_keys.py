"""The data plane's rules for external workers, tested directly (smg.dataplane.external):
whose key goes upstream and in which header, which candidate rows a request may use, the
provider body transform and the /v1/models merge."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from smg import ipc
from smg.dataplane import external
from smg.dataplane.external import (
    AMBIGUOUS_CODE,
    MISMATCH_CODE,
    External,
    byok_key,
    credential_lines,
    filter_rows,
    merge_models,
    transform_body,
)
from smg.shm.directory import DirectoryEntry
from smg.workers_spec import WorkerSpec

GATEWAY = (b"gw-admin-key", b"gw-tenant-key")


def entry(row: int, provider: str | None, api_key: str | None = None) -> DirectoryEntry:
    spec = WorkerSpec(url=f"http://127.0.0.1:{9000 + row}", api_key=api_key)
    engine = "external" if provider else "sglang"
    return DirectoryEntry(
        row, 1, f"w{row}", spec.url, None, ("m",), api_key, engine, None, spec, provider=provider
    )


# --- whose key --------------------------------------------------------------------------------


def test_byok_bearer_for_openai_x_api_key_first_for_anthropic() -> None:
    auth, xkey = b"Bearer sk-proj-one", b"sk-ant-two"
    assert byok_key("openai", auth, xkey, ()) == b"sk-proj-one"
    assert byok_key("anthropic", auth, xkey, ()) == b"sk-ant-two"
    assert byok_key("anthropic", b"bearer  sk-ant-3 ", None, ()) == b"sk-ant-3"
    assert byok_key("openai", None, b" sk-x ", ()) == b"sk-x"
    # Gemini's own header (read as the caller's key header) comes first there, as in Rust.
    assert byok_key("gemini", b"Bearer AIza-bearer", b"AIza-goog", ()) == b"AIza-goog"


def test_gateway_keys_are_never_byok() -> None:
    assert byok_key("openai", b"Bearer gw-admin-key", None, GATEWAY) is None
    assert byok_key("anthropic", None, b"gw-tenant-key", GATEWAY) is None
    # Authenticated with the gateway key, the caller's own key rides in x-api-key.
    assert byok_key("openai", b"Bearer gw-admin-key", b"sk-proj-mine", GATEWAY) == b"sk-proj-mine"
    # Not a Bearer credential: no key.
    assert byok_key("openai", b"Basic abc", None, ()) is None
    assert byok_key("openai", b"Bearer ", b"  ", ()) is None


def test_credential_lines() -> None:
    assert credential_lines("openai", b"sk-a", "worker", False) == b"authorization: Bearer sk-a\r\n"
    assert credential_lines("xai", None, "worker", False) == b"authorization: Bearer worker\r\n"
    assert credential_lines("openai", None, None, False) == b""
    assert credential_lines("gemini", b"AIza-k", None, False) == b"x-goog-api-key: AIza-k\r\n"
    assert credential_lines("gemini", None, None, False) == b""
    assert credential_lines("anthropic", b"sk-ant-k", None, False) == (
        b"x-api-key: sk-ant-k\r\nanthropic-version: 2023-06-01\r\n"
    )
    # The caller's anthropic-version is forwarded as it came: none is added.
    assert credential_lines("anthropic", None, "wk", True) == b"x-api-key: wk\r\n"
    # No key at all (a keyless Anthropic-compatible worker): the version still goes.
    assert credential_lines("anthropic", None, None, False) == b"anthropic-version: 2023-06-01\r\n"
    assert credential_lines("anthropic", None, None, True) == b""


# --- candidate rows ---------------------------------------------------------------------------


ENTRIES = {
    0: entry(0, "openai"),
    1: entry(1, "anthropic"),
    2: entry(2, None),
    3: entry(3, "openai"),
}


def test_key_of_one_provider_goes_to_its_rows_only() -> None:
    rows, code, _ = filter_rows(ENTRIES, [0, 3, 2], "gpt-4o", b"Bearer sk-ant-x", None, ())
    assert (rows, code) == ([2], "")  # self-hosted rows never get the caller's key
    rows, code, message = filter_rows(ENTRIES, [0, 3], "gpt-4o", b"Bearer sk-ant-x", None, ())
    assert rows == [] and code == MISMATCH_CODE
    assert "for provider anthropic" in message and "served by openai" in message
    rows, code, _ = filter_rows(ENTRIES, [0, 3], "gpt-4o", b"Bearer sk-proj-x", None, ())
    assert (rows, code) == ([0, 3], "")
    # An unattributed key, and the gateway's own key, filter nothing.
    assert filter_rows(ENTRIES, [0, 3], "m", b"Bearer sk-plain", None, ())[0] == [0, 3]
    assert filter_rows(ENTRIES, [1], "m", b"Bearer gw-admin-key", None, GATEWAY)[0] == [1]


def test_several_providers_keep_the_models_provider() -> None:
    rows, code, _ = filter_rows(ENTRIES, [0, 1, 2], "claude-3-opus", None, None, ())
    assert (rows, code) == ([1, 2], "")
    rows, code, _ = filter_rows(ENTRIES, [0, 1], "gpt-4o", None, None, ())
    assert (rows, code) == ([0], "")
    # A model name that names no provider: each worker sends its own key, so both stay...
    assert filter_rows(ENTRIES, [0, 1], "llama", None, None, ()) == ([0, 1], "", "")
    assert filter_rows(ENTRIES, [0, 1], None, None, None, ()) == ([0, 1], "", "")
    # ... and a key that names its provider goes there only.
    assert filter_rows(ENTRIES, [0, 1], "llama", b"Bearer sk-ant-x", None, ())[0] == [1]
    # A caller's key that names no provider could reach either: refused.
    rows, code, message = filter_rows(ENTRIES, [0, 1], "llama", b"Bearer sk-plain", None, ())
    assert rows == [] and code == AMBIGUOUS_CODE and "anthropic, openai" in message
    rows, code, message = filter_rows(ENTRIES, [0, 1], None, b"Bearer sk-plain", None, ())
    assert rows == [] and code == AMBIGUOUS_CODE and message.startswith("requests without")
    # One provider (plus self-hosted rows): no filter.
    assert filter_rows(ENTRIES, [0, 2, 3], "llama", None, None, ())[0] == [0, 2, 3]
    assert filter_rows(ENTRIES, [2], "llama", b"Bearer sk-ant-x", None, ())[0] == [2]


# --- body transform ---------------------------------------------------------------------------


def test_transform_strips_sglang_fields_for_known_providers_only() -> None:
    body = orjson.dumps({"model": "gpt-4o", "top_k": 5, "regex": "a", "messages": []})
    assert orjson.loads(transform_body("openai", "/v1/chat/completions", body)) == {
        "model": "gpt-4o",
        "messages": [],
    }
    assert transform_body("my-host:8000", "/v1/chat/completions", body) is body
    clean = orjson.dumps({"model": "gpt-4o", "messages": []})
    assert transform_body("openai", "/v1/chat/completions", clean) is clean  # nothing changed
    assert transform_body("openai", "/v1/chat/completions", b"not json") == b"not json"
    assert transform_body("openai", "/v1/chat/completions", b"[1]") == b"[1]"


# --- /v1/models -------------------------------------------------------------------------------


def test_merge_models_union_by_id() -> None:
    local = [{"id": "a", "object": "model", "created": 0, "owned_by": "sglang"}]
    upstream = {
        "data": [
            {"id": "a", "object": "model", "created": 5, "owned_by": "openai"},
            {"id": "b", "object": "model", "created": 7, "owned_by": "openai"},
            {"id": "b", "owned_by": "anthropic"},
            {"id": 3},
            "junk",
        ]
    }
    assert merge_models(local, upstream) == [
        local[0],
        {"id": "b", "object": "model", "created": 7, "owned_by": "openai"},
    ]
    assert merge_models(local, None) == local
    assert merge_models(local, [400, [], b""]) == local  # a control plane without the op


def test_concurrent_refreshes_share_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    async def fake_call(address: str, message: dict[str, Any], timeout: float) -> Any:
        calls.append(message)
        await asyncio.sleep(0.05)
        return {"refreshed": 1}

    monkeypatch.setattr(ipc, "call", fake_call)

    async def run() -> list[bool]:
        ext = External(1, GATEWAY)
        first = await asyncio.gather(*(ext.refresh(b"sk-ant-k") for _ in range(5)))
        second = await ext.refresh(None)
        return [*first, second]

    assert asyncio.run(run()) == [True] * 6
    assert calls == [
        {"kind": "external_refresh", "provider": "anthropic", "credential": "sk-ant-k"},
        {"kind": "external_refresh", "provider": None, "credential": None},
    ]


def test_refresh_survives_a_failed_call(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(address: str, message: dict[str, Any], timeout: float) -> Any:
        raise ConnectionRefusedError

    monkeypatch.setattr(ipc, "call", broken)
    assert asyncio.run(External(1, ()).refresh(None)) is False
    assert external.IPC_TIMEOUT > 5.0  # the control plane's own 5 s bound comes first
