"""Graceful lifecycle: drain on SIGTERM, and wait for Triton and Redis at start-up.

Shutdown sequence (``GracefulServer``, used by ``tgw up`` and ``tgw serve``, every worker process alike):

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
import math
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Protocol

import uvicorn
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess

from app.settings import Settings, redact_url

logger = logging.getLogger(__name__)

SETTLE_S = 0.5  # after the listener closes, before idle connections are closed

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
    for lifecycle in list(_ACTIVE):
        lifecycle.begin_drain()


# Closing Redis pools, gRPC channels and the trace exporter after the drains, and the process exit.
CLOSE_MARGIN_S = 2.0
ACCEPT_PAUSE_S = 0.5  # GracefulServer.shutdown: queued connections are served before idle ones close


def shutdown_budget_s(
    shutdown_delay_s: float, drain_s: float, grpc_enabled: bool, worker_in_process: bool
) -> float:
    """The longest a gateway process (``tgw serve``/``tgw up``) takes from SIGTERM to exit, step by step as
    docs/operations.md lists them: the readiness delay, the accept pause, in-flight HTTP requests (up to
    ``drain_s``), then in the lifespan in-flight gRPC calls (up to ``drain_s`` more), running in-process jobs
    (up to ``min(drain_s, 5)``) and the closes. A pod's ``terminationGracePeriodSeconds`` must exceed its
    ``preStop`` sleep plus this (tests/unit/test_deploy_files.py computes it from the manifests)."""
    budget = shutdown_delay_s + ACCEPT_PAUSE_S + drain_s
    if grpc_enabled:
        budget += drain_s
    if worker_in_process:
        budget += min(drain_s, 5.0)
    return budget + CLOSE_MARGIN_S


def worker_shutdown_budget_s(drain_s: float) -> float:
    """``tgw worker``: running jobs get ``drain_s`` (an unfinished one stays pending for another worker), then
    the closes."""
    return drain_s + CLOSE_MARGIN_S


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` whose first exit signal starts draining and closes the listener only
    ``shutdown_delay_s`` later. The signal is not re-raised after shutdown, so the exit code is 0."""

    def __init__(self, config: uvicorn.Config, shutdown_delay_s: float | None = None) -> None:
        super().__init__(config)
        if shutdown_delay_s is None:
            shutdown_delay_s = Settings().server.shutdown_delay_s
        self.shutdown_delay_s = shutdown_delay_s
        self._exit_at: float | None = None
        self._signal: int | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._exit_at is None:
            self._signal = sig
            self._exit_at = time.monotonic() + self.shutdown_delay_s
            begin_drain_all()
        elif not self.should_exit:
            self.should_exit = True  # a second signal: skip the delay
        else:
            self.force_exit = True  # a third: stop waiting for in-flight requests

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        logger.info("serving on %s.%s", type(loop).__module__, type(loop).__name__)
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and not self._announced:
            self._announced = True
            name = signal.Signals(self._signal).name if self._signal else "signal"
            logger.info(
                "%s received: draining (readiness 503); new connections refused in %.1f s "
                "(TGW_SHUTDOWN_DELAY_S), then in-flight requests get up to %s s (TGW_DRAIN_S)",
                name, self.shutdown_delay_s, self.config.timeout_graceful_shutdown,
            )  # fmt: skip
        if self._exit_at is not None and not self.should_exit and time.monotonic() >= self._exit_at:
            logger.info("shutdown delay over: closing the listener and draining in-flight requests")
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Closing a listening socket resets every connection the kernel has already completed but the
        # loop has not accept()ed yet (the queue fills whenever the process is not scheduled for a moment):
        # those clients have connected and sent a request, and get ECONNRESET. So take them off the queue
        # first, close the listener right after (no await in between), then serve them.
        pending = self._accept_queued()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        loop = asyncio.get_running_loop()
        for conn in pending:
            try:
                await loop.connect_accepted_socket(self._new_protocol, conn, ssl=self.config.ssl)
            except OSError:  # pragma: no cover - the client already went away
                conn.close()
        if pending:
            logger.info("accepted %d queued connection(s) before closing the listener", len(pending))
        # uvicorn then closes the connections idle between requests; ones accepted a moment ago keep
        # their chance to send their request (GuardedHttpToolsProtocol.shutdown). Let those start first.
        await asyncio.sleep(SETTLE_S)
        await super().shutdown(sockets)

    def _accept_queued(self) -> list[socket.socket]:
        """Every connection waiting in the listeners' accept queues, accepted now (non-blocking)."""
        accepted: list[socket.socket] = []
        for server in self.servers:
            for listener in server.sockets or ():
                try:
                    dup = socket.socket(fileno=os.dup(listener.fileno()))
                except OSError:  # pragma: no cover
                    continue
                with dup:
                    dup.setblocking(False)
                    while True:
                        try:
                            conn, _ = dup.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # e.g. EMFILE: leave the rest to the kernel
                            logger.warning("accepting queued connections on shutdown: %s", exc)
                            break
                        accepted.append(conn)
        return accepted

    def _new_protocol(self) -> asyncio.Protocol:
        """The protocol uvicorn's ``startup`` gives each accepted connection."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )


class GracefulProcess(uvicorn_multiprocess.Process):
    """A uvicorn worker process that runs ``GracefulServer`` (settings read from the environment)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GracefulServer(config=self.config)
        return self._server


def run_workers(
    config: uvicorn.Config, on_supervisor: Callable[[uvicorn_multiprocess.Multiprocess], None] | None = None
) -> int:
    """uvicorn's multiprocess supervisor with ``GracefulServer`` in every worker. On SIGTERM the
    supervisor forwards SIGTERM to each worker, which drains as above; returns 0 if all exit 0.
    ``on_supervisor`` gets the supervisor before it starts (``should_exit.set()`` stops it)."""
    sock = config.bind_socket()
    original = uvicorn_multiprocess.Process
    uvicorn_multiprocess.Process = GracefulProcess  # type: ignore[misc]
    try:
        supervisor = uvicorn_multiprocess.Multiprocess(config, sockets=[sock])
        if on_supervisor is not None:
            on_supervisor(supervisor)
        supervisor.run()
    finally:
        uvicorn_multiprocess.Process = original  # type: ignore[misc]
        sock.close()
    codes = [p.exitcode for p in supervisor.processes]
    if any(code != 0 for code in codes):
        logger.error("worker exit codes: %s", codes)
        return 1
    return 0


# --- start-up: wait for dependencies ----------------------------------------------------------------


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
