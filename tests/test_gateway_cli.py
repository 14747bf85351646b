"""The command line as a user meets it: version, --print-config, the dedicated probe port."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
from gatewayutil import Gateway, free_port


def _smg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smg", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    result = _smg("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("smg ")


def test_print_config_masks_secrets_and_exits() -> None:
    result = _smg(
        "launch",
        "--print-config",
        "--api-key",
        "sk-very-secret-worker-key-123",
        "--worker-urls",
        "http://127.0.0.1:9",
    )
    assert result.returncode == 0, result.stderr
    assert "sk-very-secret-worker-key-123" not in result.stdout
    assert "api-key" in result.stdout or "api_key" in result.stdout
    assert "http://127.0.0.1:9" in result.stdout


def test_health_check_port_answers_probes_on_its_own_listener() -> None:
    probe_port = free_port()
    gw = Gateway(["--mock-workers", "1", "--health-check-port", str(probe_port)], processes=1)
    gw.start()
    try:
        gw.wait_ready()
        probe = f"http://127.0.0.1:{probe_port}"
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline:
            status = httpx.get(probe + "/readiness", timeout=2).status_code
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200
        assert httpx.get(probe + "/liveness", timeout=2).status_code == 200
        # Inference is not served there.
        assert httpx.post(probe + "/v1/completions", json={}, timeout=2).status_code == 404
    finally:
        gw.stop()
        gw.close_log()


def test_admin_answers_carry_one_content_type_and_the_process_header() -> None:
    gw = Gateway(["--mock-workers", "1"], processes=1)
    gw.start()
    try:
        gw.wait_ready()
        for method, path in (("GET", "/workers"), ("GET", "/get_loads"), ("POST", "/workers")):
            response = gw.admin(method, path, content=b"{}" if method == "POST" else None)
            assert response.headers.get_list("content-type") == ["application/json"], path
            assert response.headers["x-smg-process"] == "0"
    finally:
        gw.stop()
        gw.close_log()
