"""``ResponseStream`` (app/services/streams.py), the one stream every door reads, on a scripted source (the
real Triton's side is proven in tests/integration: test_forecast_stream.py and the doors' stream tests):
order and the final flag, errors after the responses before them, bounded buffering, cancellation
reaching the source, the longest-stream bound, what is stored for the cache, and the stream metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from app.clients.protocols import TritonResult
from app.errors import UpstreamError, UpstreamTimeout
from app.observability import metrics
from app.request_context import RequestContext
from app.services.cache import decode_stream, encode_stream
from app.services.streams import ResponseStream, StreamLimits, StreamOverflow


def step(i: int, final: bool = False) -> TritonResult:
    return TritonResult(
        "1", {"step": np.array([i], np.int32), "value": np.array([i / 2], np.float32)},
        {"step": "INT32", "value": "FP32"}, final=final,
    )  # fmt: skip


class Source:
    """A scripted upstream: ``count`` responses ``gap_s`` apart, then an empty final one (or ``error``);
    records whether it was closed before its end (what cancels the request in Triton)."""

    def __init__(self, count: int, gap_s: float = 0.0, error: Exception | None = None) -> None:
        self.count, self.gap_s, self.error = count, gap_s, error
        self.sent = 0
        self.closed_early = False
        self.finished = False

    async def run(self) -> AsyncIterator[TritonResult]:
        try:
            for i in range(1, self.count + 1):
                if self.gap_s:
                    await asyncio.sleep(self.gap_s)
                self.sent += 1
                yield step(i)
            if self.error is not None:
                raise self.error
            self.finished = True  # the consumer stops at the final response
            yield TritonResult("1", {}, {}, final=True)
        finally:
            self.closed_early = not self.finished


def ctx(door: str = "v1") -> RequestContext:
    return RequestContext(request_id="r1", door=door)  # type: ignore[arg-type]


def counter(door: str, end: str) -> float:
    return metrics.STREAMS.labels(door, end)._value.get()


async def test_every_response_in_order_then_the_final_one_and_the_completed_stream_is_stored() -> None:
    source = Source(5)
    stored: list[list[TritonResult]] = []

    async def store(results: list[TritonResult]) -> None:
        stored.append(results)

    before = counter("v1", "completed")
    stream = ResponseStream("m", ctx(), StreamLimits(), "MISS", source.run(), store=store)
    got = [r async for r in stream]
    await stream.aclose()
    assert [int(r.result.outputs["step"][0]) for r in got[:-1]] == [1, 2, 3, 4, 5]
    assert got[-1].result.final and not got[-1].result.outputs
    assert all(r.cache == "MISS" for r in got)
    assert len(stored) == 1 and [bool(r.final) for r in stored[0]] == [False] * 5 + [True]
    assert counter("v1", "completed") == before + 1
    assert not source.closed_early


async def test_an_error_comes_after_the_responses_before_it_and_nothing_is_stored() -> None:
    source = Source(3, error=UpstreamError("model failed"))
    stored: list[object] = []

    async def store(results: list[TritonResult]) -> None:
        stored.append(results)

    stream = ResponseStream("m", ctx(), StreamLimits(), "MISS", source.run(), store=store)
    got = []
    with pytest.raises(UpstreamError, match="model failed"):
        async for r in stream:
            got.append(int(r.result.outputs["step"][0]))
    await stream.aclose()
    assert got == [1, 2, 3] and stored == []


async def test_a_consumer_that_stops_reading_overflows_the_bound_and_the_source_is_closed() -> None:
    source = Source(10_000)
    before = counter("ws", "overflow")
    stream = ResponseStream("m", ctx("ws"), StreamLimits(buffer_responses=16), "BYPASS", source.run())
    first = await anext(stream)
    await asyncio.sleep(0.05)  # the consumer does not read; the source runs ahead
    assert source.closed_early and source.sent == 1 + 16 + 1  # read, held the bound, then cancelled
    rest = []
    with pytest.raises(StreamOverflow) as raised:
        async for r in stream:
            rest.append(r)
    await stream.aclose()
    steps = [int(r.result.outputs["step"][0]) for r in [first, *rest]]
    assert len(rest) == 16 and steps == list(range(1, 18))  # what was held (the bound), then the error
    assert raised.value.code == "stream_overflow" and raised.value.details["buffer_responses"] == 16
    assert counter("ws", "overflow") == before + 1


async def test_the_byte_bound_overflows_too() -> None:
    source = Source(1000)
    stream = ResponseStream("m", ctx(), StreamLimits(buffer_bytes=4 * 72), "BYPASS", source.run())
    await asyncio.sleep(0.02)
    with pytest.raises(StreamOverflow):
        async for _ in stream:
            pass
    await stream.aclose()
    assert source.closed_early and source.sent <= 6


async def test_cancel_closes_the_source_at_once_and_nothing_is_stored() -> None:
    source = Source(10_000, gap_s=0.001)
    stored: list[object] = []

    async def store(results: list[TritonResult]) -> None:
        stored.append(results)

    before = counter("job", "job")
    stream = ResponseStream("m", ctx("job"), StreamLimits(), "MISS", source.run(), store=store)
    for _ in range(3):
        await anext(stream)
    stream.cancel("job")
    await stream.aclose()
    assert source.closed_early and source.sent < 20 and stored == []
    assert counter("job", "job") == before + 1
    with pytest.raises(StopAsyncIteration):  # a reader after the cancel is not left waiting
        await asyncio.wait_for(anext(stream), 1)


async def test_leaving_early_with_aclose_cancels_as_the_client() -> None:
    source = Source(10_000, gap_s=0.001)
    before = counter("v2", "client")
    async with ResponseStream("m", ctx("v2"), StreamLimits(), "BYPASS", source.run()) as stream:
        await anext(stream)
    assert source.closed_early and counter("v2", "client") == before + 1


async def test_the_contexts_cancelled_event_cancels() -> None:
    source = Source(10_000, gap_s=0.001)
    context = ctx()
    context.cancelled = asyncio.Event()
    stream = ResponseStream("m", context, StreamLimits(), "BYPASS", source.run())
    await anext(stream)
    context.cancelled.set()
    await asyncio.sleep(0.01)
    assert source.closed_early
    await stream.aclose()


async def test_a_completed_stream_with_a_cancel_watcher_closes_and_is_stored() -> None:
    """Read up to the final response only (a door stops there), with ``ctx.cancelled`` never set: aclose
    returns, the stream counts as completed and is stored, and nothing was cancelled."""
    source = Source(3)
    stored: list[object] = []

    async def store(results: list[TritonResult]) -> None:
        stored.append(results)

    context = ctx("ws")
    context.cancelled = asyncio.Event()
    before = counter("ws", "completed")
    stream = ResponseStream("m", context, StreamLimits(), "MISS", source.run(), store=store)
    async for r in stream:
        if r.result.final:
            break
    await asyncio.wait_for(stream.aclose(), 1)
    assert len(stored) == 1 and not source.closed_early
    assert counter("ws", "completed") == before + 1


async def test_the_longest_stream_bound_cancels_with_a_timeout() -> None:
    source = Source(10_000, gap_s=0.005)
    before = counter("v1", "duration")
    stream = ResponseStream("m", ctx(), StreamLimits(), "BYPASS", source.run(), max_duration_s=0.05)
    with pytest.raises(UpstreamTimeout) as raised:
        async for _ in stream:
            pass
    await stream.aclose()
    assert source.closed_early and raised.value.details == {"max_stream_s": 0.05}
    assert counter("v1", "duration") == before + 1


async def test_a_replay_gives_the_stored_responses_as_hits() -> None:
    stored = [step(1), step(2), TritonResult("1", {}, {}, final=True)]
    before = counter("v1", "replayed")
    stream = ResponseStream(
        "m", ctx(), StreamLimits(), "HIT", None, replay=decode_stream(encode_stream(stored))
    )
    got = [r async for r in stream]
    await stream.aclose()
    assert [r.cache for r in got] == ["HIT"] * 3
    assert [r.result.final for r in got] == [False, False, True]
    assert np.array_equal(got[1].result.outputs["value"], np.array([1.0], np.float32))
    assert counter("v1", "replayed") == before + 1


def test_the_stream_codec_round_trips_and_refuses_other_values() -> None:
    results = [step(1), step(2, final=True)]
    back = decode_stream(encode_stream(results))
    assert [r.final for r in back] == [False, True]
    assert all(
        np.array_equal(a.outputs["step"], b.outputs["step"]) for a, b in zip(results, back, strict=True)
    )
    with pytest.raises(ValueError):
        decode_stream(b"\x00\x00\x00\x00{}")
