"""Tensor bytes as Triton's binary formats want them (shared by the cache codec and the HTTP client)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype


def tensor_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian bytes; BYTES tensors as 4-byte-length-prefixed elements."""
    if arr.dtype == np.object_:
        return bytes(serialize_byte_tensor(arr).item()) if arr.size else b""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def tensor_buffer(arr: np.ndarray) -> bytes | memoryview:
    """``tensor_bytes`` without the copy where the array holds those bytes already (contiguous,
    little-endian, not BYTES): a view of them. Copying 16 MB took ~5-15 ms of the event loop."""
    if arr.size and arr.dtype != np.object_ and arr.dtype.byteorder != ">" and arr.flags.c_contiguous:
        return arr.data.cast("B")
    return tensor_bytes(arr)


def tensor_from_bytes(blob: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """The inverse of ``tensor_bytes`` for a Triton ``datatype`` (a read-only view where it can be)."""
    if datatype == "BYTES":
        return deserialize_bytes_tensor(blob).reshape(shape)
    return np.frombuffer(blob, dtype=triton_to_np_dtype(datatype)).reshape(shape)
