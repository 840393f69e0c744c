"""Per-key limits that hold across replicas: request rate with burst (GCRA), concurrent in-flight
requests and a daily quota, checked and taken together by ONE Lua script in Redis (one round trip,
atomic, Redis's clock so replicas with skewed clocks agree).

Why not the ``limits`` library: its strategies are fixed, moving and sliding windows (no burst
parameter, no GCRA/token bucket), and each limit is its own storage call, so rate + concurrency + quota
would be three round trips per request instead of one, and it has no concurrency (in-flight) limit at
all. The script is ~40 lines and tested against the real redis-server (tests/integration/test_auth.py).

``LocalLimiter`` is the same GCRA and in-flight count in process memory: used when Redis does not
answer, for keys verified before it went away (so N replicas then allow up to N times the rate; daily
quotas are not counted meanwhile). Documented in docs/auth.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from app.auth.principal import Limits

logger = logging.getLogger(__name__)

# KEYS: tat (GCRA theoretical arrival time), slots (zset of in-flight ids), day (today's count)
# ARGV: interval_ms (<=0: no rate), burst, concurrency (0: none), slot id, slot ttl ms, quota (0: none),
#       cost
# -> {0, remaining, reset_ms} admitted | {1, retry_ms} rate | {2, retry_ms} in-flight | {3, retry_ms} quota
SCRIPT = """
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local conc, slot, slot_ttl = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local quota, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
local new_tat, remaining, reset = 0, -1, 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  new_tat = tat + interval * cost
  local ahead = new_tat - now
  if ahead > burst * interval then
    return {1, math.ceil(ahead - burst * interval)}
  end
  remaining = math.floor((burst * interval - ahead) / interval)
  reset = math.ceil(ahead)
end
if conc > 0 and slot ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - slot_ttl)
  if redis.call('ZCARD', KEYS[2]) >= conc then
    return {2, 1000}
  end
end
local day_end = (math.floor(now / 86400000) + 1) * 86400000
if quota > 0 then
  local used = tonumber(redis.call('GET', KEYS[3])) or 0
  if used + cost > quota then
    return {3, day_end - now}
  end
  redis.call('INCRBY', KEYS[3], cost)
  redis.call('PEXPIREAT', KEYS[3], day_end)
end
if conc > 0 and slot ~= '' then
  redis.call('ZADD', KEYS[2], now, slot)
  redis.call('PEXPIRE', KEYS[2], slot_ttl)
end
if interval > 0 then
  redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1)
end
return {0, remaining, reset}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

ADMITTED, RATE, CONCURRENCY, QUOTA = 0, 1, 2, 3
_REASONS = {RATE: "rate", CONCURRENCY: "concurrency", QUOTA: "daily quota"}


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: int
    retry_after_s: float = 0.0
    remaining: int = -1
    reset_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.outcome == ADMITTED

    @property
    def reason(self) -> str:
        return _REASONS.get(self.outcome, "")


def keys_for(key_id: str, kind: str = "req") -> list[str]:
    """Redis keys of one API key's counters; the ``{id}`` hash tag keeps them in one Cluster slot."""
    base = f"tgw:auth:rl:{{{key_id}}}:"
    return [base + "tat", base + ("inflight" if kind == "req" else kind), base + "day"]


_slot_ids = itertools.count(1)
_SLOT_PREFIX = os.urandom(6).hex()


def new_slot_id() -> str:
    return f"{_SLOT_PREFIX}-{next(_slot_ids)}"


