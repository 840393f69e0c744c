"""Decoupled: for COUNT = n, sends n responses OUT = [0], [1], ... [n-1], then the final flag."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            for i in range(count):
                sender.send(
                    pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))])
                )
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
