"""The KServe v2 binary-tensor extension as the ``/v2`` codec uses it. Written once in
``app.clients.tensors``, below both this codec and the Triton HTTP client that shares it
(``app.clients.triton_http``); the names stay here for the codec (``binary.split``, ...).
"""

from __future__ import annotations

from app.clients.tensors import HEADER_LENGTH as HEADER_LENGTH
from app.clients.tensors import HEADER_LENGTH_BYTES as HEADER_LENGTH_BYTES
from app.clients.tensors import Blob as Blob
from app.clients.tensors import FramingError as FramingError
from app.clients.tensors import binary_item as binary_item
from app.clients.tensors import binary_parts as binary_parts
from app.clients.tensors import pack as pack
from app.clients.tensors import split as split
