"""Single-flight: concurrent identical calls share one execution (in this process)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class _Gauge(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...


class _Flight(Generic[T]):
    __slots__ = ("future", "waiters")

    def __init__(self, future: asyncio.Future[T]) -> None:
        self.future = future
        self.waiters = 0


class SingleFlight(Generic[T]):
    def __init__(self, waiters: _Gauge | None = None) -> None:
        self._inflight: dict[str, _Flight[T]] = {}
        self._waiters = waiters  # e.g. a Prometheus gauge of callers waiting on another's call
        self._tasks: set[asyncio.Future[None]] = set()  # calls run again for waiters (see _hand_over)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Returns (result, shared). The first caller runs ``fn`` in its own task (no hop through the
        event loop); later identical callers wait for its result. If that first caller is cancelled
        (its client went away) while others wait, ``fn`` runs again in a task of its own for them, so a
        caller that goes away never takes the answer from the others."""
        flight = self._inflight.get(key)
        if flight is not None:
            flight.waiters += 1
            if self._waiters is not None:
                self._waiters.inc()
            try:
                return await asyncio.shield(flight.future), True
            finally:
                flight.waiters -= 1
                if self._waiters is not None:
                    self._waiters.dec()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        flight = self._inflight[key] = _Flight(future)
        try:
            result = await fn()
        except asyncio.CancelledError:
            if flight.waiters:
                self._hand_over(key, flight, fn)
            else:
                self._end(key, flight)
                future.cancel()
            raise
        except BaseException as exc:
            self._end(key, flight)
            future.set_exception(exc)
            future.exception()  # mark retrieved: a failure with no waiter is not "never retrieved"
            raise
        self._end(key, flight)
        future.set_result(result)
        return result, False

    def _end(self, key: str, flight: _Flight[T]) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    def _hand_over(self, key: str, flight: _Flight[T], fn: Callable[[], Awaitable[T]]) -> None:
        """The first caller was cancelled with others waiting: run the call again for them."""

        async def rerun() -> None:
            try:
                result = await fn()
            except BaseException as exc:
                self._end(key, flight)
                if not flight.future.done():
                    flight.future.set_exception(exc)
                    flight.future.exception()
                if not isinstance(exc, Exception):
                    raise
                return
            self._end(key, flight)
            if not flight.future.done():
                flight.future.set_result(result)

        task = asyncio.ensure_future(rerun())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
