"""``python -m app.bench.asgi``: the gateway's own cost per request, with no client socket in the way.

Starts the embedded Triton (``tests/models``) and Redis, builds the served application
(``app.main.create_app``: the request pipeline in front of FastAPI), runs its lifespan, and calls it as
an ASGI app for ``/v1`` ``identity_fp32`` requests: CPU per cache hit and per miss (``process_time``,
this process only), and the ``Server-Timing`` stages (p50) of sequential misses. Used for
docs/performance.md ("The request pipeline round").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port

ROOT = Path(__file__).resolve().parents[2]
PATH = "/v1/models/identity_fp32/infer"


async def _run(triton: EmbeddedTriton, redis: EmbeddedRedis, n: int) -> None:
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis.url)
    app = create_app(settings)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       inbox.get, lifespan_send))  # type: ignore[arg-type]  # fmt: skip
    await started.wait()

    async def call(body: bytes) -> list[dict[str, Any]]:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
        }  # fmt: skip
        sent: list[dict[str, Any]] = []
        done = False

        async def receive() -> dict[str, Any]:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)  # type: ignore[arg-type]
        return sent

    def unique(i: int) -> bytes:
        return orjson.dumps({"inputs": {"INPUT0": [[float(i), 9.0, time.time()]]}})

    hit = orjson.dumps({"inputs": {"INPUT0": [[1.0, 2.0, 3.0]]}})
    for _ in range(200):
        await call(hit)
    t0 = time.process_time()
    for _ in range(n):
        await call(hit)
    hit_us = (time.process_time() - t0) / n * 1e6
    t0 = time.process_time()
    for i in range(n // 2):
        await call(unique(i))
    miss_us = (time.process_time() - t0) / (n // 2) * 1e6
    stages: dict[str, list[float]] = {}
    walls = []
    for i in range(n // 5):
        w = time.perf_counter()
        sent = await call(unique(10**6 + i))
        walls.append(time.perf_counter() - w)
        for part in dict(sent[0]["headers"]).get(b"server-timing", b"").decode().split(","):
            if ";dur=" in part:
                stage, ms = part.strip().split(";dur=")
                stages.setdefault(stage, []).append(float(ms))
    timing = ", ".join(f"{k} {statistics.median(v):.3f} ms (n={len(v)})" for k, v in stages.items())
    sys.stdout.write(
        f"CPU per request (gateway process): hit {hit_us:.0f} µs, miss {miss_us:.0f} µs\n"
        f"sequential misses: wall p50 {statistics.median(walls) * 1e3:.3f} ms; Server-Timing p50: {timing}\n"
    )
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="cache hits measured (misses: half)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        triton = EmbeddedTriton([ROOT / "tests" / "models"], free_port(), free_port(), free_port(),
                                Path(tmp) / "triton")  # fmt: skip
        triton.start(timeout=180)
        redis = EmbeddedRedis(free_port(), Path(tmp) / "redis")
        redis.start()
        try:
            uvloop.run(_run(triton, redis, args.requests))
        finally:
            redis.stop()
            triton.stop()


if __name__ == "__main__":
    main()
