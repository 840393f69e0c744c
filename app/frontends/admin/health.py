"""``/healthz`` (process up) and ``/readyz`` (Triton live, models ready; Redis degraded is still ready)."""

from __future__ import annotations

from fastapi import APIRouter

from app.frontends.http.common import ORJSONResponse
from app.frontends.http.deps import HealthDep, SettingsDep
from app.frontends.http.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_class=ORJSONResponse, response_model=Health)
async def healthz() -> ORJSONResponse:
    return ORJSONResponse({"status": "ok"})


@router.get(
    "/readyz", response_class=ORJSONResponse, response_model=Readiness, responses={503: {"model": Readiness}}
)
async def readyz(health: HealthDep, settings: SettingsDep) -> ORJSONResponse:
    ready, checks = await health.readiness()
    if ready:
        degraded = any(c.get("status") == "degraded" for c in checks.values())
        return ORJSONResponse({"status": "degraded" if degraded else "ready", "checks": checks})
    return ORJSONResponse(
        {"status": "not_ready", "checks": checks},
        status_code=503,
        headers={"Retry-After": str(settings.server.retry_after_s)},
    )
