"""--dp-aware, pure parts: rank URLs, dp_size from /server_info, the body rewrite, and the
registry's rank workers (keys, directory entries, /workers view, restore)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from smg.config import load_config
from smg.control.registry import Registry
from smg.control.worker_state import HealthThresholds
from smg.dp import NOT_SGLANG, dp_answer, dp_size_of, dp_url, inject_dp_rank, pd_rank_fields
from smg.httpwire import HttpError
from smg.shm.table import WorkerTable
from smg.workers_spec import WorkerSpec, validate_worker_spec

BASE = "http://127.0.0.1:31000"
PD_PAIR = ["--pd-disaggregation", "--prefill", BASE, "--decode", "http://127.0.0.1:31001"]


def test_dp_url_is_base_at_rank() -> None:
    assert dp_url(BASE, 0) == "http://127.0.0.1:31000@0"
    assert dp_url(BASE, 3) == "http://127.0.0.1:31000@3"


def test_dp_size_of_reads_a_positive_integer() -> None:
    assert dp_size_of({"dp_size": 4, "tp_size": 1}) == 4
    assert dp_size_of({"dp_size": 1}) == 1


@pytest.mark.parametrize(
    "info",
    [
        None,
        [],
        {"tp_size": 2},
        {"dp_size": 0},
        {"dp_size": -1},
        {"dp_size": "2"},
        {"dp_size": 2.0},
        {"dp_size": True},
        {"dp_size": None},
    ],
)
def test_dp_size_of_refuses_what_is_not_a_dp_size(info: Any) -> None:
    with pytest.raises(ValueError, match=r"dp_size|not a JSON object"):
        dp_size_of(info)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((200, {"dp_size": 4}), 4),
        ((404, None), NOT_SGLANG),  # no /server_info nor /get_server_info: not SGLang
        (None, None),  # no answer yet (starting): ask again
        ((503, {"dp_size": 4}), None),
        ((200, {"tp_size": 1}), None),  # 1.13: "No dp_size in response", retried
        ((200, None), None),  # not JSON
    ],
)
def test_dp_answer(answer: Any, expected: int | None) -> None:
    assert dp_answer(answer) == expected


def test_inject_dp_rank_adds_the_rank_and_keeps_the_rest() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
    out = inject_dp_rank(body, 2)
    assert out is not None
    assert orjson.loads(out) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "data_parallel_rank": 2,
    }


def test_inject_dp_rank_replaces_the_clients_rank() -> None:
    # 1.13's prepare_request inserts the worker's rank over whatever the client sent.
    out = inject_dp_rank(memoryview(b'{"text":"x","data_parallel_rank":7}'), 1)
    assert out is not None and orjson.loads(out) == {"text": "x", "data_parallel_rank": 1}


@pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"12", b"{not json", b""])
def test_inject_dp_rank_leaves_a_non_object_alone(body: bytes) -> None:
    assert inject_dp_rank(body, 0) is None


def _registry() -> Registry:
    table = WorkerTable.create(8, 2, supervisor_pid=1, anonymous=False)
    return Registry(table, HealthThresholds(), health_check_disabled=True)


def test_registry_rank_workers_are_keyed_and_shown_as_1_13_does() -> None:
    registry = _registry()
    spec = validate_worker_spec(WorkerSpec(url=BASE))
    records = [registry.add(spec, dp=(rank, 3)) for rank in range(3)]
    assert [r.url for r in records] == [f"{BASE}@0", f"{BASE}@1", f"{BASE}@2"]
    assert sorted(registry.by_url) == [f"{BASE}@0", f"{BASE}@1", f"{BASE}@2"]
    entry = records[1].entry()
    # The data plane connects to the engine's URL and injects the entry's rank.
    assert (entry.url, entry.dp_rank, entry.dp_size) == (BASE, 1, 3)
    info = registry.info(records[2])
    assert (info["url"], info["dp_base_url"], info["dp_rank"], info["dp_size"]) == (
        f"{BASE}@2",
        BASE,
        2,
        3,
    )
    with pytest.raises(HttpError) as exc:
        registry.add(spec, dp=(1, 3))
    assert exc.value.status == 409 and f"'{BASE}@1'" in exc.value.message
    registry.remove(records[1].worker_id)
    assert f"{BASE}@1" not in registry.by_url
    registry.add(spec, dp=(1, 3))  # the key is free again


def test_plain_worker_has_no_dp_fields() -> None:
    registry = _registry()
    record = registry.add(validate_worker_spec(WorkerSpec(url=BASE)))
    assert record.url == BASE and registry.by_url == {BASE: record.worker_id}
    entry = record.entry()
    assert (entry.dp_rank, entry.dp_size) == (None, None)
    info = registry.info(record)
    assert info["url"] == BASE and "dp_rank" not in info and "dp_base_url" not in info


def test_restore_keeps_the_ranks() -> None:
    # A replacement control plane takes the rank workers over from the published directory.
    registry = _registry()
    spec = validate_worker_spec(WorkerSpec(url=BASE))
    for rank in range(2):
        registry.add(spec, dp=(rank, 2))
    again = Registry(registry.table, HealthThresholds(), health_check_disabled=True)
    assert again.restore() == 2
    assert sorted(again.by_url) == [f"{BASE}@0", f"{BASE}@1"]
    assert sorted(r.dp for r in again.workers.values() if r.dp is not None) == [(0, 2), (1, 2)]


def test_config_accepts_dp_aware_in_regular_and_pd_mode() -> None:
    cfg = load_config(["--worker-urls", BASE, "--dp-aware"], {})
    assert cfg.dp_aware is True
    # PD legs carry routed_dp_rank / disagg_prefill_dp_rank (tests/test_pd_admission_e2e.py).
    cfg = load_config([*PD_PAIR, "--dp-aware"], {})
    assert cfg.dp_aware is True and cfg.pd_disaggregation is True


def test_pd_rank_fields_as_the_1_13_binary_sends_them() -> None:
    body = {"text": "a b", "bootstrap_room": 5}
    prefill, decode = pd_rank_fields(body, 1, 0)
    assert prefill == {"text": "a b", "bootstrap_room": 5, "routed_dp_rank": 1}
    assert decode == {
        "text": "a b",
        "bootstrap_room": 5,
        "disagg_prefill_dp_rank": 1,
        "routed_dp_rank": 0,
    }
    assert body == {"text": "a b", "bootstrap_room": 5}  # the caller's body is left alone
    assert pd_rank_fields(body, None, 2) == (body, {**body, "routed_dp_rank": 2})
