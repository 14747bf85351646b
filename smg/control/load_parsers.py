"""Pure parsers for the engines' load and identity endpoints (bytes in, values out).

Every `parse_*` function either returns a value or raises `LoadParseError` (a `ValueError`)
whose message says what was wrong; it raises nothing else, whatever the input (HTML error
pages, truncated JSON, negative or non-finite numbers, strings where numbers belong). The
caller logs the message and treats the worker's load as unknown.

Formats (read from the engines' sources; see the tests for samples):

- SGLang `GET /v1/loads` (`python/sglang/srt/entrypoints/v1_loads.py`; per-rank fields from
  `GetLoadsReqOutput` in `python/sglang/srt/managers/io_struct.py`): a JSON object
  `{"timestamp": ..., "version": ..., "loads": [{"dp_rank": 0, "num_running_reqs": int,
  "num_waiting_reqs": int, "num_used_tokens": int, "max_total_num_tokens": int,
  "token_usage": float, "gen_throughput": float, "cache_hit_rate": float, "utilization":
  float, "max_running_requests": int, ...optional nested sections...}, ...]}` with one
  entry per DP rank (older builds and the Rust mock add `"dp_rank_count"`; newer ones add
  `"num_waiting_uncached_tokens"`). Running, waiting, throughput and waiting uncached tokens
  (→ `BackendLoad.waiting_tokens`) are summed over ranks, token usage averaged (Rust
  `WorkerLoadResponse::effective_token_usage` / `total_gen_throughput` /
  `total_waiting_uncached_tokens`).
- SGLang `GET /get_load` (deprecated; `http_server.py`): a JSON list, one object per DP rank,
  `{"dp_rank", "num_reqs" (running + waiting), "num_waiting_reqs", "num_tokens", ...}`. It
  carries no KV capacity, so token_usage is 0.
- SGLang `GET /metrics` (`python/sglang/srt/metrics/collector.py`): Prometheus gauges
  `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`,
  `sglang:gen_throughput`, one sample per label set (model_name, tp_rank, dp_rank...). The
  prefix is `sglang:` through v0.5.3 and `sglang_` from v0.5.4 (Rust
  `model_gateway/src/worker/monitor.rs`, `fetch_http_load_sglang`); both are accepted.
- vLLM `GET /metrics` (`vllm/v1/metrics/loggers.py`): `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (v1; `vllm:gpu_cache_usage_perc` in
  v0), one sample per `engine` (DP rank) and `model_name`. Counts are summed, KV usage
  averaged. v1 exports no throughput gauge (only the `vllm:generation_tokens_total`
  counter, which needs two scrapes); v0's `vllm:avg_generation_throughput_toks_per_s` is used
  when present, else throughput is 0.
- `GET /v1/models` (OpenAI list): `{"object": "list", "data": [{"id", "object": "model",
  "owned_by", "root"?, "max_model_len"?}]}`; SGLang answers `owned_by: "sglang"`, vLLM
  `"vllm"`, NVIDIA builds `"nvidia"`, OpenAI `"openai"`/`"system"`.
- vLLM `GET /version`: `{"version": "0.x.y"}`.
- SGLang `GET /server_info` (older: `/get_server_info`): the server args flattened plus
  scheduler info, `"internal_states"` and `"version"` (hundreds of keys; a subset is kept).

A load is reported as valid only when the signal load-aware routing acts on is present
(like Rust, which reports a `/metrics` body without the KV-usage gauge as unavailable).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec
import orjson

from smg.policies.base import BackendLoad


class LoadParseError(ValueError):
    """A body that is not a usable answer from the endpoint it came from."""


# Request counts above this are nonsense (and would not fit the shared-memory int32 fields).
MAX_COUNT = 2**31 - 1


# ---------------------------------------------------------------------------------------
# Prometheus text exposition format
# ---------------------------------------------------------------------------------------

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# One `key="value"` pair, then the separator that follows it (`,` or `}`).
_LABEL_RE = re.compile(
    r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*([,}])'
)
_CLOSE_RE = re.compile(r"[ \t]*}")
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), value)


def _parse_labels(line: str, i: int) -> tuple[Labels, int]:
    """Parse `a="x",b="y\\"z"}` starting just after `{`; returns the labels and the index
    past `}`. Raises ValueError on malformed text."""
    labels: Labels = {}
    while True:
        m = _LABEL_RE.match(line, i)
        if m is None:
            # `{}` or a trailing comma before `}` (both allowed by the format).
            close = _CLOSE_RE.match(line, i)
            if close is None:
                raise ValueError("bad labels")
            return labels, close.end()
        labels[m.group(1)] = _unescape(m.group(2))
        i = m.end()
        if m.group(3) == "}":
            return labels, i


def _parse_value(token: str) -> float:
    # float() also takes "1_0" and "infinity"; Prometheus writes neither, so reject "_".
    if "_" in token:
        raise ValueError("bad value")
    return float(token)  # handles NaN, +Inf, -Inf, 1e+06


def parse_prometheus_text(text: str, names: Collection[str] | None = None) -> Samples:
    """Parse Prometheus text format into {metric name: [(labels, value), ...]}, keeping only
    the metrics in `names` when given (an engine's /metrics is mostly histogram buckets the
    load parsers never read, so filtering by name first saves most of the work).

    Comment lines (`# HELP`, `# TYPE`, `# EOF`, ...) and blank lines are skipped; an
    optional timestamp (and an OpenMetrics exemplar) after the value is ignored; lines that
    do not parse are skipped, as Rust's `PromScrape` does, so one odd line does not hide the
    rest. Never raises.
    """
    samples: Samples = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        m = _NAME_RE.match(line)
        if m is None:
            continue
        name = m.group()
        if names is not None and name not in names:
            continue
        i = m.end()
        labels: Labels = {}
        try:
            if line.startswith("{", i):
                labels, i = _parse_labels(line, i + 1)
            rest = line[i:]
            if not rest or rest[0] not in " \t":
                continue
            value = _parse_value(rest.split()[0])
        except ValueError:
            continue
        samples.setdefault(name, []).append((labels, value))
    return samples


def _finite_values(samples: Samples, name: str) -> list[float]:
    return [v for _, v in samples.get(name, ()) if math.isfinite(v)]


def _metric_sum(samples: Samples, name: str, required: bool) -> float:
    values = _finite_values(samples, name)
    if not values:
        if required and name in samples:
            raise LoadParseError(f"{name}: no finite sample")
        if required:
            raise LoadParseError(f"{name}: missing")
        return 0.0
    if any(v < 0 for v in values):
        raise LoadParseError(f"{name}: negative sample")
    return sum(values)


def _metric_mean(samples: Samples, name: str) -> float:
    values = _finite_values(samples, name)
    if not values:
        raise LoadParseError(f"{name}: no finite sample")
    if any(v < 0 for v in values):
        raise LoadParseError(f"{name}: negative sample")
    return sum(values) / len(values)


def _optional_rate(samples: Samples, name: str) -> float:
    # Throughput is a hint: a missing, non-finite or negative value means "unknown" (0),
    # not a broken scrape.
    values = [v for v in _finite_values(samples, name) if v >= 0]
    return sum(values)


def _text(body: bytes | str) -> str:
    if isinstance(body, str):
        return body
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise LoadParseError(f"expected bytes, got {type(body).__name__}")
    return bytes(body).decode("utf-8", errors="replace")


def _usage(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise LoadParseError(f"{what}: not a ratio: {value!r}")
    # SGLang's token_usage is the max over its pools and may overshoot 1.0 slightly.
    return min(value, 1.0)


def _load(
    running: float,
    waiting: float,
    token_usage: float,
    throughput: float,
    waiting_tokens: float = 0.0,
) -> BackendLoad:
    if not (running <= MAX_COUNT and waiting <= MAX_COUNT):  # also catches inf
        raise LoadParseError(f"request count out of range: {running!r}, {waiting!r}")
    return BackendLoad(
        running=int(running),
        waiting=int(waiting),
        token_usage=token_usage,
        throughput=throughput if math.isfinite(throughput) else 0.0,
        valid=True,
        waiting_tokens=int(min(waiting_tokens, MAX_COUNT)),
    )


_SGLANG_NAMES = frozenset(
    prefix + name
    for prefix in ("sglang:", "sglang_")
    for name in (
        "num_running_reqs",
        "num_queue_reqs",
        "num_waiting_reqs",
        "token_usage",
        "gen_throughput",
    )
)
_VLLM_NAMES = frozenset(
    (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:avg_generation_throughput_toks_per_s",
    )
)


def parse_sglang_metrics(body: bytes | str) -> BackendLoad:
    """SGLang `/metrics`; the KV-usage gauge (`<prefix>token_usage`) is required."""
    samples = parse_prometheus_text(_text(body), _SGLANG_NAMES)
    for prefix in ("sglang:", "sglang_"):
        if _finite_values(samples, f"{prefix}token_usage"):
            break
    else:
        raise LoadParseError("no sglang:token_usage / sglang_token_usage gauge")
    waiting_name = f"{prefix}num_queue_reqs"
    if waiting_name not in samples:
        # `/v1/loads?format=prometheus` names the queue after the JSON field.
        waiting_name = f"{prefix}num_waiting_reqs"
    return _load(
        running=_metric_sum(samples, f"{prefix}num_running_reqs", required=True),
        waiting=_metric_sum(samples, waiting_name, required=False),
        token_usage=_usage(_metric_mean(samples, f"{prefix}token_usage"), "token_usage"),
        throughput=_optional_rate(samples, f"{prefix}gen_throughput"),
    )


def parse_vllm_metrics(body: bytes | str) -> BackendLoad:
    """vLLM `/metrics`; a KV-usage gauge (v1 or v0 name) is required."""
    samples = parse_prometheus_text(_text(body), _VLLM_NAMES)
    for kv_name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        if _finite_values(samples, kv_name):
            break
    else:
        raise LoadParseError("no vllm:kv_cache_usage_perc / vllm:gpu_cache_usage_perc gauge")
    return _load(
        running=_metric_sum(samples, "vllm:num_requests_running", required=True),
        waiting=_metric_sum(samples, "vllm:num_requests_waiting", required=False),
        token_usage=_usage(_metric_mean(samples, kv_name), kv_name),
        throughput=_optional_rate(samples, "vllm:avg_generation_throughput_toks_per_s"),
    )


def parse_metrics(body: bytes | str, engine: str = "unknown") -> BackendLoad:
    """`/metrics` for `engine` ("sglang" | "vllm"); any other engine: whichever fits."""
    if engine == "sglang":
        return parse_sglang_metrics(body)
    if engine == "vllm":
        return parse_vllm_metrics(body)
    text = _text(body)
    errors: list[str] = []
    for parser in (parse_sglang_metrics, parse_vllm_metrics):
        try:
            return parser(text)
        except LoadParseError as e:
            errors.append(str(e))
    raise LoadParseError("; ".join(errors))


# ---------------------------------------------------------------------------------------
# JSON endpoints
# ---------------------------------------------------------------------------------------


def _json(body: bytes | str) -> Any:
    if isinstance(body, str):
        body = body.encode("utf-8", errors="replace")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise LoadParseError(f"expected bytes, got {type(body).__name__}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise LoadParseError(f"not JSON: {e}") from None


def _count(entry: Mapping[str, Any], key: str) -> float:
    value = entry.get(key, 0)
    if value is None:
        return 0.0
    # bool is an int subclass; a JSON true is not a count.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoadParseError(f"{key}: not a number: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise LoadParseError(f"{key}: out of range: {value!r}")
    return float(value)


def _rate(entry: Mapping[str, Any], key: str) -> float:
    """An optional hint: anything but a finite non-negative number reads as 0 (unknown)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


