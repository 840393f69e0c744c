"""HTTP routes of the keys: ``POST /v1/ws/tickets`` (a single-use WebSocket ticket for the calling key),
``GET /v1/auth/whoami``, and the keys admin API under ``/v1/admin/keys`` (admin credential; the auth
stage enforces it by path). ``tgw keys`` does the same from the command line (``app.auth.admin``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field

from app.auth.admin import BudgetSpec, NewKey, create_key, update_budget
from app.auth.keys import KeyRecord, KeyStore
from app.auth.principal import Principal
from app.auth.stage import AuthStage, path_class
from app.errors import Conflict, InvalidInput, NotFound, is_kserve_path
from app.frontends.http.caller import AuthDep, PrincipalDep
from app.frontends.http.web import ORJSONResponse, error_ref, errors

router = APIRouter(tags=["auth"])


class KeyView(BaseModel):
    id: str
    name: str
    tenant: str
    tier: str
    rps: float
    burst: int
    concurrency: int
    daily_quota: int
    created: str = Field(description="ISO 8601, UTC")
    budget: dict[str, float] | None = Field(None, description="monthly caps (docs/usage.md)")


class KeyCreated(KeyView):
    key: str = Field(description="the key itself, shown this once")


class KeyList(BaseModel):
    keys: list[KeyView]


class Revoked(BaseModel):
    id: str
    revoked: bool


class Ticket(BaseModel):
    ticket: str
    expires_in_s: int


class LimitsView(BaseModel):
    rps: float
    burst: int
    concurrency: int
    daily_quota: int


class WhoAmI(BaseModel):
    key_id: str
    tenant: str
    tier: str
    priority: int
    max_timeout_s: float | None
    admin: bool
    limits: LimitsView | None


_AUTH_RESPONSES = {
    "401": "no key, or a bad or revoked key (WWW-Authenticate)",
    "429": "over the key's limits (Retry-After, RateLimit-Policy, RateLimit)",
    "503": "keys cannot be verified now (Retry-After)",
}
_ADMIN_RESPONSES = {"403": "needs the admin credential"}
_AUTH_OFF = {409: "authentication is off"}


def document_auth(app: FastAPI, classify: Callable[[str], str] = path_class) -> None:
    """With TGW_AUTH=required, every operation but the open ones documents 401/429/503 (admin ones 403
    too) in ``app.openapi()``. Call it after every other ``app.openapi`` wrapper."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = build()
        if fresh:
            for path, operations in schema.get("paths", {}).items():
                kind = classify(path)
                if kind == "open":
                    continue
                content = {"application/json": {"schema": error_ref(kserve=is_kserve_path(path))}}
                for op in operations.values():
                    responses = op.setdefault("responses", {})
                    for code, text in {
                        **_AUTH_RESPONSES,
                        **(_ADMIN_RESPONSES if kind == "admin" else {}),
                    }.items():
                        responses.setdefault(code, {"description": text, "content": content})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _store(stage: AuthStage) -> KeyStore:
    if stage.keys is None:
        raise Conflict("authentication is off (TGW_AUTH=off): there are no keys to manage")
    return stage.keys


def _shown(rec: KeyRecord) -> dict[str, Any]:
    return rec.public()


@router.get("/v1/auth/whoami", response_class=ORJSONResponse, response_model=WhoAmI)
async def whoami(principal: PrincipalDep) -> ORJSONResponse:
    """The calling key: id, tenant, tier, the Triton priority and timeout bound it gets, its limits."""
    return ORJSONResponse(_principal_view(principal))


def _principal_view(p: Principal) -> dict[str, Any]:
    limits = p.limits
    return {
        "key_id": p.key_id, "tenant": p.tenant, "tier": p.tier, "priority": p.priority,
        "max_timeout_s": p.max_timeout_s, "admin": p.admin,
        "limits": None if limits is None else {
            "rps": limits.rps, "burst": limits.burst, "concurrency": limits.concurrency,
            "daily_quota": limits.daily_quota,
        },
    }  # fmt: skip


