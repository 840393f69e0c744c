"""Slow webhook receivers cannot stall the others: 16 receivers that send their headers and then one
byte every 2 s, and a normal receiver on another host that is still delivered on schedule. Each slow
delivery is cut at TGW_WEBHOOK_TIMEOUT_S in total (not per byte), and at most TGW_WEBHOOK_MAX_PER_HOST
deliveries hold a slot for one receiver host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.jobs_helpers import unique_row
from tests.integration.webhook_receivers import FastReceiver, SlowReceiver
from tests.integration.webhook_receivers import receivers as closing_receivers

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"
TOTAL_S = 3.0


@pytest.fixture
def receivers() -> Iterator[tuple[list[SlowReceiver], FastReceiver]]:
    drips = [SlowReceiver("127.0.0.1", "drip") for _ in range(16)]
    normal = FastReceiver("127.0.0.2")  # another host (all of 127/8 is loopback)
    with closing_receivers(*drips, normal):
        yield drips, normal


def test_sixteen_drip_feeding_receivers_do_not_delay_another_webhook(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, receivers: tuple[list[SlowReceiver], FastReceiver]
) -> None:
    drips, normal = receivers
    ports = [d.port for d in drips] + [normal.port]
    with (
        running_gateway(
            triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis_server.url,
            worker_in_process=True, webhook_allow_private=True, webhook_allowed_ports=ports,
            webhook_timeout_s=TOTAL_S, webhook_concurrency=8, webhook_max_per_host=4, webhook_schedule_s="60",
        ) as url,
        httpx.Client(base_url=url, timeout=10) as c,
    ):  # fmt: skip
        slow = [
            c.post(
                JOBS,
                json={
                    "inputs": {"INPUT0": [unique_row()]},
                    "webhook": {"url": d.url},
                },
            ).json()["id"]
            for d in drips
        ]
        # the slow receivers hold their slots now
        eventually(lambda: sum(d.connections for d in drips) >= 4, 10, 0.05, "no slow delivery started")
        sent = time.monotonic()
        r = c.post(
            JOBS,
            json={
                "inputs": {"INPUT0": [unique_row()]},
                "webhook": {"url": normal.url},
            },
        )
        assert r.status_code == 202, r.text
        eventually(lambda: normal.received, 10, 0.02, "the normal webhook was not delivered")
        latency = normal.received[0] - sent

        # The slow ones: each attempt ends within the total bound, however slowly the bytes drip.
        def slow_attempts() -> list[dict[str, Any]] | None:
            found = [a for i in slow for a in c.get(f"/v1/jobs/{i}").json()["webhook"]["attempts"]]
            return found if len(found) >= 8 else None

        attempts = eventually(slow_attempts, 4 * TOTAL_S + 10, 0.2, "8 slow attempts")
        most_at_once = max(d.connections for d in drips)
    print(
        f"drip test: normal webhook delivered {latency * 1000:.0f} ms after submit; slow attempts {len(attempts)}"
    )
    assert latency < 2.0, f"the normal webhook took {latency:.2f} s"
    assert len(attempts) >= 8
    assert all(a["duration_ms"] <= (TOTAL_S + 1.0) * 1000 for a in attempts), attempts
    assert most_at_once == 1  # each receiver was contacted once: nothing was retried early
