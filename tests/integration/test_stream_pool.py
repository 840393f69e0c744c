"""The gateway's upstream ``ModelStreamInfer`` streams are reused (``TritonGrpcClient.stream``), against a
real Triton: a stream that carried its request to Triton's final response carries the next request (no
stream to open: 0.3-0.6 ms of a first response at c=1), one request at a time; a stream left early is
cancelled in Triton and never reused; an idle stream whose Triton restarted is replaced without the
request failing; a deadline ends a pooled stream's request like a fresh one's."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from app.clients.protocols import TritonCall, TritonResult
from app.clients.triton import TritonGrpcClient
from app.errors import UpstreamTimeout
from app.launcher import EmbeddedTriton
from tests.eventually import eventually_async
from tests.integration.servers import running_tritons

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    with running_tritons(tmp_path_factory, ["repeat_decoupled"]) as [server]:
        yield server


@contextlib.asynccontextmanager
async def grpc_client(triton: EmbeddedTriton) -> AsyncIterator[TritonGrpcClient]:
    client = TritonGrpcClient(triton.grpc_url)
    try:
        yield client
    finally:
        await client.close()


def count_call(count: int, rid: str, deadline_s: float = 30.0) -> TritonCall:
    return TritonCall(
        "repeat_decoupled", "", {"COUNT": np.array([count], np.int32)}, {"COUNT": "INT32"},
        request_id=rid, deadline=time.monotonic() + deadline_s,
    )  # fmt: skip


async def collect(results: AsyncIterator[TritonResult]) -> list[TritonResult]:
    return [r async for r in results]


def _successes(stats: dict[str, Any]) -> int:
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def values(results: list[TritonResult]) -> list[int]:
    return [int(r.outputs["OUT"][0]) for r in results if r.outputs]


async def test_sequential_streams_share_one_upstream_stream(triton: EmbeddedTriton) -> None:
    async with grpc_client(triton) as client:
        before = await client.model_statistics("repeat_decoupled")
        streams = []
        for i in range(5):
            results = await collect(client.stream(count_call(3, f"pool-{i}")))
            assert values(results) == [0, 1, 2]
            assert [r.final for r in results] == [False, False, False, True]  # Triton's empty final one
            assert len(client._idle_streams) == 1
            streams.append(client._idle_streams[0][0])
        assert all(s is streams[0] for s in streams), "each request opened a stream of its own"

        async def five_more() -> bool:  # Triton counts a decoupled request once it has released it
            after = await client.model_statistics("repeat_decoupled")
            return _successes(after) - _successes(before) == 5

        await eventually_async(five_more, message="five requests reached the model on the one stream")


async def test_a_stream_left_early_is_cancelled_and_not_reused(triton: EmbeddedTriton) -> None:
    async with grpc_client(triton) as client:
        await collect(client.stream(count_call(2, "warm")))
        [(pooled, _)] = client._idle_streams
        responses = client.stream(count_call(10_000, "left"))
        first = await anext(responses)
        assert first.outputs and not first.final
        assert client._idle_streams == []  # the stream is in use
        await responses.aclose()  # the consumer went away: the stream is cancelled (in Triton too)
        assert pooled.done() and client._idle_streams == []
        results = await collect(client.stream(count_call(3, "next")))  # a fresh stream
        assert values(results) == [0, 1, 2]
        [(fresh, _)] = client._idle_streams
        assert fresh is not pooled


async def test_an_idle_stream_whose_triton_restarted_is_replaced(triton: EmbeddedTriton) -> None:
    async with grpc_client(triton) as client:
        await collect(client.stream(count_call(2, "before")))
        [(pooled, _)] = client._idle_streams
        triton.restart(timeout=120)
        results = await collect(client.stream(count_call(3, "after")))
        assert values(results) == [0, 1, 2]
        [(fresh, _)] = client._idle_streams
        assert fresh is not pooled


async def test_a_deadline_ends_a_request_on_a_pooled_stream(triton: EmbeddedTriton) -> None:
    async with grpc_client(triton) as client:
        await collect(client.stream(count_call(2, "warm")))
        [(pooled, _)] = client._idle_streams
        with pytest.raises(UpstreamTimeout):  # 100,000 responses, answered without pause: not in 0.2 s
            await collect(client.stream(count_call(100_000, "late", deadline_s=0.2)))
        assert pooled.done() and client._idle_streams == []  # cancelled, not reused
        assert values(await collect(client.stream(count_call(2, "after")))) == [0, 1]


async def test_a_traced_stream_is_used_once(triton: EmbeddedTriton) -> None:
    """A traced call's stream carries its ``traceparent`` as the stream's metadata: it is never lent to
    another request (whose trace it would name)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from app.observability import tracing

    async with grpc_client(triton) as client:
        tracing.setup_tracing(None, exporter=InMemorySpanExporter())
        try:
            with tracing.span("test.parent"):
                assert values(await collect(client.stream(count_call(3, "traced")))) == [0, 1, 2]
            assert client._idle_streams == []  # closed once done, not pooled
        finally:
            tracing.shutdown_tracing()
    async with grpc_client(triton) as client:  # untraced again: pooled
        assert values(await collect(client.stream(count_call(2, "plain")))) == [0, 1]
        assert len(client._idle_streams) == 1
