"""Traffic policies on a Redis Cluster (TGW_REDIS_CLUSTER): every key under one hash tag, so the Lua scripts
(compare-and-set of a policy, maxima, the lease) and the pipelines of the evidence run in one slot."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from app.clients.redis import make_redis, warm_up
from app.launcher import EmbeddedRedisCluster, cluster_ports
from app.request_context import Routed
from app.services.traffic import StatsBatch, TrafficPolicies, TrafficStore, compare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    server = EmbeddedRedisCluster(cluster_ports(3), tmp_path_factory.mktemp("traffic-cluster"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_policies_evidence_and_lease_on_a_cluster(cluster: EmbeddedRedisCluster) -> None:
    async def scenario() -> None:
        redis = make_redis(cluster.url, 2.0, cluster=True)
        await warm_up(redis)
        store = TrafficStore(redis)
        p = await store.set("m", {"weights": {"1": 90, "2": 10}, "shadow": "2", "shadow_sample": 0.5,
                                  "promote_when": "n>=2,mean_rel<=1"}, ("1", "2"), "test")  # fmt: skip
        assert (await store.all())["m"].revision == p.revision == await store.revision()
        assert await store.put(p, "test", expect_revision=p.revision - 1) is None  # compare-and-set
        batch = StatsBatch()
        routed = Routed("m", "1", p.revision, "2")
        for shift in (0.1, 0.3):
            batch.add("m", p.revision, "n:1")
            batch.add("m", p.revision, "n:2")
            batch.add("m", p.revision, "calls:1>2")
            batch.latency("m", p.revision, "1", 2.0)
            batch.latency("m", p.revision, "2", 2.5)
            diffs = compare({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.0 + shift])})
            assert diffs is not None
            batch.comparison(routed, diffs)
        await store.flush(batch)
        summary = await store.summary("m")
        assert summary is not None
        [pair] = summary["shadow_comparisons"]
        assert pair["compared"] == 2 and pair["outputs"]["y"]["max_abs"] == pytest.approx(0.3)
        assert summary["versions"]["2"]["p99_ms"] == 2.5 and summary["evidence"]["n"] == 2
        one = TrafficPolicies(make_redis(cluster.url, 2.0, cluster=True), lease_s=2)
        other = TrafficPolicies(make_redis(cluster.url, 2.0, cluster=True), lease_s=2)
        await one.refresh()
        assert await one.evaluate() == [("m", "promote")]  # holds the lease, promotes on the evidence
        assert not await other._hold_lease()
        after = await store.get("m")
        assert after is not None and after.weights == {"1": 0, "2": 100} and after.shadow is None
        assert (await store.decisions("m"))[0]["decision"] == "promote"
        assert await store.remove("m", "test") and await store.all() == {}
        for replica in (one, other):
            await replica.stop()
        await redis.aclose()

    asyncio.run(scenario())
