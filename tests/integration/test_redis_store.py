"""The cache's Redis store against the real redis-server: commands from one event-loop turn share one
round trip (``AutoPipeline``), every caller gets its own reply or its own error."""

from __future__ import annotations

import asyncio

import pytest

from app.clients.redis import RedisCacheStore, make_redis
from app.launcher import EmbeddedRedis

pytestmark = pytest.mark.integration


async def test_concurrent_get_and_set_are_pipelined_and_answered_each(redis_server: EmbeddedRedis) -> None:
    store = RedisCacheStore(make_redis(redis_server.url, 2.0), 2.0)
    assert store.auto is not None
    keys = [f"test:store:{i}" for i in range(200)]
    await asyncio.gather(*(store.set(k, f"v{i}".encode(), 30) for i, k in enumerate(keys)))
    got = await asyncio.gather(*(store.get(k) for k in keys), store.get("test:store:absent"))
    assert got[:-1] == [f"v{i}".encode() for i in range(200)] and got[-1] is None
    assert store.auto.commands == 401 and store.auto.pipelines <= 4
    ttl = await store.redis.ttl(keys[0])
    assert 0 < ttl <= 30
    # an error reply fails its own caller only
    await store.redis.rpush("test:store:list", "x")
    results = await asyncio.gather(store.get("test:store:list"), store.get(keys[1]), return_exceptions=True)
    assert "WRONGTYPE" in str(results[0]) and results[1] == b"v1"
    assert await store.get(keys[2]) == b"v2"  # the connection is still in step
    await store.redis.delete("test:store:list", *keys)
    await store.close()


async def test_timeout_fails_every_caller_of_the_round_trip_and_the_next_ones_work(
    redis_server: EmbeddedRedis,
) -> None:
    store = RedisCacheStore(make_redis(redis_server.url, 0.2), 0.2)
    admin = make_redis(redis_server.url, 5.0)
    await store.set("test:store:t", b"x", 30)
    sleeper = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "0.5"))
    await asyncio.sleep(
        0.05
    )  # a real wait: the DEBUG SLEEP reaches Redis first (a blocked Redis shows nothing)
    results = await asyncio.gather(
        store.get("test:store:t"), store.get("test:store:t"), return_exceptions=True
    )
    assert all(isinstance(r, Exception) for r in results), results
    await sleeper
    assert await store.get("test:store:t") == b"x"  # no reply from the timed-out batch is read as this one's
    await admin.delete("test:store:t")
    await admin.aclose()
    await store.close()
