"""FastAPI dependencies: the long-lived objects built in the lifespan, read from ``app.state``.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, which costs
a thread hand-off (and GIL contention) on every request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from app.services.health import HealthService
from app.services.inference import InferenceService
from app.services.jobs.service import JobService
from app.services.jobs.sockets import JobSockets
from app.services.registry import ModelRegistry
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_inference(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.inference
    return service


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def get_health(request: Request) -> HealthService:
    health: HealthService = request.app.state.health
    return health


# --- async jobs (HTTPConnection: usable from HTTP and WebSocket routes alike) ---------------------
def get_jobs(conn: HTTPConnection) -> JobService:
    service: JobService = conn.app.state.jobs.service
    return service


def get_job_sockets(conn: HTTPConnection) -> JobSockets:
    sockets: JobSockets = conn.app.state.jobs.sockets
    return sockets


SettingsDep = Annotated[Settings, Depends(get_settings)]
InferenceDep = Annotated[InferenceService, Depends(get_inference)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
HealthDep = Annotated[HealthService, Depends(get_health)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
JobSocketsDep = Annotated[JobSockets, Depends(get_job_sockets)]
