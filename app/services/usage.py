"""Usage per tenant: every request metered once, in hourly buckets in Redis, with monthly budgets.

Every door ends each request in ``Served.end`` (``app.observability.requests``); a request the inference
service saw (``RequestInfo.door`` set, ``app.services.inference.meter``) is handed to ``UsageMeter.record``,
which adds it to a per-process accumulator keyed by (tenant, key, model, version, door, outcome): no
Redis call on the request's path. One background task flushes the accumulator every
``TGW_USAGE_FLUSH_INTERVAL_S`` (and at shutdown) in one pipelined batch of single-key commands
(Cluster-safe: ``HINCRBY``/``HINCRBYFLOAT``/``EXPIRE``/``SADD``), and in the same round trip reads the
month's totals and budgets of the tenants this process serves: what ``check`` compares each request with.

Redis layout (``{tenant}`` is a Cluster hash tag: all of a tenant's keys in one slot):

* ``tgw:usage:{T}:h:YYYYMMDDHH`` (hash, expires after ``TGW_USAGE_RETENTION_DAYS``): field
  ``key|model|version|door|outcome|metric`` -> count (``outcome``: ``ok`` or the HTTP status of the error;
  gRPC statuses are mapped to theirs);
* ``tgw:usage:{T}:m:YYYYMM`` (hash, the UTC month's totals, what budgets compare with): ``t|metric`` for
  the tenant, ``k:<key id>|metric`` per key;
* ``tgw:usage:{T}:settings`` (hash): the tenant's budget (``requests``, ``rows``, ``compute_s``, ``soft``)
  and ``webhook_url``;
* ``tgw:usage:tenants`` (set): every tenant ever metered.

A process killed without its graceful stop loses what it counted since its last flush: at most one
flush interval of its requests (docs/usage.md).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import csv
import io
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter

from app.errors import GatewayError, InvalidInput
from app.observability.context import RequestInfo

logger = logging.getLogger(__name__)

NS = "tgw:usage:"
TENANTS_KEY = NS + "tenants"
ANONYMOUS_TENANT = "-"  # TGW_AUTH=off: every request is this tenant's

# The counters of each (tenant, key, model, version, door, outcome), in this order.
METRICS = (
    "requests", "rows", "bytes_in", "bytes_out", "hits", "misses", "followers", "responses", "compute_s",
    "saved_s",
)  # fmt: skip
_FLOATS = frozenset({"compute_s", "saved_s"})
BUDGET_METRICS = ("requests", "rows", "compute_s")
GROUP_BY = ("hour", "day", "model", "key", "door", "outcome", "tenant")

# gRPC status names as the HTTP status the gateway answers the same error with (the usage ``outcome``).
_GRPC_AS_HTTP = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}  # fmt: skip

USAGE_REQUESTS = Counter("tgw_usage_requests", "Metered inference requests", ["tenant", "model"])
USAGE_ROWS = Counter("tgw_usage_rows", "Metered rows (the batch dimension)", ["tenant", "model"])
USAGE_BYTES = Counter("tgw_usage_bytes", "Metered tensor bytes", ["tenant", "model", "direction"])
USAGE_COMPUTE = Counter(
    "tgw_usage_compute_seconds", "Triton compute time attributed to requests", ["tenant", "model"]
)
USAGE_SAVED = Counter(
    "tgw_usage_saved_compute_seconds", "Compute saved by cache hits and shared calls", ["tenant", "model"]
)


def outcome_of(status: int | str) -> str:
    """``ok`` for a success (HTTP 2xx, gRPC OK), else the HTTP status the error stands for."""
    code = status if isinstance(status, int) else _GRPC_AS_HTTP.get(status, 500)
    return "ok" if 200 <= code < 300 else str(code)


# --- time buckets -------------------------------------------------------------------------------------
def hour_of(ts: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(ts))


def month_of(ts: float) -> str:
    return time.strftime("%Y%m", time.gmtime(ts))


def next_month_start(ts: float) -> datetime:
    """When the UTC calendar month of ``ts`` ends (budgets reset)."""
    now = datetime.fromtimestamp(ts, UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def month_start(ts: float) -> datetime:
    now = datetime.fromtimestamp(ts, UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def hours_between(start: datetime, end: datetime) -> list[str]:
    """The hour buckets from ``start`` to ``end`` (both included, UTC), at most ~13 months of them."""
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    stop = end.astimezone(UTC)
    out: list[str] = []
    while hour <= stop and len(out) < 24 * 400:
        out.append(hour.strftime("%Y%m%d%H"))
        hour += timedelta(hours=1)
    return out


def hour_key(tenant: str, hour: str) -> str:
    return f"{NS}{{{tenant}}}:h:{hour}"


def month_key(tenant: str, month: str) -> str:
    return f"{NS}{{{tenant}}}:m:{month}"


def settings_key(tenant: str) -> str:
    return f"{NS}{{{tenant}}}:settings"


def parse_time(value: str | None, field: str, default: datetime) -> datetime:
    """An ISO 8601 instant or date (UTC when it names no zone), for the ``from``/``to`` of a query."""
    if not value:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        message = f"{field}: expected an ISO 8601 date or time, e.g. 2026-12-01"
        raise InvalidInput(message, {"field": field}) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# --- budgets -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Budget:
    """Monthly (UTC calendar month) caps; 0: none. ``soft``: the fraction past which answers carry a
    ``Usage-Warning`` (and the tenant's webhook gets one ``usage.warning``)."""

    requests: float = 0
    rows: float = 0
    compute_s: float = 0
    soft: float = 0.8

    @property
    def empty(self) -> bool:
        return not (self.requests or self.rows or self.compute_s)

    def limits(self) -> Iterable[tuple[str, float]]:
        for metric in BUDGET_METRICS:
            limit = getattr(self, metric)
            if limit > 0:
                yield metric, limit

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "rows": self.rows, "compute_s": self.compute_s, "soft": self.soft}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> Budget | None:
        if not data:
            return None
        try:
            pairs = ((_s(k), v) for k, v in data.items())
            values = {k: float(_s(v)) for k, v in pairs if k in _BUDGET_FIELDS}
        except ValueError:
            return None
        budget = cls(**values)
        return None if budget.empty else budget


