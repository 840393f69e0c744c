"""The job store on Redis: the only code that talks to Redis about jobs (records, request streams, dead
letters, the webhook schedule and its delivery log).

Every state change that must not happen twice, or must not happen by halves, is one Lua script:

* ``submit``: claim the ``Idempotency-Key``, create the job record, store its inputs and enqueue it (or
  create it already finished, for a cache hit) in ONE atomic step. A gateway that dies at any point of a
  submit leaves either nothing or the whole job; a key is never bound to a job that does not exist.
* ``start``, ``finish``, ``cancel``: a job reclaimed by a second worker is never completed twice, and
  completing a job deletes its inputs, schedules its webhook and publishes its event in the same step.

Every key carries the hash tag ``{tgw:jobs}`` so the scripts' keys share one slot on a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.clients.tensors import tensor_bytes, tensor_from_bytes
from app.errors import ServiceUnavailable

TAG = "{tgw:jobs}"
STREAM = f"{TAG}:stream"  # normal priority; the KEDA ScaledObject watches it
STREAM_HIGH = f"{TAG}:stream:high"  # read before STREAM by every worker
STREAMS = {"high": STREAM_HIGH, "normal": STREAM}
GROUP = "tgw-workers"
DEAD = f"{TAG}:dead"
COUNTS = f"{TAG}:counts"  # status -> jobs that reached it (monotonic)
WEBHOOK_COUNTS = f"{TAG}:webhooks:counts"  # outcome -> deliveries
SCHEDULE = f"{TAG}:webhooks:schedule"  # zset: job id -> next delivery attempt (epoch s)
EVENTS = "tgw:jobs:events"  # pub/sub channel: {"job_id", "status"[, "partials"]}
JOB_PREFIX = f"{TAG}:job:"

_JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


TERMINAL = frozenset(s for s in JobStatus if s.terminal)


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def inputs_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:inputs"


def deliveries_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:deliveries"


def progress_key(job_id: str, n: int) -> str:
    """A progress webhook message (``job.progress``) of a job: its body and attempts."""
    return f"{JOB_PREFIX}{job_id}:progress:{n}"


def progress_member(job_id: str, n: int) -> str:
    """The webhook schedule's member of progress message ``n`` (a bare job id is the final delivery)."""
    return f"{job_id}.p{n}"


def parse_member(member: str) -> tuple[str, int | None]:
    """(job id, progress message number or None for the job's final delivery) of a schedule member."""
    job_id, _, n = member.partition(".p")
    return job_id, (int(n) if n.isdigit() else None)


