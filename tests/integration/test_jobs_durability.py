"""Nothing accepted is lost: a worker SIGKILLed mid-batch, and Redis restarted with persistence on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.eventually import eventually
from tests.integration.conftest import GatewayFactory
from tests.integration.jobs_helpers import sigkill_worker_holding_jobs, unique_row, wait_job

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def start_worker(triton: EmbeddedTriton, redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        TGW_TRITON_URL=triton.grpc_url, TGW_REDIS_URL=redis_url, TGW_JOB_CLAIM_IDLE_S="1",
        TGW_WORKER_CONCURRENCY="3", TGW_LOG_LEVEL="INFO", TGW_DRAIN_S="2",
    )  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=env, stdout=out, stderr=out
        )


def collect_results(
    ws_url: str, job_ids: list[str], frames: list[dict[str, Any]], stop: threading.Event
) -> None:
    with connect(ws_url) as ws:
        for job_id in job_ids:
            ws.send(json.dumps({"op": "subscribe", "job_id": job_id}))
        while not stop.is_set():
            try:
                frames.append(json.loads(ws.recv(timeout=0.2)))
            except TimeoutError:
                pass
            except ConnectionClosed:
                return


def test_sigkill_worker_mid_batch_every_job_succeeds_exactly_once(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    workers = [start_worker(triton, redis_server.url, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        with start_gateway() as url, httpx.Client(base_url=url, timeout=10) as c:
            base = 0.8 + (time.time_ns() % 1000) / 1e6
            delays = [round(base + i / 1000, 6) for i in range(10)]
            ids = [
                c.post("/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[d]]}}).json()["id"]
                for d in delays
            ]
            frames: list[dict[str, Any]] = []
            stop = threading.Event()
            collector = threading.Thread(
                target=collect_results, args=(url.replace("http", "ws") + "/v1/ws", ids, frames, stop)
            )
            collector.start()
            # SIGKILL a worker that holds running jobs.
            sigkill_worker_holding_jobs(r, workers)
            jobs = [wait_job(c, job_id, timeout=30) for job_id in ids]
            eventually(lambda: {f.get("job_id") for f in frames if f["type"] == "result"} >= set(ids), 20, 0.1,
                       lambda: f"results seen: {sorted({f.get('job_id') for f in frames if f['type'] == 'result'})}")  # fmt: skip
            time.sleep(1.0)  # a real wait: a duplicate event, were there one, has a second to arrive
            stop.set()
            collector.join(5)
    finally:
        for w in workers:  # gone before the next test: a live worker would take its jobs
            if w.poll() is None:
                w.terminate()
                try:
                    w.wait(10)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait(10)
    assert [j["status"] for j in jobs] == ["succeeded"] * len(ids)
    assert [j["result"]["outputs"]["SLEPT_S"][0][0] for j in jobs] == pytest.approx(delays)
    assert any(j["attempts"] >= 2 for j in jobs), "no job was reclaimed from the killed worker"
    results = Counter(f["job_id"] for f in frames if f["type"] == "result")
    assert results == Counter({job_id: 1 for job_id in ids})


def test_queued_jobs_survive_a_redis_restart(
    triton: EmbeddedTriton, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    port = free_port()
    own = EmbeddedRedis(port, tmp_path / "redis", appendonly=True)
    own.start()
    try:
        with start_gateway(redis_url=own.url) as url, httpx.Client(base_url=url, timeout=10) as c:
            bodies = [{"inputs": {"INPUT0": [unique_row()]}} for _ in range(3)]
            ids = [c.post("/v1/models/identity_fp32/jobs", json=b).json()["id"] for b in bodies]
            assert [c.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["queued"] * 3
        own.stop()
        own = EmbeddedRedis(port, tmp_path / "redis", appendonly=True)
        own.start()
        with start_gateway(redis_url=own.url, worker_in_process=True) as url, httpx.Client(base_url=url) as c:
            jobs = [wait_job(c, i, timeout=20) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 3
        assert [j["result"]["outputs"]["OUTPUT0"] for j in jobs] == [b["inputs"]["INPUT0"] for b in bodies]
    finally:
        own.stop()


def test_a_running_job_completes_across_a_redis_restart(
    triton: EmbeddedTriton, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Redis SIGKILLed while a job runs and restarted (same AOF) a moment later: the worker stores the
    answer it already has once Redis is back (each store step is retried, TGW_JOB_STORE_RETRY_S), so the
    job succeeds on its first attempt. The reclaim idle time is longer than the test: no reclaim helps."""
    port = free_port()
    own = EmbeddedRedis(port, tmp_path / "redis", appendonly=True)
    own.start()
    try:
        with (
            start_gateway(redis_url=own.url, worker_in_process=True, job_claim_idle_s=120) as url,
            httpx.Client(base_url=url, timeout=10) as c,
        ):
            delay = round(1.0 + (time.time_ns() % 1000) / 1e6, 6)
            job_id = c.post("/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[delay]]}}).json()[
                "id"
            ]
            wait_job(c, job_id, timeout=10, statuses=("running",))
            pid = own.process.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            own.process.proc.wait(10)  # type: ignore[union-attr]
            time.sleep(1.5)  # a real wait: the outage lasts until the answer is ready
            own.start()
            job = wait_job(c, job_id, timeout=20)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1, job
        assert job["result"]["outputs"]["SLEPT_S"][0][0] == pytest.approx(delay)
    finally:
        own.stop()