@router.post(
    "/v1/ws/tickets",
    response_class=ORJSONResponse,
    status_code=201,
    response_model=Ticket,
    responses=errors(403, notes={403: "tickets are for API keys (not the admin token, not auth off)"}),
)
async def ws_ticket(principal: PrincipalDep, stage: AuthDep) -> ORJSONResponse:
    """A single-use ticket for one WebSocket (``wss://…/v1/ws?ticket=…``), valid TGW_AUTH_WS_TICKET_S:
    for browsers, which cannot set headers on a WebSocket. Never put a key itself in a URL."""
    ticket = await stage.issue_ticket(principal)
    return ORJSONResponse(
        {"ticket": ticket, "expires_in_s": stage.settings.auth_ws_ticket_s}, status_code=201
    )


@router.get(
    "/v1/admin/keys",
    response_class=ORJSONResponse,
    response_model=KeyList,
    responses=errors(409, notes=_AUTH_OFF),
)
async def list_keys(stage: AuthDep) -> ORJSONResponse:
    return ORJSONResponse({"keys": [_shown(r) for r in await _store(stage).list()]})


@router.post(
    "/v1/admin/keys",
    response_class=ORJSONResponse,
    status_code=201,
    response_model=KeyCreated,
    responses=errors(409, 413, 422, notes=_AUTH_OFF),
)
async def new_key(spec: NewKey, stage: AuthDep) -> ORJSONResponse:
    """Create a key; the answer holds the key itself, shown this once."""
    created = await create_key(_store(stage), stage.settings, set(stage.tiers), spec)
    return ORJSONResponse(created, status_code=201)


class KeyUpdate(BaseModel):
    model_config = {"extra": "forbid"}
    budget: BudgetSpec | None = Field(description="the key's monthly caps (docs/usage.md); null removes them")


@router.patch(
    "/v1/admin/keys/{key_id}",
    response_class=ORJSONResponse,
    response_model=KeyView,
    responses=errors(404, 409, 422, notes={404: "no such key", **_AUTH_OFF}),
)
async def update_key(key_id: str, spec: KeyUpdate, stage: AuthDep) -> ORJSONResponse:
    """Change a key's monthly budget; every replica applies it within TGW_AUTH_KEY_CACHE_S."""
    updated = await update_budget(_store(stage), key_id, spec.budget)
    if updated is None:
        raise NotFound(f"no key {key_id!r}")
    return ORJSONResponse(updated)


@router.delete(
    "/v1/admin/keys/{key_id}",
    response_class=ORJSONResponse,
    response_model=Revoked,
    responses=errors(404, 409, notes={404: "no such key", **_AUTH_OFF}),
)
async def revoke_key(key_id: str, stage: AuthDep) -> ORJSONResponse:
    """Revoke: refused everywhere within TGW_AUTH_KEY_CACHE_S."""
    if not await _store(stage).revoke(key_id):
        raise NotFound(f"no key {key_id!r}")
    return ORJSONResponse({"id": key_id, "revoked": True})


@router.post(
    "/v1/admin/keys/{key_id}/rotate",
    response_class=ORJSONResponse,
    response_model=KeyCreated,
    responses=errors(404, 409, 422, notes={404: "no such key", **_AUTH_OFF}),
)
async def rotate_key(key_id: str, stage: AuthDep, grace_s: int = 0) -> ORJSONResponse:
    """A new secret for the same id, tenant, tier and limits; the old one works ``grace_s`` more."""
    if grace_s < 0 or grace_s > 86400:
        raise InvalidInput("grace_s: expected 0..86400 seconds", {"field": "grace_s"})
    rotated = await _store(stage).rotate(key_id, grace_s)
    if rotated is None:
        raise NotFound(f"no key {key_id!r}")
    token, rec = rotated
    return ORJSONResponse({"key": token, **rec.public()})
