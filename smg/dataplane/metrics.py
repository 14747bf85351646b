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


# Sub-millisecond resolution for what the gateway itself spends (overhead, accept to
# head, connect on loopback) up to a second, past which it is broken anyway.
FAST_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
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
)
# Event-loop lag: how late a periodic timer ran (a blocked loop shows up as seconds).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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


class PoolStats:
    """One worker's upstream pool in one process: reuse and connect time. Held by its
    `WorkerPool` and by the metrics (keyed by worker URL), so the counts outlive a pool
    dropped when its row is reused or the worker is removed and added again."""

    __slots__ = ("connect", "hits", "misses")

    def __init__(self) -> None:
        self.hits = 0  # an idle keep-alive connection reused
        self.misses = 0  # a new connection opened (attempted)
        self.connect = Histogram(FAST_BUCKETS)  # successful connects only


class DataPlaneMetrics:
    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.requests: dict[tuple[str, str], int] = {}  # (method, path)
        self.responses: dict[tuple[str, int, str], int] = {}  # (path, status, error_code)
        self.durations: dict[tuple[str, str], Histogram] = {}
        # (model, endpoint, streaming, connection mode: "http" | "grpc")
        self.routed: dict[tuple[str, str, str, str], int] = {}
        # Time to first token of a stream (SMG's smg_router_ttft_seconds): (model,
        # endpoint, connection mode). Served model names ("other" for the rest) and route
        # paths only, so the label set stays as small as smg_router_requests_total's.
        self.ttfts: dict[tuple[str, str, str], Histogram] = {}
        self.connections_active = 0
        # Retries, under SMG's names (`smg_worker_retries_total` and friends).
        self.retries: dict[str, int] = {}  # endpoint label -> retries started
        self.exhausted: dict[str, int] = {}  # endpoint label -> requests out of attempts
        self.backoffs: dict[str, Histogram] = {}  # retry number ("1" = first retry)
        # Observability of the gateway itself (smg only): see the HELP texts.
        self.overhead = Histogram(FAST_BUCKETS)
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.accept_to_head = Histogram(FAST_BUCKETS)
        self.pools: dict[str, PoolStats] = {}  # worker URL -> its pool's numbers
        # smg_router_requests_total's and smg_router_ttft_seconds' backend_type: "pd" in
        # prefill/decode mode (smg.dataplane.pd), as 1.13 labels its PD router's requests.
        self.backend_type = "regular"

    def pool(self, worker: str) -> PoolStats:
        """The pool numbers of `worker` (a URL), made on first use."""
        stats = self.pools.get(worker)
        if stats is None:
            stats = self.pools[worker] = PoolStats()
        return stats

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

    def routed_request(
        self, model: str, endpoint: str, streaming: bool, mode: str = "http"
    ) -> None:
        key = (model, endpoint, "true" if streaming else "false", mode)
        self.routed[key] = self.routed.get(key, 0) + 1

    def ttft(self, model: str, endpoint: str, mode: str, seconds: float) -> None:
        """A stream's first token (gRPC) or first event-stream body chunk (HTTP proxy)
        left `seconds` after the request was taken: one lookup, one observe."""
        key = (model, endpoint, mode)
        hist = self.ttfts.get(key)
        if hist is None:
            hist = self.ttfts[key] = Histogram(self.buckets)
        hist.observe(seconds)

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
                    ("router_type", mode),
                    ("backend_type", self.backend_type),
                    ("connection_mode", mode),
                    ("model", model),
                    ("endpoint", endpoint),
                    ("streaming", streaming),
                ],
                value,
            )
            for (model, endpoint, streaming, mode), value in self.routed.items()
        ]
        ttfts: list[Sample] = []
        for (model, endpoint, mode), hist in self.ttfts.items():
            labels = [
                proc,
                ("router_type", mode),
                ("backend_type", self.backend_type),
                ("model", model),
                ("endpoint", endpoint),
            ]
            ttfts += histogram_samples(labels, hist)
        retry_families = self._retry_families(proc)
        own_families = self._own_families(proc)
        return [
            Family("smg_http_requests_total", "counter", HELP_REQUESTS, requests),
            Family("smg_http_responses_total", "counter", HELP_RESPONSES, responses),
            Family("smg_http_request_duration_seconds", "histogram", HELP_DURATION, durations),
            Family("smg_router_requests_total", "counter", HELP_ROUTED, routed),
            Family("smg_router_ttft_seconds", "histogram", HELP_TTFT, ttfts),
            Family(
                "smg_http_connections_active",
                "gauge",
                HELP_CONNECTIONS,
                [Sample("", [proc], self.connections_active)],
            ),
            *retry_families,
            *own_families,
        ]

    def _own_families(self, proc: tuple[str, str]) -> list[Family]:
        hits = []
        misses = []
        connect: list[Sample] = []
        for worker, stats in self.pools.items():
            labels = [proc, ("worker", worker)]
            hits.append(Sample("", labels, stats.hits))
            misses.append(Sample("", labels, stats.misses))
            connect += histogram_samples(labels, stats.connect)
        return [
            Family(
                "smg_gateway_overhead_seconds",
                "histogram",
                HELP_OVERHEAD,
                histogram_samples([proc], self.overhead),
            ),
            Family(
                "smg_event_loop_lag_seconds",
                "histogram",
                HELP_LOOP_LAG,
                histogram_samples([proc], self.loop_lag),
            ),
            Family(
                "smg_http_accept_to_request_seconds",
                "histogram",
                HELP_ACCEPT,
                histogram_samples([proc], self.accept_to_head),
            ),
            Family("smg_upstream_connect_seconds", "histogram", HELP_CONNECT, connect),
            Family("smg_upstream_pool_hits_total", "counter", HELP_POOL_HITS, hits),
            Family("smg_upstream_pool_misses_total", "counter", HELP_POOL_MISSES, misses),
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
HELP_TTFT = (
    "Time to first token by router_type, backend_type, model, endpoint (streams: the first "
    "generated token sent (grpc), the first body chunk of a relayed event stream (http))"
)
HELP_CONNECTIONS = "Currently active HTTP connections"
HELP_RETRIES = "Total retry attempts by worker_type and endpoint"
HELP_EXHAUSTED = "Requests that exhausted all retries by worker_type and endpoint"
HELP_BACKOFF = "Retry backoff duration by attempt number"
# smg only (the Rust SMG has no such series).
HELP_OVERHEAD = (
    "Time spent in smg per proxied request, upstream time excluded: request received to "
    "its first byte written upstream, plus the upstream response head received to that "
    "head written to the client (with the body that came in the same read; for streams "
    "the head part only)"
)
HELP_LOOP_LAG = "How late a periodic 0.5 s timer ran on this process's event loop"
HELP_ACCEPT = "Time from a client connection's accept to its first request head parsed"
HELP_CONNECT = "Time to open a new upstream connection (TCP, and TLS when used), by worker"
HELP_POOL_HITS = "Upstream requests sent on an idle keep-alive connection reused, by worker"
HELP_POOL_MISSES = "New upstream connections opened (attempted), by worker"