def idem_key(owner: str, key: str) -> str:
    """Scoped by owner: the same key from two tenants names two different bindings."""
    digest = hashlib.sha256(owner.encode() + b"\0" + key.encode()).hexdigest()
    return f"{TAG}:idem:{digest}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """Only ids this gateway could have issued name a job (``x:deliveries`` is no job id)."""
    return _JOB_ID.fullmatch(job_id) is not None


def event(job_id: str, status: str) -> bytes:
    return orjson.dumps({"job_id": job_id, "status": status})


def partials_event(job_id: str, partials: list[bytes]) -> bytes:
    """Partial results of a running job (a decoupled model's responses), each ``{"seq", "result"}`` JSON,
    as one event: the hub hands them to the job's subscribers without re-reading the job."""
    return orjson.dumps(
        {"job_id": job_id, "status": "running", "partials": [orjson.Fragment(p) for p in partials]}
    )


# --- compact inputs: tensor bytes with datatype and shape, not JSON ---------------------------------
def encode_inputs(inputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> bytes:
    header, blobs = [], []
    for name, arr in inputs.items():
        blob = tensor_bytes(arr)
        header.append([name, datatypes[name], list(arr.shape), len(blob)])
        blobs.append(blob)
    head = orjson.dumps(header)
    return len(head).to_bytes(4, "little") + head + b"".join(blobs)


def decode_inputs(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    n = int.from_bytes(blob[:4], "little")
    header = orjson.loads(blob[4 : 4 + n])
    offset = 4 + n
    inputs, datatypes = {}, {}
    for name, datatype, shape, size in header:
        inputs[name] = tensor_from_bytes(blob[offset : offset + size], datatype, shape)
        datatypes[name] = datatype
        offset += size
    return inputs, datatypes


@dataclass(slots=True)
class Job:
    """A job record as stored (``{tgw:jobs}:job:<id>``)."""

    id: str
    owner: str
    status: JobStatus
    model: str
    version: str | None
    priority: str
    created_at: float | None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    request_id: str = ""
    spec: bytes = b"{}"  # JobSpec.to_record() (app.domain); the inputs are stored apart
    result: bytes | None = None  # the v1 answer, JSON
    cache: str | None = None
    error: bytes | None = None  # {"code", "message", "details"}, JSON
    last_error: bytes | None = None
    webhook_url: str | None = None
    webhook_progress: bool = False  # the submission asked for job.progress webhooks too
    webhook_status: str | None = None
    webhook_attempts: int = 0

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Job | None:
        """None for a hash without a status: no job (a missing status never reads as "queued")."""
        h = {_s(k): v for k, v in raw.items()}
        if h.get("status") is None:
            return None

        def text(name: str) -> str | None:
            value = h.get(name)
            return _s(value) if value is not None else None

        def num(name: str) -> float | None:
            value = text(name)
            return float(value) if value else None

        return cls(
            id=text("id") or "", owner=text("owner") or "", status=JobStatus(_s(h["status"])),
            model=text("model") or "", version=text("version") or None,
            priority=text("priority") or "normal", created_at=num("created_at"),
            started_at=num("started_at"), finished_at=num("finished_at"),
            attempts=int(text("attempts") or 0), request_id=text("request_id") or "",
            spec=bytes(h.get("spec") or b"{}"), result=_b(h.get("result")), cache=text("cache"),
            error=_b(h.get("error")), last_error=_b(h.get("last_error")),
            webhook_url=text("webhook_url") or None, webhook_progress=text("webhook_progress") == "1",
            webhook_status=text("webhook_status"),
            webhook_attempts=int(text("webhook_attempts") or 0),
        )  # fmt: skip

    def fields(self) -> dict[str, str | bytes]:
        """The hash fields written at submit."""
        out: dict[str, str | bytes] = {
            "id": self.id, "owner": self.owner, "status": str(self.status), "model": self.model,
            "version": self.version or "", "priority": self.priority, "created_at": repr(self.created_at),
            "attempts": str(self.attempts), "request_id": self.request_id, "spec": self.spec,
            "webhook_url": self.webhook_url or "",
        }  # fmt: skip
        if self.webhook_progress:
            out["webhook_progress"] = "1"
        if self.result is not None:
            out["result"] = self.result
            out["cache"] = self.cache or ""
            out["finished_at"] = repr(self.finished_at)
        return out


@dataclass(frozen=True, slots=True)
class Submitted:
    outcome: str  # "created" | "replay" | "conflict" | "full"
    job_id: str = ""
    status: JobStatus | None = None


# For the store's callers, which never import redis: Redis unreachable, restarting (loading) or slow,
# worth retrying; and any failure of the store.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
STORE_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


class JobStoreUnavailable(ServiceUnavailable, code="job_store_unavailable"):
    pass


@contextmanager
def redis_errors(retry_after_s: int = 2) -> Iterator[None]:
    """Redis down, stalled or restarting: a 503 with Retry-After, never a 500."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
        raise JobStoreUnavailable(
            f"the job store (Redis) is unavailable: {type(exc).__name__}; retry later",
            retry_after_s=retry_after_s,
        ) from None


# A finished job with a webhook is scheduled for delivery, in every script that finishes one (written
# once, expanded into each: ``${schedule_webhook(job key, schedule key, when, job id)}``).
_SCHEDULE_WEBHOOK = """local url = redis.call('HGET', {job}, 'webhook_url')
if url and url ~= '' then
  redis.call('HSET', {job}, 'webhook_status', 'pending', 'webhook_attempts', 0)
  redis.call('ZADD', {schedule}, {when}, {job_id})
end"""
_EXPANSION = re.compile(r"^( *)\$\{schedule_webhook\((.+?), (.+?), (.+?), (.+?)\)\}$", re.M)


def _lua(script: str) -> str:
    def expand(m: re.Match[str]) -> str:
        indent, job, schedule, when, job_id = m.groups()
        text = _SCHEDULE_WEBHOOK.format(job=job, schedule=schedule, when=when, job_id=job_id)
        return "\n".join(indent + line for line in text.splitlines())

    return _EXPANSION.sub(expand, script)


# KEYS: idem, job, inputs, counts, stream (this job's), stream high, stream normal, schedule
# ARGV: use_idem, fingerprint, job_id, ttl, queue_max, status, event, job prefix, inputs, now, channel,
#       then the hash fields (name, value, ...)
_SUBMIT = """
local st = redis.call('HGET', KEYS[2], 'status')
if st then return {'created', ARGV[3], st} end
if ARGV[1] == '1' then
  local held = redis.call('GET', KEYS[1])
  if held then
    local sp = string.find(held, ' ', 1, true)
    local jid = string.sub(held, sp + 1)
    local hst = redis.call('HGET', ARGV[8] .. jid, 'status')
    if hst then
      if string.sub(held, 1, sp - 1) ~= ARGV[2] then return {'conflict', '', ''} end
      return {'replay', jid, hst}
    end
  end
end
if ARGV[6] == 'queued' then
  local depth = redis.call('XLEN', KEYS[6]) + redis.call('XLEN', KEYS[7])
  if depth >= tonumber(ARGV[5]) then return {'full', '', ''} end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 12))
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'queued', 1)
if ARGV[6] == 'queued' then
  redis.call('SET', KEYS[3], ARGV[9], 'EX', ARGV[4])
  redis.call('XADD', KEYS[5], '*', 'job_id', ARGV[3])
