"""Jobs end to end with a worker in the gateway: poll, WebSockets (per job, multiplexed, after
completion), two replicas fanning out through Redis, dead letters, and signed webhooks with retries."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from app.services.jobs.store import DEAD
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import unique_row, wait_job

pytestmark = pytest.mark.integration

SECRET_OLD = "whsec_" + base64.b64encode(b"old-secret-0123456789abcdef").decode()
SECRET_NEW = "whsec_" + base64.b64encode(b"new-secret-0123456789abcdef").decode()
# Webhook receivers listen on these (TGW_WEBHOOK_ALLOWED_PORTS: only 80/443 and listed ports may be hit).
RECEIVER_PORTS = [free_port() for _ in range(4)]


@pytest.fixture(scope="module")
def worker_url(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[str]:
    with running_gateway(
        triton_url=triton.grpc_url, redis_url=redis_server.url, worker_in_process=True, job_claim_idle_s=1.0,
        job_max_attempts=2, ws_max_frame_bytes=4096, ws_max_in_flight=3, ws_heartbeat_s=0.5,
        webhook_allow_private=True, webhook_secret=f"{SECRET_NEW} {SECRET_OLD}", webhook_schedule_s="0.2,0.2,0.2",
        webhook_allowed_ports=RECEIVER_PORTS,
    ) as url:  # fmt: skip
        yield url


@pytest.fixture
def wc(worker_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker_url, timeout=30) as c:
        yield c


def frames_until_close(ws: Any, timeout: float = 15) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        for raw in ws:
            frame = json.loads(raw)
            if frame["type"] != "heartbeat":
                out.append(frame)
            assert time.monotonic() < deadline
    return out


def test_submit_poll_result_equals_sync_answer(wc: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [unique_row(), unique_row()]}}
    r = wc.post("/v1/models/identity_fp32/jobs", json=body)
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    job = wait_job(wc, r.json()["id"])
    assert job["status"] == "succeeded" and job["cache"] == "MISS" and job["attempts"] == 1
    assert job["started_at"] and job["finished_at"]
    sync = wc.post("/v1/models/identity_fp32/infer", json=body)
    assert sync.headers["x-cache"] == "HIT" and sync.json() == job["result"]
    v = wc.post("/v1/models/versioned_fp32/versions/1/jobs", json={"inputs": {"INPUT0": [unique_row(2)]}})
    assert wait_job(wc, v.json()["id"])["result"]["model_version"] == "1"


def test_job_websocket_before_and_after_completion(wc: httpx.Client) -> None:
    r = wc.post("/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[0.4 + time.time() % 1 / 1000]]}})
    job = r.json()
    with connect(job["ws_url"]) as ws:
        frames = frames_until_close(ws)
        assert ws.close_code == 1000
    statuses = [f["status"] for f in frames if f["type"] == "status"]
    assert statuses[-1] == "succeeded" and statuses[0] in ("queued", "running")
    assert frames[-1]["type"] == "result" and frames[-1]["job"]["status"] == "succeeded"
    # A client connecting after completion gets the result at once.
    with connect(job["ws_url"]) as ws:
        late = frames_until_close(ws, timeout=3)
        assert ws.close_code == 1000
    assert [f["type"] for f in late] == ["status", "result"]
    assert late[-1]["job"]["result"] == frames[-1]["job"]["result"]
    with connect(job["ws_url"].replace(job["id"], "unknown")) as ws:
        assert frames_until_close(ws)[0]["error"]["code"] == "not_found"
        assert ws.close_code == 4404


def test_multiplexed_websocket(wc: httpx.Client, worker_url: str) -> None:
    slow = wc.post(
        "/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[0.6 + time.time() % 1 / 1000]]}}
    )
    row = unique_row()
    with connect(worker_url.replace("http", "ws") + "/v1/ws") as ws:
        ws.send(json.dumps({"op": "subscribe", "job_id": slow.json()["id"]}))
        ws.send(
            json.dumps({"op": "infer", "ref": "a", "model": "identity_fp32", "inputs": {"INPUT0": [row]}})
        )
        ws.send("not json")
        ws.send(json.dumps({"op": "dance", "ref": "b"}))
        ws.send(
            json.dumps({"op": "infer", "ref": "c", "model": "identity_fp32", "inputs": {"NOPE": [[1.0]]}})
        )
        ws.send(
            json.dumps(
                {"op": "infer", "ref": "big", "model": "identity_fp32", "inputs": {"INPUT0": [[1.0] * 2000]}}
            )
        )
        ws.send(json.dumps({"op": "ping", "ref": "p"}))
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not any(f["type"] == "result" and f.get("job_id") for f in got):
            assert time.monotonic() < deadline, got
            got.append(json.loads(ws.recv(timeout=5)))
        # The socket is still usable after the bad frames.
        ws.send(
            json.dumps({"op": "infer", "ref": "d", "model": "identity_fp32", "inputs": {"INPUT0": [row]}})
        )
        while not any(f.get("ref") == "d" for f in got):
            got.append(json.loads(ws.recv(timeout=5)))
    by_ref = {f.get("ref"): f for f in got if f.get("ref")}
    assert by_ref["a"]["type"] == "result" and by_ref["a"]["result"]["outputs"]["OUTPUT0"] == [row]
    assert by_ref["b"]["error"]["code"] == "invalid_input"
    assert by_ref["c"]["error"]["code"] == "invalid_input"
    assert any(
        f["type"] == "error"
        and f["error"]["code"] == "payload_too_large"
        and f["error"]["details"].get("limit_bytes") == 4096
        for f in got
    )  # untagged, and named as an HTTP body over its limit is
    assert by_ref["p"]["type"] == "pong" and by_ref["d"]["cache"] == "HIT"
    assert any(f["type"] == "error" and "JSON" in f["error"]["message"] for f in got)
    assert any(f["type"] == "heartbeat" for f in got)
    results = [f for f in got if f["type"] == "result"]
    # completion order: the quick infer answers before the slow job's result
    assert results.index(by_ref["a"]) < next(i for i, f in enumerate(results) if f.get("job_id"))


def test_multiplexed_in_flight_bound(worker_url: str) -> None:
    with connect(worker_url.replace("http", "ws") + "/v1/ws") as ws:
        for i in range(5):
            delay = 0.3 + i / 1000 + time.time() % 1 / 1e5
            ws.send(
                json.dumps({"op": "infer", "ref": i, "model": "sleep_fp32", "inputs": {"DELAY_S": [[delay]]}})
            )
        got = []
        while len([f for f in got if f["type"] in ("result", "error")]) < 5:
            got.append(json.loads(ws.recv(timeout=10)))
    errors = [f for f in got if f["type"] == "error"]
    assert len(errors) == 2 and all(f["error"]["code"] == "too_many_in_flight" for f in errors)


def test_two_replicas_fan_out(wc: httpx.Client, start_gateway: GatewayFactory) -> None:
    """Replica A runs no worker; the job is submitted to and computed by replica B (the worker gateway)."""
    with start_gateway() as url_a:
        r = wc.post(
            "/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[0.5 + time.time() % 1 / 1000]]}}
        )
        job_id = r.json()["id"]
        with connect(url_a.replace("http", "ws") + f"/v1/jobs/{job_id}/ws") as ws:
            frames = frames_until_close(ws)
            assert ws.close_code == 1000
        assert frames[-1]["type"] == "result" and frames[-1]["job"]["status"] == "succeeded"
        with connect(url_a.replace("http", "ws") + "/v1/ws") as ws:
            with httpx.Client(base_url=url_a) as ca:
                r = ca.post(
                    "/v1/models/sleep_fp32/jobs",
                    json={"inputs": {"DELAY_S": [[0.3 + time.time() % 1 / 1000]]}},
                )
            ws.send(json.dumps({"op": "subscribe", "job_id": r.json()["id"]}))
            while (f := json.loads(ws.recv(timeout=10)))["type"] != "result":
                pass
            assert f["job_id"] == r.json()["id"] and f["job"]["status"] == "succeeded"


def test_failing_job_is_dead_lettered(wc: httpx.Client, redis_server: EmbeddedRedis) -> None:
    r = wc.post("/v1/models/reject_fp32/jobs", json={"inputs": {"INPUT0": [[-1.0 - time.time_ns() % 997]]}})
    assert r.status_code == 202, r.text
    job = wait_job(wc, r.json()["id"], timeout=15)
    assert job["status"] == "failed" and job["attempts"] == 2
    # the last attempt's code, as any other door answers the same failure; the details say it was given up
    assert (
        job["error"]["code"] == "triton_error"
        and job["error"]["details"]["last_error"]["code"] == "triton_error"
    )
    assert (
        job["error"]["details"]["attempts_exhausted"] is True
        and job["error"]["details"]["dead_letter"] is True
    )
    dead = redis.Redis.from_url(redis_server.url).xrevrange(DEAD, count=20)
    assert any(fields[b"job_id"].decode() == job["id"] for _, fields in dead)


class Receiver:
    def __init__(self, fail_first: int, fail_status: int = 503, port: int = RECEIVER_PORTS[0]) -> None:
        self.fail_first, self.fail_status = fail_first, fail_status
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = receiver.fail_status if len(receiver.calls) <= receiver.fail_first else 200
                self.send_response(code)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://localhost:{self.server.server_address[1]}/hooks/tgw?x=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_retried_until_receiver_is_up_signed_same_id(wc: httpx.Client) -> None:
    rx = Receiver(fail_first=2)
    try:
        body = {"inputs": {"INPUT0": [unique_row()]}, "webhook": {"url": rx.url}}
        r = wc.post("/v1/models/identity_fp32/jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def delivered() -> dict[str, Any] | None:
            job: dict[str, Any] = wc.get(f"/v1/jobs/{job_id}").json()
            return job if job.get("webhook", {}).get("status") == "delivered" else None

        job = eventually(delivered, 15, 0.1, lambda: str(wc.get(f"/v1/jobs/{job_id}").json()))
    finally:
        rx.close()
    assert len(rx.calls) == 3
    # connected to the vetted address, with the URL's own Host header
    assert rx.calls[0][0]["host"] == f"localhost:{rx.server.server_address[1]}"
    assert {h["webhook-id"] for h, _ in rx.calls} == {f"msg_{job_id}"}
    assert len({b for _, b in rx.calls}) == 1  # the same body on every attempt
    for headers, raw in rx.calls:
        for secret in (SECRET_NEW, SECRET_OLD):  # either side of a rotation verifies
            payload = Webhook(secret).verify(raw, headers)
            assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
    assert payload["data"]["result"] == job["result"]
    attempts = job["webhook"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "delivered"]
    assert [a["status_code"] for a in attempts] == [503, 503, 200]
    iso = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")  # one format: jobs, attempts, keys
    assert all(iso.fullmatch(a["at"]) for a in attempts) and iso.fullmatch(job["created_at"]), attempts
    assert iso.fullmatch(attempts[0]["next_attempt_at"]) and attempts[-1]["next_attempt_at"] is None
    totals = wc.get("/v1/jobs/stats").json()["webhook_deliveries_total"]
    assert totals["delivered"] >= 1 and totals["retry"] >= 2


def test_webhook_410_stops_and_exhaustion_dead_letters(wc: httpx.Client) -> None:
    gone = Receiver(fail_first=99, fail_status=410, port=RECEIVER_PORTS[1])
    down = Receiver(fail_first=99, fail_status=500, port=RECEIVER_PORTS[2])
    try:
        ids = [
            wc.post(
                "/v1/models/identity_fp32/jobs",
                json={"inputs": {"INPUT0": [unique_row()]}, "webhook": {"url": rx.url}},
            ).json()["id"]
            for rx in (gone, down)
        ]
        eventually(lambda: [wc.get(f"/v1/jobs/{i}").json()["webhook"]["status"] for i in ids] == ["stopped", "dead"],
                   15, 0.1, lambda: str([wc.get(f"/v1/jobs/{i}").json()["webhook"] for i in ids]))  # fmt: skip
    finally:
        gone.close()
        down.close()
    assert len(gone.calls) == 1 and len(down.calls) == 4  # 1 + len(schedule)
    assert wc.get(f"/v1/jobs/{ids[1]}").json()["webhook"]["attempts"][-1]["outcome"] == "dead"


@pytest.mark.parametrize(
    "inputs",
    [
        {"series": [[float(i) for i in range(30)]], "horizon": [[0]]},
        {"series": [[float(i) for i in range(30)]], "horizon": [[1000]]},
        {"series": [[1.0, 2.0, 3.0]]},  # shorter than the 20-point window
    ],
    ids=["horizon-0", "horizon-1000", "short-series"],
)
def test_triton_invalid_argument_fails_the_job_at_once(
    wc: httpx.Client, redis_server: EmbeddedRedis, inputs: dict[str, Any]
) -> None:
    """The client's error (Triton INVALID_ARGUMENT): failed on the first attempt, no retry, no dead letter."""
    inputs = {k: [[*v[0][:-1], v[0][-1] + time.time_ns() % 997 / 1e4]] if k == "series" else v
              for k, v in inputs.items()}  # fmt: skip
    r = wc.post("/v1/models/forecast/jobs", json={"inputs": {k: v[0] for k, v in inputs.items()}})
    assert r.status_code == 202, r.text
    job = wait_job(wc, r.json()["id"], timeout=15)
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"]["code"] != "attempts_exhausted"
    dead = redis.Redis.from_url(redis_server.url).xrevrange(DEAD, count=50)
    assert all(fields[b"job_id"].decode() != job["id"] for _, fields in dead)


def test_a_jobs_cache_directives_ride_with_it(wc: httpx.Client) -> None:
    """The submission's ``Cache-Control`` is part of its context: a job submitted with ``no-store`` leaves
    no answer in the cache for its input (a later /v1 call misses), one without it does (a later call hits).
    The worker's attempt is counted and logged as the request it is (``tgw_job_runs_total``)."""
    for directive, later in (("no-store", "MISS"), (None, "HIT")):
        row = unique_row()
        headers = {"Cache-Control": directive} if directive else {}
        r = wc.post("/v1/models/identity_fp32/jobs", json={"inputs": {"INPUT0": [row]}}, headers=headers)
        assert r.status_code == 202, r.text
        assert wait_job(wc, r.json()["id"])["status"] == "succeeded"
        answer = wc.post("/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [row]}})
        assert answer.status_code == 200 and answer.headers["x-cache"] == later, (directive, answer.headers)
    runs = [line for line in wc.get("/metrics").text.splitlines() if line.startswith("tgw_job_runs_total{")]
    assert any('status="200"' in line and float(line.split()[-1]) >= 2 for line in runs), runs
