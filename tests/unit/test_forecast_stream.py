"""``forecast_stream``'s loop (app/triton_models/forecast_stream.py) with a fake ``pb_utils`` and a fake
transformer: how steps map to transformer calls, what each call gets, the final flag, cancellation between
steps, and bad input. The real model on the real Triton: tests/integration/test_forecast_stream.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from app.triton_models import forecast_stream
from app.triton_models.forecast import postprocess, preprocess

CONFIG = Path(__file__).resolve().parents[2] / "model_repository" / "forecast_stream" / "config.pbtxt"
FINAL = 1
SERIES = (50 + 3 * np.sin(2 * np.pi * np.arange(30) / 8)).astype(np.float32)


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class TritonError(Exception):
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def fake_chunk(window: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the transformer: [1, 20, 1] -> [1, 10]."""
    w = window.reshape(-1)
    return (w[-10:] * 0.5 + w[:10] * 0.25).astype(np.float32).reshape(1, 10)


class Request:
    def __init__(self, series: np.ndarray, horizon: int | None, cancel_after: int | None = None) -> None:
        self.inputs = {"series": FakeTensor("series", series)}
        if horizon is not None:
            self.inputs["horizon"] = FakeTensor("horizon", np.array([horizon], np.int32))
        self.sent: list[tuple[Any, int]] = []
        self.cancel_after = cancel_after

    def get_response_sender(self) -> Any:
        return SimpleNamespace(send=lambda response=None, flags=0: self.sent.append((response, flags)))

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> tuple[forecast_stream.TritonPythonModel, list[np.ndarray]]:
    calls: list[np.ndarray] = []
    failing_after = [10**9]  # the transformer answers this many calls, then errors
    pb = SimpleNamespace(
        Tensor=FakeTensor,
        TritonError=TritonError,
        InferenceResponse=lambda output_tensors=None, error=None: SimpleNamespace(
            outputs=output_tensors, error=error
        ),
    )

    class InferenceRequest:
        def __init__(
            self, model_name: str, inputs: list[FakeTensor], requested_output_names: list[str]
        ) -> None:
            assert model_name == "transformer_timeseries" and requested_output_names == ["forecast"]
            (self.window,) = (t.array for t in inputs if t.name == "series")

        def exec(self) -> Any:
            calls.append(self.window)
            if len(calls) > failing_after[0]:
                error = SimpleNamespace(message=lambda: "queue full")
                return SimpleNamespace(has_error=lambda: True, error=lambda: error)
            out = FakeTensor("forecast", fake_chunk(self.window))
            return SimpleNamespace(has_error=lambda: False, outputs=[out])

    pb.InferenceRequest = InferenceRequest
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.get_output_tensor_by_name = lambda response, name: next(t for t in response.outputs if t.name == name)
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.Logger = SimpleNamespace(log_info=lambda message: None)
    monkeypatch.setattr(forecast_stream, "pb_utils", pb)
    monkeypatch.setattr("app.triton_models.forecast.pb_utils", pb)
    cfg = text_format.Parse(CONFIG.read_text(), model_config_pb2.ModelConfig())
    m = forecast_stream.TritonPythonModel()
    m.initialize(
        {"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True))}
    )
    m.failing_after = failing_after  # type: ignore[attr-defined]
    return m, calls


def steps(request: Request) -> list[tuple[int, float]]:
    """(step, value) of every response before the final flag, which must come alone and last."""
    *answers, (last, flags) = request.sent
    assert last is None and flags == FINAL
    out = []
    for response, flags in answers:
        assert flags == 0 and response.error is None
        named = {t.name: t.array for t in response.outputs}
        assert named["step"].dtype == np.int32 and named["value"].dtype == np.float32
        out.append((int(named["step"][0]), float(named["value"][0])))
    return out


def test_one_transformer_call_per_ten_steps_rolled_in_raw_units(model: Any) -> None:
    m, calls = model
    request = Request(SERIES, 25)
    assert m.execute([request]) is None
    got = steps(request)
    assert [s for s, _ in got] == list(range(1, 26)) and len(calls) == 3
    values = np.array([v for _, v in got], np.float32)
    history = SERIES
    for k, window in enumerate(calls):  # call k = the ensemble's computation on the series extended so far
        expected_window, scale, _ = preprocess(history, None)
        np.testing.assert_array_equal(window, expected_window)
        chunk = postprocess(fake_chunk(window), scale, np.array([10], np.int32))
        np.testing.assert_array_equal(values[10 * k : 10 * k + 10], chunk[: len(values) - 10 * k])
        history = np.r_[history, chunk]


def test_cancelled_between_steps(model: Any) -> None:
    m, calls = model
    request = Request(SERIES, 10_000, cancel_after=3)
    m.execute([request])
    assert [s for s, _ in steps(request)] == [1, 2, 3] and len(calls) == 1


@pytest.mark.parametrize(
    ("series", "horizon", "message"),
    [
        (SERIES[:19], 5, "at least 20 points"),
        (SERIES, 0, "between 1 and 10000"),
        (SERIES, 10_001, "between 1 and 10000"),
        (np.r_[SERIES, np.nan], 5, "NaN"),
        (SERIES, None, "horizon is required"),
    ],
)
def test_bad_input_is_one_invalid_arg_error(
    model: Any, series: np.ndarray, horizon: int | None, message: str
) -> None:
    m, calls = model
    request = Request(series, horizon)
    m.execute([request])
    ((response, flags),) = request.sent
    assert flags == FINAL and message in str(response.error) and response.error.code == 3
    assert calls == []


def test_a_transformer_error_ends_the_stream_with_an_error(model: Any) -> None:
    m, calls = model
    m.failing_after[0] = 1  # the second chunk's call fails
    request = Request(SERIES, 25)
    m.execute([request])
    *answers, (error, flags) = request.sent
    assert len(answers) == 10 and all(f == 0 for _, f in answers)
    assert flags == FINAL and "transformer_timeseries: queue full" in str(error.error)
    assert error.error.code is None and len(calls) == 2  # INTERNAL: not the client's fault
