"""Traffic policies (issue 25) against the real Triton and Redis: a 90/10 canary split over vae_timeseries 1
and 2, sticky callers, a shadow at 100 % compared for every request while production answers (client p50 side
by side), automatic promotion on evidence and rollback of a failing canary (tests/models/canary_fp32), a
second replica applying a change within 1 s, the admin API and `tgw traffic` round trip, bad policies named.

Every gateway here uses its own Redis (module scope), so the session's gateway never sees these policies."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway, running_gateway_addresses
from tests.integration.servers import running_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
VAE = "vae_timeseries"
PEPPER = "test-pepper-7f3a9c1e5b2d8046af1c93e7d52b08e4c6a1f9d3b7e20c58"
ADMIN = "test-admin-4e8b1d6f0a3c9e2b7d5f1a8c3e6b0d9f2a7c4e1b8d5f3a06"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with running_redis(tmp_path_factory, "traffic-redis") as server:
        yield server


def settings(triton: EmbeddedTriton, redis: EmbeddedRedis, **extra: object) -> dict[str, object]:
    return {
        "triton_url": triton.grpc_url, "triton_http_url": triton.http_url, "redis_url": redis.url,
        "traffic_poll_interval_s": 0.2, "traffic_evaluate_interval_s": 0.3, **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def gw(triton: EmbeddedTriton, own_redis: EmbeddedRedis) -> Iterator[tuple[str, str]]:
    """(HTTP base, gRPC address) of a gateway on the module's Redis."""
    with running_gateway_addresses(**settings(triton, own_redis, traffic_shadow_max_in_flight=64)) as a:
        yield a.http, a.grpc


@pytest.fixture
def base(gw: tuple[str, str]) -> Iterator[str]:
    yield gw[0]
    for model in (VAE, "canary_fp32"):  # no policy outlives its test
        httpx.delete(f"{gw[0]}/v1/admin/models/{model}/traffic", timeout=10)


def series(i: int) -> list[list[list[float]]]:
    rng = np.random.default_rng(i)
    return [[(50 + rng.normal(size=20)).round(4).tolist()]]


def put(base: str, model: str, spec: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.put(f"{base}/v1/admin/models/{model}/traffic", json=spec, headers=headers, timeout=10)


def show(base: str, model: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/admin/models/{model}/traffic", timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def infer_versions(base: str, n: int, start: int = 0, headers: dict[str, str] | None = None) -> list[str]:
    def one(i: int) -> str:
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post(f"/v1/models/{VAE}/infer", json={"inputs": {"series": series(i)}},
                       headers={**NO_CACHE, **(headers or {})})  # fmt: skip
            assert r.status_code == 200, r.text
            return str(r.json()["model_version"])

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(start, start + n)))


