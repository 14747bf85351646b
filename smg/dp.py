"""`--dp-aware`: one data-parallel engine URL becomes `url@rank` workers (pure parts).

As SMG 1.13 does it: at registration the control plane asks the engine's SGLang
`/server_info` (falling back to `/get_server_info` on 404) for `dp_size` and registers one
worker per rank, shown in `/workers` as `{url}@{rank}` with `dp_base_url`, `dp_rank` and
`dp_size`. Each rank worker is routed to like any other (the policy picks by its own
in-flight load), and the body sent to it carries `"data_parallel_rank": rank`, which
replaces any rank the client gave (1.13's `prepare_request`).
"""

from __future__ import annotations

from typing import Any

import orjson

# How long the control plane keeps asking a start-up worker for its dp_size before giving
# up on it (1.13 retries its discover_dp_info step while the engine starts).
DP_DISCOVERY_INTERVAL_S = 1.0


def dp_url(base: str, rank: int) -> str:
    """A rank worker's URL as 1.13 shows it (and keys it by): `{base}@{rank}`."""
    return f"{base}@{rank}"


def dp_size_of(server_info: Any) -> int:
    """`dp_size` from an SGLang `/server_info` answer; ValueError when absent or not a
    positive integer (1.13: "No dp_size in response")."""
    if not isinstance(server_info, dict):
        raise ValueError("the server info is not a JSON object")
    size = server_info.get("dp_size")
    if type(size) is not int or size < 1:
        raise ValueError(f"no positive integer dp_size in the server info (got {size!r})")
    return size


NOT_SGLANG = 0  # dp_answer: the engine has no /server_info (404): 1.13 does not expand it


def dp_answer(answer: tuple[int, Any] | None) -> int | None:
    """What a `/server_info` answer (status, JSON; None: no answer) says: the dp_size,
    NOT_SGLANG for a 404 (1.13 discovers DP for SGLang HTTP engines only and registers
    others as one worker), None to ask again (no answer, an error, no usable dp_size:
    1.13 retries its discover_dp_info step)."""
    if answer is None:
        return None
    status, body = answer
    if status == 404:
        return NOT_SGLANG
    if not 200 <= status < 300:
        return None
    try:
        return dp_size_of(body)
    except ValueError:
        return None


def inject_dp_rank(body: bytes | bytearray | memoryview, rank: int) -> bytes | None:
    """The JSON object `body` with `data_parallel_rank` set to `rank`; None when the body is
    not a JSON object (1.13: "Request must be a JSON object for DP-aware routing")."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    obj["data_parallel_rank"] = rank
    return orjson.dumps(obj)


NOT_AN_OBJECT = "Request must be a JSON object for DP-aware routing"


def pd_rank_fields(
    body: dict[str, Any], prefill_rank: int | None, decode_rank: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """PD mode (smg.dataplane.pd): the prefill's and the
    decode's bodies as 1.13's PD router makes them: the prefill gets `routed_dp_rank` =
    its rank, the decode `disagg_prefill_dp_rank` = the prefill's rank and
    `routed_dp_rank` = its own (no `data_parallel_rank`; checked on the 1.13 binary)."""
    prefill, decode = dict(body), dict(body)
    if prefill_rank is not None:
        prefill["routed_dp_rank"] = prefill_rank
        decode["disagg_prefill_dp_rank"] = prefill_rank
    if decode_rank is not None:
        decode["routed_dp_rank"] = decode_rank
    return prefill, decode
