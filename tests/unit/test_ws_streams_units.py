"""``/v1/ws`` streams in the multiplexer (app/services/jobs/sockets.py) against a fake socket and a fake
inference service whose stream answers as fast as the loop runs: a client that stops reading holds at
most half the outbox of stream frames plus the stream's own buffer, then the source is cancelled and the
frames that cannot wait still find room; two streams on one socket take turns; a cancel frame ends a
stream with a ``cancelled`` frame and cancels its source. The real Triton: tests/integration/test_ws_streams.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import numpy as np

from app.clients.protocols import TritonResult
from app.domain import InferRequest, ModelInfo, TensorSpec
from app.request_context import RequestContext
from app.services.inference import InferenceService
from app.services.jobs.service import JobService
from app.services.jobs.sockets import Multiplexer, Outbox, SocketLimits
from app.services.streams import ResponseStream, StreamLimits
from tests.eventually import eventually_async

INFO = ModelInfo(
    "dec", "1", ("1",), "python", 0, {"N": TensorSpec("N", "INT32", (1,))}, {"OUT": TensorSpec("OUT", "INT32", (1,))},
    config={"model_transaction_policy": {"decoupled": True}},
)  # fmt: skip


class Client:
    """The socket's far end: reads (``send_text`` returns) only while ``reading`` is set."""

    def __init__(self, reading: bool = True, pace_s: float = 0.0) -> None:
        self.sent: list[dict[str, Any]] = []
        self.reading = asyncio.Event()
        if reading:
            self.reading.set()
        self.pace_s = pace_s

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def send_text(self, data: str) -> None:
        await self.reading.wait()
        if self.pace_s:
            await asyncio.sleep(self.pace_s)
        self.sent.append(json.loads(data))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass

    def of(self, ref: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("ref") == ref]


class Source:
    """A decoupled model's responses (``OUT`` = 1..n, then the final flag alone), as fast as asked for."""

    def __init__(self, n: int, pace_s: float = 0.0) -> None:
        self.n, self.pace_s = n, pace_s
        self.produced = 0
        self.closed = False  # left before its final response: the request was cancelled upstream

    async def __call__(self) -> AsyncIterator[TritonResult]:
        try:
            for i in range(1, self.n + 1):
                await asyncio.sleep(self.pace_s)
                self.produced += 1
                yield TritonResult("1", {"OUT": np.array([i], np.int32)}, {"OUT": "INT32"}, final=False)
            yield TritonResult("1", {}, {}, final=True)
        finally:
            self.closed = self.produced < self.n


class Inference:
    def __init__(self, sources: dict[int, Source], buffer: int = 16) -> None:
        self.sources = sources  # by the request's N
        self.limits = StreamLimits(buffer_responses=buffer)

    async def resolve(
        self, model: str, version: str | None, *, stream: bool = False, ctx: RequestContext | None = None
    ) -> ModelInfo:
        assert stream
        return INFO

    async def open_stream(self, req: InferRequest, ctx: RequestContext) -> ResponseStream:
        source = self.sources[int(req.inputs["N"][0])]
        return ResponseStream("dec", ctx, self.limits, "MISS", source())


def multiplexer(client: Client, inference: Inference, send_queue: int = 8) -> Multiplexer:
    limits = SocketLimits(send_queue, heartbeat_s=100, max_in_flight=4, max_frame=1 << 20)
    outbox = Outbox(client, send_queue)
    return Multiplexer(cast(JobService, None), cast(InferenceService, inference), "owner", limits, outbox)


def infer(ref: str, n: int) -> str:
    return json.dumps({"op": "infer", "ref": ref, "model": "dec", "inputs": {"N": [n]}})


async def test_a_client_that_stops_reading_holds_a_bounded_buffer_then_the_stream_is_cancelled() -> None:
    client = Client(reading=False)
    source = Source(10_000)
    mux = multiplexer(client, Inference({1: source}, buffer=16))
    mux.handle(infer("a", 1))
    await eventually_async(lambda: source.closed, 5, 0.01, "the source cancelled")
    # one frame in the sender's hands, 4 (half the outbox) queued, one in the stream's task waiting for
    # room, 16 buffered in the stream, and the one that found the buffer full (dropped: the overflow)
    assert source.produced == 1 + 4 + 1 + 16 + 1, source.produced
    assert mux.outbox.queue.qsize() == 4 and not mux.outbox.overflowed
    for i in range(4):  # frames that cannot wait (here pongs) still find the other half free
        mux.handle(json.dumps({"op": "ping", "ref": f"p{i}"}))
    assert mux.outbox.queue.qsize() == 8 and not mux.outbox.overflowed
    client.reading.set()  # the client reads again: what it missed, then the overflow error
    await eventually_async(lambda: any(f["type"] == "error" for f in client.of("a")), 5, 0.01)
    frames = client.of("a")
    assert [f["seq"] for f in frames[:-1]] == list(range(1, len(frames)))
    assert frames[-1]["error"]["code"] == "stream_overflow"
    assert len(frames) - 1 == source.produced - 1  # every response but the one that overflowed
    assert [f["type"] for f in client.sent].count("pong") == 4
    await eventually_async(lambda: not mux.tasks, 5, 0.01, "the stream's task ended")


async def test_two_streams_and_other_frames_take_turns() -> None:
    client = Client(pace_s=0.0005)
    sources = {1: Source(300), 2: Source(300)}
    mux = multiplexer(client, Inference(sources, buffer=1000), send_queue=16)
    mux.handle(infer("a", 1))
    await eventually_async(lambda: len(client.of("a")) >= 20, 5, 0.005)
    mux.handle(infer("b", 2))
    mux.handle(json.dumps({"op": "ping", "ref": "p"}))
    await eventually_async(lambda: client.of("a")[-1:] and client.of("a")[-1].get("final"), 10, 0.01)
    await eventually_async(lambda: client.of("b")[-1:] and client.of("b")[-1].get("final"), 10, 0.01)
    order = [f["ref"] for f in client.sent]
    b_first, a_last = order.index("b"), len(order) - 1 - order[::-1].index("a")
    assert b_first < a_last - 200, (b_first, a_last)  # b did not wait for a to end
    # the ping was answered behind at most half the outbox of stream frames
    assert order.index("p") - order.index("b") <= 16, order.index("p")
    assert [f["seq"] for f in client.of("a")] == list(range(1, 302))
    assert [f["seq"] for f in client.of("b")] == list(range(1, 302))
    assert client.of("a")[-1]["result"]["outputs"] == {} and client.of("a")[-2]["result"]["outputs"] == {
        "OUT": [300]
    }


async def test_a_cancel_frame_ends_the_stream_and_cancels_its_source() -> None:
    client = Client()
    source = Source(1000, pace_s=0.005)
    mux = multiplexer(client, Inference({1: source}))
    mux.handle(infer("a", 1))
    await eventually_async(lambda: len(client.of("a")) >= 3, 5, 0.005)
    mux.handle(json.dumps({"op": "cancel", "ref": "a"}))
    await eventually_async(lambda: client.of("a")[-1]["type"] == "cancelled", 5, 0.005)
    frames = client.of("a")
    assert frames[-1] == {"type": "cancelled", "ref": "a", "request_id": "a", "responses": len(frames) - 1}
    assert source.closed and source.produced < 1000
    await eventually_async(lambda: not mux.tasks and not mux.streams, 5, 0.01)
    mux.handle(json.dumps({"op": "cancel", "ref": "a"}))
    await eventually_async(lambda: client.sent[-1]["type"] == "error", 5, 0.005)
    assert client.sent[-1]["error"]["code"] == "not_found"
