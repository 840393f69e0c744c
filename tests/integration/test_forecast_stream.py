"""``forecast_stream`` (decoupled, model_repository/forecast_stream) on the real embedded Triton, talked to
directly with ``tritonclient.grpc`` streaming: one response per step, in order, then the final flag; its
first chunk is the ``forecast`` ensemble's answer bit for bit and each later chunk the ensemble's answer on
the series extended by the points before it; bad input is an error and Triton stays up; a cancelled stream
frees the model's single instance at once."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.gateway_server import running_gateway_addresses
from tests.integration.cancel_log import cancelled_after, cancelled_lines

pytestmark = pytest.mark.integration
MODEL = "forecast_stream"
# a period-8 wave with a trend: 30 raw points, not standardised
SERIES = (50 + 3 * np.sin(2 * np.pi * np.arange(30) / 8) + 0.1 * np.arange(30)).astype(np.float32)


def stream_inputs(series: np.ndarray, horizon: int) -> list[grpcclient.InferInput]:
    s = grpcclient.InferInput("series", [len(series)], "FP32")
    s.set_data_from_numpy(np.asarray(series, dtype=np.float32))
    h = grpcclient.InferInput("horizon", [1], "INT32")
    h.set_data_from_numpy(np.array([horizon], dtype=np.int32))
    return [s, h]


class Stream:
    """One gRPC stream to Triton; ``get()`` is the next (result, error) pair."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, series: np.ndarray, horizon: int) -> None:
        self.client.async_stream_infer(
            MODEL, stream_inputs(series, horizon), enable_empty_final_response=True
        )

    def get(self, timeout: float = 30) -> tuple[Any, Any]:
        return self.results.get(timeout=timeout)

    def answer(self) -> tuple[list[tuple[int, float]], bool, Any]:
        """Every step of one request until its final flag or error: (steps, final seen, error)."""
        steps: list[tuple[int, float]] = []
        while True:
            result, error = self.get()
            if error is not None:
                return steps, False, error
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                assert not response.outputs  # the final flag comes alone
                return steps, True, None
            steps.append((int(result.as_numpy("step")[0]), float(result.as_numpy("value")[0])))

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


@pytest.fixture
def stream(triton: EmbeddedTriton) -> Iterator[Stream]:
    s = Stream(triton.grpc_url)
    yield s
    s.close(cancel=True)