class RedisLimiter:
    """``admit`` runs the script: EVALSHA on the given auto-pipeline (``app.clients.redis.AutoPipeline``)
    or client; a Redis without the script gets it once (NOSCRIPT -> SCRIPT LOAD, retry)."""

    def __init__(self, redis: Any, submit: Any, slot_ttl_s: float, timeout_s: float) -> None:
        self.redis = redis
        self.submit = submit  # async callable(*command) -> raw reply
        self.slot_ttl_ms = int(slot_ttl_s * 1000)
        self.timeout_s = timeout_s
        self._releases: set[asyncio.Task[Any]] = set()

    async def admit(
        self, key_id: str, limits: Limits, slot: str, kind: str = "req", cost: int = 1,
        rate: bool = True, concurrency: int | None = None, quota: bool = True,
        slot_ttl_s: float | None = None,
    ) -> Decision:  # fmt: skip
        interval = 1000.0 / limits.rps if rate else 0.0
        conc = limits.concurrency if concurrency is None else concurrency
        ttl = self.slot_ttl_ms if slot_ttl_s is None else int(slot_ttl_s * 1000)
        args = (interval, limits.burst, conc, slot, ttl, limits.daily_quota if quota else 0, cost)
        keys = keys_for(key_id, kind)
        try:
            reply = await self.submit("EVALSHA", SCRIPT_SHA, 3, *keys, *args)
        except NoScriptError:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.script_load(SCRIPT)
            reply = await self.submit("EVALSHA", SCRIPT_SHA, 3, *keys, *args)
        outcome = int(reply[0])
        if outcome == ADMITTED:
            return Decision(ADMITTED, remaining=int(reply[1]), reset_s=int(reply[2]) / 1000)
        return Decision(outcome, retry_after_s=int(reply[1]) / 1000)

    def release(self, key_id: str, slot: str, kind: str = "req") -> None:
        """Give the in-flight slot back, without making the response wait for Redis."""
        task = asyncio.ensure_future(self._release(keys_for(key_id, kind)[1], slot))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, zset: str, slot: str) -> None:
        try:
            await self.submit("ZREM", zset, slot)
        except Exception as exc:  # the slot then expires after the slot TTL
            logger.debug("releasing a concurrency slot failed: %s", type(exc).__name__)

    async def drain(self, timeout_s: float = 1.0) -> None:
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=timeout_s)


class LocalLimiter:
    """The same GCRA and in-flight bound, per process (Redis unreachable). No daily quota."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.tat: dict[str, float] = {}
        self.inflight: dict[str, int] = {}
        self.max_keys = max_keys

    def admit(self, key_id: str, limits: Limits, take_slot: bool, rate: bool = True) -> Decision:
        now = time.monotonic()
        new_tat = 0.0
        if rate:
            interval = 1.0 / limits.rps
            tat = max(self.tat.get(key_id, now), now)
            new_tat = tat + interval
            ahead = new_tat - now
            if ahead > limits.burst * interval:
                return Decision(RATE, retry_after_s=ahead - limits.burst * interval)
        if take_slot and limits.concurrency and self.inflight.get(key_id, 0) >= limits.concurrency:
            return Decision(CONCURRENCY, retry_after_s=1.0)
        if rate:
            if len(self.tat) >= self.max_keys and key_id not in self.tat:
                self.tat.clear()
            self.tat[key_id] = new_tat
        if take_slot:
            self.inflight[key_id] = self.inflight.get(key_id, 0) + 1
        return Decision(ADMITTED)

    def release(self, key_id: str) -> None:
        n = self.inflight.get(key_id, 0) - 1
        if n > 0:
            self.inflight[key_id] = n
        else:
            self.inflight.pop(key_id, None)


def policy_header(limits: Limits) -> str:
    """``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers): the burst bucket refills fully in
    ``w`` seconds; a daily quota is a second policy."""
    window = max(1, math.ceil(limits.burst / limits.rps))
    policy = f'"burst";q={limits.burst};w={window}'
    if limits.daily_quota:
        policy += f', "daily";q={limits.daily_quota};w=86400'
    return policy


def state_header(decision: Decision) -> str:
    name = "daily" if decision.outcome == QUOTA else "burst"
    remaining = max(decision.remaining, 0)
    reset = decision.retry_after_s if not decision.admitted else decision.reset_s
    return f'"{name}";r={remaining};t={max(0, math.ceil(reset))}'