else
  redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
  ${schedule_webhook(KEYS[2], KEYS[8], ARGV[10], ARGV[3])}
  redis.call('PUBLISH', ARGV[11], ARGV[7])
end
if ARGV[1] == '1' then redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. ARGV[3], 'EX', ARGV[4]) end
return {'created', ARGV[3], ARGV[6]}
"""

# KEYS: job, counts. ARGV: now, max attempts, event, channel
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
  redis.call('PUBLISH', ARGV[4], ARGV[3])
end
return {'running', n}
"""

# KEYS: job, counts, schedule, inputs. ARGV: status, now, result, error, cache, ttl, id, event, channel
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'gone' end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return st end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'cache', ARGV[5]) end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('DEL', KEYS[4])
${schedule_webhook(KEYS[1], KEYS[3], ARGV[2], ARGV[7])}
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[9], ARGV[8])
return 'done'
"""

# Claim due webhook deliveries: push their score out by a lease so a crashed dispatcher's item returns.
_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


# KEYS: job, deliveries, webhook counts, schedule.
# ARGV: attempt JSON, state, attempt n, outcome, next at, ttl, id
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[4], ARGV[7])
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('HSET', KEYS[1], 'webhook_status', ARGV[2], 'webhook_attempts', ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if ARGV[5] == '' then redis.call('ZREM', KEYS[4], ARGV[7])
else redis.call('ZADD', KEYS[4], ARGV[5], ARGV[7]) end
return 1
"""


# A progress webhook message of a running job with a webhook (KEYS: job, progress, schedule;
# ARGV: body, ttl, member, now): stored and scheduled in one step, never for a finished job.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[2], 'body', ARGV[1], 'attempts', 0)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
return 1
"""

# The outcome of a progress delivery attempt (KEYS: progress, webhook counts, schedule;
# ARGV: attempts, outcome, next at ('' = done), member)
_RECORD_PROGRESS = """
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[3] == '' or redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[4])
  return 0
