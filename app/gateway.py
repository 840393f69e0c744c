"""The composition root of a gateway process, framework-free.

``build_edge(settings)`` builds what the HTTP pipeline needs before anything runs (``Edge``: the drain state,
the request recorder, the auth stage); ``build_gateway(settings, edge)`` builds everything else that lives
as long as the process (the Triton and Redis clients, the services, the jobs runtime and its Redis
clients, the front doors that are servers of their own: gRPC), holds the edge's parts too, and closes all of
it in order. Callers only choose what to start: the FastAPI lifespan (``app.main``) starts the gRPC door
and marks the process serving; ``tgw worker`` (no web app) builds the same gateway, with no door::

    async with build_gateway(settings) as gw:
        ctx = RequestContext.open("job", request_id)  # what the door knows of the call
        response = await gw.inference.infer(request, ctx)

Nothing is built at import time.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from app.auth.runtime import build_auth, stop_auth
from app.auth.stage import AuthStage, path_class
from app.clients.protocols import InferenceTransport, TritonAdmin
from app.clients.redis import RedisCacheStore, make_redis, warm_up
from app.clients.routed import RoutedTriton, routing_options, triton_targets
from app.clients.triton_shm import SharedMemoryTransport
from app.lifecycle import Lifecycle
from app.observability.loop import LoopMonitor
from app.observability.metrics import http_metrics
from app.observability.requests import Requests
from app.services.batcher import BatchingTransport
from app.services.cache import ReadPolicy, ResponseCache
from app.services.health import HealthService
from app.services.inference import InferenceService
from app.services.jobs.runtime import JobsRuntime
from app.services.offload import Offload
from app.services.registry import ModelRegistry
from app.services.statistics import ServedStatistics
from app.services.streams import StreamLimits
from app.services.traffic import TrafficPolicies
from app.services.usage import UsageMeter, UsageWebhooks
from app.settings import Settings, StreamSettings

logger = logging.getLogger(__name__)


class Door(Protocol):
    """A front door that is a server of its own (the gRPC one): built by ``build_gateway``, started and
    stopped by the process that serves it."""

    async def start(self) -> int: ...

    async def stop(self, grace_s: float) -> None: ...


DoorFactory = Callable[["Gateway"], Door]


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Edge:
    """What the HTTP pipeline holds from its construction on, before the lifespan builds the gateway (which
    then holds the same objects): one per process."""

    lifecycle: Lifecycle  # drain state: /readyz, Connection: close, the drain hooks
    requests: Requests  # records every finished request: metrics, access-log line (every door)
    auth: AuthStage | None  # keys and limits: the pipeline's admission stage, the gRPC door's (None: a
    # process that serves no request, ``tgw worker``, which may run without TGW_KEY_PEPPER)
    usage: UsageMeter | None = None  # usage metering and budgets (None: TGW_USAGE_ENABLED off)


def usage_webhooks(settings: Settings, redis: Any) -> UsageWebhooks:
    """The ``usage.warning`` sender: the jobs' webhook settings (secret, SSRF guard, timeouts)."""
    import httpx

    from app.services.jobs.webhooks import HttpxWebhookSender, parse_secrets

    jobs = settings.jobs
    t = jobs.webhook_timeout_s
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(t, connect=min(t, 5.0)), follow_redirects=False, trust_env=False
    )
    sender = HttpxWebhookSender(
        client, jobs.webhook_allow_private, jobs.webhook_max_response_bytes, t,
        frozenset(jobs.webhook_allowed_ports), first_byte_s=jobs.webhook_first_byte_s,
    )  # fmt: skip
    return UsageWebhooks(redis, sender, parse_secrets(jobs.webhook_secret), client)


def build_usage(settings: Settings) -> UsageMeter | None:
    """The usage meter (``app.services.usage``): counts in Redis where keys and limits live (its client
    connects lazily, on the first flush's loop); started and stopped by ``build_gateway``."""
    auth = settings.auth
    if not auth.usage_enabled:
        return None
    timeout = max(auth.auth_redis_timeout_s, 2.0)
    redis = make_redis(settings.auth_redis_address, timeout, settings.cache.redis_cluster)
    return UsageMeter(redis, auth.usage_flush_interval_s, auth.usage_retention_days)


def stream_limits(settings: StreamSettings) -> StreamLimits:
    return StreamLimits(
        buffer_responses=settings.stream_buffer_responses, buffer_bytes=settings.stream_buffer_bytes,
        max_duration_s=settings.stream_max_duration_s, cache_max_bytes=settings.stream_cache_max_bytes,
    )  # fmt: skip


