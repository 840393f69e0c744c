"""``LoopMonitor``: how long the event loop is held by one step of work, measured from inside.

A heartbeat runs on the loop every ``beat_s`` (``TGW_LOOP_BEAT_MS``, 50 ms by default). At each beat it
reads the CPU time of the loop's own thread (``time.thread_time``): the CPU the loop spent since the
previous beat (``tgw_event_loop_busy_seconds``). Time the thread spent preempted by the OS or waiting for
the interpreter lock is not CPU time, so the value is what the gateway's own code cost, not how crowded
the machine was. An idle loop shows ~0; one step of 30 ms shows >= 0.03 in the window that holds it; a
loop saturated by many short steps shows ~``beat_s`` (so only a beat shorter than a step tells that step
from a busy loop: the tests that bound one step at 20 ms beat every 5 ms). The wall-clock delay of the
beat is ``tgw_event_loop_lag_seconds`` (what a client felt, machine included).

Cost, measured idle (the loop woken for each beat): 5 ms beats ~3 % of a core per process, 50 ms ~0.5 %.
Started per gateway process by ``build_gateway``.
"""

from __future__ import annotations

import asyncio
import time

from app.observability import metrics

BEAT_S = 0.05


class LoopMonitor:
    def __init__(self, beat_s: float = BEAT_S) -> None:
        self.beat_s = beat_s
        self.worst_busy_s = 0.0  # the largest window since start (or ``reset``)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cpu = time.thread_time()
        self._schedule(self._loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.beat_s
        self._handle = self._loop.call_at(self._due, self._beat)

    def _beat(self) -> None:
        cpu = time.thread_time()
        now = self._loop.time()  # type: ignore[union-attr]
        busy = cpu - self._cpu
        self._cpu = cpu
        metrics.LOOP_BUSY.observe(busy)
        metrics.LOOP_LAG.observe(max(now - self._due, 0.0))
        if busy > self.worst_busy_s:
            self.worst_busy_s = busy
        self._schedule(now)

    def reset(self) -> None:
        self.worst_busy_s = 0.0

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
