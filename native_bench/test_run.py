"""Tests of the runner's command lines and argument checks (no process is started)."""

from __future__ import annotations

import ssl

import pytest
from run import GatewaySpec, TlsFiles, parse_args


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
        ["--tls", "--max-client", "loadgen"],  # loadgen speaks plain HTTP only
        ["--api-key", "k", "--max-client", "loadgen"],
        ["--api-key", " "],
        ["--stub-cores", "8-11"],  # without --client-cores
        ["--stub-cores", "8-11", "--client-cores", "12-15"],  # without --gateway-cores
        [
            "--gateway-cores",
            "0",
            "--load-cores",
            "8-15",
            "--stub-cores",
            "8",
            "--client-cores",
            "9",
        ],
    ],
)
def test_parse_args_rejects_bad_input(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_tls_and_api_key_flags() -> None:
    args = parse_args(["--tls", "--api-key", "k1"])
    assert (args.tls, args.api_key) == (True, "k1")
    assert parse_args([]).tls is False and parse_args([]).api_key is None


def test_tls_files_are_a_usable_pair_for_127_0_0_1() -> None:
    from smg.tlsconf import load_server_tls

    files = TlsFiles.make()
    try:
        material = load_server_tls(str(files.cert), str(files.key))
        assert material.cert_pem.count(b"BEGIN CERTIFICATE") >= 1
        assert files.args() == [
            "--tls-cert-path",
            str(files.cert),
            "--tls-key-path",
            str(files.key),
        ]
        assert files.client.verify_mode == ssl.CERT_REQUIRED
    finally:
        files.remove()
    assert not files.directory.exists()


def test_scaling_steps_become_run_py_layouts_on_16_cores() -> None:
    import alllib
    from run import layout_from_args

    for step in alllib.scaling_plan(range(16)).steps:
        args = parse_args(["--gateways", "smg,rust", "--payloads", "chat", *step.run_args()])
        lay = layout_from_args(args, range(16))
        assert (lay.gateway, lay.stub, lay.client) == (step.gateway, step.stub, step.client)
        assert (lay.stub_threads, lay.client_threads) == (4, 4)
        assert args.smg_processes == step.processes
    # The same flags on a 2-core machine are refused with a clear message.
    step = alllib.scaling_plan(range(16)).steps[0]
    with pytest.raises(ValueError, match="not available"):
        layout_from_args(parse_args(step.run_args()), range(2))
