"""Tensor bytes as Triton's binary formats want them (shared by the cache codec and the HTTP client)."""

from __future__ import annotations

import numpy as np
from tritonclient.utils import serialize_byte_tensor


def tensor_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian bytes; BYTES tensors as 4-byte-length-prefixed elements."""
    if arr.dtype == np.object_:
        return bytes(serialize_byte_tensor(arr).item()) if arr.size else b""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()
