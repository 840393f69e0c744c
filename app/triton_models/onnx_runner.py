"""Generic Python-backend model that serves ``<version>/model.onnx`` with ONNX Runtime on CPU.

This is what every ``configs/cpu.pbtxt`` written by ``tgw convert`` points at (the production
``config.pbtxt`` uses TensorRT instead). Input and output names, types and batching come from the model
configuration; nothing is model-specific here.

Parameters read from the configuration (all optional, ``string_value``):

- ``onnx_file``: file name inside the version directory (default ``model.onnx``)
- ``intra_op_threads``: ONNX Runtime intra-op threads per instance (default ``1``)

With ``max_batch_size > 0`` and dynamic batching, Triton hands ``execute`` several requests at once;
they are concatenated along the batch axis, run in ONE ``session.run`` and split back, so the dynamic
batcher really batches the model computation (not only the scheduling).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - unit tests inject a fake module
    pb_utils = None

# Triton config data types -> numpy dtypes (the subset ONNX models use).
TRITON_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def _param(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return str(value) if value not in (None, "") else default


def make_session(path: str, intra_op_threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    """Triton Python-backend entry point (``initialize`` / ``execute`` / ``finalize``)."""

    session: Any
    inputs: list[tuple[str, Any]]
    outputs: list[tuple[str, Any]]
    batching: bool

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        filename = _param(config, "onnx_file", "model.onnx")
        threads = int(_param(config, "intra_op_threads", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{config.get('name')}: ONNX file not found: {path}")
        self.session = make_session(path, threads)
        self.inputs = [(t["name"], TRITON_TO_NUMPY[t["data_type"]]) for t in config["input"]]
        self.outputs = [(t["name"], TRITON_TO_NUMPY[t["data_type"]]) for t in config["output"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n, _ in self.inputs if n not in onnx_inputs]
        missing += [n for n, _ in self.outputs if n not in onnx_outputs]
        if missing:
            raise ValueError(
                f"{config.get('name')}: config tensors {missing} are not in {filename} "
                f"(inputs {sorted(onnx_inputs)}, outputs {sorted(onnx_outputs)})"
            )

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.session.run([name for name, _ in self.outputs], feeds)
        return [np.ascontiguousarray(r, dtype=dt) for r, (_, dt) in zip(results, self.outputs, strict=True)]

    def _respond(self, arrays: list[np.ndarray]) -> Any:
        tensors = [pb_utils.Tensor(name, a) for (name, _), a in zip(self.outputs, arrays, strict=True)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            feeds[name] = np.asarray(tensor.as_numpy(), dtype=dtype)
        return feeds

    def execute(self, requests: list[Any]) -> list[Any]:
        if not self.batching or len(requests) == 1:
            return [self._execute_one(r) for r in requests]
        try:
            per_request = [self._feeds(r) for r in requests]
            sizes = [next(iter(f.values())).shape[0] for f in per_request]
            feeds = {name: np.concatenate([f[name] for f in per_request]) for name, _ in self.inputs}
            results = self._run(feeds)
        except Exception as exc:  # one bad batch must not take the instance down
            message = f"ONNX Runtime: {exc}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        bounds = np.cumsum([0, *sizes])
        return [self._respond([r[bounds[i] : bounds[i + 1]] for r in results]) for i in range(len(requests))]

    def _execute_one(self, request: Any) -> Any:
        try:
            return self._respond(self._run(self._feeds(request)))
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ONNX Runtime: {exc}"))

    def finalize(self) -> None:
        self.session = None
