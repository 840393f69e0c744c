"""Decoupled: for COUNT = n, n responses (STEP = i, DATA = 16,384 FP32 values: 64 KB), then the final
flag; stops at Triton's cancellation flag, logging after how many responses. A response every ~2 ms, as
a generator that computes each one would (one that sends as fast as it can outruns any cancellation:
Triton queues its responses)."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

DATA = np.arange(16384, dtype=np.float32)


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            for i in range(count):
                if request.is_cancelled():
                    pb_utils.Logger.log_info(f"bulk_stream: cancelled after {i} of {count}")
                    break
                time.sleep(0.002)
                sender.send(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor("STEP", np.array([i], dtype=np.int32)),
                            pb_utils.Tensor("DATA", DATA),
                        ]
                    )
                )
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
