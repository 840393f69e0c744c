"""The KServe v2 binary-tensor extension, written once: used by the ``/v2`` codec (requests in, answers
out) and by the Triton HTTP client (requests out, answers in).

A message is a JSON header followed by raw tensor bytes; the header's length travels in the
``Inference-Header-Content-Length`` HTTP header, and each binary tensor states its size in
``parameters.binary_data_size``, in the order the tensors are listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import orjson

from app.clients.tensors import tensor_buffer

HEADER_LENGTH = "inference-header-content-length"
HEADER_LENGTH_BYTES = HEADER_LENGTH.encode()


class FramingError(ValueError):
    """The header length or a ``binary_data_size`` does not fit the message. ``field`` names the culprit."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def split(raw: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """(JSON header bytes, binary tail). ``None``: the whole message is JSON."""
    if header_length is None:
        return raw, b""
    if header_length < 0 or header_length > len(raw):
        raise FramingError(
            f"Inference-Header-Content-Length {header_length} is outside the body ({len(raw)} bytes)",
            "Inference-Header-Content-Length",
        )
    return raw[:header_length], raw[header_length:]


def binary_parts(tensors: Iterable[Any], tail: bytes, kind: str) -> dict[str, bytes]:
    """Slice ``tail`` among the tensors (``kind``: "inputs" or "outputs") that declare
    ``parameters.binary_data_size``; every byte must be claimed."""
    parts: dict[str, bytes] = {}
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict):
            continue
        params = tensor.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        name = str(tensor.get("name"))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
            raise FramingError(
                f"{kind}.{name}.parameters.binary_data_size: {size} does not fit the {len(tail)} bytes of "
                "binary data",
                f"{kind}.{name}.parameters.binary_data_size",
            )
        parts[name] = tail[offset : offset + size]
        offset += size
    if offset != len(tail):
        unclaimed = len(tail) - offset
        message = f"body: {unclaimed} bytes of binary data are not claimed by any {kind[:-1]}"
        raise FramingError(message, "body")
    return parts


Blob = bytes | memoryview


def binary_item(name: str, datatype: str, arr: np.ndarray, blobs: list[Blob]) -> dict[str, Any]:
    """A tensor entry whose data goes to ``blobs`` (appended in order: a view of the array where it holds
    the bytes already, copied only once, into the message)."""
    blob = tensor_buffer(arr)
    blobs.append(blob)
    return {"name": name, "datatype": datatype, "shape": arr.shape,
            "parameters": {"binary_data_size": len(blob)}}  # fmt: skip


def pack(header: Mapping[str, Any], blobs: list[Blob]) -> tuple[bytes, int | None]:
    """(message, header length or None when there is no binary part)."""
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
