"""Prometheus metrics: ``GET /metrics`` (HTTP metrics from ``prometheus-fastapi-instrumentator`` plus the
gateway's own ``tgw_*`` metrics), in one process or several.

Multiprocess: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``tgw serve`` with ``TGW_WORKERS>1`` sets it to
a fresh temporary directory and removes it on exit), every worker writes its samples there and a scrape
served by any worker aggregates all of them (``prometheus_client.multiprocess``). Gauges use ``livesum``
(sum over live workers). The variable must be set before this module is imported.

Hot path: labelled children are bound once (``_CACHE_OUTCOMES`` ...) or memoised per label tuple.

Hooks for the async-jobs code (another module fills them; nothing here imports it):

* ``register_jobs_snapshot(app, fn)``: ``fn`` is ``async () -> JobsSnapshot`` (queue depth and the age of
  the oldest pending job, read from Redis). It is awaited on every scrape, bounded by 1 s; a failure is
  logged and the two gauges are left out of that scrape. Exposed as ``tgw_jobs_queue_depth`` and
  ``tgw_jobs_oldest_pending_age_seconds``. Being computed at scrape time from shared state, they are
  right with any number of workers.
* ``record_job(status)``: ``tgw_jobs_total{status}`` (queued, succeeded, failed, cancelled, retried, ...).
* ``record_webhook_delivery(outcome)``: ``tgw_webhook_deliveries_total{outcome}`` (success, retry, failed).
* ``websocket_opened()`` / ``websocket_closed()``: ``tgw_websockets_open``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator.metrics import Info
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SLOW = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BYTES = tuple(float(4**i * 256) for i in range(10))  # 256 B .. 64 MiB
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CACHE_REQUESTS = Counter(
    "tgw_cache_requests",
    "Response-cache lookups by outcome (hit, miss, bypass, error; skipped: Redis not asked because the "
    "model's recent hit ratio is below TGW_CACHE_READ_MIN_HIT_RATIO, answered by Triton)",
    ["outcome"],
)
CACHE_OPERATION_DURATION = Histogram(
    "tgw_cache_operation_duration_seconds", "Redis cache operation latency", ["operation"], buckets=_FAST
)
TRITON_DURATION = Histogram(
    "tgw_triton_request_duration_seconds",
    "Triton inference call latency by model, version and outcome (ok or an error code)",
    ["model", "version", "outcome"],
    buckets=_SLOW,
)
SINGLEFLIGHT_WAITERS = Gauge(
    "tgw_singleflight_waiters", "Requests waiting on an identical in-flight Triton call",
    multiprocess_mode="livesum",
)  # fmt: skip
SINGLEFLIGHT_SHARED = Counter(
    "tgw_singleflight_shared", "Requests answered by another identical in-flight Triton call"
)
REQUEST_SIZE = Histogram("tgw_request_size_bytes", "HTTP request body size", buckets=_BYTES)
RESPONSE_SIZE = Histogram("tgw_response_size_bytes", "HTTP response body size", buckets=_BYTES)
INFLIGHT = Gauge("tgw_inflight_requests", "HTTP requests being served", multiprocess_mode="livesum")
JOBS = Counter("tgw_jobs", "Async jobs reaching a status", ["status"])
JOB_RUNS = Counter(
    "tgw_job_runs", "Job attempts run by a worker, by the HTTP status their outcome stands for", ["status"]
)
JOB_RUN_DURATION = Histogram(
    "tgw_job_run_duration_seconds", "Time a worker spent on one job attempt", buckets=HTTP_LATENCY_BUCKETS
)
WEBHOOK_DELIVERIES = Counter("tgw_webhook_deliveries", "Webhook delivery attempts by outcome", ["outcome"])
WEBSOCKETS_OPEN = Gauge("tgw_websockets_open", "Open WebSocket connections", multiprocess_mode="livesum")
STAGE_DURATION = Histogram(
    "tgw_stage_duration_seconds",
    "Where an inference request's time goes: cache (Redis lookup), queue (gateway micro-batcher), triton "
    "(the Triton call), gateway (everything else in the gateway), total (the whole request)",
    ["stage"],
    buckets=(0.00005, 0.0001, 0.00025, *_FAST, 2.5, 5.0, 10.0),
)

# --- streams (app.services.streams): one decoupled request answered many times, whatever the door ---------
STREAMS_OPEN = Gauge(
    "tgw_streams_open", "Streams being served, by door", ["door"], multiprocess_mode="livesum"
)
STREAMS = Counter(
    "tgw_streams", "Streams ended, by door and how: completed, replayed (from the cache), client (the "
    "client went away or cancelled), deadline, duration (the tier's longest stream), overflow (a consumer "
    "too slow), job (its job was deleted), error", ["door", "end"],
)  # fmt: skip
STREAM_FIRST_RESPONSE = Histogram(
    "tgw_stream_first_response_seconds", "Time from a stream's start to its first response, by door and "
    "cache outcome", ["door", "cache"], buckets=HTTP_LATENCY_BUCKETS,
)  # fmt: skip
STREAM_RESPONSES = Histogram(
    "tgw_stream_responses", "Responses a stream carried", ["door"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000),
)  # fmt: skip

# --- gRPC front door (app.frontends.grpc): the HTTP metrics' counterparts, by RPC method and status code ---
GRPC_REQUESTS = Counter("tgw_grpc_requests", "gRPC requests by method and status code", ["method", "code"])
GRPC_DURATION = Histogram(
    "tgw_grpc_request_duration_seconds", "gRPC request latency by method", ["method"],
    buckets=HTTP_LATENCY_BUCKETS,
)  # fmt: skip

# --- traffic policies (app.services.traffic): canary splits, shadow comparisons, promotions ---------------
TRAFFIC_REQUESTS = Counter(
    "tgw_traffic_requests", "Requests whose version a traffic policy chose, by model, version and outcome "
    "(ok, error)", ["model", "version", "outcome"],
)  # fmt: skip
SHADOW_CALLS = Counter(
    "tgw_shadow_calls", "Shadow calls by model, production version, shadow version and outcome (compared, "
    "error: the shadow failed, mismatch: outputs of other shapes, dropped: TGW_TRAFFIC_SHADOW_MAX_IN_FLIGHT "
    "reached)", ["model", "version", "shadow_version", "outcome"],
)  # fmt: skip
SHADOW_DIFFERENCE = Histogram(
    "tgw_shadow_relative_difference", "Per output tensor of a compared shadow call: mean |shadow - "
    "production| over the production output's standard deviation", ["model", "version", "shadow_version"],
    buckets=(1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
)  # fmt: skip
SHADOW_EXACT = Histogram(
    "tgw_shadow_exact_match_ratio", "Per integer, bool or BYTES output tensor of a compared shadow call: the "
    "share of elements equal to production's", ["model", "version", "shadow_version"],
    buckets=(0.5, 0.9, 0.99, 0.999, 1.0),
)  # fmt: skip
TRAFFIC_DECISIONS = Counter(
    "tgw_traffic_decisions", "Automatic traffic decisions (promote, rollback) by model", ["model", "decision"]
)

# --- the event loop (app.observability.loop): what one step of work holds every other request for ---------
LOOP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 1.0)
LOOP_BUSY = Histogram(
    "tgw_event_loop_busy_seconds",
    "CPU time of the event-loop thread between two heartbeats TGW_LOOP_BEAT_MS apart (time waiting for the "
    "CPU or the interpreter lock not counted): a value above the beat is one step that long, or a busy loop",
    buckets=LOOP_BUCKETS,
)
LOOP_LAG = Histogram(
    "tgw_event_loop_lag_seconds",
    "How late the event loop's heartbeat ran (wall clock: blocking steps, CPU contention, the lock)",
    buckets=LOOP_BUCKETS,
)

_CACHE_OUTCOMES = {o: CACHE_REQUESTS.labels(o) for o in ("hit", "miss", "bypass", "error", "skipped")}
_CACHE_OPS = {op: CACHE_OPERATION_DURATION.labels(op) for op in ("get", "put")}
_triton_children: dict[tuple[str, str, str], Histogram] = {}
_STAGES = {stage: STAGE_DURATION.labels(stage) for stage in ("cache", "queue", "triton", "gateway", "total")}


def observe_stages(timings: dict[str, float], total: float) -> None:
    """One infer request's stage timings (seconds); ``gateway`` is what the stages do not account for."""
    spent = 0.0
    for stage, seconds in timings.items():
        child = _STAGES.get(stage)
        if child is not None:
            child.observe(seconds)
            spent += seconds
    _STAGES["gateway"].observe(max(total - spent, 0.0))
    _STAGES["total"].observe(total)


