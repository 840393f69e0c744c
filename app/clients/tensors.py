"""Tensor bytes as Triton's binary formats want them (shared by the cache codec and the HTTP client)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype


def tensor_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian bytes; BYTES tensors as 4-byte-length-prefixed elements."""
    if arr.dtype == np.object_:
        return bytes(serialize_byte_tensor(arr).item()) if arr.size else b""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def tensor_from_bytes(blob: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """The inverse of ``tensor_bytes`` for a Triton ``datatype`` (a read-only view where it can be)."""
    if datatype == "BYTES":
        return deserialize_bytes_tensor(blob).reshape(shape)
    return np.frombuffer(blob, dtype=triton_to_np_dtype(datatype)).reshape(shape)


def set_parameter(param: service_pb2.InferParameter, value: Any) -> None:
    """A KServe gRPC ``InferParameter`` set from a JSON-like value (bool before int: bool is an int)."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)
