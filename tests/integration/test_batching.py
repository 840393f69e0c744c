"""Micro-batching never changes an answer: concurrent distinct requests, each equal to its own answer
computed alone (batching off, one at a time). And batches really form: Triton's own statistics show it
received fewer requests, and ran fewer executions, than the gateway answered."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import tritonclient.http as triton_http

from app.launcher import EmbeddedTriton
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


def _triton_stats(triton: EmbeddedTriton, model: str) -> dict[str, int]:
    """Triton's model statistics: requests received, inferences (batch rows) and model executions."""
    client = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    try:
        stats = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return {
        "requests": sum(int(s["inference_stats"]["success"]["count"]) for s in stats),
        "inferences": sum(int(s.get("inference_count", 0)) for s in stats),
        "executions": sum(int(s.get("execution_count", 0)) for s in stats),
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_concurrent_batched_answers_equal_sequential_ones(
    start_gateway: GatewayFactory, triton: EmbeddedTriton
) -> None:
    bodies = _bodies(96)
    rows = sum(len(b["inputs"]["INPUT0"]) for b in bodies)  # type: ignore[index]
    before = _triton_stats(triton, "identity_fp32")
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

    # The control: without batching, one Triton request and one execution per gateway request.
    sequential = _delta(_triton_stats(triton, "identity_fp32"), before)
    assert sequential == {"requests": len(bodies), "inferences": rows, "executions": len(bodies)}

    before = _triton_stats(triton, "identity_fp32")
    with start_gateway(batch_enabled=True, batch_max_inflight=1) as url:
        got = asyncio.run(fire(url))
    batched = _delta(_triton_stats(triton, "identity_fp32"), before)
    print(f"\n96 concurrent requests, batching on: Triton saw {batched}")
    assert batched["inferences"] == rows  # every row ran exactly once
    assert batched["requests"] < len(bodies), f"the gateway formed no batch: {batched}"
    assert batched["executions"] < len(bodies) and batched["executions"] < batched["inferences"]
    for body, want, r in zip(bodies, expected, got, strict=True):
        assert r.status_code == 200, r.text
        assert r.json() == want
        assert r.json()["outputs"]["OUTPUT0"] == body["inputs"]["INPUT0"]  # type: ignore[index]
