"""Run the real gateway (uvicorn + create_app) in a background thread on a free port, for tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from app.launcher import free_port
from app.main import create_app
from app.server import server_config
from app.settings import Settings


@contextmanager
def running_gateway(**overrides: object) -> Iterator[str]:
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, **overrides)  # type: ignore[arg-type]
    config = server_config(
        create_app(settings), settings, log_level="warning", lifespan="on", loop="asyncio",
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
