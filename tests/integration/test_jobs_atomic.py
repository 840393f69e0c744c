"""No phantom jobs: a submit cut off at every point of its conversation with Redis (the connection dies
before a command is sent, or after it is sent and before its reply is read; once for good as in a crash,
or once transiently and retried), then retried with the same Idempotency-Key by a fresh process, always
ends with the key bound to ONE job that exists, and never with a key bound to nothing. Real Redis."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.launcher import EmbeddedRedis
from app.services.jobs.store import (
    JOB_PREFIX,
    STREAMS,
    Job,
    JobStatus,
    JobStore,
    encode_inputs,
    idem_key,
    new_job_id,
)

pytestmark = pytest.mark.integration

JOB_KEY = re.compile(rb".*:job:[0-9a-f]{32}")
DB = 7  # a database of its own on the session's Redis: this test flushes it


class Faults:
    def __init__(self, at: int, when: str, transient: bool) -> None:
        self.at, self.when, self.transient = at, when, transient
        self.sent = 0
        self.dead = False
        self.fired = False


def flaky_connection(faults: Faults) -> type[Connection]:
    class FlakyConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if faults.dead:
                raise RedisConnectionError("injected: the process is gone")
            faults.sent += 1
            hit = faults.sent == faults.at and not faults.fired
            if hit and faults.when == "before":
                faults.fired, faults.dead = True, not faults.transient
                raise RedisConnectionError("injected: connection lost before the command")
            await super().send_packed_command(command, check_health)
            if hit and faults.when == "after":
                faults.fired, faults.dead = True, not faults.transient
                await self.disconnect()
                raise RedisConnectionError("injected: connection lost before the reply")

    return FlakyConnection


def a_job(owner: str = "") -> tuple[Job, bytes]:
    job = Job(
        id=new_job_id(), owner=owner, status=JobStatus.QUEUED, model="identity_fp32", version=None,
        priority="normal", created_at=time.time(), spec=b'{"outputs":null,"parameters":{}}',
    )  # fmt: skip
    arr = np.array([[1.0, 2.0]], dtype=np.float32)
    return job, encode_inputs({"INPUT0": arr}, {"INPUT0": "FP32"})


@pytest.fixture
async def clean(redis_server: EmbeddedRedis) -> AsyncIterator[aredis.Redis]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    r = aredis.Redis.from_url(url)
    yield r
    await r.flushdb()
    await r.aclose()


async def submit_with_faults(url: str, faults: Faults, key: str) -> None:
    r = aredis.Redis.from_url(
        url, connection_class=flaky_connection(faults), health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),  # as the gateway's client
    )  # fmt: skip
    try:
        job, inputs = a_job()
        await JobStore(r, 3600).submit(job, inputs, ("", key), "fp", 1000)
    except RedisConnectionError:
        pass
    finally:
        await r.aclose()


async def test_a_submit_cut_at_every_point_leaves_no_phantom(
    clean: aredis.Redis, redis_server: EmbeddedRedis
) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    points = 0
    for fresh_scripts in (True, False):  # the first submit of a process loads the script (NOSCRIPT)
        for at in range(1, 5):
            for when in ("before", "after"):
                for transient in (False, True):
                    await clean.flushdb()
                    if fresh_scripts:
                        await clean.script_flush()
                    else:
                        await JobStore(clean, 3600).submit(*a_job(), None, "warm", 1000)
                        await clean.flushdb()
                    faults = Faults(at, when, transient)
                    key = f"k-{at}-{when}-{transient}"
                    await submit_with_faults(url, faults, key)
                    if not faults.fired:
                        continue  # the submit needed fewer commands than this point
                    points += 1
                    where = f"cut {when} command {at} (transient={transient}, fresh={fresh_scripts})"
                    # a restarted process retries the same key with a job id of its own
                    job, inputs = a_job()
                    again = await JobStore(clean, 3600).submit(job, inputs, ("", key), "fp", 1000)
                    assert again.outcome in ("created", "replay"), where
                    stored = await JobStore(clean, 3600).get(again.job_id)
                    assert stored is not None and stored.status == JobStatus.QUEUED, where
                    bound = await clean.get(idem_key("", key))
                    assert bound is not None and bound.decode().split(" ")[1] == again.job_id, where
                    jobs = [k async for k in clean.scan_iter(f"{JOB_PREFIX}*") if JOB_KEY.fullmatch(k)]
                    assert len(jobs) == 1, (where, jobs)
                    assert await clean.xlen(STREAMS["normal"]) == 1, where
                    assert await clean.exists(f"{JOB_PREFIX}{again.job_id}:inputs"), where
    assert points >= 8  # every command of a submit was cut at least once each way


async def test_keys_are_per_owner_and_a_conflict_names_no_job(clean: aredis.Redis) -> None:
    store = JobStore(clean, 3600)
    a, ia = a_job("tenant-a")
    b, ib = a_job("tenant-b")
    first = await store.submit(a, ia, ("tenant-a", "same-key"), "fp-a", 1000)
    other = await store.submit(b, ib, ("tenant-b", "same-key"), "fp-b", 1000)
    assert (first.outcome, other.outcome) == ("created", "created") and first.job_id != other.job_id
    c, ic = a_job("tenant-a")
    clash = await store.submit(c, ic, ("tenant-a", "same-key"), "fp-other", 1000)
    assert clash.outcome == "conflict" and clash.job_id == ""


async def test_a_key_bound_to_an_expired_job_is_taken_over(clean: aredis.Redis) -> None:
    store = JobStore(clean, 3600)
    await clean.set(idem_key("", "stale"), "fp " + new_job_id())  # bound to a job that is gone
    job, inputs = a_job()
    done = await store.submit(job, inputs, ("", "stale"), "fp", 1000)
    assert done.outcome == "created" and done.job_id == job.id
    assert await store.get(job.id) is not None
