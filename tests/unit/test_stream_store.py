"""``ResponseStream`` stores a completed stream even when its consumer reads the last response at once (the
SSE routes do: the pump's cache write must not be cancelled by the consumer's end of the stream), and never
stores one its consumer left early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from app.clients.protocols import TritonResult
from app.request_context import RequestContext
from app.services.streams import ResponseStream, StreamLimits


async def _source(count: int, delay: float = 0.0) -> AsyncIterator[TritonResult]:
    for i in range(count):
        await asyncio.sleep(delay)
        yield TritonResult("1", {"x": np.array([i], np.int32)}, {"x": "INT32"}, final=i == count - 1)


def _run(count: int, read: int, delay: float = 0.0) -> tuple[int, list[int], str | None]:
    stored: list[int] = []

    async def store(results: list[TritonResult]) -> None:
        await asyncio.sleep(0.05)  # a Redis write: the consumer reaches the end meanwhile
        stored.append(len(results))

    async def main() -> tuple[int, list[int], str | None]:
        stream = ResponseStream("m", RequestContext("r", "v1"), StreamLimits(), "MISS",
                                _source(count, delay), store=store)  # fmt: skip
        seen = 0
        try:
            async for _ in stream:
                seen += 1
                if seen == read:
                    break
        finally:
            await stream.aclose()
        return seen, stored, stream.end

    return asyncio.run(main())


def test_a_completed_stream_is_stored_though_its_consumer_ended_at_once() -> None:
    assert _run(3, read=0) == (3, [3], "completed")


def test_a_stream_left_early_is_not_stored() -> None:
    assert _run(50, read=2, delay=0.001) == (2, [], "client")
