"""FastAPI dependencies: the long-lived objects built by ``build_gateway`` in the lifespan, read from
``app.state.gateway``. ``HTTPConnection`` makes them usable from HTTP and WebSocket routes alike.

The caller's own (``PrincipalDep``, ``AuthDep``) are app.auth's: ``app.frontends.http.caller``.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, which costs
a thread hand-off (and GIL contention) on every request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.clients.protocols import TritonAdmin
from app.gateway import Gateway
from app.services.health import HealthService
from app.services.inference import InferenceService
from app.services.jobs.service import JobService
from app.services.jobs.sockets import JobSockets
from app.services.registry import ModelRegistry
from app.settings import Settings


async def get_gateway(conn: HTTPConnection) -> Gateway:
    gateway: Gateway = conn.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def get_settings(conn: HTTPConnection) -> Settings:
    settings: Settings = conn.app.state.settings
    return settings


async def get_inference(gw: GatewayDep) -> InferenceService:
    return gw.inference


async def get_registry(gw: GatewayDep) -> ModelRegistry:
    return gw.registry


async def get_admin(gw: GatewayDep) -> TritonAdmin:
    return gw.admin


async def get_health(gw: GatewayDep) -> HealthService:
    return gw.health


async def get_jobs(gw: GatewayDep) -> JobService:
    return gw.jobs.service


async def get_job_sockets(gw: GatewayDep) -> JobSockets:
    return gw.jobs.sockets


SettingsDep = Annotated[Settings, Depends(get_settings)]
InferenceDep = Annotated[InferenceService, Depends(get_inference)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
AdminDep = Annotated[TritonAdmin, Depends(get_admin)]
HealthDep = Annotated[HealthService, Depends(get_health)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
JobSocketsDep = Annotated[JobSockets, Depends(get_job_sockets)]
