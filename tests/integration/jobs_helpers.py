"""Helpers shared by the job tests."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx


def unique_row(n: int = 4) -> list[float]:
    return [round(random.uniform(-100, 100), 3) for _ in range(n)]


def wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float = 20.0,
    statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.1)
