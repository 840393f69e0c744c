"""The worker's own rules, with a fake store (pure logic; the real thing is in tests/integration):
a store step outlives a short Redis outage, and a stuck attempt is abandoned so its entry can be
reclaimed."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.services.jobs.worker import JobWorker


class StuckStore:
    """``start`` succeeds, reading the inputs never returns; counts heartbeats and acks."""

    def __init__(self) -> None:
        self.heartbeats = 0
        self.acked: list[str] = []

    async def start(self, job_id: str, max_attempts: int) -> tuple[str, int]:
        return "running", 1

    async def get(self, job_id: str) -> Any:
        return SimpleNamespace(id=job_id, request_id="", model="m", version=None)

    async def inputs(self, job_id: str) -> bytes:
        await asyncio.sleep(3600)
        return b""

    async def keep_claimed(self, stream: str, consumer: str, entry_id: str) -> None:
        self.heartbeats += 1

    async def ack(self, stream: str, entry_id: str) -> None:
        self.acked.append(entry_id)


def worker(store: Any, **kw: Any) -> JobWorker:
    return JobWorker(store, inference=None, concurrency=1, claim_idle_s=0.3, max_attempts=3, **kw)  # type: ignore[arg-type]


async def test_a_store_step_is_retried_through_a_short_outage() -> None:
    calls = 0

    async def step() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RedisConnectionError("Connection refused")
        return "done"

    assert await worker(StuckStore(), store_retry_s=5)._stored(step) == "done"
    assert calls == 3


def failing_step(exc: Exception) -> tuple[Any, list[int]]:
    """A store step that always raises ``exc``, and the list its calls are counted in."""
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)
        raise exc

    return step, calls


async def test_a_store_step_gives_up_after_the_retry_window() -> None:
    down, calls = failing_step(RedisConnectionError("Connection refused"))
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await worker(StuckStore(), store_retry_s=0.5)._stored(down)
    assert time.monotonic() - started < 2.0 and len(calls) >= 3


async def test_a_command_error_is_not_retried() -> None:
    wrong, calls = failing_step(ResponseError("ERR wrong number of arguments"))
    with pytest.raises(ResponseError):
        await worker(StuckStore(), store_retry_s=5)._stored(wrong)
    assert len(calls) == 1


async def test_a_stuck_attempt_is_abandoned_and_its_heartbeat_stops() -> None:
    store = StuckStore()
    w = worker(store, attempt_timeout_s=0.5)
    started = time.monotonic()
    await asyncio.wait_for(w._process("stream", "1-0", "job"), 5)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert store.acked == []  # left pending: any worker reclaims it once idle
    beats = store.heartbeats
    assert beats >= 1  # it was kept fresh while the attempt ran
    await asyncio.sleep(0.4)  # a real wait: heartbeats' time, and none meanwhile
    assert store.heartbeats == beats  # and no longer once abandoned
