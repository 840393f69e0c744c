"""Micro-batching against a fake Triton: stacking, splitting, and never changing an answer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.clients.protocols import TritonResult
from app.errors import UpstreamError, UpstreamUnavailable
from app.services.batcher import BatchingTritonClient, batchable
from app.services.registry import ModelInfo, TensorSpec


def _info(dynamic: bool = True, max_batch: int = 8) -> ModelInfo:
    return ModelInfo(
        name="m", version="1", versions=("1",), platform="python", max_batch_size=max_batch,
        inputs={"X": TensorSpec("X", "FP32", (-1, -1))}, outputs={"Y": TensorSpec("Y", "FP32", (-1, -1))},
        config={"dynamic_batching": {}} if dynamic else {},
    )  # fmt: skip


class FakeTriton:
    """Y = 2 * X per row; refuses (the whole call) any negative value, like a strict model would."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def infer(
        self, model: str, version: str, inputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str],
        outputs: Sequence[str] | None, parameters: Mapping[str, Any] | None, request_id: str, timeout_s: float,
    ) -> TritonResult:  # fmt: skip
        x = inputs["X"]
        self.calls.append(int(x.shape[0]))
        await asyncio.sleep(0.001)
        if (x < 0).any():
            raise UpstreamError("Triton rejected the request: negative values refused")
        return TritonResult("1", {"Y": x * 2}, {"Y": "FP32"})

    async def server_live(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def _run(client: BatchingTritonClient, xs: list[np.ndarray]) -> list[Any]:
    async def one(x: np.ndarray) -> Any:
        return await client.infer("m", "1", {"X": x}, {"X": "FP32"}, None, None, "", 5.0)

    return await asyncio.gather(*(one(x) for x in xs), return_exceptions=True)


def test_batchable() -> None:
    assert batchable(_info())
    assert not batchable(_info(dynamic=False))
    assert not batchable(_info(max_batch=1))
    assert not batchable(None)


async def test_concurrent_requests_are_stacked_and_split_back() -> None:
    fake = FakeTriton()
    client = BatchingTritonClient(fake, lambda m, v: _info(), max_inflight=1)  # type: ignore[arg-type]
    xs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(12)]
    out = await _run(client, xs)
    for x, r in zip(xs, out, strict=True):
        assert isinstance(r, TritonResult)
        np.testing.assert_array_equal(r.outputs["Y"], x * 2)
    assert len(fake.calls) < len(xs)  # some calls carried several requests
    assert max(fake.calls) <= 8  # never above max_batch_size
    assert sum(fake.calls) == sum(x.shape[0] for x in xs)


async def test_a_rejected_batch_is_resent_one_by_one() -> None:
    fake = FakeTriton()
    client = BatchingTritonClient(fake, lambda m, v: _info(), max_inflight=1)  # type: ignore[arg-type]
    xs = [np.full((1, 2), v, dtype=np.float32) for v in (1, 2, -3, 4)]
    out = await _run(client, xs)
    assert isinstance(out[2], UpstreamError)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(out[i].outputs["Y"], xs[i] * 2)


async def test_shared_failures_are_not_retried() -> None:
    class Down(FakeTriton):
        async def infer(self, *args: Any, **kwargs: Any) -> TritonResult:
            self.calls.append(0)
            raise UpstreamUnavailable("Triton is unavailable")

    down = Down()
    client = BatchingTritonClient(down, lambda m, v: _info(), max_inflight=1)  # type: ignore[arg-type]
    out = await _run(client, [np.ones((1, 2), np.float32) for _ in range(6)])
    assert all(isinstance(r, UpstreamUnavailable) for r in out)
    assert len(down.calls) < 6


async def test_not_batched_when_unsafe() -> None:
    fake = FakeTriton()
    client = BatchingTritonClient(fake, lambda m, v: _info(dynamic=False))  # type: ignore[arg-type]
    await _run(client, [np.ones((1, 2), np.float32) for _ in range(5)])
    assert fake.calls == [1] * 5
    fake2 = FakeTriton()
    client2 = BatchingTritonClient(fake2, lambda m, v: _info())  # type: ignore[arg-type]
    # different non-batch dims never share a call
    xs = [np.ones((1, 2 + i % 2), np.float32) for i in range(6)]
    out = await _run(client2, xs)
    for x, r in zip(xs, out, strict=True):
        np.testing.assert_array_equal(r.outputs["Y"], x * 2)


async def test_parameters_bypass_batching() -> None:
    fake = FakeTriton()
    client = BatchingTritonClient(fake, lambda m, v: _info())  # type: ignore[arg-type]
    x = np.ones((1, 2), np.float32)
    results = await asyncio.gather(
        *(client.infer("m", "1", {"X": x}, {"X": "FP32"}, None, {"p": 1}, "", 5.0) for _ in range(4))
    )
    assert fake.calls == [1, 1, 1, 1] and len(results) == 4
