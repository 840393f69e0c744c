"""Wait for an observable state instead of sleeping for a guessed time.

``eventually(check)`` calls ``check()`` until it returns a truthy value and returns that value. A check
that raises ``AssertionError`` (or one of ``ignoring``: a probe's connection refused while a server
starts) is tried again. Past ``timeout`` the wait fails with an ``AssertionError`` that says what was
awaited (``message``), how long it waited, and the last failure or the last value. Anything else a check
raises (``pytest.fail`` included) ends the wait at once: a process that exited need not be awaited.

A sleep stays where its length is the point of the test (pacing a client, holding a freeze, waiting out a
TTL or a rate window); everything else waits with these. The timeouts are generous: the full suite shares
2 loaded cores in CI, and a wait that succeeds returns as soon as the state is there.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Message = str | Callable[[], object]

TIMEOUT_S = 10.0
INTERVAL_S = 0.05


def eventually(
    check: Callable[[], T | None],
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    message: Message = "",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``check()``'s first truthy value, tried every ``interval`` seconds for ``timeout`` seconds (at least
    once, and once more at the deadline). ``message``: a string, or a callable read only on failure (a
    log's tail, the state seen last)."""
    wait = _Wait(timeout, interval, message, ignoring, clock)
    while True:
        try:
            value = check()
        except wait.retried as exc:
            sleep(wait.pause(failure=exc))
            continue
        if value:
            return value
        sleep(wait.pause(last=value))


async def eventually_async(
    check: Callable[[], Any],
    timeout: float = TIMEOUT_S,  # noqa: ASYNC109 - the same call as eventually's
    interval: float = INTERVAL_S,
    message: Message = "",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> Any:
    """``eventually`` for a coroutine: ``check`` may be a plain callable or return an awaitable, and the
    wait between tries yields to the event loop (what is awaited runs meanwhile)."""
    wait = _Wait(timeout, interval, message, ignoring, clock)
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except wait.retried as exc:
            await sleep(wait.pause(failure=exc))
            continue
        if value:
            return value
        await sleep(wait.pause(last=value))


class _Wait:
    def __init__(
        self,
        timeout: float,
        interval: float,
        message: Message,
        ignoring: tuple[type[BaseException], ...],
        clock: Callable[[], float],
    ) -> None:
        self.retried: tuple[type[BaseException], ...] = (AssertionError, *ignoring)
        self.timeout, self.interval, self.message, self.clock = timeout, interval, message, clock
        self.start = clock()

    def pause(self, failure: BaseException | None = None, last: object = None) -> float:
        """How long to sleep before the next try; past the deadline, the AssertionError that ends the wait."""
        waited = self.clock() - self.start
        left = self.timeout - waited
        if left <= 0:
            what = self.message() if callable(self.message) else self.message
            head = f"{what}: " if what not in ("", None) else ""
            if failure is not None:
                seen = f"last failure: {type(failure).__name__}: {failure}"
            else:
                seen = f"last value: {last!r}"[:2000]
            raise AssertionError(f"{head}not within {waited:.1f} s; {seen}") from failure
        return min(self.interval, left)
