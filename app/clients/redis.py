"""Redis (single node or Cluster) through redis-py's asyncio client, with a bounded time per call."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

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


async def warm_up(redis: Any) -> None:
    """A cluster client learns the slot map before the first burst: redis-py 8.1's lazy initialisation
    races when many commands arrive at once on a fresh ``RedisCluster`` (``'NoneType' object has no
    attribute 'writelines'``; 9 of 600 concurrent first SETs failed in tests/integration/
    test_redis_cluster.py's setting, none after ``initialize()``). Redis down at start: left lazy."""
    if isinstance(redis, RedisCluster):
        try:
            await redis.initialize()
        except Exception as exc:  # the cache bypasses until Redis answers
            logger.warning("Redis Cluster not reachable at start-up (%s); cache bypassed until it is", exc)


class AutoPipeline:
    """Commands issued in the same event-loop turn leave together (one write, one read) on one pooled
    connection, instead of one round trip each; each caller still gets its own reply or its own error.

    It drives redis-py's connection directly (``pack_commands`` / ``send_packed_command`` /
    ``read_response``, the hiredis parser) rather than building a ``Pipeline`` per flush: measured, the
    pipeline object's bookkeeping was about half of the cache's CPU on a miss. Replies are raw (``GET`` ->
    bytes or None, ``SET`` -> b"OK")."""

    def __init__(self, redis: Any, timeout_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self._ops: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._next: asyncio.Task[None] | None = None  # the flush that takes the commands issued so far
        self._tasks: set[asyncio.Future[None]] = set()
        self.pipelines = 0
        self.commands = 0

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """``submit("GET", key)``: a future for the raw reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._ops.append((args, fut))
        if self._next is None:  # its first step runs on the next turn, with every command issued by then
            self._next = task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _flush(self) -> None:
        ops, self._ops, self._next = self._ops, [], None
        await self._execute(ops)

    async def _execute(self, ops: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        self.pipelines += 1
        self.commands += len(ops)
        pool = self.redis.connection_pool
        results: list[Any] = []
        conn = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await pool.get_connection()
                packed = conn.pack_commands([args for args, _ in ops])
                await conn.send_packed_command(packed, check_health=False)
                for _ in ops:
                    try:
                        # no timeout scope per reply: the flush is bounded as a whole (above)
                        results.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        results.append(exc)
        except BaseException as exc:
            if conn is not None:
                await conn.disconnect()  # replies may be left unread: never reuse it
            for _, fut in ops:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if conn is not None:
                await pool.release(conn)
        for (_, fut), result in zip(ops, results, strict=True):
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

    async def _run(self, *args: Any) -> Any:
        if self.auto is not None:
            return await self.auto.submit(*args)  # bounded by the pipeline's timeout
        async with asyncio.timeout(self.timeout_s):
            return await self.redis.execute_command(*args)

    async def get(self, key: str) -> bytes | None:
        value = await self._run("GET", key)
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._run("SET", key, value, "EX", ttl_s)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
