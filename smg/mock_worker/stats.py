"""Per-worker request statistics, exposed by `GET /mock/stats` (pure bookkeeping)."""

from __future__ import annotations

import base64
from typing import Any

# (method, target, headers as received, body, monotonic time it completed)
RequestRecord = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, float]


def _record_json(rec: RequestRecord) -> dict[str, Any]:
    method, target, headers, body, mono = rec
    header_pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]
    return {
        "method": method.decode("latin-1"),
        "target": target.decode("latin-1"),
        "path": target.partition(b"?")[0].decode("latin-1"),
        "headers": header_pairs,
        # Lower-cased names; a repeated header keeps its last value.
        "header_map": {k.lower(): v for k, v in header_pairs},
        "body_b64": base64.b64encode(body).decode(),
        "body_len": len(body),
        "monotonic": mono,
    }


class WorkerStats:
    """Counters for one worker. `/mock/*` requests are never recorded."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.by_route: dict[bytes, int] = {}
        self.by_status: dict[int, int] = {}
        self.total = 0
        # Most inference requests in flight at once since the start or the last reset
        # (tests check gateway concurrency limits with it).
        self.peak_in_flight = 0
        self.disconnects = 0
        self.last_disconnect_mono: float | None = None
        self.last_disconnect_wall: float | None = None
        self.last: RequestRecord | None = None
        self.last_by_route: dict[bytes, RequestRecord] = {}
        self.inference_answered = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._tp_mark_time: float | None = None
        self._tp_mark_tokens = 0
        self._tp_value = 0.0
        # Inference requests per requested `model` (LoRA adapter names show up here).
        self.by_model: dict[str, int] = {}
        # /start_profile and /stop_profile calls in order, with how many inference
        # requests had been answered then (a test checks they bracket a run).
        self.profile_events: list[dict[str, Any]] = []
        # Inference requests per `data_parallel_rank` they carried ("none": absent).
        self.by_dp_rank: dict[str, int] = {}

    def record(self, route: bytes, rec: RequestRecord) -> None:
        self.total += 1
        self.by_route[route] = self.by_route.get(route, 0) + 1
        self.last = rec
        self.last_by_route[route] = rec

    def count_dp_rank(self, rank: str) -> None:
        self.by_dp_rank[rank] = self.by_dp_rank.get(rank, 0) + 1

    def count_model(self, model: str) -> None:
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def record_profile(self, event: str, mono: float, options: Any = None) -> None:
        self.profile_events.append(
            {
                "event": event,
                "inference_answered": self.inference_answered,
                "monotonic": mono,
                "options": options,
            }
        )

    def count_status(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def record_disconnect(self, mono: float, wall: float) -> None:
        self.disconnects += 1
        self.last_disconnect_mono = mono
        self.last_disconnect_wall = wall

    def gen_throughput(self, now: float) -> float:
        """Generated tokens/s between reads at least 0.5 s apart (what a load scrape sees)."""
        if self._tp_mark_time is None:
            self._tp_mark_time, self._tp_mark_tokens = now, self.generation_tokens_total
        elif now - self._tp_mark_time >= 0.5:
            delta = self.generation_tokens_total - self._tp_mark_tokens
            self._tp_value = delta / (now - self._tp_mark_time)
            self._tp_mark_time, self._tp_mark_tokens = now, self.generation_tokens_total
        return self._tp_value

    def snapshot(self, in_flight: int, now_mono: float) -> dict[str, Any]:
        return {
            "total_requests": self.total,
            "requests_by_route": {k.decode("latin-1"): v for k, v in self.by_route.items()},
            "responses_by_status": {str(k): v for k, v in self.by_status.items()},
            "in_flight": in_flight,
            "peak_in_flight": max(self.peak_in_flight, in_flight),
            "inference_answered": self.inference_answered,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "disconnects": self.disconnects,
            "requests_by_model": dict(self.by_model),
            "requests_by_dp_rank": dict(self.by_dp_rank),
            "profile_events": list(self.profile_events),
            "last_disconnect_monotonic": self.last_disconnect_mono,
            "last_disconnect_wall": self.last_disconnect_wall,
            "monotonic_now": now_mono,
            "last_request": None if self.last is None else _record_json(self.last),
            "last_request_by_route": {
                k.decode("latin-1"): _record_json(v) for k, v in self.last_by_route.items()
            },
        }
