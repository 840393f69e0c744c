"""Pre-process step of the forecast ensemble; see app/triton_models/forecast.py."""

from app.triton_models.forecast import PreprocessModel as TritonPythonModel  # noqa: F401