def build_edge(settings: Settings, classify: Callable[[str], str] = path_class, serving: bool = True) -> Edge:
    """``classify``: the paths' authentication classes (``app.auth.stage.classifier`` over the doors' route
    tables); ``serving``: False in a process that answers no request (``tgw worker``: no auth stage)."""
    auth = build_auth(settings, classify) if serving else None
    observability = settings.observability
    requests = Requests(
        http_metrics() if observability.metrics_enabled else (),
        access_log_sample=observability.access_log_sample,
    )
    usage = build_usage(settings)
    if usage is not None:
        requests.meter = usage.record  # every door's requests, once each (Served.end)
        if auth is not None:
            auth.budgets = usage  # the monthly budgets, checked with the rate limits
    return Edge(Lifecycle(), requests, auth, usage)


@dataclass(slots=True)
class Gateway:
    settings: Settings
    admin: TritonAdmin  # health, metadata, config, index, statistics (gRPC; RoutedTriton: over many)
    transport: InferenceTransport  # the inference transport as built (HTTP or gRPC), before batching
    redis: Any | None  # the cache's Redis client (None: cache disabled)
    cache: ResponseCache
    registry: ModelRegistry
    inference: InferenceService
    health: HealthService
    jobs: JobsRuntime
    lifecycle: Lifecycle
    offload: Offload  # large bodies decoded, large answers encoded, in child processes (TGW_DECODE_PROCESSES)
    requests: Requests  # records every finished request: metrics, access-log line (gRPC, /v1/ws frames)
    auth: AuthStage | None  # keys and limits (the edge's): the HTTP pipeline's admission, the gRPC door's
    usage: UsageMeter | None = None  # usage metering and budgets (the edge's)
    grpc: Door | None = None  # the gRPC front door, built when asked for and TGW_GRPC_ENABLED; not started


def build_traffic(settings: Settings) -> TrafficPolicies:
    """The models' traffic policies, from the keys' Redis (where nothing is evicted; ``tgw traffic`` writes
    there too); none when TGW_TRAFFIC_ENABLED is off."""
    t = settings.traffic
    redis = (
        make_redis(settings.auth_redis_address, max(settings.auth.auth_redis_timeout_s, 1.0),
                   settings.cache.redis_cluster)
        if t.traffic_enabled else None
    )  # fmt: skip
    return TrafficPolicies(
        redis, poll_s=t.traffic_poll_interval_s, shadow_max_in_flight=t.traffic_shadow_max_in_flight,
        lease_s=t.traffic_lease_s, evaluate_s=t.traffic_evaluate_interval_s,
        latency_samples=t.traffic_latency_samples, timeout_s=settings.triton.triton_timeout_s,
    )  # fmt: skip


# What the decode processes run (``app.services.offload``): imported in each child when it starts, so the
# first large body does not pay for the imports.
DECODE_MODULES = (
    "app.frontends.grpc.codec", "app.frontends.rest.codec", "app.frontends.kserve_http.codec",
    "app.services.jobs.service", "app.services.jobs.sockets",
)  # fmt: skip


