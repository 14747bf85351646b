"""POST /start_profile and /stop_profile: the engines' profilers through the gateway, as the
Rust SMG 1.13 answers them (smg.control.profile; the fan-out in the control plane)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from gatewayutil import free_port, running_gateway
from mockutil import request_json, start_mock_workers, stats, wait_answering

from smg.control import profile

# --- the request body and the answer, as 1.13 reads and words them -----------------------------


def test_an_empty_body_is_the_defaults() -> None:
    assert profile.parse_request(b"", "start_profile") == (None, {"profile_by_stage": False})
    assert profile.parse_request(b"  ", "stop_profile") == (None, {})


def test_options_and_url_are_read_and_unknown_keys_ignored() -> None:
    body = b'{"url":"http://w:1","output_dir":"/tmp/p","num_steps":5,"activities":["CPU"],"zzz":1}'
    assert profile.parse_request(body, "start_profile") == (
        "http://w:1",
        {"profile_by_stage": False, "output_dir": "/tmp/p", "num_steps": 5, "activities": ["CPU"]},
    )
    assert profile.parse_request(body, "stop_profile") == ("http://w:1", {})


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{bad", 400, "Failed to parse the request body as JSON"),
        (b"[1]", 422, "the body must be a JSON object, got list"),
        (b'{"num_steps":"x"}', 422, "num_steps: expected an integer"),
        (b'{"start_step":true}', 422, "start_step: expected an integer"),
        (b'{"with_stack":1}', 422, "with_stack: expected a boolean"),
        (b'{"activities":["CPU",1]}', 422, "activities: expected a list of strings"),
        (b'{"url":5}', 422, "url: expected a string"),
    ],
)
def test_bodies_1_13_refuses(body: bytes, status: int, message: str) -> None:
    with pytest.raises(profile.ProfileRequestError) as caught:
        profile.parse_request(body, "start_profile")
    assert caught.value.status == status
    assert caught.value.message.startswith(message)


def test_answers_as_1_13_words_them() -> None:
    assert profile.answer("start_profile", 2, ["a", "b"], [], None) == (
        200,
        {
            "status": "success",
            "message": "Successfully started profiling on all 2 workers",
            "workers_profiled": 2,
            "total_workers": 2,
        },
    )
    failure = profile.failure_reason("stop_profile", "b", 404, "")
    assert failure == "stop_profile failed for worker b: HTTP 404"
    assert profile.answer("stop_profile", 2, ["a"], [("b", failure)], None) == (
        206,
        {
            "status": "partial_success",
            "message": "Profile stop: 1 succeeded, 1 failed",
            "workers_profiled": 1,
            "total_workers": 2,
            "successful": ["a"],
            "failed": [{"worker": "b", "error": failure}],
        },
    )
    assert profile.answer("start_profile", 0, [], [], "http://x")[0] == 404
    assert profile.answer("start_profile", 0, [], [], "http://x")[1]["message"] == (
        "No worker matching url 'http://x'"
    )
    assert profile.answer("stop_profile", 0, [], [], None)[1]["message"] == (
        "No workers available for profiling"
    )
    assert profile.failure_reason("start_profile", "g", 0, "gRPC worker not reachable") == (
        "start_profile failed for worker g: gRPC worker not reachable"
    )


# --- end to end: a mock engine that profiles and a server that has no profiler ------------------


def test_profile_routes_fan_out_to_every_worker_or_the_named_one() -> None:
    mocks = start_mock_workers(1)
    stub_port = free_port()
    stub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smg",
            "bench",
            "stub",
            "--host",
            "127.0.0.1",
            "--port",
            str(stub_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        mock_url = mocks.urls[0]
        stub_url = f"http://127.0.0.1:{stub_port}"
        wait_answering(stub_url, time.monotonic() + 15)
        # The stub answers 404 to /start_profile: a worker whose engine has no profiler.
        args = ["--worker-urls", mock_url, stub_url, "--disable-health-check"]
        with running_gateway(args) as gw:
            base = gw.url
            status, body = request_json(
                "POST", base + "/start_profile", {"num_steps": 3, "output_dir": "/tmp/trace"}
            )
            assert status == 206
            assert body == {
                "status": "partial_success",
                "message": "Profile start: 1 succeeded, 1 failed",
                "workers_profiled": 1,
                "total_workers": 2,
                "successful": [mock_url],
                "failed": [
                    {
                        "worker": stub_url,
                        "error": f"start_profile failed for worker {stub_url}: HTTP 404",
                    }
                ],
            }
            # Only the named worker; stop takes no options.
            status, body = request_json("POST", base + "/stop_profile", {"url": mock_url})
            assert (status, body["message"], body["total_workers"]) == (
                200,
                "Successfully stopped profiling on all 1 workers",
                1,
            )
            status, body = request_json("POST", base + "/stop_profile", {"url": "http://nope:1"})
            assert (status, body["status"], body["message"]) == (
                404,
                "error",
                "No worker matching url 'http://nope:1'",
            )
            status, body = request_json("POST", base + "/start_profile", b"{bad")
            assert status == 400
            assert body["error"]["message"].startswith("Failed to parse the request body as JSON")
        events = stats(mock_url)["profile_events"]
        assert [(e["event"], e["options"]) for e in events] == [
            ("start", {"profile_by_stage": False, "output_dir": "/tmp/trace", "num_steps": 3}),
            ("stop", None),
        ]
    finally:
        stub.terminate()
        stub.wait(10)
        mocks.stop()
