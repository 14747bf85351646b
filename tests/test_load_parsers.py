"""Load and identity parsers against hand-written samples of each engine's output.

The samples are written for these tests from the formats in the engines' sources (SGLang
`entrypoints/v1_loads.py`, `managers/io_struct.py`, `metrics/collector.py`,
`entrypoints/http_server.py`; vLLM `v1/metrics/loggers.py`); they are not copied output.
"""

from __future__ import annotations

import math
import random

import orjson
import pytest

from smg.control import load_parsers as lp
from smg.control.load_parsers import LoadParseError
from smg.policies.base import BackendLoad

# --- samples ---------------------------------------------------------------------------

SGLANG_V1_LOADS = orjson.dumps(
    {
        "timestamp": "2026-03-02T10:15:00.123456+00:00",
        "version": "0.5.6",
        "accelerator": "NVIDIA H100 80GB HBM3",
        "num_accelerators": 1,
        "loads": [
            {
                "dp_rank": 0,
                "timestamp": 1772446500.1,
                "num_running_reqs": 5,
                "num_waiting_reqs": 2,
                "num_waiting_uncached_tokens": 1500,
                "num_used_tokens": 12000,
                "num_total_tokens": 12800,
                "max_total_num_tokens": 100000,
                "token_usage": 0.12,
                "gen_throughput": 850.5,
                "cache_hit_rate": 0.4,
                "utilization": 0.3,
                "max_running_requests": 256,
                "queues": {"waiting": 2, "grammar": 0, "paused": 0, "retracted": 0},
            },
            {
                "dp_rank": 1,
                "timestamp": 1772446500.1,
                "num_running_reqs": 3,
                "num_waiting_reqs": 0,
                "num_waiting_uncached_tokens": 0,
                "num_used_tokens": 30000,
                "num_total_tokens": 30000,
                "max_total_num_tokens": 100000,
                "token_usage": 0.30,
                "gen_throughput": 400.0,
                "cache_hit_rate": 0.1,
                "utilization": 0.2,
                "max_running_requests": 256,
            },
        ],
    }
)

# The shape the Rust SMG's mock worker serves (crates/mock_worker/src/http.rs).
SGLANG_V1_LOADS_OLD = orjson.dumps(
    {
        "timestamp": "",
        "dp_rank_count": 1,
        "loads": [
            {
                "dp_rank": 0,
                "num_running_reqs": 4,
                "num_waiting_reqs": 1,
                "num_waiting_uncached_tokens": 0,
                "num_total_reqs": 5,
                "num_used_tokens": 2000,
                "max_total_num_tokens": 1000000,
                "token_usage": 0.002,
                "gen_throughput": 0.0,
                "cache_hit_rate": 0.0,
                "utilization": 0.002,
                "max_running_requests": 0,
            }
        ],
    }
)

