"""The probe routes' bytes, as the Rust SMG 1.13 answers them (checked against its binary):
`/health` and `/liveness` 200 `OK` as `text/plain; charset=utf-8`, `/readiness` 200
`{"status":"ready","healthy_workers":H,"total_workers":T}` or 503 `{"status":"not ready",
"reason":"insufficient healthy workers"}`; from each data-plane process of `smg launch
--processes 2` and from the control plane's `--health-check-port` listener. And
`/v1/models`, byte for byte 1.13's for a self-hosted worker (`owned_by` "self_hosted")."""

from __future__ import annotations

import httpx

from tests import mockutil
from tests.gatewayutil import free_port, pinned_clients, running_gateway, wait_until

TEXT = "text/plain; charset=utf-8"


def _liveness_ok(client: httpx.Client, base: str = "") -> None:
    for path in ("/health", "/liveness"):
        answer = client.get(base + path)
        assert (answer.status_code, answer.text) == (200, "OK"), (path, answer.text)
        assert answer.headers["content-type"] == TEXT
        assert answer.headers["content-length"] == "2"
        head = client.head(base + path)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == TEXT


def test_probes_answer_as_1_13_from_every_process_and_the_probe_port() -> None:
    probe_port = free_port()
    with (
        mockutil.start_mock_workers(1) as mocks,
        running_gateway(
            [
                "--worker-urls",
                *mocks.urls,
                "http://127.0.0.1:9",
                "--health-check-port",
                str(probe_port),
                "--health-check-interval-secs",
                "1",
            ]
        ) as gw,
    ):
        gw.wait_ready()
        ready = {"status": "ready", "healthy_workers": 1, "total_workers": 2}
        with pinned_clients(gw.url, 1) as pinned:
            for index, (client,) in pinned.items():
                _liveness_ok(client)
                answer = client.get("/readiness")
                assert answer.headers["x-smg-process"] == index
                assert (answer.status_code, answer.json()) == (200, ready)
        probe = f"http://127.0.0.1:{probe_port}"
        with httpx.Client(timeout=5.0) as client:
            wait_until(
                lambda: client.get(probe + "/readiness").status_code == 200, 10, "probe port"
            )
            _liveness_ok(client, probe)
            assert client.get(probe + "/readiness").json() == ready


def test_not_ready_says_insufficient_healthy_workers_and_liveness_stays_ok() -> None:
    gateway = running_gateway(["--worker-urls", "http://127.0.0.1:9"])
    with gateway as gw, pinned_clients(gw.url, 1) as pinned:
        for (client,) in pinned.values():
            _liveness_ok(client)
            answer = client.get("/readiness")
            assert answer.status_code == 503
            assert answer.json() == {
                "status": "not ready",
                "reason": "insufficient healthy workers",
            }


def test_models_list_is_1_13s_bytes_for_a_self_hosted_worker() -> None:
    with (
        mockutil.start_mock_workers(1, "--model", "mock-model") as mocks,
        running_gateway(["--worker-urls", *mocks.urls]) as gw,
        pinned_clients(gw.url, 1) as pinned,
    ):
        gw.wait_ready()
        # What the 1.13 binary answers for the same mock worker (an SGLang-like engine).
        expected = (
            b'{"object":"list","data":[{"id":"mock-model","object":"model","created":0,'
            b'"owned_by":"self_hosted"}]}'
        )
        for (client,) in pinned.values():
            answer = client.get("/v1/models")
            assert (answer.status_code, answer.content) == (200, expected)
