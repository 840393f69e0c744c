"""The HTTP server of a gateway process (uvicorn), in three parts:

- ``app.server.protocol``: ``GuardedHttpToolsProtocol`` (head/body timeouts, head size, connection cap,
  slow readers, early answers), ``ServerLimits``, ``server_config`` (the ``uvicorn.Config`` with all of
  it), the event loop (uvloop when installed: ``run``, ``new_event_loop``);
- ``app.server.graceful``: ``GracefulServer`` (drain on the first exit signal, listener closed later,
  queued connections served), ``run_workers`` (several worker processes), the shutdown budgets;
- ``app.server.startup``: ``wait_for_dependencies`` (Triton and Redis answer before serving).

The drain state itself (``app.lifecycle.Lifecycle``) is framework-free, below this package.
"""

from app.server.graceful import (
    ACCEPT_PAUSE_S,
    CLOSE_MARGIN_S,
    SETTLE_S,
    GracefulProcess,
    GracefulServer,
    run_workers,
    shutdown_budget_s,
    worker_shutdown_budget_s,
)
from app.server.protocol import (
    FD_RESERVE_MIN,
    GuardedHttpToolsProtocol,
    ServerLimits,
    connection_cap,
    event_loop_name,
    limits_from,
    new_event_loop,
    nofile_limit,
    raise_nofile_limit,
    run,
    server_config,
)
from app.server.startup import DependencyUnavailable, wait_for_dependencies

__all__ = [
    "ACCEPT_PAUSE_S", "CLOSE_MARGIN_S", "FD_RESERVE_MIN", "SETTLE_S", "DependencyUnavailable",
    "GracefulProcess", "GracefulServer", "GuardedHttpToolsProtocol", "ServerLimits", "connection_cap",
    "event_loop_name", "limits_from", "new_event_loop", "nofile_limit", "raise_nofile_limit", "run",
    "run_workers", "server_config", "shutdown_budget_s", "wait_for_dependencies", "worker_shutdown_budget_s",
]  # fmt: skip
