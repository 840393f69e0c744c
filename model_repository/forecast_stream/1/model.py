"""Decoupled rolling forecast (one response per step); see app/triton_models/forecast_stream.py."""

from app.triton_models.forecast_stream import TritonPythonModel  # noqa: F401
