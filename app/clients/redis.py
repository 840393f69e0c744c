"""Redis (single node or Cluster) through redis-py's asyncio client, with a bounded time per call."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis, RedisCluster

logger = logging.getLogger(__name__)


def make_redis(url: str, timeout_s: float, cluster: bool = False) -> Any:
    """One connection pool for the process; created in the lifespan, closed at shutdown."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
    }
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return Redis.from_url(url, max_connections=512, **kwargs)


class RedisCacheStore:
    """Implements ``CacheStore``. Every call is bounded by ``timeout_s``; errors propagate to the caller,
    which decides (the response cache turns them into a BYPASS)."""

    def __init__(self, redis: Any, timeout_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s

    async def get(self, key: str) -> bytes | None:
        async with asyncio.timeout(self.timeout_s):
            value = await self.redis.get(key)
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.redis.set(key, value, ex=ttl_s)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
