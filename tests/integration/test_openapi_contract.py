"""Declared JSON answers have JSON bodies matching their declared schema, on the real stack (issue 15:
four /v2 live/ready routes answered an empty body where JSON was declared; the jobs routes and the errors
had no declared schema at all)."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest

from app.launcher import free_port
from tests.eventually import eventually
from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import unique_row, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CASES = [
    ("GET", "/healthz", 200), ("GET", "/readyz", 200), ("GET", "/v1/models", 200),
    ("GET", "/v1/models/identity_fp32", 200), ("GET", "/v1/models/versioned_fp32/versions/1", 200),
    ("GET", "/v2", 200), ("GET", "/v2/health/live", 200), ("GET", "/v2/health/ready", 200),
    ("POST", "/v2/repository/index", 200), ("GET", "/v2/models/identity_fp32", 200),
    ("GET", "/v2/models/identity_fp32/ready", 200), ("GET", "/v2/models/versioned_fp32/versions/99/ready", 400),
    ("GET", "/v2/models/identity_fp32/config", 200),
]  # fmt: skip


def _template(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    for template, ops in spec["paths"].items():
        parts, given = template.split("/"), path.split("/")
        if len(parts) == len(given) and all(
            a == b or a.startswith("{") for a, b in zip(parts, given, strict=True)
        ):
            if method.lower() in ops:
                return ops[method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def test_bodies_match_the_declared_schemas(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for method, path, status in CASES:
        r = client.request(method, path)
        assert r.status_code == status, (path, r.status_code, r.text[:200])
        declared = _template(spec, method, path)["responses"][str(status)]["content"]["application/json"]
        assert r.headers["content-type"].startswith("application/json"), path
        schema = {**declared["schema"], "components": spec["components"]}
        jsonschema.validate(r.json(), schema)  # an empty body fails r.json()


def _conforms(spec: dict[str, Any], method: str, template: str, r: httpx.Response, status: int) -> Any:
    assert r.status_code == status, (method, r.url.path, r.status_code, r.text[:300])
    declared = spec["paths"][template][method.lower()]["responses"][str(status)]["content"][
        "application/json"
    ]
    assert r.headers["content-type"].startswith("application/json"), r.url.path
    jsonschema.validate(r.json(), {**declared["schema"], "components": spec["components"]})
    return r.json()


def test_jobs_infer_and_error_bodies_match_the_declared_schemas(start_gateway: GatewayFactory) -> None:
    """The jobs routes' answers (submit, poll to success with a webhook, cancel, stats) and the infer and
    error answers on both APIs, against the document. A job left queued is cancelled on a gateway with no
    worker; one run to success on a gateway with one."""
    hook = free_port()
    jobs = "/v1/models/{model}/jobs"
    settings = {"webhook_allow_private": True, "webhook_allowed_ports": [hook], "webhook_schedule_s": "0.2"}
    with start_gateway(**settings) as idle, httpx.Client(base_url=idle, timeout=30) as c:
        spec = c.get("/openapi.json").json()
        body = {"inputs": {"INPUT0": [unique_row()]}}
        queued = _conforms(spec, "POST", jobs, c.post("/v1/models/identity_fp32/jobs", json=body), 202)
        _conforms(spec, "DELETE", "/v1/jobs/{job_id}", c.delete(f"/v1/jobs/{queued['id']}"), 200)
        _conforms(spec, "DELETE", "/v1/jobs/{job_id}", c.delete(f"/v1/jobs/{queued['id']}"), 409)
        with (
            start_gateway(worker_in_process=True, **settings) as busy,
            httpx.Client(base_url=busy, timeout=30) as w,
        ):
            hooked = {**body, "webhook": {"url": f"http://127.0.0.1:{hook}/hook"}}
            sent = _conforms(spec, "POST", jobs, w.post("/v1/models/identity_fp32/jobs", json=hooked), 202)
            wait_job(w, sent["id"])
            eventually(lambda: w.get(f"/v1/jobs/{sent['id']}").json()["webhook"]["attempts"], 20, 0.1,
                       lambda: str(w.get(f"/v1/jobs/{sent['id']}").json()))  # fmt: skip
            job = _conforms(spec, "GET", "/v1/jobs/{job_id}", w.get(f"/v1/jobs/{sent['id']}"), 200)
            assert job["status"] == "succeeded" and job["result"]["outputs"], job
        _conforms(spec, "GET", "/v1/jobs/stats", c.get("/v1/jobs/stats"), 200)
        _conforms(spec, "GET", "/v1/jobs/{job_id}", c.get("/v1/jobs/nope"), 404)
        _conforms(spec, "POST", jobs, c.post("/v1/models/nope/jobs", json=body), 404)
        _conforms(spec, "POST", jobs, c.post("/v1/models/identity_fp32/jobs", json={"inputs": {}}), 422)
        _conforms(spec, "POST", jobs, c.post("/v1/models/identity_fp32/jobs", content=b"{"), 400)
        infer = "/v1/models/{model}/infer"
        _conforms(spec, "POST", infer, c.post("/v1/models/identity_fp32/infer", json=body), 200)
        _conforms(spec, "POST", infer, c.post("/v1/models/identity_fp32/infer", json={"inputs": {}}), 422)
        _conforms(spec, "POST", infer, c.post("/v1/models/nope/infer", json=body), 404)
        v2 = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": unique_row()}]}
        v2_infer = "/v2/models/{model}/infer"
        _conforms(spec, "POST", v2_infer, c.post("/v2/models/identity_fp32/infer", json=v2), 200)
        _conforms(spec, "POST", v2_infer, c.post("/v2/models/identity_fp32/infer", json={}), 400)
        _conforms(spec, "GET", "/v2/models/{model}", c.get("/v2/models/nope"), 404)
        _conforms(spec, "GET", "/v1/models/{model}", c.get("/v1/models/nope"), 404)