SGLANG_GET_LOAD = orjson.dumps(
    [
        {
            "dp_rank": 0,
            "num_reqs": 7,
            "num_waiting_reqs": 2,
            "num_tokens": 5000,
            "num_pending_tokens": 100,
            "ts_tic": 812.5,
        },
        {"dp_rank": 1, "num_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 800},
    ]
)

SGLANG_METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 6.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 2.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 0.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 0.5
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 0.25
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{dp_rank="0",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 1200.25
sglang:gen_throughput{dp_rank="1",engine_type="unified",model_name="qwen/qwen3-8b",pp_rank="0",tp_rank="0"} 300.0
# HELP sglang:e2e_request_latency_seconds Histogram of End-to-end request latency in seconds
# TYPE sglang:e2e_request_latency_seconds histogram
sglang:e2e_request_latency_seconds_bucket{le="0.1",model_name="qwen/qwen3-8b"} 0.0
sglang:e2e_request_latency_seconds_bucket{le="+Inf",model_name="qwen/qwen3-8b"} 17.0
sglang:e2e_request_latency_seconds_sum{model_name="qwen/qwen3-8b"} 40.5
sglang:e2e_request_latency_seconds_count{model_name="qwen/qwen3-8b"} 17.0
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="qwen/qwen3-8b"} 52311.0
"""

# v0.5.4+ spelling, single rank, no throughput gauge.
SGLANG_METRICS_UNDERSCORE = """\
# TYPE sglang_num_running_reqs gauge
sglang_num_running_reqs{model_name="m",tp_rank="0"} 9
# TYPE sglang_num_queue_reqs gauge
sglang_num_queue_reqs{model_name="m",tp_rank="0"} 4
# TYPE sglang_token_usage gauge
sglang_token_usage{model_name="m",tp_rank="0"} 0.75
"""

# /v1/loads?format=prometheus (v1_loads.py `_format_loads_prometheus`).
SGLANG_LOADS_PROMETHEUS = """\
# TYPE sglang_num_running_reqs gauge
sglang_num_running_reqs{dp_rank="0"} 2
sglang_num_running_reqs{dp_rank="1"} 3
# TYPE sglang_num_waiting_reqs gauge
sglang_num_waiting_reqs{dp_rank="0"} 1
sglang_num_waiting_reqs{dp_rank="1"} 1
# TYPE sglang_token_usage gauge
sglang_token_usage{dp_rank="0"} 0.1
sglang_token_usage{dp_rank="1"} 0.3
# TYPE sglang_gen_throughput gauge
sglang_gen_throughput{dp_rank="0"} 10.0
sglang_gen_throughput{dp_rank="1"} 20.0
"""

VLLM_V1_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 11.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.2
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 918273.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 812.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 91.2
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 812.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12040.0
"""

VLLM_V0_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="facebook/opt-125m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="facebook/opt-125m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="facebook/opt-125m"} 0.055
# TYPE vllm:avg_generation_throughput_toks_per_s gauge
vllm:avg_generation_throughput_toks_per_s{model_name="facebook/opt-125m"} 96.3
"""

SGLANG_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {
                "id": "qwen/qwen3-8b",
                "object": "model",
                "created": 1772446500,
                "owned_by": "sglang",
                "root": "qwen/qwen3-8b",
                "max_model_len": 40960,
            }
        ],
    }
)

VLLM_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {
                "id": "llama-8b",
                "object": "model",
                "created": 1772446500,
                "owned_by": "vllm",
                "root": "/models/Llama-3.1-8B-Instruct",
                "parent": None,
                "max_model_len": 131072,
                "permission": [{"id": "modelperm-1", "object": "model_permission"}],
            },
            {
                "id": "sql-lora",
                "object": "model",
                "created": 1772446500,
                "owned_by": "vllm",
                "root": "/adapters/sql",
                "parent": "llama-8b",
                "max_model_len": None,
            },
        ],
    }
)

OPENAI_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
            {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
        ],
    }
)

SGLANG_SERVER_INFO = orjson.dumps(
    {
        "model_path": "qwen/qwen3-8b",
        "tokenizer_path": "qwen/qwen3-8b",
        "served_model_name": "qwen/qwen3-8b",
        "tp_size": 2,
        "dp_size": 1,
        "pp_size": 1,
        "load_balance_method": "round_robin",
        "disaggregation_mode": "null",
        "context_length": None,
        "max_total_tokens": 181920,
        "max_running_requests": 256,
        "is_embedding": False,
        "mem_fraction_static": 0.85,
        "internal_states": [{"avg_spec_accept_length": None, "last_gen_throughput": 0.0}],
        "version": "0.5.6",
    }
)


# --- Prometheus text ---------------------------------------------------------------------


def test_prometheus_labels_escapes_and_special_values() -> None:
    text = (
        "# HELP x something\n"
        "\n"
        'a{path="C:\\\\dir",msg="say \\"hi\\"",nl="1\\n2"} 1.5\n'
        'b{v="a } b, c=\\"d\\""} -2 1700000000000\n'
        "c NaN\n"
        "d +Inf\n"
        "e -Inf\n"
        "f{} 3e+02\n"
        'g{a="1",} 7\n'
        "   h   8   \n"
        'i{a="x"} 1 # {trace_id="abc"} 0.5 1.0\n'
        "# EOF\n"
    )
    s = lp.parse_prometheus_text(text)
    assert s["a"] == [({"path": "C:\\dir", "msg": 'say "hi"', "nl": "1\n2"}, 1.5)]
    assert s["b"] == [({"v": 'a } b, c="d"'}, -2.0)]
    assert math.isnan(s["c"][0][1])
    assert s["d"][0][1] == math.inf and s["e"][0][1] == -math.inf
    assert s["f"] == [({}, 300.0)]
    assert s["g"] == [({"a": "1"}, 7.0)]
    assert s["h"] == [({}, 8.0)]
    assert s["i"] == [({"a": "x"}, 1.0)]
    assert set(s) == set("abcdefghi")


def test_prometheus_skips_malformed_lines() -> None:
    text = (
        "good 1\n"
        'unterminated{a="x 2\n'
        "novalue\n"
        "bad_value abc\n"
        "under 1_000\n"
        "9starts_with_digit 3\n"
        'nolabelname{="x"} 4\n'
        "<html><body>oops</body></html>\n"
        'glued{a="b"}5\n'
        "good 2\n"
    )
    assert lp.parse_prometheus_text(text) == {"good": [({}, 1.0), ({}, 2.0)]}


def test_prometheus_name_filter() -> None:
    text = 'a{x="1"} 1\nb 2\na{x="2"} 3\nc{broken 4\n'
    assert lp.parse_prometheus_text(text, names={"a", "c"}) == {
        "a": [({"x": "1"}, 1.0), ({"x": "2"}, 3.0)]
    }
    assert lp.parse_prometheus_text(text, names=()) == {}


# --- load parsers on real shapes --------------------------------------------------------


def test_sglang_v1_loads_sums_dp_ranks() -> None:
    load = lp.parse_sglang_loads(SGLANG_V1_LOADS)
    assert load.valid and (load.running, load.waiting) == (8, 2)
    assert load.token_usage == pytest.approx(0.21)
    assert load.throughput == pytest.approx(1250.5)
    assert load.waiting_tokens == 1500


def test_sglang_v1_loads_old_shape() -> None:
    load = lp.parse_sglang_loads(SGLANG_V1_LOADS_OLD)
    assert load == BackendLoad(running=4, waiting=1, token_usage=0.002, throughput=0.0, valid=True)


def test_sglang_v1_loads_optional_hints_never_fail_the_scrape() -> None:
    body = orjson.dumps(
        {
            "loads": [
                {
                    "num_running_reqs": 1,
                    "num_waiting_reqs": 2,
                    "token_usage": 0.5,
                    "gen_throughput": "fast",
                    "num_waiting_uncached_tokens": -4,
                },
                {
                    "num_running_reqs": 1,
                    "num_waiting_reqs": 0,
                    "token_usage": 0.5,
                    "gen_throughput": None,
                    "num_waiting_uncached_tokens": 10**12,
                },
            ]
        }
    )
    load = lp.parse_sglang_loads(body)
    assert (load.running, load.waiting, load.throughput) == (2, 2, 0.0)
    assert load.waiting_tokens == lp.MAX_COUNT  # capped


def test_sglang_get_load() -> None:
    load = lp.parse_sglang_get_load(SGLANG_GET_LOAD)
    # num_reqs counts running + waiting.
    assert load == BackendLoad(running=6, waiting=2, token_usage=0.0, throughput=0.0, valid=True)
    one = lp.parse_sglang_get_load(b'{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1}')
    assert (one.running, one.waiting) == (2, 1)


def test_sglang_metrics_colon_prefix() -> None:
    load = lp.parse_sglang_metrics(SGLANG_METRICS.encode())
    assert load.valid and (load.running, load.waiting) == (8, 3)
    assert load.token_usage == pytest.approx(0.375)
    assert load.throughput == pytest.approx(1500.25)


def test_sglang_metrics_underscore_prefix_and_loads_prometheus() -> None:
    load = lp.parse_sglang_metrics(SGLANG_METRICS_UNDERSCORE)
    assert (load.running, load.waiting, load.token_usage, load.throughput) == (9, 4, 0.75, 0.0)
    load = lp.parse_sglang_metrics(SGLANG_LOADS_PROMETHEUS)
    assert (load.running, load.waiting) == (5, 2)
    assert load.token_usage == pytest.approx(0.2)
    assert load.throughput == pytest.approx(30.0)


def test_vllm_v1_metrics_sums_engines() -> None:
    load = lp.parse_vllm_metrics(VLLM_V1_METRICS.encode())
    assert load.valid and (load.running, load.waiting) == (20, 5)
    assert load.token_usage == pytest.approx(0.3)
    assert load.throughput == 0.0  # v1 has no throughput gauge


def test_vllm_v0_metrics() -> None:
    load = lp.parse_vllm_metrics(VLLM_V0_METRICS)
    assert (load.running, load.waiting) == (3, 0)
    assert load.token_usage == pytest.approx(0.055)
    assert load.throughput == pytest.approx(96.3)


def test_vllm_both_kv_names_prefers_current() -> None:
    text = VLLM_V0_METRICS + 'vllm:kv_cache_usage_perc{model_name="facebook/opt-125m"} 0.5\n'
    assert lp.parse_vllm_metrics(text).token_usage == 0.5


def test_parse_metrics_picks_engine() -> None:
    assert lp.parse_metrics(VLLM_V1_METRICS, "unknown").running == 20
    assert lp.parse_metrics(SGLANG_METRICS, "unknown").running == 8
    assert lp.parse_metrics(SGLANG_METRICS, "sglang").running == 8
    with pytest.raises(LoadParseError):
        lp.parse_metrics(SGLANG_METRICS, "vllm")
    with pytest.raises(LoadParseError, match=r"sglang.*vllm"):
        lp.parse_metrics("up 1\n", "unknown")


def test_token_usage_overshoot_is_clamped() -> None:
    text = SGLANG_METRICS_UNDERSCORE.replace("} 0.75", "} 1.02")
    assert lp.parse_sglang_metrics(text).token_usage == 1.0


def test_nan_samples_are_skipped_but_all_nan_is_an_error() -> None:
    text = VLLM_V1_METRICS.replace(
        'engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.2',
        'engine="1",model_name="x"} NaN',
    )
    assert lp.parse_vllm_metrics(text).token_usage == pytest.approx(0.4)
    with pytest.raises(LoadParseError):
        lp.parse_sglang_metrics(SGLANG_METRICS_UNDERSCORE.replace("} 9", "} NaN"))
    with pytest.raises(LoadParseError):
        lp.parse_sglang_metrics(SGLANG_METRICS_UNDERSCORE.replace("} 0.75", "} +Inf"))


# --- nonsense ----------------------------------------------------------------------------

HTML = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"

NONSENSE_JSON: list[bytes] = [
    b"",
    HTML,
    b"\xff\xfe\x00garbage",
    SGLANG_V1_LOADS[: len(SGLANG_V1_LOADS) // 2],  # truncated
    b"null",
    b"[]",
    b"{}",
    b'"loads"',
    b'{"loads": []}',
    b'{"loads": {}}',
    b'{"loads": [1, 2]}',
    b'{"loads": [{}]}',
    b'{"loads": [{"dp_rank": 0}]}',
    b'{"loads": [{"num_running_reqs": -1, "num_waiting_reqs": 0, "token_usage": 0.1}]}',
    b'{"loads": [{"num_running_reqs": "5", "num_waiting_reqs": 0, "token_usage": 0.1}]}',
    b'{"loads": [{"num_running_reqs": true, "num_waiting_reqs": 0, "token_usage": 0.1}]}',
    b'{"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 0, "token_usage": NaN}]}',
    b'{"loads": [{"num_running_reqs": 1e309, "num_waiting_reqs": 0, "token_usage": 0.1}]}',
    b'{"loads": [{"num_running_reqs": 1e300, "num_waiting_reqs": 0, "token_usage": 0.1}]}',
    b'{"loads": [{"num_running_reqs": 1, "num_waiting_reqs": [], "token_usage": 0.1}]}',
    b'{"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 0, "token_usage": -0.5}]}',
    b'{"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 0}, "x"]}',
]

NONSENSE_GET_LOAD: list[bytes] = [
    b"",
    HTML,
    b"[",
    b"[]",
    b"7",
    b"[1]",
    b'[{"dp_rank": 0}]',
    b'[{"num_reqs": -3, "num_waiting_reqs": 0}]',
    b'[{"num_reqs": "many", "num_waiting_reqs": 0}]',
]

NONSENSE_METRICS: list[str | bytes] = [
    "",
    HTML,
    b"\x00\x01\x02",
    "up 1\nprocess_cpu_seconds_total 3.2\n",
    SGLANG_METRICS_UNDERSCORE.replace("} 9", "} -9"),
    SGLANG_METRICS_UNDERSCORE.replace("} 0.75", "} -0.1"),
    SGLANG_METRICS_UNDERSCORE.replace("sglang_num_running_reqs", "x"),
    SGLANG_METRICS_UNDERSCORE.replace("} 9", "} 1e300"),
    '{"loads": []}',
]


@pytest.mark.parametrize("body", NONSENSE_JSON)
def test_v1_loads_nonsense_raises_load_parse_error(body: bytes) -> None:
    with pytest.raises(LoadParseError):
        lp.parse_sglang_loads(body)


@pytest.mark.parametrize("body", NONSENSE_GET_LOAD)
def test_get_load_nonsense_raises_load_parse_error(body: bytes) -> None:
    with pytest.raises(LoadParseError):
        lp.parse_sglang_get_load(body)


@pytest.mark.parametrize("body", NONSENSE_METRICS)
def test_metrics_nonsense_raises_load_parse_error(body: str | bytes) -> None:
    for engine in ("sglang", "vllm", "unknown"):
        with pytest.raises(LoadParseError):
            lp.parse_metrics(body, engine)


def test_non_bytes_input_raises_load_parse_error() -> None:
    for parser in (lp.parse_sglang_loads, lp.parse_sglang_get_load, lp.parse_vllm_metrics):
        with pytest.raises(LoadParseError):
            parser(None)  # type: ignore[arg-type]
        with pytest.raises(LoadParseError):
            parser(12)  # type: ignore[arg-type]


def _check_sane(load: BackendLoad) -> None:
    assert load.valid
    assert 0 <= load.running <= lp.MAX_COUNT and 0 <= load.waiting <= lp.MAX_COUNT
    assert 0.0 <= load.token_usage <= 1.0
    assert math.isfinite(load.throughput) and load.throughput >= 0
    assert 0 <= load.waiting_tokens <= lp.MAX_COUNT


def test_fuzz_only_load_parse_error_or_sane_load() -> None:
    """Truncations, byte flips and random bytes: a sane load or LoadParseError, nothing else."""
    rng = random.Random(42)
    parsers = [
        (lp.parse_sglang_loads, SGLANG_V1_LOADS),
        (lp.parse_sglang_get_load, SGLANG_GET_LOAD),
        (lp.parse_sglang_metrics, SGLANG_METRICS.encode()),
        (lp.parse_vllm_metrics, VLLM_V1_METRICS.encode()),
        (lp.parse_models, VLLM_MODELS),
        (lp.parse_server_info, SGLANG_SERVER_INFO),
        (lp.parse_vllm_version, b'{"version": "0.8.5"}'),
    ]
    alphabet = b'{}[]",:0123456789.-eE+ \nNaInfsglv_#=\\'
    checked = 0
    for parser, sample in parsers:
        bodies = [sample[:cut] for cut in range(0, len(sample), max(1, len(sample) // 200))]
        for _ in range(300):
            b = bytearray(sample)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.choice(alphabet)
            bodies.append(bytes(b))
        bodies += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))) for _ in range(50)]
        for body in bodies:
            try:
                out = parser(body)
            except LoadParseError:
                continue
            checked += 1
            if isinstance(out, BackendLoad):
                _check_sane(out)
    assert checked > 100  # most single-byte mutations still parse


# --- identity ----------------------------------------------------------------------------


def test_parse_models() -> None:
    m = lp.parse_models(SGLANG_MODELS)
    assert m == lp.ModelList(
        ids=["qwen/qwen3-8b"], owned_by="sglang", root="qwen/qwen3-8b", max_model_len=40960
    )
    v = lp.parse_models(VLLM_MODELS)
    assert v.ids == ["llama-8b", "sql-lora"] and v.owned_by == "vllm"
    assert v.root == "/models/Llama-3.1-8B-Instruct" and v.max_model_len == 131072
    o = lp.parse_models(OPENAI_MODELS)
    assert o.ids == ["gpt-4o-mini", "gpt-4o"] and o.owned_by == "system"
    assert o.root is None and o.max_model_len is None
    assert lp.parse_models(b'{"object": "list", "data": []}') == lp.ModelList(ids=[])
    mixed = lp.parse_models(
        b'{"data": [1, {"id": ""}, {"id": 5}, {"id": "ok", "owned_by": "VLLM"}]}'
    )
    assert mixed.ids == ["ok"] and mixed.owned_by == "vllm"
    for bad in (b"", HTML, b"[]", b'{"data": 1}', b'{"object": "list"}'):
        with pytest.raises(LoadParseError):
            lp.parse_models(bad)


def test_parse_vllm_version() -> None:
    assert lp.parse_vllm_version(b'{"version": "0.11.0"}') == "0.11.0"
    for bad in (b"", b'{"version": 11}', b"[]", HTML):
        with pytest.raises(LoadParseError):
            lp.parse_vllm_version(bad)


def test_parse_server_info_keeps_typed_known_fields() -> None:
    info = lp.parse_server_info(SGLANG_SERVER_INFO)
    assert info == {
        "model_path": "qwen/qwen3-8b",
        "tokenizer_path": "qwen/qwen3-8b",
        "served_model_name": "qwen/qwen3-8b",
        "tp_size": 2,
        "dp_size": 1,
        "pp_size": 1,
        "load_balance_method": "round_robin",
        "disaggregation_mode": "null",
        "max_total_tokens": 181920,
        "max_running_requests": 256,
        "is_embedding": False,
        "version": "0.5.6",
    }
    # `model` is Rust's alias for model_id; a bool is not a size.
    alias = lp.parse_server_info(b'{"model": "m", "tp_size": true}')
    assert alias == {"model_id": "m"}
    for bad in (b"", HTML, b"[]", b'{"unrelated": 1}', b'{"tp_size": "2"}'):
        with pytest.raises(LoadParseError):
            lp.parse_server_info(bad)


def _j(b: bytes) -> object:
    return orjson.loads(b)


@pytest.mark.parametrize(
    ("models", "version", "server_info", "engine"),
    [
        (_j(SGLANG_MODELS), None, None, "sglang"),
        (_j(VLLM_MODELS), None, None, "vllm"),
        ({"data": [{"id": "m", "owned_by": "nvidia"}]}, None, None, "sglang"),
        ({"data": [{"id": "m", "owned_by": "NVIDIA"}]}, None, None, "sglang"),
        # owned_by wins over the other answers.
        (_j(SGLANG_MODELS), {"version": "0.8.0"}, None, "sglang"),
        # Fallbacks: /version is vLLM-only, so it beats /server_info.
        (None, {"version": "0.8.0"}, _j(SGLANG_SERVER_INFO), "vllm"),
        (_j(OPENAI_MODELS), {"version": "0.8.0"}, None, "vllm"),
        (None, None, _j(SGLANG_SERVER_INFO), "sglang"),
        ({"data": [{"id": "m", "owned_by": "someone"}]}, None, {"model_path": "m"}, "sglang"),
        # Plain OpenAI-compatible list.
        (_j(OPENAI_MODELS), None, None, "openai"),
        ({"object": "list", "data": []}, None, None, "openai"),
        ({"data": [{"id": "m", "owned_by": "trtllm"}]}, None, None, "openai"),
        # Nothing usable.
        (None, None, None, "unknown"),
        ("<html>", [], 5, "unknown"),
        (None, {"version": 3}, {"unrelated": 1}, "unknown"),
    ],
)
def test_detect_engine(models: object, version: object, server_info: object, engine: str) -> None:
    assert lp.detect_engine(models, version, server_info) == engine