def cache_outcome(outcome: str) -> None:
    """``outcome``: hit, miss, bypass, error or skipped."""
    _CACHE_OUTCOMES[outcome].inc()


def cache_operation(operation: str, seconds: float) -> None:
    child = _CACHE_OPS.get(operation) or CACHE_OPERATION_DURATION.labels(operation)
    child.observe(seconds)


def triton_request(model: str, version: str, outcome: str, seconds: float) -> None:
    key = (model, version, outcome)
    child = _triton_children.get(key)
    if child is None:
        child = _triton_children[key] = TRITON_DURATION.labels(model, version, outcome)
    child.observe(seconds)


def traffic_request(model: str, version: str, outcome: str) -> None:
    TRAFFIC_REQUESTS.labels(model, version, outcome).inc()


def shadow_call(model: str, version: str, shadow: str, outcome: str) -> None:
    SHADOW_CALLS.labels(model, version, shadow, outcome).inc()


def shadow_difference(model: str, version: str, shadow: str, mean_rel: float, exact: float | None) -> None:
    if mean_rel == mean_rel:  # not NaN (a BYTES output has only its exact-match rate)
        SHADOW_DIFFERENCE.labels(model, version, shadow).observe(mean_rel)
    if exact is not None:
        SHADOW_EXACT.labels(model, version, shadow).observe(exact)


