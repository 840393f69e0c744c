"""What the codecs share: ``Reply`` (a transport-neutral answer) and JSON tensor rendering."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import orjson

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class Reply(NamedTuple):
    """Status, body, content type and extra headers (lower-case names) of an answer."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_ORJSON_OPTS)


def jsonable(arr: np.ndarray) -> Any:
    """orjson serialises numeric numpy arrays natively; BYTES become strings."""
    if arr.dtype == np.object_:
        return np.vectorize(
            lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object]
        )(arr).tolist()
    return arr
