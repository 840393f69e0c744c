"""``create_app()``: the FastAPI application behind the request pipeline (``app.pipeline``). Settings are
built and validated here; the long-lived clients and services are built by ``build_gateway`` in the
lifespan and held on ``app.state.gateway`` (routes get them through ``app.deps``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.errors import install_exception_handlers
from app.gateway import Gateway, build_gateway
from app.lifecycle import Lifecycle
from app.observability import tracing
from app.observability.metrics import http_metrics, register_jobs_snapshot, setup_metrics
from app.pipeline import InferRoute, InferRouter, Pipeline
from app.routers import health, infer, jobs, models, v2, ws
from app.routers.common import Headers
from app.settings import Settings

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    lifecycle: Lifecycle = app.state.lifecycle
    async with build_gateway(settings, lifecycle) as gw:
        app.state.gateway = gw
        register_jobs_snapshot(app, gw.jobs.metrics_snapshot)
        lifecycle.activate()  # SIGTERM drains (readiness 503)
        try:
            yield
        finally:
            lifecycle.deactivate()
    if settings.otel_endpoint:
        tracing.shutdown_tracing()


def _infer_router(app: FastAPI) -> InferRouter:
    """The infer routes' handlers, bound to the gateway built in the lifespan."""

    def gateway() -> Gateway:
        gw: Gateway = app.state.gateway
        return gw

    async def v1(route: InferRoute, body: bytes, headers: Headers) -> infer.Reply:
        return await infer.serve_v1(gateway().inference, route.model, route.version, body, headers)

    async def kserve(route: InferRoute, body: bytes, headers: Headers) -> infer.Reply:
        return await v2.serve_v2(gateway().inference, route.model, route.version, body, headers)

    return InferRouter({"v1": v1, "v2": kserve})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="triton-gateway",
        version=__version__,
        description="Validating, caching gateway in front of NVIDIA Triton Inference Server.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.lifecycle = Lifecycle()
    install_exception_handlers(app)
    for module in (health, models, v2, jobs, ws):
        app.include_router(module.router)
    infer.document_infer_routes(app)
    if settings.metrics_enabled:
        setup_metrics(app)
    tracing.setup_tracing(settings.otel_endpoint, settings.otel_service_name)
    app.add_middleware(
        Pipeline,
        max_body_bytes=settings.max_body_bytes,
        lifecycle=app.state.lifecycle,
        router=_infer_router(app),
        http_metrics=http_metrics() if settings.metrics_enabled else (),
        server_timing=settings.server_timing,
    )
    return app
