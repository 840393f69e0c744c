"""Serves model.onnx with ONNX Runtime (CPU config); see app/triton_models/onnx_runner.py."""

from app.triton_models.onnx_runner import TritonPythonModel  # noqa: F401
