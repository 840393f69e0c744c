"""No 5xx from the job endpoints for bad input or a bad Redis: ids that name other keys, unparseable
webhook URLs, Redis stopped, stalled and restarted (503 with Retry-After, then answers again with no
sporadic 500 from stale pooled connections)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, free_port
from app.services.jobs.store import deliveries_key
from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import unique_row

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"


def test_ids_naming_other_keys_are_404_everywhere(
    client: httpx.Client, gateway_url: str, redis_server: EmbeddedRedis
) -> None:
    job_id = client.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}}).json()["id"]
    # the job's delivery log exists, as once its webhook has been tried (a list, not a hash)
    redis.Redis.from_url(redis_server.url).rpush(deliveries_key(job_id), b"{}")
    for bad in (f"{job_id}:deliveries", f"{job_id}:inputs", "x:deliveries", "stats:x", "%00", "A" * 32):
        for method in ("GET", "DELETE"):
            r = client.request(method, f"/v1/jobs/{bad}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, bad, r.text)
    ws_url = gateway_url.replace("http", "ws")
    with connect(f"{ws_url}/v1/jobs/{job_id}:deliveries/ws") as ws:
        frame = json.loads(ws.recv(timeout=5))
        assert frame["type"] == "error" and frame["error"]["code"] == "not_found"
    with connect(f"{ws_url}/v1/ws") as ws:
        ws.send(json.dumps({"op": "subscribe", "job_id": f"{job_id}:deliveries"}))
        frame = json.loads(ws.recv(timeout=5))
        assert frame["type"] == "error" and frame["error"]["code"] == "not_found"
    client.delete(f"/v1/jobs/{job_id}")


@pytest.mark.parametrize("url", ["http://[::1/", "http://[::1", "https://[zz]/", "http://[::1]:99999/"])
def test_unparseable_webhook_url_is_422_naming_the_field(client: httpx.Client, url: str) -> None:
    r = client.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}, "webhook": {"url": url}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == "webhook.url"


def test_webhook_ports_other_than_80_443_or_allowed_are_refused(start_gateway: GatewayFactory) -> None:
    with start_gateway(webhook_allowed_ports="8443") as url, httpx.Client(base_url=url, timeout=10) as c:
        for port, expected in ((6379, 422), (22, 422), (8443, 202), (443, 202)):
            body = {"inputs": {"INPUT0": [unique_row()]}, "webhook": {"url": f"https://8.8.8.8:{port}/h"}}
            r = c.post(JOBS, json=body)
            assert r.status_code == expected, (port, r.text)
            if expected == 422:
                assert r.json()["error"]["details"]["field"] == "webhook.url" and str(port) in r.text
            else:
                c.delete(f"/v1/jobs/{r.json()['id']}")


def test_redis_down_stalled_and_restarted(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    port = free_port()
    own = EmbeddedRedis(port, tmp_path / "redis", appendonly=True)
    own.start()
    try:
        with (
            start_gateway(redis_url=own.url, job_redis_timeout_s=0.5) as url,
            httpx.Client(base_url=url, timeout=10) as c,
        ):
            job_id = c.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}}).json()["id"]
            assert c.get(f"/v1/jobs/{job_id}").status_code == 200
            # stalled: SIGSTOP
            pid = own.process.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                for method, path, body in (
                    ("GET", f"/v1/jobs/{job_id}", None),
                    ("POST", JOBS, {"inputs": {"INPUT0": [unique_row()]}}),
                ):
                    started = time.monotonic()
                    r = c.request(method, path, json=body)
                    took = time.monotonic() - started
                    assert r.status_code == 503 and r.headers["retry-after"], (method, r.text)
                    assert r.json()["error"]["code"] == "job_store_unavailable"
                    assert took < 3.0, f"{method} {path} took {took:.1f} s"
            finally:
                os.kill(pid, signal.SIGCONT)
            # down
            own.stop()
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs/stats"):
                r = c.get(path)
                assert r.status_code == 503 and r.headers["retry-after"], r.text
            r = c.delete(f"/v1/jobs/{job_id}")
            assert r.status_code == 503, r.text
            # restarted: the pooled connections are stale; none of the next requests may fail
            own = EmbeddedRedis(port, tmp_path / "redis", appendonly=True)
            own.start()
            codes = [c.get(f"/v1/jobs/{job_id}").status_code for _ in range(40)]
            time.sleep(0.5)  # pacing: more requests a moment later, on connections the pool kept
            codes += [c.get("/v1/jobs/stats").status_code for _ in range(10)]
            assert codes == [200] * 50, codes
            assert c.delete(f"/v1/jobs/{job_id}").status_code == 200
    finally:
        own.stop()
