"""The job store on Redis: job hashes, the request streams, the dead-letter stream, the webhook schedule.

Every state change that must not happen twice is one Lua script (start, finish, cancel), so a job
reclaimed by a second worker can never be completed twice, and completing a job schedules its webhook
and publishes its event in the same atomic step.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from redis.exceptions import ResponseError

STREAM = "tgw:jobs:stream"  # normal priority; the KEDA ScaledObject watches it
STREAM_HIGH = "tgw:jobs:stream:high"  # read before STREAM by every worker
STREAMS = {"high": STREAM_HIGH, "normal": STREAM}
GROUP = "tgw-workers"
DEAD = "tgw:jobs:dead"
COUNTS = "tgw:jobs:counts"  # status -> jobs that reached it (monotonic)
WEBHOOK_COUNTS = "tgw:webhooks:counts"  # outcome -> deliveries
SCHEDULE = "tgw:webhooks:schedule"  # zset: job id -> next delivery attempt (epoch s)
EVENTS = "tgw:jobs:events"  # pub/sub channel: {"job_id", "status"}
TERMINAL = ("succeeded", "failed", "cancelled")


def job_key(job_id: str) -> str:
    return f"tgw:job:{job_id}"


def deliveries_key(job_id: str) -> str:
    return f"tgw:job:{job_id}:deliveries"


def idem_key(key: str) -> str:
    return f"tgw:jobs:idem:{key}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def event(job_id: str, status: str) -> bytes:
    return orjson.dumps({"job_id": job_id, "status": status})


_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'gone', 0} end
if st ~= 'queued' and st ~= 'running' then return {st, 0} end
local n = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if n >= tonumber(ARGV[2]) then return {'exhausted', n} end
n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
if st == 'queued' then
  redis.call('HINCRBY', KEYS[2], 'running', 1)
  redis.call('PUBLISH', KEYS[3], ARGV[3])
end
return {'running', n}
"""

