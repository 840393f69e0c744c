import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_S").as_numpy()
            time.sleep(float(np.max(delay)))
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("SLEPT_S", delay.astype(np.float32))]))
        return out
