"""The synchronous path end to end: real gateway -> real Triton, real Redis cache."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import numpy as np
import pytest

from app.launcher import EmbeddedTriton
from tests.integration.jobs_helpers import unique_row

pytestmark = pytest.mark.integration


def test_healthz_and_readyz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["checks"]["triton"]["status"] == "ok"
    assert body["checks"]["redis"]["status"] == "ok"
    assert {"identity_fp32", "versioned_fp32", "typed"} <= set(body["checks"]["models"]["ready"])


def test_models_listing_and_detail(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    ident = models["identity_fp32"]
    assert ident["state"] == "READY"
    assert ident["max_batch_size"] == 64
    assert ident["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}]
    detail = client.get("/v1/models/versioned_fp32").json()
    assert detail["versions"] == ["1", "2"] and detail["version"] == "2"
    assert client.get("/v1/models/versioned_fp32/versions/1").json()["version"] == "1"
    r = client.get("/v1/models/no_such_model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/versioned_fp32/versions/9").status_code == 404


def test_miss_then_hit_with_identical_outputs(client: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [unique_row(), unique_row()]}}
    first = client.post("/v1/models/identity_fp32/infer", json=body)
    second = client.post("/v1/models/identity_fp32/infer", json=body)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert first.json() == second.json()
    expected = np.asarray(body["inputs"]["INPUT0"], dtype=np.float32)
    assert np.array_equal(np.asarray(first.json()["outputs"]["OUTPUT0"], dtype=np.float32), expected)
    assert first.json()["model"] == "identity_fp32" and first.json()["model_version"] == "1"


def test_request_id_echoed_or_generated(client: httpx.Client) -> None:
    r = client.post("/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[1.0]]}},
                    headers={"X-Request-ID": "abc-123"})  # fmt: skip
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert client.get("/v1/models/nope").headers["x-request-id"]  # errors carry it too


def test_cache_control_directives(client: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [unique_row()]}}
    url = "/v1/models/identity_fp32/infer"
    r = client.post(url, json=body, headers={"Cache-Control": "no-store"})
    assert r.headers["x-cache"] == "MISS"
    assert client.post(url, json=body, headers={"Cache-Control": "no-store"}).headers["x-cache"] == "MISS"
    assert client.post(url, json=body).headers["x-cache"] == "MISS"  # nothing was stored before
    assert client.post(url, json=body).headers["x-cache"] == "HIT"
    assert client.post(url, json=body, headers={"Cache-Control": "no-cache"}).headers["x-cache"] == "BYPASS"


def test_per_model_opt_out(client: httpx.Client) -> None:
    body = {"inputs": {"I8": [1, 2], "FLAG": [True], "TEXT": ["ab", "c"], "F16": [0.5, 0.25], "OPT": [1.0]}}
    for _ in range(2):
        r = client.post("/v1/models/typed/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-cache"] == "BYPASS"
    assert r.json()["outputs"] == {"SUM": [5.75], "TEXT_OUT": ["AB", "C"]}


def test_versions_are_served_and_cached_apart(client: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [[1.5, -2.0]]}}
    v1 = client.post("/v1/models/versioned_fp32/versions/1/infer", json=body)
    v2 = client.post("/v1/models/versioned_fp32/versions/2/infer", json=body)
    assert v1.json()["outputs"]["OUTPUT0"] == [[1.5, -2.0]] and v1.json()["model_version"] == "1"
    assert v2.json()["outputs"]["OUTPUT0"] == [[3.0, -4.0]] and v2.json()["model_version"] == "2"
    latest = client.post("/v1/models/versioned_fp32/infer", json=body)
    assert latest.json()["model_version"] == "2"
    assert latest.json()["outputs"]["OUTPUT0"] == [[3.0, -4.0]]
    again_v1 = client.post("/v1/models/versioned_fp32/versions/1/infer", json=body)
    assert again_v1.headers["x-cache"] == "HIT" and again_v1.json() == v1.json()
    missing = client.post("/v1/models/versioned_fp32/versions/3/infer", json=body)
    assert missing.status_code == 404


def _success_count(triton: EmbeddedTriton, model: str) -> int:
    stats = httpx.get(f"{triton.http_url}/v2/models/{model}/stats").json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def test_single_flight_makes_one_triton_call(gateway_url: str, triton: EmbeddedTriton) -> None:
    # Long enough that all twelve requests reach the gateway while the first one's call is in flight, also
    # on a busy 2-core machine (at 0.4 s a late request once missed the flight and made a second call).
    delay = round(random.uniform(1.0, 1.1), 6)
    body = {"inputs": {"DELAY_S": [[delay]]}}
    before = _success_count(triton, "sleep_fp32")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as c:
            return await asyncio.gather(
                *(c.post("/v1/models/sleep_fp32/infer", json=body) for _ in range(12))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["outputs"]["SLEPT_S"][0][0] == pytest.approx(delay) for r in responses)
    assert _success_count(triton, "sleep_fp32") - before == 1


def test_upstream_rejection_is_502(client: httpx.Client) -> None:
    r = client.post("/v1/models/reject_fp32/infer", json={"inputs": {"INPUT0": [[-1.0]]}})
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "triton_error" and "negative values refused" in err["message"]
    ok = client.post("/v1/models/reject_fp32/infer", json={"inputs": {"INPUT0": [[1.0]]}})
    assert ok.status_code == 200


def test_deadline_is_504_and_quick(start_gateway) -> None:  # type: ignore[no-untyped-def]
    with start_gateway(triton_timeout_s=0.5) as url:
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/models/sleep_fp32/infer", json={"inputs": {"DELAY_S": [[3.0]]}}, timeout=30)
        elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "triton_timeout"
    assert elapsed < 2.0