_BUDGET_FIELDS = frozenset({"requests", "rows", "compute_s", "soft"})


def parse_budget(text: str, field: str = "budget") -> Budget | None:
    """``requests=1000000,rows=5000000,compute_s=3600[,soft=0.8]`` -> Budget (None: ``none`` or empty,
    which removes a budget)."""
    text = text.strip()
    if text in ("", "none", "0"):
        return None
    values: dict[str, float] = {}
    for part in text.split(","):
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or name not in _BUDGET_FIELDS:
            raise InvalidInput(
                f"{field}: expected requests=N,rows=N,compute_s=S[,soft=F], got {part!r}", {"field": field}
            )
        try:
            values[name] = float(raw)
        except ValueError:
            raise InvalidInput(f"{field}: {name} must be a number", {"field": field}) from None
        if values[name] < 0:
            raise InvalidInput(f"{field}: {name} must be >= 0", {"field": field})
    if not 0 < values.get("soft", 0.8) <= 1:
        raise InvalidInput(f"{field}: soft must be a fraction in (0, 1]", {"field": field})
    budget = Budget(**values)
    return None if budget.empty else budget


class BudgetExhausted(GatewayError, status=429, code="budget_exhausted"):
    """A key's or tenant's monthly budget is used up: refused until the month ends (``resets_at``)."""

    def __init__(self, scope: str, name: str, metric: str, limit: float, used: float, now: float) -> None:
        resets = next_month_start(now)
        details = {
            "scope": scope, "name": name, "metric": metric, "limit": limit, "used": round(used, 3),
            "resets_at": resets.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }  # fmt: skip
        retry = max(1, int(resets.timestamp() - now))
        super().__init__(
            f"the {scope}'s monthly {metric} budget ({_num(limit)}) is used up; it resets at "
            f"{details['resets_at']}",
            details, {"Retry-After": str(retry)},
        )  # fmt: skip


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def budget_state(scope: str, name: str, budget: Budget, used: Mapping[str, float], now: float) -> str | None:
    """Raise ``BudgetExhausted`` when ``used`` reached a cap of ``budget``; else the ``Usage-Warning``
    text of the first metric past its soft threshold (None: below every one)."""
    warning = None
    for metric, limit in budget.limits():
        value = used.get(metric, 0.0)
        if value >= limit:
            raise BudgetExhausted(scope, name, metric, limit, value, now)
        if warning is None and value >= budget.soft * limit:
            warning = f"{scope}={name}; metric={metric}; used={_num(round(value, 3))}; limit={_num(limit)}"
    return warning


