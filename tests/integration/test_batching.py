"""Micro-batching never changes an answer: concurrent distinct requests, each equal to its own answer
computed alone (batching off, one at a time)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration

NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def _bodies(n: int) -> list[dict[str, object]]:
    rng = random.Random(5)
    out: list[dict[str, object]] = []
    for i in range(n):
        rows, cols = 1 + i % 3, 4 + (i % 2)  # several row counts, two layouts
        out.append(
            {"inputs": {"INPUT0": [[round(rng.uniform(-9, 9), 3) for _ in range(cols)] for _ in range(rows)]}}
        )
    return out


def test_concurrent_batched_answers_equal_sequential_ones(start_gateway: GatewayFactory) -> None:
    bodies = _bodies(96)
    with start_gateway(batch_enabled=False) as url, httpx.Client(base_url=url, timeout=30) as c:
        expected = []
        for body in bodies:
            r = c.post("/v1/models/identity_fp32/infer", json=body, headers=NO_CACHE)
            assert r.status_code == 200, r.text
            expected.append(r.json())

    async def fire(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as ac:
            return await asyncio.gather(*(
                ac.post("/v1/models/identity_fp32/infer", json=b, headers=NO_CACHE) for b in bodies
            ))  # fmt: skip

    with start_gateway(batch_enabled=True, batch_max_inflight=1) as url:
        got = asyncio.run(fire(url))
    for body, want, r in zip(bodies, expected, got, strict=True):
        assert r.status_code == 200, r.text
        assert r.json() == want
        assert r.json()["outputs"]["OUTPUT0"] == body["inputs"]["INPUT0"]  # type: ignore[index]
