"""The traffic policies admin API (admin credential; the auth stage enforces it by path):
``GET/PUT/DELETE /v1/admin/models/{model}/traffic`` and ``POST /v1/admin/models/{model}/traffic/promote`` or
``/rollback``. ``tgw traffic`` does the same from the command line (``app.services.traffic`` for both)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.errors import Conflict, InvalidInput, NotFound
from app.frontends.http.caller import PrincipalDep
from app.frontends.http.deps import GatewayDep
from app.frontends.http.web import ORJSONResponse, errors
from app.gateway import Gateway
from app.services.traffic import TrafficStore

router = APIRouter(prefix="/v1/admin/models", tags=["traffic"])


class TrafficSpec(BaseModel):
    """A model's traffic policy, as ``PUT`` takes it (every field; absent ones take their defaults) and
    ``GET`` shows it (with its revision, its evidence and its decisions)."""

    model_config = ConfigDict(extra="allow")

    weights: Any = Field(description='version -> weight (>= 0, summing to > 0), e.g. {"1": 90, "2": 10}')
    sticky: Any = Field(None, description="key or tenant: a caller keeps its version while weights stay")
    shadow: Any = Field(None, description="a version the sampled requests' inputs also go to")
    shadow_sample: Any = Field(None, description="the share of requests shadowed, in [0, 1] (default 1)")
    promote_when: Any = Field(None, description="e.g. n>=200,mean_rel<=0.01,err_delta<=0.01,p99_ratio<=1.2")
    rollback_when: Any = Field(None, description="e.g. n>=50,err_delta>0.05")


class TrafficView(BaseModel):
    """A model's policy as in force, with the evidence gathered under its revision and its decisions."""

    model: str
    weights: dict[str, float]
    sticky: str | None
    shadow: str | None
    shadow_sample: float
    promote_when: str | None
    rollback_when: str | None
    revision: int
    updated_by: str
    updated_at: str | None = Field(description="ISO 8601, UTC")
    production: str | None = Field(description="the version with the largest weight")
    candidate: str | None = Field(
        description="the shadow, else the other weighted version: promoted or rolled back"
    )
    versions: dict[str, dict[str, Any]] = Field(description="per version: requests, errors, p50_ms, p99_ms")
    shadow_comparisons: list[dict[str, Any]] = Field(
        description="per (production, shadow) pair: calls, compared, errors, mismatched, dropped, and per "
        "output mean_rel, mean_abs, max_abs (exact_match for integer outputs)"
    )
    evidence: dict[str, float | None] = Field(description="what promote_when / rollback_when test")
    decisions: list[dict[str, Any]] = Field(description="promotions and rollbacks, newest first")


class Removed(BaseModel):
    model: str
    removed: bool


_OFF = {409: "traffic policies are off (TGW_TRAFFIC_ENABLED=false)"}


def _store(gw: Gateway) -> TrafficStore:
    store = gw.inference.traffic.store
    if store is None:
        raise Conflict("traffic policies are off (TGW_TRAFFIC_ENABLED=false)")
    return store


def _who(principal: Any) -> str:
    return f"admin-api:{principal.key_id or 'anonymous'}"


async def _shown(gw: Gateway, model: str) -> dict[str, Any]:
    summary = await _store(gw).summary(model)
    if summary is None:
        raise NotFound(f"model {model!r} has no traffic policy", {"model": model})
    return summary


@router.get(
    "/{model}/traffic",
    response_class=ORJSONResponse,
    response_model=TrafficView,
    responses=errors(404, 409, notes={404: "no policy", **_OFF}),
)
async def get_traffic(model: str, gw: GatewayDep) -> ORJSONResponse:
    """The policy, the evidence gathered under its revision (per version, per shadow comparison) and the
    promotions and rollbacks made."""
    return ORJSONResponse(await _shown(gw, model))


@router.put(
    "/{model}/traffic",
    response_class=ORJSONResponse,
    response_model=TrafficView,
    responses=errors(404, 409, 422, notes=_OFF),
)
async def put_traffic(
    model: str, spec: TrafficSpec, gw: GatewayDep, principal: PrincipalDep
) -> ORJSONResponse:
    """Set the policy (a new revision: its evidence starts afresh); every replica applies it within
    TGW_TRAFFIC_POLL_INTERVAL_S. Weights and the shadow only over the model's ready versions."""
    body = {k: v for k, v in spec.model_dump().items() if v is not None or k in spec.model_fields_set}
    versions = await gw.registry.ready_versions(model)  # 404 for an unknown model
    store = _store(gw)
    await store.set(model, body, versions, _who(principal))
    await gw.inference.traffic.refresh()  # in force here at once
    return ORJSONResponse(await _shown(gw, model))


@router.delete(
    "/{model}/traffic",
    response_class=ORJSONResponse,
    response_model=Removed,
    responses=errors(404, 409, notes={404: "no policy", **_OFF}),
)
async def delete_traffic(model: str, gw: GatewayDep, principal: PrincipalDep) -> ORJSONResponse:
    """Remove the policy: the latest ready version serves the requests that name none again."""
    if not await _store(gw).remove(model, _who(principal)):
        raise NotFound(f"model {model!r} has no traffic policy", {"model": model})
    await gw.inference.traffic.refresh()
    return ORJSONResponse({"model": model, "removed": True})


@router.post(
    "/{model}/traffic/{decision}", response_class=ORJSONResponse, response_model=TrafficView,
    responses=errors(404, 409, 422, notes={404: "no policy", **_OFF}),
)  # fmt: skip
async def decide_traffic(
    model: str, decision: str, gw: GatewayDep, principal: PrincipalDep
) -> ORJSONResponse:
    """``promote`` (the candidate gets all the weight, the shadow is cleared) or ``rollback`` (the candidate
    gets weight 0), now."""
    if decision not in ("promote", "rollback"):
        raise InvalidInput("decision: expected promote or rollback", {"field": "decision"})
    if await _store(gw).decide_now(model, decision, _who(principal)) is None:
        raise NotFound(f"model {model!r} has no traffic policy", {"model": model})
    await gw.inference.traffic.refresh()
    return ORJSONResponse(await _shown(gw, model))
