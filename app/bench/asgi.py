"""``python -m app.bench.asgi``: the gateway's own cost per request, with no client socket in the way.

Starts the embedded Triton (``tests/models``) and Redis, builds the served application
(``app.main.create_app``: the request pipeline in front of FastAPI), runs its lifespan, and calls it as
an ASGI app for ``/v1`` ``identity_fp32`` requests: CPU per cache hit and per miss (``process_time``,
this process only), and the ``Server-Timing`` stages (p50) of sequential misses. Used for
docs/performance.md ("The request pipeline round"). ``--usage-rounds N``: the same hits and misses with
usage metering on and off (``TGW_USAGE_ENABLED``), alternating N times each, for the metering's cost
(docs/performance.md, "Usage metering").
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


async def _run(
    triton: EmbeddedTriton, redis: EmbeddedRedis, n: int, usage: bool = True, stages_too: bool = True
) -> tuple[float, float]:
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(
        triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis.url, usage_enabled=usage
    )
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
        return orjson.dumps({"inputs": {"INPUT0": [[float(i), 9.0, time.time(), float(usage)]]}})

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
    if not stages_too:
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        return hit_us, miss_us
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
    return hit_us, miss_us


async def _usage_rounds(triton: EmbeddedTriton, redis: EmbeddedRedis, n: int, rounds: int) -> None:
    """Metering on and off, alternating (the box's other load drifts, so each round measures both back to
    back, in alternating order, after one warm-up run); the CPU per hit and per miss of each run, then the
    median of the rounds' on/off ratios, and the meter's own ``record`` per request."""
    await _run(triton, redis, n // 4, True, stages_too=False)  # warm-up: imports, first connections
    ratios: dict[int, list[float]] = {0: [], 1: []}
    for i in range(rounds):
        got: dict[bool, tuple[float, float]] = {}
        for usage in (True, False) if i % 2 == 0 else (False, True):
            got[usage] = await _run(triton, redis, n, usage, stages_too=False)
        for k in (0, 1):
            ratios[k].append(got[True][k] / got[False][k])
        sys.stdout.write(f"round {i + 1}: hit {got[True][0]:.1f} on / {got[False][0]:.1f} off µs, "
                         f"miss {got[True][1]:.1f} on / {got[False][1]:.1f} off µs CPU\n")  # fmt: skip
    for k, what in ((0, "hit"), (1, "miss")):
        median = statistics.median(ratios[k])
        sys.stdout.write(f"{what}: metering on/off CPU per request, median of {rounds} rounds: "
                         f"{100 * (median - 1):+.1f} % (rounds: "
                         f"{', '.join(f'{100 * (r - 1):+.1f} %' for r in ratios[k])})\n")  # fmt: skip
    from app.observability.context import RequestInfo
    from app.services.usage import UsageMeter

    meter = UsageMeter(None)
    info = RequestInfo(model="identity_fp32", version="1", cache="HIT", door="v1", tenant="acme",
                       key_id="0123456789ab", rows=1, bytes_in=12, bytes_out=12, saved_s=0.001)  # fmt: skip
    t0 = time.process_time()
    for _ in range(100_000):
        meter.record(info, 200)
    record_us = (time.process_time() - t0) / 100_000 * 1e6
    sys.stdout.write(f"UsageMeter.record: {record_us:.2f} µs CPU per request\n")


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="cache hits measured (misses: half)")
    parser.add_argument("--usage-rounds", type=int, default=0, help="compare metering on/off, N rounds each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        triton = EmbeddedTriton([ROOT / "tests" / "models"], free_port(), free_port(), free_port(),
                                Path(tmp) / "triton")  # fmt: skip
        triton.start(timeout=180)
        redis = EmbeddedRedis(free_port(), Path(tmp) / "redis")
        redis.start()
        try:
            if args.usage_rounds:
                uvloop.run(_usage_rounds(triton, redis, args.requests, args.usage_rounds))
            else:
                uvloop.run(_run(triton, redis, args.requests))
        finally:
            redis.stop()
            triton.stop()


if __name__ == "__main__":
    main()
