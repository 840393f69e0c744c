"""MEAN = per-channel mean of IMAGE, NEG = -IMAGE, per request (the dynamic batcher may hand several at once).

The input is read by DLPack. Where numpy 2 is installed (the GPU machine) the stub's numpy path rejects
outputs, so outputs are handed over by DLPack through torch there; with numpy 1 as a plain numpy tensor."""

import numpy as np
import triton_python_backend_utils as pb_utils

NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class _DLPack:
    """What ``np.from_dlpack`` takes, around a Triton tensor's capsule (CPU memory)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **_):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _output(name, array):
    if NUMPY2:
        import torch
        from torch.utils.dlpack import to_dlpack

        return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(array)))
    return pb_utils.Tensor(name, array)


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            image = np.from_dlpack(_DLPack(pb_utils.get_input_tensor_by_name(request, "IMAGE")))
            mean = np.ascontiguousarray(image.reshape(image.shape[0], 3, -1).mean(axis=2), dtype=np.float32)
            neg = np.negative(image, dtype=np.float32)
            out.append(pb_utils.InferenceResponse([_output("MEAN", mean), _output("NEG", neg)]))
        return out
