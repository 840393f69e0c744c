"""Key administration shared by the keys API (``app.frontends.admin.keys``) and ``tgw keys``: ``NewKey`` (what
a new key may ask for) and ``create_key`` (the settings' defaults applied)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.auth.keys import KeyStore
from app.errors import InvalidInput
from app.settings import AuthSettings


class NewKey(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=128, description="what the key is for")
    tenant: str | None = Field(None, min_length=1, max_length=128, description="owner; default: name")
    tier: str | None = Field(None, description="a TGW_AUTH_TIERS tier or admin")
    rps: float | None = Field(None, gt=0, le=1_000_000, description="requests per second")
    burst: int | None = Field(None, ge=1, le=1_000_000, description="requests allowed at once above the rate")
    concurrency: int | None = Field(None, ge=0, le=100_000, description="in-flight requests; 0 = unbounded")
    daily_quota: int | None = Field(None, ge=0, le=10**12, description="requests per UTC day; 0 = none")


async def create_key(
    store: KeyStore, settings: AuthSettings, tiers: set[str], spec: NewKey
) -> dict[str, Any]:
    """Create a key from ``spec`` with the settings' defaults; returns what is shown once (with the key)."""
    tier = spec.tier or settings.auth_default_tier
    if tier not in tiers:
        raise InvalidInput(f"tier: expected one of {sorted(tiers)}", {"field": "tier"})
    token, rec = await store.create(
        spec.name, spec.tenant or spec.name, tier,
        spec.rps if spec.rps is not None else settings.auth_default_rps,
        spec.burst if spec.burst is not None else settings.auth_default_burst,
        spec.concurrency if spec.concurrency is not None else settings.auth_default_concurrency,
        spec.daily_quota if spec.daily_quota is not None else settings.auth_default_daily_quota,
    )  # fmt: skip
    return {"key": token, **rec.public()}
