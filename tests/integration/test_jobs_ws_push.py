"""WebSocket job subscriptions are pushed on change by ONE Redis subscription per process, not polled:
200 idle subscribed sockets cost a few Redis commands per second, and a change still arrives at once."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect

from app.launcher import EmbeddedRedis, free_port
from app.services.jobs.store import EVENTS
from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import unique_row

pytestmark = pytest.mark.integration
SOCKETS = 200
WINDOW_S = float(os.environ.get("TGW_TEST_WS_WINDOW_S", "5"))


def commands(r: redis.Redis) -> int:
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


async def idle_sockets(url: str, job_ids: list[str], r: redis.Redis) -> tuple[float, int, float]:
    ws_url = url.replace("http", "ws")
    socks: list[Any] = []
    try:
        for i, job_id in enumerate(job_ids):
            if i % 2:
                ws = await connect(f"{ws_url}/v1/jobs/{job_id}/ws")
            else:
                ws = await connect(f"{ws_url}/v1/ws")
                await ws.send(json.dumps({"op": "subscribe", "job_id": job_id}))
            socks.append(ws)
        for ws in socks:  # every subscription has read its job once
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "status":
                pass
        subscriptions = int(r.pubsub_numsub(EVENTS)[0][1])
        before = commands(r)
        await asyncio.sleep(WINDOW_S)
        rate = (commands(r) - before - 1) / WINDOW_S  # less the INFO itself
        # a change is pushed at once
        async with httpx.AsyncClient(base_url=url) as c:
            started = time.monotonic()
            assert (await c.delete(f"/v1/jobs/{job_ids[1]}")).status_code == 200
        while True:
            frame = json.loads(await asyncio.wait_for(socks[1].recv(), 10))
            if frame["type"] == "result":
                break
        return rate, subscriptions, time.monotonic() - started
    finally:
        for ws in socks:
            await ws.close()


def test_idle_subscribed_sockets_cost_little_redis(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    own = EmbeddedRedis(free_port(), tmp_path / "redis")  # nothing else talks to it
    own.start()
    try:
        r = redis.Redis.from_url(own.url)
        with start_gateway(redis_url=own.url, ws_heartbeat_s=60) as url, httpx.Client(base_url=url) as c:
            ids = [c.post("/v1/models/identity_fp32/jobs", json={"inputs": {"INPUT0": [unique_row()]}}).json()["id"]
                   for _ in range(SOCKETS)]  # fmt: skip
            rate, subscriptions, pushed_s = asyncio.run(idle_sockets(url, ids, r))
            for job_id in ids:
                c.delete(f"/v1/jobs/{job_id}")
        print(f"ws push: {SOCKETS} idle subscribed sockets -> {rate:.1f} Redis commands/s; "
              f"{subscriptions} pub/sub subscription(s); change pushed in {pushed_s * 1000:.0f} ms")  # fmt: skip
        assert subscriptions == 1
        assert rate < 30, f"{rate:.0f} Redis commands/s for {SOCKETS} idle sockets"  # main: ~80 (2 s poll)
        assert pushed_s < 1.0
    finally:
        own.stop()
