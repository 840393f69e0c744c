"""Helpers shared by the integration tests: unique inputs (never a cache hit), jobs, job workers."""

from __future__ import annotations

import random
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis
import uvicorn

from app.launcher import free_port
from app.main import create_app
from app.settings import Settings
from tests.eventually import eventually
from tests.gateway_server import serving_in_thread


def unique_row(n: int = 4) -> list[float]:
    return [round(random.uniform(-100, 100), 3) for _ in range(n)]


def wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float = 20.0,
    statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    """The job once its status is one of ``statuses``; any answer but 200 fails at once."""
    last: list[dict[str, Any]] = []

    def answer() -> httpx.Response | None:
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code != 200:
            return r
        last[:] = [r.json()]
        return r if last[0]["status"] in statuses else None

    r = eventually(answer, timeout, 0.1, message=lambda: f"job {job_id} still {last[0]['status']}: {last[0]}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


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


def consumers(r: Any) -> dict[int, int]:
    """pid -> pending entries of each consumer in the job stream's group (``r``: a client of the jobs Redis)."""
    from app.services.jobs.store import GROUP, STREAM

    try:
        found = r.xinfo_consumers(STREAM, GROUP)
    except redis.ResponseError:  # the stream or group is not there yet
        return {}
    return {int(c["name"].decode().rsplit("-", 2)[1]): int(c["pending"]) for c in found}  # host-pid-suffix


def reading_workers(r: Any, workers: list[subprocess.Popen[bytes]]) -> set[int]:
    """pids of ``workers`` waiting for jobs (a connection of theirs in XREADGROUP on ``r``): Redis 6 lists a
    consumer in the group only once it has read an entry."""
    import psutil

    readers = {c["addr"] for c in r.client_list() if c.get("cmd") == "xreadgroup"}
    found = set()
    for w in workers:
        try:
            conns = psutil.Process(w.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.laddr and f"{c.laddr.ip}:{c.laddr.port}" in readers for c in conns):
            found.add(w.pid)
    return found


def sigkill_worker_holding_jobs(
    r: Any, workers: list[subprocess.Popen[bytes]], timeout: float = 20.0
) -> None:
    """SIGKILL one of ``workers`` (``tgw worker`` processes) while it runs a job (its entry pending in the
    consumer group, the job started: status ``running``), as soon as one does; ``r`` is a Redis client of
    the jobs Redis. (An entry read but not yet started would be reclaimed as the job's first attempt.)"""
    from app.services.jobs.store import GROUP, STREAM, job_key

    by_pid = {w.pid: w for w in workers}

    def running(consumer: str) -> bool:
        entries = r.xpending_range(STREAM, GROUP, min="-", max="+", count=100, consumername=consumer)
        for entry in entries:
            found = r.xrange(STREAM, min=entry["message_id"], max=entry["message_id"])
            job_id = found[0][1].get(b"job_id") if found else None
            if job_id and r.hget(job_key(job_id.decode()), "status") == b"running":
                return True
        return False

    def holding() -> int | None:
        try:
            found = r.xinfo_consumers(STREAM, GROUP)
        except redis.ResponseError:  # the stream or group is not there yet
            return None
        for c in found:
            name = c["name"].decode()
            pid = int(name.rsplit("-", 2)[1])
            if pid in by_pid and int(c["pending"]) > 0 and running(name):
                return pid
        return None

    pid = eventually(holding, timeout, 0.05, "no worker picked up a job")
    by_pid[pid].send_signal(signal.SIGKILL)
    by_pid[pid].wait(5)
