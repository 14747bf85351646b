"""`POST /start_profile` and `POST /stop_profile`: the engines' profilers, fanned out to
every worker (or the one whose URL the body names), as the Rust SMG 1.13 answers them;
and `POST /flush_cache`'s answer, 1.13's FlushCacheResult (the same fan-out's words).

Pure code: the request body's reading and the answer's shape. The control plane does the
fan-out (HTTP `POST {worker}/start_profile` with the options as the JSON body, or the
engines' StartProfile / StopProfile RPCs for gRPC workers).
"""

from __future__ import annotations

from typing import Any

import orjson

# The options 1.13 reads (its ProfileOptions), with their JSON types; any other key is
# ignored, as serde does. profile_by_stage has a default (false) and is always sent.
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "output_dir": (str,),
    "start_step": (int,),
    "num_steps": (int,),
    "activities": (list,),
    "with_stack": (bool,),
    "record_shapes": (bool,),
    "profile_by_stage": (bool,),
}
OPERATIONS = ("start_profile", "stop_profile")
# 1.13 waits this long for a worker's answer: stopping can take minutes while the engine
# writes its traces.
PROFILE_TIMEOUT_SECS = 630.0


class ProfileRequestError(Exception):
    """A body 1.13 refuses: 400 (not JSON) or 422 (JSON of the wrong shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_request(body: bytes, operation: str) -> tuple[str | None, dict[str, Any]]:
    """(the worker URL to target or None for all, the profile options to send).

    An empty body is the defaults, as 1.13 takes a request without one; `stop_profile`
    reads only `url`."""
    if not body.strip():
        return None, {"profile_by_stage": False} if operation == "start_profile" else {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProfileRequestError(400, f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileRequestError(422, f"the body must be a JSON object, got {type(data).__name__}")
    url = data.get("url")
    if url is not None and not isinstance(url, str):
        raise ProfileRequestError(422, "url: expected a string")
    if operation == "stop_profile":
        return url, {}
    options: dict[str, Any] = {"profile_by_stage": False}
    for name, types in OPTION_TYPES.items():
        value = data.get(name)
        if value is None:
            continue
        # bool is an int in Python: a number field must not take true/false.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProfileRequestError(422, f"{name}: expected {_kind(types)}")
        if name == "activities" and not all(isinstance(item, str) for item in value):
            raise ProfileRequestError(422, "activities: expected a list of strings")
        options[name] = value
    return url, options


def _kind(types: tuple[type, ...]) -> str:
    return {str: "a string", int: "an integer", list: "a list", bool: "a boolean"}[types[0]]


def failure_reason(operation: str, url: str, status: int, text: str) -> str:
    """One worker's failure as 1.13 words it: `{op} failed for worker {url}: {reason}`."""
    reason = f"HTTP {status}" if status else (text or "no answer")
    return f"{operation} failed for worker {url}: {reason}"


def answer(
    operation: str,
    total: int,
    successful: list[str],
    failed: list[tuple[str, str]],
    url: str | None,
) -> tuple[int, dict[str, Any]]:
    """1.13's ProfileResult: 200 all succeeded, 206 some failed, 404 no worker matched."""
    verb = "started" if operation == "start_profile" else "stopped"
    noun = "start" if operation == "start_profile" else "stop"
    if total == 0:
        message = (
            f"No worker matching url '{url}'"
            if url is not None
            else "No workers available for profiling"
        )
        status, word = 404, "error"
    elif not failed:
        message = f"Successfully {verb} profiling on all {len(successful)} workers"
        status, word = 200, "success"
    else:
        message = f"Profile {noun}: {len(successful)} succeeded, {len(failed)} failed"
        status, word = 206, "partial_success"
    body: dict[str, Any] = {
        "status": word,
        "message": message,
        "workers_profiled": len(successful),
        "total_workers": total,
    }
    if failed:
        body["successful"] = successful
        body["failed"] = [{"worker": worker, "error": error} for worker, error in failed]
    return status, body


def flush_answer(
    http_workers: int,
    grpc_workers: int,
    successful: list[str],
    failed: list[tuple[str, str]],
) -> tuple[int, dict[str, Any]]:
    """1.13's FlushCacheResult: 200 all flushed (or no worker to flush), 206 some failed;
    its counters (no ZMQ workers here: `total_zmq_workers_skipped` is 0)."""
    total = http_workers + grpc_workers
    if total == 0:
        message = "No workers available for cache flush"
    elif not failed:
        message = f"Successfully flushed cache on all {len(successful)} workers"
    else:
        message = f"Cache flush: {len(successful)} succeeded, {len(failed)} failed"
    body: dict[str, Any] = {
        "status": "partial_success" if failed else "success",
        "message": message,
        "workers_flushed": len(successful),
        "total_http_workers": http_workers,
        "total_grpc_workers": grpc_workers,
        "total_zmq_workers_skipped": 0,
        "total_workers": total,
    }
    if failed:
        body["successful"] = successful
        body["failed"] = [{"worker": worker, "error": error} for worker, error in failed]
    return (206 if failed else 200), body