# --- the soft-threshold webhook ----------------------------------------------------------------------
class UsageWebhooks:
    """One ``usage.warning`` event per (scope, metric, month) to the tenant's ``webhook_url``, signed like
    the jobs' webhooks (Standard Webhooks: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``
    with ``TGW_WEBHOOK_SECRET``), through the same SSRF-guarded sender. Once across replicas: the replica
    whose ``SET NX`` of ``tgw:usage:{T}:warned:<month>:<scope>:<name>:<metric>`` wins sends it; a failed
    delivery is retried after 1, 5 and 30 s, then dropped (the ``Usage-Warning`` header says it too)."""

    RETRY_S = (1.0, 5.0, 30.0)

    def __init__(self, redis: Any, sender: Any, secrets: list[bytes], client: Any = None) -> None:
        self.redis = redis
        self.sender = sender
        self.secrets = secrets
        self.client = client  # closed with the notifier
        self.tasks: set[asyncio.Task[None]] = set()

    def warn(self, tenant: str, url: str, event: dict[str, Any], now: float) -> None:
        task = asyncio.create_task(self._deliver(tenant, url, event, now))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, tenant: str, url: str, event: dict[str, Any], now: float) -> None:
        from app.services.jobs.webhooks import sign  # the jobs' signer (Standard Webhooks)

        data = event["data"]
        marker = f"{NS}{{{tenant}}}:warned:{month_of(now)}:{data['scope']}:{data['name']}:{data['metric']}"
        try:
            if not await self.redis.set(marker, "1", nx=True, ex=62 * 86400):
                return  # another replica (or an earlier request) sent it
        except Exception as exc:
            logger.warning("usage.warning for %s not sent: Redis unreachable (%s)", tenant, exc)
            return
        body = _json(event)
        msg_id = f"msg_usage_{tenant}_{month_of(now)}_{data['scope']}_{data['name']}_{data['metric']}"
        for attempt, delay in enumerate((0.0, *self.RETRY_S)):
            if delay:
                await asyncio.sleep(delay)
            ts = int(time.time())
            headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
            if self.secrets:
                headers["webhook-signature"] = sign(self.secrets, msg_id, ts, body)
            result = await self.sender.send(url, body, headers)
            if result.status_code is not None and 200 <= result.status_code < 300:
                return
            if result.refused:
                break
            logger.info("usage.warning to %s: attempt %d failed (%s)", tenant, attempt + 1,
                        result.error or result.status_code)  # fmt: skip
        logger.warning("usage.warning for tenant %s could not be delivered", tenant)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.client is not None:
            await self.client.aclose()


