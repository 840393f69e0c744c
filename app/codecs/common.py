"""What the codecs share: ``Reply`` (a transport-neutral answer), JSON writing and the call options."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from app.domain import CallOptions, ModelInfo
from app.domain import json_values as json_values
from app.domain import jsonable as jsonable
from app.domain import tensor_json_values as tensor_json_values
from app.errors import InvalidInput

# Decoding off the event loop is the services' too (job bodies, /v1/ws frames): it lives below them, in
# app.services.payload; the routers take it from here.
from app.services.payload import OFF_LOOP_BYTES as OFF_LOOP_BYTES
from app.services.payload import decode_off_loop as decode_off_loop
from app.services.validation import check_sequence

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


# Parameters Triton reads itself; they are not model parameters and never part of a cache key.
CALL_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"})


_NO_OPTIONS = CallOptions()


def call_options(params: dict[str, Any], info: ModelInfo) -> CallOptions:
    """Pop Triton's own parameters (``CALL_PARAMETERS``) out of ``params`` (in place) and check their
    types, and sequence controls against ``info`` (only a model with a sequence batcher takes them); the
    rest are the model's parameters (part of the cache key)."""

    if not params:
        return _NO_OPTIONS

    def take(key: str, kinds: type | tuple[type, ...], default: Any) -> Any:
        if key not in params:
            return default
        value = params.pop(key)
        if not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool)):
            raise InvalidInput(f"parameters.{key}: unexpected type {type(value).__name__}",
                               {"field": f"parameters.{key}"})  # fmt: skip
        if kinds is int and isinstance(value, int) and not 0 <= value < 2**64:  # Triton: uint64
            raise InvalidInput(f"parameters.{key}: expected an integer 0..{2**64 - 1}, got {value}",
                               {"field": f"parameters.{key}"})  # fmt: skip
        return value

    options = CallOptions(
        priority=take("priority", int, 0),
        timeout_us=take("timeout", int, 0),
        sequence_id=take("sequence_id", (int, str), 0),
        sequence_start=take("sequence_start", bool, False),
        sequence_end=take("sequence_end", bool, False),
    )
    if options.sequence_id or options.sequence_start or options.sequence_end:
        check_sequence(info, options.sequence_id, options.sequence_start, options.sequence_end)
    return options
