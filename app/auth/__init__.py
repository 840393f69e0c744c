"""API keys, limits and tenants: ``AuthStage`` is the request pipeline's authentication and
limiting stage; ``Principal`` is who is calling. See docs/auth.md."""

from app.auth.principal import (
    ANONYMOUS,
    Forbidden,
    Limits,
    Principal,
    Tier,
    TooManyRequests,
    Unauthorized,
    cache_scope,
)
from app.auth.stage import AuthStage, credential_from_headers, path_class

__all__ = [
    "ANONYMOUS", "AuthStage", "Forbidden", "Limits", "Principal", "Tier", "TooManyRequests",
    "Unauthorized", "cache_scope", "credential_from_headers", "path_class",
]  # fmt: skip
