"""``AuthStage``: authentication and limits, called once per request by the request pipeline.

    principal = await stage.admit(scope)      # raises Unauthorized / Forbidden / TooManyRequests
    try: ... serve ...
    finally: stage.release(principal)         # gives the in-flight slot back

``admit`` puts the principal in ``scope["state"]["principal"]`` (routes read it with
``app.frontends.http.caller.PrincipalDep``) and its tenant in ``scope["state"]["tenant"]`` (the jobs
routes' owner).
Front doors without a scope (gRPC) call ``admit_headers(metadata, address)``, then ``release``.
WebSocket frames go through ``admit_message`` (``app.auth.asgi.KeyCheck``, called by the socket).

Routes: ``/healthz``, ``/readyz``, ``/v2/health/*`` and the API docs are open; ``/metrics``,
``/v1/admin/*``, ``/v2/repository/*`` and ``/v1/jobs/stats`` need an admin credential
(``TGW_ADMIN_TOKEN`` or a key of tier ``admin``); everything else needs a key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from redis.exceptions import RedisError

from app.auth.keys import TICKET_PREFIX, KeyRecord, KeyStore, digest, key_id_of, record_key
from app.auth.limiter import (
    Decision,
    LocalLimiter,
    RedisLimiter,
    new_slot_id,
    policy_header,
    state_header,
)
from app.auth.principal import (
    ANONYMOUS,
    Forbidden,
    Limits,
    Principal,
    Tier,
    TooManyRequests,
    Unauthorized,
    bind_principal,
    parse_tiers,
)
from app.errors import ServiceUnavailable
from app.request_context import route_path
from app.services.usage import Budget, UsageMeter
from app.settings import AuthSettings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect",
     "/redoc", "/openapi.json"}
)  # fmt: skip
OPEN_PREFIXES = ("/docs/assets/",)  # the documentation pages' JavaScript, CSS and icon
ADMIN_PATHS = frozenset({"/metrics", "/v1/jobs/stats"})
ADMIN_PREFIXES = ("/v1/admin/", "/v2/repository/")
ADMIN_TIER = "admin"
PUBLIC = Principal(key_id="", tenant="", tier="")  # an open route (health, docs) with TGW_AUTH=required
WS_SLOT_TTL_S = 6 * 3600.0  # a WebSocket slot left by a crashed replica frees itself after this
TICKET_NS = "tgw:auth:ticket:"
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


def cache_scope_of(tenant: str, setting: str) -> str:
    return tenant if setting == "tenant" else ""


def path_class(path: str) -> str:
    """ "open", "admin" or "key"."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return "open"
    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        return "admin"
    return "key"


PathClassifier = Callable[[str], str | None]


def classifier(*tables: PathClassifier) -> Callable[[str], str]:
    """``path_class`` with the classes the doors declare first: each table (e.g. the raw route table's
    ``RawRoutes.auth_class``, handed in by the composition root: app.auth sits below the doors) returns
    the class of its paths, None for others."""
    if not tables:
        return path_class

    def classify(path: str) -> str:
        for table in tables:
            kind = table(path)
            if kind is not None:
                return kind
        return path_class(path)

    return classify


