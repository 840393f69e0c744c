"""Usage per tenant (issue 24) against the real Triton and Redis: known traffic of two tenants through
every door (/v1, /v2, gRPC unary and stream, /v1/ws, a job, an SSE stream), with cache hits, a
micro-batched miss and errors, then the exact counts per tenant and door from ``/v1/admin/usage``; compute
time matching Triton's own statistics; a monthly budget past its soft threshold (``Usage-Warning``) and at
its hard cap, refused on a second replica within the flush interval; ``/v1/usage`` and CSV."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from standardwebhooks import Webhook
from tritonclient.grpc import service_pb2, service_pb2_grpc
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.eventually import eventually
from tests.gateway_server import GatewayAddresses, running_gateway_addresses
from tests.processes import tgw_serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PEPPER = "test-pepper-5c2e8a1f7b3d9046af1c93e7d52b08e4c6a1f9d3b7e20c58"
ADMIN = "test-admin-9a4b1d6f0a3c9e2b7d5f1a8c3e6b0d9f2a7c4e1b8d5f3a06"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"usage-secret-0123456789abcdef").decode()
RECEIVER_PORT = free_port()


def settings(triton: EmbeddedTriton, redis: EmbeddedRedis, **extra: object) -> dict[str, object]:
    return {
        "triton_url": triton.grpc_url, "triton_http_url": triton.http_url, "redis_url": redis.url,
        "auth": "required", "key_pepper": PEPPER, "admin_token": ADMIN, "auth_key_cache_s": 1.0,
        "job_worker_in_process": True, "webhook_allow_private": True, "webhook_secret": SECRET,
        "webhook_allowed_ports": [RECEIVER_PORT], **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def gw(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[GatewayAddresses]:
    with running_gateway_addresses(**settings(triton, redis_server)) as addresses:
        yield addresses


def make_key(base: str, tenant: str, **spec: Any) -> dict[str, str]:
    r = httpx.post(f"{base}/v1/admin/keys", json={"name": f"k-{time.time_ns()}", "tenant": tenant,
                                                   "rps": 1000, "burst": 1000, **spec}, headers=ADMIN_H)  # fmt: skip
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}", "id": r.json()["id"]}


def auth(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


def usage(base: str, tenant: str, group_by: str, **params: str) -> dict[tuple[str, ...], dict[str, Any]]:
    r = httpx.get(f"{base}/v1/admin/usage", params={"tenant": tenant, "group_by": group_by, **params},
                  headers=ADMIN_H)  # fmt: skip
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    column = {"door": "door", "model": "model", "key": "key_id", "tenant": "tenant", "outcome": "outcome"}[
        group_by
    ]
    return {(row[column],): row for row in rows}


def v1(base: str, key: dict[str, str], model: str, inputs: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/models/{model}/infer", json={"inputs": inputs},
                      headers={**auth(key), **headers}, timeout=30)  # fmt: skip


def grpc_infer(addr: str, key: dict[str, str], value: np.ndarray) -> None:
    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=list(value.shape))
    req.raw_input_contents.append(value.tobytes())
    with grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(req, metadata=[("authorization", key["Authorization"])], timeout=30)


def grpc_stream(addr: str, key: dict[str, str], count: int) -> int:
    req = service_pb2.ModelInferRequest(model_name="repeat_decoupled")
    req.inputs.add(name="COUNT", datatype="INT32", shape=[1])
    req.raw_input_contents.append(np.array([count], dtype=np.int32).tobytes())
    with grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(
            iter([req]), metadata=[("authorization", key["Authorization"])], timeout=30
        )
        responses = list(call)
    assert not any(r.error_message for r in responses)
    return len(responses)


def ws_infer(base: str, key: dict[str, str], inputs: dict[str, Any]) -> dict[str, Any]:
    url = base.replace("http", "ws", 1) + "/v1/ws"
    with connect(url, additional_headers=auth(key), open_timeout=10) as socket:
        socket.send(json.dumps({"op": "infer", "ref": "r1", "model": "identity_fp32", "inputs": inputs}))
        while True:
            answer: dict[str, Any] = json.loads(socket.recv(timeout=30))
            if answer["type"] in ("result", "error"):
                return answer


def job(base: str, key: dict[str, str], inputs: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/models/identity_fp32/jobs", json={"inputs": inputs}, headers=auth(key))
    assert r.status_code == 202, r.text
    done: dict[str, Any] = {}

    def finished() -> bool:
        done.update(httpx.get(f"{base}/v1/jobs/{r.json()['id']}", headers=auth(key)).json())
        return done["status"] in ("succeeded", "failed")

    eventually(finished, 30, 0.05, "the job did not finish")
    return done


def test_exact_counts_per_tenant_and_door(gw: GatewayAddresses) -> None:
    run = time.time_ns()
    tenant_a, tenant_b = f"ua{run}", f"ub{run}"
    a, b = make_key(gw.http, tenant_a), make_key(gw.http, tenant_b)
    base = float(run % 100_000)  # inputs nobody sent before: first a miss, then a hit
    # tenant A: /v1 miss (2 rows), the same again (a hit), a model error (negative input), an SSE stream
    one = {"INPUT0": [[base, 1.0], [base, 2.0]]}
    assert v1(gw.http, a, "identity_fp32", one).headers["x-cache"] == "MISS"
    assert v1(gw.http, a, "identity_fp32", one).headers["x-cache"] == "HIT"
    assert v1(gw.http, a, "reject_fp32", {"INPUT0": [[-1.0]]}).status_code >= 400
    r = httpx.post(f"{gw.http}/v1/models/repeat_decoupled/stream", json={"inputs": {"COUNT": [3]}},
                   headers={**auth(a), "Cache-Control": "no-store, no-cache"}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.text.count("data:") >= 3
    # tenant A: gRPC unary (1 row), /v1/ws frame (1 row)
    grpc_infer(gw.grpc, a, np.array([[base + 0.5, 3.0]], dtype=np.float32))
    assert ws_infer(gw.http, a, {"INPUT0": [[base + 0.25, 4.0]]})["type"] == "result"
    # tenant B: /v2 (3 rows), gRPC stream (2 responses + the final flag), a job, 4 concurrent misses (batched)
    v2 = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [3, 1], "data": [base, base + 1, base + 2]}
        ]
    }
    assert httpx.post(f"{gw.http}/v2/models/identity_fp32/infer", json=v2, headers=auth(b)).status_code == 200
    grpc_stream(gw.grpc, b, 2)
    assert job(gw.http, b, {"INPUT0": [[base + 0.75, 5.0]]})["status"] == "succeeded"
    threads = [
        threading.Thread(target=v1, args=(gw.http, b, "identity_fp32", {"INPUT0": [[base + 10 + i, 1.0]]}))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def counted() -> bool:
        rows_a, rows_b = usage(gw.http, tenant_a, "door"), usage(gw.http, tenant_b, "door")
        return (
            sum(r["requests"] for r in rows_a.values()) == 6
            and sum(r["requests"] for r in rows_b.values()) == 7
        )

    eventually(counted, 5, 0.1, "usage not flushed")
    doors_a, doors_b = usage(gw.http, tenant_a, "door"), usage(gw.http, tenant_b, "door")
    v1a = doors_a[("v1",)]
    # rows: 2 + 2 + 1 (reject_fp32) + 1 (the stream: a model without a batch dimension); the stream
    # bypassed the cache (no-cache)
    assert (v1a["requests"], v1a["rows"], v1a["hits"], v1a["misses"]) == (4, 6, 1, 2)
    assert v1a["bytes_in"] == 2 * 16 + 4 + 4  # two 2x2 FP32 requests, one 1x1, COUNT (INT32)
    assert v1a["bytes_out"] == 2 * 16 + 3 * 4  # the hit's answer counts too; the stream's 3 INT32
    outcomes_a = usage(gw.http, tenant_a, "outcome")
    assert outcomes_a[("502",)]["requests"] == 1  # the model refused the negative input (triton_error)
    assert outcomes_a[("502",)]["compute_s"] == 0 or outcomes_a[("502",)]["compute_s"] < 0.5
    assert v1a["responses"] == 4  # the SSE stream's 3 responses and Triton's final flag
    assert (doors_a[("grpc",)]["requests"], doors_a[("grpc",)]["rows"]) == (1, 1)
    assert (doors_a[("ws",)]["requests"], doors_a[("ws",)]["rows"], doors_a[("ws",)]["bytes_out"]) == (
        1,
        1,
        8,
    )
    assert set(doors_a) == {("v1",), ("grpc",), ("ws",)}
    assert (doors_b[("v2",)]["requests"], doors_b[("v2",)]["rows"], doors_b[("v2",)]["bytes_in"]) == (
        1,
        3,
        12,
    )
    assert doors_b[("grpc_stream",)]["requests"] == 1 and doors_b[("grpc_stream",)]["responses"] >= 2
    assert doors_b[("job",)]["requests"] == 1 and doors_b[("job",)]["rows"] == 1
    assert usage(gw.http, tenant_b, "key", door="job")[(b["id"],)]["requests"] == 1  # the submitting key
    assert doors_b[("v1",)]["requests"] == 4 and doors_b[("v1",)]["misses"] == 4
    assert sum(r["errors"] for r in doors_b.values()) == 0
    models_a = usage(gw.http, tenant_a, "model")
    assert models_a[("identity_fp32",)]["saved_s"] > 0  # the hit: what the miss cost
    assert models_a[("identity_fp32",)]["compute_s"] > 0
    # the micro-batched misses: their call's time split by rows, summing to about one call
    assert doors_b[("v1",)]["compute_s"] > 0
    # per key: the same as per tenant here (one key each)
    assert usage(gw.http, tenant_a, "key")[(a["id"],)]["requests"] == 6
    # CSV
    r = httpx.get(f"{gw.http}/v1/admin/usage", params={"tenant": tenant_a, "group_by": "door"},
                  headers={**ADMIN_H, "Accept": "text/csv"})  # fmt: skip
    assert r.headers["content-type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("tenant,door,requests") and len(lines) == 4
    # the caller's own month
    mine = httpx.get(f"{gw.http}/v1/usage", headers=auth(a)).json()
    assert mine["tenant"]["name"] == tenant_a and mine["tenant"]["usage"]["requests"] == 6
    assert mine["key"]["id"] == a["id"] and mine["key"]["usage"]["requests"] == 6


def _triton_compute(triton: EmbeddedTriton, model: str) -> tuple[int, float]:
    """(successful requests, compute_input + compute_infer + compute_output seconds) of Triton's own stats."""
    stats = httpx.get(f"{triton.http_url}/v2/models/{model}/stats").json()["model_stats"]
    count, total = 0, 0
    for entry in stats:
        s = entry["inference_stats"]
        count += s["success"]["count"]
        total += s["compute_input"]["ns"] + s["compute_infer"]["ns"] + s["compute_output"]["ns"]
    return count, total / 1e9


