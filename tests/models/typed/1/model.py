"""SUM = sum(I8) + sum(F16) + OPT (0 if absent) + FLAG; TEXT_OUT = TEXT upper-cased."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            i8 = pb_utils.get_input_tensor_by_name(request, "I8").as_numpy()
            f16 = pb_utils.get_input_tensor_by_name(request, "F16").as_numpy()
            flag = pb_utils.get_input_tensor_by_name(request, "FLAG").as_numpy()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            opt = pb_utils.get_input_tensor_by_name(request, "OPT")
            extra = float(opt.as_numpy().sum()) if opt is not None else 0.0
            total = float(i8.astype(np.float64).sum() + f16.astype(np.float64).sum() + flag.sum()) + extra
            upper = np.array([t.upper() for t in text], dtype=np.object_)
            out.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("SUM", np.array([total], dtype=np.float32)),
                        pb_utils.Tensor("TEXT_OUT", upper),
                    ]
                )
            )
        return out
