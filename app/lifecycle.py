"""Drain state: ``Lifecycle``, one per application, framework-free (``build_gateway`` and the request
pipeline read it; the uvicorn server, ``app.server.graceful``, starts the drain on a signal).

Shutdown sequence (``app.server.GracefulServer``, used by ``tgw up`` and ``tgw serve``, every worker process
alike):

1. SIGTERM/SIGINT: every ``Lifecycle`` of the process starts draining at once: ``draining = True`` (so
   ``/readyz`` answers 503 and responses carry ``Connection: close``) and its ``drain_hooks`` run
   (e.g. job consumers stop taking new jobs).
2. ``TGW_SHUTDOWN_DELAY_S`` later the listening socket closes: new connections are refused. Load
   balancers have seen the 503 by then. A second signal skips the delay; a third stops waiting.
   Connections already queued in the kernel are accepted first (closing the listener would reset them),
   and a connection accepted before the close may still send its request (``GuardedHttpToolsProtocol``).
3. In-flight requests finish, for up to ``TGW_DRAIN_S`` (uvicorn's ``timeout_graceful_shutdown``).
4. Lifespan shutdown: ``build_gateway`` closes what it built (job workers finish or release their jobs,
   bounded), then the clients. The process exits 0.

Hooks for other modules (the async-jobs code): ``lifecycle.drain_hooks.append(fn)`` where ``fn`` is a
plain or ``async`` callable with no arguments.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

logger = logging.getLogger(__name__)

DrainHook = Callable[[], Awaitable[None] | None]


class _Drainable(Protocol):
    draining: bool


class Lifecycle:
    """One application's drain state and hooks (``app.state.lifecycle``)."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_hooks: list[DrainHook] = []
        self._targets: list[_Drainable] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def watch(self, target: _Drainable) -> None:
        """``target.draining`` is set together with ours (e.g. ``HealthService``, for ``/readyz``)."""
        self._targets.append(target)
        target.draining = self.draining

    def activate(self) -> None:
        """Called in the lifespan start-up: signals received by this process now reach this app."""
        self._loop = asyncio.get_running_loop()
        _ACTIVE.append(self)

    def deactivate(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def begin_drain(self) -> None:
        """Safe to call from a signal handler: sets the flag, schedules the hooks on the loop."""
        if self.draining:
            return
        self.draining = True
        for target in self._targets:
            target.draining = True
        if self._loop is not None and self.drain_hooks:
            self._loop.call_soon_threadsafe(self._run_drain_hooks)

    def _run_drain_hooks(self) -> None:
        for hook in self.drain_hooks:
            try:
                result = hook()
            except Exception:
                logger.exception("drain hook %r failed", hook)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


_ACTIVE: list[Lifecycle] = []


def begin_drain_all() -> None:
    """Every active ``Lifecycle`` of this process starts draining (the server's first exit signal)."""
    for lifecycle in list(_ACTIVE):
        lifecycle.begin_drain()
