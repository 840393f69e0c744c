"""``create_app()``: the FastAPI application. Settings are built and validated here; long-lived clients
(gRPC channels, the Redis pool) are created in the lifespan and held on ``app.state``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.clients.endpoints import parse_triton_urls
from app.clients.protocols import TritonClient
from app.clients.redis import RedisCacheStore, make_redis, warm_up
from app.clients.routed import RoutedTriton, routing_options
from app.clients.triton import TritonGrpcClient, settings_channel_args
from app.clients.triton_http import TritonHttpInfer
from app.errors import install_exception_handlers
from app.hotpath import GatewayApp, HotPath
from app.lifecycle import Lifecycle
from app.middleware import RequestContextMiddleware
from app.observability import tracing
from app.observability.metrics import http_metrics, register_jobs_snapshot, setup_metrics
from app.observability.middleware import ObservabilityMiddleware
from app.routers import health, infer, jobs, models, v2, ws
from app.services.batcher import BatchingTritonClient
from app.services.cache import ResponseCache
from app.services.health import HealthService
from app.services.inference import InferenceService
from app.services.jobs.runtime import JobsRuntime
from app.services.registry import ModelRegistry
from app.settings import Settings

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    triton: TritonClient
    routed: RoutedTriton | None = None
    if settings.triton_urls:  # many Tritons: admin and inference both routed (app.clients.routed)
        routed = RoutedTriton(parse_triton_urls(settings.triton_urls), routing_options(settings))
        await routed.start()
        triton = routed
    else:
        triton = TritonGrpcClient(
            settings.triton_grpc_address,
            channels=settings.triton_channels,
            retries=settings.triton_retries,
            retry_after_s=settings.retry_after_s,
            args=settings_channel_args(settings),
        )
    redis = (
        make_redis(settings.redis_address, settings.redis_timeout_s, settings.redis_cluster)
        if settings.cache_enabled
        else None
    )
    if redis is not None:
        await warm_up(redis)
    store = RedisCacheStore(redis, settings.redis_timeout_s) if redis is not None else None
    cache = ResponseCache(
        store, settings.cache_ttl_s, settings.cache_max_value_bytes,
        l1_entries=settings.l1_cache_entries, l1_bytes=settings.l1_cache_bytes,
        l1_ttl_s=settings.l1_cache_ttl_s,
    )  # fmt: skip
    registry = ModelRegistry(triton, settings.metadata_ttl_s, settings.cache_exclude_models)
    # Inference over Triton's HTTP endpoint when TGW_TRITON_HTTP_URL is set (app.clients.triton_http);
    # micro-batching wraps only the client the inference path uses; health and metadata go direct (gRPC).
    upstream: TritonClient = triton
    if settings.triton_http_url and routed is None:
        upstream = TritonHttpInfer(
            settings.triton_http_url, triton, retries=settings.triton_retries,
            retry_after_s=settings.retry_after_s,
        )  # fmt: skip
    infer_client: TritonClient = (
        BatchingTritonClient(upstream, registry.peek, settings.batch_window_us, settings.batch_max_inflight)
        if settings.batch_enabled
        else upstream
    )
    app.state.triton = triton
    app.state.redis = redis
    app.state.cache = cache
    app.state.registry = registry
    app.state.batcher = infer_client if isinstance(infer_client, BatchingTritonClient) else None
    app.state.inference = InferenceService(
        infer_client, registry, cache, settings.cache_namespace, settings.triton_timeout_s
    )
    app.state.health = HealthService(upstream, cache)  # Triton is live when every endpoint we use answers
    # --- lifecycle: SIGTERM drains (readiness 503), hooks on app.state.lifecycle ---
    lifecycle: Lifecycle = app.state.lifecycle
    lifecycle.watch(app.state.health)
    lifecycle.activate()
    # --- async jobs: store, service, event fan-out; worker + webhooks if TGW_WORKER_IN_PROCESS ---
    app.state.jobs = JobsRuntime(settings, app.state.inference)
    await app.state.jobs.start()
    register_jobs_snapshot(app, app.state.jobs.metrics_snapshot)
    lifecycle.drain_hooks.append(app.state.jobs.begin_drain)
    logger.info("gateway up: Triton %s (inference over %s), Redis %s", settings.triton_grpc_address,
                f"HTTP {settings.triton_http_url}" if settings.triton_http_url else "gRPC",
                settings.redis_address if redis is not None else "disabled")  # fmt: skip
    try:
        yield
    finally:
        await lifecycle.run_shutdown_hooks(settings.drain_s)
        lifecycle.deactivate()
        await app.state.jobs.stop(drain_s=min(settings.drain_s, 5.0) if settings.worker_in_process else 0)
        await app.state.inference.drain_writes(timeout_s=1.0)
        if store is not None:
            await store.close()
        if upstream is not triton:
            await upstream.close()
        await triton.close()
        if settings.otel_endpoint:
            tracing.shutdown_tracing()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = GatewayApp(
        title="triton-gateway",
        version=__version__,
        description="Validating, caching gateway in front of NVIDIA Triton Inference Server.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_exception_handlers(app)
    for module in (health, models, infer, v2, jobs, ws):
        app.include_router(module.router)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    # --- observability (outermost): metrics, access log, tracing; lifecycle hooks ---
    app.state.lifecycle = Lifecycle()
    if settings.metrics_enabled:
        setup_metrics(app)
    tracing.setup_tracing(settings.otel_endpoint, settings.otel_service_name)
    app.add_middleware(ObservabilityMiddleware, lifecycle=app.state.lifecycle)
    if settings.fast_path:  # the infer routes, answered before the middleware stack (app.hotpath)
        app.hot = HotPath(app, settings.max_body_bytes, http_metrics() if settings.metrics_enabled else ())
    return app
