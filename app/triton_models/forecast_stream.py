"""``forecast_stream``: the ``forecast`` ensemble rolled forward, one response per step (decoupled).

In: ``series`` FP32 ``[-1]`` (>= 20 finite raw values) and ``horizon`` INT32 ``[1]`` (1..10 000).
Out, per step: ``step`` INT32 ``[1]`` (1-based) and ``value`` FP32 ``[1]`` (raw units); then the final flag.

Each chunk is exactly what the ``forecast`` ensemble computes, with the same functions
(:func:`app.triton_models.forecast.preprocess` / :func:`~app.triton_models.forecast.postprocess`) around a
BLS call of the transformer (its own config, batcher and backend do the math: ONNX Runtime on CPU, PyTorch
or TensorRT on a GPU): the last 20 points standardised -> 10 scaled points -> unscaled. The chunk's points
are sent one by one, appended to the series in raw units (as sent), and the next chunk forecasts from the
new last 20 points. So chunk ``k`` equals the ensemble's answer for the series extended by the ``10 k``
points before it; chunk 0 is the ensemble's answer for the series itself.

Between steps it checks Triton's cancellation flag and stops (final flag) when the request was cancelled.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from app.triton_models.forecast import WINDOW, _array, _error, _tensor, postprocess, preprocess

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

MAX_HORIZON = 10_000
TARGET = "transformer_timeseries"
class TritonPythonModel:
    target: str
    window: int
    max_horizon: int

    def initialize(self, args: dict[str, str]) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})

        def param(key: str, default: str) -> str:
            return str(params.get(key, {}).get("string_value") or default)

        self.target = param("model", TARGET)
        self.window = int(param("window", str(WINDOW)))
        self.max_horizon = int(param("max_horizon", str(MAX_HORIZON)))

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._stream(request, sender)
            except ValueError as exc:  # bad input: INVALID_ARG (checked before the first step)
                sender.send(_error(str(exc)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the transformer failed: INTERNAL, and the stream ends
                sender.send(
                    _error(f"forecast_stream: {exc}", invalid_arg=False),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None

    def _stream(self, request: Any, sender: Any) -> None:
        series = _array(pb_utils.get_input_tensor_by_name(request, "series"))
        horizon_in = pb_utils.get_input_tensor_by_name(request, "horizon")
        if horizon_in is None:
            raise ValueError("horizon is required")
        window, scale, horizon = preprocess(series, _array(horizon_in), self.window, self.max_horizon)
        total = int(horizon[0])
        history = np.asarray(series, dtype=np.float32).reshape(-1)[-self.window :]
        step = 0
        while step < total:
            if step:  # roll: the next chunk forecasts from the last `window` points, computed ones included
                window, scale, _ = preprocess(history, None, self.window)
            chunk = self._transformer(window)
            values = postprocess(chunk, scale, np.array([chunk.size], np.int32))
            for value in values[: total - step]:
                if request.is_cancelled():
                    pb_utils.Logger.log_info(f"forecast_stream: cancelled after {step} of {total} steps")
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                step += 1
                sender.send(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            _tensor("step", np.array([step], dtype=np.int32)),
                            _tensor("value", np.array([value], dtype=np.float32)),
                        ]
                    )
                )
            history = np.concatenate([history, values])[-self.window :]
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _transformer(self, window: np.ndarray) -> np.ndarray:
        """One BLS call: ``[1, W, 1]`` scaled window -> ``[1, H]`` scaled forecast."""
        response = pb_utils.InferenceRequest(
            model_name=self.target,
            inputs=[_tensor("series", window)],
            requested_output_names=["forecast"],
        ).exec()
        if response.has_error():
            raise RuntimeError(f"{self.target}: {response.error().message()}")
        return _array(pb_utils.get_output_tensor_by_name(response, "forecast"))