end
redis.call('HSET', KEYS[1], 'attempts', ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
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


def _b(value: Any) -> bytes | None:
    if value is None:
        return None
    return bytes(value) if isinstance(value, bytes | bytearray) else str(value).encode()


def _entry_job(fields: Any) -> str:
    return _s((fields or {}).get(b"job_id") or (fields or {}).get("job_id") or "")


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


class JobStore:
    def __init__(self, redis: Any, ttl_s: int, blocking: Any = None) -> None:
        self.redis = redis  # calls bounded by a short socket timeout
        self.blocking = blocking if blocking is not None else redis  # XREADGROUP BLOCK and pub/sub idle
        self.ttl_s = ttl_s
        self._submit = redis.register_script(_lua(_SUBMIT))
        self._start = redis.register_script(_START)
        self._finish = redis.register_script(_lua(_FINISH))
        self._claim_due = redis.register_script(_CLAIM_DUE)
        self._record = redis.register_script(_RECORD)
        self._progress = redis.register_script(_PROGRESS)
        self._record_progress = redis.register_script(_RECORD_PROGRESS)

    # --- submit -------------------------------------------------------------------------------
    async def submit(
        self, job: Job, inputs: bytes, idempotency: tuple[str, str] | None, fingerprint: str, queue_max: int
    ) -> Submitted:
        """Claim the key (``(owner, key)``, if any) and create the job in one atomic step. A job with a
        ``result`` is created finished (a cache hit); any other is queued on its priority's stream.
        Safe to call again with the same job after a lost reply: the second call reports the first."""
        idem = idem_key(*idempotency) if idempotency is not None else f"{TAG}:idem:-"
        fields: list[Any] = []
        for name, value in job.fields().items():
            fields += [name, value]
        status = job.status
        outcome, job_id, st = await self._submit(
            keys=[
                idem, job_key(job.id), inputs_key(job.id), COUNTS, STREAMS[job.priority], STREAM_HIGH,
                STREAM, SCHEDULE,
            ],
            args=[
                "1" if idempotency is not None else "0", fingerprint, job.id, self.ttl_s, queue_max,
                str(status), event(job.id, status), JOB_PREFIX, inputs, time.time(), EVENTS, *fields,
            ],
        )  # fmt: skip
        st = _s(st)
        return Submitted(_s(outcome), _s(job_id), JobStatus(st) if st else None)

    # --- the request streams (consumer group) ---------------------------------------------------
    async def ensure_groups(self) -> None:
        await ensure_groups(self.redis)

    async def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, str, str]]:
        """New entries for ``consumer``, high priority first: ``(stream, entry id, job id)``."""
        resp = await self.redis.xreadgroup(GROUP, consumer, {STREAM_HIGH: ">"}, count=count)
        if not resp:
            resp = await self.blocking.xreadgroup(
                GROUP, consumer, {STREAM_HIGH: ">", STREAM: ">"}, count=count, block=block_ms
            )
        return [(_s(stream), _s(eid), _entry_job(f)) for stream, entries in resp or [] for eid, f in entries]

    async def reclaim(self, stream: str, consumer: str, idle_ms: int, count: int) -> list[tuple[str, str]]:
        """Entries pending longer than ``idle_ms`` on other consumers, now ``consumer``'s: ``(entry id, job
        id)``. Entries deleted from the stream while pending are acked and left out."""
        res = await self.redis.xautoclaim(stream, GROUP, consumer, idle_ms, start_id="0-0", count=count)
        out = []
        for entry in res[1] if res and len(res) > 1 else []:
            if not entry or entry[0] is None:
                continue
            entry_id, fields = entry
            if not fields:
                await self.ack(stream, _s(entry_id))
                continue
            out.append((_s(entry_id), _entry_job(fields)))
        return out

    async def keep_claimed(self, stream: str, consumer: str, entry_id: str) -> None:
        """Heartbeat of a running entry: resets its idle time so no one reclaims it."""
        await self.redis.xclaim(stream, GROUP, consumer, 0, [entry_id], justid=True)

    async def ack(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def events(self) -> Any:
        """A pub/sub object for the job events channel (subscribe with ``subscribe(EVENTS)``). On a
        Cluster the client learns the slot map first: its pub/sub picks the node by the channel's slot
        and fails on an empty map (a classic PUBLISH reaches every node, so any node serves)."""
        if isinstance(self.blocking, RedisCluster):
            await self.blocking.initialize()
        return self.blocking.pubsub(ignore_subscribe_messages=True)

    # --- state changes --------------------------------------------------------------------------
    async def start(self, job_id: str, max_attempts: int) -> tuple[str, int]:
        status, n = await self._start(
            keys=[job_key(job_id), COUNTS],
            args=[time.time(), max_attempts, event(job_id, JobStatus.RUNNING), EVENTS],
        )
        return _s(status), int(n)

    async def finish(
        self, job_id: str, status: JobStatus, result: bytes = b"", error: bytes = b"", cache: str = ""
    ) -> bool:
        """True when this call completed the job; False when it was already finished or gone. A cancel
        finishes a queued or a running job (the worker running it notices: ``JobWorker``)."""
        done = await self._finish(
            keys=[job_key(job_id), COUNTS, SCHEDULE, inputs_key(job_id)],
            args=[
                str(status), time.time(), result, error, cache, self.ttl_s, job_id, event(job_id, status),
                EVENTS,
            ],
        )  # fmt: skip
        return _s(done) == "done"

    async def publish_partials(self, job_id: str, partials: list[bytes]) -> None:
        """Push partial results to the job's subscribers (pub/sub: at most once; the job's stored result
        holds the whole sequence once it completes)."""
        await self.redis.publish(EVENTS, partials_event(job_id, partials))

    async def status(self, job_id: str) -> str | None:
        """The job's status alone (a running job's worker checks it for a cancel)."""
        st = await self.redis.hget(job_key(job_id), "status")
        return _s(st) if st is not None else None

    async def get(self, job_id: str) -> Job | None:
        if not valid_job_id(job_id):
            return None
        return Job.from_hash(await self.redis.hgetall(job_key(job_id)))

    async def inputs(self, job_id: str) -> bytes | None:
        blob = await self.redis.get(inputs_key(job_id))
        return bytes(blob) if blob is not None else None

    async def dead_letter(self, job_id: str, reason: str, attempts: int) -> None:
        await self.redis.xadd(
            DEAD, {"job_id": job_id, "reason": reason, "attempts": str(attempts), "at": str(time.time())},
            maxlen=100_000, approximate=True,
        )  # fmt: skip

    async def dead_letter_webhook(self, job_id: str, reason: str) -> None:
        await self.redis.xadd(
            DEAD, {"job_id": job_id, "kind": "webhook", "reason": reason, "at": str(time.time())},
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
        """Log the attempt and reschedule (or unschedule) in one step; nothing is written for a job that
        has expired meanwhile (no record without a TTL left behind)."""
        await self._record(
            keys=[job_key(job_id), deliveries_key(job_id), WEBHOOK_COUNTS, SCHEDULE],
            args=[
                orjson.dumps(attempt), state, attempt["attempt"], attempt["outcome"],
                "" if next_at is None else next_at, self.ttl_s, job_id,
            ],
        )  # fmt: skip

    async def add_progress(self, job_id: str, n: int, body: bytes) -> bool:
        """Store progress message ``n`` of a running job and schedule its delivery now; False (nothing
        stored) when the job is no longer running."""
        done = await self._progress(
            keys=[job_key(job_id), progress_key(job_id, n), SCHEDULE],
            args=[body, self.ttl_s, progress_member(job_id, n), time.time()],
        )
        return bool(int(done))

    async def progress(self, job_id: str, n: int) -> tuple[bytes, int] | None:
        """(body, attempts so far) of progress message ``n``; None once delivered, given up or expired."""
        raw = await self.redis.hgetall(progress_key(job_id, n))
        h = {_s(k): v for k, v in raw.items()}
        if "body" not in h:
            return None
        return bytes(h["body"]), int(_s(h.get("attempts", b"0")))

    async def record_progress(
        self, job_id: str, n: int, attempts: int, outcome: str, next_at: float | None
    ) -> None:
        """Count the attempt's outcome and reschedule the message (``next_at``) or drop it (None)."""
        await self._record_progress(
            keys=[progress_key(job_id, n), WEBHOOK_COUNTS, SCHEDULE],
            args=[attempts, outcome, "" if next_at is None else next_at, progress_member(job_id, n)],
        )

    async def defer_webhooks(self, due: dict[str, float]) -> None:
        """Put claimed deliveries back for later (job id -> epoch s) without counting an attempt (their
        receiver or owner is busy, or the dispatcher is draining); one that was unscheduled stays so."""
        await self.redis.zadd(SCHEDULE, due, xx=True)

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
