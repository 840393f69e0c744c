from __future__ import annotations

import asyncio

import grpc
import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from app.clients.grpc_status import from_grpc, grpc_status_from_text
from app.clients.protocols import TritonResult
from app.errors import (
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from app.frontends.kserve_http import codec as v2
from app.request_context import cache_directives
from app.services.inference import InferRequest, InferResponse
from app.services.registry import ModelInfo
from app.services.singleflight import SingleFlight
from app.settings import Settings
from tests.eventually import eventually_async


@pytest.mark.parametrize(
    ("status", "cls", "http"),
    [
        (grpc.StatusCode.UNAVAILABLE, UpstreamUnavailable, 503),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, UpstreamUnavailable, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, UpstreamTimeout, 504),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound, 404),
        (grpc.StatusCode.INVALID_ARGUMENT, UpstreamRejected, 400),
        (grpc.StatusCode.INTERNAL, UpstreamError, 502),
        (grpc.StatusCode.PERMISSION_DENIED, UpstreamError, 502),
        (None, UpstreamError, 502),
    ],
)
def test_grpc_status_mapping(status: grpc.StatusCode | None, cls: type, http: int) -> None:
    err = from_grpc(status, "boom", retry_after_s=7)
    assert isinstance(err, cls) and err.status_code == http
    if http == 503:
        assert err.headers == {"Retry-After": "7"}


def test_status_text_parsing() -> None:
    assert grpc_status_from_text("StatusCode.UNAVAILABLE") is grpc.StatusCode.UNAVAILABLE
    assert grpc_status_from_text(None) is None
    assert grpc_status_from_text("weird") is None


def test_error_shapes() -> None:
    body = orjson.loads(error_body("c", "m", {"field": "f"}))
    assert body == {"error": {"code": "c", "message": "m", "details": {"field": "f"}}}
    v2 = orjson.loads(error_body("c", "m", None, kserve=True))
    assert v2 == {"error": "m", "code": "c", "details": {}}


def test_cache_directives() -> None:
    assert cache_directives(None) == (True, True)
    assert cache_directives("no-cache") == (False, True)
    assert cache_directives("No-Store, max-age=0") == (True, False)
    assert cache_directives("no-cache, no-store") == (False, False)


def test_single_flight_shares_one_call() -> None:
    calls = 0

    async def scenario() -> list[tuple[int, bool]]:
        flights: SingleFlight[int] = SingleFlight()

        async def work() -> int:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return 42

        return await asyncio.gather(*(flights.do("k", work) for _ in range(10)))

    results = asyncio.run(scenario())
    assert calls == 1
    assert [r for r, _ in results] == [42] * 10
    assert sum(shared for _, shared in results) == 9


def test_kserve_binary_round_trip(batched: ModelInfo) -> None:
    data = np.arange(20, dtype=np.float32).reshape(1, 20, 1)
    header = orjson.dumps({
        "id": "7",
        "inputs": [{"name": "series", "shape": [1, 20, 1], "datatype": "FP32",
                    "parameters": {"binary_data_size": 80}}],
        "outputs": [{"name": "forecast", "parameters": {"binary_data": True}}],
    })  # fmt: skip
    req = v2.decode(batched, header + data.tobytes(), str(len(header)))
    assert np.array_equal(req.request.inputs["series"], data)
    assert req.binary_outputs == {"forecast"} and req.id == "7"
    out = np.ones((1, 10), np.float32)
    response = InferResponse("ts", TritonResult("1", {"forecast": out}, {"forecast": "FP32"}), "MISS")
    reply = v2.encode(response, req)
    body = reply.body
    hlen = int(dict(reply.headers)[b"inference-header-content-length"])
    assert reply.content_type == b"application/octet-stream"
    head = orjson.loads(body[:hlen])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 40 and head["id"] == "7"
    assert np.array_equal(np.frombuffer(body[hlen:], np.float32), out.reshape(-1))
    assert isinstance(req.request, InferRequest)


def test_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGW_TRITON_URL", "grpc://triton:8001")
    monkeypatch.setenv("TGW_CACHE_EXCLUDE_MODELS", "a, b")
    s = Settings()
    assert s.triton_grpc_address == "triton:8001" and s.cache.cache_exclude_models == ["a", "b"]
    monkeypatch.setenv("TGW_TRITON_URL", "triton")
    with pytest.raises(ValidationError, match="host:port"):
        Settings()
    monkeypatch.delenv("TGW_TRITON_URL")
    monkeypatch.setenv("TGW_PORT", "8001")
    with pytest.raises(ValidationError, match="distinct ports"):
        Settings()
    monkeypatch.setenv("TGW_PORT", "8080")
    monkeypatch.setenv("TGW_REDIS_URL", "http://nope")
    with pytest.raises(ValidationError, match="redis://"):
        Settings()


def test_retry_only_when_the_request_was_not_sent() -> None:
    from tritonclient.utils import InferenceServerException

    from app.clients.triton import _not_sent

    refused = InferenceServerException(
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
        status="StatusCode.UNAVAILABLE",
    )
    dropped = InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE")
    assert _not_sent(refused)
    assert not _not_sent(dropped)


class _Waiting:  # a gauge of callers waiting on another's call
    n = 0

    def inc(self) -> None:
        self.n += 1

    def dec(self) -> None:
        self.n -= 1


async def test_single_flight_first_caller_cancelled_others_still_answered() -> None:
    waiting = _Waiting()
    flights: SingleFlight[int] = SingleFlight(waiting)
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    leader = asyncio.ensure_future(flights.do("k", work))
    await eventually_async(
        lambda: calls == 1, 10, 0.001
    )  # the leader's call is under way, in the leader's own task
    followers = [asyncio.ensure_future(flights.do("k", work)) for _ in range(3)]
    await eventually_async(lambda: waiting.n == 3, 10, 0.001)  # the followers wait on it
    assert calls == 1
    leader.cancel()
    assert [await f for f in followers] == [(42, True)] * 3  # run again for them
    assert calls == 2 and flights.inflight == 0
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_single_flight_cancelled_alone_and_failures_shared() -> None:
    flights: SingleFlight[int] = SingleFlight()

    async def slow() -> int:
        await asyncio.sleep(1)  # a call that takes its time
        return 1

    alone = asyncio.ensure_future(flights.do("a", slow))
    await eventually_async(lambda: flights.inflight == 1, 10, 0.001)  # under way
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    assert flights.inflight == 0  # nobody waited: no call is run again

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("refused")

    results = await asyncio.gather(*(flights.do("b", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results) and flights.inflight == 0
