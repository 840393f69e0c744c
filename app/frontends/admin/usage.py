"""Usage per tenant (``app.services.usage``, docs/usage.md): ``GET /v1/usage`` (the calling key's and its
tenant's month), and under ``/v1/admin/usage`` (admin credential; the auth stage enforces it by path) the
usage of any tenant over any range (JSON or CSV) and the tenants' budgets. ``tgw usage`` does the same
from the command line."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.auth.admin import BudgetSpec
from app.errors import Conflict, InvalidInput
from app.frontends.http.caller import PrincipalDep
from app.frontends.http.deps import GatewayDep
from app.frontends.http.web import ORJSONResponse, errors
from app.services import usage
from app.services.usage import UsageMeter

router = APIRouter(tags=["usage"])

_OFF = {409: "usage metering is off (TGW_USAGE_ENABLED=false)"}


class TenantBudget(BaseModel):
    model_config = {"extra": "forbid"}
    budget: BudgetSpec | None = Field(None, description="monthly caps; null removes them")
    webhook_url: str | None = Field(
        None, max_length=2048, description='where usage.warning events go; "" removes it, absent keeps it'
    )


class Usage(BaseModel):
    requests: int
    rows: int
    bytes_in: int
    bytes_out: int
    hits: int
    misses: int
    followers: int
    responses: int
    compute_s: float
    saved_s: float


class TenantMonth(BaseModel):
    name: str
    usage: Usage
    budget: dict[str, float] | None


class KeyMonth(BaseModel):
    id: str
    usage: Usage
    budget: dict[str, float] | None = None


class MonthUsage(BaseModel):
    month: str = Field(description="YYYY-MM, UTC")
    resets_at: str = Field(description="when the month's budgets reset (ISO 8601, UTC)")
    tenant: TenantMonth
    key: KeyMonth | None


class UsageReport(BaseModel):
    from_: str = Field(alias="from")
    to: str
    group_by: str
    rows: list[dict[str, Any]] = Field(description="the group's columns, then every metric and errors")


class TenantSettings(BaseModel):
    tenant: str
    budget: dict[str, float] | None
    webhook_url: str | None


def _meter(gw: Any) -> UsageMeter:
    meter: UsageMeter | None = gw.usage
    if meter is None:
        raise Conflict("usage metering is off (TGW_USAGE_ENABLED=false)")
    return meter


@router.get(
    "/v1/usage", response_class=ORJSONResponse, response_model=MonthUsage, responses=errors(409, notes=_OFF)
)
async def my_usage(principal: PrincipalDep, gw: GatewayDep) -> ORJSONResponse:
    """This UTC month's usage of the calling key and of its tenant, with their budgets (counts are
    written every TGW_USAGE_FLUSH_INTERVAL_S: the last second may not be in them yet)."""
    meter = _meter(gw)
    body = await usage.month_usage(meter.redis, principal.tenant, principal.key_id or None, time.time())
    if body["key"] is not None:
        budget = principal.extra.get("budget")
        body["key"]["budget"] = budget.as_dict() if budget is not None else None
    return ORJSONResponse(body)


@router.get(
    "/v1/admin/usage",
    response_model=UsageReport,
    responses={
        **errors(409, 422, notes=_OFF),
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
)
async def admin_usage(
    request: Request,
    gw: GatewayDep,
    tenant: str | None = Query(None, description="one tenant (default: every tenant metered)"),
    model: str | None = Query(None, description="one model"),
    key_id: str | None = Query(None, description="one key"),
    door: str | None = Query(None, description="one door: v1, v2, grpc, grpc_stream, ws, job"),
    from_: str | None = Query(None, alias="from", description="ISO 8601 start (default: this month's)"),
    to: str | None = Query(None, description="ISO 8601 end (default: now)"),
    group_by: str = Query("day", description="hour, day, model, key, door or tenant"),
    format: str | None = Query(None, description="json (default) or csv (or Accept: text/csv)"),
) -> Response:
    """Usage over a range in hourly buckets, summed by ``group_by`` (always per tenant)."""
    meter = _meter(gw)
    now = time.time()
    start = usage.parse_time(from_, "from", usage.month_start(now))
    end = usage.parse_time(to, "to", datetime.now(UTC))
    if end < start:
        raise InvalidInput("to: before from", {"field": "to"})
    if end - start > timedelta(days=400):
        raise InvalidInput("from/to: at most 400 days at once", {"field": "from"})
    tenants = [tenant] if tenant else await usage.tenants(meter.redis)
    rows = await usage.query(meter.redis, tenants, start, end, group_by, model, key_id, door)
    wants_csv = format == "csv" or (format is None and "text/csv" in request.headers.get("accept", ""))
    if format not in (None, "json", "csv"):
        raise InvalidInput("format: expected json or csv", {"field": "format"})
    if wants_csv:
        return Response(usage.to_csv(rows), media_type="text/csv; charset=utf-8")
    return ORJSONResponse({
        "from": start.isoformat(), "to": end.isoformat(), "group_by": group_by, "rows": rows,
    })  # fmt: skip


@router.get(
    "/v1/admin/usage/tenants/{tenant}",
    response_class=ORJSONResponse,
    response_model=TenantSettings,
    responses=errors(409, notes=_OFF),
)
async def get_tenant(tenant: str, gw: GatewayDep) -> ORJSONResponse:
    """A tenant's budget and webhook URL."""
    return ORJSONResponse(await usage.tenant_settings(_meter(gw).redis, tenant))


@router.put(
    "/v1/admin/usage/tenants/{tenant}",
    response_class=ORJSONResponse,
    response_model=TenantSettings,
    responses=errors(409, 422, notes=_OFF),
)
async def put_tenant(tenant: str, spec: TenantBudget, gw: GatewayDep) -> ORJSONResponse:
    """Set a tenant's monthly budget (every replica enforces it within TGW_USAGE_FLUSH_INTERVAL_S)."""
    redis = _meter(gw).redis
    if spec.webhook_url and not spec.webhook_url.startswith(("https://", "http://")):
        raise InvalidInput("webhook_url: expected an http(s) URL", {"field": "webhook_url"})
    budget = spec.budget.budget() if spec.budget is not None else None
    await usage.set_tenant_budget(redis, tenant, budget, spec.webhook_url)
    return ORJSONResponse(await usage.tenant_settings(redis, tenant))
