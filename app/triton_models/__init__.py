"""Code that runs *inside* Triton's Python backend stub (``triton_python_backend_utils`` is importable
there only). Model directories keep a two-line ``model.py`` that imports from here, e.g.::

    from app.triton_models.onnx_runner import TritonPythonModel  # noqa: F401

Keep this package import-light: no torch, no tritonclient, no FastAPI. numpy (<2) and onnxruntime only.
"""
