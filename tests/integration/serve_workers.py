"""``tgw serve`` with several uvicorn workers as a real process, for the tests that compare answers across
workers (tests/integration/test_model_answers.py, test_perf_analyzer.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port


@contextmanager
def serving_workers(
    triton: EmbeddedTriton, redis: EmbeddedRedis, log: Path, workers: int = 2, **env: str
) -> Iterator[str]:
    """The gateway's base URL; the whole process group is stopped when the block ends."""
    port = free_port()
    environ = {
        **os.environ, "TGW_HOST": "127.0.0.1", "TGW_PORT": str(port), "TGW_WORKERS": str(workers),
        "TGW_TRITON_URL": triton.grpc_url, "TGW_TRITON_HTTP_URL": triton.http_url, "TGW_REDIS_URL": redis.url,
        "TGW_GRPC_ENABLED": "false", "TGW_LOG_LEVEL": "WARNING", "TGW_SHUTDOWN_DELAY_S": "0", **env,
    }  # fmt: skip
    tgw = Path(sys.executable).with_name("tgw")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(tgw), "serve"], env=environ, stdout=out, stderr=out, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"tgw serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"tgw serve did not get ready: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def worker_of(response: httpx.Response) -> str:
    """Which worker process answered: a request id is the process's random prefix and a counter."""
    return response.headers["x-request-id"][:16]
