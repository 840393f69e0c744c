"""Keys, limits and tenants (issue 12) against the real Triton and Redis: 401 without or with a bad key
(HTTP, hot path, WebSocket), admin routes, 429 with Retry-After per key, one limit shared by two
gateways, revocation within the bound, WebSocket tickets, Redis down (fail closed), tier priority and
timeout reaching Triton, and `tgw keys` from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.auth.admin import NewKey, create_key
from app.auth.principal import TooManyRequests, Unauthorized
from app.auth.runtime import build_auth, stop_auth
from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from app.settings import Settings
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.jobs_helpers import wait_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PEPPER = "test-pepper-7f3a9c1e5b2d8046af1c93e7d52b08e4c6a1f9d3b7e20c58"
ADMIN = "test-admin-4e8b1d6f0a3c9e2b7d5f1a8c3e6b0d9f2a7c4e1b8d5f3a06"
INFER = "/v1/models/identity_fp32/infer"
ROOT = Path(__file__).resolve().parents[2]


def auth_settings(triton: EmbeddedTriton, redis_url: str, **extra: object) -> dict[str, object]:
    return {
        "triton_url": triton.grpc_url, "triton_http_url": triton.http_url, "redis_url": redis_url,
        "auth": "required", "key_pepper": PEPPER, "admin_token": ADMIN, "auth_key_cache_s": 1.0,
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def auth_url(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[str]:
    with running_gateway(**auth_settings(triton, redis_server.url)) as url:
        yield url


def make_key(base: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("name", f"t-{time.time_ns()}")
    r = httpx.post(f"{base}/v1/admin/keys", json=spec, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def body(x: float = 1.0) -> dict[str, Any]:
    return {"inputs": {"INPUT0": [[x, 2.0]]}}


def test_no_key_or_bad_key_is_401_everywhere(auth_url: str) -> None:
    with httpx.Client(base_url=auth_url, timeout=10) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for path, method in ((INFER, "POST"), ("/v2/models/identity_fp32/infer", "POST"),
                             ("/v1/models", "GET"), ("/v1/models/identity_fp32/jobs", "POST")):  # fmt: skip
            r = c.request(method, path, json=body())
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers.get("x-request-id")
        bad = "tgw_0123456789ab_" + "A" * 43
        r = c.post(INFER, json=body(), headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert bad not in r.text and "AAAA" not in r.text  # never echoes the secret
        assert c.post(INFER, json=body(), headers={"X-API-Key": "nonsense"}).status_code == 401
        r = c.post("/v2/models/identity_fp32/infer", json={"inputs": []})
        assert r.status_code == 401 and "error" in r.json()  # KServe error shape under /v2
    ws_url = auth_url.replace("http", "ws", 1)
    for headers in ({}, {"X-API-Key": "tgw_0123456789ab_" + "B" * 43}):
        with pytest.raises(InvalidStatus) as info:
            connect(f"{ws_url}/v1/ws", additional_headers=headers, open_timeout=10)
        assert info.value.response.status_code == 401


def test_key_works_admin_routes_need_admin(auth_url: str) -> None:
    key = make_key(auth_url, tier="high", tenant="acme")
    with httpx.Client(base_url=auth_url, timeout=10) as c:
        r = c.post(INFER, json=body(3.0), headers=bearer(key))
        assert r.status_code == 200, r.text
        r = c.post(INFER, json=body(3.0), headers={"X-API-Key": key["key"]})
        assert r.status_code == 200 and r.headers["x-cache"] == "HIT"
        me = c.get("/v1/auth/whoami", headers=bearer(key)).json()
        assert me["tenant"] == "acme" and me["tier"] == "high" and me["priority"] == 1
        assert me["key_id"] == key["id"] and key["key"].startswith(f"tgw_{key['id']}_")
        for path in ("/metrics", "/v1/admin/keys", "/v1/jobs/stats"):
            assert c.get(path, headers=bearer(key)).status_code == 403, path
            assert c.get(path, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200, path
        listed = c.get("/v1/admin/keys", headers={"X-API-Key": ADMIN}).json()["keys"]
        mine = [k for k in listed if k["id"] == key["id"]]
        assert mine and "key" not in mine[0] and "digest" not in mine[0]


def test_rate_limit_429_per_key_and_other_key_unaffected(auth_url: str) -> None:
    slow = make_key(auth_url, rps=0.5, burst=3, concurrency=0)
    other = make_key(auth_url, rps=50, burst=50)
    with httpx.Client(base_url=auth_url, timeout=10) as c:
        codes = [c.post(INFER, json=body(), headers=bearer(slow)).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429], codes
        r = c.post(INFER, json=body(), headers=bearer(slow))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 2
        assert r.headers["ratelimit-policy"] == '"burst";q=3;w=6'
        assert r.headers["ratelimit"].startswith('"burst";r=0;t=')
        assert all(c.post(INFER, json=body(), headers=bearer(other)).status_code == 200 for _ in range(5))


def test_two_gateways_share_one_limit(triton: EmbeddedTriton, redis_server: EmbeddedRedis,
                                      auth_url: str) -> None:  # fmt: skip
    key = make_key(auth_url, rps=1, burst=5, concurrency=0)
    with running_gateway(**auth_settings(triton, redis_server.url)) as second:
        start = time.monotonic()
        admitted = 0
        with httpx.Client(timeout=10) as c:
            for i in range(20):
                base = auth_url if i % 2 else second
                admitted += c.post(base + INFER, json=body(), headers=bearer(key)).status_code == 200
        elapsed = time.monotonic() - start
    # GCRA: at most burst + rate * elapsed over both replicas together
    assert 5 <= admitted <= 5 + int(elapsed * 1) + 1, (admitted, elapsed)


def test_concurrency_limit(auth_url: str) -> None:
    key = make_key(auth_url, rps=100, burst=100, concurrency=1)
    slow = {"inputs": {"DELAY_S": [[0.8]]}}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, auth_url + "/v1/models/sleep_fp32/infer", json=slow,
                            headers={**bearer(key), "Cache-Control": "no-cache, no-store"}, timeout=10)  # fmt: skip
        time.sleep(0.3)  # a real wait: the slow request holds the key's one slot (nothing outside shows it)
        second = httpx.post(auth_url + INFER, json=body(), headers=bearer(key), timeout=10)
        assert second.status_code == 429 and second.json()["error"]["details"]["limit"] == "concurrency"
        assert first.result().status_code == 200
    assert httpx.post(auth_url + INFER, json=body(), headers=bearer(key), timeout=10).status_code == 200


def test_daily_quota(auth_url: str) -> None:
    key = make_key(auth_url, daily_quota=2)
    codes = [httpx.post(auth_url + INFER, json=body(), headers=bearer(key)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = httpx.post(auth_url + INFER, json=body(), headers=bearer(key))
    assert '"daily";q=2;w=86400' in r.headers["ratelimit-policy"] and int(r.headers["retry-after"]) > 0


def test_revoked_key_stops_within_the_cache_bound(auth_url: str) -> None:
    key = make_key(auth_url)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=auth_url, timeout=10) as c:
        assert c.post(INFER, json=body(), headers=bearer(key)).status_code == 200
        assert c.delete(f"/v1/admin/keys/{key['id']}", headers=admin).status_code == 200
        eventually(lambda: c.post(INFER, json=body(), headers=bearer(key)).status_code != 200, 1.5, 0.05,
                   "still accepted past TGW_AUTH_KEY_CACHE_S=1")  # fmt: skip
        assert c.delete(f"/v1/admin/keys/{key['id']}", headers=admin).status_code == 404


def test_rotate_gives_a_new_secret(auth_url: str) -> None:
    key = make_key(auth_url)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=auth_url, timeout=10) as c:
        rotated = c.post(f"/v1/admin/keys/{key['id']}/rotate", headers=admin).json()
        assert rotated["id"] == key["id"] and rotated["key"] != key["key"]
        assert c.post(INFER, json=body(), headers=bearer(rotated)).status_code == 200
        time.sleep(1.1)  # a real wait: past the 1 s key cache, the old secret is checked again
        assert c.post(INFER, json=body(), headers=bearer(key)).status_code == 401


def test_websocket_header_ticket_and_cap(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> None:
    with running_gateway(**auth_settings(triton, redis_server.url, auth_ws_per_key=2)) as url:
        key = make_key(url, rps=100, burst=100)
        ws_url = url.replace("http", "ws", 1) + "/v1/ws"
        with connect(ws_url, additional_headers=bearer(key), open_timeout=10) as ws:
            ws.send(json.dumps({"op": "ping", "ref": "a"}))
            assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "ref": "a"}
            ticket = httpx.post(url + "/v1/ws/tickets", headers=bearer(key)).json()["ticket"]
            assert ticket.startswith("tgwt_")
            with connect(f"{ws_url}?ticket={ticket}", open_timeout=10) as ws2:
                ws2.send(json.dumps({"op": "ping"}))
                assert json.loads(ws2.recv(timeout=10))["type"] == "pong"
                with pytest.raises(InvalidStatus) as capped:  # a third socket for the key
                    connect(ws_url, additional_headers=bearer(key), open_timeout=10)
                assert capped.value.response.status_code == 429
            with pytest.raises(InvalidStatus) as reused:  # single use
                connect(f"{ws_url}?ticket={ticket}", open_timeout=10)
            assert reused.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as anon:  # a ticket endpoint needs a key
            connect(f"{ws_url}?ticket=tgwt_" + "C" * 43, open_timeout=10)
        assert anon.value.response.status_code == 401


def test_websocket_frames_count_against_the_rate(auth_url: str) -> None:
    key = make_key(auth_url, rps=0.2, burst=4)
    with connect(auth_url.replace("http", "ws", 1) + "/v1/ws", additional_headers=bearer(key),
                 open_timeout=10) as ws:  # fmt: skip
        frames = []
        for i in range(5):
            ws.send(json.dumps({"op": "ping", "ref": i}))
            frames.append(json.loads(ws.recv(timeout=10)))
    # the handshake took one, three pings pass, then the rate refuses
    assert [f["type"] for f in frames] == ["pong", "pong", "pong", "error", "error"], frames
    assert (
        frames[3]["error"]["code"] == "rate_limited" and frames[3]["error"]["details"]["retry_after_s"] >= 1
    )


def test_redis_down_verified_keys_continue_unknown_refused(triton: EmbeddedTriton,
                                                           tmp_path: Path) -> None:  # fmt: skip
    redis = EmbeddedRedis(free_port(), tmp_path / "redis")
    redis.start()
    try:
        with running_gateway(**auth_settings(triton, redis.url, auth_stale_key_s=60)) as url:
            known, unknown = make_key(url, rps=0.5, burst=2), make_key(url)
            assert httpx.post(url + INFER, json=body(), headers=bearer(known)).status_code == 200
            redis.stop()
            time.sleep(1.1)  # past the 1 s fresh cache: verification now needs Redis
            codes = [httpx.post(url + INFER, json=body(), headers=bearer(known), timeout=10).status_code
                     for _ in range(4)]  # fmt: skip
            assert codes == [200, 200, 429, 429], codes  # a fresh local per-process limit (burst 2)
            r = httpx.post(url + INFER, json=body(), headers=bearer(unknown), timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"], r.text  # fail closed
    finally:
        redis.stop()


def test_tier_priority_and_timeout_reach_triton(triton: EmbeddedTriton, redis_server: EmbeddedRedis,
                                                auth_url: str) -> None:  # fmt: skip
    """priority_fp32 has one instance; priority 2 (standard) may queue 200 ms, then Triton rejects it;
    priority 1 (high) waits. A request queued behind a 1 s one tells the two apart."""
    high, standard = make_key(auth_url, tier="high"), make_key(auth_url, tier="standard")
    url = auth_url + "/v1/models/priority_fp32/infer"
    nocache = {"Cache-Control": "no-cache, no-store"}

    def queued_behind_busy(key: dict[str, Any]) -> httpx.Response:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(httpx.post, url, json={"inputs": {"DELAY_S": [[1.0]]}},
                               headers={**bearer(high), **nocache}, timeout=20)  # fmt: skip
            time.sleep(0.3)  # a real wait: the busy request is on Triton's one instance first
            r = httpx.post(url, json={"inputs": {"DELAY_S": [[0.0]]}}, headers={**bearer(key), **nocache},
                           timeout=20)  # fmt: skip
            assert busy.result().status_code == 200
            return r

    r = queued_behind_busy(high)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"]["TIMEOUT_US"][0][0] == 60_000_000  # the high tier's bound, 60 s
    r = queued_behind_busy(standard)
    assert r.status_code >= 500 and "timeout" in r.text.lower(), r.text  # shed by Triton's queue policy


def test_tgw_keys_cli(redis_server: EmbeddedRedis) -> None:
    env = {**os.environ, "TGW_REDIS_URL": redis_server.url, "TGW_KEY_PEPPER": PEPPER}

    def tgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    made = tgw("create", "--name", "cli-test", "--tier", "high", "--rps", "5", "--burst", "7",
               "--concurrency", "3", "--daily-quota", "1000")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["key"].startswith("tgw_") and len(created["key"]) > 50
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", created["created"]), created  # as jobs'
    assert (created["tier"], created["rps"], created["burst"], created["concurrency"],
            created["daily_quota"], created["tenant"]) == ("high", 5.0, 7, 3, 1000, "cli-test")  # fmt: skip
    listed = json.loads(tgw("list").stdout)
    assert any(k["id"] == created["id"] for k in listed) and created["key"] not in json.dumps(listed)
    rotated = json.loads(tgw("rotate", created["id"]).stdout)
    assert rotated["id"] == created["id"] and rotated["key"] != created["key"]
    assert json.loads(tgw("revoke", created["id"]).stdout) == {"id": created["id"], "revoked": True}
    assert tgw("revoke", created["id"]).returncode == 1
    bad = tgw("create", "--name", "x", "--tier", "platinum")
    assert bad.returncode == 2 and "tier" in bad.stderr


def test_auth_off_on_public_address_refuses_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    env.update({"TGW_HOST": "0.0.0.0", "TGW_AUTH": "off", "TGW_STARTUP_WAIT_S": "0"})
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "TGW_AUTH" in out.stderr


def test_cache_scope_tenant_keeps_answers_apart(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> None:
    with running_gateway(**auth_settings(triton, redis_server.url, cache_scope="tenant")) as url:
        a1, a2 = make_key(url, tenant="scope-a"), make_key(url, tenant="scope-a")
        b = make_key(url, tenant="scope-b")
        payload = {"inputs": {"INPUT0": [[float(time.time_ns() % 100_000), 7.0]]}}
        seen = [
            httpx.post(url + INFER, json=payload, headers=bearer(k)).headers["x-cache"]
            for k in (a1, a2, b, b)
        ]
        assert seen == ["MISS", "HIT", "MISS", "HIT"]  # same tenant shares, another tenant does not


def test_tenant_cannot_see_another_tenants_job(auth_url: str) -> None:
    a, b = make_key(auth_url, tenant="tenant-a"), make_key(auth_url, tenant="tenant-b")
    with httpx.Client(base_url=auth_url, timeout=10) as c:
        r = c.post(
            "/v1/models/identity_fp32/jobs", json=body(float(time.time_ns() % 10_000)), headers=bearer(a)
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert c.get(f"/v1/jobs/{job_id}", headers=bearer(a)).status_code == 200
        theirs = c.get(f"/v1/jobs/{job_id}", headers=bearer(b))
        missing = c.get("/v1/jobs/no-such-job-id", headers=bearer(b))
        assert theirs.status_code == missing.status_code == 404
        assert c.delete(f"/v1/jobs/{job_id}", headers=bearer(b)).status_code == 404
    ws_url = auth_url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/ws"
    with connect(ws_url, additional_headers=bearer(b), open_timeout=10) as ws:
        frame = json.loads(ws.recv(timeout=10))
    assert frame["type"] == "error" and frame["error"]["code"] == "not_found"


def test_header_mapping_entry_point_for_other_front_doors(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    """``AuthStage.admit_headers`` (gRPC metadata): the same keys, limits and refusals without a scope."""

    async def run() -> None:
        stage = build_auth(Settings(**auth_settings(triton, redis_server.url)))  # type: ignore[arg-type]
        try:
            assert stage.keys is not None
            spec = NewKey(name="grpc", rps=0.1, burst=1)
            made = await create_key(stage.keys, stage.settings, set(stage.tiers), spec)
            p = await stage.admit_headers({"authorization": f"Bearer {made['key']}"}, "10.0.0.1")
            assert p.key_id == made["id"] and p.tenant == "grpc"
            stage.release(p)
            with pytest.raises(TooManyRequests) as limited:  # burst of 1 used
                await stage.admit_headers({"x-api-key": made["key"]}, "10.0.0.1")
            assert limited.value.headers["Retry-After"]
            with pytest.raises(Unauthorized):
                await stage.admit_headers({}, "10.0.0.2")
        finally:
            await stop_auth(stage)

    asyncio.run(run())


def test_failed_authentications_per_address(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> None:
    settings = auth_settings(triton, redis_server.url, auth_failed_per_minute=3, auth_key_cache_s=30)
    with running_gateway(**settings) as url:
        good = make_key(url)
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.post(INFER, json=body(), headers=bearer(good)).status_code == 200  # verified: cached
            guesses = [c.post(INFER, json=body(), headers={"X-API-Key": f"tgw_{i:012x}_" + "G" * 43})
                       for i in range(5)]  # fmt: skip
            assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
            assert 50 <= int(guesses[-1].headers["retry-after"]) <= 60
            assert c.post(INFER, json=body()).status_code == 429  # no key either
            assert (
                c.post(INFER, json=body(), headers=bearer(good)).status_code == 200
            )  # a known key still works


def test_websocket_infer_gets_the_keys_tier(auth_url: str) -> None:
    standard = make_key(auth_url, tier="standard")
    ws_url = auth_url.replace("http", "ws", 1) + "/v1/ws"
    frame = {"op": "infer", "ref": "p", "model": "priority_fp32", "inputs": {"DELAY_S": [[0.0]]},
             "parameters": {"tag": str(time.time_ns())}}  # fmt: skip
    with connect(ws_url, additional_headers=bearer(standard), open_timeout=10) as ws:
        ws.send(json.dumps(frame))
        answer = json.loads(ws.recv(timeout=20))
    assert answer["type"] == "result", answer
    assert answer["result"]["outputs"]["TIMEOUT_US"][0][0] == 30_000_000  # the standard tier's bound, 30 s


def test_jobs_run_with_the_submitting_keys_tier(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> None:
    """The tier travels with the job: the worker's Triton call carries the submitter's timeout bound."""
    settings = auth_settings(triton, redis_server.url, worker_in_process=True)
    with running_gateway(**settings) as url:
        for tier, bound in (("high", 60_000_000), ("standard", 30_000_000)):
            c = httpx.Client(base_url=url, timeout=20, headers=bearer(make_key(url, tier=tier)))
            body = {"inputs": {"DELAY_S": [[0.0]]}, "parameters": {"tag": f"{tier}-{time.time_ns()}"}}
            r = c.post("/v1/models/priority_fp32/jobs", json=body)
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["id"])
            c.close()
            assert job["status"] == "succeeded", job
            assert job["result"]["outputs"]["TIMEOUT_US"][0][0] == bound, (tier, job)