def _rank_entries(items: Iterable[Any], keys: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    entries = list(items)
    if not entries:
        raise LoadParseError(f"{what}: no ranks")
    if not all(isinstance(e, dict) for e in entries):
        raise LoadParseError(f"{what}: a rank entry is not an object")
    if not any(k in e for e in entries for k in keys):
        raise LoadParseError(f"{what}: none of {', '.join(keys)}")
    return entries


def parse_sglang_loads(body: bytes | str) -> BackendLoad:
    """SGLang `/v1/loads` JSON, summed over DP ranks."""
    doc = _json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("loads"), list):
        raise LoadParseError('/v1/loads: no "loads" list')
    entries = _rank_entries(
        doc["loads"], ("num_running_reqs", "num_waiting_reqs", "token_usage"), "/v1/loads"
    )
    running = waiting = usage = throughput = queued_tokens = 0.0
    for e in entries:
        running += _count(e, "num_running_reqs")
        waiting += _count(e, "num_waiting_reqs")
        usage += _usage(_count(e, "token_usage"), "token_usage")
        throughput += _rate(e, "gen_throughput")
        queued_tokens += _rate(e, "num_waiting_uncached_tokens")
    return _load(running, waiting, usage / len(entries), throughput, queued_tokens)


def parse_sglang_get_load(body: bytes | str) -> BackendLoad:
    """SGLang `/get_load` JSON (a list of per-rank objects; one object is taken as one rank).
    token_usage is 0: the endpoint reports used tokens but not the KV capacity."""
    doc = _json(body)
    items = [doc] if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise LoadParseError("/get_load: not a list of ranks")
    entries = _rank_entries(items, ("num_reqs", "num_waiting_reqs"), "/get_load")
    running = waiting = 0.0
    for e in entries:
        total = _count(e, "num_reqs")
        queued = _count(e, "num_waiting_reqs")
        running += max(total - queued, 0.0)
        waiting += queued
    return _load(running, waiting, 0.0, 0.0)


