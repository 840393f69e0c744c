"""The test harness's in-thread server is gone when its block ends, even when its shutdown hangs (a test
gateway that outlived its block kept its job worker and webhook dispatcher on the session's Redis)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette

from app.launcher import free_port
from tests.gateway_server import serving_in_thread


def test_a_server_whose_shutdown_hangs_is_stopped_and_its_tasks_cancelled() -> None:
    worker_cancelled = threading.Event()

    async def worker() -> None:  # stands for the job worker / webhook dispatcher
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            worker_cancelled.set()
            raise

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(worker())
        yield
        await asyncio.sleep(3600)  # a shutdown step that never ends
        task.cancel()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(lifespan=lifespan), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))  # fmt: skip
    with serving_in_thread(server, stop_s=0.5):
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 404
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert worker_cancelled.is_set()
    assert not any(t.name == f"gateway-{port}" for t in threading.enumerate())
