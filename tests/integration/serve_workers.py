"""``tgw serve`` with several uvicorn workers as a real process, for the tests that compare answers across
workers (tests/integration/test_model_answers.py, test_perf_analyzer.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.processes import tgw_serve


@contextmanager
def serving_workers(
    triton: EmbeddedTriton, redis: EmbeddedRedis, log: Path, workers: int = 2, **env: str
) -> Iterator[str]:
    """The gateway's base URL; the whole process group is stopped when the block ends."""
    with tgw_serve(
        triton, redis.url, log, new_session=True, graceful_stop=True, TGW_WORKERS=str(workers),
        TGW_TRITON_HTTP_URL=triton.http_url, TGW_GRPC_ENABLED="false", TGW_LOG_LEVEL="WARNING",
        TGW_SHUTDOWN_DELAY_S="0", **env,
    ) as tgw:  # fmt: skip
        yield tgw.url


def worker_of(response: httpx.Response) -> str:
    """Which worker process answered: a request id is the process's random prefix and a counter."""
    return response.headers["x-request-id"][:16]
