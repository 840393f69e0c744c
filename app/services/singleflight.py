"""Single-flight: concurrent identical calls share one execution (in this process)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class _Gauge(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...


class SingleFlight(Generic[T]):
    def __init__(self, waiters: _Gauge | None = None) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}
        self._waiters = waiters  # e.g. a Prometheus gauge of callers waiting on another's call

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Returns (result, shared). The call runs as its own task: a waiter that goes away (client
        disconnect) does not cancel it for the others."""
        existing = self._inflight.get(key)
        if existing is not None:
            if self._waiters is None:
                return await asyncio.shield(existing), True
            self._waiters.inc()
            try:
                return await asyncio.shield(existing), True
            finally:
                self._waiters.dec()
        task: asyncio.Future[T] = asyncio.ensure_future(fn())
        self._inflight[key] = task

        def _done(fut: asyncio.Future[T]) -> None:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
            if not fut.cancelled():
                fut.exception()  # mark retrieved: a failure with no waiter left is not "never retrieved"

        task.add_done_callback(_done)
        return await asyncio.shield(task), False
