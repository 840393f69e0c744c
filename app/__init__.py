"""triton-gateway: an async FastAPI gateway in front of NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
