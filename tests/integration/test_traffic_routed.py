"""Traffic policies with many Tritons: versions 1 and 2 of a model loaded on different Tritons
(``TGW_TRITON_URLS``), a canary split and a shadow still reach the version each chose (the routing knows which
endpoint has which version)."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.servers import model_repository, running_redis, tritons_on

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "versioned_fp32"  # OUTPUT0 = INPUT0 * the version number


@pytest.fixture(scope="module")
def split_tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedTriton]]:
    """Two Tritons: the first serves only version 1 of the model, the second only version 2."""
    repos = []
    for only in ("1", "2"):
        repo = model_repository(tmp_path_factory, [MODEL])
        shutil.rmtree(repo / MODEL / ("2" if only == "1" else "1"))
        repos.append(repo)
    with tritons_on(tmp_path_factory, repos) as servers:
        yield servers


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with running_redis(tmp_path_factory, "traffic-routed-redis") as server:
        yield server


def test_split_and_shadow_across_tritons_serving_different_versions(
    split_tritons: list[EmbeddedTriton], own_redis: EmbeddedRedis
) -> None:
    urls = ",".join(t.grpc_url for t in split_tritons)
    with running_gateway(triton_urls=urls, redis_url=own_redis.url, traffic_poll_interval_s=0.2) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            models = c.get("/v1/models").json()["models"]
            assert set(next(m for m in models if m["name"] == MODEL)["versions"]) == {"1", "2"}
            r = c.put(f"/v1/admin/models/{MODEL}/traffic", json={"weights": {"1": 50, "2": 50}})
            assert r.status_code == 200, r.text
            seen: Counter[str] = Counter()
            for i in range(200):
                r = c.post(f"/v1/models/{MODEL}/infer", json={"inputs": {"INPUT0": [[float(i + 1), 1.0]]}},
                           headers={"Cache-Control": "no-cache"})  # fmt: skip
                assert r.status_code == 200, r.text
                answer = r.json()
                v = answer["model_version"]
                # each version answered by the Triton that has it: its own factor
                assert answer["outputs"]["OUTPUT0"] == [[float(i + 1) * int(v), float(v)]], answer
                seen[v] += 1
            assert seen["1"] > 50 and seen["2"] > 50, seen
            r = c.put(
                f"/v1/admin/models/{MODEL}/traffic",
                json={"weights": {"1": 100}, "shadow": "2", "shadow_sample": 1},
            )
            assert r.status_code == 200, r.text
            for _ in range(40):
                r = c.post(f"/v1/models/{MODEL}/infer", json={"inputs": {"INPUT0": [[2.0, 4.0]]}},
                           headers={"Cache-Control": "no-cache"})  # fmt: skip
                assert r.json()["model_version"] == "1"

            def compared() -> dict[str, object]:
                s = c.get(f"/v1/admin/models/{MODEL}/traffic").json()
                assert len(s["shadow_comparisons"]) == 1, s
                pair = s["shadow_comparisons"][0]
                assert pair["compared"] == 40 and pair["errors"] == 0, pair
                return dict(pair)

            pair = eventually(compared, 10, 0.2, "the shadow calls were not compared")
            out = pair["outputs"]["OUTPUT0"]  # type: ignore[index]
            # version 2 doubles: |2x - x| over [2, 4] is 3 on average, 4 at most; production's spread is 1
            assert (out["mean_abs"], out["max_abs"], out["mean_rel"]) == (3.0, 4.0, 3.0), out
