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


class AutoPipeline:
    """Commands issued in the same event-loop turn leave together as one pipeline (one write, one read),
    instead of one round trip each; each caller still gets its own result or its own error."""

    def __init__(self, redis: Any, timeout_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self.pipelines = 0
        self.commands = 0

    def submit(self, command: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._ops:
            loop.call_soon(self._flush)
        self._ops.append((command, args, kwargs, fut))
        return fut

    def _flush(self) -> None:
        ops, self._ops = self._ops, []
        task = asyncio.ensure_future(self._execute(ops))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(
        self, ops: list[tuple[str, tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]]
    ) -> None:
        self.pipelines += 1
        self.commands += len(ops)
        try:
            async with asyncio.timeout(self.timeout_s):
                if len(ops) == 1:
                    command, args, kwargs, _ = ops[0]
                    results = [await getattr(self.redis, command)(*args, **kwargs)]
                else:
                    pipe = self.redis.pipeline(transaction=False)
                    for command, args, kwargs, _ in ops:
                        getattr(pipe, command)(*args, **kwargs)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for *_, fut in ops:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, fut), result in zip(ops, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)


class RedisCacheStore:
    """Implements ``CacheStore``. Every call is bounded by ``timeout_s``; errors propagate to the caller,
    which decides (the response cache turns them into a BYPASS). Against a single node, commands from
    concurrent requests are auto-pipelined (``AutoPipeline``); against a Cluster each goes on its own."""

    def __init__(self, redis: Any, timeout_s: float, pipelined: bool | None = None) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        if pipelined is None:
            pipelined = not isinstance(redis, RedisCluster)
        self.auto = AutoPipeline(redis, timeout_s) if pipelined else None

    async def _run(self, command: str, *args: Any, **kwargs: Any) -> Any:
        if self.auto is not None:
            return await self.auto.submit(command, *args, **kwargs)  # bounded by the pipeline's timeout
        async with asyncio.timeout(self.timeout_s):
            return await getattr(self.redis, command)(*args, **kwargs)

    async def get(self, key: str) -> bytes | None:
        value = await self._run("get", key)
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._run("set", key, value, ex=ttl_s)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
