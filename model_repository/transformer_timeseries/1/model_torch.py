"""Serves model.pt with PyTorch on a GPU (configs/gpu*.pbtxt); see app/triton_models/torch_runner.py."""

from app.triton_models.torch_runner import TritonPythonModel  # noqa: F401
