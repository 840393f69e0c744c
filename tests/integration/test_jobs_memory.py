"""Job payloads: capped apart from the sync body limit (TGW_JOB_MAX_BODY_BYTES, 413), stored compactly
(tensor bytes with datatype and shape, not JSON), and dropped once the job has finished (the result
stays until the TTL)."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
import redis

from app.launcher import EmbeddedRedis
from app.services.jobs.store import inputs_key, job_key
from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import wait_job

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"


def rows(n: int, width: int) -> list[list[float]]:
    return [[round(random.uniform(-1000, 1000), 4) for _ in range(width)] for _ in range(n)]


def test_job_body_limit_is_its_own(start_gateway: GatewayFactory) -> None:
    body = {"inputs": {"INPUT0": rows(4, 200)}}  # ~8 KB of JSON
    with start_gateway(job_max_body_bytes=4096) as url, httpx.Client(base_url=url, timeout=10) as c:
        r = c.post(JOBS, json=body)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"
        assert r.json()["error"]["details"]["limit_bytes"] == 4096 and "TGW_JOB_MAX_BODY_BYTES" in r.text
        # the same bytes, chunked: no Content-Length to refuse it by
        chunked = c.post(
            JOBS, content=iter([bytes(r.request.content)]), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413, chunked.text
        assert (
            c.post("/v1/models/identity_fp32/infer", json=body).status_code == 200
        )  # the sync limit is apart
        small = c.post(JOBS, json={"inputs": {"INPUT0": rows(1, 4)}})
        assert small.status_code == 202
        c.delete(f"/v1/jobs/{small.json()['id']}")


def test_inputs_are_stored_compactly_and_dropped_when_finished(
    start_gateway: GatewayFactory, redis_server: EmbeddedRedis
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    n, width = 8, 1000  # 8000 FP32 values: 32,000 bytes as tensors, ~80,000 as JSON
    body = {"inputs": {"INPUT0": rows(n, width)}}
    with start_gateway() as url, httpx.Client(base_url=url, timeout=10) as c:
        job_id = c.post(JOBS, json=body, headers={"Cache-Control": "no-store"}).json()["id"]
        stored = r.strlen(inputs_key(job_id))
        record = r.hgetall(job_key(job_id))
        assert 4 * n * width <= stored <= 4 * n * width + 256, stored
        assert sum(len(v) for v in record.values()) < 1024  # no copy of the request in the record
    with start_gateway(worker_in_process=True) as url, httpx.Client(base_url=url, timeout=10) as c:
        job = wait_job(c, job_id)
        assert job["status"] == "succeeded"
        got = np.array(job["result"]["outputs"]["OUTPUT0"])
        np.testing.assert_allclose(got, np.array(body["inputs"]["INPUT0"], dtype=np.float32), rtol=1e-6)
    assert r.exists(inputs_key(job_id)) == 0 and r.exists(job_key(job_id)) == 1