def credential_from_headers(headers: Mapping[str, str]) -> str | None:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` from a lower-case header mapping (HTTP
    headers, gRPC metadata)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def _scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    wanted = (b"authorization", b"x-api-key")
    return {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in wanted}


class FailedAuthLimiter:
    """Failed authentications per client address per minute, in process: past the limit an address
    gets 429 for a missing or malformed credential before any lookup, and for a wrong well-formed key
    after its lookup (a correct key is admitted: ``AuthStage.authenticate``). Fixed one-minute windows."""

    def __init__(self, per_minute: int, max_addresses: int = 50_000) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self.windows: dict[str, tuple[float, int]] = {}

    def blocked_for(self, address: str) -> float:
        start, count = self.windows.get(address, (0.0, 0))
        left = start + 60.0 - time.monotonic()
        return left if count >= self.per_minute and left > 0 else 0.0

    def failed(self, address: str) -> None:
        now = time.monotonic()
        start, count = self.windows.get(address, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        if len(self.windows) >= self.max_addresses and address not in self.windows:
            self.windows.clear()
        self.windows[address] = (start, count + 1)


class AuthStage:
    def __init__(
        self, settings: AuthSettings, redis: Any = None, submit: Any = None, *, retry_after_s: int,
        slot_ttl_s: float, classify: Callable[[str], str] = path_class, stream_slot_ttl_s: float = 0.0,
    ) -> None:  # fmt: skip
        """``settings``: the auth group; ``retry_after_s`` (TGW_RETRY_AFTER_S) goes on 429 answers,
        ``slot_ttl_s`` bounds a held concurrency slot of a process that died (Redis key TTL), and
        ``stream_slot_ttl_s`` that of a stream (which may last up to the longest stream a tier allows);
        ``classify``: the paths' classes ("open", "admin", "key", or "stream": a key's route whose answer
        is a stream, holding its slot for the stream's life: ``classifier``)."""
        self.settings = settings
        self.retry_after_s = retry_after_s
        self.stream_slot_ttl_s = max(stream_slot_ttl_s, slot_ttl_s)
        self.path_class = classify
        self.enabled = settings.auth == "required"
        self.tiers: dict[str, Tier] = parse_tiers(settings.auth_tiers)
        top = min(self.tiers.values(), key=lambda t: t.priority)
        longest = max(t.max_timeout_s for t in self.tiers.values())
        self.tiers.setdefault(ADMIN_TIER, Tier(ADMIN_TIER, top.priority, longest))
        self.redis = redis
        self.cache_s = settings.auth_key_cache_s
        self.stale_s = max(settings.auth_stale_key_s, settings.auth_key_cache_s)
        self._cache: dict[str, tuple[KeyRecord, float]] = {}
        self.failed = FailedAuthLimiter(settings.auth_failed_per_minute)
        self.local = LocalLimiter()
        self._degraded_logged = 0.0
        self.keys: KeyStore | None = None
        self.limiter: RedisLimiter | None = None
        self.budgets: UsageMeter | None = None  # monthly budgets (set by the composition root)
        if not self.enabled:
            return
        if not settings.key_pepper:
            raise ValueError("TGW_AUTH=required needs TGW_KEY_PEPPER (32+ random characters)")
        if redis is None:
            raise ValueError("TGW_AUTH=required needs Redis (TGW_REDIS_URL) for keys and limits")
        timeout = settings.auth_redis_timeout_s
        self.keys = KeyStore(redis, settings.key_pepper, timeout)

        async def direct(*args: Any) -> Any:
            async with asyncio.timeout(timeout):
                return await redis.execute_command(*args)

        self.limiter = RedisLimiter(redis, submit or direct, slot_ttl_s, timeout)

    # --- the pipeline's entry points ----------------------------------------------------------
    async def admit(self, scope: MutableMapping[str, Any]) -> Principal:
        """Authenticate and take the request's limits; the principal also lands in scope["state"]."""
        principal = await self._admit(scope)
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["tenant"] = principal.tenant  # the owner of jobs (app.frontends.jobs.routes.owner_of)
        bind_principal(principal)
        return principal

    async def _admit(self, scope: MutableMapping[str, Any]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        path = route_path(scope)
        kind = self.path_class(path)
        if kind == "open":
            return PUBLIC
        client = scope.get("client")
        address = client[0] if client else "unknown"
        websocket = scope["type"] == "websocket"
        token = credential_from_headers(_scope_headers(scope))
        principal: Principal | None
        if token is None and websocket and scope.get("query_string"):
            principal = await self._ticket(scope["query_string"], address)
        else:
            principal = await self.authenticate(token, address)
        if kind == "admin" and not principal.admin:
            raise Forbidden("this endpoint needs an admin credential (TGW_ADMIN_TOKEN or an admin-tier key)")
        if websocket:
            await self.limit(principal, kind="ws")
        else:
            await self.limit(principal, stream=kind == "stream")
        return principal

    async def admit_headers(
        self, headers: Mapping[str, str], address: str, admin: bool = False, kind: str = "req"
    ) -> Principal:
        """For front doors without an ASGI scope (gRPC): authenticate from lower-case headers (call
        metadata) and take the request's limits; ``release`` the principal when the call is over.
        ``admin``: the call needs the admin credential (e.g. repository or statistics RPCs); ``kind``
        "ws": a long-lived call (a gRPC stream) taken like a WebSocket, its messages limited one by one."""
        if not self.enabled:
            bind_principal(ANONYMOUS)
            return ANONYMOUS
        principal = await self.authenticate(credential_from_headers(headers), address)
        if admin and not principal.admin:
            raise Forbidden("this call needs an admin credential (TGW_ADMIN_TOKEN or an admin-tier key)")
        await self.limit(principal, kind=kind)
        bind_principal(principal)
        return principal

    def release(self, principal: Principal) -> None:
        slot = principal.slot
        if slot is None:
            return
        principal.slot = None
        if principal.extra.get("local_slot"):
            self.local.release(principal.key_id)
        elif self.limiter is not None:
            self.limiter.release(principal.key_id, slot, principal.extra.get("slot_kind", "req"))

    # --- authentication ------------------------------------------------------------------------
    async def authenticate(self, token: str | None, address: str) -> Principal:
        """The principal of a presented credential (``None``: missing), or Unauthorized / 429 for an
        address that failed too often. Past that limit a missing or malformed credential is refused
        without a lookup, but a well-formed key is still verified (one lookup, as for any request) and,
        when correct, admitted: clients sharing an address with a guesser (a NAT, a load balancer) are
        never locked out by its failures; the guesser's wrong keys get 429. The credential never appears
        in an error or a log line."""
        blocked = self.failed.blocked_for(address)
        if token is None:
            if blocked:
                raise self._blocked(blocked)
            self.failed.failed(address)
            raise Unauthorized("missing API key: send Authorization: Bearer <key> or X-API-Key")
        admin_token = self.settings.admin_token
        if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
            return Principal(key_id="admin", tenant="admin", tier=ADMIN_TIER, admin=True,
                             priority=self.tiers[ADMIN_TIER].priority,
                             max_timeout_s=self.tiers[ADMIN_TIER].max_timeout_s,
                             cache_scope=cache_scope_of("admin", self.settings.cache_scope))  # fmt: skip
        key_id = key_id_of(token)
        if blocked and key_id is None:
            raise self._blocked(blocked)  # malformed: no lookup for a guesser
        record = await self._verify(key_id, token) if key_id is not None else None
        if record is None:
            self.failed.failed(address)
            if blocked:
                raise self._blocked(blocked)
            details = {"key_id": key_id} if key_id else {}
            raise Unauthorized("invalid or revoked API key", details)
        return self.principal_of(record)

    async def recheck(self, principal: Principal, slack_s: float = 0.0) -> None:
        """For what a key holds open (a gRPC stream, a WebSocket): raise Unauthorized once the key it was
        admitted with is revoked or rotated away. Through the verified-key cache (an entry younger than
        ``TGW_AUTH_KEY_CACHE_S - slack_s`` is trusted; ``slack_s``: the caller's polling interval, so a
        revocation is seen within the cache bound); Redis unreachable: keeps trusting (as ``_verify``)."""
        presented = principal.extra.get("digest")
        if not presented or self.keys is None:
            return  # the admin token, or auth off: nothing to revoke
        now = time.monotonic()
        hit = self._cache.get(presented)
        if hit is not None and now - hit[1] < self.cache_s - slack_s:
            return
        try:
            record = await self.keys.lookup(principal.key_id, presented)
        except _REDIS_ERRORS as exc:
            self._log_degraded(exc)
            return
        if record is None:
            self._cache.pop(presented, None)
            raise Unauthorized("API key revoked or rotated; reconnect with a valid key",
                               {"key_id": principal.key_id})  # fmt: skip
        if len(self._cache) >= 10_000:
            self._cache.clear()
        self._cache[presented] = (record, now)

    @staticmethod
    def _blocked(seconds: float) -> TooManyRequests:
        return TooManyRequests("too many failed authentications from this address; try again later", seconds)

    def principal_of(self, rec: KeyRecord) -> Principal:
        tier = self.tiers.get(rec.tier) or self.tiers[self.settings.auth_default_tier]
        return Principal(
            key_id=rec.id, tenant=rec.tenant, tier=tier.name, priority=tier.priority,
            max_timeout_s=tier.max_timeout_s, max_stream_s=tier.max_stream_s, admin=tier.name == ADMIN_TIER,
            limits=Limits(rec.rps, rec.burst, rec.concurrency, rec.daily_quota),
            cache_scope=cache_scope_of(rec.tenant, self.settings.cache_scope),
            extra={"digest": rec.digest,  # what recheck() looks up again (revocation, rotation)
                   "budget": Budget.from_mapping(rec.budget)},  # the key's monthly budget (None: none)
        )  # fmt: skip

    async def _verify(self, key_id: str, token: str) -> KeyRecord | None:
        assert self.keys is not None
        presented = digest(self.keys.pepper, token)
        now = time.monotonic()
        hit = self._cache.get(presented)
        if hit is not None and now - hit[1] < self.cache_s:
            return hit[0]
        try:
            record = await self.keys.lookup(key_id, presented)
        except _REDIS_ERRORS as exc:
            if hit is not None and now - hit[1] < self.stale_s:
                self._log_degraded(exc)
                return hit[0]
            self._log_degraded(exc)
            raise ServiceUnavailable(
                "cannot verify the API key now (key store unreachable); retry shortly",
                retry_after_s=self.retry_after_s,
            ) from None
        if record is None:
            self._cache.pop(presented, None)
            return None
        if len(self._cache) >= 10_000:
            self._cache.clear()
        self._cache[presented] = (record, now)
        return record

    async def _ticket(self, query: bytes, address: str) -> Principal:
        values = parse_qs(query.decode("latin-1")).get("ticket")
        ticket = values[0] if values else None
        if ticket is None or not ticket.startswith(TICKET_PREFIX) or len(ticket) > 128:
            return await self.authenticate(None, address)
        assert self.keys is not None
        try:
            async with asyncio.timeout(self.settings.auth_redis_timeout_s):
                raw = await self.redis.getdel(TICKET_NS + digest(self.keys.pepper, ticket))
                found = await self.redis.get(record_key(raw.decode())) if raw is not None else None
        except _REDIS_ERRORS as exc:
            self._log_degraded(exc)
            raise ServiceUnavailable("cannot check the ticket now; retry shortly") from None
        if found is None:
            self.failed.failed(address)
            raise Unauthorized("invalid, used or expired WebSocket ticket")
        return self.principal_of(KeyRecord.loads(found))

    async def issue_ticket(self, principal: Principal) -> str:
        """A single-use ticket for a browser WebSocket (``?ticket=``), valid TGW_AUTH_WS_TICKET_S."""
        if self.keys is None or principal.limits is None:
            raise Forbidden("tickets are for API keys (TGW_AUTH=required)")
        import secrets

        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        rec_digest = await self._digest_of(principal.key_id)
        async with asyncio.timeout(self.settings.auth_redis_timeout_s * 4):
            await self.redis.set(
                TICKET_NS + digest(self.keys.pepper, ticket), rec_digest, ex=self.settings.auth_ws_ticket_s
            )
        return ticket

    async def _digest_of(self, key_id: str) -> str:
        for rec, _ in self._cache.values():
            if rec.id == key_id:
                return rec.digest
        assert self.keys is not None
        found = await self.keys.get(key_id)
        if found is None:
            raise Unauthorized("invalid or revoked API key")
        return found.digest

    # --- limits --------------------------------------------------------------------------------
    async def limit(self, principal: Principal, kind: str = "req", stream: bool = False) -> None:
        """Take one request (and an in-flight slot: a WebSocket connection for kind "ws"; ``stream``: the
        slot outlives a stream's longest life, not a unary call's, should its process die)."""
        limits = principal.limits
        if limits is None or self.limiter is None:
            return  # admin token: unlimited
        await self.check_budget(principal)
        slot = new_slot_id()
        ws = kind == "ws"
        try:
            decision = await self.limiter.admit(
                principal.key_id, limits, slot, kind=kind,
                concurrency=self.settings.auth_ws_per_key if ws else None,
                slot_ttl_s=WS_SLOT_TTL_S if ws else (self.stream_slot_ttl_s if stream else None),
            )  # fmt: skip
            local = False
        except _REDIS_ERRORS as exc:
            self._log_degraded(exc)
            decision = self.local.admit(principal.key_id, limits, take_slot=not ws)
            local = True
        if not decision.admitted:
            raise self._too_many(decision, limits, ws)
        if ws or limits.concurrency or local:
            if local and ws:
                return
            principal.slot = slot
            principal.extra["local_slot"] = local
            principal.extra["slot_kind"] = kind

    async def admit_message(self, principal: Principal) -> None:
        """A WebSocket frame counts against the key's request rate (no slot, no daily quota)."""
        limits = principal.limits
        if limits is None or self.limiter is None:
            return
        await self.check_budget(principal)
        try:
            decision = await self.limiter.admit(principal.key_id, limits, "", concurrency=0, quota=False)
        except _REDIS_ERRORS as exc:
            self._log_degraded(exc)
            decision = self.local.admit(principal.key_id, limits, take_slot=False)
        if not decision.admitted:
            raise self._too_many(decision, limits, False)

    async def check_budget(self, principal: Principal) -> None:
        """The key's and its tenant's monthly budgets (``app.services.usage``): 429 ``budget_exhausted``
        once one is used up; past a soft threshold, ``principal.extra["usage_warning"]`` (the
        ``Usage-Warning`` header of the answer)."""
        if self.budgets is None:
            return
        budget = principal.extra.get("budget")
        warning = await self.budgets.check(principal.tenant, principal.key_id, budget)
        if warning is not None:
            principal.extra["usage_warning"] = warning
        else:
            principal.extra.pop("usage_warning", None)

    def _too_many(self, decision: Decision, limits: Limits, ws: bool) -> TooManyRequests:
        what = "open WebSockets" if ws and decision.reason == "concurrency" else decision.reason
        message = f"over this key's {what} limit; retry after the Retry-After seconds"
        return TooManyRequests(
            message, decision.retry_after_s, policy_header(limits), state_header(decision),
            {"limit": what},
        )  # fmt: skip

    def _log_degraded(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._degraded_logged > 10.0:
            self._degraded_logged = now
            logger.warning("key store/limits in Redis unreachable (%s): verified keys continue under "
                           "per-process limits, unknown keys are refused", type(exc).__name__)  # fmt: skip

    async def close(self) -> None:
        if self.limiter is not None:
            await self.limiter.drain()
