"""The gateway process SIGKILLed in the middle of 200 submits at concurrency 8 (three times, each time
with the keys not answered yet), restarted, and every submit retried with its Idempotency-Key: 0 of 200
lost. Every replay names a job that exists, every key
ends up with exactly one job, and a key answered before the crash keeps its job. Real ``tgw serve``,
real Triton, a Redis of its own."""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.integration.jobs_helpers import unique_row
from tests.processes import TgwProcess, tgw_serve

pytestmark = pytest.mark.integration
N, CONCURRENCY, KILLS = 200, 8, 3
JOBS = "/v1/models/identity_fp32/jobs"


def serve(triton: EmbeddedTriton, redis_url: str, log: Path) -> TgwProcess:
    return tgw_serve(triton, redis_url, log, ready="/healthz", TGW_TRITON_HTTP_URL=triton.http_url,
                     TGW_LOG_LEVEL="WARNING", TGW_SHUTDOWN_DELAY_S="0")  # fmt: skip


def test_sigkill_during_submits_loses_no_job(triton: EmbeddedTriton, tmp_path: Path) -> None:
    own = EmbeddedRedis(free_port(), tmp_path / "redis")
    own.start()
    nonce = time.time_ns()
    keys = [f"crash-{nonce}-{i}" for i in range(N)]
    bodies = {k: {"inputs": {"INPUT0": [unique_row()]}} for k in keys}
    before: dict[str, str] = {}  # key -> job id answered before a crash
    try:
        for kill in range(KILLS):  # each round: the keys not answered yet, SIGKILL mid-run
            pending = [k for k in keys if k not in before]
            with serve(triton, own.url, tmp_path / f"gw{kill}.log") as tgw:
                url, proc = tgw.url, tgw.proc
                answered = threading.Event()

                def submit(key: str, url: str = url, answered: threading.Event = answered) -> None:
                    try:
                        with httpx.Client(base_url=url, timeout=5) as c:
                            r = c.post(JOBS, json=bodies[key], headers={"Idempotency-Key": key})
                    except httpx.HTTPError:
                        return  # the gateway died under this request
                    if r.status_code == 202:
                        before[key] = r.json()["id"]
                        answered.set()

                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    futures = [pool.submit(submit, k) for k in pending]
                    assert answered.wait(60), "no submit was answered"
                    time.sleep(random.uniform(0.1, 0.3))  # a real wait: the kill lands mid-run
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    for f in futures:
                        f.result(timeout=30)
        assert 0 < len(before) < N, f"the kills did not land mid-run ({len(before)} of {N} answered)"

        with serve(triton, own.url, tmp_path / "gw-final.log") as tgw:
            url = tgw.url
            with httpx.Client(base_url=url, timeout=10) as c:

                def retry(key: str) -> tuple[str, int, str, bool, int]:
                    r = c.post(
                        "/v1/models/identity_fp32/jobs", json=bodies[key], headers={"Idempotency-Key": key}
                    )
                    assert r.status_code == 202, r.text
                    job_id = r.json()["id"]
                    replayed = r.headers.get("idempotent-replayed") == "true"
                    return key, r.status_code, job_id, replayed, c.get(f"/v1/jobs/{job_id}").status_code

                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    after = list(pool.map(retry, keys))
                lost = [k for k, _, _, _, get in after if get != 200]
                changed = [k for k, _, job_id, _, _ in after if k in before and before[k] != job_id]
                replayed = sum(1 for *_, rep, _ in after if rep)
                # twice more: every key is bound for good
                again = {k: c.post("/v1/models/identity_fp32/jobs", json=bodies[k], headers={"Idempotency-Key": k})
                         .json()["id"] for k in keys[:20]}  # fmt: skip
                for _, _, job_id, _, _ in after:
                    c.delete(f"/v1/jobs/{job_id}")
        print(f"crash test: {KILLS} SIGKILLs, {len(before)} answered before them, {replayed} replayed after, "
              f"lost {len(lost)} of {N}")  # fmt: skip
        assert lost == [] and changed == []
        assert replayed >= len(before)
        assert again == {k: job_id for k, _, job_id, _, _ in after[:20]}
    finally:
        own.stop()
