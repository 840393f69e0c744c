"""``GracefulServer``: uvicorn's server with the drain sequence of ``app.lifecycle`` (the first exit signal
drains, the listener closes ``TGW_SHUTDOWN_DELAY_S`` later, queued connections are served first);
``run_workers``: uvicorn's multiprocess supervisor with it in every worker; the shutdown budgets the
deployment files are checked against."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess

from app import lifecycle
from app.settings import Settings

logger = logging.getLogger(__name__)

SETTLE_S = 0.5  # after the listener closes, before idle connections are closed


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
            lifecycle.begin_drain_all()
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
