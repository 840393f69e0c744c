"""Who is calling: the ``Principal`` the auth stage puts in ``scope["state"]["principal"]``, tiers, and
the domain errors of authentication and limiting (rendered by the one error table in ``app.errors``)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from app.errors import GatewayError
from app.request_context import Caller


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    priority: int  # Triton request priority: 1 is the highest level
    max_timeout_s: float  # upper bound of the timeout sent to Triton
    max_stream_s: float | None = None  # longest stream (None: TGW_STREAM_MAX_DURATION_S)


def parse_tiers(items: list[str]) -> dict[str, Tier]:
    """``["high:1:60:3600", "standard:2:30"]`` (validated by Settings) -> {name: Tier}."""
    tiers: dict[str, Tier] = {}
    for item in items:
        name, priority, timeout, *stream = item.split(":")
        tiers[name] = Tier(name, int(priority), float(timeout), float(stream[0]) if stream else None)
    return tiers


@dataclass(frozen=True, slots=True)
class Limits:
    rps: float
    burst: int
    concurrency: int  # 0 = unbounded
    daily_quota: int  # 0 = none


@dataclass(slots=True)
class Principal(Caller):
    """The authenticated caller: a ``Caller`` (what its key decides about each call: the tier's priority and
    timeout bound, the cache scope; the core applies it, ``app.services.inference``) with the key's limits.
    ``tenant`` owns jobs and (with TGW_CACHE_SCOPE=tenant) cache entries. ``key_id`` is public (it is in the
    token's prefix), never the secret."""

    admin: bool = False
    limits: Limits | None = None
    slot: str | None = None  # the concurrency slot held for this request, released by AuthStage.release
    extra: dict[str, Any] = field(default_factory=dict)


ANONYMOUS = Principal(key_id="", tenant="", tier="", admin=True)  # TGW_AUTH=off: everything is open

_current: ContextVar[Principal | None] = ContextVar("tgw_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the request being served (set by ``AuthStage.admit``), like the request id."""
    return _current.get()


def bind_principal(principal: Principal) -> None:
    _current.set(principal)


def cache_scope(principal: Principal | None, scope_setting: str) -> str:
    """What the inference service mixes into the response-cache key: "" (one answer shared by every
    tenant, the default) or the tenant (TGW_CACHE_SCOPE=tenant: no cross-tenant timing signal)."""
    if scope_setting == "tenant" and principal is not None:
        return principal.tenant
    return ""


class Unauthorized(GatewayError, status=401, code="unauthorized"):
    pass

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details, {"WWW-Authenticate": 'Bearer realm="triton-gateway"'})


class Forbidden(GatewayError, status=403, code="forbidden"):
    pass


class TooManyRequests(GatewayError, status=429, code="rate_limited"):
    """429 with ``Retry-After`` and the IETF draft's ``RateLimit-Policy`` / ``RateLimit`` fields."""

    def __init__(
        self, message: str, retry_after_s: float, policy: str | None = None, state: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        retry = max(1, int(retry_after_s + 0.999))
        headers = {"Retry-After": str(retry)}
        if policy:
            headers["RateLimit-Policy"] = policy
        if state:
            headers["RateLimit"] = state
        super().__init__(message, {"retry_after_s": retry, **(details or {})}, headers)