def test_split_90_10_over_2000_requests_every_door(base: str, gw: tuple[str, str]) -> None:
    r = put(base, VAE, {"weights": {"1": 90, "2": 10}})
    assert r.status_code == 200, r.text
    assert r.json()["weights"] == {"1": 90, "2": 10} and r.json()["candidate"] == "2"
    got = Counter()
    with httpx.Client(base_url=base, timeout=30) as c:

        def one(i: int) -> str:
            x = series(i)
            if i % 2:  # /v1 and /v2 alike; unique inputs and no-cache: the cache hides nothing
                r = c.post(f"/v1/models/{VAE}/infer", json={"inputs": {"series": x}}, headers=NO_CACHE)
                assert r.status_code == 200, r.text
                return str(r.json()["model_version"])
            body = {"inputs": [{"name": "series", "shape": [1, 1, 20], "datatype": "FP32", "data": x}]}
            r = c.post(f"/v2/models/{VAE}/infer", json=body, headers=NO_CACHE)
            assert r.status_code == 200, r.text
            return str(r.json()["model_version"])

        with ThreadPoolExecutor(4) as pool:
            got.update(pool.map(one, range(2000)))
    share = got["2"] / 2000
    assert set(got) == {"1", "2"} and abs(share - 0.10) <= 0.03, got
    # a request naming a version is never redirected
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(30):
            r = c.post(f"/v1/models/{VAE}/versions/2/infer", json={"inputs": {"series": series(i)}})
            assert r.json()["model_version"] == "2"
    # the gRPC door follows the same policy
    client = grpcclient.InferenceServerClient(gw[1])
    try:
        grpc_versions = Counter()
        for i in range(300):
            inp = grpcclient.InferInput("series", [1, 1, 20], "FP32")
            inp.set_data_from_numpy(np.asarray(series(10_000 + i), dtype=np.float32))
            res = client.infer(VAE, [inp], headers={"cache-control": "no-cache"})
            grpc_versions[res.get_response().model_version] += 1
    finally:
        client.close()
    assert set(grpc_versions) == {"1", "2"} and grpc_versions["2"] < grpc_versions["1"], grpc_versions
    # the evidence counts what the policy routed (2,000 HTTP + 300 gRPC), not the requests naming a version

    def counted() -> dict[str, Any]:
        versions = show(base, VAE)["versions"]
        assert versions["1"]["requests"] + versions["2"]["requests"] == 2300, versions
        return dict(versions)

    versions = eventually(counted, 5, 0.2, "the routed requests were not all counted")
    assert versions["2"]["requests"] == got["2"] + grpc_versions["2"] and versions["1"]["errors"] == 0
    # a job records the version that served it
    r = httpx.put(f"{base}/v1/admin/models/{VAE}/traffic", json={"weights": {"2": 100}}, timeout=10)
    assert r.status_code == 200
    job = httpx.post(
        f"{base}/v1/models/{VAE}/jobs", json={"inputs": {"series": series(7)}}, timeout=10
    ).json()

    def done() -> dict[str, Any] | None:
        j: dict[str, Any] = httpx.get(f"{base}/v1/jobs/{job['id']}", timeout=10).json()
        return j if j["status"] == "succeeded" else None

    finished = eventually(done, 30, 0.1, "the job did not finish")
    assert finished["version"] == "2" and finished["result"]["model_version"] == "2"


def test_sticky_callers_keep_their_version(triton: EmbeddedTriton, own_redis: EmbeddedRedis) -> None:
    auth = {"auth": "required", "key_pepper": PEPPER, "admin_token": ADMIN}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with running_gateway(**settings(triton, own_redis, **auth)) as url:
        try:
            r = put(url, VAE, {"weights": {"1": 50, "2": 50}, "sticky": "key"}, **admin)
            assert r.status_code == 200, r.text
            keys = []
            for i in range(12):  # random key ids: all 12 on one version has odds 1 in 2,048
                made = httpx.post(f"{url}/v1/admin/keys", json={"name": f"sticky-{i}", "rps": 500, "burst": 500},
                                  headers=admin, timeout=10)  # fmt: skip
                assert made.status_code == 201, made.text
                keys.append(made.json()["key"])
            seen: dict[int, set[str]] = {}
            for k, key in enumerate(keys):
                seen[k] = set(infer_versions(url, 12, k * 100, {"Authorization": f"Bearer {key}"}))
            assert all(len(v) == 1 for v in seen.values()), seen  # each key kept one version
            assert {v for s in seen.values() for v in s} == {"1", "2"}, seen  # and the keys were split
            # unauthenticated policy reads are refused: admin only
            assert httpx.get(f"{url}/v1/admin/models/{VAE}/traffic", timeout=10).status_code == 401
        finally:
            httpx.delete(f"{url}/v1/admin/models/{VAE}/traffic", headers=admin, timeout=10)


def _p50(base: str, n: int, start: int) -> float:
    times = []
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(start, start + n):
            t = time.perf_counter()
            r = c.post(f"/v1/models/{VAE}/infer", json={"inputs": {"series": series(i)}}, headers=NO_CACHE)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
    return statistics.median(times)