def test_compute_time_matches_tritons_statistics(gw: GatewayAddresses, triton: EmbeddedTriton) -> None:
    tenant = f"uc{time.time_ns()}"
    key = make_key(gw.http, tenant)
    count, before = _triton_compute(triton, "sleep_fp32")
    delays = (0.1, 0.15, 0.1, 0.12)
    for delay in delays:
        r = v1(gw.http, key, "sleep_fp32", {"DELAY_S": [[delay]]}, **{"Cache-Control": "no-store, no-cache"})
        assert r.status_code == 200, r.text
    eventually(lambda: _triton_compute(triton, "sleep_fp32")[0] == count + len(delays), 5, 0.05,
               "Triton's statistics did not count the requests (another test using sleep_fp32?)")  # fmt: skip
    triton_s = _triton_compute(triton, "sleep_fp32")[1] - before

    def metered() -> dict[str, Any]:
        return usage(gw.http, tenant, "model").get(("sleep_fp32",), {"requests": 0})

    eventually(lambda: metered()["requests"] == len(delays), 5, 0.1, "usage not flushed")
    compute = metered()["compute_s"]
    assert triton_s >= sum(delays)
    assert abs(compute - triton_s) / triton_s < 0.05, (compute, triton_s)


def test_budget_soft_warning_and_hard_cap_on_two_replicas(
    gw: GatewayAddresses, triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    tenant = f"ub{time.time_ns()}"
    key = make_key(gw.http, tenant, budget={"requests": 5, "soft": 0.6})
    one = {"INPUT0": [[1.0, 2.0]]}
    with running_gateway_addresses(**settings(triton, redis_server)) as second:
        assert v1(second.http, key, "identity_fp32", one).status_code == 200  # replica 2 serves the tenant
        eventually(lambda: httpx.get(f"{gw.http}/v1/usage", headers=auth(key)).json()["key"]["usage"]["requests"]
                   == 1, 3, 0.05, "replica 2 did not flush")  # fmt: skip
        time.sleep(1.1)  # replica 1's view of the month: refreshed by its next flush (one interval)
        warned = []
        for _ in range(4):
            r = v1(gw.http, key, "identity_fp32", one)
            assert r.status_code == 200, r.text
            warned.append(r.headers.get("usage-warning"))
        assert warned[:2] == [None, None] and warned[2] is not None and "metric=requests" in warned[2]
        refused = v1(gw.http, key, "identity_fp32", one)
        capped_at = time.monotonic()
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "budget_exhausted"
        details = error["details"]
        assert (details["scope"], details["metric"], details["limit"]) == ("key", "requests", 5)
        assert details["resets_at"].endswith("-01T00:00:00Z") and int(refused.headers["retry-after"]) > 0
        while v1(second.http, key, "identity_fp32", one).status_code != 429:
            assert time.monotonic() - capped_at < 1.0, "replica 2 still serves a capped key after 1 s"
            time.sleep(0.02)
        # a tenant budget: set through the admin API, enforced for every key of the tenant
        other = make_key(gw.http, tenant)
        r = httpx.put(f"{gw.http}/v1/admin/usage/tenants/{tenant}", json={"budget": {"requests": 6}},
                      headers=ADMIN_H)  # fmt: skip
        assert r.status_code == 200 and r.json()["budget"]["requests"] == 6

        def tenant_capped() -> bool:
            answer = v1(second.http, other, "identity_fp32", one)
            return answer.status_code == 429 and answer.json()["error"]["details"]["scope"] == "tenant"

        eventually(tenant_capped, 3, 0.05, "the tenant budget was not enforced")


def test_tgw_usage_and_budget_cli(gw: GatewayAddresses, redis_server: EmbeddedRedis) -> None:
    env = {**os.environ, "TGW_REDIS_URL": redis_server.url, "TGW_KEY_PEPPER": PEPPER, "COLUMNS": "160"}

    def tgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    tenant = f"ucli{time.time_ns()}"
    made = tgw("keys", "create", "--name", "cli", "--tenant", tenant, "--budget", "requests=100,compute_s=60")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["budget"] == {"requests": 100, "rows": 0, "compute_s": 60, "soft": 0.8}
    bearer = {"Authorization": f"Bearer {key['key']}", "id": key["id"]}
    for i in range(3):
        assert v1(gw.http, bearer, "identity_fp32", {"INPUT0": [[float(i), 1.0]]}).status_code == 200
    eventually(lambda: usage(gw.http, tenant, "tenant").get((tenant,), {}).get("requests") == 3, 5, 0.1,
               "usage not flushed")  # fmt: skip
    shown = tgw("usage", "--tenant", tenant, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert [(r["model"], r["requests"], r["rows"]) for r in json.loads(shown.stdout)] == [
        ("identity_fp32", 3, 3)
    ]
    table = tgw("usage", "--tenant", tenant)
    assert table.returncode == 0, table.stderr
    assert (
        "identity_fp32" in table.stdout
        and "requests per day" in table.stdout
        and "█" in table.stdout
        and "compute s" in table.stdout
    )
    updated = tgw("keys", "update", key["id"], "--budget", "requests=2")
    assert updated.returncode == 0 and json.loads(updated.stdout)["budget"]["requests"] == 2
    assert tgw("keys", "update", key["id"], "--budget", "tokens=5").returncode == 2
    budget = tgw("usage", "budget", tenant, "--requests", "1000", "--compute-s", "3600", "--soft", "0.9")
    assert budget.returncode == 0, budget.stderr
    assert json.loads(budget.stdout)["budget"] == {
        "requests": 1000,
        "rows": 0,
        "compute_s": 3600,
        "soft": 0.9,
    }
    assert json.loads(tgw("usage", "budget", tenant, "--clear").stdout)["budget"] is None


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_stopped_replica_loses_at_most_one_flush_interval(
    gw: GatewayAddresses, triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path: Path, stop: str
) -> None:
    """A ``tgw serve`` process answers requests for ~2.5 s, then is SIGKILLed (what it counted since its last
    flush is lost: at most the requests of the last ``TGW_USAGE_FLUSH_INTERVAL_S``) or SIGTERMed (its graceful
    stop flushes: nothing lost)."""
    env = {"TGW_TRITON_HTTP_URL": triton.http_url, "TGW_AUTH": "required", "TGW_KEY_PEPPER": PEPPER,
           "TGW_ADMIN_TOKEN": ADMIN, "TGW_LOG_LEVEL": "WARNING", "TGW_SHUTDOWN_DELAY_S": "0",
           "TGW_USAGE_FLUSH_INTERVAL_S": "1.0"}  # fmt: skip
    tenant = f"ukill{time.time_ns()}"
    key = make_key(gw.http, tenant)
    with tgw_serve(triton, redis_server.url, tmp_path / "serve.log", ready="/healthz", **env) as proc:
        answered: list[float] = []
        started = time.monotonic()
        with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
            while time.monotonic() - started < 2.5:
                r = client.post("/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[1.0, 2.0]]}})
                assert r.status_code == 200, r.text
                answered.append(time.monotonic())
        killed = time.monotonic()
        if stop == "SIGKILL":
            proc.signal(signal.SIGKILL)
        else:
            proc.stop(graceful=True)
        proc.proc.wait(timeout=30)
    time.sleep(0.2)
    metered = usage(gw.http, tenant, "tenant").get((tenant,), {"requests": 0})["requests"]
    if stop == "SIGTERM":
        assert metered == len(answered)
        return
    # what was answered in the last flush interval before the kill (and a flush's own time): may be lost
    last_interval = sum(1 for t in answered if t > killed - 1.0 - 0.25)
    print(f"usage SIGKILL: {len(answered)} answered, {metered} metered, {last_interval} in the last interval")
    assert len(answered) - last_interval <= metered <= len(answered), (metered, len(answered), last_interval)


def test_soft_threshold_sends_one_signed_usage_warning(gw: GatewayAddresses) -> None:
    calls: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", RECEIVER_PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tenant = f"uw{time.time_ns()}"
        key = make_key(gw.http, tenant)
        r = httpx.put(f"{gw.http}/v1/admin/usage/tenants/{tenant}", headers=ADMIN_H, json={
            "budget": {"requests": 4, "soft": 0.5}, "webhook_url": f"http://127.0.0.1:{RECEIVER_PORT}/usage",
        })  # fmt: skip
        assert r.status_code == 200, r.text
        warnings = [v1(gw.http, key, "identity_fp32", {"INPUT0": [[1.0, 2.0]]}).headers.get("usage-warning")
                    for _ in range(4)]  # fmt: skip
        assert (
            warnings[:2] == [None, None]
            and warnings[2] == f"tenant={tenant}; metric=requests; used=2; limit=4"
        )
        eventually(lambda: len(calls) == 1, 5, 0.05, "no usage.warning arrived")
        time.sleep(0.5)
        assert len(calls) == 1  # once per (scope, metric, month), though the 4th answer warned too
        headers, raw = calls[0]
        event = Webhook(SECRET).verify(raw, headers)
        assert event["type"] == "usage.warning" and headers["webhook-id"].startswith("msg_usage_")
        assert {k: event["data"][k] for k in ("tenant", "scope", "metric", "used", "limit", "soft")} == {
            "tenant": tenant, "scope": "tenant", "metric": "requests", "used": 2, "limit": 4, "soft": 0.5,
        }  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