# ---------------------------------------------------------------------------------------
# Backend identity
# ---------------------------------------------------------------------------------------


class ModelList(msgspec.Struct, frozen=True):
    ids: list[str]
    owned_by: str | None = None  # the first model's, lower-cased (what Rust classifies on)
    root: str | None = None  # the first model's `root` (vLLM/SGLang: the model path)
    max_model_len: int | None = None  # the first model's context length, when given


def models_from_json(doc: Any) -> ModelList | None:
    """An already-decoded `/v1/models` answer → ModelList, or None if it is not a list."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    ids: list[str] = []
    first: dict[str, Any] | None = None
    for m in doc["data"]:
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]:
            ids.append(m["id"])
            first = first or m
    if first is None:
        return ModelList(ids=[])
    owned_by = first.get("owned_by")
    root = first.get("root")
    max_len = first.get("max_model_len")
    return ModelList(
        ids=ids,
        owned_by=owned_by.lower() if isinstance(owned_by, str) else None,
        root=root if isinstance(root, str) and root else None,
        max_model_len=max_len
        if isinstance(max_len, int) and not isinstance(max_len, bool) and max_len > 0
        else None,
    )


def parse_models(body: bytes | str) -> ModelList:
    """OpenAI `/v1/models` list; entries without a string id are skipped."""
    listing = models_from_json(_json(body))
    if listing is None:
        raise LoadParseError('/v1/models: no "data" list')
    return listing


def parse_vllm_version(body: bytes | str) -> str:
    """vLLM `/version` → the version string."""
    doc = _json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
        raise LoadParseError('/version: no "version" string')
    return doc["version"]


# The subset of SGLang's /server_info the gateway uses (Rust `ServerInfo` in
# model_gateway/src/workflow/steps/local/discover_metadata.rs), with the JSON type each has.
SERVER_INFO_FIELDS: dict[str, type] = {
    "model_path": str,
    "tokenizer_path": str,
    "served_model_name": str,
    "tp_size": int,
    "dp_size": int,
    "pp_size": int,
    "load_balance_method": str,
    "disaggregation_mode": str,
    "version": str,
    "is_embedding": bool,
    "context_length": int,
    "max_total_tokens": int,
    "max_running_requests": int,
    "weight_version": str,
}


def parse_server_info(body: bytes | str) -> dict[str, Any]:
    """SGLang `/server_info` or `/get_server_info` → the known fields that have the right
    type (others are dropped). An object with none of them is not a server_info answer."""
    return server_info_from_json(_json(body))


def server_info_from_json(doc: Any) -> dict[str, Any]:
    """An already-decoded `/server_info` answer → the known-field subset (LoadParseError if
    it has none)."""
    if not isinstance(doc, dict):
        raise LoadParseError("/server_info: not an object")
    out: dict[str, Any] = {}
    for key, kind in SERVER_INFO_FIELDS.items():
        value = doc.get(key)
        if kind is int and isinstance(value, bool):
            continue
        if isinstance(value, kind):
            out[key] = value
    # Rust reads `model_id`, with `model` as an alias.
    for key in ("model_id", "model"):
        if isinstance(doc.get(key), str):
            out["model_id"] = doc[key]
            break
    if not out:
        raise LoadParseError("/server_info: none of the known fields")
    return out


# owned_by values of local engines (Rust detect_backend.rs: "sglang" | "nvidia" → sglang,
# "vllm" → vllm).
_OWNED_BY_ENGINE = {"sglang": "sglang", "nvidia": "sglang", "vllm": "vllm"}


def detect_engine(models_json: Any, version_json: Any, server_info_json: Any) -> str:
    """Classify a backend from its decoded answers (None where an endpoint did not answer
    2xx with JSON). Order as in Rust `detect_http_backend`: the first model's `owned_by`;
    then `/version` (vLLM-only, so it wins even when `/server_info` answers too); then
    `/server_info` (SGLang). A plain OpenAI model list with any other `owned_by` is
    "openai"; nothing usable is "unknown"."""
    listing = models_from_json(models_json)
    if listing is not None and listing.owned_by in _OWNED_BY_ENGINE:
        return _OWNED_BY_ENGINE[listing.owned_by]
    if isinstance(version_json, dict) and isinstance(version_json.get("version"), str):
        return "vllm"
    if isinstance(server_info_json, dict):
        try:
            server_info_from_json(server_info_json)
            return "sglang"
        except LoadParseError:
            pass
    if listing is not None:
        return "openai"
    return "unknown"
