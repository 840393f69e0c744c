"""Faults: Redis stopped or slow mid-test (served from Triton, BYPASS, readiness degraded), Triton down."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
import redis

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.gateway_server import running_gateway

pytestmark = pytest.mark.integration


def _body() -> dict[str, object]:
    return {"inputs": {"INPUT0": [[random.uniform(-1, 1) for _ in range(3)]]}}


@pytest.mark.parametrize("l1_entries", [0, 4096])
def test_redis_stopped_mid_test_serves_bypass(triton: EmbeddedTriton, tmp_path, l1_entries: int) -> None:  # type: ignore[no-untyped-def]
    """Without the in-process L1 every request is served from Triton (BYPASS) once Redis is gone; with
    it, answers it already holds are still HITs (same outputs), new ones BYPASS."""
    own_redis = EmbeddedRedis(free_port(), tmp_path / "redis")
    own_redis.start()
    try:
        with running_gateway(triton_url=triton.grpc_url, redis_url=own_redis.url, redis_timeout_s=0.2,
                             l1_cache_entries=l1_entries) as url:  # fmt: skip
            c = httpx.Client(base_url=url, timeout=10)
            body = _body()
            assert c.post("/v1/models/identity_fp32/infer", json=body).headers["x-cache"] == "MISS"
            hit = c.post("/v1/models/identity_fp32/infer", json=body)
            assert hit.headers["x-cache"] == "HIT"

            own_redis.stop()
            t0 = time.monotonic()
            down = c.post("/v1/models/identity_fp32/infer", json=body)
            assert time.monotonic() - t0 < 2.0
            assert down.status_code == 200
            assert down.headers["x-cache"] == ("HIT" if l1_entries else "BYPASS")
            assert down.json() == hit.json()
            fresh = c.post("/v1/models/identity_fp32/infer", json=_body())
            assert fresh.status_code == 200 and fresh.headers["x-cache"] == "BYPASS"

            ready = c.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert ready.json()["checks"]["redis"]["status"] == "degraded"

            own_redis.start()  # back: served from the cache again once the probe sees it
            assert c.get("/readyz").json()["checks"]["redis"]["status"] == "ok"
            assert c.post("/v1/models/identity_fp32/infer", json=body).headers["x-cache"] in {"MISS", "HIT"}
    finally:
        own_redis.stop()


def test_slow_redis_is_bounded(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> None:
    with running_gateway(triton_url=triton.grpc_url, redis_url=redis_server.url, redis_timeout_s=0.2) as url:
        c = httpx.Client(base_url=url, timeout=10)
        c.post("/v1/models/identity_fp32/infer", json=_body())  # warm the pool
        blocker = threading.Thread(
            target=lambda: redis.Redis.from_url(redis_server.url).execute_command("DEBUG", "SLEEP", "1.5")
        )
        blocker.start()
        time.sleep(0.1)  # a real wait: the DEBUG SLEEP reaches Redis first (a blocked Redis shows nothing)
        t0 = time.monotonic()
        r = c.post("/v1/models/identity_fp32/infer", json=_body())
        elapsed = time.monotonic() - t0
        blocker.join()
    assert r.status_code == 200
    assert r.headers["x-cache"] == "BYPASS"
    assert elapsed < 1.0, f"a blocked Redis delayed the request by {elapsed:.2f} s"


def test_triton_unreachable_is_503_with_retry_after(redis_server: EmbeddedRedis) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with running_gateway(triton_url=dead, redis_url=redis_server.url, retry_after_s=3) as url:
        c = httpx.Client(base_url=url, timeout=20)
        r = c.post("/v1/models/identity_fp32/infer", json=_body())
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "triton_unavailable"
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["triton"]["status"] == "fail"
        assert c.get("/healthz").status_code == 200