def ensemble(triton: EmbeddedTriton, series: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        return client.infer("forecast", stream_inputs(series, 10)).as_numpy("forecast")
    finally:
        client.close()


def test_one_response_per_step_and_the_ensembles_answer(triton: EmbeddedTriton, stream: Stream) -> None:
    stream.send(SERIES, 25)
    steps, final, error = stream.answer()
    assert error is None and final
    assert [s for s, _ in steps] == list(range(1, 26))
    values = np.array([v for _, v in steps], dtype=np.float32)
    # chunk 0: the same pre-process, transformer call (batch 1) and post-process as the ensemble: bit for bit
    np.testing.assert_array_equal(values[:10], ensemble(triton, SERIES))
    # chunk 1: the ensemble on the series extended by the 10 points streamed before it
    np.testing.assert_array_equal(values[10:20], ensemble(triton, np.r_[SERIES, values[:10]]))
    np.testing.assert_array_equal(values[20:], ensemble(triton, np.r_[SERIES, values[:20]])[:5])


@pytest.mark.parametrize(
    ("series", "horizon", "message"),
    [
        (SERIES[:19], 5, "at least 20 points, got 19"),
        (SERIES, 0, "horizon must be between 1 and 10000, got 0"),
        (SERIES, 10_001, "horizon must be between 1 and 10000, got 10001"),
        (np.r_[SERIES, np.nan], 5, "NaN"),
        (np.r_[SERIES[:10], np.inf, SERIES[:10]], 5, "NaN or infinite"),
    ],
    ids=["19-points", "horizon-0", "horizon-10001", "nan", "inf"],
)
def test_bad_input_is_an_error_and_triton_stays_up(
    stream: Stream, series: np.ndarray, horizon: int, message: str
) -> None:
    stream.send(series, horizon)
    steps, final, error = stream.answer()
    assert steps == [] and error is not None and message in error.message(), error
    stream.send(SERIES, 3)  # the same stream, the same instance: still answering
    steps, final, error = stream.answer()
    assert error is None and final and [s for s, _ in steps] == [1, 2, 3]


@pytest.mark.parametrize("door", ["triton", "gateway_grpc"])
def test_a_cancelled_stream_frees_the_instance(
    triton: EmbeddedTriton, door: str, request: pytest.FixtureRequest
) -> None:
    """10 000 steps take seconds on the one instance (~4 s on the 2-core box); cancelled after 3 responses,
    the model sees Triton's cancellation flag between two steps, sends the final flag and returns, so the
    next request is answered at once. Triton's log says after how many steps it stopped. Through Triton
    directly, and through the gateway's gRPC door (``ModelStreamInfer``: the client's cancellation reaches
    Triton through the gateway's own upstream stream; issue 22 item 6, the gRPC door)."""
    url = triton.grpc_url if door == "triton" else request.getfixturevalue("gateway_grpc")
    pid = triton.process.pid
    logged_before = len(cancelled_lines(triton))
    long = Stream(url)
    try:
        long.send(SERIES, 10_000)
        for expected in (1, 2, 3):
            result, error = long.get()
            assert error is None and int(result.as_numpy("step")[0]) == expected
    finally:
        long.close(cancel=True)
    after = Stream(url)
    try:
        started = time.perf_counter()
        after.send(SERIES, 2)
        result, error = after.get(timeout=30)
        first = time.perf_counter() - started
        assert error is None and int(result.as_numpy("step")[0]) == 1
        steps, final, error = after.answer()
        assert error is None and final and [s for s, _ in steps] == [2]
    finally:
        after.close()
    print(f"\nfirst response of the next request {first * 1000:.1f} ms after the cancelled stream")
    assert first < 1.0

    assert 3 <= cancelled_after(triton, logged_before) < 10_000
    assert triton.process.pid == pid and triton.ready()  # the cancelled stream took nothing down


def streams_ended(gateway_url: str, end: str) -> float:
    """``tgw_streams_total{door="grpc_stream",end=...}`` of the gateway."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    prefix = f'tgw_streams_total{{door="grpc_stream",end="{end}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_through_the_gateways_grpc_door_the_same_steps_then_a_replay(
    triton: EmbeddedTriton, gateway_grpc: str, gateway_url: str
) -> None:
    """tritonclient's ``start_stream`` with ``enable_empty_final_response=True`` through the gateway: the
    same steps as Triton's own stream, then the final flag alone (Triton's reserved parameter is not passed
    on: the gateway asks for the final response itself). The identical request again is replayed from the
    cache (a completed stream is stored): the same responses, counted as ``replayed``."""
    series = SERIES + np.float32(0.25)  # a series of its own: the first request is a cache miss
    direct = Stream(triton.grpc_url)
    try:
        direct.send(series, 12)
        expected = direct.answer()
    finally:
        direct.close()
    assert expected[1] and expected[2] is None and len(expected[0]) == 12
    completed, replayed = streams_ended(gateway_url, "completed"), streams_ended(gateway_url, "replayed")
    for _ in range(2):
        through = Stream(gateway_grpc)
        try:
            through.send(series, 12)
            assert through.answer() == expected
        finally:
            through.close()
    assert streams_ended(gateway_url, "completed") == completed + 1
    assert streams_ended(gateway_url, "replayed") == replayed + 1


def test_without_the_empty_final_response_only_the_steps_come(gateway_grpc: str) -> None:
    """A client that did not ask for the empty final response gets the data responses only (as from
    Triton): ``horizon`` of them, none flagged."""
    client = grpcclient.InferenceServerClient(gateway_grpc)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, stream_inputs(SERIES + np.float32(0.5), 4))
        got = [results.get(timeout=30) for _ in range(4)]
        assert all(error is None for _, error in got)
        assert [int(r.as_numpy("step")[0]) for r, _ in got] == [1, 2, 3, 4]
        assert all("triton_final_response" not in r.get_response().parameters for r, _ in got)
        with pytest.raises(queue.Empty):
            results.get(timeout=0.5)
    finally:
        client.stop_stream()
        client.close()


def test_a_stream_longer_than_its_tier_allows_is_cancelled_in_triton(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    """``TGW_STREAM_MAX_DURATION_S`` (a tier's own through ``TGW_AUTH_TIERS``' fourth field): a 10,000-step
    stream (seconds) through a gateway that allows 0.5 s ends with ``triton_timeout`` after about that
    long, and the model saw the cancellation (Triton's log) instead of computing the remaining steps."""
    logged_before = len(cancelled_lines(triton))
    with running_gateway_addresses(
        triton_url=triton.grpc_url, redis_url=redis_server.url, stream_max_duration_s=0.5
    ) as gateway:
        long = Stream(gateway.grpc)
        try:
            started = time.perf_counter()
            long.send(SERIES + np.float32(0.75), 10_000)
            steps, final, error = long.answer()
            took = time.perf_counter() - started
        finally:
            long.close()
    assert error is not None and "longer than its tier allows" in error.message(), error
    assert 0 < len(steps) < 10_000 and not final
    assert 0.4 < took < 3.0, took
    assert 0 < cancelled_after(triton, logged_before) < 10_000
