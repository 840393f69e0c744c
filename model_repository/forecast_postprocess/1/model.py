"""Post-process step of the forecast ensemble; see app/triton_models/forecast.py."""

from app.triton_models.forecast import PostprocessModel as TritonPythonModel  # noqa: F401
