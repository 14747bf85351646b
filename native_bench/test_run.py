"""Tests of the runner's command lines and argument checks (no process is started)."""

from __future__ import annotations

import pytest
from run import GatewaySpec, parse_args


def test_rust_command_line_keeps_defaults_and_binds_loopback() -> None:
    spec = GatewaySpec("rust", ["/v/bin/smg"], [])
    argv = spec.argv("http://127.0.0.1:9000", 8000, 8001)
    assert argv == [
        "/v/bin/smg",
        "launch",
        "--worker-urls",
        "http://127.0.0.1:9000",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--policy",
        "round_robin",
        "--log-level",
        "warn",
        "--prometheus-port",
        "8001",
        "--prometheus-host",
        "127.0.0.1",
    ]


def test_our_command_line_has_processes_and_extra_args() -> None:
    spec = GatewaySpec(
        "smg", ["py", "-m", "smg"], ["--foo", "1"], prometheus_host=False, processes=2
    )
    argv = spec.argv("http://127.0.0.1:9000", 8000, 8001)
    assert argv[:3] == ["py", "-m", "smg"]
    assert argv[argv.index("--processes") + 1] == "2"
    assert "--prometheus-host" not in argv
    assert argv[-2:] == ["--foo", "1"]


def test_parse_args_defaults() -> None:
    args = parse_args([])
    assert args.gateways == ["direct", "smg", "rust"]
    assert args.payloads == ["chat", "completion", "stream"]
    assert (args.rounds, args.duration, args.connections) == (5, 10, 64)
    assert args.fixed_rate_fraction == 0.5
    assert args.fixed_duration == args.duration


@pytest.mark.parametrize(
    "argv",
    [
        ["--gateways", "direct,nginx"],
        ["--gateways", "rust,rust"],
        ["--payloads", "chat,embeddings"],
        ["--rounds", "0"],
    ],
)
def test_parse_args_rejects_bad_input(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
