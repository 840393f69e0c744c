"""Key administration shared by the keys API (``app.frontends.admin.keys``) and ``tgw keys``: ``NewKey`` (what
a new key may ask for) and ``create_key`` (the settings' defaults applied)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.auth.keys import KeyStore
from app.errors import InvalidInput
from app.services.usage import Budget
from app.settings import AuthSettings


class BudgetSpec(BaseModel):
    """Monthly (UTC calendar month) caps of a key or a tenant; 0 or absent: no cap on that metric."""

    model_config = {"extra": "forbid"}
    requests: float = Field(0, ge=0, description="requests per month")
    rows: float = Field(0, ge=0, description="rows (the batch dimension) per month")
    compute_s: float = Field(0, ge=0, description="Triton compute seconds per month")
    soft: float = Field(0.8, gt=0, le=1, description="fraction past which answers carry Usage-Warning")

    def budget(self) -> Budget | None:
        budget = Budget(self.requests, self.rows, self.compute_s, self.soft)
        return None if budget.empty else budget


class NewKey(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=128, description="what the key is for")
    tenant: str | None = Field(None, min_length=1, max_length=128, description="owner; default: name")
    tier: str | None = Field(None, description="a TGW_AUTH_TIERS tier or admin")
    rps: float | None = Field(None, gt=0, le=1_000_000, description="requests per second")
    burst: int | None = Field(None, ge=1, le=1_000_000, description="requests allowed at once above the rate")
    concurrency: int | None = Field(None, ge=0, le=100_000, description="in-flight requests; 0 = unbounded")
    daily_quota: int | None = Field(None, ge=0, le=10**12, description="requests per UTC day; 0 = none")
    budget: BudgetSpec | None = Field(None, description="monthly caps (docs/usage.md); none by default")


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
        _as_dict(spec.budget),
    )  # fmt: skip
    return {"key": token, **rec.public()}


def _as_dict(spec: BudgetSpec | None) -> dict[str, float] | None:
    budget = spec.budget() if spec is not None else None
    return budget.as_dict() if budget is not None else None


async def update_budget(store: KeyStore, key_id: str, spec: BudgetSpec | None) -> dict[str, Any] | None:
    """Set (None: remove) a key's monthly budget; None when there is no such key."""
    rec = await store.set_budget(key_id, _as_dict(spec))
    return rec.public() if rec is not None else None
