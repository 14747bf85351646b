"""smg.config (launch settings) and smg.workers_spec (admin API worker specs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from smg.config import (
    DEFAULTS,
    ConfigError,
    GatewayConfig,
    build_parser,
    cfg_processes,
    control_plane_keys,
    is_secret_key,
    jwt_role_mapping,
    load_config,
    mask_secret_args,
    model_aliases,
    render_config,
)
from smg.cpus import PROCESS_CAP, cgroup_cpu_limit, default_processes
from smg.worker_url import WorkerAddress, WorkerUrlError, parse_worker_url, worker_address
from smg.workers_spec import (
    SpecError,
    WorkerPatch,
    WorkerSpec,
    apply_worker_patch,
    mask_secret,
    parse_worker_patch,
    parse_worker_spec,
    public_worker_spec,
    validate_worker_spec,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------
# Defaults and precedence


def test_defaults_without_any_layer() -> None:
    cfg = load_config([], env={})
    assert cfg == GatewayConfig()
    assert cfg.host == "0.0.0.0"
    assert cfg.port == 30000
    assert cfg.policy == "cache_aware"  # as the Rust SMG 1.13
    assert cfg.prometheus_port == 29000
    assert cfg.remove_unhealthy_workers is None
    assert cfg.processes is None
    assert cfg.listen_mode == "reuseport"
    assert cfg.worker_table_capacity == 1024


YAML_FILE = """
port: 1111
health-check-interval-secs: 7
log_json: true
worker-urls: [http://file:1]
api-key: from-file
"""

TOML_FILE = """
port = 1111
health-check-interval-secs = 7
log_json = true
worker-urls = ["http://file:1"]
api-key = "from-file"
"""


@pytest.mark.parametrize(("name", "text"), [("c.yaml", YAML_FILE), ("c.toml", TOML_FILE)])
def test_precedence_file_env_flags(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path, name, text)
    env = {
        "SMG_PORT": "2222",
        "SMG_WORKER_URLS": "http://env:1, http://env:2",
        "SMG_API_KEY": "from-env",
        "PATH": "/usr/bin",
    }
    cfg = load_config(["--config", path, "--port", "3333"], env=env)
    assert cfg.port == 3333  # flag beats env and file
    assert cfg.worker_urls == ["http://env:1", "http://env:2"]  # env beats file
    assert cfg.api_key == "from-env"
    assert cfg.health_check_interval_secs == 7  # file beats default
    assert cfg.log_json is True
    # Without env and flags the file values stand.
    cfg = load_config(["--config", path], env={})
    assert (cfg.port, cfg.worker_urls, cfg.api_key) == (1111, ["http://file:1"], "from-file")
    # A flag the user did not give never resets a file value.
    cfg = load_config(["--config", path, "--log-level", "debug"], env={})
    assert cfg.port == 1111 and cfg.log_json is True and cfg.log_level == "debug"


def test_config_file_from_env_and_flag_override(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", "port: 1001\n")
    b = _write(tmp_path, "b.yml", "port: 1002\n")
    assert load_config([], env={"SMG_CONFIG": a}).port == 1001
    assert load_config(["--config", b], env={"SMG_CONFIG": a}).port == 1002
    empty = _write(tmp_path, "empty.yaml", "")
    cfg = load_config(["--config", empty], env={})
    assert cfg.config == empty
    assert msgspec.structs.replace(cfg, config=None) == load_config([], env={})


def test_cli_list_flags_replace_and_accumulate() -> None:
    cfg = load_config(
        ["--worker-urls", "http://a:1", "http://b:2/", "--worker-urls", "http://c:3"],
        env={"SMG_WORKER_URLS": "http://env:1"},
    )
    assert cfg.worker_urls == ["http://a:1", "http://b:2", "http://c:3"]
    cfg = load_config(["--model-alias", "a=m", "--model-alias", "b=m"], env={})
    assert model_aliases(cfg) == {"a": "m", "b": "m"}


def test_env_value_forms() -> None:
    env = {
        "SMG_LOG_JSON": "1",
        "SMG_DISABLE_HEALTH_CHECK": "False",
        "SMG_CORS_ALLOWED_ORIGINS": "http://a.example https://b.example:8443",
        "SMG_HEALTH_CHECK_PORT": "",
        "SMG_PROCESSES": "3",
        "SMG_UPSTREAM_CONNECT_TIMEOUT_SECS": "0.5",
        "SMG_REMOVE_UNHEALTHY_WORKERS": "true",
        "SMG__PROCESS_INDEX": "7",  # reserved for process plumbing: ignored
        "SMG_ZMQ_SOCKET_DIR": "/tmp",  # a Rust SMG engine variable: ignored
        "HOME": "/root",
    }
    cfg = load_config([], env=env)
    assert cfg.log_json is True
    assert cfg.disable_health_check is False
    assert cfg.cors_allowed_origins == ["http://a.example", "https://b.example:8443"]
    assert cfg.health_check_port is None
    assert cfg.processes == 3 and cfg_processes(cfg) == 3
    assert cfg.upstream_connect_timeout_secs == 0.5
    assert cfg.remove_unhealthy_workers is True


def test_file_keys_and_model_alias_mapping(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "c.yaml",
        "model-alias: {gpt-4o: llama-3, fast: llama-3}\nmodel_path: org/model\n",
    )
    cfg = load_config(["--config", path], env={})
    assert model_aliases(cfg) == {"gpt-4o": "llama-3", "fast": "llama-3"}
    assert cfg.model_path == "org/model"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--remove-unhealthy-workers", True),
        ("--worker-auto-recovery", True),
        ("--no-remove-unhealthy-workers", False),
        ("--no-worker-auto-recovery", False),
    ],
)
def test_remove_unhealthy_aliases(flag: str, value: bool) -> None:
    assert load_config([flag], env={}).remove_unhealthy_workers is value


def test_model_alias_of_model_path_and_flags() -> None:
    cfg = load_config(
        ["--model", "org/m", "--print-config", "--listen-mode", "inherit", "--mock-workers", "2"],
        env={},
    )
    assert cfg.model_path == "org/m"
    assert cfg.print_config is True
    assert cfg.listen_mode == "inherit"
    assert cfg.mock_workers == 2


def test_help_lists_flags_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config(["--help"], env={})
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--health-check-interval-secs" in out
    assert "(default: 60)" in out
    assert "--no-worker-auto-recovery" in out
    assert build_parser().prog == "smg launch"


# ---------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("argv", "env", "key", "reason"),
    [
        (["--port", "70000"], {}, "port", "port number 0-65535"),
        (["--port", "abc"], {}, "port", "expected an integer"),
        (["--port"], {}, "port", "expected one argument"),
        (["--health-failure-threshold", "0"], {}, "health_failure_threshold", ">= 1"),
        (["--health-check-interval-secs", "-5"], {}, "health_check_interval_secs", ">= 1"),
        (["--request-timeout-secs", "0"], {}, "request_timeout_secs", "> 0"),
        (["--policy", "passthrough"], {}, "policy", "not implemented yet"),
        (["--policy", "fastest"], {}, "policy", "must be one of"),
        (["--log-level", "verbose"], {}, "log_level", "must be one of"),
        (["--listen-mode", "fork"], {}, "listen_mode", "must be one of"),
        (["--worker-urls", "localhost:8000"], {}, "worker_urls", "lowercase http://"),
        (["--worker-urls", "HTTP://h:1"], {}, "worker_urls", "lowercase http://"),
        (["--worker-urls", "grpc://h"], {}, "worker_urls", "explicit port"),
        (["--worker-urls", "http://u:pw@h:1"], {}, "worker_urls", "credentials"),
        (["--worker-urls", "http://h:1", "http://h:1/"], {}, "worker_urls", "listed twice"),
        (["--worker-urls", "http://h:99999"], {}, "worker_urls", "invalid port"),
        (["--worker-urls", "http://h:8000/a%zz"], {}, "worker_urls", "request target cannot"),
        ([], {"SMG_WORKER_URLS": "grpc://h:8000/v1"}, "worker_urls", "cannot have a path"),
        (["--model-alias", "nonsense"], {}, "model_alias", "<alias>=<canonical>"),
        (["--model-alias", "a=a"], {}, "model_alias", "must differ"),
        (["--model-alias", "a=b", "--model-alias", "a=c"], {}, "model_alias", "maps to both"),
        (["--processes", "0"], {}, "processes", ">= 1"),
        (["--queue-size", "5", "--queue-timeout-secs", "0"], {}, "queue_timeout_secs", "> 0"),
        (["--least-load-default-throughput", "nan"], {}, "least_load_default_throughput", "finite"),
        (["--max-concurrent-requests", "-2"], {}, "max_concurrent_requests", ">= -1"),
        (["--api-key", "abc\r\nX-Evil: 1"], {}, "api_key", "visible ASCII"),
        (["--health-check-port", "0"], {}, "health_check_port", "1-65535"),
        (["--prometheus-port", "30000"], {}, "prometheus_port", "must differ from port"),
        (["--cors-allowed-origins", "*", "http://a"], {}, "cors_allowed_origins", "only"),
        (["--cors-allowed-origins", "a.example"], {}, "cors_allowed_origins", "not an origin"),
        (["--health-check-endpoint", "health"], {}, "health_check_endpoint", "starting with"),
        (["--mock-worker-args", "--x 'open"], {}, "mock_worker_args", "cannot be split"),
        (["--host", "not a host"], {}, "host", "IP address or hostname"),
        (
            ["--worker-table-capacity", "1", "--worker-urls", "http://a:1", "http://b:1"],
            {},
            "worker_table_capacity",
            "cannot hold 2",
        ),
        (
            ["--no-remove-unhealthy-workers", "--worker-auto-recovery"],
            {},
            "remove_unhealthy_workers",
            "not allowed with",
        ),
        (["--bogus-flag"], {}, "--bogus-flag", "unknown flag"),
        (["--block-size", "16"], {}, "--block-size", "unknown flag"),
        (["--cache-threshold", "1.5"], {}, "cache_threshold", "<= 1.0"),
        (["--balance-rel-threshold", "0.5"], {}, "balance_rel_threshold", ">= 1.0"),
        (["--assignment-mode", "sticky"], {}, "assignment_mode", "must be one of"),
        ([], {"SMG_LOG_JSON": "maybe"}, "log_json", "boolean"),
        ([], {"SMG_PORT": "8o80"}, "port", "expected an integer"),
        (
            [],
            {"SMG_HEALTH_CHECK_INTERVAL": "5"},
            "SMG_HEALTH_CHECK_INTERVAL",
            "did you mean SMG_HEALTH_CHECK_INTERVAL_SECS",
        ),
        ([], {"SMG_NOT_A_SETTING": "1"}, "SMG_NOT_A_SETTING", "unknown setting"),
    ],
)
def test_bad_values_refused(argv: list[str], env: dict[str, str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(argv, env=env)
    assert exc.value.key == key
    assert reason in exc.value.reason
    assert str(exc.value).startswith(f"{key}: ")


def test_error_names_its_source(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "health-failure-threshold: 0\n")
    with pytest.raises(ConfigError, match=r"health_failure_threshold: must be >= 1") as exc:
        load_config(["--config", path], env={})
    assert exc.value.source is not None and "c.yaml" in exc.value.source
    with pytest.raises(ConfigError) as exc:
        load_config([], env={"SMG_HEALTH_FAILURE_THRESHOLD": "0"})
    assert exc.value.source == "environment variable SMG_HEALTH_FAILURE_THRESHOLD"
    with pytest.raises(ConfigError) as exc:
        load_config(["--health-failure-threshold", "0"], env={})
    assert exc.value.source == "flag --health-failure-threshold"


@pytest.mark.parametrize(
    ("name", "text", "key", "reason"),
    [
        ("c.yaml", "health-check-intervall-secs: 5\n", "health-check-intervall-secs", "did you"),
        ("c.yaml", "frobnicate: 1\n", "frobnicate", "unknown setting"),
        ("c.toml", "frobnicate = 1\n", "frobnicate", "unknown setting"),
        ("c.yaml", 'port: "8080"\n', "port", "Expected `int`"),
        ("c.yaml", "worker-urls: http://a:1\n", "worker_urls", "Expected `array`"),
        ("c.yaml", "log-json: 1\n", "log_json", "Expected `bool`"),
        ("c.yaml", "port: 1\nport_: 2\n", "port_", "unknown setting"),
        ("c.yaml", "port: 1\n'port': 2\n", "port", "set twice"),
        ("c.yaml", "health-check-port: 1\nhealth_check_port: 2\n", "health_check_port", "twice"),
        ("c.yaml", "config: other.yaml\n", "config", "another config file"),
        ("c.yaml", "- a\n- b\n", "config", "mapping"),
        ("c.yaml", "port: [1\n", "config", "not valid YAML"),
        ("c.toml", "port = \n", "config", "not valid TOML"),
        ("c.json", "{}", "config", ".yaml, .yml or .toml"),
        ("c.yaml", "policy: passthrough\n", "policy", "not implemented yet"),
        ("c.yaml", 'worker-urls: ["http://a:1/%zz"]\n', "worker_urls", "request target cannot"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, text: str, key: str, reason: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(ConfigError) as exc:
        load_config(["--config", path], env={})
    assert exc.value.key == key
    assert reason in exc.value.reason


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(["--config", str(tmp_path / "absent.yaml")], env={})
    assert exc.value.key == "config" and "cannot read" in exc.value.reason


# ---------------------------------------------------------------------------------------
# Rendering and secrets


def test_render_masks_secrets_and_round_trips(tmp_path: Path) -> None:
    secret = "sk-live-0123456789abcdef"
    cfg = load_config(
        ["--api-key", secret, "--worker-urls", "http://w:8000", "--tokenizer-path", "/tok"],
        env={},
    )
    text = render_config(cfg)
    assert secret not in text
    assert "0123456789" not in text
    data = yaml.safe_load(text)
    assert data["api-key"] == "sk-***"
    assert data["tokenizer-path"] == "/tok"  # not a credential despite its name
    assert data["worker-urls"] == ["http://w:8000"]
    assert set(data) == {f.replace("_", "-") for f in DEFAULTS} - {"config", "print-config"}
    # The output is a config file: loading it gives the same config (bar the masked key).
    path = _write(tmp_path, "effective.yaml", text)
    again = load_config(["--config", path], env={})
    assert msgspec.structs.replace(again, api_key=secret, config=None) == cfg


def test_render_masks_secrets_in_mock_worker_args() -> None:
    secret = "sk-mock-0123456789abcdef"
    args = f"--ttft-ms 5 --api-key {secret} --model 'a b' --auth-token=tok3n --api-key=short"
    cfg = load_config(["--mock-workers", "1", "--mock-worker-args", args], env={})
    text = render_config(cfg)
    assert secret not in text and "0123456789" not in text and "tok3n" not in text
    shown = yaml.safe_load(text)["mock-worker-args"]
    assert (
        shown == "--ttft-ms 5 --api-key 'sk-***' --model 'a b' '--auth-token=***' '--api-key=***'"
    )
    # What runs is unmasked: only the rendering changes.
    assert cfg.mock_worker_args == args


def test_mask_secret_args_edges() -> None:
    assert mask_secret_args("") == ""
    assert mask_secret_args("--api-key") == "--api-key"  # no value to mask
    assert mask_secret_args("--tokenizer-path /t --seed 3") == "--tokenizer-path /t --seed 3"
    assert mask_secret_args("--x 'open") == "***"  # unparseable: masked whole


def test_mask_secret_and_secret_names() -> None:
    assert mask_secret(None) is None
    assert mask_secret("") == ""
    assert mask_secret("hunter2") == "***"
    assert mask_secret("sk-abcdefghijklmnop") == "sk-***"
    for name in ("api_key", "client_secret", "oracle-password", "auth_token", "api_keys"):
        assert is_secret_key(name), name
    for name in ("tokenizer_path", "least_load_mean_prefill_tokens", "keyboard", "monkey_path"):
        assert not is_secret_key(name), name


# ---------------------------------------------------------------------------------------
# Processes


def test_default_processes_bounds() -> None:
    n = default_processes()
    assert 1 <= n <= PROCESS_CAP
    assert n <= len(os.sched_getaffinity(0))
    assert cfg_processes(GatewayConfig()) == n
    assert cfg_processes(GatewayConfig(processes=5)) == 5


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset is not installed")
def test_default_processes_respects_affinity() -> None:
    code = "from smg.cpus import default_processes; print(default_processes())"
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "1"


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_quota_tightest_ancestor(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "cg/cpu.max": "max 100000\n",
            "cg/parent/cpu.max": "250000 100000\n",
            "cg/parent/child/cpu.max": "max 100000\n",
            "self": "0::/parent/child\n",
        },
    )
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "self") == 2.5


def test_cgroup_v2_namespaced_and_unlimited(tmp_path: Path) -> None:
    # In a container the listed path is not under the mount: the mount root is read.
    _tree(tmp_path, {"cg/cpu.max": "150000 100000\n", "self": "0::/host/path\n"})
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "self") == 1.5
    _tree(tmp_path, {"cg2/cpu.max": "max 100000\n", "self2": "0::/\n"})
    assert cgroup_cpu_limit(tmp_path / "cg2", tmp_path / "self2") is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "cg/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000\n",
            "cg/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            "cg/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cg/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "self": "4:memory:/docker/x\n2:cpu,cpuacct:/docker/x\n0::/\n",
        },
    )
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "self") == 0.5


def test_cgroup_missing_files(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "nofile") is None


# ---------------------------------------------------------------------------------------
# Worker specs


def test_worker_spec_defaults_match_rust() -> None:
    spec = parse_worker_spec(b'{"url": "http://10.0.0.1:8000/"}')
    assert spec.url == "http://10.0.0.1:8000"
    assert spec.worker_type == "regular"
    assert spec.connection_mode == "http"
    assert spec.priority == 50
    assert spec.cost == 1.0
    assert spec.labels == {}
    assert spec.model_id is None and spec.api_key is None and spec.bootstrap_port is None


def test_worker_spec_full() -> None:
    body = (
        b'{"url": "grpc://[::1]:9000", "model_id": "org/m", "worker_type": "prefill",'
        b' "api_key": "sk-0123456789abcdef", "labels": {"zone": "a"}, "priority": 7,'
        b' "cost": 2, "bootstrap_port": 8998, "connection_mode": "grpc",'
        b' "health": {"timeout_secs": 3, "disable_health_check": false}}'
    )
    spec = parse_worker_spec(body)
    assert spec.connection_mode == "grpc"
    assert spec.cost == 2.0
    assert spec.health is not None and spec.health.timeout_secs == 3
    public = public_worker_spec(spec)
    assert "api_key" not in public
    assert public["health"] == {"timeout_secs": 3, "disable_health_check": False}
    assert public["bootstrap_port"] == 8998


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        (b"{", "body", "not valid JSON"),
        (b"[]", "body", "Expected `object`"),
        (b"{}", "url", "is required"),
        (b'{"url": 5}', "url", "Expected `str`"),
        (b'{"url": ""}', "url", "non-empty"),
        (b'{"url": "10.0.0.1:8000"}', "url", "lowercase http://"),
        (b'{"url": "ftp://h:1"}', "url", "lowercase http://"),
        (b'{"url": "ipc:///tmp/x"}', "url", "not supported"),
        (b'{"url": "grpc://h"}', "url", "explicit port"),
        (b'{"url": "http://:8000"}', "url", "no host"),
        (b'{"url": "http://h:1?x=1"}', "url", "query"),
        (b'{"url": "http://h:1/a%zz"}', "url", "request target cannot"),
        (b'{"url": "grpc://h:1/v1/"}', "url", "cannot have a path"),
        (b'{"url": "http://h:1/a\\"b}"}', "url", "request target cannot"),
        (b'{"url": "http://h:1", "priority": -1}', "priority", "0-4294967295"),
        (b'{"url": "http://h:1", "priority": "high"}', "priority", "Expected `int`"),
        (b'{"url": "http://h:1", "priority": true}', "priority", "Expected `int`"),
        (b'{"url": "http://h:1", "cost": -0.5}', "cost", ">= 0"),
        (b'{"url": "http://h:1", "worker_type": "Regular"}', "worker_type", "must be one of"),
        (b'{"url": "http://h:1", "connection_mode": "grpc"}', "connection_mode", "does not match"),
        (b'{"url": "http://h:1", "connection_mode": "zmq"}', "connection_mode", "zmq"),
        (b'{"url": "http://h:1", "bootstrap_port": 9000}', "bootstrap_port", "prefill and encode"),
        (
            b'{"url": "http://h:1", "worker_type": "prefill", "bootstrap_port": 0}',
            "bootstrap_port",
            "1-65535",
        ),
        (b'{"url": "http://h:1", "api_key": " k"}', "api_key", "visible ASCII"),
        (b'{"url": "http://h:1", "api_key": "a\\nb"}', "api_key", "visible ASCII"),
        (b'{"url": "http://h:1", "model_id": ""}', "model_id", "non-empty"),
        (b'{"url": "http://h:1", "labels": {"": "x"}}', "labels", "label key"),
        (b'{"url": "http://h:1", "labels": {"a": 1}}', "labels", "Expected `str`"),
        (
            b'{"url": "http://h:1", "health": {"failure_threshold": 0}}',
            "health.failure_threshold",
            ">= 1",
        ),
        (b'{"url": "http://h:1", "health": {"bogus": 1}}', "health.bogus", "unknown field"),
        (b'{"url": "http://h:1", "colour": "red"}', "colour", "unknown field"),
        (b'{"url": "http://h:1", "models": []}', "models", "model_id"),
        (b'{"url": "http://h:1", "dp_rank": 1}', "dp_rank", "does not support"),
        (b'{"url": "http://h:1", "runtime_type": "bogus"}', "runtime_type", "must be one of"),
    ],
)
def test_worker_spec_refusals(body: bytes, key: str, reason: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_worker_spec(body)
    assert isinstance(exc.value, ConfigError)
    assert exc.value.key == key
    assert reason in exc.value.reason


def test_worker_address_is_the_one_parsed_form() -> None:
    assert parse_worker_url("http://w:8000/") == WorkerAddress("http://w:8000", "http", "w", 8000)
    https = parse_worker_url("https://api.example.com")
    assert (https.host, https.port, https.tls, https.host_header) == (
        "api.example.com",
        443,
        True,
        "api.example.com",
    )
    v6 = parse_worker_url("http://[::1]:9000")
    assert (v6.host, v6.port, v6.tls, v6.host_header) == ("::1", 9000, False, "[::1]:9000")
    assert parse_worker_url("http://w").port == 80
    assert parse_worker_url("http://w:80").host_header == "w"
    assert worker_address("http://w:8000") is worker_address("http://w:8000")
    prefixed = parse_worker_url("http://w:8000/prefix/v1/")
    assert (prefixed.url, prefixed.path) == ("http://w:8000/prefix/v1", "/prefix/v1")
    for bad in ("http://w:8000/a%zz", "grpc://w:8000/v1/", "http://w:8000?", "http://w:1#f"):
        with pytest.raises(WorkerUrlError):
            parse_worker_url(bad)


def test_validate_worker_spec_on_constructed_spec() -> None:
    spec = validate_worker_spec(WorkerSpec(url="https://api.example.com/"))
    assert spec.url == "https://api.example.com" and spec.connection_mode == "http"
    with pytest.raises(SpecError, match="priority"):
        validate_worker_spec(WorkerSpec(url="http://h:1", priority=2**32))
    with pytest.raises(SpecError, match="cost"):
        validate_worker_spec(WorkerSpec(url="http://h:1", cost=float("inf")))


def test_worker_patch() -> None:
    spec = parse_worker_spec(
        b'{"url": "http://h:1", "labels": {"a": "1"}, "api_key": "old-key",'
        b' "health": {"failure_threshold": 4}}'
    )
    patch = parse_worker_patch(
        b'{"priority": 9, "labels": {"b": "2"}, "health": {"timeout_secs": 2}}'
    )
    new = apply_worker_patch(spec, patch)
    assert new.priority == 9 and new.cost == 1.0
    assert new.labels == {"a": "1", "b": "2"}  # merged, as in Rust
    assert new.api_key == "old-key"
    assert new.health is not None
    assert (new.health.failure_threshold, new.health.timeout_secs) == (4, 2)
    assert spec.labels == {"a": "1"}  # the original is untouched
    rotated = apply_worker_patch(spec, parse_worker_patch(b'{"api_key": "new-key"}'))
    assert rotated.api_key == "new-key"
    assert apply_worker_patch(spec, WorkerPatch()) == spec


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        (b'{"url": "http://x:1"}', "url", "use PUT"),
        (b'{"worker_type": "decode"}', "worker_type", "use PUT"),
        (b'{"priority": -3}', "priority", "0-4294967295"),
        (b'{"cost": "cheap"}', "cost", "Expected `float | null`, got `str`"),
        (b'{"api_key": ""}', "api_key", "visible ASCII"),
        (b'{"health": {"check_interval_secs": 0}}', "health.check_interval_secs", ">= 1"),
        (b'{"nope": 1}', "nope", "unknown field"),
    ],
)
def test_worker_patch_refusals(body: bytes, key: str, reason: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_worker_patch(body)
    assert exc.value.key == key
    assert reason in exc.value.reason


def test_issue8_flags_are_validated_and_keys_masked(tmp_path: Path) -> None:
    cfg = load_config(
        [
            "--control-plane-api-keys",
            "ops:Operations:admin:admin-secret-0123456789",
            "ro:Read Only:user:user:key:with:colons",
            "--jwt-issuer",
            "https://idp.example",
            "--jwt-audience",
            "smg",
            "--jwt-role-mapping",
            "Gateway.Admin=admin",
        ],
        env={},
    )
    assert [(e.id, e.role, e.key) for e in control_plane_keys(cfg)] == [
        ("ops", "admin", "admin-secret-0123456789"),
        ("ro", "user", "user:key:with:colons"),
    ]
    assert jwt_role_mapping(cfg) == {"Gateway.Admin": "admin"}
    text = render_config(cfg)
    assert "admin-secret-0123456789" not in text and "with:colons" not in text
    for argv in (
        ["--control-plane-api-keys", "ops:Ops:root:k"],  # unknown role
        ["--control-plane-api-keys", "ops:Ops:admin"],  # no key
        ["--control-plane-api-keys", "a:A:admin:k", "a:B:user:k2"],  # id twice
        ["--jwt-audience", "smg"],  # no issuer
        ["--jwt-issuer", "https://idp", "--jwt-role-mapping", "X=root"],
        ["--tls-cert-path", str(tmp_path / "missing.pem"), "--tls-key-path", "x"],
        ["--otlp-traces-endpoint", "collector"],
    ):
        with pytest.raises(ConfigError):
            load_config(argv, env={})
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="needs --tls-key-path"):
        load_config(["--tls-cert-path", str(cert)], env={})
    assert load_config(["--otlp-traces-endpoint", "http://127.0.0.1:4318/v1/traces"], env={})
