"""Start-up: wait for Triton and Redis (``tgw serve``, ``tgw up``, ``tgw worker``) before serving."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from app.settings import Settings, redact_url

logger = logging.getLogger(__name__)


class DependencyUnavailable(RuntimeError):
    pass


async def _triton_live(address: str, timeout_s: float) -> bool:
    from app.clients.triton import TritonGrpcClient

    client = TritonGrpcClient(address, retries=0, admin_timeout_s=timeout_s)
    try:
        return await client.server_live()
    finally:
        await client.close()


async def _redis_ping(url: str, timeout_s: float) -> bool:
    from app.clients.redis import RedisCacheStore, make_redis

    store = RedisCacheStore(make_redis(url, timeout_s), timeout_s)
    try:
        return await store.ping()
    finally:
        await store.close()


async def wait_for_dependencies(settings: Settings) -> None:
    """Poll Triton (gRPC live) and Redis (PING, when the cache is on) until they answer, for up to
    ``TGW_STARTUP_WAIT_S``; raises ``DependencyUnavailable`` with what was unreachable."""
    if settings.server.startup_wait_s <= 0:
        return
    interval = settings.server.startup_retry_interval_s
    attempts = max(1, math.ceil(settings.server.startup_wait_s / interval))
    probe_timeout = min(2.0, interval)
    deps: list[tuple[str, str, str, Callable[[], Awaitable[bool]]]] = [(
        "Triton", settings.triton_grpc_address, "TGW_TRITON_URL",
        lambda: _triton_live(settings.triton_grpc_address, probe_timeout),
    )]  # fmt: skip
    if settings.cache.cache_enabled:
        deps.append((
            "Redis", redact_url(settings.cache_redis_address), "TGW_REDIS_URL",
            lambda: _redis_ping(settings.cache_redis_address, probe_timeout),
        ))  # fmt: skip
    if settings.jobs.jobs_redis_url and settings.jobs.jobs_redis_url != settings.cache.cache_redis_url:
        deps.append((
            "the jobs Redis", redact_url(settings.jobs.jobs_redis_url), "TGW_JOBS_REDIS_URL",
            lambda: _redis_ping(settings.jobs_redis_address, probe_timeout),
        ))  # fmt: skip
    for name, where, env, check in deps:
        for attempt in range(1, attempts + 1):
            if await check():
                if attempt > 1:
                    logger.info("%s at %s is up", name, where)
                break
            logger.warning("waiting for %s at %s (attempt %d/%d)", name, where, attempt, attempts)
            if attempt < attempts:
                await asyncio.sleep(interval)
        else:
            raise DependencyUnavailable(
                f"{name} at {where} did not answer after {attempts} attempts over "
                f"{settings.server.startup_wait_s:g} s (TGW_STARTUP_WAIT_S); check {env}"
            )
