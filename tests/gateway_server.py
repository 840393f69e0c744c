"""Run the real gateway (uvicorn + create_app) in a background thread on a free port, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from app.launcher import free_port
from app.main import create_app
from app.server import server_config
from app.settings import Settings
from tests.eventually import eventually

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayAddresses:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT (the gRPC front door; "" when TGW_GRPC_ENABLED is off)


@contextmanager
def running_gateway(**overrides: object) -> Iterator[str]:
    with running_gateway_addresses(**overrides) as addresses:
        yield addresses.http


@contextmanager
def running_gateway_addresses(**overrides: object) -> Iterator[GatewayAddresses]:
    """The gateway with its gRPC front door on a free port too (``grpc_port=0``, unless overridden)."""
    port = free_port()
    overrides.setdefault("grpc_port", 0)
    settings = Settings(host="127.0.0.1", port=port, **overrides)  # type: ignore[arg-type]
    app = create_app(settings)
    config = server_config(
        app, settings.server, log_level="warning", lifespan="on", loop="asyncio",
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    with serving_in_thread(uvicorn.Server(config)):
        web: Any = app.app  # the FastAPI app behind the pipeline holds the lifespan's state
        grpc_port = getattr(web.state, "grpc_port", 0)
        yield GatewayAddresses(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}" if grpc_port else "")


@contextmanager
def serving_in_thread(server: uvicorn.Server, stop_s: float = 15.0) -> Iterator[None]:
    """Run ``server`` in a daemon thread until the block ends; returns once it has started. When the block
    ends the server is gone: a graceful stop gets ``stop_s``, then every task left on its loop is
    cancelled. A test gateway that outlived its block would keep serving, and its job worker and webhook
    dispatcher would keep taking work from the session's shared Redis, into later tests."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve()

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled below, if it would not stop
            asyncio.run(serve())

    thread = threading.Thread(target=run, name=f"gateway-{server.config.port}", daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("the test gateway did not start: its thread ended")
        return bool(server.started)

    eventually(started, 30, 0.02, "the test gateway did not start")
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=stop_s)
        if thread.is_alive():
            logger.warning("test gateway on port %d still stopping after %g s: cancelling its tasks",
                           server.config.port, stop_s)  # fmt: skip
            loop = loops[0]
            loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
            thread.join(timeout=10)
            if thread.is_alive():
                raise RuntimeError(f"the test gateway on port {server.config.port} did not stop")
