"""Jobs on a decoupled model (``forecast_stream``) with a worker in the gateway: every response is pushed to
the job's WebSocket subscribers as a partial result while the job runs, the stored result is the whole
sequence Triton's gRPC stream gives directly, ``job.progress`` webhooks (signed) go out only when asked for,
and DELETE of a running job cancels its request in Triton: the model's single instance is free at once."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from standardwebhooks import Webhook
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.cancel_log import cancelled_after, cancelled_lines
from tests.integration.jobs_helpers import wait_job
from tests.integration.test_forecast_stream import Stream

pytestmark = pytest.mark.integration
MODEL = "forecast_stream"
SECRET = "whsec_" + base64.b64encode(b"stream-secret-0123456789abcdef").decode()
RECEIVER_PORT = free_port()


def unique_series(n: int = 30) -> list[float]:
    """Never a cached stream: a random level on a period-8 wave."""
    level = random.uniform(10, 90)
    return [round(level + 3 * float(np.sin(2 * np.pi * i / 8)) + 0.1 * i, 3) for i in range(n)]


@pytest.fixture(scope="module")
def url(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[str]:
    with running_gateway(
        triton_url=triton.grpc_url, redis_url=redis_server.url, worker_in_process=True, job_max_attempts=2,
        ws_heartbeat_s=5, ws_send_queue=4096, webhook_allow_private=True, webhook_secret=SECRET,
        webhook_schedule_s="0.2,0.2", webhook_allowed_ports=[RECEIVER_PORT], webhook_progress_interval_s=0.2,
    ) as u:  # fmt: skip
        yield u


@pytest.fixture
def c(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def submit(c: httpx.Client, series: list[float], horizon: int, **extra: Any) -> str:
    body = {"inputs": {"series": series, "horizon": [horizon]}, **extra}
    r = c.post(f"/v1/models/{MODEL}/jobs", json=body)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def direct(triton: EmbeddedTriton, series: list[float], horizon: int) -> list[tuple[int, float]]:
    s = Stream(triton.grpc_url)
    try:
        s.send(np.array(series, dtype=np.float32), horizon)
        steps, final, error = s.answer()
    finally:
        s.close()
    assert error is None and final
    return steps


@contextlib.contextmanager
def instance_held(triton: EmbeddedTriton) -> Iterator[None]:
    """forecast_stream's one instance busy with a long stream (cancelled on leaving): a job submitted
    meanwhile waits in Triton, so a subscriber opened after the submission sees every response."""
    s = Stream(triton.grpc_url)
    try:
        s.send(np.array(unique_series(), dtype=np.float32), 10_000)
        assert s.get()[1] is None  # it holds the instance now
        yield
    finally:
        s.close(cancel=True)


def frames(ws: Any, until: str = "result", timeout: float = 30) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < deadline:
            frame = json.loads(ws.recv(timeout=deadline - time.monotonic()))
            if frame["type"] == "heartbeat":
                continue
            out.append(frame)
            if frame["type"] == until:
                break
    return out


def steps_of(responses: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(r["outputs"]["step"][0], r["outputs"]["value"][0]) for r in responses]


def as_f32(steps: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, float(np.float32(v))) for s, v in steps]


@pytest.mark.parametrize("door", ["job_ws", "mux_ws"])
def test_partials_pushed_in_order_then_the_whole_sequence(
    c: httpx.Client, url: str, triton: EmbeddedTriton, door: str
) -> None:
    series, horizon = unique_series(), 40
    ws_url = url.replace("http", "ws")
    with contextlib.ExitStack() as stack:
        with instance_held(triton):  # leaving it cancels the long stream: the job's request runs then
            job_id = submit(c, series, horizon)
            if door == "job_ws":
                ws = stack.enter_context(connect(f"{ws_url}/v1/jobs/{job_id}/ws"))
            else:
                ws = stack.enter_context(connect(f"{ws_url}/v1/ws"))
                ws.send(json.dumps({"op": "subscribe", "job_id": job_id}))
            head = frames(ws, until="status", timeout=10)
            assert head[-1]["status"] in ("queued", "running")
            time.sleep(0.2)  # the subscription is in place before the instance frees
        got = head + frames(ws)
    partials = [f for f in got if f["type"] == "partial"]
    assert got[-1]["type"] == "result" and got[-1]["job"]["status"] == "succeeded", got[-1]
    assert [f["seq"] for f in partials] == list(range(1, horizon + 1))  # every response, in order
    assert all(f["job_id"] == job_id and f["attempt"] == 1 for f in partials)
    assert all(f["result"]["model"] == MODEL and f["result"]["model_version"] == "1" for f in partials)
    assert got.index(partials[-1]) < len(got) - 1  # all of them before the result
    statuses = [f["status"] for f in got if f["type"] == "status"]
    assert statuses[-2:] == ["running", "succeeded"], statuses
    job = got[-1]["job"]
    result = job["result"]
    assert set(result) == {"model", "model_version", "responses"} and result["model"] == MODEL
    assert len(result["responses"]) == horizon
    assert [{"outputs": f["result"]["outputs"]} for f in partials] == result["responses"]
    # the whole sequence is what Triton's own gRPC stream answers, step for step, bit for bit
    assert as_f32(steps_of(result["responses"])) == as_f32(direct(triton, series, horizon))
    assert c.get(f"/v1/jobs/{job_id}").json()["result"] == result
    # the same job again: the completed stream is replayed from the cache, same result
    again = wait_job(c, submit(c, series, horizon))
    assert again["status"] == "succeeded" and again["cache"] == "HIT" and again["result"] == result
    print(f"\npartial event: {json.dumps(partials[0])}\nresult: {json.dumps(result)[:300]}...")


class Receiver:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", RECEIVER_PORT), Handler)
        self.server.daemon_threads = True
        self.url = f"http://localhost:{RECEIVER_PORT}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verified(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for headers, raw in list(self.calls):
            payload = Webhook(SECRET).verify(raw, headers)
            data = payload["data"]
            if data["id"] == job_id:
                out.append((headers["webhook-id"], payload))
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    yield rx
    rx.close()


def test_progress_webhooks_only_when_asked_for_signed(
    c: httpx.Client, triton: EmbeddedTriton, receiver: Receiver
) -> None:
    horizon = 3000  # ~1 s of steps on the 2-core box: several progress messages 0.2 s apart
    asked = submit(c, unique_series(), horizon, webhook={"url": receiver.url, "events": ["progress"]})
    plain = submit(c, unique_series(), 50, webhook={"url": receiver.url})
    for job_id in (asked, plain):
        eventually(lambda j=job_id: c.get(f"/v1/jobs/{j}").json().get("webhook", {}).get("status") == "delivered",
                   30, 0.1, lambda j=job_id: str(c.get(f"/v1/jobs/{j}").json().get("webhook")))  # fmt: skip
    job = c.get(f"/v1/jobs/{asked}").json()
    got = receiver.verified(asked)  # every one verifies with the standardwebhooks package
    progress = [(i, p) for i, p in got if p["type"] == "job.progress"]
    final = [(i, p) for i, p in got if p["type"] == "job.succeeded"]
    assert len(final) == 1 and final[0][0] == f"msg_{asked}"
    assert final[0][1]["data"]["result"] == job["result"]
    assert len(progress) >= 2, [p["data"]["partials"][0]["seq"] for _, p in progress]
    ids = [i for i, _ in progress]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"msg_{asked}_p") for i in ids)
    progress.sort(key=lambda x: int(x[0].rsplit("_p", 1)[1]))
    seqs = [p["seq"] for _, m in progress for p in m["data"]["partials"]]
    assert seqs == list(range(1, horizon + 1))  # every partial once, message after message
    first = progress[0][1]
    assert first["data"]["status"] == "running" and first["data"]["model"] == MODEL
    responses = [{"outputs": p["result"]["outputs"]} for _, m in progress for p in m["data"]["partials"]]
    assert responses == job["result"]["responses"]
    plain_got = receiver.verified(plain)
    assert [p["type"] for _, p in plain_got] == ["job.succeeded"]  # not asked for: no progress
    sample = {**first, "data": {**first["data"], "partials": first["data"]["partials"][:2]}}
    print(
        f"\n{len(progress)} progress webhooks for {horizon} steps; first (2 partials shown): {json.dumps(sample)}"
    )


@pytest.mark.parametrize(
    "webhook",
    [{"url": "http://localhost/x", "events": ["done"]}, {"url": "http://localhost/x", "events": "progress"}],
)
def test_webhook_events_validated(c: httpx.Client, webhook: dict[str, Any]) -> None:
    r = c.post(f"/v1/models/{MODEL}/jobs", json={"inputs": {"series": unique_series(), "horizon": [3]},
                                                 "webhook": webhook})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "webhook.events", r.text


def test_delete_of_a_running_job_cancels_it_in_triton(
    c: httpx.Client, url: str, triton: EmbeddedTriton
) -> None:
    logged_before = len(cancelled_lines(triton))
    job_id = submit(c, unique_series(), 10_000)
    with connect(f"{url.replace('http', 'ws')}/v1/jobs/{job_id}/ws") as ws:
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:
            frame = json.loads(ws.recv(timeout=20))
            if frame["type"] == "partial":
                seen.append(frame["seq"])
        assert seen[:3] == [seen[0], seen[0] + 1, seen[0] + 2], seen
        r = c.delete(f"/v1/jobs/{job_id}")
        deleted = time.perf_counter()
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        # the next request (direct to Triton: nothing cached on the way) gets the freed instance at once
        after = Stream(triton.grpc_url)
        try:
            after.send(np.array(unique_series(), dtype=np.float32), 2)
            result, error = after.get(timeout=30)
            first = time.perf_counter() - deleted
            assert error is None and int(result.as_numpy("step")[0]) == 1
        finally:
            after.close()
        rest = frames(ws)
    assert rest[-1]["type"] == "result" and rest[-1]["job"]["status"] == "cancelled", rest[-1:]
    print(f"\nfirst response of the next request {first * 1000:.1f} ms after DELETE")
    assert first < 1.0

    assert 3 <= cancelled_after(triton, logged_before) < 10_000
    time.sleep(1.5)  # never retried, never completed after all
    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["attempts"] == 1 and "result" not in job, job
    again = c.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["error"]["details"]["status"] == "cancelled"


def runs_cancelled(c: httpx.Client) -> float:
    """``tgw_job_runs_total{status="499"}``: attempts that ended because their job was deleted."""
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('tgw_job_runs_total{status="499"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_delete_of_a_running_unary_job_drops_its_call(c: httpx.Client) -> None:
    """A unary job (``sleep_fp32``, 3 s) deleted while it runs: cancelled at once, its worker's attempt ends
    within a second (the call's task is cancelled, not waited for), never retried or completed."""
    before = runs_cancelled(c)
    r = c.post(
        "/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[round(random.uniform(2.9, 3.1), 4)]]}}
    )
    job_id = r.json()["id"]
    wait_job(c, job_id, statuses=("running",))
    deleted = time.monotonic()
    assert c.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    eventually(lambda: runs_cancelled(c) == before + 1, 2, 0.05, "the attempt ended as cancelled (499)")
    assert time.monotonic() - deleted < 1.5
    time.sleep(3)  # past the model's answer: nothing completes the job
    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["attempts"] == 1 and "result" not in job, job


def test_a_stream_larger_than_the_bound_fails_the_job(start_gateway: Any, tmp_path: Path) -> None:
    own = EmbeddedRedis(free_port(), tmp_path / "redis")  # this gateway's worker alone takes its jobs
    own.start()
    try:
        with (
            start_gateway(redis_url=own.url, worker_in_process=True, job_stream_max_bytes=2048) as u,
            httpx.Client(base_url=u, timeout=30) as client,
        ):
            job = wait_job(client, submit(client, unique_series(), 500))
    finally:
        own.stop()
    assert job["status"] == "failed" and job["error"]["code"] == "payload_too_large", job
    assert job["error"]["details"]["limit_bytes"] == 2048 and job["attempts"] == 1
    assert "TGW_JOB_STREAM_MAX_BYTES" in job["error"]["message"]
