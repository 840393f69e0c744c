"""Helpers shared by the job tests."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis
import uvicorn

from app.launcher import free_port
from app.main import create_app
from app.settings import Settings
from tests.gateway_server import serving_in_thread


def unique_row(n: int = 4) -> list[float]:
    return [round(random.uniform(-100, 100), 3) for _ in range(n)]


def wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float = 20.0,
    statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.1)


@contextmanager
def gateway_with_tenant_header(**overrides: object) -> Iterator[str]:
    """A real gateway whose connections carry the tenant named by the ``X-Test-Tenant`` header, set where
    the authentication stage (keys issue) sets it: ``conn.state.tenant``."""
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, **overrides)  # type: ignore[arg-type]
    app = create_app(settings)

    async def tenant_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            tenant = dict(scope.get("headers") or []).get(b"x-test-tenant", b"").decode()
            scope = {**scope, "state": {**scope.get("state", {}), "tenant": tenant}}
        await app(scope, receive, send)

    config = uvicorn.Config(
        tenant_app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", loop="asyncio",
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    with serving_in_thread(uvicorn.Server(config)):
        yield f"http://127.0.0.1:{port}"


def sigkill_worker_holding_jobs(
    r: Any, workers: list[subprocess.Popen[bytes]], timeout: float = 20.0
) -> None:
    """SIGKILL one of ``workers`` (``tgw worker`` processes) while it holds pending jobs in the consumer
    group, as soon as one does; ``r`` is a Redis client of the jobs Redis."""
    from app.services.jobs.store import GROUP, STREAM

    deadline = time.monotonic() + timeout
    by_pid = {w.pid: w for w in workers}
    while True:
        assert time.monotonic() < deadline, "no worker picked up a job"
        try:
            consumers = r.xinfo_consumers(STREAM, GROUP)
        except redis.ResponseError:  # the stream or group is not there yet
            consumers = []
        for consumer in consumers:
            pid = int(consumer["name"].decode().rsplit("-", 2)[1])
            if consumer["pending"] > 0 and pid in by_pid:
                by_pid[pid].send_signal(signal.SIGKILL)
                by_pid[pid].wait(5)
                return
        time.sleep(0.05)
