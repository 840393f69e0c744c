"""The jobs API: ``/v1/models/{m}/jobs`` and ``/v1/jobs/{id}``."""