def _json(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


# --- the meter ---------------------------------------------------------------------------------------
class UsageMeter:
    """The per-process accumulator, its flush task, and the budget view (see the module's doc)."""

    def __init__(
        self, redis: Any, flush_interval_s: float = 1.0, retention_days: int = 90, timeout_s: float = 2.0,
        clock: Any = time.time,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.interval_s = flush_interval_s
        self.retention_s = int(retention_days * 86400)
        self.timeout_s = timeout_s
        self.clock = clock
        self.pending: dict[tuple[str, str, str, str, str, str], list[float]] = {}
        self.pending_hour = hour_of(clock())
        # budgets: month totals from Redis (refreshed each flush) + what this process counted since
        self.month = month_of(clock())
        self.totals: dict[str, dict[str, float]] = {}  # tenant -> {"t|requests": ..., "k:<id>|rows": ...}
        self.unflushed: dict[str, dict[str, float]] = {}
        self.flushing: dict[str, dict[str, float]] = {}  # being written: counted until the totals are read
        self.tenant_budgets: dict[str, Budget | None] = {}
        self.key_budgets: dict[str, Budget] = {}  # key id -> its budget, as the last check saw it
        self.watched: dict[str, float] = {}  # tenant -> last checked (monotonic)
        self.webhooks: dict[str, str] = {}
        self.capped = False  # a budget was reached here since the last flush: flush now
        self.webhooks_out: UsageWebhooks | None = None  # usage.warning events (set by the gateway)
        self._warned: set[tuple[str, str, str, str]] = set()  # (month, scope, name, metric) sent from here
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0

    # --- the hot path ---------------------------------------------------------------------------
    def record(self, info: RequestInfo, status: int | str) -> None:
        """One request ended (``Served.end``)."""
        tenant = info.tenant or ANONYMOUS_TENANT
        outcome = outcome_of(status)
        key = (tenant, info.key_id or "-", info.model or "-", info.version or "-", info.door or "-", outcome)
        counts = self.pending.get(key)
        if counts is None:
            counts = self.pending[key] = [0.0] * len(METRICS)
        rows = info.rows
        cache = info.cache
        counts[0] += 1
        counts[1] += rows
        counts[2] += info.bytes_in
        counts[3] += info.bytes_out
        if info.follower:
            counts[6] += 1
        elif cache == "HIT":
            counts[4] += 1
        elif cache == "MISS":
            counts[5] += 1
        counts[7] += info.responses
        counts[8] += info.compute_s
        counts[9] += info.saved_s
        if tenant in self.watched:  # budgets: what this process counted since its last flush
            month = self.unflushed.get(tenant)
            if month is None:
                month = self.unflushed[tenant] = {}
            kid = f"k:{info.key_id}|"
            for name, value in (("requests", 1), ("rows", rows), ("compute_s", info.compute_s)):
                month["t|" + name] = month.get("t|" + name, 0.0) + value
                month[kid + name] = month.get(kid + name, 0.0) + value
            if self._reached(tenant, info.key_id):
                self.capped = True
                self._wake.set()

    def _reached(self, tenant: str, key_id: str) -> bool:
        budgets = [("t|", self.tenant_budgets.get(tenant)), (f"k:{key_id}|", self.key_budgets.get(key_id))]
        for prefix, budget in budgets:
            if budget is None:
                continue
            used = self.used(tenant, prefix)
            if any(used.get(m, 0.0) >= limit for m, limit in budget.limits()):
                return True
        return False

    def used(self, tenant: str, prefix: str) -> dict[str, float]:
        """This month's use of a scope (``t|``: the tenant, ``k:<id>|``: a key): Redis's totals as of the
        last flush plus what this process counted since."""
        totals = self.totals.get(tenant, {})
        local = self.unflushed.get(tenant, {})
        sent = self.flushing.get(tenant, {})
        return {
            m: totals.get(prefix + m, 0.0) + local.get(prefix + m, 0.0) + sent.get(prefix + m, 0.0)
            for m in BUDGET_METRICS
        }

    async def check(self, tenant: str, key_id: str, key_budget: Budget | None) -> str | None:
        """Before a request: raise ``BudgetExhausted`` when the key's or the tenant's monthly budget is
        used up; the ``Usage-Warning`` text past a soft threshold. A tenant this process has not served
        yet is read from Redis once (then each flush refreshes it)."""
        tenant = tenant or ANONYMOUS_TENANT
        if tenant not in self.watched:
            self.watched[tenant] = time.monotonic()
            self.unflushed.setdefault(tenant, {})
            with contextlib.suppress(Exception):  # Redis down: no budget known, nothing refused
                await self._refresh([tenant])
        else:
            self.watched[tenant] = time.monotonic()
        if key_budget is not None:
            self.key_budgets[key_id] = key_budget
        else:
            self.key_budgets.pop(key_id, None)
        now = self.clock()
        warning = None
        if key_budget is not None:
            warning = budget_state("key", key_id, key_budget, self.used(tenant, f"k:{key_id}|"), now)
            if warning is not None:
                self._notify(tenant, "key", key_id, key_budget, warning, now)
        tenant_budget = self.tenant_budgets.get(tenant)
        if tenant_budget is not None:
            over = budget_state("tenant", tenant, tenant_budget, self.used(tenant, "t|"), now)
            if over is not None:
                self._notify(tenant, "tenant", tenant, tenant_budget, over, now)
            warning = over or warning
        return warning

    def _notify(self, tenant: str, scope: str, name: str, budget: Budget, warning: str, now: float) -> None:
        """The tenant's ``usage.warning`` webhook, once per (scope, metric, month)."""
        url = self.webhooks.get(tenant)
        if self.webhooks_out is None or not url:
            return
        metric = warning.split("metric=", 1)[1].split(";", 1)[0]
        marker = (month_of(now), scope, name, metric)
        if marker in self._warned:
            return
        self._warned.add(marker)
        used = self.used(tenant, "t|" if scope == "tenant" else f"k:{name}|")[metric]
        event = {
            "type": "usage.warning",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "data": {
                "tenant": tenant, "scope": scope, "name": name, "metric": metric, "used": round(used, 3),
                "limit": getattr(budget, metric), "soft": budget.soft, "month": month_of(now),
                "resets_at": next_month_start(now).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }  # fmt: skip
        self.webhooks_out.warn(tenant, url, event, now)

    # --- the flush ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        """Stop the flush task, then flush what is left (the graceful stop loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            logger.warning("usage: the last flush failed (%s); %d counters lost", exc, len(self.pending))

    async def close(self) -> None:
        """``stop``, then close the Redis client."""
        await self.stop()
        if self.webhooks_out is not None:
            await self.webhooks_out.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # Redis down: the counts stay pending, merged into the next flush
                logger.warning("usage flush failed (%s); %d counters kept for the next one", exc,
                               len(self.pending))  # fmt: skip

    async def flush(self) -> None:
        """Write the pending counters (one pipelined batch), then read the watched tenants' month totals
        and budgets in the same round trip."""
        now = self.clock()
        pending, hour = self.pending, self.pending_hour
        self.pending, self.pending_hour = {}, hour_of(now)
        unflushed, self.unflushed = self.unflushed, {t: {} for t in self.unflushed}
        self.flushing = unflushed
        month = hour[:6]
        horizon = time.monotonic() - 600  # tenants checked in the last 10 minutes
        watched = [t for t, seen in self.watched.items() if seen >= horizon]
        for tenant in [t for t in self.watched if t not in watched]:
            self.watched.pop(tenant, None)
            self.totals.pop(tenant, None)
            self.unflushed.pop(tenant, None)
        if not pending and not watched:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.redis.pipeline(transaction=False) as pipe:
                    touched: set[str] = set()
                    for (tenant, key_id, model, version, door, outcome), counts in pending.items():
                        hkey, mkey = hour_key(tenant, hour), month_key(tenant, month)
                        prefix = f"{key_id}|{model}|{version}|{door}|{outcome}|"
                        for metric, value in zip(METRICS, counts, strict=True):
                            if not value:
                                continue
                            if metric in _FLOATS:
                                pipe.hincrbyfloat(hkey, prefix + metric, value)
                                pipe.hincrbyfloat(mkey, "t|" + metric, value)
                                pipe.hincrbyfloat(mkey, f"k:{key_id}|{metric}", value)
                            else:
                                pipe.hincrby(hkey, prefix + metric, int(value))
                                pipe.hincrby(mkey, "t|" + metric, int(value))
                                pipe.hincrby(mkey, f"k:{key_id}|{metric}", int(value))
                        if tenant not in touched:
                            touched.add(tenant)
                            pipe.expire(hkey, self.retention_s + 3600)
                            pipe.expire(mkey, max(self.retention_s, 62 * 86400))
                            pipe.sadd(TENANTS_KEY, tenant)
                    reads = self._queue_reads(pipe, watched, month_of(now))
                    replies = await pipe.execute()
        except BaseException:
            self.flushing = {}
            self._merge_back(pending, unflushed)
            raise
        self.flushes += 1
        self._observe(pending)
        self._apply_reads(watched, replies[len(replies) - reads :] if reads else [])
        self.flushing = {}
        self.capped = False

    def _merge_back(
        self, pending: dict[tuple[str, str, str, str, str, str], list[float]],
        unflushed: dict[str, dict[str, float]],
    ) -> None:  # fmt: skip
        for key, counts in pending.items():
            mine = self.pending.get(key)
            if mine is None:
                self.pending[key] = counts
            else:
                for i, value in enumerate(counts):
                    mine[i] += value
        for tenant, fields in unflushed.items():
            mine_t = self.unflushed.setdefault(tenant, {})
            for name, value in fields.items():
                mine_t[name] = mine_t.get(name, 0.0) + value

    def _queue_reads(self, pipe: Any, tenants: list[str], month: str) -> int:
        for tenant in tenants:
            pipe.hgetall(month_key(tenant, month))
            pipe.hgetall(settings_key(tenant))
        return 2 * len(tenants)

    def _apply_reads(self, tenants: list[str], replies: list[Any]) -> None:
        for i, tenant in enumerate(tenants):
            totals, settings = replies[2 * i], replies[2 * i + 1]
            self.totals[tenant] = {_s(k): float(_s(v)) for k, v in (totals or {}).items()}
            data = {_s(k): v for k, v in (settings or {}).items()}
            self.tenant_budgets[tenant] = Budget.from_mapping(data)
            url = data.get("webhook_url")
            if url:
                self.webhooks[tenant] = _s(url)
            else:
                self.webhooks.pop(tenant, None)

    async def _refresh(self, tenants: list[str]) -> None:
        async with asyncio.timeout(self.timeout_s):
            async with self.redis.pipeline(transaction=False) as pipe:
                self._queue_reads(pipe, tenants, month_of(self.clock()))
                replies = await pipe.execute()
        self._apply_reads(tenants, replies)

    @staticmethod
    def _observe(pending: Mapping[tuple[str, str, str, str, str, str], list[float]]) -> None:
        """The Prometheus counters (tenant and model: bounded labels, never the key), once per flush."""
        for (tenant, _key, model, _version, _door, _outcome), c in pending.items():
            USAGE_REQUESTS.labels(tenant, model).inc(c[0])
            if c[1]:
                USAGE_ROWS.labels(tenant, model).inc(c[1])
            if c[2]:
                USAGE_BYTES.labels(tenant, model, "in").inc(c[2])
            if c[3]:
                USAGE_BYTES.labels(tenant, model, "out").inc(c[3])
            if c[8]:
                USAGE_COMPUTE.labels(tenant, model).inc(c[8])
            if c[9]:
                USAGE_SAVED.labels(tenant, model).inc(c[9])


# --- reading -----------------------------------------------------------------------------------------
FIELDS = (*METRICS, "errors")


async def tenants(redis: Any) -> list[str]:
    return sorted(_s(t) for t in await redis.smembers(TENANTS_KEY))


async def query(
    redis: Any, tenant_list: list[str], start: datetime, end: datetime, group_by: str = "day",
    model: str | None = None, key_id: str | None = None, door_only: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Usage between ``start`` and ``end`` (hour buckets, UTC), summed by ``group_by``: ``hour``, ``day``,
    ``model``, ``key`` or ``tenant`` (always per tenant too). Each row: its group's columns and every
    metric, ``errors`` (requests whose outcome is not ``ok``)."""
    if group_by not in GROUP_BY:
        raise InvalidInput(f"group_by: expected one of {', '.join(GROUP_BY)}", {"field": "group_by"})
    hours = hours_between(start, end)
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    if not hours or not tenant_list:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for tenant in tenant_list:
            for hour in hours:
                pipe.hgetall(hour_key(tenant, hour))
        replies = await pipe.execute()
    i = 0
    for tenant in tenant_list:
        for hour in hours:
            bucket = replies[i]
            i += 1
            for raw_field, raw_value in (bucket or {}).items():
                parts = _s(raw_field).split("|")
                if len(parts) != 6:
                    continue
                kid, mdl, version, door, outcome, metric = parts
                if door_only is not None and door != door_only:
                    continue
                if (model is not None and mdl != model) or (key_id is not None and kid != key_id):
                    continue
                which = outcome if group_by == "outcome" else door
                group = _group(group_by, tenant, hour, kid, mdl, version, which)
                row = rows.get(group)
                if row is None:
                    row = rows[group] = {**_group_columns(group_by, group), **dict.fromkeys(FIELDS, 0)}
                value = float(_s(raw_value))
                row[metric] = row.get(metric, 0) + value
                if metric == "requests" and outcome != "ok":
                    row["errors"] += value
    out = []
    for group in sorted(rows):
        row = rows[group]
        for metric in FIELDS:
            if metric not in _FLOATS:
                row[metric] = int(row[metric])
            else:
                row[metric] = round(row[metric], 6)
        out.append(row)
    return out


def _group(
    group_by: str, tenant: str, hour: str, kid: str, mdl: str, version: str, door: str
) -> tuple[str, ...]:
    if group_by == "hour":
        return (tenant, hour)
    if group_by == "day":
        return (tenant, hour[:8])
    if group_by == "model":
        return (tenant, mdl, version)
    if group_by == "key":
        return (tenant, kid)
    if group_by in ("door", "outcome"):
        return (tenant, door)
    return (tenant,)


def _group_columns(group_by: str, group: tuple[str, ...]) -> dict[str, Any]:
    tenant = group[0]
    if group_by == "hour":
        h = group[1]
        return {"tenant": tenant, "hour": f"{h[:4]}-{h[4:6]}-{h[6:8]}T{h[8:10]}:00:00Z"}
    if group_by == "day":
        d = group[1]
        return {"tenant": tenant, "day": f"{d[:4]}-{d[4:6]}-{d[6:8]}"}
    if group_by == "model":
        return {"tenant": tenant, "model": group[1], "version": group[2]}
    if group_by == "key":
        return {"tenant": tenant, "key_id": group[1]}
    if group_by in ("door", "outcome"):
        return {"tenant": tenant, group_by: group[1]}
    return {"tenant": tenant}


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (a header line, then one line per row; the columns of the first row)."""
    if not rows:
        return ",".join(FIELDS) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


async def month_usage(redis: Any, tenant: str, key_id: str | None, now: float) -> dict[str, Any]:
    """This month's totals of a tenant (and one of its keys), with their budgets (``GET /v1/usage``)."""
    tenant = tenant or ANONYMOUS_TENANT
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(month_key(tenant, month_of(now)))
        pipe.hgetall(settings_key(tenant))
        totals_raw, settings_raw = await pipe.execute()
    totals = {_s(k): float(_s(v)) for k, v in (totals_raw or {}).items()}

    def scope(prefix: str) -> dict[str, Any]:
        return {m: (round(totals.get(prefix + m, 0.0), 6) if m in _FLOATS else int(totals.get(prefix + m, 0)))
                for m in METRICS}  # fmt: skip

    budget = Budget.from_mapping({_s(k): v for k, v in (settings_raw or {}).items()})
    return {
        "month": time.strftime("%Y-%m", time.gmtime(now)),
        "resets_at": next_month_start(now).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tenant": {"name": tenant, "usage": scope("t|"), "budget": budget.as_dict() if budget else None},
        "key": {"id": key_id, "usage": scope(f"k:{key_id}|")} if key_id else None,
    }


async def set_tenant_budget(redis: Any, tenant: str, budget: Budget | None, webhook_url: str | None) -> None:
    """Store (or, None, remove) a tenant's monthly budget; ``webhook_url`` "" removes it, None keeps it."""
    key = settings_key(tenant)
    async with redis.pipeline(transaction=False) as pipe:  # one key: in order, Cluster-safe
        pipe.hdel(key, *sorted(_BUDGET_FIELDS))
        if budget is not None:
            pipe.hset(key, mapping={k: str(v) for k, v in budget.as_dict().items()})
        if webhook_url == "":
            pipe.hdel(key, "webhook_url")
        elif webhook_url is not None:
            pipe.hset(key, "webhook_url", webhook_url)
        await pipe.execute()


async def tenant_settings(redis: Any, tenant: str) -> dict[str, Any]:
    data = {_s(k): _s(v) for k, v in (await redis.hgetall(settings_key(tenant)) or {}).items()}
    budget = Budget.from_mapping(data)
    return {"tenant": tenant, "budget": budget.as_dict() if budget else None,
            "webhook_url": data.get("webhook_url")}  # fmt: skip


def days_in_month(ts: float) -> int:
    now = datetime.fromtimestamp(ts, UTC)
    return calendar.monthrange(now.year, now.month)[1]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
