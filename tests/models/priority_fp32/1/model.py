import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_S").as_numpy()
            time.sleep(float(np.max(delay)))
            timeout = request.timeout() if hasattr(request, "timeout") else -1
            rows = delay.shape[0]
            out.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("SLEPT_S", delay.astype(np.float32)),
                        pb_utils.Tensor("TIMEOUT_US", np.full((rows, 1), timeout, dtype=np.int64)),
                    ]
                )
            )
        return out
