"""The admin routes as the Rust SMG 1.13's binary answers them (checked side by side): a
method a route does not take is 405 with 1.13's `allow` and `Invalid URL (METHOD PATH)`, and
`POST /flush_cache` answers 1.13's FlushCacheResult (200 `success`, 206 `partial_success`
with the failed workers), plus smg's per-worker `workers` list."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import mockutil
from tests.gatewayutil import Gateway, running_gateway

DEAD = "http://127.0.0.1:9"  # nothing listens: its flush fails


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Gateway, str]]:
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", *mocks.urls]) as gw,
    ):
        gw.wait_ready()
        yield gw, mocks.urls[0]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/flush_cache", "POST"),
        ("GET", "/start_profile", "POST"),
        ("GET", "/stop_profile", "POST"),
        ("POST", "/get_loads", "GET,HEAD"),
        ("DELETE", "/workers", "POST,GET,HEAD"),
        ("PUT", "/workers", "POST,GET,HEAD"),
    ],
)
def test_another_method_is_405_with_1_13s_allow(
    gateway: tuple[Gateway, str], method: str, path: str, allow: str
) -> None:
    gw, _url = gateway
    answer = gw.admin(method, path)
    assert answer.status_code == 405, answer.text
    assert answer.headers["allow"] == allow
    assert answer.headers["x-smg-error-code"] == "method_not_allowed"
    assert answer.json()["error"]["message"] == f"Invalid URL ({method} {path})"


def test_flush_cache_answers_1_13s_result(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    answer = gw.admin("POST", "/flush_cache")
    assert answer.status_code == 200
    body = answer.json()
    workers = body.pop("workers")  # smg's own field
    assert body == {  # the 1.13 binary's answer for one HTTP worker, byte for byte
        "status": "success",
        "message": "Successfully flushed cache on all 1 workers",
        "workers_flushed": 1,
        "total_http_workers": 1,
        "total_grpc_workers": 0,
        "total_zmq_workers_skipped": 0,
        "total_workers": 1,
    }
    assert [(w["worker"], w["ok"]) for w in workers] == [(url, True)]


def test_a_failed_flush_is_206_partial_success() -> None:
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", *mocks.urls, DEAD]) as gw,
    ):
        gw.wait_ready()
        answer = gw.admin("POST", "/flush_cache")
        assert answer.status_code == 206
        body = answer.json()
        assert body["status"] == "partial_success"
        assert body["message"] == "Cache flush: 1 succeeded, 1 failed"
        assert (body["workers_flushed"], body["total_workers"]) == (1, 2)
        assert body["successful"] == mocks.urls
        (failed,) = body["failed"]
        assert failed["worker"] == DEAD
        assert failed["error"].startswith(f"flush_cache failed for worker {DEAD}: ")
