"""``tgw convert``: PyTorch checkpoint -> ONNX -> Triton model directory (+ TensorRT plan where possible).

Import-light on purpose: torch is imported only when a conversion actually runs (the ``models`` extra).
"""

from app.convert.configs import ModelSpec, TensorSpec, cpu_config, parse_config, tensorrt_config

__all__ = ["ModelSpec", "TensorSpec", "cpu_config", "parse_config", "tensorrt_config"]
