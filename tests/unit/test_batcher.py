"""Micro-batching against a fake Triton: stacking, splitting, and never changing an answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from app.clients.protocols import CallOptions, TritonCall, TritonResult
from app.errors import UpstreamError, UpstreamUnavailable
from app.services.batcher import BatchingTransport
from app.services.registry import batchable, build_model_info

MAX_ROWS = 8


def _call(x: np.ndarray, max_rows: int = MAX_ROWS, **kw: Any) -> TritonCall:
    return TritonCall("m", "1", {"X": x}, {"X": "FP32"}, deadline=time.monotonic() + 5, max_batch_rows=max_rows,
                      **kw)  # fmt: skip


class FakeTriton:
    """Y = 2 * X per row; refuses (the whole call) any negative value, like a strict model would."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def infer(self, call: TritonCall) -> TritonResult:
        x = call.inputs["X"]
        self.calls.append(int(x.shape[0]))
        await asyncio.sleep(0.001)
        if (x < 0).any():
            raise UpstreamError("Triton rejected the request: negative values refused")
        return TritonResult("1", {"Y": x * 2}, {"Y": "FP32"})

    async def live(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def _run(client: BatchingTransport, xs: list[np.ndarray], max_rows: int = MAX_ROWS) -> list[Any]:
    async def one(x: np.ndarray) -> Any:
        return await client.infer(_call(x, max_rows))

    return await asyncio.gather(*(one(x) for x in xs), return_exceptions=True)


def test_batchable_is_decided_once_from_the_config() -> None:
    assert batchable(8, {"dynamic_batching": {}})
    assert not batchable(8, {})
    assert not batchable(1, {"dynamic_batching": {}})
    assert not batchable(8, {"dynamic_batching": {}, "sequence_batching": {}})
    meta = {"name": "m", "versions": ["1"], "inputs": [], "outputs": []}
    assert (
        build_model_info(meta, {"max_batch_size": 8, "dynamic_batching": {}}, ("1",), False).max_batch_rows
        == 8
    )
    assert build_model_info(meta, {"max_batch_size": 8}, ("1",), False).max_batch_rows == 0


async def test_concurrent_requests_are_stacked_and_split_back() -> None:
    fake = FakeTriton()
    client = BatchingTransport(fake, max_inflight=1)
    xs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(12)]
    out = await _run(client, xs)
    for x, r in zip(xs, out, strict=True):
        assert isinstance(r, TritonResult)
        np.testing.assert_array_equal(r.outputs["Y"], x * 2)
    assert len(fake.calls) < len(xs)  # some calls carried several requests
    assert max(fake.calls) <= MAX_ROWS  # never above max_batch_rows
    assert sum(fake.calls) == sum(x.shape[0] for x in xs)


async def test_a_rejected_batch_is_resent_one_by_one() -> None:
    fake = FakeTriton()
    client = BatchingTransport(fake, max_inflight=1)
    xs = [np.full((1, 2), v, dtype=np.float32) for v in (1, 2, -3, 4)]
    out = await _run(client, xs)
    assert isinstance(out[2], UpstreamError)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(out[i].outputs["Y"], xs[i] * 2)


async def test_shared_failures_are_not_retried() -> None:
    class Down(FakeTriton):
        async def infer(self, *args: Any, **kwargs: Any) -> TritonResult:
            self.calls.append(0)
            await asyncio.sleep(0.001)  # a real transport always waits for the network first
            raise UpstreamUnavailable("Triton is unavailable")

    down = Down()
    client = BatchingTransport(down, max_inflight=1)
    out = await _run(client, [np.ones((1, 2), np.float32) for _ in range(6)])
    assert all(isinstance(r, UpstreamUnavailable) for r in out)
    assert len(down.calls) < 6


async def test_not_batched_when_unsafe() -> None:
    fake = FakeTriton()
    client = BatchingTransport(fake)
    await _run(client, [np.ones((1, 2), np.float32) for _ in range(5)], max_rows=0)
    assert fake.calls == [1] * 5
    fake2 = FakeTriton()
    client2 = BatchingTransport(fake2)
    # different non-batch dims never share a call
    xs = [np.ones((1, 2 + i % 2), np.float32) for i in range(6)]
    out = await _run(client2, xs)
    for x, r in zip(xs, out, strict=True):
        np.testing.assert_array_equal(r.outputs["Y"], x * 2)


async def test_parameters_bypass_batching() -> None:
    fake = FakeTriton()
    client = BatchingTransport(fake)
    x = np.ones((1, 2), np.float32)
    results = await asyncio.gather(*(client.infer(_call(x, parameters={"p": 1})) for _ in range(4)))
    assert fake.calls == [1, 1, 1, 1] and len(results) == 4
    sequenced = await asyncio.gather(
        *(client.infer(_call(x, options=CallOptions(sequence_id=7))) for _ in range(4))
    )
    assert fake.calls[4:] == [1, 1, 1, 1] and len(sequenced) == 4


async def test_queue_time_is_reported_on_the_call() -> None:
    fake = FakeTriton()
    client = BatchingTransport(fake, window_us=2000, max_inflight=1)
    calls = [_call(np.ones((1, 2), np.float32)) for _ in range(3)]
    await asyncio.gather(*(client.infer(c) for c in calls))
    # the first found the model idle and left at once; the others waited for the window
    assert calls[0].queued_s == 0.0 and all(c.queued_s >= 0.0015 for c in calls[1:])


async def test_an_idle_model_is_called_at_once_and_later_arrivals_batch_behind_it() -> None:
    fake = FakeTriton()
    client = BatchingTransport(fake, max_inflight=1)
    first = asyncio.ensure_future(client.infer(_call(np.ones((1, 2), np.float32))))
    await asyncio.sleep(0)  # the first call is on the wire, from its own task
    assert fake.calls == [1]
    rest = [client.infer(_call(np.full((1, 2), i, np.float32))) for i in range(5)]
    await asyncio.gather(first, *rest)
    assert fake.calls == [1, 5]  # the five that came while it was in flight left together