def traffic_decision(model: str, decision: str) -> None:
    TRAFFIC_DECISIONS.labels(model, decision).inc()


_grpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}


def grpc_request(method: str, code: str, seconds: float) -> None:
    children = _grpc_children.get((method, code))
    if children is None:
        children = _grpc_children[(method, code)] = (
            GRPC_REQUESTS.labels(method, code),
            GRPC_DURATION.labels(method),
        )
    children[0].inc()
    children[1].observe(seconds)


# --- jobs hooks ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobsSnapshot:
    queue_depth: float
    oldest_pending_age_seconds: float


JobsSnapshotFn = Callable[[], Awaitable[JobsSnapshot]]


def register_jobs_snapshot(app: Starlette, fn: JobsSnapshotFn) -> None:
    app.state.jobs_snapshot = fn


def record_job(status: str) -> None:
    JOBS.labels(status).inc()


def job_run(status: int, duration_s: float) -> None:
    JOB_RUNS.labels(str(status)).inc()
    JOB_RUN_DURATION.observe(duration_s)


def record_webhook_delivery(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def websocket_opened() -> None:
    WEBSOCKETS_OPEN.inc()


def websocket_closed() -> None:
    WEBSOCKETS_OPEN.dec()


class _SnapshotCollector(Collector):
    def __init__(self, snap: JobsSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "tgw_jobs_queue_depth", "Jobs waiting in the queue", value=self.snap.queue_depth
        )
        yield GaugeMetricFamily(
            "tgw_jobs_oldest_pending_age_seconds", "Age of the oldest pending job",
            value=self.snap.oldest_pending_age_seconds,
        )  # fmt: skip


# --- exposition ------------------------------------------------------------------------------------


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render(snapshot: JobsSnapshot | None = None) -> bytes:
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    if snapshot is not None:
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_SnapshotCollector(snapshot))
        body += generate_latest(extra)
    return body


async def metrics_endpoint(request: Request) -> Response:
    snapshot: JobsSnapshot | None = None
    fn: JobsSnapshotFn | None = getattr(request.app.state, "jobs_snapshot", None)
    if fn is not None:
        try:
            async with asyncio.timeout(1.0):
                snapshot = await fn()
        except Exception as exc:
            logger.warning("jobs metrics snapshot failed: %s", exc or type(exc).__name__)
    return Response(render(snapshot), media_type=CONTENT_TYPE_LATEST)


_http_instrumentation: tuple[Callable[[Info], None], ...] | None = None


def http_metrics() -> tuple[Callable[[Info], None], ...]:
    """The instrumentator's per-handler request counter (``http_requests_total{handler,method,status}``)
    and latency histogram (``http_request_duration_seconds{handler,method}``), observed by the request
    pipeline (``app.frontends.http.pipeline``) with its public ``Info``. Built once per process: they live
    in the global registry, and building them again (a second app in the same process, as in tests) would
    fail. Its
    ``default()`` set would also observe a second, label-less latency histogram and two size summaries on
    every request; body sizes are ``tgw_request/response_size_bytes`` here, so those are left out
    (measured: metrics are ~30 % of a cache hit's CPU, docs/performance.md)."""
    global _http_instrumentation
    if _http_instrumentation is None:
        from prometheus_fastapi_instrumentator import metrics as instrumentator

        built = [
            instrumentator.requests(),
            instrumentator.latency(should_include_status=False, buckets=HTTP_LATENCY_BUCKETS),
        ]
        assert all(built), "HTTP metrics already registered outside app.observability.metrics"
        _http_instrumentation = tuple(fn for fn in built if fn is not None)
    return _http_instrumentation


def setup_metrics(app: Starlette) -> None:
    """The ``/metrics`` route (Prometheus exposition of the global or multiprocess registry). HTTP metrics
    are observed by the request pipeline (``http_metrics``), not by a middleware of their own."""
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
