"""Jobs belong to the tenant that submitted them: another tenant gets 404 exactly as for an id that does
not exist (GET, DELETE, both WebSockets), idempotency keys are per tenant, and a conflicting key never
names a job. The tenant is set where the authentication stage sets it (``conn.state.tenant``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.integration.jobs_helpers import gateway_with_tenant_header, unique_row

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"
UNKNOWN = "0" * 32


@pytest.fixture(scope="module")
def tenant_url(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[str]:
    with gateway_with_tenant_header(
        triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis_server.url
    ) as url:
        yield url


def as_tenant(url: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=10, headers={"X-Test-Tenant": tenant})


def ws_frames(
    url: str, tenant: str, path: str, send: dict[str, str] | None = None
) -> list[dict[str, object]]:
    frames = []
    with connect(url.replace("http", "ws") + path, additional_headers={"X-Test-Tenant": tenant}) as ws:
        if send is not None:
            ws.send(json.dumps(send))
        while True:
            frame = json.loads(ws.recv(timeout=5))
            if frame["type"] != "heartbeat":
                frames.append(frame)
            if frame["type"] in ("error", "result", "status"):
                break
    return frames


def test_another_tenants_job_is_not_found(tenant_url: str) -> None:
    body = {"inputs": {"INPUT0": [unique_row()]}}
    with as_tenant(tenant_url, "tenant-a") as a, as_tenant(tenant_url, "tenant-b") as b:
        job_id = a.post(JOBS, json=body).json()["id"]
        assert a.get(f"/v1/jobs/{job_id}").status_code == 200
        for method in ("GET", "DELETE"):
            theirs = b.request(method, f"/v1/jobs/{job_id}")
            nobody = b.request(method, f"/v1/jobs/{UNKNOWN}")
            assert theirs.status_code == nobody.status_code == 404
            assert theirs.json()["error"]["code"] == nobody.json()["error"]["code"] == "not_found"
            assert theirs.json()["error"]["details"] == {"job_id": job_id}
        for tenant, expected in (("tenant-b", "error"), ("tenant-a", "status")):
            frames = ws_frames(tenant_url, tenant, f"/v1/jobs/{job_id}/ws")
            assert frames[0]["type"] == expected, frames
        frames = ws_frames(tenant_url, "tenant-b", "/v1/ws", {"op": "subscribe", "job_id": job_id})
        assert frames[-1]["type"] == "error" and frames[-1]["error"]["code"] == "not_found"  # type: ignore[index]
        assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # B's DELETE did not cancel it
        a.delete(f"/v1/jobs/{job_id}")


def test_idempotency_keys_are_per_tenant_and_conflicts_name_no_job(tenant_url: str) -> None:
    body = {"inputs": {"INPUT0": [unique_row()]}}
    key = {"Idempotency-Key": f"shared-{unique_row(1)[0]}"}
    with as_tenant(tenant_url, "tenant-a") as a, as_tenant(tenant_url, "tenant-b") as b:
        mine = a.post(JOBS, json=body, headers=key)
        theirs = b.post(JOBS, json=body, headers=key)  # the same key and body from another tenant
        assert mine.status_code == theirs.status_code == 202
        assert theirs.headers.get("idempotent-replayed") is None
        assert theirs.json()["id"] != mine.json()["id"]
        clash = b.post(JOBS, json={"inputs": {"INPUT0": [unique_row()]}}, headers=key)
        assert clash.status_code == 422 and clash.json()["error"]["details"]["conflict"] == "body"
        assert "job_id" not in clash.json()["error"]["details"]
        assert mine.json()["id"] not in clash.text and theirs.json()["id"] not in clash.text
        again = a.post(JOBS, json=body, headers=key)
        assert again.json()["id"] == mine.json()["id"] and again.headers["idempotent-replayed"] == "true"
        a.delete(f"/v1/jobs/{mine.json()['id']}")
        b.delete(f"/v1/jobs/{theirs.json()['id']}")