@asynccontextmanager
async def build_gateway(
    settings: Settings, edge: Edge | None = None, *, grpc: DoorFactory | None = None
) -> AsyncIterator[Gateway]:
    """``edge``: the one the process's pipeline holds (else one is built here); ``grpc``: how to build the
    gRPC door (``app.frontends.grpc``, above this layer), built when ``TGW_GRPC_ENABLED``; whoever serves it
    starts and stops it (``gw.grpc``). The edge's auth stage is closed here, with the rest."""
    edge = edge or build_edge(settings, serving=False)
    lifecycle, requests = edge.lifecycle, edge.requests
    # One Triton or many (TGW_TRITON_URLS): admin and inference go through the routed client, whose probes
    # make a frozen Triton a quick 503; inference over HTTP where an endpoint names its HTTP address
    # (TGW_TRITON_HTTP_URL for one Triton), else over the admin's gRPC channels.
    routed = RoutedTriton(
        triton_targets(settings.triton, settings.triton_grpc_address),
        routing_options(settings.triton, settings.server.retry_after_s),
    )
    await routed.start()
    admin: TritonAdmin = routed
    transport: InferenceTransport = routed
    # Large inputs and outputs through shared memory (TGW_TRITON_SHM, app.clients.triton_shm), the rest
    # as above.
    shm: SharedMemoryTransport | None = None
    base: InferenceTransport = transport
    if settings.triton.triton_shm != "off":
        shm = SharedMemoryTransport(
            transport, settings.triton_grpc_address, settings.triton.shm_min_bytes,
            settings.triton.shm_regions, settings.triton.shm_region_bytes,
            retry_after_s=settings.server.retry_after_s, kind=settings.triton.triton_shm,
            cuda_device=settings.triton.shm_cuda_device,
        )  # fmt: skip
        base = shm
    infer_transport: InferenceTransport = (
        BatchingTransport(base, settings.triton.batch_window_us, settings.triton.batch_max_in_flight)
        if settings.triton.batch_enabled
        else base
    )
    redis = (
        make_redis(
            settings.cache_redis_address, settings.cache.cache_redis_timeout_s, settings.cache.redis_cluster
        )
        if settings.cache.cache_enabled
        else None
    )
    if redis is not None:
        await warm_up(redis)
    store = RedisCacheStore(redis, settings.cache.cache_redis_timeout_s) if redis is not None else None
    cache = ResponseCache(
        store, settings.cache.cache_ttl_s, settings.cache.cache_max_value_bytes,
        l1_entries=settings.cache.l1_cache_entries, l1_bytes=settings.cache.l1_cache_bytes,
        l1_ttl_s=settings.cache.l1_cache_ttl_s,
    )  # fmt: skip
    registry = ModelRegistry(admin, settings.triton.metadata_ttl_s, settings.cache.cache_exclude_models)
    served = ServedStatistics(admin, redis, settings.cache.cache_namespace)
    traffic = build_traffic(settings)
    inference = InferenceService(
        infer_transport, registry, cache, settings.cache.cache_namespace, settings.triton.triton_timeout_s,
        ReadPolicy(settings.cache.cache_read_min_hit_ratio), served, stream_limits(settings.streams), traffic,
    )  # fmt: skip
    health = HealthService(admin, transport, cache)
    offload = Offload(settings.server.decode_processes, preload=DECODE_MODULES)
    jobs = JobsRuntime(
        settings.jobs, inference, offload, requests, redis_url=settings.jobs_redis_address,
        redis_cluster=settings.cache.redis_cluster, retry_after_s=settings.server.retry_after_s,
        triton_timeout_s=settings.triton.triton_timeout_s,
        stream_max_s=settings.streams.stream_max_duration_s,
    )  # fmt: skip
    gw = Gateway(
        settings, admin, transport, redis, cache, registry, inference, health, jobs, lifecycle, offload,
        requests, edge.auth, edge.usage,
    )  # fmt: skip
    lifecycle.watch(health)
    lifecycle.drain_hooks.append(jobs.begin_drain)
    monitor = LoopMonitor(settings.server.loop_beat_ms / 1000)
    try:
        if grpc is not None and settings.server.grpc_enabled:
            gw.grpc = grpc(gw)  # built, not started: the serving process starts it
        monitor.start()
        offload.start()  # its children start in the background: the first large body pays no spawn
        if shm is not None:
            await shm.start()
        await jobs.start()
        served.start()
        await traffic.start()
        if edge.usage is not None:
            edge.usage.webhooks_out = usage_webhooks(settings, edge.usage.redis)
            edge.usage.start()
        logger.info("gateway up: Triton %s (inference over %s), Redis %s",
                    settings.triton.triton_urls or settings.triton_grpc_address,
                    "routed" if settings.triton.triton_urls else
                    f"HTTP {settings.triton.triton_http_url}" if settings.triton.triton_http_url else "gRPC",
                    settings.cache_redis_address if redis is not None else "disabled")  # fmt: skip
        # What start-up built lives as long as the process: out of the garbage collector's full passes, which
        # otherwise walk all of it (~110k objects: a 20-65 ms pause of the event loop, now and then).
        gc.freeze()
        yield gw
    finally:
        # Every part is closed even if one fails to (a part left open, a gRPC channel above all, outlives
        # the event loop it belongs to).
        in_process, auth, usage = settings.jobs.job_worker_in_process, edge.auth, edge.usage
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("auth", (lambda: stop_auth(auth)) if auth is not None else _nothing),
            ("jobs", lambda: jobs.stop(drain_s=min(settings.server.drain_s, 5.0) if in_process else 0)),
            ("cache writes", lambda: inference.drain_writes(timeout_s=1.0)),
            ("traffic policies", traffic.stop),
            ("decode pool", offload.close),
            ("served statistics", served.stop),
            ("usage", usage.close if usage is not None else _nothing),  # after the jobs: their attempts
            ("cache store", store.close if store is not None else _nothing),
            ("shared memory", shm.close if shm is not None else _nothing),
            ("inference transport", transport.close if transport is not admin else _nothing),
            ("Triton clients", admin.close),
        ]
        monitor.stop()
        for name, close in steps:
            try:
                await close()
            except Exception:
                logger.exception("closing the gateway: %s failed; closing the rest", name)