# KEYS: job, counts, schedule, events, deliveries. ARGV: status, now, result, error, cache, ttl, id, event
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return 0 end
if ARGV[1] == 'cancelled' and st ~= 'queued' then return st end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'cache', ARGV[5]) end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local url = redis.call('HGET', KEYS[1], 'webhook_url')
if url and url ~= '' then
  redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_attempts', 0)
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[7])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', KEYS[4], ARGV[8])
return 1
"""

# Claim due webhook deliveries: push their score out by a lease so a crashed dispatcher's item returns.
_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


async def ensure_groups(redis: Any) -> None:
    """The consumer group on every priority stream, from the stream's start (so nothing queued before
    the group existed is skipped)."""
    for stream in STREAMS.values():
        try:
            await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


class JobStore:
    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._start = redis.register_script(_START)
        self._finish = redis.register_script(_FINISH)
        self._claim_due = redis.register_script(_CLAIM_DUE)

    # --- submit -------------------------------------------------------------------------------
    async def claim_idempotency(self, key: str, fingerprint: str, job_id: str) -> tuple[str, str] | None:
        """None when the key is new (now bound to ``job_id``); else the (fingerprint, job id) it holds."""
        ok = await self.redis.set(idem_key(key), f"{fingerprint} {job_id}", nx=True, ex=self.ttl_s)
        if ok:
            return None
        held = await self.redis.get(idem_key(key))
        if held is None:  # expired in between: take it now
            return await self.claim_idempotency(key, fingerprint, job_id)
        fp, _, jid = _s(held).partition(" ")
        return fp, jid

    async def queue_depth(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in STREAMS.values():
                pipe.xlen(stream)
            return sum(int(n) for n in await pipe.execute())

    async def create_queued(self, job_id: str, fields: dict[str, str], priority: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping=fields)
            pipe.expire(job_key(job_id), self.ttl_s)
            pipe.hincrby(COUNTS, "queued", 1)
            pipe.xadd(STREAMS[priority], {"job_id": job_id})
            await pipe.execute()

    async def create_finished(self, job_id: str, fields: dict[str, str], result: bytes, cache: str) -> None:
        """A job answered from the cache: created and finished in one transaction (same finish script)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping=fields)
            pipe.hincrby(COUNTS, "queued", 1)
            await self._finish(
                keys=[job_key(job_id), COUNTS, SCHEDULE, EVENTS],
                args=[
                    "succeeded",
                    time.time(),
                    result,
                    b"",
                    cache,
                    self.ttl_s,
                    job_id,
                    event(job_id, "succeeded"),
                ],
                client=pipe,
            )
            await pipe.execute()

    # --- state changes --------------------------------------------------------------------------
    async def start(self, job_id: str, max_attempts: int) -> tuple[str, int]:
        status, n = await self._start(
            keys=[job_key(job_id), COUNTS, EVENTS], args=[time.time(), max_attempts, event(job_id, "running")]
        )
        return _s(status), int(n)

    async def finish(
        self, job_id: str, status: str, result: bytes = b"", error: bytes = b"", cache: str = ""
    ) -> bool | str:
        """True when this call completed the job; False when it was already finished (or gone)."""
        done = await self._finish(
            keys=[job_key(job_id), COUNTS, SCHEDULE, EVENTS],
            args=[status, time.time(), result, error, cache, self.ttl_s, job_id, event(job_id, status)],
        )
        if isinstance(done, bytes | str):
            return _s(done)
        return bool(done)

    async def cancel(self, job_id: str) -> tuple[bool, str]:
        """(True, 'cancelled'), or (False, the status that prevents it or 'gone')."""
        done = await self.finish(job_id, "cancelled")
        if done is True:
            return True, "cancelled"
        if done is False:
            status = await self.redis.hget(job_key(job_id), "status")
            return False, _s(status) if status is not None else "gone"
        return False, done

    async def get(self, job_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(job_key(job_id))
        return decode_hash(raw) if raw else None

    async def status(self, job_id: str) -> str | None:
        status = await self.redis.hget(job_key(job_id), "status")
        return _s(status) if status is not None else None

    async def dead_letter(self, job_id: str, reason: str, attempts: int) -> None:
        await self.redis.xadd(
            DEAD, {"job_id": job_id, "reason": reason, "attempts": str(attempts), "at": str(time.time())},
            maxlen=100_000, approximate=True,
        )  # fmt: skip

    async def set_last_error(self, job_id: str, error: bytes) -> None:
        await self.redis.hset(job_key(job_id), "last_error", error)

    # --- webhooks -----------------------------------------------------------------------------
    async def claim_due_webhooks(self, lease_s: float, limit: int) -> list[str]:
        now = time.time()
        ids = await self._claim_due(keys=[SCHEDULE], args=[now, now + lease_s, limit])
        return [_s(i) for i in ids]

    async def webhook_body(self, job_id: str, build: bytes) -> bytes:
        """The payload fixed at the first attempt, so every retry sends the same bytes."""
        await self.redis.hsetnx(job_key(job_id), "webhook_body", build)
        body = await self.redis.hget(job_key(job_id), "webhook_body")
        return bytes(body) if body is not None else build

    async def record_delivery(
        self, job_id: str, attempt: dict[str, Any], state: str, next_at: float | None
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(deliveries_key(job_id), orjson.dumps(attempt))
            pipe.expire(deliveries_key(job_id), self.ttl_s)
            pipe.hset(
                job_key(job_id), mapping={"webhook_status": state, "webhook_attempts": attempt["attempt"]}
            )
            pipe.hincrby(WEBHOOK_COUNTS, attempt["outcome"], 1)
            if next_at is None:
                pipe.zrem(SCHEDULE, job_id)
            else:
                pipe.zadd(SCHEDULE, {job_id: next_at})
            await pipe.execute()

    async def unschedule(self, job_id: str) -> None:
        await self.redis.zrem(SCHEDULE, job_id)

    async def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in await self.redis.lrange(deliveries_key(job_id), 0, -1)]

    # --- numbers for autoscaling and metrics ------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        now_ms = time.time() * 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in STREAMS.values():
                pipe.xlen(stream)
                pipe.xrange(stream, "-", "+", count=1)
            pipe.hgetall(COUNTS)
            pipe.hgetall(WEBHOOK_COUNTS)
            pipe.zcard(SCHEDULE)
            pipe.xlen(DEAD)
            res = await pipe.execute()
        depth = {p: int(res[2 * i]) for i, p in enumerate(STREAMS)}
        oldest = 0.0
        for i in range(len(STREAMS)):
            entries = res[2 * i + 1]
            if entries:
                ms = int(_s(entries[0][0]).split("-", 1)[0])
                oldest = max(oldest, (now_ms - ms) / 1000)
        n = 2 * len(STREAMS)
        return {
            "queue_depth": sum(depth.values()),
            "queue_depth_by_priority": depth,
            "oldest_pending_age_seconds": round(oldest, 3),
            "jobs_total": {k: int(v) for k, v in decode_hash(res[n]).items()},
            "webhook_deliveries_total": {k: int(v) for k, v in decode_hash(res[n + 1]).items()},
            "webhooks_scheduled": int(res[n + 2]),
            "dead_letters": int(res[n + 3]),
        }
