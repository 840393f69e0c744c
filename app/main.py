"""``create_app()``: the FastAPI application behind the request pipeline (``app.frontends.http.pipeline``).
Settings are built and validated here, and the edge (``app.gateway.build_edge``: drain state, request
recorder, auth stage) the pipeline needs from the start; everything else long-lived is built by
``build_gateway`` in the lifespan (with that edge) and held on ``app.state.gateway`` (routes get it through
``app.frontends.http.deps``); the lifespan only starts what this process serves."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.auth.runtime import check_model_priorities
from app.auth.stage import classifier
from app.frontends.admin import health, models, traffic
from app.frontends.admin import keys as auth_routes
from app.frontends.admin import usage as usage_routes
from app.frontends.admin.docs import install_docs
from app.frontends.grpc.server import GrpcFrontDoor
from app.frontends.http import schemas
from app.frontends.http.pipeline import Pipeline
from app.frontends.http.routes import RawRouter, RawRoutes, RouteTemplates, install_raw_routes
from app.frontends.http.web import install_exception_handlers
from app.frontends.jobs import routes as jobs
from app.frontends.kserve_http import routes as v2
from app.frontends.rest import routes as infer
from app.frontends.ws import routes as ws
from app.gateway import Edge, Gateway, build_edge, build_gateway
from app.observability import tracing
from app.observability.metrics import register_jobs_snapshot, setup_metrics
from app.settings import Settings

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """What this process serves, started and stopped: ``build_gateway`` built everything (with the edge the
    pipeline already holds); here the gRPC door starts (when enabled), the priority check runs, and the
    process takes signals (``Lifecycle.activate``)."""
    settings: Settings = app.state.settings
    async with build_gateway(settings, app.state.edge, grpc=_grpc_door) as gw:
        app.state.gateway = gw
        register_jobs_snapshot(app, gw.jobs.metrics_snapshot)
        assert gw.auth is not None  # a serving process's edge has its auth stage
        priority_check = check_model_priorities(gw.auth, gw.admin)  # logs, never blocks
        if gw.grpc is not None:  # KServe v2 over gRPC, same services and cache (app.frontends.grpc)
            app.state.grpc_port = await gw.grpc.start()
        gw.lifecycle.activate()  # SIGTERM drains (readiness 503)
        try:
            yield
        finally:
            gw.lifecycle.deactivate()
            gw.jobs.begin_drain()  # no new job or webhook while the front door drains (no signal needed)
            if gw.grpc is not None:  # no new RPCs; those in flight get TGW_DRAIN_S
                await gw.grpc.stop(settings.server.drain_s)
            priority_check.cancel()
    if settings.observability.otel_endpoint:
        tracing.shutdown_tracing()


def _grpc_door(gw: Gateway) -> GrpcFrontDoor:
    return GrpcFrontDoor(gw.settings.server, gw, gw.auth)


def raw_routes() -> RawRoutes:
    """The raw route table (``app.frontends.http.routes``): every door's rows; a new door adds its rows."""
    return RawRoutes((*infer.RAW_ROUTES, *v2.RAW_ROUTES))


class _AppGateway:
    """The raw routes' handlers get the gateway the lifespan built (``app.state.gateway``)."""

    __slots__ = ("state",)

    def __init__(self, app: FastAPI) -> None:
        self.state = app.state

    def __call__(self) -> Gateway:
        gw: Gateway = self.state.gateway
        return gw


def create_app(settings: Settings | None = None) -> Pipeline:
    """The ASGI application the server runs: the request pipeline (``app.frontends.http.pipeline``) in
    front of the FastAPI app (``web_app``). The pipeline is outermost, so the infer routes pass through no
    framework layer at all (FastAPI's own ``__call__`` costs ~12 µs per request here: its telemetry
    checks)."""
    settings = settings or Settings()
    app = web_app(settings)
    edge: Edge = app.state.edge
    assert edge.auth is not None
    return Pipeline(
        app,
        max_body_bytes=settings.server.max_body_bytes,
        lifecycle=edge.lifecycle,
        router=RawRouter(app.state.raw_routes, _AppGateway(app)),
        templates=app.state.route_templates.template,  # what the pipeline refuses before FastAPI routes it
        admission=edge.auth if edge.auth.enabled else None,
        requests=edge.requests,
        server_timing=settings.server.server_timing,
    )


def web_app(settings: Settings) -> FastAPI:
    """The FastAPI app: every route but the infer routes, the error handlers, the lifespan, OpenAPI."""
    app = FastAPI(
        title="triton-gateway",
        version=__version__,
        description="Validating, caching gateway in front of NVIDIA Triton Inference Server.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc with their assets served from the package: install_docs
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.raw_routes = routes = raw_routes()
    # The edge (drain state, request recorder, auth stage with the raw routes' auth classes handed in): built
    # once, held by the pipeline from now and by the gateway the lifespan builds with it.
    app.state.edge = edge = build_edge(settings, classifier(routes.auth_class))
    app.state.lifecycle, app.state.requests, app.state.auth = edge.lifecycle, edge.requests, edge.auth
    install_exception_handlers(app)
    routers = [module.router for module in (health, models, v2, jobs, ws, auth_routes, usage_routes, traffic)]
    for router in routers:
        app.include_router(router)
    schemas.document_errors(app)
    install_raw_routes(app, routes)  # their OpenAPI operations and the 405 of other methods
    if app.state.auth.enabled:
        auth_routes.document_auth(app, app.state.auth.path_class)
    if settings.observability.metrics_enabled:
        setup_metrics(app)
    tracing.setup_tracing(settings.observability.otel_endpoint, settings.observability.otel_service_name)
    # The routes' templates, for what the pipeline refuses before FastAPI routes it (the routers' own
    # routes: FastAPI's app.routes holds an included router as one opaque route).
    app.state.route_templates = RouteTemplates(
        [*(r for router in routers for r in router.routes), *app.routes]
    )
    return app