def test_shadow_compares_every_request_and_production_answers(base: str) -> None:
    r = put(base, VAE, {"weights": {"1": 100}, "shadow": "2", "shadow_sample": 1.0})
    assert r.status_code == 200, r.text
    assert set(infer_versions(base, 200, 50_000)) == {"1"}  # every answer from production

    def compared() -> dict[str, Any]:
        s = show(base, VAE)
        c = s["shadow_comparisons"]
        assert c and c[0]["compared"] == 200, json.dumps(s)
        return s

    summary = eventually(compared, 10, 0.2, "the shadow comparisons did not reach 200")
    cmp = summary["shadow_comparisons"][0]
    assert (cmp["production"], cmp["shadow"], cmp["calls"], cmp["errors"], cmp["dropped"]) == (
        "1",
        "2",
        200,
        0,
        0,
    )
    out = cmp["outputs"]["forecast"]
    assert out["max_abs"] >= out["mean_abs"] >= 0 and out["mean_rel"] >= 0
    assert summary["versions"]["1"]["requests"] == 200 and summary["versions"]["2"]["requests"] == 200
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert (
        f'tgw_shadow_calls_total{{model="{VAE}",outcome="compared",shadow_version="2",version="1"}}'
        in metrics
    )


def test_client_p50_with_and_without_shadow(base: str) -> None:
    """Side by side, alternating blocks (the box's noise hits both): the p50 with a 100 % shadow stays within
    1.5 x the p50 without, + 1 ms (2 shared cores: the shadow's Triton call competes for CPU)."""
    without, with_shadow = [], []
    for block in range(3):
        assert put(base, VAE, {"weights": {"1": 100}}).status_code == 200
        without.append(_p50(base, 60, 60_000 + block * 1000))
        assert put(base, VAE, {"weights": {"1": 100}, "shadow": "2", "shadow_sample": 1.0}).status_code == 200
        with_shadow.append(_p50(base, 60, 70_000 + block * 1000))
    p_without, p_with = statistics.median(without), statistics.median(with_shadow)
    print(f"client p50 without shadow {p_without * 1000:.2f} ms, with a 100 % shadow {p_with * 1000:.2f} ms")
    assert p_with <= 1.5 * p_without + 0.001, (without, with_shadow)


def test_automatic_promotion_when_the_evidence_is_met(base: str) -> None:
    spec = {"weights": {"1": 100}, "shadow": "2", "shadow_sample": 1.0,
            "promote_when": "n>=40,compared>=40,mean_rel<=10,err_delta<=0.01,p99_ratio<=20"}  # fmt: skip
    r = put(base, VAE, spec)
    assert r.status_code == 200, r.text
    with httpx.Client(base_url=base, timeout=30) as c:  # one at a time: production answers until promoted
        answered = [
            c.post(f"/v1/models/{VAE}/infer", json={"inputs": {"series": series(80_000 + i)}},
                   headers=NO_CACHE).json()["model_version"]
            for i in range(50)
        ]  # fmt: skip
    switched = answered.index("2") if "2" in answered else 50
    assert switched >= 40 and set(answered[switched:]) <= {"2"}, answered

    def promoted() -> dict[str, Any] | None:
        s = show(base, VAE)
        return s if s["decisions"] else None

    s = eventually(promoted, 10, 0.2, "no promotion")
    d = s["decisions"][0]
    assert (d["decision"], d["candidate"], d["production"]) == ("promote", "2", "1")
    assert d["evidence"]["n"] >= 40 and d["conditions"] == spec["promote_when"]
    assert s["weights"] == {"1": 0, "2": 100} and s["shadow"] is None
    eventually(
        lambda: set(infer_versions(base, 20, 81_000)) == {"2"}, 5, 0.1, "the promotion is not in force"
    )
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert f'tgw_traffic_decisions_total{{decision="promote",model="{VAE}"}} 1.0' in metrics


