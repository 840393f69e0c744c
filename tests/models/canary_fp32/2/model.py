"""A broken canary: every request fails."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(error=pb_utils.TritonError("canary version 2 is broken"))
            for _ in requests
        ]
