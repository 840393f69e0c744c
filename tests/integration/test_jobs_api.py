"""Job API without any worker running: validation, SSRF refusals, idempotency, cancel, cache-hit
completion, expiry, backpressure, stats. (Jobs left queued here are cancelled.)"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import unique_row, wait_job

pytestmark = pytest.mark.integration

JOBS = "/v1/models/identity_fp32/jobs"


def test_submit_is_validated_like_infer(client: httpx.Client) -> None:
    r = client.post(JOBS, json={"inputs": {"WRONG": [[1.0]]}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert client.post("/v1/models/nope/jobs", json={"inputs": {}}).status_code == 404
    r = client.post(JOBS, json={"inputs": {"INPUT0": [[1.0]]}, "priority": "urgent"})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "priority"
    r = client.post(JOBS, json={"inputs": {"INPUT0": [[1.0]]}, "extra": 1})
    assert r.status_code == 422


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook", "http://localhost:8080/", "http://2130706433/", "http://0x7f.1/",
        "http://0177.0.0.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/latest",
        "http://[fd00:ec2::254]/", "http://10.0.0.5/", "http://192.168.0.1/", "http://[fe80::1]/",
        "http://0.0.0.0/", "ftp://example.com/", "file:///etc/passwd", "http://no-such-host.invalid/",
        "http://[2002:7f00:1::]/", "http://100.100.100.200/",
    ],
)  # fmt: skip
def test_ssrf_webhook_urls_are_refused(client: httpx.Client, url: str) -> None:
    r = client.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}, "webhook": {"url": url}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == "webhook.url"


def test_idempotency_key_replays_and_conflicts(client: httpx.Client) -> None:
    key = f"idem-{time.time_ns()}"
    body = {"inputs": {"INPUT0": [unique_row()]}}
    first = client.post(JOBS, json=body, headers={"Idempotency-Key": key})
    again = client.post(JOBS, json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202, first.text
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    other = client.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}}, headers={"Idempotency-Key": key})
    assert other.status_code == 422
    assert other.json()["error"]["details"]["conflict"] == "body"
    assert "Idempotency-Key" in other.json()["error"]["message"]
    client.delete(f"/v1/jobs/{first.json()['id']}")


def test_cancel_queued_then_conflict_and_unknown(client: httpx.Client) -> None:
    r = client.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "queued"
    assert job["status_url"].endswith(f"/v1/jobs/{job['id']}") and job["ws_url"].startswith("ws://")
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409 and r.json()["error"]["details"]["status"] == "cancelled"
    for method in ("GET", "DELETE"):
        r = client.request(method, "/v1/jobs/0123456789abcdef")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_cached_answer_completes_at_once_and_expires(start_gateway: GatewayFactory) -> None:
    body = {"inputs": {"INPUT0": [unique_row(), unique_row()]}}
    with start_gateway(job_ttl_s=1) as url, httpx.Client(base_url=url, timeout=10) as c:
        sync = c.post("/v1/models/identity_fp32/infer", json=body)
        assert sync.status_code == 200
        r = c.post(JOBS, json=body)
        assert r.status_code == 202 and r.json()["status"] == "succeeded"
        job = c.get(f"/v1/jobs/{r.json()['id']}").json()
        assert job["result"] == sync.json() and job["cache"] == "HIT"
        assert job["created_at"] and job["finished_at"]
        time.sleep(1.6)  # a real wait: past the job's 1 s TTL, whose length is the point
        assert c.get(f"/v1/jobs/{r.json()['id']}").status_code == 404


def test_backpressure_503_with_retry_after(start_gateway: GatewayFactory) -> None:
    with start_gateway(queue_max=1) as url, httpx.Client(base_url=url, timeout=10) as c:
        ids, last = [], None
        for _ in range(3):
            last = c.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}})
            if last.status_code == 202:
                ids.append(last.json()["id"])
        assert last is not None and last.status_code == 503
        assert last.headers["retry-after"] and last.json()["error"]["code"] == "unavailable"
        stats = c.get("/v1/jobs/stats").json()
        assert stats["queue_depth"] >= 1 and stats["oldest_pending_age_seconds"] >= 0
        assert {"jobs_total", "webhook_deliveries_total", "websockets_open"} <= set(stats)
        for job_id in ids:
            c.delete(f"/v1/jobs/{job_id}")


def test_high_priority_jobs_run_first(start_gateway: GatewayFactory) -> None:
    """Queued while no worker runs; then one worker with one slot takes the high stream first."""
    with start_gateway() as url, httpx.Client(base_url=url, timeout=10) as c:
        normal = [c.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}}).json()["id"] for _ in range(3)]
        high = [
            c.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}, "priority": "high"}).json()["id"]
            for _ in range(2)
        ]
    with start_gateway(worker_in_process=True, worker_concurrency=1) as url, httpx.Client(base_url=url) as c:
        jobs = {i: wait_job(c, i) for i in normal + high}
    assert all(j["status"] == "succeeded" for j in jobs.values())
    assert jobs[high[0]]["priority"] == "high"
    assert max(jobs[i]["started_at"] for i in high) < min(jobs[i]["started_at"] for i in normal)
