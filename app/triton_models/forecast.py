"""Pre- and post-process steps of the ``forecast`` ensemble (Python backend; DLPack under numpy 2).

``forecast`` = ``forecast_preprocess`` -> ``transformer_timeseries`` -> ``forecast_postprocess``:

- pre-process: a raw series of any length >= 20 (``series`` FP32 ``[-1]``) and an optional ``horizon``
  (INT32 ``[1]``, 1..10, default 10) -> the last 20 points standardised (``window`` ``[1, 20, 1]``),
  the scaling (``scale`` = ``[mean, std]``) and the horizon to return (``horizon_out``).
- post-process: the model's ``[1, 10]`` forecast in the scaled space -> the first ``horizon`` points
  mapped back to raw values (``forecast`` FP32 ``[horizon]``).

(The transformer standardises its own input too, so it also answers raw windows directly; on an already
standardised window that step is the identity.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

WINDOW = 20
HORIZON = 10
MIN_STD = 1e-3

# Triton's Python-backend stub is built against numpy 1.x: where numpy 2 is installed (the GPU image), its
# numpy bridge (``as_numpy``, ``Tensor(name, array)``) misreads arrays, so tensors go through PyTorch's
# DLPack there, as the GPU models' do (``app.triton_models.torch_runner``): the ensemble's steps and
# ``forecast_stream`` alike.
_DLPACK = int(np.__version__.split(".", 1)[0]) >= 2


def _array(tensor: Any) -> np.ndarray:
    """A Triton tensor (an input, a BLS output, on the CPU or a GPU) as a numpy array."""
    if not _DLPACK:
        return np.asarray(tensor.as_numpy())
    from torch.utils.dlpack import from_dlpack

    return np.asarray(from_dlpack(tensor.to_dlpack()).cpu().numpy())


def _tensor(name: str, array: np.ndarray) -> Any:
    """A numpy array as a Triton tensor."""
    if not _DLPACK:
        return pb_utils.Tensor(name, array)
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(np.ascontiguousarray(array))))


def _param(args: dict[str, str], key: str, default: int) -> int:
    params = json.loads(args["model_config"]).get("parameters", {})
    value = params.get(key, {}).get("string_value")
    return int(value) if value else default


def preprocess(
    series: np.ndarray, horizon: np.ndarray | None, window: int = WINDOW, max_horizon: int = HORIZON
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pure function: ``(window [1, W, 1], scale [2], horizon [1])``; ValueError on bad input."""
    x = np.asarray(series, dtype=np.float64).reshape(-1)
    if x.size < window:
        raise ValueError(f"series needs at least {window} points, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError("series contains NaN or infinite values")
    h = max_horizon
    if horizon is not None:
        hv = np.asarray(horizon).reshape(-1)
        if hv.size != 1:
            raise ValueError(f"horizon must be a single integer, got {hv.size} values")
        h = int(hv[0])
        if not 1 <= h <= max_horizon:
            raise ValueError(f"horizon must be between 1 and {max_horizon}, got {h}")
    last = x[-window:]
    mean = float(last.mean())
    std = max(float(last.std()), MIN_STD)
    scaled = ((last - mean) / std).astype(np.float32).reshape(1, window, 1)
    return scaled, np.array([mean, std], dtype=np.float32), np.array([h], dtype=np.int32)


def postprocess(forecast: np.ndarray, scale: np.ndarray, horizon: np.ndarray) -> np.ndarray:
    """``[1, H]`` scaled forecast -> ``[horizon]`` raw forecast."""
    y = np.asarray(forecast, dtype=np.float64).reshape(-1)
    mean, std = (float(v) for v in np.asarray(scale).reshape(-1)[:2])
    h = int(np.asarray(horizon).reshape(-1)[0])
    return (y[:h] * std + mean).astype(np.float32)


def _error(message: str, invalid_arg: bool = True) -> Any:
    """Bad client input -> INVALID_ARG (HTTP 400 from Triton) rather than INTERNAL (500)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_arg else None
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class PreprocessModel:
    window: int
    max_horizon: int

    def initialize(self, args: dict[str, str]) -> None:
        self.window = _param(args, "window", WINDOW)
        self.max_horizon = _param(args, "max_horizon", HORIZON)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            series = _array(pb_utils.get_input_tensor_by_name(request, "series"))
            h = pb_utils.get_input_tensor_by_name(request, "horizon")
            try:
                window, scale, horizon = preprocess(
                    series, None if h is None else _array(h), self.window, self.max_horizon
                )
            except ValueError as exc:
                responses.append(_error(str(exc)))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        _tensor("window", window),
                        _tensor("scale", scale),
                        _tensor("horizon_out", horizon),
                    ]
                )
            )
        return responses


class PostprocessModel:
    def initialize(self, args: dict[str, str]) -> None:
        pass

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                out = postprocess(
                    _array(pb_utils.get_input_tensor_by_name(request, "forecast")),
                    _array(pb_utils.get_input_tensor_by_name(request, "scale")),
                    _array(pb_utils.get_input_tensor_by_name(request, "horizon")),
                )
            except Exception as exc:
                responses.append(_error(f"postprocess: {exc}", invalid_arg=False))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[_tensor("forecast", out)]))
        return responses
