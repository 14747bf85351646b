"""`PUT /workers/{id}`: the whole spec for the same URL, as the Rust SMG 1.13 takes it (its
answers and refusals checked against its binary): 202 "Worker update queued", what PATCH
may change replaced whole (labels and health not merged), 400 in 1.13's words for another
URL; smg refuses in place a change to what registration decided (1.13 registers the worker
again). And 1.13's 405 for another method on `/workers/{id}`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smg.workers_spec import SpecError, WorkerSpec, replaced_worker_spec
from tests import mockutil
from tests.gatewayutil import Gateway, running_gateway

QUEUED = "Worker update queued for background processing"


def test_replaced_spec_takes_what_patch_may_change_whole() -> None:
    current = WorkerSpec(
        url="http://w:1", model_id="m", labels={"keep": "x"}, priority=50, api_key="k"
    )
    new = WorkerSpec(url="http://w:1", labels={"a": "b"}, priority=7, cost=2.0)
    got = replaced_worker_spec(current, new)
    assert (got.labels, got.priority, got.cost, got.api_key) == ({"a": "b"}, 7, 2.0, None)
    assert got.model_id == "m"  # not given: kept
    with pytest.raises(SpecError) as refused:
        replaced_worker_spec(current, WorkerSpec(url="http://w:1", model_id="other"))
    assert refused.value.key == "model_id"
    with pytest.raises(SpecError) as refused:
        replaced_worker_spec(current, WorkerSpec(url="http://w:1", worker_type="decode"))
    assert refused.value.key == "worker_type"


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Gateway, str, str]]:
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", *mocks.urls], processes=1) as gw,
    ):
        gw.wait_ready()
        (worker,) = gw.admin("GET", "/workers").json()["workers"]
        yield gw, worker["id"], mocks.urls[0]


def test_put_replaces_the_spec_in_place(gateway: tuple[Gateway, str, str]) -> None:
    gw, worker_id, url = gateway
    assert (
        gw.admin("PATCH", f"/workers/{worker_id}", json={"labels": {"keep": "x"}}).status_code
        == 202
    )
    answer = gw.admin(
        "PUT", f"/workers/{worker_id}", json={"url": url, "priority": 7, "labels": {"a": "b"}}
    )
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"status": "accepted", "worker_id": worker_id, "message": QUEUED}
    info = gw.admin("GET", f"/workers/{worker_id}").json()
    assert info["priority"] == 7
    assert info["labels"].get("a") == "b"
    assert "keep" not in info["labels"]  # replaced, not merged (PATCH merges)


def test_put_refusals(gateway: tuple[Gateway, str, str]) -> None:
    gw, worker_id, url = gateway
    answer = gw.admin("PUT", f"/workers/{worker_id}", json={"url": "http://127.0.0.1:1"})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        f"URL mismatch: worker has URL '{url}' but request body has 'http://127.0.0.1:1'. "
        "URL changes are not supported via PUT. Use DELETE + POST instead."
    )
    answer = gw.admin("PUT", f"/workers/{worker_id}", json={"url": url, "worker_type": "decode"})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith("worker_type: cannot change in place")
    answer = gw.admin("PUT", f"/workers/{worker_id}", json={})  # no url: 1.13 refuses too
    assert answer.status_code == 400
    missing = "00000000-0000-0000-0000-000000000000"
    answer = gw.admin("PUT", f"/workers/{missing}", json={"url": url})
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == f"Worker {missing} not found"


def test_another_method_on_a_worker_is_1_13s_405(gateway: tuple[Gateway, str, str]) -> None:
    gw, worker_id, _url = gateway
    answer = gw.admin("POST", f"/workers/{worker_id}", json={})
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET,HEAD,PUT,PATCH,DELETE"
    assert answer.json()["error"]["message"] == f"Invalid URL (POST /workers/{worker_id})"
