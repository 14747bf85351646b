"""Per-process metrics, with the Rust SMG's metric names, rendered as Prometheus text.

Each data-plane process counts only its own requests; the control plane's exporter asks
every process for its text and adds a `process` label, so series from different processes
never collide and tests can tell which process served what.
"""

from __future__ import annotations

from bisect import bisect_left

DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)


class Histogram:
    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.total += value


class DataPlaneMetrics:
    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.requests: dict[tuple[str, str], int] = {}  # (method, path)
        self.responses: dict[tuple[str, int, str], int] = {}  # (path, status, error_code)
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.routed: dict[tuple[str, str, str], int] = {}  # (model, endpoint, streaming)
        self.connections_active = 0

    def request(self, method: str, path: str) -> None:
        key = (method, path)
        self.requests[key] = self.requests.get(key, 0) + 1

    def response(self, path: str, status: int, error_code: str) -> None:
        key = (path, status, error_code)
        self.responses[key] = self.responses.get(key, 0) + 1

    def duration(self, method: str, path: str, seconds: float) -> None:
        key = (method, path)
        hist = self.durations.get(key)
        if hist is None:
            hist = self.durations[key] = Histogram(self.buckets)
        hist.observe(seconds)

    def routed_request(self, model: str, endpoint: str, streaming: bool) -> None:
        key = (model, endpoint, "true" if streaming else "false")
        self.routed[key] = self.routed.get(key, 0) + 1

    def render(self, process: int) -> str:
        proc = f'process="{process}"'
        lines: list[str] = []
        add = lines.append
        add("# TYPE smg_http_requests_total counter")
        for (method, path), value in self.requests.items():
            add(f'smg_http_requests_total{{{proc},method="{method}",path="{_esc(path)}"}} {value}')
        add("# TYPE smg_http_responses_total counter")
        for (path, status, code), value in self.responses.items():
            add(
                f'smg_http_responses_total{{{proc},path="{_esc(path)}",status_code="{status}",'
                f'error_code="{_esc(code)}"}} {value}'
            )
        add("# TYPE smg_http_request_duration_seconds histogram")
        for (method, path), hist in self.durations.items():
            base = f'{proc},method="{method}",path="{_esc(path)}"'
            cumulative = 0
            for bound, count in zip(hist.buckets, hist.counts):
                cumulative += count
                add(f'smg_http_request_duration_seconds_bucket{{{base},le="{bound}"}} {cumulative}')
            add(f'smg_http_request_duration_seconds_bucket{{{base},le="+Inf"}} {hist.count}')
            add(f"smg_http_request_duration_seconds_sum{{{base}}} {hist.total}")
            add(f"smg_http_request_duration_seconds_count{{{base}}} {hist.count}")
        add("# TYPE smg_router_requests_total counter")
        for (model, endpoint, streaming), value in self.routed.items():
            add(
                f'smg_router_requests_total{{{proc},router_type="http",backend_type="regular",'
                f'connection_mode="http",model="{_esc(model)}",endpoint="{_esc(endpoint)}",'
                f'streaming="{streaming}"}} {value}'
            )
        add("# TYPE smg_http_connections_active gauge")
        add(f"smg_http_connections_active{{{proc}}} {self.connections_active}")
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
