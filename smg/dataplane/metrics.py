"""Per-process metrics, with the Rust SMG's metric names, as structured samples.

Each data-plane process counts only its own requests; the control plane's exporter asks
every process for its families over IPC (`families()`, labelled `process="<index>"` so
series from different processes never collide and tests can tell which process served
what) and renders them all at once with `smg.promtext`.
"""

from __future__ import annotations

from bisect import bisect_left

from smg.dataplane.retry import endpoint_label
from smg.promtext import Family, Sample

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
        # Retries, under SMG's names (`smg_worker_retries_total` and friends).
        self.retries: dict[str, int] = {}  # endpoint label -> retries started
        self.exhausted: dict[str, int] = {}  # endpoint label -> requests out of attempts
        self.backoffs: dict[str, Histogram] = {}  # retry number ("1" = first retry)

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

    def retry(self, path: str, number: int, delay: float) -> None:
        """Retry `number` (1 = the first retry) of a request on `path`, after `delay` s."""
        label = endpoint_label(path)
        self.retries[label] = self.retries.get(label, 0) + 1
        key = str(number)
        hist = self.backoffs.get(key)
        if hist is None:
            hist = self.backoffs[key] = Histogram(self.buckets)
        hist.observe(delay)

    def retries_exhausted(self, path: str) -> None:
        label = endpoint_label(path)
        self.exhausted[label] = self.exhausted.get(label, 0) + 1

    def families(self, process: int) -> list[Family]:
        """This process's series, labelled `process="<index>"`, for the exporter."""
        proc = ("process", str(process))
        requests = [
            Sample("", [proc, ("method", method), ("path", path)], value)
            for (method, path), value in self.requests.items()
        ]
        responses = [
            Sample(
                "",
                [proc, ("path", path), ("status_code", str(status)), ("error_code", code)],
                value,
            )
            for (path, status, code), value in self.responses.items()
        ]
        durations: list[Sample] = []
        for (method, path), hist in self.durations.items():
            durations += histogram_samples([proc, ("method", method), ("path", path)], hist)
        routed = [
            Sample(
                "",
                [
                    proc,
                    ("router_type", "http"),
                    ("backend_type", "regular"),
                    ("connection_mode", "http"),
                    ("model", model),
                    ("endpoint", endpoint),
                    ("streaming", streaming),
                ],
                value,
            )
            for (model, endpoint, streaming), value in self.routed.items()
        ]
        retry_families = self._retry_families(proc)
        return [
            Family("smg_http_requests_total", "counter", HELP_REQUESTS, requests),
            Family("smg_http_responses_total", "counter", HELP_RESPONSES, responses),
            Family("smg_http_request_duration_seconds", "histogram", HELP_DURATION, durations),
            Family("smg_router_requests_total", "counter", HELP_ROUTED, routed),
            Family(
                "smg_http_connections_active",
                "gauge",
                HELP_CONNECTIONS,
                [Sample("", [proc], self.connections_active)],
            ),
            *retry_families,
        ]

    def _retry_families(self, proc: tuple[str, str]) -> list[Family]:
        regular = ("worker_type", "regular")
        retries = [
            Sample("", [proc, regular, ("endpoint", label)], value)
            for label, value in self.retries.items()
        ]
        exhausted = [
            Sample("", [proc, regular, ("endpoint", label)], value)
            for label, value in self.exhausted.items()
        ]
        backoffs: list[Sample] = []
        for number, hist in self.backoffs.items():
            backoffs.extend(histogram_samples([proc, ("attempt", number)], hist))
        return [
            Family("smg_worker_retries_total", "counter", HELP_RETRIES, retries),
            Family("smg_worker_retries_exhausted_total", "counter", HELP_EXHAUSTED, exhausted),
            Family("smg_worker_retry_backoff_seconds", "histogram", HELP_BACKOFF, backoffs),
        ]


def histogram_samples(base: list[tuple[str, str]], hist: Histogram) -> list[Sample]:
    """A histogram's Prometheus samples: cumulative buckets, +Inf, sum, count."""
    samples = []
    cumulative = 0
    for bound, count in zip(hist.buckets, hist.counts):
        cumulative += count
        samples.append(Sample("_bucket", [*base, ("le", str(bound))], cumulative))
    samples.append(Sample("_bucket", [*base, ("le", "+Inf")], hist.count))
    samples.append(Sample("_sum", base, hist.total))
    samples.append(Sample("_count", base, hist.count))
    return samples


# HELP texts follow the Rust SMG's where the meaning is the same.
HELP_REQUESTS = "Total HTTP requests by method and path"
HELP_RESPONSES = "Total HTTP responses by path, status_code and error_code"
HELP_DURATION = "HTTP request duration by method and path"
HELP_ROUTED = (
    "Total routed requests by router_type, backend_type, connection_mode, model, endpoint, "
    "streaming"
)
HELP_CONNECTIONS = "Currently active HTTP connections"
HELP_RETRIES = "Total retry attempts by worker_type and endpoint"
HELP_EXHAUSTED = "Requests that exhausted all retries by worker_type and endpoint"
HELP_BACKOFF = "Retry backoff duration by attempt number"