def test_automatic_rollback_of_a_failing_canary(base: str) -> None:
    r = put(base, "canary_fp32", {"weights": {"1": 50, "2": 50}, "rollback_when": "n>=10,err_delta>=0.5"})
    assert r.status_code == 200, r.text
    statuses = Counter()
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(60):
            r = c.post("/v1/models/canary_fp32/infer", json={"inputs": {"INPUT0": [[float(i), 1.0]]}},
                       headers=NO_CACHE)  # fmt: skip
            statuses[r.status_code] += 1
    assert statuses[200] >= 10 and sum(statuses.values()) - statuses[200] >= 10, statuses

    def rolled_back() -> dict[str, Any] | None:
        s = show(base, "canary_fp32")
        return s if s["decisions"] else None

    s = eventually(rolled_back, 10, 0.2, "no rollback")
    assert s["decisions"][0]["decision"] == "rollback" and s["weights"] == {"1": 50, "2": 0}
    assert s["decisions"][0]["evidence"]["err"] == 1.0

    def all_ok() -> bool:
        with httpx.Client(base_url=base, timeout=30) as c:
            return all(
                c.post(
                    "/v1/models/canary_fp32/infer",
                    json={"inputs": {"INPUT0": [[float(i), 2.0]]}},
                    headers=NO_CACHE,
                ).status_code
                == 200
                for i in range(20)
            )

    eventually(all_ok, 5, 0.1, "requests still reach the failed canary")


def test_a_second_replica_applies_a_change_within_one_second(
    base: str, triton: EmbeddedTriton, own_redis: EmbeddedRedis
) -> None:
    assert put(base, VAE, {"weights": {"1": 100}}).status_code == 200
    with running_gateway(**settings(triton, own_redis, traffic_poll_interval_s=0.5)) as other:
        with httpx.Client(base_url=other, timeout=30) as c:

            def version(i: int) -> str:
                r = c.post(
                    f"/v1/models/{VAE}/infer", json={"inputs": {"series": series(i)}}, headers=NO_CACHE
                )
                return str(r.json()["model_version"])

            assert {version(i) for i in range(10)} == {"1"}
            t0 = time.monotonic()
            assert put(base, VAE, {"weights": {"2": 100}}).status_code == 200  # through the first replica
            i = 0
            while version(90_000 + i) != "2":
                i += 1
                assert time.monotonic() - t0 < 3, "the second replica did not apply the change"
            elapsed = time.monotonic() - t0
    print(f"the second replica applied the change after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0


def test_admin_api_and_cli_round_trip(base: str, own_redis: EmbeddedRedis, triton: EmbeddedTriton) -> None:
    env = {**os.environ, "TGW_REDIS_URL": own_redis.url, "TGW_TRITON_HTTP_URL": triton.http_url}

    def tgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "traffic", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    done = tgw("set", VAE, "--weights", "1=80,2=20", "--sticky", "tenant", "--shadow", "2", "--shadow-sample",
               "0.5", "--promote-when", "n>=500,mean_rel<=0.01", "--rollback-when", "n>=50,err_delta>0.05", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    api = show(base, VAE)
    for field in (
        "weights",
        "sticky",
        "shadow",
        "shadow_sample",
        "promote_when",
        "rollback_when",
        "revision",
    ):
        assert api[field] == cli[field], field
    assert api["weights"] == {"1": 80, "2": 20} and api["sticky"] == "tenant" and api["shadow_sample"] == 0.5
    text = tgw("show", VAE)
    assert text.returncode == 0 and "promote when   n>=500,mean_rel<=0.01" in text.stdout, text.stdout
    assert json.loads(tgw("show", VAE, "--json").stdout)["revision"] == api["revision"]
    promoted = tgw("promote", VAE)
    assert promoted.returncode == 0 and "promote 2 (production 1) by cli" in promoted.stdout, promoted.stdout
    after = show(base, VAE)
    assert after["weights"] == {"1": 0, "2": 100} and after["decisions"][0]["by"].startswith("cli")
    # the API's own change, seen by the CLI
    assert put(base, VAE, {"weights": {"1": 70, "2": 30}}).status_code == 200
    assert json.loads(tgw("show", VAE, "--json").stdout)["weights"] == {"1": 70, "2": 30}
    rolled = json.loads(tgw("rollback", VAE, "--json").stdout)
    assert rolled["weights"] == {"1": 70, "2": 0}
    bad = tgw("set", VAE, "--weights", "1=90,3=10")
    assert bad.returncode == 2 and "weights.3" in bad.stderr, bad.stderr
    bad = tgw("set", VAE, "--weights", "1=90", "--shadow", "2", "--shadow-sample", "2")
    assert bad.returncode == 2 and "shadow_sample" in bad.stderr, bad.stderr
    assert json.loads(tgw("clear", VAE).stdout) == {"model": VAE, "removed": True}
    assert tgw("show", VAE).returncode == 1
    assert httpx.get(f"{base}/v1/admin/models/{VAE}/traffic", timeout=10).status_code == 404


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"weights": {"1": 90, "3": 10}}, "weights.3"), ({"weights": {"1": 0}}, "weights"),
     ({"weights": {"1": 1}, "shadow_sample": 3, "shadow": "2"}, "shadow_sample"),
     ({"weights": {"1": 1}, "sticky": "ip"}, "sticky"), ({"weights": {"1": 1}, "shadow": "7"}, "shadow"),
     ({"weights": {"1": 1}, "promote_when": "n>>3"}, "promote_when"), ({"weights": "1=90"}, "weights")],
)  # fmt: skip
def test_bad_policy_is_422_naming_the_field(base: str, spec: dict[str, Any], field: str) -> None:
    r = put(base, VAE, spec)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == field, r.text
    assert httpx.get(f"{base}/v1/admin/models/{VAE}/traffic", timeout=10).status_code == 404  # nothing stored
    assert put(base, "no_such_model", {"weights": {"1": 1}}).status_code == 404


def test_grpc_version_named_is_not_redirected(base: str, gw: tuple[str, str]) -> None:
    assert put(base, VAE, {"weights": {"2": 100}}).status_code == 200
    client = grpcclient.InferenceServerClient(gw[1])
    try:
        inp = grpcclient.InferInput("series", [1, 1, 20], "FP32")
        inp.set_data_from_numpy(np.asarray(series(5), dtype=np.float32))
        assert client.infer(VAE, [inp], model_version="1").get_response().model_version == "1"
        assert client.infer(VAE, [inp]).get_response().model_version == "2"
    finally:
        client.close()


def test_one_replica_at_a_time_holds_the_evaluation_lease(own_redis: EmbeddedRedis) -> None:
    """The lease (SET NX PX, renewed by its holder): a second replica does not evaluate while the first
    renews it, takes over when the first releases it (stop) or stops renewing (past TGW_TRAFFIC_LEASE_S)."""
    from app.clients.redis import make_redis
    from app.services.traffic import TrafficPolicies

    async def scenario() -> None:
        # a 1.5 s lease renewed after 0.8 s: slack for a loaded 2-core machine (0.5 s was not enough)
        first = TrafficPolicies(make_redis(own_redis.url, 2.0), lease_s=1.5)
        second = TrafficPolicies(make_redis(own_redis.url, 2.0), lease_s=1.5)
        third = TrafficPolicies(make_redis(own_redis.url, 2.0), lease_s=1.5)
        try:
            assert await first._hold_lease() and not await second._hold_lease()
            await asyncio.sleep(0.8)
            assert await first._hold_lease() and not await second._hold_lease()  # renewed
            await asyncio.sleep(0.9)  # past the first lease's end: renewed, still the first's
            assert not await second._hold_lease()
            await first.stop()  # released at once
            assert await second._hold_lease() and not await third._hold_lease()
            await asyncio.sleep(1.8)  # the second stops renewing: its lease ends
            assert await third._hold_lease() and not await second._hold_lease()
        finally:
            for replica in (second, third):
                await replica.stop()

    asyncio.run(scenario())
